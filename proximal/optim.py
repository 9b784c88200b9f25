"""Adam (Kingma and Ba 2015, Algorithm 1), written out, and the gradient clipping every
trainer's step goes through (`clip_gradients`: a non-finite gradient never reaches the weights).

Why not `torch.optim.Adam`: every `torch.optim` optimiser imports `torch._dynamo` on first use,
about one second of a three-second `proximal train` process on a laptop CPU, and the update is
a handful of lines. The conventions are torch.optim.Adam's (eps added to sqrt(v_hat), no weight
decay); `tests/test_optim.py` checks the two take the same steps.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from proximal.errors import TrainingDiverged


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float, what: str) -> None:
    """Scale the gradients to a total norm <= `max_norm`, or refuse a NaN or infinite one before
    the step: a finite loss can have one (a NaN at an entry the loss masks out still meets a 0 in
    the backward pass, and 0 x NaN is NaN), and one such step would turn every weight NaN."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if not bool(torch.isfinite(norm)):
        raise TrainingDiverged(f"the {what} gradient became NaN or infinite although the loss was finite")


class Adam:
    """Adam over a fixed list of parameters, with a settable `learning_rate`."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], learning_rate: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.parameters = list(parameters)
        self.learning_rate = learning_rate
        self.betas = betas
        self.eps = eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.parameters]  # m: first moment of the gradient
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.parameters]  # v: second moment

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        first_correction = 1.0 - beta1 ** self.steps  # bias corrections of the zero-initialised moments
        second_correction = 1.0 - beta2 ** self.steps
        # One fused (`_foreach`) kernel per line over all parameters: the per-tensor loop cost
        # a third of a HalfCheetah update (13 tensors x 5 ops x 160 minibatches).
        indices = [i for i, parameter in enumerate(self.parameters) if parameter.grad is not None]
        parameters = [self.parameters[i] for i in indices]
        gradients = [parameter.grad for parameter in parameters]
        exp_avg = [self.exp_avg[i] for i in indices]
        exp_avg_sq = [self.exp_avg_sq[i] for i in indices]
        torch._foreach_lerp_(exp_avg, gradients, 1.0 - beta1)  # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, gradients, gradients, value=1.0 - beta2)  # v = beta2 v + (1 - beta2) g^2
        denominators = torch._foreach_div(exp_avg_sq, second_correction)
        torch._foreach_sqrt_(denominators)
        torch._foreach_add_(denominators, self.eps)  # sqrt(v_hat) + eps
        torch._foreach_addcdiv_(parameters, exp_avg, denominators, value=-self.learning_rate / first_correction)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "learning_rate": self.learning_rate, "betas": list(self.betas),
                "eps": self.eps, "exp_avg": [m.clone() for m in self.exp_avg],
                "exp_avg_sq": [v.clone() for v in self.exp_avg_sq]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` (copies the tensors); ValueError if it does not fit these parameters."""
        shapes = [p.shape for p in self.parameters]
        for name in ("exp_avg", "exp_avg_sq"):
            if [t.shape for t in state[name]] != shapes:
                raise ValueError(f"optimizer state {name} does not match the network's parameter shapes")
        self.steps = int(state["steps"])
        self.learning_rate = float(state["learning_rate"])
        self.betas = (float(state["betas"][0]), float(state["betas"][1]))
        self.eps = float(state["eps"])
        self.exp_avg = [t.clone() for t in state["exp_avg"]]
        self.exp_avg_sq = [t.clone() for t in state["exp_avg_sq"]]

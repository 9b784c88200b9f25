"""The reward model of Christiano et al. 2017, "Deep reinforcement learning from human
preferences", Section 2.2.3: an ensemble of MLPs r_hat(o, a) fitted to pairwise preferences.

A clip (segment) sigma is k consecutive (observation, action) pairs. The preference model is
Bradley-Terry on the clips' summed, undiscounted rewards:
  P_hat[sigma1 > sigma2] = exp(sum_t r_hat(o1_t, a1_t))
                           / (exp(sum_t r_hat(o1_t, a1_t)) + exp(sum_t r_hat(o2_t, a2_t)))   (Eq. 1)
                         = sigmoid(R_hat(sigma1) - R_hat(sigma2))
and the loss is the cross-entropy against the label mu (mu(1) = 1, 0, or 0.5 for "equally good"):
  loss(r_hat) = - sum mu(1) log P_hat[sigma1 > sigma2] + mu(2) log P_hat[sigma2 > sigma1]  (Sec. 2.2.3)
"We assume there is a 10% chance that the human responds uniformly at random": the model's
probability is P = (1 - e) P_hat + e / 2 with e = 0.1, built into the loss (not a softmax alone).

The ensemble's members are trained together (batched matmuls over a leading member axis [E]),
each on its own bootstrap resample of the comparisons. Each member's output is normalised to
zero mean and unit std over the labelled clips; the reward handed to PPO is the mean of the
normalised members times `reward_std`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from proximal.losses import bradley_terry_loss, preference_probability
from proximal.optim import Adam


class RewardEnsemble(nn.Module):
    """E independent MLPs with leaky-ReLU hidden layers, [E, B, input_dim] -> [E, B].

    Member e's layer l computes x @ weights[l][e] + biases[l][e]; each member is initialised
    like a stack of `nn.Linear` layers. Inputs are standardised first by `input_mean` and
    `input_std` (buffers, set once from the first labelled data, so they travel in the state dict)
    and clipped to +-`input_clip` standard deviations (None: not clipped). The first data come
    from the initial policy, so a later policy's states can lie far outside them: HalfCheetah's
    forward velocity passes 10 of the random policy's standard deviations at 1.8 m/s, and clipped
    there the learned reward cannot see speed.
    """

    def __init__(self, input_dim: int, num_members: int, hidden_sizes: tuple[int, ...], input_clip: float | None):
        super().__init__()
        self.input_clip = input_clip
        sizes = (input_dim, *hidden_sizes, 1)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers = [nn.Linear(fan_in, fan_out) for _ in range(num_members)]
            self.weights.append(nn.Parameter(torch.stack([layer.weight.detach().T for layer in layers])))  # [E, in, out]
            self.biases.append(nn.Parameter(torch.stack([layer.bias.detach() for layer in layers])[:, None]))  # [E, 1, out]
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_std", torch.ones(input_dim))

    @property
    def num_members(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = (inputs - self.input_mean) / self.input_std  # [E, B, D]
        if self.input_clip is not None:
            hidden = hidden.clamp(-self.input_clip, self.input_clip)
        for layer, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            hidden = torch.baddbmm(bias, hidden, weight)  # [E, B, out]
            if layer < len(self.weights) - 1:
                hidden = nn.functional.leaky_relu(hidden, negative_slope=0.01)
        return hidden.squeeze(-1)

    def squared_weights(self) -> torch.Tensor:
        """Sum of squared weights (not biases) of each member [E]: the L2 penalty."""
        return sum(weight.pow(2).sum(dim=(1, 2)) for weight in self.weights)


class RewardModel:
    """The fitted ensemble, its per-member output normalisation, and its adaptive L2.

    `fit` trains every member on its own bootstrap resample of the training comparisons, then
    moves each member's L2 coefficient so that validation loss stays between 1.1x and 1.5x
    the training loss (the paper's rule), and re-normalises the outputs.
    """

    L2_FACTOR = 1.5  # how much one fit moves the L2 coefficient when outside [1.1, 1.5]

    def __init__(self, input_dim: int, num_members: int, hidden_sizes: tuple[int, ...], learning_rate: float,
                 error_rate: float, reward_std: float, input_clip: float | None, initial_l2: float = 1e-3):
        self.network = RewardEnsemble(input_dim, num_members, hidden_sizes, input_clip)
        self.optimizer = Adam(self.network.parameters(), learning_rate=learning_rate)
        self.error_rate = error_rate
        self.reward_std = reward_std
        self.l2 = torch.full((num_members,), initial_l2)  # [E]
        self.output_mean = torch.zeros(num_members)  # [E]
        self.output_std = torch.ones(num_members)  # [E]
        self.inputs_fitted = False

    @property
    def num_members(self) -> int:
        return self.network.num_members

    def member_returns(self, clips: torch.Tensor) -> torch.Tensor:
        """Raw summed rewards of each member for clips [..., k, D] -> [E, ...]."""
        flat = clips.reshape(1, -1, clips.shape[-1]).expand(self.num_members, -1, -1)  # [E, M*k, D]
        rewards = self.network(flat).reshape(self.num_members, *clips.shape[:-1])  # [E, ..., k]
        return rewards.sum(-1)

    @torch.no_grad()
    def member_preferences(self, clips_1: torch.Tensor, clips_2: torch.Tensor) -> torch.Tensor:
        """Each member's P[sigma1 > sigma2] for pairs of clips [C, k, D] -> [E, C]."""
        return preference_probability(self.member_returns(clips_1), self.member_returns(clips_2), self.error_rate)

    @torch.no_grad()
    def reward(self, inputs: torch.Tensor) -> torch.Tensor:
        """The learned reward for (observation, action) inputs [B, D] -> [B]: the mean of the
        members' normalised outputs, scaled to `reward_std`."""
        raw = self.network(inputs.unsqueeze(0).expand(self.num_members, -1, -1))  # [E, B]
        normalised = (raw - self.output_mean[:, None]) / self.output_std[:, None]
        return self.reward_std * normalised.mean(0)

    def _losses(self, clips_1: torch.Tensor, clips_2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The Section 2.2.3 loss of each member on the same pairs [M, k, D] -> [E]."""
        return bradley_terry_loss(self.member_returns(clips_1), self.member_returns(clips_2), labels, self.error_rate)

    def fit(self, clips_1: torch.Tensor, clips_2: torch.Tensor, labels: torch.Tensor, is_validation: torch.Tensor,
            steps: int, minibatch_size: int, generator: torch.Generator) -> dict[str, float]:
        """Train on the comparisons (pairs of clips [M, k, D], labels [M]) for `steps` gradient
        steps; `is_validation` [M] marks the held-out ones. Returns the losses after fitting."""
        train_index = torch.nonzero(~is_validation).squeeze(-1)
        if not self.inputs_fitted:  # standardise inputs by the first data: fixed from then on
            steps_seen = torch.cat([clips_1[train_index], clips_2[train_index]]).flatten(0, -2)  # [2 M k, D]
            self.network.input_mean.copy_(steps_seen.mean(0))
            self.network.input_std.copy_(steps_seen.std(0).clamp_min(1e-6))
            self.inputs_fitted = True
        num_train = len(train_index)
        bootstrap = train_index[torch.randint(num_train, (self.num_members, num_train), generator=generator)]  # [E, n]
        for _ in range(steps):
            picks = torch.randint(num_train, (self.num_members, min(minibatch_size, num_train)), generator=generator)
            index = bootstrap.gather(1, picks)  # [E, b]: each member's own minibatch
            returns_1 = self._returns_per_member(clips_1[index])  # [E, b]
            returns_2 = self._returns_per_member(clips_2[index])
            losses = bradley_terry_loss(returns_1, returns_2, labels[index], self.error_rate)  # [E]
            loss = (losses + self.l2 * self.network.squared_weights()).sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        with torch.no_grad():
            train_losses = self._losses(clips_1[train_index], clips_2[train_index], labels[train_index])  # [E]
            stats = {"reward_train_loss": float(train_losses.mean()), "reward_val_loss": math.nan,
                     "reward_val_accuracy": math.nan}
            validation = torch.nonzero(is_validation).squeeze(-1)
            if len(validation) > 0:
                val_losses = self._losses(clips_1[validation], clips_2[validation], labels[validation])
                ratio = val_losses / train_losses.clamp_min(1e-8)
                self.l2 = torch.where(ratio > 1.5, self.l2 * self.L2_FACTOR,
                                      torch.where(ratio < 1.1, self.l2 / self.L2_FACTOR, self.l2))
                stats["reward_val_loss"] = float(val_losses.mean())
                stats["reward_val_accuracy"] = self._accuracy(clips_1[validation], clips_2[validation],
                                                              labels[validation])
            stats["reward_l2"] = float(self.l2.mean())
            all_steps = torch.cat([clips_1, clips_2]).flatten(0, -2)  # [2 M k, D]
            raw = self.network(all_steps.unsqueeze(0).expand(self.num_members, -1, -1))  # [E, 2 M k]
            self.output_mean, self.output_std = raw.mean(1), raw.std(1).clamp_min(1e-8)
        return stats

    def _returns_per_member(self, clips: torch.Tensor) -> torch.Tensor:
        """Summed rewards of member e on its own clips [E, b, k, D] -> [E, b]."""
        num_members, batch, length, dim = clips.shape
        return self.network(clips.reshape(num_members, batch * length, dim)).reshape(num_members, batch, length).sum(-1)

    def _accuracy(self, clips_1: torch.Tensor, clips_2: torch.Tensor, labels: torch.Tensor) -> float:
        """Share of strict preferences (labels 0 or 1) the ensemble's mean prediction gets right."""
        strict = labels != 0.5
        if not strict.any():
            return math.nan
        predicted = self.member_preferences(clips_1[strict], clips_2[strict]).mean(0) > 0.5
        return float((predicted == (labels[strict] == 1.0)).float().mean())

    def state_dict(self) -> dict[str, Any]:
        return {"network": self.network.state_dict(), "optimizer": self.optimizer.state_dict(),
                "l2": self.l2, "output_mean": self.output_mean, "output_std": self.output_std,
                "error_rate": self.error_rate, "reward_std": self.reward_std, "inputs_fitted": self.inputs_fitted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.l2, self.output_mean, self.output_std = state["l2"], state["output_mean"], state["output_std"]
        self.error_rate, self.reward_std = float(state["error_rate"]), float(state["reward_std"])
        self.inputs_fitted = bool(state["inputs_fitted"])


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank)."""
    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values))
        for value in np.unique(values):  # average the ranks of ties
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked
    return float(np.corrcoef(ranks(np.asarray(x)), ranks(np.asarray(y)))[0, 1])

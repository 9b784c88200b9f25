"""Our Adam against torch.optim.Adam (the independent reference, tests only)."""

import subprocess
import sys

import pytest
import torch

from proximal.optim import Adam


def twin_parameters(seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (5,), (2, 5), (2,)]
    ours = [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64)) for shape in shapes]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    return ours, reference


def apply_gradients(parameters, gradients):
    for parameter, gradient in zip(parameters, gradients):
        parameter.grad = gradient.clone()


def step_both(adam, ours, torch_adam, reference, gradients):
    """One step of our Adam and of torch's, on twin parameters with the same gradients."""
    apply_gradients(ours, gradients)
    apply_gradients(reference, gradients)
    adam.step()
    torch_adam.step()


@pytest.mark.parametrize("learning_rate,eps", [(1e-3, 1e-8), (3e-3, 1e-5), (0.1, 1e-5)])
def test_takes_the_same_steps_as_torch_adam(learning_rate, eps):
    ours, reference = twin_parameters()
    adam = Adam(ours, learning_rate=learning_rate, eps=eps)
    torch_adam = torch.optim.Adam(reference, lr=learning_rate, eps=eps)
    generator = torch.Generator().manual_seed(1)
    for step in range(50):
        gradients = [torch.randn(p.shape, generator=generator, dtype=torch.float64) * (1 + step % 7) for p in ours]
        step_both(adam, ours, torch_adam, reference, gradients)
        for mine, theirs in zip(ours, reference):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_learning_rate_can_change_between_steps_like_torch_param_groups():
    ours, reference = twin_parameters()
    adam = Adam(ours, learning_rate=1e-2)
    torch_adam = torch.optim.Adam(reference, lr=1e-2)
    for step in range(10):
        adam.learning_rate = torch_adam.param_groups[0]["lr"] = 1e-2 * (1 - step / 10)
        step_both(adam, ours, torch_adam, reference, [torch.ones_like(p) * (step - 4) for p in ours])
    for mine, theirs in zip(ours, reference):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_continues_exactly():
    straight, _ = twin_parameters()
    resumed, _ = twin_parameters()
    adam = Adam(straight, learning_rate=1e-2)
    first = Adam(resumed, learning_rate=1e-2)
    gradients = [[torch.full_like(p, float(step + 1)) for p in straight] for step in range(6)]
    for step in range(3):
        apply_gradients(straight, gradients[step]); adam.step()
        apply_gradients(resumed, gradients[step]); first.step()
    state = first.state_dict()
    second = Adam(resumed, learning_rate=999.0)
    second.load_state_dict(state)
    state["exp_avg"][0].fill_(123.0)  # the loaded optimizer holds copies, not the caller's tensors
    for step in range(3, 6):
        apply_gradients(straight, gradients[step]); adam.step()
        apply_gradients(resumed, gradients[step]); second.step()
    for a, b in zip(straight, resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not match"):
        Adam([torch.nn.Parameter(torch.zeros(3))], learning_rate=1e-3).load_state_dict(state)


def test_zero_grad_and_parameters_without_gradient():
    parameters, _ = twin_parameters()
    adam = Adam(parameters, learning_rate=1e-2)
    before = parameters[1].detach().clone()
    apply_gradients(parameters, [torch.ones_like(p) for p in parameters])
    parameters[1].grad = None
    adam.step()
    assert torch.equal(parameters[1], before)  # no gradient, no step
    adam.zero_grad()
    assert all(p.grad is None for p in parameters)


def test_training_never_imports_torch_dynamo():
    # torch.optim imports torch._dynamo (about a second) on first use; the training path must not.
    code = ("import sys, tempfile; from proximal.presets import preset_for; from proximal.train import train;"
            "train(preset_for('CartPole-v1').with_overrides({'ppo': {'total_timesteps': 256, 'num_steps': 16},"
            " 'run': {'eval_episodes': 2, 'runs_dir': tempfile.mkdtemp()}})); print('torch._dynamo' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr

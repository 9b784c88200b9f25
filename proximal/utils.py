"""Generalized Advantage Estimation and small numeric helpers."""

from __future__ import annotations

import torch


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    terminated: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, Eq. 16), all tensors [T, N].

    delta_t = r_t + gamma * (1 - terminated_t) * V(s_{t+1}) - V(s_t)        (TD residual, Eq. 10)
    A_t     = delta_t + gamma * lam * (1 - done_t) * A_{t+1},  done = terminated or truncated

    `next_values[t]` is V of the state reached after step t. At a time-limit truncation that is
    V(final observation): the episode was cut, not finished, so the TD target still bootstraps
    from it; at a termination the future is truly zero. The recursion itself stops at every
    episode end either way, since the next row belongs to another episode.

    Returns (advantages, returns), returns = advantages + values: the lambda-return that the
    critic regresses on.
    """
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    not_done = 1.0 - torch.logical_or(terminated.bool(), truncated.bool()).to(rewards.dtype)
    deltas = rewards + gamma * not_terminated * next_values - values  # [T, N]
    advantages = torch.zeros_like(rewards)  # [T, N]
    next_advantage = torch.zeros_like(rewards[0])  # [N]
    for t in reversed(range(rewards.shape[0])):
        next_advantage = deltas[t] + gamma * lam * not_done[t] * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """1 - Var[targets - predictions] / Var[targets]: 1 is a perfect critic, 0 predicts the mean,
    negative is worse than predicting the mean. NaN when the targets have no variance."""
    target_variance = targets.var(unbiased=False)
    if target_variance == 0:
        return float("nan")
    return float(1.0 - (targets - predictions).var(unbiased=False) / target_variance)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is True (over `dim`, or everything). Selects with `where`
    rather than multiplying, so a NaN or inf in a masked-out entry (padding) cannot leak in."""
    selected = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if dim is None:
        return selected.sum() / mask.sum().clamp_min(1)
    return selected.sum(dim) / mask.sum(dim).clamp_min(1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`values` shifted and scaled to zero mean and unit variance over the entries where `mask`
    is True; entries outside the mask are returned as 0."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean).pow(2), mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    return torch.where(mask, whitened, torch.zeros((), dtype=values.dtype, device=values.device))

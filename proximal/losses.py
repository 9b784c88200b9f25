"""The math both trainers share, on the ground floor: the control tasks' PPO and the language
model's PPO, RLOO, reward model and DPO all call these, and nothing here knows about
environments, tokens or files.

  clipped_surrogate        Eq. 7 of Schulman et al. 2017 (with Eq. 6's ratio) per entry, optionally
                           with DAPO's asymmetric clip range (Yu et al. 2025)
  clipped_surrogate_loss   its negated mean, optionally masked
  kl_k3                    the k3 estimator of a KL divergence from log-ratios (Schulman 2020)
  ratio_statistics         approx-KL(old || new) and the clip fraction of an update
  compute_gae              Generalized Advantage Estimation (Schulman et al. 2016, Eq. 16)
  explained_variance       how much of the returns' variance the critic explains
  masked_mean, masked_moments, masked_whiten   reductions over the entries a mask keeps (response tokens)
  masked_aggregate         a per-token loss reduced per token, per sequence or by a constant, as a share
                           of a larger batch (micro-batches add up to the batch's loss)
  bradley_terry_loss       the preference loss of Christiano et al. 2017 (Eq. 1), also DPO's
"""

from __future__ import annotations

import torch
from torch import nn

def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      clip_coef: float, clip_coef_high: float | None = None) -> torch.Tensor:
    """The clipped surrogate objective of Eq. 7 per entry (to maximise): min(r A, clip(r) A), with
    r clipped to [1 - clip_coef, 1 + clip_coef_high] (`clip_coef_high` None: clip_coef; a larger
    one is DAPO's "clip-higher", Yu et al. 2025, which lets unlikely tokens gain more per update).

    The min makes it a pessimistic bound: once r A has improved past the clip edge
    (A > 0 and r > 1 + eps, or A < 0 and r < 1 - eps) the clipped term is the smaller one and
    is constant in theta, so that sample's gradient is exactly zero. Where the change makes the
    objective worse, the unclipped term is the smaller one and the gradient flows.
    """
    clip_high = clip_coef if clip_coef_high is None else clip_coef_high
    ratio = torch.exp(logprobs - old_logprobs)  # r_t(theta), Eq. 6
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_coef, 1.0 + clip_high) * advantages
    # Eq. 7 (Schulman et al. 2017): L^CLIP = E[min(r A, clip(r, 1-eps, 1+eps) A)]
    return torch.min(unclipped, clipped)


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    clip_coef: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 7 negated, the scalar to minimise: the mean of `clipped_surrogate` over every entry,
    or over those where `mask` is True (a language model's response tokens)."""
    surrogate = clipped_surrogate(logprobs, old_logprobs, advantages, clip_coef)
    return -(surrogate.mean() if mask is None else masked_mean(surrogate, mask))


def kl_k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with log r = `log_ratio` = log p(x) - log q(x), x drawn from q: an
    unbiased estimate of KL(q || p) that is >= 0 for every sample (Schulman 2020)."""
    return log_ratio.exp() - 1.0 - log_ratio


@torch.no_grad()
def ratio_statistics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, clip_coef: float,
                     mask: torch.Tensor | None = None, clip_coef_high: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """How far an update moved the policy, over every entry or those where `mask` is True:
    approx-KL(old || new) by the k3 estimator (>= 0 for every sample), and the clip fraction,
    the share of samples whose ratio r left [1 - clip_coef, 1 + clip_coef_high]."""
    log_ratio = logprobs - old_logprobs
    approx_kl = kl_k3(log_ratio)
    ratio = log_ratio.exp()
    clip_high = clip_coef if clip_coef_high is None else clip_coef_high
    clipped = ((ratio - 1.0 > clip_high) | (1.0 - ratio > clip_coef)).float()
    if mask is None:
        return approx_kl.mean(), clipped.mean()
    return masked_mean(approx_kl, mask), masked_mean(clipped, mask)


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


def masked_moments(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, variance) of `values` over the entries where `mask` is True."""
    mean = masked_mean(values, mask)
    return mean, masked_mean((values - mean).pow(2), mask)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  moments: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`values` shifted and scaled to zero mean and unit variance over the entries where `mask`
    is True (or by given `moments`, another batch's); entries outside the mask are returned as 0."""
    mean, variance = masked_moments(values, mask) if moments is None else moments
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    return torch.where(mask, whitened, torch.zeros((), dtype=values.dtype, device=values.device))


AGGREGATIONS = ("token", "sequence", "constant")


def masked_aggregate(values: torch.Tensor, mask: torch.Tensor, how: str, rows: int, tokens: int,
                     max_length: int) -> torch.Tensor:
    """A per-token loss `values` [b, T] (where `mask` is True) reduced to this slice's share of a
    batch of `rows` rows holding `tokens` masked entries: the shares of a batch's slices add up
    to the batch's loss, so micro-batches' gradients add up to the whole batch's.

      token     sum / tokens              every token weighs the same (PPO's mean; DAPO)
      sequence  sum_rows mean_t / rows    every sequence weighs the same (GRPO, Shao et al. 2024)
      constant  sum / (rows * max_length) no length bias (Dr. GRPO, Liu et al. 2025)
    """
    if how == "token":  # the slice's token mean, weighted by its share of the tokens (x 1.0 for the whole batch)
        return masked_mean(values, mask) * (mask.sum() / max(tokens, 1))
    if how == "sequence":
        return masked_mean(values, mask, dim=-1).sum() / max(rows, 1)
    if how == "constant":
        selected = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
        return selected.sum() / (max(rows, 1) * max_length)
    raise ValueError(f"loss aggregation must be one of {', '.join(AGGREGATIONS)}, got {how!r}")


def preference_probability(returns_1: torch.Tensor, returns_2: torch.Tensor, error_rate: float) -> torch.Tensor:
    """P[sigma1 > sigma2] from the clips' summed predicted rewards: Eq. 1 mixed with a uniform
    answer of probability `error_rate` (0 gives Eq. 1 alone)."""
    return (1.0 - error_rate) * torch.sigmoid(returns_1 - returns_2) + error_rate / 2


def bradley_terry_loss(returns_1: torch.Tensor, returns_2: torch.Tensor, labels: torch.Tensor,
                       error_rate: float) -> torch.Tensor:
    """The loss of Section 2.2.3 averaged over pairs [..., B] -> [...]: the cross-entropy between the label
    mu(1) = `labels` (mu(2) = 1 - labels) and the noise-mixed Bradley-Terry probability."""
    difference = returns_1 - returns_2
    if error_rate == 0.0:  # log-sigmoid is exact where sigmoid would underflow
        log_p1, log_p2 = nn.functional.logsigmoid(difference), nn.functional.logsigmoid(-difference)
    else:  # P >= error_rate / 2 > 0: the logs are safe. P2 from sigmoid(-d), not 1 - P1.
        log_p1 = torch.log(preference_probability(returns_1, returns_2, error_rate))
        log_p2 = torch.log(preference_probability(returns_2, returns_1, error_rate))
    return -(labels * log_p1 + (1.0 - labels) * log_p2).mean(-1)

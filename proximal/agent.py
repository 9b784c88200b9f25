"""The actor-critic network, the PPO loss (Eq. 7) and `PPOAgent`.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms":
  r_t(theta) = pi_theta(a_t | s_t) / pi_theta_old(a_t | s_t)                               (Eq. 6)
  L^CLIP     = E_t[ min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) ]                         (Eq. 7)
  L^{CLIP+VF+S} = E_t[ L^CLIP - c1 (V(s_t) - V_t^targ)^2 + c2 S[pi](s_t) ]                  (Eq. 9)
We maximise Eq. 9 by minimising its negative.

The policy is categorical for Discrete action spaces and a diagonal Gaussian with a learned,
state-independent log-std for Box action spaces; both heads sit on the same actor body.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from proximal.checkpoint import load_checkpoint
from proximal.config import TrainConfig
from proximal.dist import DistContext
from proximal.errors import CheckpointError, ConfigError, TrainingDiverged
from proximal.normalize import RunningMeanStd
from proximal.optim import Adam, clip_gradients
from proximal.losses import clipped_surrogate_loss, explained_variance, ratio_statistics


def _orthogonal(layer: nn.Linear, gain: float) -> nn.Linear:
    """Orthogonal weights with the given gain, zero biases (as in the PPO paper's baselines code)."""
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


# each activation as the bodies' module (what the state dict and printing see) and as the function
# the forward pass calls
ACTIVATIONS = {"tanh": (nn.Tanh, torch.tanh), "relu": (nn.ReLU, torch.relu)}


def _mlp_body(in_dim: int, hidden_sizes: tuple[int, ...], activation: str) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden_sizes:
        layers += [_orthogonal(nn.Linear(in_dim, width), gain=np.sqrt(2)), ACTIVATIONS[activation][0]()]
        in_dim = width
    return nn.Sequential(*layers)


class ActorCritic(nn.Module):
    """An MLP with two heads: the actor's output [B, A] (action logits, or the means of a
    Gaussian over A action dimensions), and the critic's value [B].

    With `shared_body` both heads read one body's features; otherwise each head has its own
    body (the usual choice for control: the value loss cannot disturb the policy's features).
    A continuous policy also has `actor_log_std` [A]: its log standard deviations, learned but
    the same in every state.
    """

    def __init__(self, obs_dim: int, action_dim: int, hidden_sizes: tuple[int, ...], shared_body: bool,
                 continuous: bool = False, activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        self.actor_body = _mlp_body(obs_dim, hidden_sizes, activation)
        self.critic_body = None if shared_body else _mlp_body(obs_dim, hidden_sizes, activation)
        # Small policy gain: near-uniform initial policy. Unit value gain: values start near 0.
        self.actor_head = _orthogonal(nn.Linear(hidden_sizes[-1], action_dim), gain=0.01)
        self.critic_head = _orthogonal(nn.Linear(hidden_sizes[-1], 1), gain=1.0)
        self.actor_log_std = nn.Parameter(torch.full((action_dim,), log_std_init)) if continuous else None
        self.activation = ACTIVATIONS[activation][1]
        self.actor_linears = list(self.actor_body)[::2]  # the bodies' Linear layers, for `_features`
        self.critic_linears = None if shared_body else list(self.critic_body)[::2]

    def _features(self, linears: list[nn.Linear], observations: torch.Tensor) -> torch.Tensor:
        """A body's output, computed as its bare ops (linear, activation, linear, ...): around each
        layer nn.Module's call machinery was 40% of a forward pass on CartPole's 8-row batches
        (62 -> 36 us for both bodies and heads); the ops, and so the numbers, are the same."""
        for linear in linears:
            observations = self.activation(F.linear(observations, linear.weight, linear.bias))
        return observations

    def forward(self, observations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        actor_features = self._features(self.actor_linears, observations)
        critic_features = (actor_features if self.critic_linears is None
                           else self._features(self.critic_linears, observations))
        return _head(self.actor_head, actor_features), _head(self.critic_head, critic_features).squeeze(-1)

    def actor(self, observations: torch.Tensor) -> torch.Tensor:
        """The actor head alone (logits or Gaussian means): acting needs no value."""
        return _head(self.actor_head, self._features(self.actor_linears, observations))

    def value(self, observations: torch.Tensor) -> torch.Tensor:
        linears = self.actor_linears if self.critic_linears is None else self.critic_linears
        return _head(self.critic_head, self._features(linears, observations)).squeeze(-1)


def _head(head: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    return F.linear(features, head.weight, head.bias)


LOG_2PI = math.log(2 * math.pi)


def categorical_policy(
    logits: torch.Tensor, actions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(actions [B], log pi(a|s) [B], entropy [B]) of the categorical softmax(logits [B, n]);
    samples the actions when none are given."""
    all_logprobs = torch.log_softmax(logits, dim=-1)  # [B, n]
    probs = all_logprobs.exp()
    if actions is None:
        actions = torch.multinomial(probs, 1).squeeze(-1)
    action_logprobs = all_logprobs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    entropy = -(probs * all_logprobs).sum(-1)
    return actions, action_logprobs, entropy


def gaussian_policy(
    means: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(actions [B, A], log pi(a|s) [B], entropy [B]) of N(means [B, A], diag(exp(log_std [A]))^2);
    samples the actions when none are given. Log-prob and entropy sum over the independent
    dimensions; the sample is not clipped here (the env's bounds apply only when it is sent)."""
    log_std = log_std.expand_as(means)
    std = log_std.exp()
    if actions is None:
        actions = means + std * torch.randn_like(means)
    action_logprobs = (-0.5 * ((actions - means) / std).pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)
    entropy = (0.5 + 0.5 * LOG_2PI + log_std).sum(-1)
    return actions, action_logprobs, entropy


@dataclass
class RolloutBatch:
    """The valid transitions of one rollout, flattened over [T, N] to [B]."""

    observations: torch.Tensor  # [B, obs_dim]
    actions: torch.Tensor  # [B] discrete, [B, A] continuous
    logprobs: torch.Tensor  # [B]  log pi_old(a|s) at collection time
    values: torch.Tensor  # [B]  V_old(s) at collection time
    advantages: torch.Tensor  # [B]
    returns: torch.Tensor  # [B]  advantages + values: the critic's target

    @property
    def size(self) -> int:
        return self.actions.shape[0]


class PPOAgent:
    """Actor-critic PPO: sample actions during rollouts, update on a batch, act when trained."""

    def __init__(self, obs_dim: int, action_dim: int, config: TrainConfig,
                 action_bounds: tuple[np.ndarray, np.ndarray] | None = None):
        """`action_dim` actions to choose from, or, with `action_bounds` (low [A], high [A]), a
        continuous action of `action_dim` numbers clipped to those bounds when sent to the env."""
        self.config = config
        self.obs_dim = obs_dim
        self.action_dim = action_dim
        self.action_bounds = None if action_bounds is None else tuple(
            np.asarray(bound, dtype=np.float32).reshape(action_dim) for bound in action_bounds)
        ppo = config.ppo
        self.network = ActorCritic(obs_dim, action_dim, ppo.hidden_sizes, ppo.shared_body,
                                   continuous=self.continuous, activation=ppo.activation,
                                   log_std_init=ppo.log_std_init)
        self.observation_stats = RunningMeanStd((obs_dim,)) if ppo.normalize_observations else None
        self.optimizer = Adam(self.network.parameters(), learning_rate=ppo.learning_rate, eps=1e-5)
        self.dist = DistContext()  # data-parallel training (proximal.dist): the other ranks, if any

    @classmethod
    def for_spaces(cls, observation_space: gym.spaces.Box, action_space: gym.Space, config: TrainConfig) -> PPOAgent:
        """An agent for an env's single observation and action spaces (Discrete or 1-D Box actions)."""
        if isinstance(action_space, gym.spaces.Discrete):
            return cls(observation_space.shape[0], int(action_space.n), config)
        return cls(observation_space.shape[0], action_space.shape[0], config, (action_space.low, action_space.high))

    @property
    def continuous(self) -> bool:
        return self.action_bounds is not None

    @property
    def action_shape(self) -> tuple[int, ...]:
        """Shape of one env's action: () for a discrete choice, (A,) for a continuous action."""
        return (self.action_dim,) if self.continuous else ()

    # -- acting ---------------------------------------------------------------------------------

    def get_action(
        self, observations: torch.Tensor, actions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(action [B] or [B, A], log pi(action|s) [B], entropy of pi(.|s) [B], V(s) [B]).

        Samples actions from the policy when `actions` is None (rollouts); otherwise scores the
        given actions under the current policy (updates).
        """
        actor_output, values = self.network(observations)  # [B, A], [B]
        actions, action_logprobs, entropy = self._policy(actor_output, actions)
        return actions, action_logprobs, entropy, values

    def _policy(
        self, actor_output: torch.Tensor, actions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions, log-probs, entropies) of this agent's distribution over the actor's output."""
        if self.continuous:
            return gaussian_policy(actor_output, self.network.actor_log_std, actions)
        return categorical_policy(actor_output, actions)

    def prepare_observations(self, observations: np.ndarray, update_stats: bool) -> torch.Tensor:
        """Raw env observations [N, obs_dim] as the networks take them: standardised by the running
        statistics when observation normalisation is on (updated only while training)."""
        if self.observation_stats is None:
            return torch.from_numpy(observations)
        if update_stats:
            self.observation_stats.update(observations)
        return torch.from_numpy(self.observation_stats.normalize(observations))

    def get_value(self, observations: torch.Tensor) -> torch.Tensor:
        """V(s) [B], without computing the policy."""
        return self.network.value(observations)

    @torch.no_grad()
    def act(self, observations: np.ndarray, deterministic: bool = True) -> np.ndarray:
        """Env actions for raw observations: [N, obs_dim] -> [N] or [N, A] (or one observation ->
        one action), ready for `env.step`.

        Deterministic means greedy: the most probable action (the Gaussian's mean).
        """
        observations = np.asarray(observations, dtype=np.float32)
        single = observations.ndim == 1
        batch = observations[None] if single else observations
        if batch.ndim != 2 or batch.shape[1] != self.obs_dim:
            raise ValueError(f"act() takes observations of shape [N, {self.obs_dim}] or "
                             f"[{self.obs_dim}], got {observations.shape}")
        actor_output = self.network.actor(self.prepare_observations(batch, update_stats=False))
        if deterministic:
            actions = actor_output if self.continuous else actor_output.argmax(-1)
        else:
            actions, _, _ = self._policy(actor_output)
        actions = self.to_env(actions)
        return actions[0] if single else actions

    def to_env(self, actions: torch.Tensor) -> np.ndarray:
        """The policy's actions as the env takes them: continuous ones clipped to the bounds."""
        if self.continuous:
            return np.clip(actions.numpy(), *self.action_bounds)
        return actions.numpy()

    # -- learning -------------------------------------------------------------------------------

    def set_learning_rate(self, learning_rate: float) -> None:
        self.optimizer.learning_rate = learning_rate

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """PPO's optimisation phase: `epochs` passes over shuffled minibatches.

        Returns statistics averaged over the minibatches that ran: losses, entropy, approx-KL
        (the k3 estimator E[(r - 1) - log r]), clip fraction, plus the epochs completed (fewer
        than configured when target-KL stopped early) and the critic's explained variance.
        """
        ppo, dist = self.config.ppo, self.dist
        global_size = int(dist.sum(torch.tensor(batch.size)))
        num_minibatches = max(1, round(global_size / ppo.minibatch_size))  # the same on every rank
        parameters = list(self.network.parameters())
        history: list[torch.Tensor] = []
        epochs_done = 0
        for _ in range(ppo.epochs):
            epochs_done += 1
            epoch_kls = []
            minibatches = torch.tensor_split(torch.randperm(batch.size), num_minibatches)
            if ppo.norm_adv:  # over each whole minibatch: every rank's share of it
                means, stds = dist.moments(batch.advantages, list(minibatches))
            for minibatch, indices in enumerate(minibatches):
                _, logprobs, entropy, new_values = self.get_action(
                    batch.observations[indices], batch.actions[indices])
                advantages = batch.advantages[indices]
                if ppo.norm_adv:
                    advantages = (advantages - means[minibatch]) / (stds[minibatch] + 1e-8)
                policy_loss = clipped_surrogate_loss(logprobs, batch.logprobs[indices], advantages, ppo.clip_coef)
                # L^VF of Eq. 9 with the customary 1/2, so its gradient is (V - V^targ): c1 = 1 here
                # weighs the critic like c1 = 0.5 on the paper's (V - V^targ)^2.
                value_loss = 0.5 * (new_values - batch.returns[indices]).pow(2).mean()
                entropy_mean = entropy.mean()
                # Eq. 9, negated: minimise -L^CLIP + c1 L^VF - c2 S. (With c2 = 0 the entropy term
                # is left out, not multiplied by 0: the same loss and gradient, and no backward
                # pass through it.)
                loss = policy_loss + ppo.vf_coef * value_loss
                if ppo.ent_coef:
                    loss = loss - ppo.ent_coef * entropy_mean
                self.optimizer.zero_grad()
                loss.backward()
                if not dist.average_gradients(parameters, len(indices), loss):  # the mean over every rank's rows
                    raise TrainingDiverged("the PPO loss became NaN or infinite")
                clip_gradients(parameters, ppo.max_grad_norm, "PPO")
                self.optimizer.step()
                approx_kl, clip_fraction = ratio_statistics(logprobs, batch.logprobs[indices], ppo.clip_coef)
                epoch_kls.append(approx_kl)
                history.append(torch.stack([policy_loss.detach(), value_loss.detach(),
                                            entropy_mean.detach(), approx_kl, clip_fraction]))
            if ppo.early_stop_kl is not None and dist.mean(torch.stack(epoch_kls).mean()) > ppo.early_stop_kl:
                break  # every rank stops after the same epoch
        means = torch.stack(history).mean(0).tolist()
        stats = dict(zip(("policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction"), means))
        stats["explained_variance"] = explained_variance(batch.values, batch.returns)
        stats = dist.mean_of(stats)
        stats["epochs"] = float(epochs_done)
        return stats

    # -- saving and loading -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this agent; only tensors, numbers and strings."""
        return {
            "config": self.config.to_json(),
            "obs_dim": self.obs_dim,
            "action_dim": self.action_dim,
            "action_bounds": None if self.action_bounds is None else [b.tolist() for b in self.action_bounds],
            "model": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "observation_stats": None if self.observation_stats is None else self.observation_stats.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, payload: dict[str, Any]) -> PPOAgent:
        try:
            config = TrainConfig.from_dict(json.loads(payload["config"]))
            agent = cls(int(payload["obs_dim"]), int(payload["action_dim"]), config, payload["action_bounds"])
            agent.network.load_state_dict(payload["model"])
            agent.optimizer.load_state_dict(payload["optimizer"])
            if agent.observation_stats is not None:
                agent.observation_stats.load_state_dict(payload["observation_stats"])
        except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as error:
            raise CheckpointError(f"checkpoint does not describe a proximal agent ({error})") from None
        return agent

    @classmethod
    def load(cls, path: str | os.PathLike) -> PPOAgent:
        """A trained agent from a run directory or a checkpoint file."""
        return cls.from_state_dict(load_checkpoint(path))

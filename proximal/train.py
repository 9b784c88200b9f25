"""The PPO training loop: rollout -> advantages -> update -> log -> checkpoint.

Read `train` top to bottom; it follows Algorithm 1 of Schulman et al. 2017:
  for iteration = 1, 2, ...:
      run the policy in N envs for T steps                       (collect_rollout)
      compute advantage estimates A_1..A_T                        (compute_gae, losses.py)
      optimise the surrogate for K epochs, minibatch size M       (PPOAgent.update, agent.py)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from gymnasium.vector import VectorEnv

from proximal.agent import PPOAgent, RolloutBatch
from proximal.checkpoint import CHECKPOINT_NAME, CONFIG_NAME, save_checkpoint
from proximal.config import PPOConfig, RunConfig, TrainConfig
from proximal.dist import RANK_SEED_STRIDE, DistContext
from proximal.envs import as_float_observations, make_vector_env
from proximal.errors import ConfigError, EnvError, TrainingDiverged
from proximal.evaluate import evaluate
from proximal.metrics import MetricsLogger
from proximal.normalize import RewardScaler
from proximal.run import unique_run_dir, write_json_atomic, write_text_atomic
from proximal.losses import compute_gae

EVAL_NAME = "eval.json"


@dataclass
class EnvState:
    """What carries over from one rollout to the next, per env."""

    observations: np.ndarray  # [N, obs_dim] the observation the next action is chosen from
    just_ended: np.ndarray  # [N] the last step ended an episode: the next step is an autoreset
    episode_return: np.ndarray  # [N] running undiscounted return of the current episode
    episode_length: np.ndarray  # [N]

    @classmethod
    def after_reset(cls, observations: np.ndarray) -> EnvState:
        num_envs = observations.shape[0]
        return cls(as_float_observations(observations), np.zeros(num_envs, dtype=bool),
                   np.zeros(num_envs), np.zeros(num_envs, dtype=np.int64))


@dataclass
class Rollout:
    """T steps of N envs. Rows where `valid` is False are autoreset steps: the env ignored the
    action there, so they carry no learning signal and never reach the loss."""

    observations: torch.Tensor  # [T, N, obs_dim] as the networks saw them (normalised, if that is on)
    actions: torch.Tensor  # [T, N] discrete, [T, N, A] continuous (as sampled, before clipping)
    logprobs: torch.Tensor  # [T, N]
    values: torch.Tensor  # [T, N]  V(s_t)
    next_values: torch.Tensor  # [T, N]  V(s_{t+1}); at an episode end, V(final observation)
    rewards: torch.Tensor  # [T, N] the rewards PPO learns from: the env's, until replaced or scaled
    env_observations: np.ndarray  # [T, N, obs_dim] the env's raw observations
    env_actions: np.ndarray  # [T, N] or [T, N, A] the actions as the env received them (clipped)
    env_rewards: np.ndarray  # [T, N] the env's own (true) rewards; 0 on autoreset rows
    terminated: torch.Tensor  # [T, N] bool
    truncated: torch.Tensor  # [T, N] bool
    valid: torch.Tensor  # [T, N] bool
    episode_returns: list[float] = field(default_factory=list)
    episode_lengths: list[int] = field(default_factory=list)


@torch.no_grad()
def collect_rollout(agent: PPOAgent, envs: VectorEnv, state: EnvState, num_steps: int) -> Rollout:
    """Run the current policy for `num_steps` steps in every env (NEXT_STEP autoreset).

    The rollout stores what the networks saw (normalised observations, when that is on) and
    what the env saw (raw observations, clipped actions); its rewards are the env's own until
    `scale_rewards` (or a learned reward) replaces them.

    In NEXT_STEP mode the observation returned by a step that ends an episode is that episode's
    final observation, so the value computed for the next row is V(final observation): exactly
    the bootstrap a truncated step needs, with no extra forward pass.
    """
    num_envs, obs_dim = state.observations.shape
    observations = torch.zeros(num_steps, num_envs, obs_dim)  # [T, N, obs_dim]
    actions = torch.zeros((num_steps, num_envs, *agent.action_shape),
                          dtype=torch.float32 if agent.continuous else torch.long)  # [T, N] or [T, N, A]
    logprobs = torch.zeros(num_steps, num_envs)  # [T, N]
    values = torch.zeros(num_steps, num_envs)  # [T, N]
    env_observations = np.zeros((num_steps, num_envs, obs_dim), dtype=np.float32)  # [T, N, obs_dim]
    env_actions = np.zeros((num_steps, num_envs, *agent.action_shape),
                           dtype=np.float32 if agent.continuous else np.int64)  # [T, N] or [T, N, A]
    rewards = np.zeros((num_steps, num_envs), dtype=np.float32)  # [T, N]
    terminated = np.zeros((num_steps, num_envs), dtype=bool)  # [T, N]
    truncated = np.zeros((num_steps, num_envs), dtype=bool)  # [T, N]
    valid = np.zeros((num_steps, num_envs), dtype=bool)  # [T, N]
    rollout_returns: list[float] = []
    rollout_lengths: list[int] = []

    for t in range(num_steps):
        env_observations[t] = state.observations
        observations[t] = agent.prepare_observations(state.observations, update_stats=True)
        actions[t], logprobs[t], _, values[t] = agent.get_action(observations[t])
        env_actions[t] = agent.to_env(actions[t])
        next_obs, reward, terminated[t], truncated[t], _ = envs.step(env_actions[t])
        valid[t] = ~state.just_ended
        rewards[t] = np.where(valid[t], reward, 0.0)
        state.episode_return += rewards[t]
        state.episode_length += valid[t]
        done = terminated[t] | truncated[t]
        for env_index in np.flatnonzero(done):
            rollout_returns.append(float(state.episode_return[env_index]))
            rollout_lengths.append(int(state.episode_length[env_index]))
        state.episode_return[done] = 0.0
        state.episode_length[done] = 0
        state.just_ended = done
        state.observations = as_float_observations(next_obs)
        if not np.isfinite(state.observations).all():
            raise EnvError("the environment returned a non-finite observation")

    last_values = agent.get_value(agent.prepare_observations(state.observations, update_stats=False))  # [N]
    next_values = torch.cat([values[1:], last_values.unsqueeze(0)])  # [T, N]
    return Rollout(observations, actions, logprobs, values, next_values, torch.from_numpy(rewards.copy()),
                   env_observations, env_actions, rewards, torch.from_numpy(terminated),
                   torch.from_numpy(truncated), torch.from_numpy(valid), rollout_returns, rollout_lengths)


def scale_rewards(rollout: Rollout, reward_scaler: RewardScaler) -> None:
    """Divide the rollout's rewards, step by step in order, by the running std of the discounted
    return (`RewardScaler`), in place."""
    done = (rollout.terminated | rollout.truncated).numpy()  # [T, N]
    rewards = rollout.rewards.numpy()  # [T, N], shares memory with the tensor
    rewards[:] = reward_scaler.scale(rewards, done)


def rollout_to_batch(rollout: Rollout, ppo: PPOConfig) -> RolloutBatch:
    """GAE over the [T, N] rollout, then flatten to the valid transitions only."""
    values, next_values = rollout.values, rollout.next_values
    if not ppo.use_critic:  # ablation: no baseline and no bootstrap, as in REINFORCE
        values = next_values = torch.zeros_like(values)
    advantages, returns = compute_gae(rollout.rewards, values, next_values,
                                      rollout.terminated, rollout.truncated, ppo.gamma, ppo.gae_lambda)
    valid = rollout.valid
    return RolloutBatch(
        observations=rollout.observations[valid],
        actions=rollout.actions[valid],
        logprobs=rollout.logprobs[valid],
        values=values[valid],
        advantages=advantages[valid],
        returns=returns[valid],
    )


def check_world_size(config: TrainConfig, world_size: int) -> None:
    """K ranks share the config's envs evenly (and so its batch): N must be a multiple of K."""
    if config.env.num_envs % world_size != 0:
        raise ConfigError(f"--env.num-envs {config.env.num_envs} does not split over {world_size} processes: "
                          f"use a multiple of {world_size} (each rank steps num_envs / {world_size} envs)")


def new_run_dir(config: TrainConfig) -> Path:
    """runs/<env>__<seed>__<time>/, made unique if two runs start in the same second."""
    return unique_run_dir(config.run.runs_dir, f"{config.env.env_id.replace('/', '-')}__{config.run.seed}")


class RewardLearner(Protocol):
    """What `train` needs of a learned reward (`proximal.preferences.PreferenceLearner`)."""

    metric_columns: tuple[str, ...]  # extra metrics.csv columns its `relabel` reports

    def relabel(self, rollout: Rollout, global_step: int) -> dict[str, float]:
        """Learn from the rollout, then overwrite `rollout.rewards` with the learned reward."""
        ...


@dataclass
class TrainResult:
    run_dir: Path
    global_step: int
    train_seconds: float
    eval_returns: np.ndarray  # [eval_episodes] greedy returns of the final policy
    reached_stop_return: bool  # an evaluation reached run.stop_return (training stopped there)


@dataclass
class Progress:
    """Where a run stands: what `train` starts from and a checkpoint restores."""

    agent: PPOAgent
    reward_scaler: RewardScaler | None  # with ppo.normalize_rewards
    iteration: int = 0  # iterations done
    global_step: int = 0  # env steps taken, summed over envs and ranks
    train_seconds: float = 0.0  # training time of the run's earlier processes


def start_or_resume(config: TrainConfig, envs: VectorEnv, resume: dict[str, Any] | None,
                    dist: DistContext) -> Progress:
    """A new agent (torch seeded with run.seed, so every rank builds the same weights) or the one
    in `resume`, a loaded checkpoint of this run: its weights, optimiser state, counters, torch
    RNG state and reward statistics. On K ranks the running statistics gather every rank's rows
    and rank r > 0 samples from its own torch seed."""
    torch.manual_seed(config.run.seed)
    reward_scaler = RewardScaler(envs.num_envs, config.ppo.gamma) if config.ppo.normalize_rewards else None
    if resume is None:
        progress = Progress(PPOAgent.for_spaces(envs.single_observation_space, envs.single_action_space, config),
                            reward_scaler)
    else:
        progress = Progress(PPOAgent.from_state_dict(resume), reward_scaler, int(resume["iteration"]),
                            int(resume["global_step"]), float(resume["train_seconds"]))
        torch.set_rng_state(resume["torch_rng_state"])
        if reward_scaler is not None:
            reward_scaler.return_stats.load_state_dict(resume["reward_stats"])
    progress.agent.dist = dist
    if dist.distributed:
        for stats in (progress.agent.observation_stats, None if reward_scaler is None else reward_scaler.return_stats):
            if stats is not None:
                stats.gather = dist.gather_rows
        if dist.rank > 0:  # each rank samples its own actions and minibatches
            torch.manual_seed(config.run.seed + RANK_SEED_STRIDE * dist.rank + progress.global_step)
    return progress


def save_progress(path: Path, progress: Progress, iteration: int, train_seconds: float, reached: bool) -> None:
    """The checkpoint `start_or_resume` continues from."""
    scaler = progress.reward_scaler
    save_checkpoint(path, {
        **progress.agent.state_dict(), "iteration": iteration, "global_step": progress.global_step,
        "reached": reached, "train_seconds": train_seconds, "torch_rng_state": torch.get_rng_state(),
        "reward_stats": None if scaler is None else scaler.return_stats.state_dict(),
    })


@contextlib.contextmanager
def update_threads(run: RunConfig):
    """The update phase on run.update_threads torch threads (wide networks update faster on 2
    while the rollout stays on 1), the rollout's count restored after."""
    threads = run.threads if run.update_threads is None else run.update_threads
    if threads != run.threads:
        torch.set_num_threads(threads)
    yield
    if threads != run.threads:
        torch.set_num_threads(run.threads)


def episode_means(rollout: Rollout, dist: DistContext) -> tuple[float | None, float | None]:
    """Mean return and length of the episodes that ended in this rollout, on every rank."""
    gathered = dist.gather_objects((rollout.episode_returns, rollout.episode_lengths))
    returns = [value for episode_returns, _ in gathered for value in episode_returns]
    lengths = [value for _, episode_lengths in gathered for value in episode_lengths]
    return (np.mean(returns) if returns else None), (np.mean(lengths) if lengths else None)


def train(
    config: TrainConfig,
    run_dir: Path | None = None,
    resume: dict[str, Any] | None = None,
    show_progress: bool = False,
    reward_learner: RewardLearner | None = None,
    dist: DistContext = DistContext(),
) -> TrainResult:
    """Train PPO as `config` says, writing everything into `run_dir` (a new one if None).

    With `run.stop_return` set, the greedy policy is evaluated every `run.eval_every` iterations
    and training stops once its mean return reaches that value. The training clock (the
    `wall_seconds` column, `TrainResult.train_seconds`) leaves those evaluations out.

    `resume` is a loaded checkpoint of the same run: training continues from its iteration with
    its weights, optimiser state and torch RNG state. The environments restart fresh episodes,
    seeded from the step counter, since a Gymnasium env's internal state cannot be saved.

    With a `reward_learner`, PPO never sees the env's reward: each rollout's rewards are
    replaced by the learner's before advantages are computed (learning from preferences,
    `proximal.preferences`); the logged episode returns stay the env's own.

    With a `dist` context of K processes (launched by torchrun: `proximal.dist`), this process is
    one rank: it steps its N / K of the config's N envs and shares every update with the others
    (rank r > 0 samples from torch seed seed + stride r + step); rank 0 alone writes `run_dir` and
    evaluates (the other ranks' `TrainResult` has no returns).
    """
    ppo, run = config.ppo, config.run
    check_world_size(config, dist.world_size)
    writer = dist.is_main
    torch.set_num_threads(run.threads)
    local_envs = config.env.num_envs // dist.world_size
    envs = make_vector_env(config.env.env_id, local_envs)
    try:
        progress = start_or_resume(config, envs, resume, dist)
        agent, reward_scaler = progress.agent, progress.reward_scaler
        run_dir = dist.broadcast_object((run_dir if run_dir is not None else new_run_dir(config)) if writer else None)
        if writer:
            write_text_atomic(run_dir / CONFIG_NAME, config.to_json())
        checkpoint_path = run_dir / CHECKPOINT_NAME
        # rank r's envs are envs r N/K .. (r + 1) N/K - 1 of one N-env run, seeded as those would be
        state = EnvState.after_reset(envs.reset(seed=run.seed + progress.global_step + dist.rank * local_envs)[0])
        logger = MetricsLogger(run_dir, ppo.total_timesteps, progress.iteration, progress.global_step, show_progress,
                               () if reward_learner is None else reward_learner.metric_columns) if writer else None
        eval_returns: np.ndarray | None = None
        # A resumed run whose training had finished (its budget spent, or --stop-return reached)
        # but that was killed before eval.json was written only completes the evaluation and plot.
        reached = resume is not None and bool(resume.get("reached", False))
        last_iteration_to_train = progress.iteration if reached else config.num_iterations
        start_time = time.perf_counter()
        eval_seconds = 0.0  # greedy evaluations are kept off the training clock
        train_seconds = progress.train_seconds
        try:
            for iteration in range(progress.iteration + 1, last_iteration_to_train + 1):
                iteration_start = time.perf_counter()
                if ppo.anneal_lr:  # linear decay to 0 over the whole run
                    agent.set_learning_rate(ppo.learning_rate * (1.0 - (iteration - 1) / config.num_iterations))
                rollout = collect_rollout(agent, envs, state, ppo.num_steps)
                progress.global_step += config.batch_size
                learner_metrics = ({} if reward_learner is None
                                   else reward_learner.relabel(rollout, progress.global_step))
                if reward_scaler is not None:
                    scale_rewards(rollout, reward_scaler)
                batch = rollout_to_batch(rollout, ppo)
                try:
                    with update_threads(run):
                        stats = agent.update(batch)
                except TrainingDiverged as error:
                    kept = (f"last good checkpoint kept: {checkpoint_path}" if checkpoint_path.exists()
                            else "no checkpoint had been written yet")
                    raise TrainingDiverged(f"{error} at iteration {iteration} (step {progress.global_step}); "
                                           f"{kept}") from None
                mean_return, mean_length = episode_means(rollout, dist)
                now = time.perf_counter()
                train_seconds = progress.train_seconds + now - start_time - eval_seconds
                metrics = {
                    "iteration": iteration,
                    "env_steps": progress.global_step,
                    "wall_seconds": train_seconds,
                    "episodic_return": mean_return,
                    "episodic_length": mean_length,
                    **stats,
                    "learning_rate": agent.optimizer.learning_rate,
                    "steps_per_second": config.batch_size / (now - iteration_start),
                    **learner_metrics,
                }
                last_iteration = iteration == config.num_iterations
                eval_returns = None
                if run.stop_return is not None and (iteration % run.eval_every == 0 or last_iteration):
                    if writer:
                        eval_returns = evaluate(agent, config.env.env_id, run.eval_episodes, seed=run.seed)
                    eval_returns = dist.broadcast_object(eval_returns)  # rank 0's evaluation decides for all
                    eval_seconds += time.perf_counter() - now
                    metrics["eval_return"] = float(eval_returns.mean())
                reached = eval_returns is not None and bool(eval_returns.mean() >= run.stop_return)
                if writer:
                    logger.log(metrics)
                    if reached or last_iteration or iteration % run.checkpoint_every == 0:
                        save_progress(checkpoint_path, progress, iteration, train_seconds, reached)
                if reached:
                    break
        finally:
            if logger is not None:
                logger.close()
        global_step = progress.global_step
        if not writer:
            return TrainResult(run_dir, global_step, train_seconds, np.zeros(0), reached)
        if eval_returns is None:  # the final policy was not just evaluated: do it now
            eval_returns = evaluate(agent, config.env.env_id, run.eval_episodes, seed=run.seed)
    finally:
        envs.close()

    from proximal.plots import plot_learning_curve  # matplotlib is slow to import: only when used

    plot_learning_curve(run_dir)
    # eval.json last: it marks a finished run (a kill before it leaves a run that --run-dir completes)
    write_json_atomic(run_dir / EVAL_NAME, {
        "episodes": len(eval_returns), "mean": float(eval_returns.mean()), "std": float(eval_returns.std()),
        "min": float(eval_returns.min()), "max": float(eval_returns.max()), "env_steps": global_step,
    })
    return TrainResult(run_dir, global_step, train_seconds, eval_returns, reached)

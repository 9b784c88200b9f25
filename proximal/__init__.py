"""proximal: Proximal Policy Optimization from scratch in PyTorch.

Where to read what (Schulman et al. 2017):
  proximal/agent.py  the two-headed actor-critic, `clipped_surrogate_loss` (Eq. 7), PPOAgent
  proximal/utils.py  `compute_gae` (Schulman et al. 2016)
  proximal/train.py  the loop: rollout -> advantages -> update -> log -> checkpoint
"""

__version__ = "0.1.0"

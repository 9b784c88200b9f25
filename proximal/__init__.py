"""proximal: Proximal Policy Optimization from scratch in PyTorch.

Where to read what (Schulman et al. 2017):
  proximal/agent.py  the two-headed actor-critic and PPOAgent
  proximal/losses.py the shared math: Eq. 7, `compute_gae` (Schulman et al. 2016), masked reductions
  proximal/train.py  the loop: rollout -> advantages -> update -> log -> checkpoint
"""

__version__ = "0.1.0"

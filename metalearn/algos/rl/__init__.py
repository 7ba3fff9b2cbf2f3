"""Policy-gradient building blocks for gradient-based meta-RL (MAML-TRPO, E-MAML, ProMP): returns
and advantages with rllab's linear feature baseline (advantages.py) and TRPO's natural-gradient
step in a KL trust region (trpo.py)."""

"""Gradient-based meta-RL: a Gaussian policy meta-learned so that policy-gradient steps adapt it.
The learners, MAML-TRPO and E-MAML (maml_trpo.py) and ProMP (promp.py), share their inner loop,
sampling and test (meta_policy_search.py, trajectories.py), returns and advantages with rllab's
linear feature baseline (advantages.py) and TRPO's natural-gradient step (trpo.py)."""

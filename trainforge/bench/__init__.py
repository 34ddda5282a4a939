"""Knowing the machine: `trainforge hw` (what it has and its measured ceilings) and `trainforge bench` (how fast a
model trains and infers on it, and how close that is to the ceiling).

`cache.py` and `flops.py` import nothing from the rest of trainforge but errors, so that `train/monitor.py` can use
them during training without depending on the verbs.
"""

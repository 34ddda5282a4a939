"""What the machine can do: the device probe and ceiling micro-benchmarks, their per-machine cache, FLOP counts."""

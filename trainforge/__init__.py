"""trainforge: a GPU-first deep-learning toolkit for PyTorch.

    import trainforge
    result = trainforge.train({"data": "mnist", "model": "cnn"})
    model = trainforge.load(result.run_dir)      # raw uint8 images [N, C, H, W] in, logits out
"""

import os

# Before torch loads MKL. PyTorch turns MKL's dynamic threading off whenever torch.set_num_threads is called (so that
# MKL and PyTorch's own OpenMP regions stop resizing their shared thread pool, pytorch/pytorch#13757), but not by
# default. Left on, about half of the processes on the 2-core machine here ran a fresh batch's matmul in 2.1 ms
# instead of 0.58 ms, for the whole life of the process: the reference recipe took 1.1-1.3 s instead of 0.65-0.85 s.
# Set here, 14 processes of 14 were fast; set after `import torch` it is too late (2 of 8 slow). A user's own value
# is kept.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .config import TrainConfig  # noqa: E402
from .errors import TrainforgeError  # noqa: E402
from .models import create_model, register_model  # noqa: E402
from .runs import load  # noqa: E402
from .train import TrainResult, train  # noqa: E402

__version__ = "0.1.0"

__all__ = ["TrainConfig", "TrainResult", "TrainforgeError", "create_model", "load", "register_model", "train",
           "__version__"]

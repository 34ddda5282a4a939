"""trainforge: a GPU-first deep-learning toolkit for PyTorch.

    import trainforge
    result = trainforge.train({"data": "mnist", "model": "cnn"})
    model = trainforge.load(result.run_dir)      # raw uint8 images [N, C, H, W] in, logits out
"""

import os

# Before torch loads MKL: with MKL's dynamic threading on, some processes ran every matmul several times slower
# for their whole life (benchmarks/RESULTS.md, "Reference workload", second session). A user's own value is kept.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

from .config import TrainConfig  # noqa: E402
from .errors import TrainforgeError  # noqa: E402
from .models import create_model, register_model  # noqa: E402
from .runs import load  # noqa: E402
from .train import TrainResult, train  # noqa: E402

__version__ = "0.1.0"

__all__ = ["TrainConfig", "TrainResult", "TrainforgeError", "create_model", "load", "register_model", "train",
           "__version__"]

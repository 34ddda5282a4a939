"""trainforge: a GPU-first deep-learning toolkit for PyTorch.

    import trainforge
    result = trainforge.train({"data": "mnist", "model": "cnn"})
    model = trainforge.load(result.run_dir)      # raw uint8 images [N, C, H, W] in, logits out
"""

from .config import TrainConfig
from .errors import TrainforgeError
from .models import create_model, register_model
from .runs import load
from .train import TrainResult, train

__version__ = "0.1.0"

__all__ = ["TrainConfig", "TrainResult", "TrainforgeError", "create_model", "load", "register_model", "train",
           "__version__"]

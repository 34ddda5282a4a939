"""Training: the loop, recipes, devices and distributed glue."""

from .loop import TrainResult, evaluate, train
from .recipes import RECIPES, resolve

__all__ = ["RECIPES", "TrainResult", "evaluate", "resolve", "train"]

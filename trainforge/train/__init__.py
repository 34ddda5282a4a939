"""Training: the loop, recipes, devices and distributed glue."""

from .loop import Hooks, TrainResult, TrainState, evaluate, train
from .recipes import RECIPES, resolve

__all__ = ["Hooks", "RECIPES", "TrainResult", "TrainState", "evaluate", "resolve", "train"]

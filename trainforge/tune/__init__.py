"""Hyperparameter search: an Optuna study of training runs, scored on a validation split, resumable and shared."""

from .study import SearchSpace, TuneSettings, run_study, search_space, summarize

__all__ = ["SearchSpace", "TuneSettings", "run_study", "search_space", "summarize"]

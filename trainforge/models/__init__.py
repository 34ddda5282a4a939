"""Model registry and built-in families."""

from .registry import (Classifier, ModelEntry, Preprocess, build_classifier, count_params, create_model, list_models,
                       model_entry, register_model, tempered)

__all__ = ["Classifier", "ModelEntry", "Preprocess", "build_classifier", "count_params", "create_model", "list_models",
           "model_entry", "register_model", "tempered"]

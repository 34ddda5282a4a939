"""What trains when no model is named: the data set's default model, or one chosen from a folder's images.

A built-in data set names its default model in `recipes.DATASET_RECIPES`. For an image folder the choice is between
the small `cnn`, trained from scratch, and fine-tuning EfficientNet-Lite0 from its ImageNet weights (shipped with
trainforge's dependencies, so it works offline), weighed on the images' size and channels and on how many training
images each class has; the cnn's epochs grow on a small folder so that it still takes enough optimizer steps.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from .. import config as cfg
from ..data import BUILTIN_DATASETS

PRETRAINED_SOURCE = "efficientnet_lite0"
# ImageNet features are features of objects seen at 224 px; below this side the upsampling the weights need costs
# over 12x the compute of the image itself and adds no detail, and the cnn from scratch is the better buy.
PRETRAINED_MIN_SIDE = 64
# A grayscale folder with this many training images per class or more trains the cnn from scratch well (MNIST and
# Fashion-MNIST have 6,000), at a fraction of a pretrained network's cost per image; fewer, and borrowed features win.
SCRATCH_GRAYSCALE_PER_CLASS = 1000
# The fewest optimizer steps the cnn recipe takes on a small folder. Its 1.5 epochs are 20 steps on 1,617 training
# images of scikit-learn's digits: 95.5% on the held-out tenth; 4 epochs (52 steps) gave 98.9-100% (seeds 0-1) and 10
# epochs (130 steps) 99.4% (benchmarks/RESULTS.md, "Defaults beyond MNIST").
MIN_SCRATCH_STEPS = 130


@dataclasses.dataclass(frozen=True)
class FolderFacts:
    """What the choice for an image folder looks at."""

    path: str
    channels: int
    height: int
    width: int
    train_images: int
    classes: int

    @property
    def per_class(self) -> float:
        return self.train_images / max(1, self.classes)

    def describe(self) -> str:
        kind = "RGB" if self.channels == 3 else "grayscale"
        return (f"{self.train_images:,} {kind} {self.height}x{self.width} training images in {self.classes} classes, "
                f"{self.per_class:,.0f} per class")


@dataclasses.dataclass(frozen=True)
class Choice:
    """The model picked for a run that named none, and why."""

    model: str
    reason: str
    pretrained: bool = False  # fine-tune `model` from its pretrained weights instead of training it from scratch
    epochs: float | None = None  # set where the model's recipe would train too few steps on this data

    def describe(self) -> str:
        how = "fine-tuned from its ImageNet weights" if self.pretrained else "trained from scratch"
        epochs = f" for {self.epochs:g} epochs" if self.epochs is not None else ""
        return f"model: {self.model}, {how}{epochs}: {self.reason} (pass --model to choose another)"


def default_choice(config: cfg.TrainConfig) -> Choice | None:
    """The choice for an image folder when `config` names neither a model nor a recipe; None otherwise (a built-in
    data set's default model comes with its recipe, see `recipes.resolve`)."""
    if config.model is not None or config.recipe is not None or config.data in BUILTIN_DATASETS:
        return None
    if not Path(config.data).is_dir():
        return None  # loading the data reports what is wrong with it
    return choose_for_folder(folder_facts(config), config.batch_size)


def folder_facts(config: cfg.TrainConfig) -> FolderFacts:
    """Image format, training-set size and classes of the folder `config.data`, as training will see them."""
    from ..data.folder import infer_image_format, scan_image_folder, split_stratified

    train_files, val_files, classes = scan_image_folder(config.data)
    if val_files is None:
        train_files, _ = split_stratified(train_files, config.val_fraction, config.seed)
    channels, (height, width) = infer_image_format(train_files, image_size=config.image_size)
    n_train = min(config.subset, len(train_files)) if config.subset else len(train_files)
    return FolderFacts(config.data, channels, height, width, n_train, len(classes))


def choose_for_folder(facts: FolderFacts, batch_size: int | None = None) -> Choice:
    """The cnn from scratch or EfficientNet-Lite0 fine-tuned, from the folder's image size, channels and images per
    class; `batch_size` (default: the cnn recipe's) sets how many epochs make MIN_SCRATCH_STEPS steps."""
    side = min(facts.height, facts.width)
    if side < PRETRAINED_MIN_SIDE:
        return _scratch(facts, f"images under {PRETRAINED_MIN_SIDE} px are too small for ImageNet features", batch_size)
    if facts.channels == 1 and facts.per_class >= SCRATCH_GRAYSCALE_PER_CLASS:
        return _scratch(facts, f"grayscale with >= {SCRATCH_GRAYSCALE_PER_CLASS:,} images per class: enough to train "
                               f"the small cnn, at a fraction of a pretrained network's cost", batch_size)
    why = ("ImageNet features transfer to color images this size" if facts.channels == 3 else
           f"under {SCRATCH_GRAYSCALE_PER_CLASS:,} images per class are too few to train from scratch")
    return Choice(PRETRAINED_SOURCE, f"{facts.describe()}; {why}", pretrained=True)


def _scratch(facts: FolderFacts, why: str, batch_size: int | None) -> Choice:
    from ..models import model_entry
    from .recipes import RECIPES

    recipe = RECIPES[model_entry("cnn").default_recipe]
    steps_per_epoch = math.ceil(facts.train_images / (batch_size or recipe["batch_size"]))
    needed = math.ceil(MIN_SCRATCH_STEPS / steps_per_epoch)
    epochs = float(needed) if needed > recipe["epochs"] else None
    return Choice("cnn", f"{facts.describe()}; {why}", epochs=epochs)

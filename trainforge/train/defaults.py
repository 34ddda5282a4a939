"""What trains when no model is named: the data set's default model, or one chosen from a folder's images.

A built-in data set names its default model in `recipes.DATASET_RECIPES`. For an image folder the choice is between
the small `cnn`, trained from scratch, and fine-tuning EfficientNet-Lite0 from its ImageNet weights (shipped with
trainforge's dependencies, so it works offline), weighed on the images' size and channels and on how many training
images each class has. The cnn's recipe then scales to the folder's size as every recipe does (recipes.scale_to_data).
"""

from __future__ import annotations

import dataclasses
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

    def describe(self) -> str:
        how = "fine-tuned from its ImageNet weights" if self.pretrained else "trained from scratch"
        return f"model: {self.model}, {how}: {self.reason} (pass --model to choose another)"


def default_choice(config: cfg.TrainConfig) -> Choice | None:
    """The choice for an image folder when `config` names neither a model nor a recipe; None otherwise (a built-in
    data set's default model comes with its recipe, see `recipes.resolve`)."""
    if config.model is not None or config.recipe is not None or config.data in BUILTIN_DATASETS:
        return None
    if not Path(config.data).is_dir():
        return None  # loading the data reports what is wrong with it
    return choose_for_folder(folder_facts(config))


def folder_facts(config: cfg.TrainConfig) -> FolderFacts:
    """Image format, training-set size and classes of the folder `config.data`, as training will see them."""
    from ..data.folder import infer_image_format, scan_image_folder, split_stratified

    train_files, val_files, classes = scan_image_folder(config.data)
    if val_files is None:
        train_files, _ = split_stratified(train_files, config.val_fraction, config.seed)
    channels, (height, width) = infer_image_format(train_files, image_size=config.image_size)
    n_train = min(config.subset, len(train_files)) if config.subset else len(train_files)
    return FolderFacts(config.data, channels, height, width, n_train, len(classes))


def choose_for_folder(facts: FolderFacts) -> Choice:
    """The cnn from scratch or EfficientNet-Lite0 fine-tuned, from the folder's image size, channels and images per
    class."""
    side = min(facts.height, facts.width)
    if side < PRETRAINED_MIN_SIDE:
        return Choice("cnn", f"{facts.describe()}; images under {PRETRAINED_MIN_SIDE} px are too small for ImageNet "
                             f"features")
    if facts.channels == 1 and facts.per_class >= SCRATCH_GRAYSCALE_PER_CLASS:
        return Choice("cnn", f"{facts.describe()}; grayscale with >= {SCRATCH_GRAYSCALE_PER_CLASS:,} images per class: "
                             f"enough to train the small cnn, at a fraction of a pretrained network's cost")
    why = ("ImageNet features transfer to color images this size" if facts.channels == 3 else
           f"under {SCRATCH_GRAYSCALE_PER_CLASS:,} images per class are too few to train from scratch")
    return Choice(PRETRAINED_SOURCE, f"{facts.describe()}; {why}", pretrained=True)

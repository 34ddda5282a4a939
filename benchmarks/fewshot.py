"""Few-shot classification (`trainforge fewshot`) against training from the same shots, measured in one run.

For Fashion-MNIST and MNIST, 10-way episodes drawn from a pool of test images (--pool per class, seeded) with 15
query images per class, K in {1, 5, 10, 20}:
  prototypes   EfficientNet-Lite0 (ImageNet weights) at --image-size, pool embedded once; nearest prototype with
               SimpleShot normalisation (cl2n: centred on the support mean, L2), L2 alone (l2n) and the plain mean
               of raw features (none), on --episodes episodes per K
and on the first --baseline-episodes of those same episodes (same support and query images):
  adapt        the SimpleShot prototypes fine-tuned on the support features (`fewshot --adapt`'s defaults)
  probe        a linear probe on the same cached raw features: logistic regression from zero, full-batch AdamW,
               100 steps at finetune's linear-probe learning rate
  cnn          the `cnn` trained from scratch on the support images for 100 optimizer steps with its recipe
               (AdamW, one-cycle, label smoothing; batch min(128, N*K), seeded), at the data's 28 px
Wall time per method is per episode and excludes the pool embedding, which is reported once (it is what the
prototypes, adapt and probe share). "build" is `trainforge.fewshot()` from K shots per class, as a user runs it:
load the encoder, embed the 10*K shots and make the prototypes (its `build_seconds`; one call per K).
"channels-last" times the pool embedding with the encoder's weights channels-last (as the registered classifier
builds it) against the default layout (median of 3 alternating passes over 200 images).

Every method runs with --threads torch threads (default 1): on the shared 2-core host here, two threads' parallel
regions waited on each other's descheduled halves, and the cnn's 100 steps took 4-5x longer than with one.

  PYTHONPATH=. python benchmarks/fewshot.py [--image-size 128] [--pool 100] [--episodes 100] [--baseline-episodes 20]

Prints JSON lines as it goes and a Markdown section for benchmarks/RESULTS.md at the end.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from trainforge import config as cfg
from trainforge.data import DataBundle, balanced_subset, load_data
from trainforge.fewshot import FewshotConfig, encoders, fewshot, prototypes
from trainforge.finetune.command import STRATEGY_LR
from trainforge.models import build_classifier
from trainforge.models.fewshot import DEFAULT_SCALE, prototype_layer
from trainforge.train.loop import make_optimizer, make_scheduler
from trainforge.train.recipes import resolve

SHOTS = (1, 5, 10, 20)
WAYS, QUERIES, STEPS = 10, 15, 100
CPU = torch.device("cpu")


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - started


def train_cnn(bundle: DataBundle, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """The `cnn` from random initialisation, STEPS optimizer steps on `images` with its recipe's settings."""
    config = resolve(cfg.TrainConfig(model="cnn"))
    torch.manual_seed(seed)
    model = build_classifier("cnn", WAYS, bundle.in_channels, bundle.image_size, bundle.mean, bundle.std)
    optimizer = make_optimizer(config, [{"params": list(model.parameters())}], CPU)
    scheduler = make_scheduler(config, optimizer, STEPS)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(STEPS):
        batch = torch.randperm(len(labels), generator=gen)[:config.batch_size]
        loss = F.cross_entropy(model(images[batch]), labels[batch], label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model.eval()


def baselines(bundle: DataBundle, pool_images: torch.Tensor, features: torch.Tensor,
              episode: prototypes.Episode) -> dict[str, tuple[float, float]]:
    """(accuracy, seconds) of adapt, probe and cnn on one episode."""
    defaults = FewshotConfig()
    support, query = features[episode.support], features[episode.query]
    out = {}

    def score(predicted: torch.Tensor) -> float:
        return (predicted == episode.query_labels).double().mean().item()

    def adapted() -> torch.Tensor:
        mean = support.mean(0)
        z_support, z_query = (prototypes.normalize(f, "cl2n", mean) for f in (support, query))
        weight, bias = prototype_layer(prototypes.class_means(z_support, episode.support_labels, WAYS))
        weight, bias, _ = prototypes.fit_linear(z_support, episode.support_labels, weight, bias, scale=DEFAULT_SCALE,
                                                steps=defaults.adapt_steps, lr=defaults.adapt_lr)
        return torch.addmm(bias, z_query, weight.t()).argmax(1)

    def probe() -> torch.Tensor:
        zeros = support.new_zeros(WAYS, support.shape[1])
        weight, bias, _ = prototypes.fit_linear(support, episode.support_labels, zeros, zeros[:, 0], steps=STEPS,
                                                lr=STRATEGY_LR["linear-probe"])
        return torch.addmm(bias, query, weight.t()).argmax(1)

    def cnn() -> torch.Tensor:
        model = train_cnn(bundle, pool_images[episode.support], episode.support_labels, seed=0)
        with torch.inference_mode():
            return model(pool_images[episode.query]).argmax(1)

    for name, fn in (("adapt", adapted), ("probe", probe), ("cnn", cnn)):
        predicted, seconds = timed(fn)
        out[name] = (score(predicted), seconds)
    return out


def build_seconds(data: str, k: int, image_size: int) -> float:
    """`build_seconds` of a `fewshot()` call from k shots per class, as the CLI runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        return fewshot({"source": "efficientnet_lite0", "data": data, "shots": [k], "pool": 1,
                        "image_size": image_size, "out": tmp}, progress=False)["build_seconds"]


def channels_last_ratio(model: torch.nn.Module, images: torch.Tensor) -> dict[str, float]:
    """Images/s of the encoder with channels-last weights and with the default layout, alternating 3 times."""
    encoder = model.net.encoder
    rates: dict[str, list[float]] = {"channels_last": [], "contiguous": []}
    for _ in range(3):
        for layout, fmt in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
            encoder.to(memory_format=fmt)
            _, seconds = timed(encoders.embed, model, images, CPU, "32", 100)
            rates[layout].append(len(images) / seconds)
    encoder.to(memory_format=torch.channels_last)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    return {**medians, "ratio": medians["channels_last"] / medians["contiguous"]}


def measure(data: str, args: argparse.Namespace) -> dict:
    bundle = load_data(data)
    pool = balanced_subset(bundle.test.labels, args.pool * len(bundle.classes), 0)
    pool_images, labels = bundle.test.images[pool], bundle.test.labels[pool]
    model = encoders.prototype_classifier(encoders.load_encoder("efficientnet_lite0", bundle), WAYS,
                                          args.image_size)
    features, embed_seconds = timed(encoders.embed, model, pool_images, CPU, "32", 100)
    result = {"data": data, "pool_images": len(pool), "embed_seconds": embed_seconds, "shots": {}}
    print(json.dumps({k: v for k, v in result.items() if k != "shots"}), flush=True)
    for k in SHOTS:
        drawn = prototypes.sample_episodes(labels, WAYS, k, QUERIES, args.episodes, 0, bundle.classes)
        row = {"episodes": len(drawn)}
        for norm in prototypes.NORMS:
            accs, seconds = timed(prototypes.episode_accuracies, features, drawn, norm)
            row[norm] = {**prototypes.mean_ci(accs), "ms_per_episode": 1000 * seconds / len(drawn),
                         "first": prototypes.mean_ci(accs[:args.baseline_episodes])}
        runs = [baselines(bundle, pool_images, features, e) for e in drawn[:args.baseline_episodes]]
        for name in ("adapt", "probe", "cnn"):
            row[name] = {**prototypes.mean_ci([r[name][0] for r in runs]),
                         "ms_per_episode": 1000 * statistics.mean(r[name][1] for r in runs)}
        row["build_seconds"] = build_seconds(data, k, args.image_size)
        result["shots"][k] = row
        print(json.dumps({"data": data, "shots": k, **row}), flush=True)
    result["channels_last"] = channels_last_ratio(model, pool_images[:200])
    print(json.dumps({"data": data, "channels_last": result["channels_last"]}), flush=True)
    return result


def pm(value: dict) -> str:
    return f"{100 * value['mean']:.1f} ± {100 * value['ci95']:.1f}"


def markdown(results: list[dict], args: argparse.Namespace, seconds: float) -> str:
    lines = [f"Date {datetime.date.today()}; {platform.processor() or platform.machine()}, "
             f"torch threads: {torch.get_num_threads()}, torch {torch.__version__}; the machine was shared with other "
             f"developers' jobs. EfficientNet-Lite0 at {args.image_size} px, pool {args.pool} test images per class, "
             f"10-way, {QUERIES} queries per class; accuracy in % ± the 95% CI half-width; whole script "
             f"{seconds / 60:.1f} min.", ""]
    for r in results:
        lines += [f"**{r['data']}** (pool of {r['pool_images']} embedded once in {r['embed_seconds']:.1f} s; "
                  f"channels-last weights embed {r['channels_last']['ratio']:.2f}x the images/s of the default "
                  f"layout: {r['channels_last']['channels_last']:.0f} vs {r['channels_last']['contiguous']:.0f})", "",
                  f"| K | SimpleShot ({args.episodes} ep.) | L2 only | plain mean | "
                  f"SimpleShot, first {args.baseline_episodes} | + adapt | linear probe | cnn from scratch | "
                  f"build (s) | ms/episode: SimpleShot / adapt / probe / cnn |", "|---:|" + "---:|" * 9]
        for k, row in r["shots"].items():
            ms = " / ".join(f"{row[m]['ms_per_episode']:.1f}" for m in ("cl2n", "adapt", "probe", "cnn"))
            lines.append(f"| {k} | {pm(row['cl2n'])} | {pm(row['l2n'])} | {pm(row['none'])} | "
                         f"{pm(row['cl2n']['first'])} | {pm(row['adapt'])} | {pm(row['probe'])} | {pm(row['cnn'])} | "
                         f"{row['build_seconds']:.1f} | {ms} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=128, help="EfficientNet-Lite0 resolution (224 native)")
    parser.add_argument("--pool", type=int, default=100, help="test images per class embedded")
    parser.add_argument("--episodes", type=int, default=100, help="episodes per K for the prototypes")
    parser.add_argument("--baseline-episodes", type=int, default=20, help="of those, episodes for the baselines")
    parser.add_argument("--data", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every method")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results = [measure(data, args) for data in args.data]
    print(markdown(results, args, time.perf_counter() - started))


if __name__ == "__main__":
    main()

"""Photo folders end to end: trainforge's first and second run against the plain torchvision pipeline, the decode
limit of this machine, and 12-megapixel photos decoded by draft against a full decode.

Folders (benchmarks/make_photo_folder.py, from Fashion-MNIST): 3,000 training JPEGs of 500x375 and 1,000 held out in
10 classes; 200 photos of 4000x3000 (another seed). Arms, each a whole process timed from outside, with the peak
memory of its whole process tree (the sum of the processes' resident set sizes, sampled every 100 ms; pages shared
between processes count once per process, so the sum bounds the tree's use from above):
  trainforge-first   `trainforge train --data DIR --model cnn --image-size 64 --epochs 3` with an empty cache
  trainforge-second  the same again: the decoded cache is hit, and its file must be left untouched
  torchvision        ImageFolder + DataLoader (2 workers, Resize to 64 px per epoch) training the same network with
                     the cnn recipe's optimizer and one-cycle schedule, evaluated on val/ after each epoch
The decode limit is this process's draft decode rate to 64 px on one core times the cores it may use. The phone
photos are decoded to 224 px three ways: today's path before draft decoding (full decode, then the float resize,
one process), draft on one core, and trainforge's first-run path (draft, all cores, written to the cache). The
agreement check classifies every phone photo with the first run's model, once from its full decode and once from its
draft decode (as `predict` does), and measures how far the two are apart in pixels at 64 and 224 px.

  python benchmarks/folder_pipeline.py [--work DIR] [--data-dir /work/shared/data] [--epochs 3] [--quick] [--json]

--quick: tiny folders and one epoch, to prove the script. Prints a Markdown table for benchmarks/RESULTS.md (with
--json, one JSON object as the last line).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from make_photo_folder import PHONE_SIZE, PHOTO_SIZE, make_photo_folder  # noqa: E402  (beside this script)
from process_tree import tree_rss  # noqa: E402

IMAGE_SIZE = 64
PLAIN = r'''
import json, sys, torch, torchvision
from torchvision import transforms
from trainforge.models import create_model
root, epochs, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                         transforms.Normalize([0.5] * 3, [0.25] * 3)])
train = torchvision.datasets.ImageFolder(root + "/train", tf)
val = torchvision.datasets.ImageFolder(root + "/val", tf)
loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=2, persistent_workers=True)
val_loader = torch.utils.data.DataLoader(val, batch_size=256, num_workers=2, persistent_workers=True)
torch.manual_seed(0)
model = create_model("cnn", num_classes=len(train.classes), in_channels=3, image_size=size)
opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.99), weight_decay=5e-4)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * len(loader), pct_start=0.2)
loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
for epoch in range(epochs):
    model.train()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x.contiguous(memory_format=torch.channels_last)), y).backward()
        opt.step()
        sched.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x.contiguous(memory_format=torch.channels_last)).argmax(1) == y).sum().item()
print(json.dumps({"test_acc": correct / len(val)}))
'''


SAMPLE_S = 0.1


def timed(command: list[str], env: dict[str, str]) -> dict:
    """Runs `command` to the end: wall seconds, peak memory of its process tree, stdout and stderr."""
    peak = [0]
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_S):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": seconds, "peak_bytes": peak[0], "stdout": out, "stderr": err}


def trainforge_run(folder: Path, out: Path, epochs: int, env: dict[str, str]) -> dict:
    result = timed([sys.executable, "-m", "trainforge", "train", "--data", str(folder), "--model", "cnn",
                    "--image-size", str(IMAGE_SIZE), "--epochs", str(epochs), "--out", str(out), "--no-tensorboard"],
                   env)  # not --json: its lines on stderr (the data line, the memory plan) are what is read here
    summary = json.loads((out / "summary.json").read_text())
    decoded = re.search(r"decoded ([\d,]+) images to \S+ in ([\d.]+) s \(([\d,]+) images/s\)", result["stderr"])
    budget = re.search(r"^memory_budget: (\S+)$", (out / "config.yaml").read_text(), re.MULTILINE)
    return {"seconds": result["seconds"], "peak_bytes": result["peak_bytes"], "test_acc": summary["test_acc"],
            "cache_hit": "decoded cache hit" in result["stderr"], "memory_budget": budget and budget.group(1),
            "decode_rate": float(decoded.group(3).replace(",", "")) if decoded else None,
            "decode_seconds": float(decoded.group(2)) if decoded else None}


def single_core_rate(files: list[Path], size: int) -> float:
    """Images per second of the folder decoder (draft decode, resize, round) in this one process."""
    import torch

    from trainforge.data.folder import _load

    torch.set_num_threads(1)
    for path in files[:10]:
        _load(path, (size, size), 3)
    started = time.perf_counter()
    for path in files:
        _load(path, (size, size), 3)
    rate = len(files) / (time.perf_counter() - started)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    return rate


def all_cores_rate(folder: Path, size: int) -> float:
    """Images per second of the folder's parallel decode on all cores (no cache), measured here, beside the limit:
    where other jobs share the machine, more processes need not mean more CPU."""
    from trainforge.data.folder import decode_files, scan_image_folder

    train, val, classes = scan_image_folder(folder)
    started = time.perf_counter()
    decode_files(train + (val or []), (size, size), 3, classes)
    return (len(train) + len(val or [])) / (time.perf_counter() - started)


def phone_photos(folder: Path, run_dir: Path, cache: Path) -> dict:
    """Decoding 12-megapixel photos to 224 px today vs by draft, and the draft/full agreement of a trained model."""
    import numpy as np
    import torch

    import trainforge
    from trainforge.data.cache import decode_folder
    from trainforge.data.folder import decode_files, scan_image_folder
    from trainforge.data.images import read_image
    from trainforge.models.registry import resize_images

    files, _, classes = scan_image_folder(folder)
    paths = [path for path, _ in files]

    def full_path() -> None:  # what folders did before draft decoding: one process, full decode, float resize
        for path in paths:
            pixels = torch.from_numpy(read_image(path, 3))[None].float()
            resize_images(pixels, (224, 224)).round_().clamp_(0, 255).to(torch.uint8)

    timings = {}
    for name, work in (("full_one_process", full_path),
                       ("draft_one_process", lambda: decode_files(files, (224, 224), 3, classes, workers=1)),
                       ("draft_all_cores_cached", lambda: decode_folder(folder, paths, (224, 224), 3))):
        started = time.perf_counter()
        work()
        timings[name] = time.perf_counter() - started
    model = trainforge.load(run_dir)
    agree, diffs = 0, {64: [], 224: []}
    with torch.inference_mode():
        for path in paths:
            full = torch.from_numpy(read_image(path, 3))[None]
            draft = torch.from_numpy(read_image(path, 3, size=(IMAGE_SIZE, IMAGE_SIZE)))[None]
            agree += int(model(full).argmax() == model(draft).argmax())
            for side in diffs:
                a, b = (resize_images(x.float(), (side, side)).round() for x in (full, draft))
                diffs[side].append((a - b).abs().to(torch.uint8).flatten().numpy())
    pixel = {f"{side}px": {"mean_abs": float(np.concatenate(d).mean()), "max_abs": float(np.concatenate(d).max()),
                           "p99_abs": float(np.percentile(np.concatenate(d), 99))} for side, d in diffs.items()}
    return {"images": len(paths), "seconds": timings, "agreement": agree / len(paths), "pixel_difference": pixel}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="folders, runs and caches go here (default: a temporary one)")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST's data root (default: trainforge's search)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny folders, one epoch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="folder-pipeline-"))
    epochs = 1 if args.quick else args.epochs
    n_train, n_val, n_phone = (100, 50, 10) if args.quick else (3000, 1000, 200)
    phone_size = (1000, 750) if args.quick else PHONE_SIZE
    photos = make_photo_folder(work / "photos", train=n_train, val=n_val, size=PHOTO_SIZE, data_dir=args.data_dir)
    phone = make_photo_folder(work / "phone", train=n_phone, val=0, size=phone_size, seed=1, data_dir=args.data_dir)
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TRAINFORGE_CACHE": str(cache),
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    os.environ["TRAINFORGE_CACHE"] = str(cache)
    load_before = os.getloadavg()
    files = sorted((photos / "train").rglob("*.jpg"))
    one_core = single_core_rate(files[:300], IMAGE_SIZE)
    cores = len(os.sched_getaffinity(0))
    all_cores = all_cores_rate(photos, IMAGE_SIZE)
    runs = {}
    for name in ("trainforge-first", "trainforge-second"):
        shutil.rmtree(work / name, ignore_errors=True)
        before = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_ino) for p in (cache / "decoded").glob("*.npy")) \
            if (cache / "decoded").is_dir() else []
        runs[name] = trainforge_run(photos, work / name, epochs, env)
        after = sorted((p.name, p.stat().st_mtime_ns, p.stat().st_ino) for p in (cache / "decoded").glob("*.npy"))
        runs[name]["cache_untouched"] = before == after if before else None
    plain = timed([sys.executable, "-c", PLAIN, str(photos), str(epochs), str(IMAGE_SIZE)], env)
    runs["torchvision"] = {"seconds": plain["seconds"], "peak_bytes": plain["peak_bytes"],
                           "test_acc": json.loads(plain["stdout"].strip().splitlines()[-1])["test_acc"]}
    phones = phone_photos(phone / "train", work / "trainforge-first", cache)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "cpu": _cpu_model(), "cores": cores, "load_average_before": load_before,
              "load_average_after": os.getloadavg(), "epochs": epochs, "train_images": n_train, "val_images": n_val,
              "decode_limit": {"one_core_rate": one_core, "limit": one_core * cores,
                               "all_cores_rate": all_cores}, "runs": runs,
              "speedup_first_vs_torchvision": runs["torchvision"]["seconds"] / runs["trainforge-first"]["seconds"],
              "speedup_second_vs_torchvision": runs["torchvision"]["seconds"] / runs["trainforge-second"]["seconds"],
              "first_run_decode_share_of_limit": (runs["trainforge-first"]["decode_rate"] or 0) / (one_core * cores),
              "phone": phones,
              "phone_speedup": phones["seconds"]["full_one_process"] / phones["seconds"]["draft_all_cores_cached"]}
    print(markdown(report))
    if args.json:
        print(json.dumps(report))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def markdown(r: dict) -> str:
    lines = [f"{r['date']}, {r['cpu']}, {r['cores']} cores, load average {r['load_average_before'][0]:.1f} before "
             f"and {r['load_average_after'][0]:.1f} after; {r['train_images']:,} training + {r['val_images']:,} "
             f"held-out JPEGs of 500x375, cnn at {IMAGE_SIZE} px, {r['epochs']} epochs.", "",
             "| arm | whole process (s) | peak memory, process tree | val accuracy | notes |", "|---|---|---|---|---|"]
    for name, run in r["runs"].items():
        notes = []
        if run.get("decode_rate"):
            notes.append(f"decoded at {run['decode_rate']:,.0f} images/s")
        if run.get("cache_hit"):
            notes.append(f"cache hit, cache file untouched: {run['cache_untouched']}")
        if run.get("memory_budget"):
            notes.append(f"memory budget {run['memory_budget']}")
        lines.append(f"| {name} | {run['seconds']:.1f} | {run['peak_bytes'] / 2 ** 20:,.0f} MB | "
                     f"{run['test_acc']:.3f} | {'; '.join(notes)} |")
    limit = r["decode_limit"]
    phone = r["phone"]
    lines += ["", f"Speed-up over torchvision: first run {r['speedup_first_vs_torchvision']:.2f}x, second run "
                  f"{r['speedup_second_vs_torchvision']:.2f}x. Decode limit: {limit['one_core_rate']:,.0f} images/s "
                  f"on one core x {r['cores']} = {limit['limit']:,.0f}; the first run decoded at "
                  f"{r['first_run_decode_share_of_limit']:.0%} of it; the same parallel decode measured on its own "
                  f"just before: {limit['all_cores_rate']:,.0f} images/s.", "",
              f"{phone['images']} photos of 4000x3000 to 224 px: full decode in one process "
              f"{phone['seconds']['full_one_process']:.1f} s, draft in one process "
              f"{phone['seconds']['draft_one_process']:.1f} s, draft on all cores into the cache "
              f"{phone['seconds']['draft_all_cores_cached']:.1f} s ({r['phone_speedup']:.1f}x). Same prediction from "
              f"draft and full decode: {phone['agreement']:.1%}. Pixel difference (0-255) after the resize: "
              + "; ".join(f"{side}: mean {d['mean_abs']:.2f}, 99th percentile {d['p99_abs']:.0f}, max "
                          f"{d['max_abs']:.0f}" for side, d in phone["pixel_difference"].items())]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

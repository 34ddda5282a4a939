"""Inference speed of an exported model on each ONNX Runtime execution provider present, and their agreement.

Times one input batch (random uint8 images of the model's input shape, the contract of `trainforge export`) on the
CUDA provider and the CPU provider, whichever this onnxruntime build has: the median batch latency over
--iterations calls after --warmup untimed ones, samples/s from it, and the largest |logit difference| of every
provider from the CPU's. A provider that is not present is listed as missing, not an error: the `onnxruntime`
package is CPU-only, `onnxruntime-gpu` has CUDA.

Usage: python benchmarks/onnx_providers.py MODEL.onnx [--batch-size 256] [--iterations 50] [--warmup 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def measure(path: str, provider: str, images: np.ndarray, iterations: int, warmup: int) -> dict:
    import onnxruntime as ort

    # The CPU provider comes second so that nodes the CUDA provider lacks still run; which ones it took is reported.
    session = ort.InferenceSession(path, providers=list(dict.fromkeys([provider, "CPUExecutionProvider"])))
    feed = {session.get_inputs()[0].name: images}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        logits = session.run(None, feed)[0]
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"session_providers": session.get_providers(), "batch_ms": 1e3 * median,
            "samples_per_second": len(images) / median, "logits": logits}


def input_shape(model: str) -> list[int]:
    """[C, H, W] of one image: the model's own size, from trainforge's metadata where the graph takes any size."""
    import onnxruntime as ort
    from trainforge.deploy.formats import read_onnx_info

    shape = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).get_inputs()[0].shape[1:]
    info = read_onnx_info(model)
    if all(isinstance(d, int) for d in shape) or info is None:
        return shape
    return [info.in_channels, info.image_size, info.image_size]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an .onnx file written by `trainforge export`")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    if min(args.batch_size, args.iterations) < 1 or args.warmup < 0:
        parser.error("--batch-size and --iterations must be >= 1, --warmup >= 0")
    import onnxruntime as ort

    available = ort.get_available_providers()
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, *input_shape(args.model)), dtype=np.uint8)
    results = {p: measure(args.model, p, images, args.iterations, args.warmup)
               for p in PROVIDERS if p in available}
    reference = results["CPUExecutionProvider"]["logits"]
    for name, r in results.items():
        r["max_abs_logit_diff_vs_cpu"] = float(np.abs(r.pop("logits") - reference).max())
        print(f"{name:>22}: {r['samples_per_second']:12,.0f} samples/s  {r['batch_ms']:8.2f} ms per batch of "
              f"{args.batch_size}  max |logit diff| vs CPU {r['max_abs_logit_diff_vs_cpu']:.2e}  (ran on "
              f"{', '.join(r['session_providers'])})", file=sys.stderr)
    missing = [p for p in PROVIDERS if p not in available]
    for name in missing:
        print(f"{name:>22}: not in this onnxruntime build (providers: {', '.join(available)})", file=sys.stderr)
    report = {"onnxruntime": ort.__version__, "batch_size": args.batch_size, "input_shape": list(images.shape),
              "available": available, "missing": missing, "results": results}
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

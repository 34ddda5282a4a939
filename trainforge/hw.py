"""Show this machine's devices and, with --measure, its measured ceilings (cached for `bench` and training's MFU).

Reported: the CPU (model, cores, ISA level, the threads torch uses) and every CUDA GPU (name, compute capability,
memory, SM count, driver/CUDA/cuDNN/NCCL versions, bf16 and TF32 support, which GPUs can reach each other's memory
directly, whether the CUDA multi-process service is running); Apple MPS when present. GPU fields are null on a
machine without one.

--measure runs short micro-benchmarks (a few seconds per device): matmul FLOP/s per dtype (fp32 and bf16 on the CPU;
fp32, tf32, bf16 and fp16 on a GPU), memory bandwidth of a large on-device copy (bytes read + written), and on CUDA
host<->device copy bandwidth from pinned and from pageable memory. The result is cached per machine in
$TRAINFORGE_CACHE (default ~/.cache/trainforge) and read by `trainforge bench` and by training's live MFU.

Examples:
  trainforge hw                     # what this machine has (and its cached ceilings, if measured)
  trainforge hw --measure           # measure the ceilings and cache them
  trainforge hw --measure --json    # the same, as one JSON object
"""

from __future__ import annotations

import argparse
from typing import Any

from .hardware import ceilings
from .hardware.probe import inspect, measure_all, timestamp


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--measure", action="store_true",
                        help="run the micro-benchmarks (a few seconds per device) and cache their results")


def run(args: argparse.Namespace) -> dict[str, Any]:
    report = inspect()
    if args.measure:
        show = not (args.json or args.quiet)
        measured = measure_all(progress=show)
        record = {"measured_at": timestamp(), "machine": report, "ceilings": measured}
        report["cache_file"] = str(ceilings.write_cache(record))
        report["measured_at"], report["ceilings"] = record["measured_at"], measured
    else:
        cached = ceilings.read_cache()
        report["cache_file"] = str(ceilings.cache_path()) if cached else None
        report["measured_at"] = cached["measured_at"] if cached else None
        report["ceilings"] = cached["ceilings"] if cached else None
    if not (args.json or args.quiet):
        _print_report(report)
    return report


def _print_report(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    cpu = report["cpu"]
    console.print(f"[bold]{report['host']}[/bold]  python {report['python']}, torch {report['torch']}")
    console.print(f"CPU  {cpu['model']}: {cpu['physical_cores']} cores ({cpu['logical_cpus']} logical, "
                  f"{cpu['usable_cpus']} usable), {cpu['isa']} (torch kernels: {cpu['torch_cpu_capability']}), "
                  f"torch uses {cpu['torch_threads']} threads")
    cuda = report["cuda"]
    if cuda is None:
        console.print("CUDA none")
    else:
        console.print(f"CUDA driver {cuda['driver']}, runtime {cuda['runtime']}, cuDNN {cuda['cudnn']}, "
                      f"NCCL {cuda['nccl']}, multi-process service {'on' if cuda['multi_process_service'] else 'off'}")
        for d in cuda["devices"]:
            console.print(f"  cuda:{d['index']} {d['name']}: compute {d['compute_capability']}, "
                          f"{d['memory_gib']:.1f} GiB, {d['sm_count']} SMs, bf16 {'yes' if d['bf16'] else 'no'}, "
                          f"TF32 {'yes' if d['tf32'] else 'no'}")
        if len(cuda["devices"]) > 1:
            pairs = [f"{i}->{j}" for i, row in enumerate(cuda["p2p"]) for j, ok in enumerate(row) if ok]
            console.print(f"  peer access: {'; '.join(pairs) or 'none'}")
    console.print(f"MPS  {'available' if report['mps'] else 'none'}")
    if not report["ceilings"]:
        console.print("ceilings: not measured yet (run `trainforge hw --measure`)")
        return
    table = Table(title=f"measured ceilings ({report['measured_at']})")
    measured = report["ceilings"]
    dtypes = [d for d in ("fp32", "tf32", "bf16", "fp16") if any(d in c["matmul_flops"] for c in measured.values())]
    host = any("host_to_device" in c for c in measured.values())
    columns = ["device", *[f"{d} matmul" for d in dtypes], "copy"]
    columns += ["H2D pinned/pageable", "D2H pinned/pageable"] if host else []
    for column in columns:
        table.add_column(column, justify="right")
    for name, c in measured.items():
        row = [name, *[_si(c["matmul_flops"].get(d), "FLOP/s") for d in dtypes], _si(c["memory_bandwidth"], "B/s")]
        if host:
            row += [f"{_si(c[k]['pinned'], 'B/s')} / {_si(c[k]['pageable'], 'B/s')}" if k in c else "-"
                    for k in ("host_to_device", "device_to_host")]
        table.add_row(*row)
    console.print(table)
    console.print(f"cached in {report['cache_file']}")


def _si(value: float | None, unit: str) -> str:
    """1.23e13 -> '12.3 TFLOP/s': one format for a 2-core CPU and a GPU alike."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.0f} {unit}"

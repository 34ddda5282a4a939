"""torch.distributed glue: the process group, the DDP/FSDP wrappers, world-size-independent checkpoints, the launcher.

A job is N processes started by torch.distributed's elastic launcher (`torchrun`, or `trainforge train --nproc N`,
which calls the same launcher). Each process reads its rank from the launcher's environment; NCCL carries the
collectives on CUDA and gloo on the CPU. Checkpoints always hold full, unsharded tensors and count position in
global batches, so a run can resume on any number of processes, one included.

Failure model: the launcher runs with max_restarts=0, so one dead process ends the job at once (the launcher stops
the others), and every collective gives up after `TRAINFORGE_DIST_TIMEOUT` seconds (default 60), so a hung process
ends it too, never silently.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
import signal
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError, TrainingError

TIMEOUT_ENV = "TRAINFORGE_DIST_TIMEOUT"
# The exit status of a process that stopped because another one failed (PeerLostError): the launcher reports the
# process that failed on its own as the cause, even when a survivor's exit is noticed first.
PEER_LOST_EXIT_STATUS = 3
DEFAULT_TIMEOUT_S = 60.0
PARALLEL = ("ddp", "fsdp")


def env_world_size() -> int:
    """The number of processes of the job this process was launched into (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank in its job (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def timeout_s() -> float:
    """How long a collective waits for the other processes before the job fails (`$TRAINFORGE_DIST_TIMEOUT`)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ConfigError(f"${TIMEOUT_ENV}: expected a positive number of seconds, got {text!r}")
    return value


def cpu_threads(local_world_size: int) -> int:
    """Intra-op threads for one of `local_world_size` processes sharing this machine's cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def setup(device: torch.device) -> tuple[int, int]:
    """Joins the job's process group when launched by torchrun; returns (rank, world_size)."""
    world = env_world_size()
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            # `--device cuda` names no GPU: each process of a machine takes the one of its local rank.
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(device.index if device.index is not None else local % torch.cuda.device_count())
        else:
            # N processes each using every core would oversubscribe the machine N-fold.
            torch.set_num_threads(cpu_threads(int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s()))
    return dist.get_rank(), dist.get_world_size()


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums `tensor` in place across the processes of the job (a no-op in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def agree_with_rank0(flag: bool, device: torch.device) -> bool:
    """Rank 0's `flag` on every process, for decisions (such as a time-based checkpoint) that each process would
    otherwise take from its own clock and that lead into collectives all must enter together."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def mean_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Replaces `tensor` in place by its mean over the processes of the job (gloo has no AVG reduction)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def agree(values: torch.Tensor, failed: bool) -> tuple[torch.Tensor, list[int]]:
    """`values` summed over the processes, and the ranks that say they `failed`: one all-reduce for both, where
    processes settle an error that only some of them met before any enters a collective the others would not."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return values, [0] if failed else []
    flags = torch.zeros(dist.get_world_size(), device=values.device, dtype=values.dtype)
    flags[dist.get_rank()] = float(failed)
    both = torch.cat([values.reshape(-1), flags])
    dist.all_reduce(both, op=dist.ReduceOp.SUM)
    return both[:values.numel()].reshape(values.shape), both[values.numel():].nonzero().flatten().tolist()


def average_gradients(model: nn.Module) -> None:
    """What DDP's backward pass does, after it: every gradient replaced by its mean over the processes."""
    for flat, group in _flat_buckets([p.grad for p in model.parameters() if p.grad is not None]):
        _unflatten(mean_over_ranks(flat), group)


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (batch-norm statistics) on every process, as DDP's `broadcast_buffers` keeps them."""
    for flat, group in _flat_buckets(list(model.buffers())):
        dist.broadcast(flat, src=0)
        _unflatten(flat, group)


BUCKET_ELEMENTS = 1 << 22  # per collective: few calls, and a bounded extra copy (16 MB of fp32)


def _flat_buckets(tensors: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Flat copies of `tensors`, grouped by dtype and device in buckets of about BUCKET_ELEMENTS, in the same order
    on every process."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, t in enumerate(group):
            bucket.append(t)
            size += t.numel()
            if size >= BUCKET_ELEMENTS or i == len(group) - 1:
                yield torch.cat([b.reshape(-1) for b in bucket]), bucket
                bucket, size = [], 0


def _unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view(t.shape))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# --- model wrappers ----------------------------------------------------------------------------------------------

def _fully_shard() -> Any:
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.5
    return fully_shard


def _fsdp_module_type() -> type:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        from torch.distributed._composable.fsdp import FSDPModule
    return FSDPModule


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` was sharded with FSDP (its parameters are DTensor shards)."""
    # Sharding needs a process group; without one, skip importing FSDP at all.
    return dist.is_available() and dist.is_initialized() and isinstance(model, _fsdp_module_type())


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP gathers one at a time: each parameter-holding child of the network, and the children of a
    child that is a container of blocks (a torchvision `layerN`, a `features` Sequential)."""
    net = getattr(model, "net", model)
    units: list[nn.Module] = []
    for child in net.children():
        if not any(True for _ in child.parameters()):
            continue
        blocks = [b for b in child.children() if any(True for _ in b.parameters())]
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(blocks) > 1:
            units.extend(blocks)
        else:
            units.append(child)
    return units


def wrap(model: nn.Module, parallel: str, device: torch.device, world: int) -> nn.Module:
    """The module the training step calls: `model` itself in one process, a DDP wrapper around it, or `model`
    sharded in place by FSDP (`fully_shard`). Must run before the optimizer is built: FSDP replaces parameters."""
    if parallel not in PARALLEL:
        raise ConfigError(f"--parallel: expected one of {', '.join(PARALLEL)}, got {parallel!r}")
    if world <= 1:
        return model
    if parallel == "ddp":
        # The training step averages gradients and broadcasts buffers itself, after the processes agree that none
        # ran out of memory (loop._agreed_step); DDP keeps its first broadcast of the weights and its no_sync().
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.14 renamed the option (and kept the broadcast at start, which is wanted here).
        no_forward_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                           inspect.signature(ddp.__init__).parameters else {"broadcast_buffers": False})
        return ddp(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None,
                   **no_forward_sync)
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard = _fully_shard()
    # An explicit mesh: FSDP's default one is on the accelerator even when the run was told --device cpu.
    mesh = init_device_mesh(device.type, (world,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_weight(local_count: int, global_count: int, world: int) -> float:
    """Factor on a rank's mean loss that makes the ranks' averaged gradients equal the global batch's mean gradient,
    also when the last batch splits unevenly (DDP and FSDP average gradients over ranks, not over samples)."""
    return local_count * world / global_count


# --- world-size-independent checkpoints -------------------------------------------------------------------------

def _full_options() -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict of `model`. Under FSDP this is a collective that every rank must call, and
    only rank 0 receives the tensors (on the CPU); other ranks get an empty dict."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """`optimizer.state_dict()` in its ordinary single-process form, gathered from the shards under FSDP (a
    collective; rank 0 gets it, other ranks an empty dict)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not by_name:
        return {}
    # get_optimizer_state_dict keys parameters by name; the ordinary form numbers them in param_groups order.
    index: dict[str, int] = {}
    groups = []
    for group in by_name["param_groups"]:
        groups.append({**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]})
    return {"state": {index[name]: value for name, value in by_name["state"].items()}, "param_groups": groups}


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Loads a full state dict into `model`, sharded or not (every rank passes the same full dict)."""
    if not is_sharded(model):
        from .. import runs

        runs.load_state_dict_strict(model, state, runs.STATE_FILE)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Loads an ordinary `optimizer.state_dict()` (as `optimizer_state` writes it) into a sharded or plain run."""
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved_groups = state["param_groups"]
    if sum(len(g["params"]) for g in saved_groups) != len(order) or len(saved_groups) != len(optimizer.param_groups):
        raise ValueError("the checkpoint's optimizer holds a different set of parameters")
    by_name = {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in saved_groups],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# --- failures ------------------------------------------------------------------------------------------------------

_TRANSPORT_MARKERS = ("gloo", "nccl", "c10d", "processgroup", "connection reset", "connection closed", "timed out")


class PeerLostError(TrainingError):
    """This process stopped because another process of the job died, hung or lost its connection."""

    exit_status = PEER_LOST_EXIT_STATUS


@contextlib.contextmanager
def peer_failures_as_errors() -> Iterator[None]:
    """In a process of a multi-process job, turns a collective that failed because another process died, hung or
    lost its connection into a one-line PeerLostError (the launcher then ends the job)."""
    try:
        yield
    except RuntimeError as exc:
        # DDP's reducer reports a broken gloo/NCCL connection as a plain RuntimeError, not a DistError.
        if env_world_size() <= 1 or (not isinstance(exc, dist.DistError)
                                     and not any(m in str(exc).lower() for m in _TRANSPORT_MARKERS)):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise PeerLostError(f"process {os.environ.get('RANK', '?')} of {env_world_size()} lost contact with the "
                            f"others (another process died or hung; collectives wait {timeout_s():g} s, "
                            f"${TIMEOUT_ENV}): {first}") from None


def _describe_failure(rank: int, failure: Any, world: int) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"process {rank} of {world} was killed by {name}"
    if code == PEER_LOST_EXIT_STATUS:
        return f"process {rank} of {world} stopped because it lost contact with the others"
    return f"process {rank} of {world} exited with status {code}"


def _root_cause(failures: dict[int, Any]) -> int:
    """The rank whose failure ended the job: the earliest one that did not merely lose contact with the others, nor
    take the SIGTERM the launcher sends the survivors (failure timestamps are whole seconds, so they often tie)."""
    own = {r: f for r, f in failures.items() if f.exitcode != PEER_LOST_EXIT_STATUS} or failures
    own = {r: f for r, f in own.items() if f.exitcode != -signal.SIGTERM} or own
    return min(own, key=lambda r: (own[r].timestamp, r))


@contextlib.contextmanager
def _quiet_launcher(enabled: bool) -> Iterator[None]:
    """Silences the launcher's own multi-line log records (we report failures in one line) unless debugging."""
    if not enabled:
        yield
        return
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith("torch.distributed")]
    loggers.append(logging.getLogger("torch.distributed"))
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def launch(nproc: int, argv: Sequence[str], *, debug: bool = False) -> None:
    """Runs `python -m trainforge ARGV` as `nproc` local processes through torch.distributed's elastic launcher
    (what `torchrun --standalone --nproc-per-node NPROC --max-restarts 0 -m trainforge ARGV` does).

    Returns when every process has succeeded; otherwise raises TrainingError naming the process whose failure ended
    the job.
    The processes share this process's stdout and stderr.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if nproc < 1:
        raise ConfigError(f"--nproc: expected a number of processes >= 1, got {nproc}")
    launcher_args = torchrun.parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0",
                                         "--module", "trainforge", *argv])
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    if saved_threads is None:
        # Set before the workers import torch, so their thread pools start at their share of the cores.
        os.environ["OMP_NUM_THREADS"] = str(cpu_threads(nproc))
    try:
        with _quiet_launcher(not debug):
            torchrun.run(launcher_args)
    except ChildFailedError as exc:
        cause = _root_cause(exc.failures)
        others = sorted(r for r in exc.failures if r != cause)
        more = f"; then {', '.join(_describe_failure(r, exc.failures[r], nproc) for r in others)}" if others else ""
        raise TrainingError(f"{_describe_failure(cause, exc.failures[cause], nproc)}, which ended the job{more} "
                            f"(its own error, if it printed one, is above)") from None
    finally:
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)

"""The `trainforge` command: a table of verbs, each the CLI face of one module's `configure` and `run`.

A user mistake prints one line and exits with status 2: a bad command line (an unknown verb or flag, a flag's value
of the wrong type or not among its choices, a missing value) without argparse's usage block, and a TrainforgeError
with its `exit_status` (2, or 3 for a process of a multi-process job that lost contact with the others);
`--debug` shows the traceback.
With `--json` the last line of stdout is one JSON object (or list) that scripts can parse.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import os
import signal
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

# verb -> (module with configure(parser) and run(args), one line of help)
VERBS: dict[str, tuple[str, str]] = {
    "train": ("trainforge.train.command", "train an image classifier"),
    "eval": ("trainforge.eval", "evaluate a run's model on a test set"),
    "predict": ("trainforge.predict", "classify image files or folders of them with a run's model"),
    "models": ("trainforge.models.command", "list the registered models and recipes"),
    "datasets": ("trainforge.datasets", "show which built-in data sets are here, from where, and whether they verify"),
    "finetune": ("trainforge.finetune.command", "fine-tune a pretrained model (full, linear probe, LoRA, gradual; --update)"),
    "fewshot": ("trainforge.fewshot.command", "a classifier from K images per class: prototypes on a pretrained encoder"),
    "export": ("trainforge.export", "export a run's model to ONNX or a torch.export program, parity-checked"),
    "serve": ("trainforge.serve", "serve a model over HTTP with dynamic batching (FastAPI + uvicorn)"),
    "compress": ("trainforge.compress.command", "prune, distill and quantize a run's model, with a speed/size report"),
    "tune": ("trainforge.tune.command", "search hyperparameters with Optuna on a validation split (resumable)"),
    "report": ("trainforge.report.command", "write one self-contained HTML report of one run or a comparison of runs"),
    "hw": ("trainforge.hw", "show this machine's devices and measure their ceilings"),
    "bench": ("trainforge.bench.command", "measure a model's training/inference speed and MFU per device"),
    "lr-find": ("trainforge.lr_find", "suggest a learning rate by the range test, with its plot"),
    "auto": ("trainforge.auto.command", "a folder of images to a deployed, measured model within one time budget"),
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose command-line mistakes are one line, like every other error of the CLI (argparse's
    own prints the whole usage block first); the verbs' parsers are of this class too (add_subparsers uses the
    class of the parser it belongs to)."""

    def error(self, message: str) -> NoReturn:
        usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> NoReturn:
    """Prints `PROG: error: MESSAGE` and where the options are listed, on one line of stderr; exits with status 2."""
    sys.stderr.write(f"{prog}: error: {message}; see {prog} --help\n")
    sys.exit(2)


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The full parser, with the options of `verb` (or of every verb when None) filled in.

    Only the verb being run has its module imported: importing all of them (torchvision, onnx, fastapi, optuna...)
    would add seconds to every command's start.
    """
    parser = Parser(
        prog="trainforge", description="Train, fine-tune, compress and serve image classifiers, fast, on any device.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module_name, help_text) in VERBS.items():
        if verb is not None and name != verb:
            sub.add_parser(name, help=help_text)
            continue
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        module.configure(verb_parser)
        common = verb_parser.add_argument_group("output")
        common.add_argument("--json", action="store_true", help="print the result as JSON on the last line of stdout")
        common.add_argument("--quiet", action="store_true", help="no progress bars or tables")
        common.add_argument("--debug", action="store_true", help="show full tracebacks of errors")
        verb_parser.set_defaults(module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import TrainforgeError

    argv = list(sys.argv[1:] if argv is None else argv)
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(verb if verb in VERBS else "")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # named here, where the verb is known: argparse names only the top-level parser
        usage_error(f"trainforge {args.verb}", f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(args.module)
    try:
        result = _run_noting_interrupts(module.run, args)
    except TrainforgeError as exc:
        if args.debug:
            raise
        print(f"trainforge {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"trainforge {args.verb}: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(json.dumps(_json_safe(result)))
    return 0


def _run_noting_interrupts(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> Any:
    """`run(args)`, with any error raised after a Ctrl-C (SIGINT) turned into the KeyboardInterrupt it follows.

    Code that does not expect a KeyboardInterrupt can fail in its own way while unwinding from one (a library's
    bookkeeping half done), and the user pressed Ctrl-C, so the exit says "interrupted" (130), not that error. A
    SIGINT handler installed by the verb itself (uvicorn's, while serving) takes precedence while it is installed.
    """
    interrupts: list[int] = []

    def note_interrupt(signum: int, frame: Any) -> None:
        interrupts.append(signum)
        signal.default_int_handler(signum, frame)

    noting = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if noting:
        signal.signal(signal.SIGINT, note_interrupt)
    try:
        return run(args)
    except Exception as exc:
        if interrupts:
            raise KeyboardInterrupt from exc
        raise
    finally:
        if noting:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/Inf: report them as null rather than emit invalid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _version() -> str:
    from . import __version__
    return f"trainforge {__version__}"


def exit_with(status: int) -> NoReturn:
    """Ends the process with `status`.

    A process of a multi-process job leaves without interpreter finalization (stdio flushed, then os._exit): gloo's
    threads can still hold tensors at that point, above all after a peer died, and freeing them while the
    interpreter is torn down aborts the process (SIGABRT, "terminate called without an active exception"; see
    pytorch/pytorch#179291). That reported a survivor as killed by SIGABRT, and made a finished two-process run fail
    now and then in the tests here. Everything a run writes is written and closed before `main` returns.

    A single process freezes the garbage collector first: the interpreter's last collection would walk every object
    torch's imports made, 0.5-0.7 s of every command on 2 cores, to finalize what Python does not promise to finalize.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    gc.freeze()
    sys.exit(status)


def console() -> NoReturn:
    """The `trainforge` command and `python -m trainforge`."""
    exit_with(main())


if __name__ == "__main__":
    console()

"""The stages of `auto` on one whole-run clock: plan, search, final training, deployment, report; each recorded in
auto.json as it ends, so that a killed run resumes where it stopped with the time it spent counted."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Iterator

from .. import config as cfg
from .. import runs
from ..choose import PLAN_FILE, Candidate, TimePlan, candidates_for, choose_model, trial_dir
from ..errors import ConfigError, TrainingError
from ..train import budget
from . import deploy, inputs

AUTO_FILE = "auto.json"
RUN_DIR = "run"
TRIALS_DIR = "search"
STUDY_FILE = "study.db"
FP32_FILE, INT8_FILE = "model-fp32.onnx", "model-int8.onnx"
REPORT_FILE = "report.html"
OUTPUTS = (AUTO_FILE, PLAN_FILE, inputs.SPLIT_FILE, REPORT_FILE, FP32_FILE, INT8_FILE, STUDY_FILE, RUN_DIR,
           TRIALS_DIR)
# The budget's share of each stage. Training decides the accuracy, so the search (a short trial per candidate) and
# the final training take three quarters; exporting, quantizing and timing a small network take seconds, a
# pretrained one's export and int8 calibration tens of seconds on 2 cores (benchmarks/RESULTS.md, "auto"), and the
# report evaluates the model once more and draws its figures. A stage that ends early leaves its time to the next;
# final training ends where deployment's and the report's shares begin.
SHARES = {"plan": 0.05, "search": 0.30, "train": 0.45, "deploy": 0.12, "report": 0.08}
# When time runs short, in this order (printed with the plan).
SKIP_RULES = (
    "a candidate whose trial cannot take 10 steps in its share of the search is dropped (the plan says so)",
    "final training too short for 10 steps: the winner's trial model is deployed as it is",
    "int8 quantization is skipped when less than twice the fp32 export's time is left of deployment's share",
    "throughput is measured at fewer batch sizes (at least 1 and 4) once deployment's share is spent",
)
# The final training checkpoints at least this often (minutes), so that a killed run loses little of it.
CHECKPOINT_MINUTES = 0.5
# Test fault injection: with this set to a stage's name, the process kills itself (SIGKILL) once that stage is
# recorded, as a user's kill would; unset it costs one look-up per stage.
STOP_AFTER_ENV = "TRAINFORGE_TEST_AUTO_STOP_AFTER"


@dataclasses.dataclass
class AutoOptions:
    """What `auto` was asked; saved in auto.json, so that --resume continues with the same."""

    data: str
    time: str
    memory_budget: str | None = None
    max_latency_ms: float | None = None
    device: str = "auto"
    out: str = ""
    seed: int = 0
    skip_bad_images: bool = False
    storage: str | None = None
    study: str | None = None
    data_dir: str | None = None


class Record:
    """auto.json: the options, every decision and figure, and each stage's planned and actual seconds; written
    atomically after each stage and each trial, with the time spent so far."""

    def __init__(self, out: Path, values: dict[str, Any], clock: budget.Clock):
        self.path, self.values, self.clock = out / AUTO_FILE, values, clock

    @property
    def seconds(self) -> float:
        return self.values["budget_seconds"]

    def spent(self) -> float:
        return self.clock.now() - self.clock.start

    def left_until(self, stage: str) -> float:
        """Seconds from now to the end of `stage`: the budget less what the later stages reserve (their shares,
        or, once the search has found the winner, what its deployment and report were measured to need)."""
        later = list(SHARES)[list(SHARES).index(stage) + 1:]
        reserve = self.values.get("reserve_s") or {n: SHARES[n] * self.seconds for n in ("deploy", "report")}
        return self.seconds - sum(reserve.get(n, SHARES[n] * self.seconds) for n in later) - self.spent()

    def save(self) -> None:
        self.values["elapsed_s"] = round(self.spent(), 3)
        runs.write_json(self.path, self.values)

    def done(self, stage: str) -> bool:
        return self.values["stages"][stage]["done"]

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = self.clock.now()
        yield
        entry = self.values["stages"][name]
        entry["actual_s"] = round(entry["actual_s"] + self.clock.now() - started, 3)
        entry["done"] = True
        self.save()
        if os.environ.get(STOP_AFTER_ENV) == name:
            os.kill(os.getpid(), signal.SIGKILL)


def open_record(options: AutoOptions, *, resume: bool, overwrite: bool, clock: budget.Clock) -> Record:
    """The record of a new run in `options.out` (refusing one that holds a run, unless `overwrite`), or of the run
    there to resume, with `clock` set back by the time that run already spent."""
    out = Path(options.out)
    path = out / AUTO_FILE
    if resume:
        if not path.is_file():
            raise ConfigError(f"--resume {out}: no {AUTO_FILE} there: not a run of trainforge auto")
        values = json.loads(path.read_text())
        clock.start -= values["elapsed_s"]
        values["resumed"].append({"after_s": values["elapsed_s"]})
        return Record(out, values, clock)
    found = [name for name in (AUTO_FILE, *runs.RUN_MARKERS) if (out / name).exists()]
    if found and not overwrite:
        raise ConfigError(f"--out {out} already holds a run ({', '.join(found)}); continue it with --resume {out}, "
                          f"choose another --out, or pass --overwrite to replace it")
    for name in OUTPUTS:
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    seconds = cfg.parse_duration(options.time)
    values = {"options": dataclasses.asdict(options), "budget": options.time, "budget_seconds": seconds,
              "elapsed_s": 0.0, "resumed": [], "finished": False,
              "stages": {n: {"share": s, "planned_s": round(s * seconds, 3), "actual_s": 0.0, "done": False}
                         for n, s in SHARES.items()}}
    return Record(out, values, clock)


def run_stages(record: Record, options: AutoOptions, progress: bool, say: Any,
               part_clock: Any = budget.Clock) -> dict[str, Any]:
    """Every stage not done yet, in order; returns the final record. `part_clock()` makes the clocks of the trials
    and the final training (budget.command_clocks)."""
    out = Path(options.out)
    with record.stage("plan"):
        split, candidates = _plan(record, options, progress, say)
    plan = _search(record, options, split, candidates, progress, say, part_clock)
    run_dir = out / RUN_DIR
    if "reserve_s" not in record.values:
        record.values["reserve_s"] = _reserve(record, out, plan, split)
        record.save()
        say(f"reserved for deployment {record.values['reserve_s']['deploy']:.0f} s and the report "
            f"{record.values['reserve_s']['report']:.0f} s (measured on the winner's trial model); final training "
            f"gets {max(record.left_until('train'), 0):.0f} s")
    if not record.done("train"):
        with record.stage("train"):
            record.values["final_training"] = _final_training(record, options, split, plan, run_dir, progress,
                                                              part_clock)
    say(_trained_line(record.values["final_training"]))
    if not record.done("deploy"):
        with record.stage("deploy"):
            record.values["calibration"] = calibrate(run_dir, split, options.seed)
            record.values["heldout"] = record.values["calibration"].pop("heldout")
            record.values["deploy"] = _deploy(record, out, run_dir, split)
    deployed = Path(record.values["deploy"]["deployed"])
    record.values["serve_command"] = f"trainforge serve {shlex.quote(str(deployed))}"
    if not record.done("report"):
        with record.stage("report"):
            from ..report.command import write_report

            write_report([run_dir], out / REPORT_FILE, device=options.device, evaluation=split.heldout,
                         sections=report_sections(record.values))
    record.values["finished"] = True
    record.save()
    return record.values


def _plan(record: Record, options: AutoOptions, progress: bool, say: Any) -> tuple[inputs.Split, list[Candidate]]:
    """The data checked and split (split.json), the candidates that fit it and, with --max-latency-ms, are fast
    enough; the plan of stages printed."""
    from ..hardware import memory
    from ..train.device import resolve_device

    out = Path(options.out)
    memory_bytes = memory.budget(options.memory_budget, resolve_device(options.device))[0]
    split = inputs.split_data(options.data, data_dir=options.data_dir, seed=options.seed,
                              skip_bad=options.skip_bad_images, memory_budget=memory_bytes, progress=progress)
    if (out / inputs.SPLIT_FILE).is_file() and record.values["resumed"]:
        inputs.check_manifest(out, split)
    else:
        inputs.write_manifest(out, split)
    m = split.manifest
    record.values["split"] = {k: m[k] for k in ("kind", "seed", "fraction", "train_images", "heldout_images")}
    record.values["split"]["skipped_files"] = split.skipped
    record.values["split"]["heldout_per_class"] = split.heldout.labels.bincount().tolist()
    found = candidates_for(_search_config(options), split.search)
    if options.max_latency_ms is not None:
        found = _latency_filter(record, options, split, found, say)
    if not record.values["resumed"]:
        say(plan_text(record, split, found))
    return split, found


def plan_text(record: Record, split: inputs.Split, found: list[Candidate]) -> str:
    m = split.manifest
    held = "the folder's own val/" if m["kind"] == "val/" else f"a seeded ({m['seed']}) stratified {m['fraction']:.0%}" \
        + (" of the training images" if m["kind"] == "built-in" else "")
    lines = [f"auto plan for {m['data']} in {record.values['budget']} ({record.seconds:.0f} s, the whole process):",
             f"  split: {m['train_images']:,} images train and are searched on; {m['heldout_images']:,} held out "
             f"({held}), untouched until the winner is trained (split.json)"]
    if split.skipped:
        lines.append(f"  skipped {len(split.skipped)} unreadable image(s) (--skip-bad-images): {split.skipped[0]}")
    if split.image_size:
        lines.append(f"  images decoded at {split.image_size} px: the largest side any candidate trains at")
    lines.append("  stages: " + ", ".join(f"{n} {s:.0%} ({s * record.seconds:.0f} s)" for n, s in SHARES.items()))
    lines.append(f"  candidates: {', '.join(c.name for c in found)}")
    lines += [f"  if time runs short: {rule}" for rule in SKIP_RULES]
    return "\n".join(lines)


def _search_config(options: AutoOptions) -> cfg.TrainConfig:
    return cfg.TrainConfig(data=options.data, data_dir=options.data_dir, time=options.time, seed=options.seed,
                           device=options.device, memory_budget=options.memory_budget, tensorboard=False)


def _latency_filter(record: Record, options: AutoOptions, split: inputs.Split, found: list[Candidate],
                    say: Any) -> list[Candidate]:
    """The candidates whose architecture's measured batch-1 latency is within --max-latency-ms."""
    measured = record.values.setdefault("candidate_latency_ms", {})
    by_name = {}
    for c in found:
        key = deploy.architecture_key(c, split.search)
        label = f"{key[0]}@{key[1]}"
        if label not in measured:
            measured[label] = round(deploy.architecture_latency(key, split.search), 3)
        by_name[c.name] = measured[label]
    kept, dropped = deploy.within_latency(found, by_name, options.max_latency_ms)
    record.values["latency_filter"] = {"max_latency_ms": options.max_latency_ms, "by_candidate": by_name,
                                       "dropped": dropped}
    for d in dropped:
        say(f"dropped {d['candidate']}: {d['why']}")
    if not kept:
        fastest = min(by_name, key=by_name.get)
        raise ConfigError(f"--max-latency-ms {options.max_latency_ms:g} excludes every candidate: the fastest, "
                          f"{fastest}, takes {by_name[fastest]:.2f} ms per image at batch 1 on this machine")
    return kept


def _search(record: Record, options: AutoOptions, split: inputs.Split, found: list[Candidate], progress: bool,
            say: Any, part_clock: Any) -> TimePlan:
    """The measured choice (choose_model) on the search part, its trials in an Optuna study (study.db in --out, or
    --storage) that a resumed run reuses; plan.json in choose's format with the stages added."""
    out = Path(options.out)
    if record.done("search"):
        return TimePlan.from_dict({k: v for k, v in json.loads((out / PLAN_FILE).read_text()).items()
                                   if k in {f.name for f in dataclasses.fields(TimePlan)}})
    from ..tune.storage import open_storage

    with record.stage("search"):
        # The search's own share, whatever the plan took: an overrun there shortens the final training instead.
        seconds = record.values.setdefault("search_seconds", round(SHARES["search"] * record.seconds, 3))
        storage = open_storage(options.storage or f"sqlite:///{(out / STUDY_FILE).resolve()}")
        reserve = (SHARES["deploy"] + SHARES["report"]) * record.seconds
        try:
            plan = choose_model(_search_config(options), record.clock, bundle=split.search, candidates=found,
                                storage=storage, study_name=options.study or f"auto-{out.resolve().name}",
                                progress=progress, search_seconds=seconds, reserve_seconds=reserve,
                                trial_clock=part_clock,
                                trials_dir=out / TRIALS_DIR, callbacks=(lambda study, trial: record.save(),))
        except TrainingError as exc:
            raise _too_short(options, found, seconds) from exc
        values = {**plan.to_dict(), "stages": record.values["stages"], "skip_rules": list(SKIP_RULES),
                  "latency_filter": record.values.get("latency_filter")}
        runs.write_json(out / PLAN_FILE, values)
        record.values.update(winner=plan.winner, reason=plan.reason, candidates=plan.to_dict()["candidates"])
    say(plan.table())
    return plan


def _too_short(options: AutoOptions, found: list[Candidate], search_seconds: float) -> ConfigError:
    """The budget too small for the smallest candidate, with what it would need."""
    needs = [c.needed_seconds for c in found if c.needed_seconds]
    share = search_seconds / len(found)
    if not needs:
        return ConfigError(f"--time {options.time} is too short: each candidate's trial got {share:.1f} s "
                           f"({SHARES['search']:.0%} of the budget shared by {len(found)}) and none could start "
                           f"training in it (" + "; ".join(f"{c.name}: {c.note or 'failed'}" for c in found) + ")")
    whole = min(needs) / share * cfg.parse_duration(options.time)
    smallest = min((c for c in found if c.needed_seconds), key=lambda c: c.needed_seconds)
    return ConfigError(f"--time {options.time} is too short: the smallest candidate, {smallest.name}, needs about "
                       f"{smallest.needed_seconds:.0f} s for its trial and got {share:.1f} s; auto needs about "
                       f"--time {int(whole) + 1}s")


def _reserve(record: Record, out: Path, plan: TimePlan, split: inputs.Split) -> dict[str, float]:
    """Seconds the deployment and the report will need, from the winner's trial model (same network, same
    images): at least their shares of the budget, more where its measured export and inference say so."""
    trial = trial_dir(out / TRIALS_DIR, plan.winning())
    if not (trial / runs.SUMMARY_FILE).is_file():  # no finished trial model (too short, or from a shared --storage)
        return {n: SHARES[n] * record.seconds for n in ("deploy", "report")}
    validation = round(cfg.TrainConfig().val_fraction * len(split.search.train.labels))  # calibrate()'s part
    need = deploy.deployment_seconds(trial, out, deploy.training_images(split.search, 64), len(split.heldout.labels),
                                     validation, record.clock)
    return {"deploy": max(SHARES["deploy"] * record.seconds, need["deploy"]),
            "report": max(SHARES["report"] * record.seconds, need["report"])}


def calibrate(run_dir: Path, split: inputs.Split, seed: int) -> dict[str, Any]:
    """A temperature fitted on the search's validation part (the part choose_model scored on) and recorded in the
    model, kept only if it lowers the expected calibration error on the held-out part; that part's figures
    (per-class intervals, confusion, ECE) with the temperature kept. The final model trained on the validation
    part too, so the fit can be biased toward overconfidence: the held-out check decides."""
    from ..data.loaders import holdout_split
    from ..report import stats
    from ..report.analysis import analyze_logits, model_logits

    model = runs.load(run_dir)
    validation = holdout_split(split.search, cfg.TrainConfig().val_fraction, seed).test
    temperature = stats.fit_temperature(model_logits(model, validation.images), validation.labels)
    held = model_logits(model, split.heldout.images)
    before = stats.expected_calibration_error(held.softmax(1), split.heldout.labels)
    after = stats.expected_calibration_error((held / temperature).softmax(1), split.heldout.labels)
    kept = after < before
    if kept:
        runs.apply_temperature(run_dir, temperature)
    why = (f"temperature {temperature:.3g} fitted on {len(validation.labels):,} validation images: held-out ECE "
           f"{before:.4f} -> {after:.4f}, {'kept' if kept else 'not kept (no lower)'}")
    heldout = analyze_logits(held / temperature if kept else held, split.heldout.labels, split.heldout.images,
                             list(model.classes))
    return {"temperature": temperature, "kept": kept, "ece_before": before, "ece_after": after,
            "validation_images": len(validation.labels), "why": why, "heldout": heldout.summary()}


def _final_training(record: Record, options: AutoOptions, split: inputs.Split, plan: TimePlan, run_dir: Path,
                    progress: bool, part_clock: Any) -> dict[str, Any]:
    """The winner trained on the whole search part for what is left before deployment's share, from its
    checkpoint on --resume; where that is too short for 10 steps, the winner's trial model instead."""
    winner = plan.winning()
    left = record.left_until("train") - budget.EXIT_SECONDS
    resume = record.values.get("train_started") and (run_dir / runs.STATE_FILE).is_file() \
        and winner.kind != "prototypes"
    record.values["train_started"] = True
    record.save()
    # A resumed training counts its own time (its checkpoint holds what it spent) from this process's start.
    clock = part_clock()
    if resume:
        clock.start = record.clock.start + record.values["resumed"][-1]["after_s"]
    try:
        result = _train_winner(winner, options, split, run_dir, left, clock, resume, progress)
    except TrainingError as exc:
        if "too short" not in str(exc):
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(trial_dir(Path(options.out) / TRIALS_DIR, winner), run_dir)
        return {"winner": winner.name, "skipped": f"final training: {exc}; the winner's trial model is deployed",
                "run_dir": str(run_dir), "resumed": False}
    return {"winner": winner.name, "run_dir": str(run_dir), "time": f"{left:.1f}s", "resumed": bool(resume),
            "heldout_acc": result.get("test_acc"), "epochs": result.get("epochs"), "steps": result.get("steps"),
            "train_seconds": result.get("train_seconds")}


def _train_winner(winner: Candidate, options: AutoOptions, split: inputs.Split, run_dir: Path, left: float,
                  clock: budget.Clock, resume: bool, progress: bool) -> dict[str, Any]:
    """train, finetune or fewshot, as the winner's trial was made, on the whole search part; evaluated at the end
    (and at epoch ends, which nothing reads to decide) on the held-out part."""
    fields = {"data": options.data, "data_dir": options.data_dir, "seed": options.seed, "device": options.device,
              "memory_budget": options.memory_budget, "out": str(run_dir), "tensorboard": False,
              "time": f"{max(left, 0.1):.1f}s", "checkpoint_minutes": CHECKPOINT_MINUTES,
              "val_fraction": inputs.HELDOUT_FRACTION, **split.final_options, **winner.train_options()}
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    if winner.kind == "prototypes":
        from ..fewshot.command import fewshot

        counts = split.final.train.labels.bincount()
        return fewshot({"source": winner.model, "shots": [float(counts[counts > 0].min())], "pool": 0,
                        "out": str(run_dir), "seed": options.seed, "device": options.device, "data": options.data,
                        "image_size": winner.image_size, "val_fraction": inputs.HELDOUT_FRACTION},
                       data=split.final, progress=progress, clock=clock)
    if winner.pretrained:
        from ..finetune.command import finetune

        return finetune({"source": winner.model, "strategy": winner.kind}, fields, data=split.final,
                        progress=progress, clock=clock, resume=run_dir if resume else None)
    from ..train.loop import train

    return train(fields, data=split.final, progress=progress, clock=clock,
                 resume=run_dir if resume else None).to_dict()


def _trained_line(final: dict[str, Any]) -> str:
    if final.get("skipped"):
        return f"{final['winner']}: {final['skipped']}"
    return (f"{final['winner']}: trained {final['train_seconds']:.1f} s ({final['epochs']:.3g} epochs"
            f"{', resumed from its checkpoint' if final['resumed'] else ''}); held-out accuracy "
            f"{final['heldout_acc']:.4f}")


def _deploy(record: Record, out: Path, run_dir: Path, split: inputs.Split) -> dict[str, Any]:
    """fp32 ONNX with export's parity check on the held-out part; int8 kept by keep_int8 where time allows; the
    deployed file's speed on each device."""
    started = record.clock.now()
    fp32 = out / FP32_FILE
    exported = deploy.export_fp32(run_dir, fp32, split.heldout)
    export_seconds = record.clock.now() - started
    result: dict[str, Any] = {"fp32": {k: exported[k] for k in ("exporter", "opset", "parity", "size_bytes")},
                              "export_seconds": round(export_seconds, 3)}
    deployed = fp32
    answers = deploy.predictions(fp32, split.heldout.images.numpy())
    result["heldout_acc"] = float((answers == split.heldout.labels.numpy()).mean())
    result["heldout_images"] = len(answers)
    if record.left_until("deploy") < 2 * export_seconds:
        result["int8"] = {"kept": False, "why": f"skipped: {record.left_until('deploy'):.1f} s left of deployment's "
                                                f"share, under twice the fp32 export's {export_seconds:.1f} s"}
    else:
        calibration = deploy.training_images(split.search, deploy.CALIBRATION_IMAGES).numpy()
        result["int8"] = deploy.quantize_int8(fp32, out / INT8_FILE, calibration, split.heldout, answers)
        if result["int8"]["kept"]:
            deployed = out / INT8_FILE
            result["heldout_acc"] = result["int8"]["int8_acc"]
            fp32.unlink()  # one .onnx in --out: the one deployed
    result["deployed"] = str(deployed)
    result["size_bytes"] = deployed.stat().st_size
    sample = deploy.training_images(split.search, 64).numpy()
    result["speed"] = [dataclasses.asdict(s) for s in
                       deploy.measure_speed(deployed, sample, record.clock,
                                            record.clock.now() + record.left_until("deploy"))]
    if note := deploy.cuda_note():
        result["cuda"] = note
    return result


def report_sections(values: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """auto's tables in report.html: the time plan against the actual, the candidates, the deployment."""
    stages = values["stages"]
    time_rows = [[n, f"{s['planned_s']:.1f}", f"{s['actual_s']:.1f}"] for n, s in stages.items()]
    time_rows.append(["whole run", f"{values['budget_seconds']:.1f}", f"{values['elapsed_s']:.1f}"])
    for r in values["resumed"]:
        time_rows.append(["resumed", "", f"after {r['after_s']:.1f} s already spent (counted above)"])
    candidates = [[c["name"], _fmt(c["samples_per_second"]), _fmt(c["val_acc"], 4), _fmt(c["trial_seconds"], 1),
                   c["note"] + (" (winner)" if c["name"] == values["winner"] else "")] for c in values["candidates"]]
    for d in (values.get("latency_filter") or {}).get("dropped", []):
        candidates.append([d["candidate"], "-", "-", "-", f"dropped: {d['why']}"])
    dep = values["deploy"]
    deploy_rows = [["deployed file", dep["deployed"]], ["int8", dep["int8"]["why"]],
                   ["calibration", values["calibration"]["why"]],
                   ["fp32 parity (held-out)", json.dumps(dep["fp32"]["parity"])]]
    for s in dep["speed"]:
        deploy_rows.append([f"{s['device']} latency batch 1", f"p50 {s['latency_ms_p50']:.3f} ms, p99 "
                                                              f"{s['latency_ms_p99']:.3f} ms"])
        deploy_rows.append([f"{s['device']} throughput", f"{s['throughput']:,.0f} images/s at batch "
                                                         f"{s['best_batch']}"])
    split = values["split"]
    split_rows = [[k, str(v)] for k, v in split.items() if k != "skipped_files"]
    return [("auto: time plan and actual (seconds)", ["stage", "planned", "actual"], time_rows),
            ("auto: split", ["", "value"], split_rows),
            ("auto: candidates (search on the training images' validation part)",
             ["candidate", "samples/s", "validation acc", "trial s", "note"], candidates),
            ("auto: deployment", ["", "value"], deploy_rows)]


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def stderr_say(quiet: bool) -> Any:
    """Where progress lines go: stderr, or nowhere when quiet."""
    return (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))

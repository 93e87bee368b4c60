"""Command line of the frontier study.

    python -m benchmarks.reproduce --preset cpu --data-dir /tmp/cifar10_jpg \\
        --weights-file /work/shared/weights/cifar10_resnet20.th --out docs/results --threads 2

Runs every stage that has no record yet under ``--work`` (default ``outputs/reproduce/<preset>``,
checkpoints and stage JSONs, not committed), then writes ``<out>/results_<preset>.json`` (with the
``frontier`` and ``matched`` blocks and a compact ``summary``), the plots ``<out>/*.png`` and the
report ``--doc`` (default ``<out>.md``). ``--out`` defaults to
``outputs/reproduce/<preset>/results``, outside docs/: the committed report (docs/results.md) is
replaced only by an explicit ``--out docs/results``, and never by the ``smoke`` preset.
``--report-only`` re-renders the report from the existing results JSON without computing
anything. ``--weights-file``: the published weights a ``pretrained`` task adapts. At the start
the run prints its stage counts and the cost model's time (``presets.estimate``). An interrupted
run (SIGTERM, SIGINT) leaves no record of the stage it was in; the same command continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

from lightning.pytorch.utilities.exceptions import SIGTERMException


def _hardware() -> dict:
    import lightning
    import timm
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "timm": timm.__version__,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_start": _load(),
    }


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _threads(spec: str) -> int:
    if spec != "auto":
        return max(1, int(spec))
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return cores if load < 1.0 else 1


def _quiet() -> None:
    """Keep the log readable: Lightning's per-fit banners and known harmless warnings off."""
    import logging
    import warnings

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in (".*LeafSpec.*", ".*smaller than the logging interval.*", ".*weights_only.*",
                    ".*does not have many workers.*", ".*litlogger.*"):
        warnings.filterwarnings("ignore", message=pattern)


def parser() -> argparse.ArgumentParser:
    from benchmarks.reproduce.presets import PRESETS

    p = argparse.ArgumentParser(prog="python -m benchmarks.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="cpu")
    p.add_argument("--data-dir", required=False, help="CIFAR-10: torchvision's files or train/<class>, test/<class> folders")
    p.add_argument("--weights-file", default=None,
                   help="published CIFAR weights the cpu preset adapts (../shared/weights/cifar10_resnet20.th)")
    p.add_argument("--out", default=None,
                   help="folder for the results JSON and plots (default outputs/reproduce/<preset>/results; "
                        "docs/results only when given, never with --preset smoke)")
    p.add_argument("--doc", default=None, help="markdown report (default: <out>.md)")
    p.add_argument("--work", default=None, help="checkpoints and stage records (default outputs/reproduce/<preset>)")
    p.add_argument("--seed", type=int, default=0, help="training seed offset (the data subsets never change)")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a number, or 'auto' (default): all cores when the machine is idle "
                        "(1-min load average < 1), else 1 -- on a loaded machine multi-threaded OpenMP "
                        "barriers make small CPU tensors several times slower than one thread")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset field, e.g. cifar.eval.size=200 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--redo", action="append", default=[], metavar="PATTERN",
                   help="redo the stages matching a glob, e.g. 'cifar/eval/*' (repeatable)")
    p.add_argument("--report-only", action="store_true", help="only re-render the report from the results JSON")
    return p


class Interrupted(SIGTERMException):
    """SIGTERM or SIGINT during a run: raised at once; the stage in progress writes no record. A
    SystemExit (Lightning's SIGTERMException), which Lightning's fit re-raises, where on a
    KeyboardInterrupt it would shut down and call ``sys.exit(1)`` without our message."""


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    import torch

    from benchmarks.reproduce.pipeline import Study, write_json
    from benchmarks.reproduce.presets import apply_override, build_preset
    from benchmarks.reproduce.report import summary, write_study_report
    from lightning_modules.reliability import raise_on_sigterm

    torch.set_num_threads(_threads(args.threads))
    _quiet()
    os.environ.setdefault("WANDB_MODE", "disabled")
    preset = build_preset(args.preset)
    for assignment in args.overrides:
        apply_override(preset, assignment)
    if not args.report_only:
        if not args.data_dir:
            raise SystemExit("--data-dir (CIFAR-10) is required")
        if preset.cifar.pretrained and not (args.weights_file and Path(args.weights_file).is_file()):
            raise SystemExit(f"--preset {args.preset} adapts published CIFAR weights: --weights-file {args.weights_file!r} "
                             "must name the file (e.g. ../shared/weights/cifar10_resnet20.th)")

    out_dir = Path(args.out) if args.out else Path("outputs") / "reproduce" / args.preset / "results"
    doc = Path(args.doc) if args.doc else out_dir.parent / (out_dir.name + ".md")
    check_output_place(args.preset, out_dir, doc)
    work = Path(args.work) if args.work else Path("outputs") / "reproduce" / args.preset
    json_path = out_dir / f"results_{args.preset}.json"
    command = "python -m benchmarks.reproduce " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def log(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    start = time.perf_counter()
    hardware = _hardware()
    study = Study(preset, work, args.data_dir, seed=args.seed, force=args.force, redo=args.redo, log=log,
                  weights_file=args.weights_file)
    if args.report_only:
        if not json_path.is_file():
            raise SystemExit(f"--report-only: {json_path} does not exist")
        results = json.loads(json_path.read_text())
    else:
        results = {
            "preset": {"name": preset.name, "description": preset.description,
                       "tasks_cfg": {"cifar": dataclasses.asdict(preset.cifar)}},
            "command": command, "overrides": list(args.overrides), "seed": args.seed,
            "hardware": hardware, "json_path": str(json_path), "tasks": {},
        }
        previous_sigint = signal.signal(signal.SIGINT, _raise_interrupted)
        try:
            with raise_on_sigterm(lambda: Interrupted("SIGTERM")):
                results["tasks"]["cifar"] = study.run_task("cifar")
        except (KeyboardInterrupt, Interrupted) as exc:
            log(f"interrupted ({exc.code if isinstance(exc, Interrupted) else 'SIGINT'}) after {study.done} new "
                "stage(s): the stage in progress left no record; run the same command to continue")
            raise SystemExit(130) from None
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
        results["tasks"]["cifar"]["config"] = dataclasses.asdict(preset.cifar)
        results["frontier"] = results["tasks"]["cifar"]["frontier"]
        results["matched"] = results["tasks"]["cifar"]["matched"]
        results["summary"] = {task: summary(block) for task, block in results["tasks"].items()}
        results["wall_seconds"] = round(time.perf_counter() - start, 1)
        results["stage_seconds"] = round(sum(_stage_seconds(t) for t in results["tasks"].values()), 1)
        results["hardware"]["load_end"] = _load()
        write_json(json_path, results)
    path = write_study_report(results, out_dir, doc)
    log(f"wrote {json_path} and {path}")
    return results


#: The committed report's folder; only real presets, on request, write there.
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"


def check_output_place(preset: str, out_dir: Path, doc: Path, docs_dir: Path = DOCS_DIR) -> None:
    """Refuse ``--preset smoke`` writing into docs/ (its chance-level numbers would replace the
    committed report), naming the paths and what is valid."""
    if preset != "smoke":
        return
    for what, path in (("--out", out_dir), ("--doc", doc)):
        resolved = path.resolve()
        if resolved == docs_dir or docs_dir in resolved.parents:
            raise SystemExit(
                f"error: {what} {str(path)!r} is inside {docs_dir}: the smoke preset (a pipeline check with "
                "chance-level numbers) never writes the committed report; use an --out/--doc outside docs/ "
                "(default outputs/reproduce/smoke/results) or --preset cpu or gpu"
            )


def _stage_seconds(task: dict) -> float:
    """Compute time of every stage the results rest on (from the stage records, also those of an
    earlier invocation): training, validation accuracy and evaluation."""
    total = task["pretrain"]["train_seconds"] + task["pretrain"]["sweep"]["seconds"]
    for run in task["runs"].values():
        total += run["train_seconds"] + run["sweep"]["seconds"]
    for ev in task["eval"].values():
        total += ev.get("eval_seconds", 0.0)
    return total


if __name__ == "__main__":
    main()

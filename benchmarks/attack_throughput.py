"""ERAttack throughput, batched vs a per-sample loop, and the evaluation callbacks' epoch overhead.

    python -m benchmarks.attack_throughput --out docs/benchmarks/attack_throughput.json

1. ``batched_s`` / ``per_sample_s``: ERAttack (gradient saliency, target ``loss``, k = 100,
   eps = 8/255, ``--steps`` steps, default 10) on ``--num-images`` (64) CIFAR-sized 3 x 32 x 32
   images: one call on the whole batch vs one call per image, same model, same steps. The model is
   the default config's backbone (ResNet-9 width 16, Softplus(2)) in eval mode, random weights
   (the attack's cost hardly depends on them). Both variants return the same images and take the
   same steps (early stops included; ``batched_steps`` / ``per_sample_steps`` in the details).
   In float32 the images agree except for a few pixels (``share_pixels_differing``): batch-size
   dependent rounding can flip the sign of a near-zero gradient component, and a signed step
   amplifies it (in float64 they agree to 1e-12, see tests/explanations/test_attacks.py). One
   untimed warm-up call each; the batched time is the best of 3 calls. The machine's load
   average is recorded: other processes on the 2 cores slow the per-sample loop most. ``ratio`` = per_sample_s / batched_s. ``--small-cnn`` adds the same measurement on a
   two-layer CNN (``small_cnn`` in the details), where per-call overhead dominates.
2. ``callback_overhead``: ``python train.py fit -c configs/default.yaml`` (loggers and
   checkpointing off, ``--epochs`` epochs, default: the config's) with a timer around every hook of
   the project's evaluation callbacks (classes from the ``callbacks`` package, the run summary
   excluded): seconds in those hooks over seconds of the training epochs (train + validation +
   callbacks, measured from ``on_train_epoch_start`` to ``on_train_epoch_end``). When the default
   config has no ``RankingRobustness`` the shipped default settings are added.

Isolation: ``--invocations N`` (default 3) runs the whole measurement in N fresh processes
(``benchmarks.isolation``) and the JSON's ``ratio`` and ``callback_overhead`` are the medians over
them, with ``invocations`` holding each one's values and their min / max / spread.

Threads: ``--threads`` (default 2, the target machine's cores) via ``torch.set_num_threads``; the
attack timing is repeated with one thread (``default_model_1_thread`` in the details), where the
per-image loop pays no thread hand-off per small op, the compute-bound case.
The JSON holds the four keys above plus ``details`` (settings, per-image times, hardware).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.isolation import fresh_process, spread
from explanations.attacks import ERAttack
from explanations.evaluation import ProtocolSettings

DEFAULT_CALLBACK_ARGS = dict(every_n_epochs=1, num_samples=64, batch_size=64, protocol=ProtocolSettings(
    steps=10, attacks=["er"], methods=["gradient"], thickness_samples=2, thickness_points=4))


def default_model() -> nn.Module:
    from lightning_modules.backbones import build_backbone

    return build_backbone("resnet9", num_classes=10, activation="softplus", softplus_beta=2.0, width=16)


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(beta=2.0), nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.Softplus(beta=2.0), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(128, 10),
    )


def time_attack(model: nn.Module, num_images: int, steps: int, seed: int = 0, repeats: int = 3) -> dict[str, float]:
    """Seconds for one batched ERAttack call (best of ``repeats``) and for a loop of per-image calls."""
    torch.manual_seed(seed)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_images, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (num_images,), generator=g)
    attack = ERAttack(model, eps=8 / 255, steps=steps, k=100)
    attack(x[:2], y[:2])  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        batched = attack(x, y)
        times.append(time.perf_counter() - start)
    batched_s = min(times)
    batched_steps = int(attack.steps_taken.sum())
    attack(x[:1], y[:1])  # warm-up
    start = time.perf_counter()
    singles, single_steps = [], 0
    for i in range(num_images):
        singles.append(attack(x[i : i + 1], y[i : i + 1]))
        single_steps += int(attack.steps_taken.sum())
    per_sample_s = time.perf_counter() - start
    diff = (torch.cat(singles) - batched).abs()
    return dict(batched_s=batched_s, per_sample_s=per_sample_s, ratio=per_sample_s / batched_s,
                batched_steps=batched_steps, per_sample_steps=single_steps,
                max_abs_diff=float(diff.max()), share_pixels_differing=float((diff > 1e-6).float().mean()))


class _EpochTimer:
    """Lightning callback: wall time from on_train_epoch_start to on_train_epoch_end."""

    def __init__(self) -> None:
        import lightning as L

        class Timer(L.Callback):
            def __init__(self) -> None:
                self.total, self.epochs, self._t0 = 0.0, 0, None

            def on_train_epoch_start(self, trainer, pl_module) -> None:
                self._t0 = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module) -> None:
                self.total += time.perf_counter() - self._t0
                self.epochs += 1

        self.callback = Timer()


def _wrap_hooks(callback, clock: dict[str, float]) -> None:
    import lightning as L

    name = type(callback).__name__
    clock.setdefault(name, 0.0)
    for hook in dir(L.Callback):
        if not hook.startswith("on_") or not callable(getattr(callback, hook, None)):
            continue
        if getattr(type(callback), hook) is getattr(L.Callback, hook):
            continue  # not overridden: nothing to time
        original = getattr(callback, hook)

        def timed(*args, __original=original, **kwargs):
            start = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                clock[name] += time.perf_counter() - start

        setattr(callback, hook, timed)


def callback_overhead(config: str, epochs: int | None) -> dict:
    """Share of the training epochs' wall time spent in the project's evaluation callbacks."""
    from lightning.pytorch import LightningDataModule

    from callbacks import FinalSummary, RankingRobustness
    from lightning_modules.classifier import RobustClassifier
    from lightning_modules.cli import RobustCLI

    with tempfile.TemporaryDirectory() as tmp:
        args = ["-c", config, "--trainer.logger=false", "--trainer.enable_checkpointing=false",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp}"]
        if epochs is not None:
            args.append(f"--trainer.max_epochs={epochs}")
        cli = RobustCLI(RobustClassifier, LightningDataModule, subclass_mode_data=True,
                        trainer_defaults={"inference_mode": False}, args=args, run=False)
        trainer = cli.trainer
        added = False
        if not any(isinstance(cb, RankingRobustness) for cb in trainer.callbacks):
            trainer.callbacks.append(RankingRobustness(**DEFAULT_CALLBACK_ARGS))
            added = True
        clock: dict[str, float] = {}
        evaluation = [cb for cb in trainer.callbacks
                      if type(cb).__module__.startswith("callbacks.") and not isinstance(cb, FinalSummary)]
        for cb in evaluation:
            _wrap_hooks(cb, clock)
        timer = _EpochTimer().callback
        trainer.callbacks.append(timer)
        start = time.perf_counter()
        trainer.fit(cli.model, datamodule=cli.datamodule)
        total = time.perf_counter() - start
        in_callbacks = sum(clock.values())
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith(("robustness/", "val/acc"))}
    return dict(
        callback_overhead=in_callbacks / timer.total,
        epochs=timer.epochs, epoch_s=timer.total / max(timer.epochs, 1), callbacks_s=clock,
        fit_s=total, ranking_robustness_added=added, final_metrics=metrics,
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/attack_throughput.json")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's max_epochs")
    parser.add_argument("--small-cnn", action="store_true", help="also time a two-layer CNN")
    parser.add_argument("--skip-callback", action="store_true", help="skip the training run")
    parser.add_argument("--invocations", type=int, default=3, help="fresh processes to run it in (medians reported)")
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)  # one invocation, as JSON
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.child_out is None:
        return _isolated(args, [a for a in (argv if argv is not None else sys.argv[1:])])
    torch.set_num_threads(args.threads)

    default = time_attack(default_model(), args.num_images, args.steps)
    result: dict = dict(batched_s=default["batched_s"], per_sample_s=default["per_sample_s"], ratio=default["ratio"])
    details: dict = dict(
        settings=dict(num_images=args.num_images, steps=args.steps, eps=8 / 255, k=100, method="gradient",
                      target="loss", image_size=32, threads=args.threads, model="resnet9 width 16, softplus(2)"),
        default_model=default,
        hardware=dict(platform=platform.platform(), processor=platform.processor(), cpu_count=os.cpu_count(),
                      torch=torch.__version__),
        load_avg_at_start=os.getloadavg(),
    )
    if args.small_cnn:
        details["small_cnn"] = time_attack(small_cnn(), args.num_images, args.steps)
    if args.threads != 1:  # one thread: the per-image loop does not pay for thread hand-offs
        torch.set_num_threads(1)
        details["default_model_1_thread"] = time_attack(default_model(), args.num_images, args.steps)
        torch.set_num_threads(args.threads)
    if not args.skip_callback:
        overhead = callback_overhead(args.config, args.epochs)
        result["callback_overhead"] = overhead.pop("callback_overhead")
        details["callback"] = overhead
    details["load_avg_at_end"] = os.getloadavg()
    result["details"] = details
    Path(args.child_out).write_text(json.dumps(result))
    return result


def _isolated(args: argparse.Namespace, argv: list[str]) -> dict:
    """The measurement in ``args.invocations`` fresh processes; medians and spreads over them."""
    child_argv = []
    skip = False
    for a in argv:  # the parent's own options stay here
        if skip:
            skip = False
            continue
        if a in ("--out", "--invocations"):
            skip = True
            continue
        if a.startswith(("--out=", "--invocations=")):
            continue
        child_argv.append(a)
    runs = [fresh_process("benchmarks.attack_throughput", child_argv) for _ in range(args.invocations)]
    keys = [k for k in ("batched_s", "per_sample_s", "ratio", "callback_overhead") if k in runs[0]]
    stats = {k: spread([r[k] for r in runs]) for k in keys}
    result: dict = {k: stats[k]["median"] for k in keys}
    result["invocations"] = stats
    result["details"] = runs[0]["details"] | {"invocation_details": [r["details"] for r in runs[1:]]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "details"}, indent=2))
    return result


if __name__ == "__main__":
    main()

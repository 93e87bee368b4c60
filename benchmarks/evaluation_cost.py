"""Time the per-epoch evaluation protocol, shipped vs explaining every attacked image again, in fresh processes.

    python -m benchmarks.evaluation_cost --out docs/benchmarks/evaluation_cost.json --invocations 3

The protocol of ``configs/default.yaml``'s RankingRobustness (read from the file: ERAttack and
noise at 2 and 8 /255, 10 steps, thickness 2 x 4 points, k = 100) on 64 random images with the
model of its ``model:`` block (ResNet-9 width 16, Softplus(2), R2ET: the lean layers and
FastBatchNorm2d; BatchNorm running statistics from a few training-mode batches). Variants:

- ``shipped``: the code as it is: every attack keeps the real model's explanation at the images
  it returns (``attack.explanation``, its scoring pass) and the protocol uses it;
- ``before``: that pass withheld, so the protocol explains every attacked image again (as before).

Each variant runs in its own process, the two alternated over ``--invocations``
(``benchmarks.isolation``); seconds per evaluation = median of ``--repeats`` in a process, then
median / min / max over the invocations, and the fastest evaluation of each variant;
``same_results``: the per-image values of every process are bitwise the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.isolation import fresh_process, spread

VARIANTS = ("shipped", "before")


class _Forgetful:
    """An attack whose kept scoring pass is withheld: the protocol explains its images again."""

    explanation = None

    def __init__(self, attack) -> None:
        self._attack = attack

    def __call__(self, *args, **kwargs):
        return self._attack(*args, **kwargs)


def measure(args: argparse.Namespace, variant: str) -> dict:
    """One variant in this process: seconds per evaluation (median of ``repeats``) and a hash of the values."""
    import yaml

    from explanations import evaluation
    from explanations.evaluation import EvaluationProtocol, ProtocolSettings
    from lightning_modules.classifier import RobustClassifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "default.yaml").read_text())
    settings = next(cb["init_args"]["protocol"] for cb in config["trainer"]["callbacks"]
                    if cb["class_path"] == "callbacks.RankingRobustness")
    hparams = {k: v for k, v in config["model"].items() if k != "optimizer"}
    model = RobustClassifier(**hparams).model
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.rand(64, 3, 32, 32))
    model.eval()
    x, y, ids = torch.rand(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,)), torch.arange(args.images)
    protocol = EvaluationProtocol(ProtocolSettings(**settings).for_model(hparams))
    if variant == "before":
        build = protocol._build
        protocol._build = lambda *a, **kw: _Forgetful(build(*a, **kw))
    protocol.evaluate(model, [(x[:4], y[:4], ids[:4])])  # warm-up
    calls, explain = [], evaluation.explain_unchecked
    evaluation.explain_unchecked = lambda *a, **kw: calls.append(1) or explain(*a, **kw)  # counts the protocol's own
    times, result = [], None
    try:
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = protocol.evaluate(model, [(x, y, ids)])
            times.append(time.perf_counter() - start)
    finally:
        evaluation.explain_unchecked = explain
    digest = hashlib.sha256()
    for key in sorted(result.values):
        digest.update(key.encode() + result.values[key].double().numpy().tobytes())
    return {"seconds": statistics.median(times), "fastest": min(times), "values_sha256": digest.hexdigest(),
            "protocol_explanations_per_evaluation": len(calls) // args.repeats,
            "attack_seconds": {k: round(v, 3) for k, v in result.seconds.items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/evaluation_cost.json"))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--invocations", type=int, default=3,
                        help="fresh processes per variant, the variants alternated (medians reported)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out is not None:
        row = measure(args, args.variant)
        Path(args.child_out).write_text(json.dumps(row))
        return row
    common = ["--images", str(args.images), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for inv in range(args.invocations):
        order = VARIANTS if inv % 2 == 0 else tuple(reversed(VARIANTS))
        for variant in order:
            runs[variant].append(fresh_process("benchmarks.evaluation_cost", [*common, "--variant", variant]))
    shipped = [r["seconds"] for r in runs["shipped"]]
    result = {
        "config": "configs/default.yaml (RankingRobustness protocol, model block)",
        "images": args.images, "repeats": args.repeats, "threads": args.threads, "invocations": args.invocations,
        "seconds": {v: spread([r["seconds"] for r in rs]) for v, rs in runs.items()},
        "fastest_s": {v: min(r["fastest"] for r in rs) for v, rs in runs.items()},
        "ratio_over_shipped": {v: spread([r["seconds"] / s for r, s in zip(rs, shipped)]) for v, rs in runs.items()
                               if v != "shipped"},
        "fastest_ratio_over_shipped": {v: min(r["fastest"] for r in rs) / min(r["fastest"] for r in runs["shipped"])
                                       for v, rs in runs.items() if v != "shipped"},
        "attack_seconds": {v: rs[0]["attack_seconds"] for v, rs in runs.items()},
        "protocol_explanations_per_evaluation": {v: rs[0]["protocol_explanations_per_evaluation"] for v, rs in runs.items()},
        "same_results": len({r["values_sha256"] for rs in runs.values() for r in rs}) == 1,
        "same_results_within_variant": {v: len({r["values_sha256"] for r in rs}) == 1 for v, rs in runs.items()},
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

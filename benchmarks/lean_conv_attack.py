"""Time ERAttack on a lean-layer ResNet-9 with and without the d/dW skip, each in fresh processes.

    python -m benchmarks.lean_conv_attack --width 16 --steps 20 --images 16 --repeats 3 --invocations 3

"with skip" is the shipped lean convolution; "without" forces ``_used`` to answer True (every
attack step also computes d/dW and discards it, as before the fix). Same model, images, seed; each
variant runs in its own process, the two alternated over ``--invocations`` (benchmarks.isolation);
the attack outputs must be the same. Prints one JSON line: seconds of each (median of
``--repeats`` per process; median / min / max over the invocations), the ratio per invocation, and
the weight-gradient kernel calls per attack counted by a dispatch mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import explanations.lean_layers as lean
from benchmarks.isolation import fresh_process, spread
from explanations.attacks import ERAttack
from explanations.lean_layers import use_lean_layers
from lightning_modules.backbones import build_backbone


def measure(args: argparse.Namespace, skip: bool) -> dict:
    """One variant in this process: seconds per attack (median of ``repeats``), its output's hash."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone("resnet9", width=args.width, activation="softplus", softplus_beta=2.0).eval()
    use_lean_layers(model)
    x, y = torch.rand(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    attack = ERAttack(model, eps=8 / 255, steps=args.steps, k=100)
    original = lean._used
    lean._used = original if skip else (lambda p: True)
    try:
        from tests.explanations.test_lean_conv_skip import CountWeightGrads

        with CountWeightGrads() as counter:
            attack(x[:2], y[:2])
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = attack(x, y)
            times.append(time.perf_counter() - start)
    finally:
        lean._used = original
    return {"seconds": statistics.median(times), "weight_grad_calls_2_images": counter.weight_grads,
            "output_sum": float(out.double().sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--invocations", type=int, default=3,
                        help="fresh processes per variant, the two variants alternated (medians reported)")
    parser.add_argument("--variant", choices=("with_skip", "without_skip"), help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_out is not None:
        row = measure(args, args.variant == "with_skip")
        Path(args.child_out).write_text(json.dumps(row))
        return row
    common = ["--width", str(args.width), "--steps", str(args.steps), "--images", str(args.images),
              "--repeats", str(args.repeats), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {"with_skip": [], "without_skip": []}
    for inv in range(args.invocations):
        for variant in (("with_skip", "without_skip") if inv % 2 == 0 else ("without_skip", "with_skip")):
            runs[variant].append(fresh_process("benchmarks.lean_conv_attack", [*common, "--variant", variant]))
    ratios = [w["seconds"] / s["seconds"] for w, s in zip(runs["without_skip"], runs["with_skip"])]
    result = {
        "model": f"resnet9 width {args.width} (softplus, lean layers)", "images": args.images,
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads, "invocations": args.invocations,
        "with_skip_s": spread([r["seconds"] for r in runs["with_skip"]]),
        "without_skip_s": spread([r["seconds"] for r in runs["without_skip"]]),
        "ratio_without_over_with": spread(ratios),
        "same_outputs": len({r["output_sum"] for rs in runs.values() for r in rs}) == 1,
        "weight_grad_kernel_calls_per_attack_2_images": {v: rs[0]["weight_grad_calls_2_images"] for v, rs in runs.items()},
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

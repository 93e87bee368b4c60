"""Time ERAttack steps on a lean-layer ResNet-9 with and without the d/dW skip (same run).

    python -m benchmarks.lean_conv_attack --width 16 --steps 20 --images 16 --repeats 3

"with skip" is the shipped lean convolution; "without" forces ``_used`` to answer True (every
attack step also computes d/dW and discards it, as before the fix). Same model, images, seed;
the attack outputs are compared (they must be equal). Prints one JSON line: median seconds of
each, their ratio, and the weight-gradient kernel calls per attack counted by a dispatch mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import explanations.lean_layers as lean
from explanations.attacks import ERAttack
from explanations.lean_layers import use_lean_layers
from lightning_modules.backbones import build_backbone


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_backbone("resnet9", width=args.width, activation="softplus", softplus_beta=2.0).eval()
    use_lean_layers(model)
    x, y = torch.rand(args.images, 3, 32, 32), torch.randint(0, 10, (args.images,))
    attack = ERAttack(model, eps=8 / 255, steps=args.steps, k=100)
    original = lean._used

    def run(skip: bool) -> tuple[float, torch.Tensor]:
        lean._used = original if skip else (lambda p: True)
        try:
            start = time.perf_counter()
            out = attack(x, y)
            return time.perf_counter() - start, out
        finally:
            lean._used = original

    from tests.explanations.test_lean_conv_skip import CountWeightGrads

    counts = {}
    for skip in (True, False):
        lean._used = original if skip else (lambda p: True)
        with CountWeightGrads() as counter:
            attack(x[:2], y[:2])
        counts["with_skip" if skip else "without_skip"] = counter.weight_grads
    lean._used = original
    times = {True: [], False: []}
    outs = {}
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        for skip in (True, False):
            t, outs[skip] = run(skip)
            times[skip].append(t)
    with_s, without_s = statistics.median(times[True]), statistics.median(times[False])
    print(json.dumps({
        "model": f"resnet9 width {args.width} (softplus, lean layers)", "images": args.images,
        "steps": args.steps, "repeats": args.repeats, "threads": args.threads,
        "with_skip_s": round(with_s, 3), "without_skip_s": round(without_s, 3),
        "ratio_without_over_with": round(without_s / with_s, 3),
        "max_abs_output_difference": float((outs[True] - outs[False]).abs().max()),
        "weight_grad_kernel_calls_per_attack_2_images": counts, "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()

"""Where a training step's time goes: convolution kernels vs everything else, per objective.

    python -m benchmarks.step_profile --out docs/benchmarks/step_profile.json --threads 2

One step of each objective (the step of ``benchmarks.step_cost``: batch 64, 32 px, Softplus(0.5),
ResNet-9 width 64 by default, SGD step included) under ``torch.profiler`` (CPU), each objective in
its own fresh process (``benchmarks.isolation``), over ``--invocations``. Ops are summed by self
time into ``conv`` (``aten::mkldnn_convolution``, ``aten::convolution_backward`` and the other
convolution kernels) and ``other`` (BatchNorm, Softplus, pooling, elementwise, autograd's
accumulation). The conv ratio of R2ET to vanilla is the floor argument of docs/benchmarks.md: R2ET
needs two graph-carrying input gradients and one backward through both, about 4x vanilla's
convolution work, so R2ET's whole step cannot be cheaper than that ratio of its convolution time.

The JSON: ``{objective: {conv_ms, other_ms, total_ms, calls: {op: n}, top: [[op, ms], ...]}}``
(medians over invocations) and ``ratios`` (``conv``, ``other``, ``total``: objective / vanilla).
Profiled self times include the profiler's own overhead (a few percent); read the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.isolation import fresh_process, spread

CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution", "aten::convolution",
            "aten::conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward")


def profile_step(objective: str, backbone: str, threads: int, width: int) -> dict:
    """One profiled step of ``objective`` after two unprofiled ones (this process)."""
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.step_cost import StepRunner, build_model, loss_functions, make_batch

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    fn, library, channels_last = loss_functions((objective,))[objective]
    model = build_model(backbone, device, channels_last=channels_last, library_layers=library, width=width)
    x, y = make_batch(64, device, channels_last)
    runner = StepRunner(model, fn, x, y)
    runner.step()
    runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        runner.step()
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS) / 1000
    total = sum(e.self_cpu_time_total for e in events) / 1000
    top = sorted(((e.key, e.self_cpu_time_total / 1000) for e in events), key=lambda kv: -kv[1])[:12]
    return {"conv_ms": conv, "other_ms": total - conv, "total_ms": total,
            "calls": {e.key: e.count for e in events if e.key in CONV_OPS}, "top": top}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/step_profile.json"))
    parser.add_argument("--objectives", nargs="+", default=["vanilla", "r2et_noh", "r2et"])
    parser.add_argument("--backbone", choices=("resnet9", "resnet18"), default="resnet9")
    parser.add_argument("--resnet9-width", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--invocations", type=int, default=2)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)  # one objective, as JSON
    args = parser.parse_args(argv)
    if args.child_out is not None:
        row = profile_step(args.objectives[0], args.backbone, args.threads, args.resnet9_width)
        args.child_out.write_text(json.dumps(row))
        return row
    if "vanilla" not in args.objectives:
        args.objectives.insert(0, "vanilla")
    runs: dict[str, list[dict]] = {o: [] for o in args.objectives}
    for inv in range(args.invocations):
        order = args.objectives if inv % 2 == 0 else args.objectives[::-1]
        for objective in order:
            runs[objective].append(fresh_process("benchmarks.step_profile", [
                "--objectives", objective, "--backbone", args.backbone, "--threads", str(args.threads),
                "--resnet9-width", str(args.resnet9_width)]))
            print(f"invocation {inv + 1}/{args.invocations} {objective}: {runs[objective][-1]['total_ms']:.0f} ms "
                  f"(conv {runs[objective][-1]['conv_ms']:.0f})", file=sys.stderr, flush=True)
    result: dict = {}
    for objective, rows in runs.items():
        result[objective] = {k: statistics.median(r[k] for r in rows) for k in ("conv_ms", "other_ms", "total_ms")}
        result[objective].update(calls=rows[0]["calls"], top=rows[0]["top"])
    result["ratios"] = {
        o: {part: spread([r[f"{part}_ms"] / v[f"{part}_ms"] for r, v in zip(runs[o], runs["vanilla"])])
            for part in ("conv", "other", "total")}
        for o in args.objectives if o != "vanilla"}
    result["settings"] = {"backbone": args.backbone, "width": args.resnet9_width, "threads": args.threads,
                          "invocations": args.invocations, "batch_size": 64, "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for o, parts in result["ratios"].items():
        print(f"{o}: conv {parts['conv']['median']:.2f}x, other {parts['other']['median']:.2f}x, "
              f"total {parts['total']['median']:.2f}x vanilla")
    return result


if __name__ == "__main__":
    main()

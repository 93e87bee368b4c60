"""Cost of one training step per objective: median wall time and peak memory.

    python -m benchmarks.step_cost   # writes outputs/benchmarks/step_cost.json; docs/benchmarks.md has the committed commands

For each backbone (ResNet-18 with the 32 px CIFAR stem, ResNet-9 width 64) at batch 64 on 32 x 32
inputs, one training step = ``zero_grad`` + objective + one ``backward`` + ``SGD.step``, model in
train mode, the same fixed random batch every step. Every model uses Softplus(0.5) activations (the
R2ET setting), vanilla included, so the ratios compare objectives on one network. The library
objectives come from ``explanations.build_objective`` with the shipped R2ET settings (k = 100,
boundary pairs, adaptive weights with w = 0.1, h = 1e-3; AT with its default 3 ERAttack steps).

``naive_r2et`` is the same R2ET loss computed the way the public reference code does it (not in
the library, on purpose): a separate input gradient without graph for the ranking, a separate
forward for CE, then one graph-carrying input gradient recomputed per term (the gap term's; the
curvature term's at x and at x + h u) plus the curvature term's unused extra one.

BatchNorm: the double-backprop objectives run on the model RobustClassifier trains, whose
BatchNorm2d layers have the closed-form double backward of ``explanations.fast_batchnorm`` and
whose Softplus / max pooling are ``explanations.lean_layers``' (smaller double-backprop graph);
vanilla (first-order only) and naive_r2et (the reference code) use PyTorch's layers. The rows
``r2et_noh/pytorch_layers`` and ``r2et/pytorch_layers`` are the library objectives on PyTorch's
BatchNorm, Softplus and max pooling,
so the two improvements (fewer passes, cheaper BatchNorm double backward) can be told apart.

Isolation (the default, ``--isolated``): each objective runs in its own fresh process, and a
fresh vanilla process is timed beside it, the two in alternating order, in each of
``--invocations`` (default 3) invocations; a ratio is the objective's median step over the
vanilla median of the same pair, and the JSON gives its median, min and max over the invocations
(so what else is timed cannot bias it: timed in one process next to memory-heavy objectives the
vanilla step was 15-20% slower). Next to it, ``best_ratio_to_vanilla``: the objective's fastest step
over vanilla's fastest, each over all its invocations (``best_ratio_min``/``_max``: the same per
invocation). On a shared machine noise only ever adds time (the cores run slower at times), so the
fastest steps are the least disturbed ones: this ratio is the steadier of the two, though on a
machine whose speed drifts neither repeats within 5% (docs/benchmarks.md gives two runs of one
command). ``--interleaved`` times all objectives in one process,
round-robin (the earlier layout, kept to show that bias). ``--fit`` adds the user-level figure:
images/s of ``train.py fit -c configs/default.yaml`` (no callbacks, the first ``--fit-skip``
steps left out) with ``--model.objective vanilla`` and ``r2et``, fresh processes, alternated.

Time: ``--warmup`` steps (default 2), then the median of ``--repeats`` (default 5) timed steps
(``torch.cuda.synchronize`` around each on GPU). Also recorded: the fastest step (``ms_min``) and
the median process CPU time of a step (``cpu_ms_per_step``, all threads), which other processes
competing for the cores barely change: on a shared machine the CPU-time ratios are the stable ones.

Memory (``peak_mem_mb``): what a ``torch.cuda.max_memory_allocated`` reading means, on either
device: bytes held by live tensors at the peak of one step, the model state (parameters, buffers,
gradients, optimizer state, the batch) included. On GPU it is that reading. On CPU the state at
the start of the step is summed from its (deduplicated) storages and the step's own allocations are
replayed from the PyTorch profiler's allocation/free events (``profile_memory=True``, every CPU
tensor allocation through c10's allocator, in time order). Allocator caching, oneDNN scratch
buffers and the Python heap are not counted (they are not tensor memory). ``step_mem_mb`` is the
part above the state held at the start of the step (activations, autograd graph, gradients).

The main JSON is ``{backbone: {objective: {ms_per_step, ratio_to_vanilla, peak_mem_mb}}}`` (plus
``step_mem_mb``, ``mem_ratio_to_vanilla``, ``ms_min``, ``cpu_ms_per_step`` and their ratios;
isolated: ``ratio_min``/``ratio_max``/``ratio_spread`` over the invocations and ``ms_all``, and a
``fit`` block with the images/s of each invocation);
``<out>_details.json`` holds the settings, the hardware, every step time and the per-phase
breakdown of vanilla / r2et_noh / r2et (``--phases``). ``--channels-last`` adds channels_last rows
(``vanilla/channels_last`` ...), timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.isolation import fresh_process
from explanations import build_objective
from explanations.fast_batchnorm import use_fast_batchnorm
from explanations.lean_layers import use_lean_layers
from explanations.regularizers import adaptive_weight, curvature_term, gap_term, safe_norm
from explanations.saliency import ranking, saliency_from_gradient, unit_sign_direction
from lightning_modules.backbones import build_backbone

BACKBONES = ("resnet18", "resnet9")
PYTORCH_LAYERS = "/pytorch_layers"  # row suffix: the library objective on PyTorch's own BatchNorm, Softplus, max pooling
CHANNELS_LAST = "/channels_last"  # row suffix: model and batch in channels_last memory format
OBJECTIVES = (
    "vanilla", "r2et_noh", "r2et", "est_h", "grad_norm", "at", "naive_r2et",
    "r2et_noh" + PYTORCH_LAYERS, "r2et" + PYTORCH_LAYERS,
)
CHANNELS_LAST_ROWS = ("vanilla" + CHANNELS_LAST, "r2et_noh" + CHANNELS_LAST, "r2et" + CHANNELS_LAST)
# the shipped R2ET settings (configs/model/r2et.yaml, configs/default.yaml)
OBJECTIVE_CONFIG = dict(k=100, pair_set="boundary", adaptive=True, weight=0.1, h=1e-3, target="loss")

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- models and data
def build_model(
    name: str, device: torch.device, channels_last: bool = False, library_layers: bool = False, width: int = 64
) -> nn.Module:
    """The benchmarked network, Softplus(0.5), train mode, a fixed initialisation.

    ``library_layers``: as RobustClassifier builds it for double-backprop objectives.
    ``width``: ResNet-9's (64 = the reference network; smaller only for smoke tests).
    """
    torch.manual_seed(0)
    if name == "resnet18":
        model = build_backbone("resnet18", num_classes=10, cifar_stem=True, activation="softplus", softplus_beta=0.5)
    elif name == "resnet9":
        model = build_backbone("resnet9", num_classes=10, width=width, activation="softplus", softplus_beta=0.5)
    else:
        raise ValueError(f"backbone={name!r} is not benchmarked; valid: {BACKBONES}")
    if library_layers:  # as RobustClassifier: fast BatchNorm and lean Softplus / max pooling
        use_fast_batchnorm(model)
        use_lean_layers(model)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def make_batch(batch_size: int, device: torch.device, channels_last: bool = False) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch_size, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch_size,), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


# ----------------------------------------------------------------------------- the naive R2ET
def _ce_input_gradient(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool) -> Tensor:
    """A fresh forward and d(sum_i CE_i)/dx, as the reference code's get_batch_gradient."""
    xv = x.detach().requires_grad_(True)
    scalar = F.cross_entropy(model(xv), y, reduction="sum")
    (grad,) = torch.autograd.grad(scalar, xv, create_graph=create_graph)
    return grad


def naive_r2et(model: nn.Module, x: Tensor, y: Tensor, k: int = 100, h: float = 1e-3, weight: float = 0.1) -> Tensor:
    """R2ET (boundary gap + curvature, adaptive weights) the way the public reference code computes it.

    Six forward passes and five input gradients per step: ranking (no graph), CE, then per term a
    graph-carrying gradient at x (the curvature term's is unused), and the curvature term's own
    g(x) and g(x + h u). Same loss as the library's ``r2et`` up to BatchNorm batch statistics.
    """
    # 1. the ranking from a separate input gradient without graph
    order_grad = _ce_input_gradient(model, x, y, create_graph=False)
    order = ranking(saliency_from_gradient(order_grad))
    # 2. CE from its own forward
    ce = F.cross_entropy(model(x), y)
    # 3. curvature term: its unused graph-carrying gradient, then g(x) and g(x + h u) recomputed
    _unused = _ce_input_gradient(model, x, y, create_graph=True)
    g_x = _ce_input_gradient(model, x, y, create_graph=True)
    x_shift = x.detach() + h * unit_sign_direction(g_x)
    g_shift = _ce_input_gradient(model, x_shift, y, create_graph=True)
    r_h = (safe_norm(g_shift - g_x) / h).mean()
    # 4. gap term: its graph-carrying gradient recomputed, ranked by the order of step 1
    g_gap = _ce_input_gradient(model, x, y, create_graph=True)
    ranked = saliency_from_gradient(g_gap).gather(1, order)
    r_g = -(ranked[:, :k].sum(1) - ranked[:, k : 2 * k].sum(1)).mean()
    return ce + adaptive_weight(weight, ce, r_h) * r_h + adaptive_weight(weight, ce, r_g) * r_g


def loss_functions(names: tuple[str, ...]) -> dict[str, tuple[LossFn, bool, bool]]:
    """``{row: (loss_fn, library_layers, channels_last)}``: library objectives get the model
    RobustClassifier trains (for double-backprop objectives FastBatchNorm2d, LeanSoftplus,
    LeanMaxPool2d) unless the row has the suffix ``/pytorch_layers``; vanilla and naive_r2et (the
    reference code's way) use PyTorch's layers. ``/channels_last`` rows put the model and the batch in channels_last format."""
    fns: dict[str, tuple[LossFn, bool, bool]] = {}
    for row in names:
        channels_last = CHANNELS_LAST in row
        name = row.replace(PYTORCH_LAYERS, "").replace(CHANNELS_LAST, "")
        if name == "naive_r2et":
            fns[row] = (lambda m, x, y: naive_r2et(m, x, y, OBJECTIVE_CONFIG["k"], OBJECTIVE_CONFIG["h"], OBJECTIVE_CONFIG["weight"]), False, channels_last)
        else:
            objective = build_objective(name, **OBJECTIVE_CONFIG)
            library = objective.double_backprop and PYTORCH_LAYERS not in row
            fns[row] = (lambda m, x, y, objective=objective: objective(m, x, y).loss, library, channels_last)
    return fns


# ----------------------------------------------------------------------------- measurement
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: tuple[Tensor, ...]) -> int:
    """Bytes of the distinct storages behind parameters, gradients, buffers, optimizer state, batch."""
    seen: dict[int, int] = {}

    def add(t: object) -> None:
        if isinstance(t, Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for state in optimizer.state.values():
        for v in state.values():
            add(v)
    for t in tensors:
        add(t)
    return sum(seen.values())


def _cpu_step_peak(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes during ``step`` from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    cpu = torch.autograd.DeviceType.CPU
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == cpu]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


class StepRunner:
    """One objective's model, optimizer and training step (zero_grad, loss, backward, SGD step)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> None:
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
        self.times: list[float] = []
        self.cpu_times: list[float] = []

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, self.x, self.y)
        loss.backward()
        self.optimizer.step()

    def timed_step(self) -> None:
        device = self.x.device
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.step()
        _sync(device)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.process_time() - cpu_start)

    def memory(self) -> dict[str, float]:
        """Peak memory of one more step (see the module docstring)."""
        device = self.x.device
        state = _state_bytes(self.model, self.optimizer, (self.x, self.y))
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            self.step()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            return dict(peak_mem_mb=peak / 2**20, step_mem_mb=(peak - before) / 2**20, state_mem_mb=state / 2**20)
        extra = _cpu_step_peak(self.step)
        return dict(peak_mem_mb=(state + extra) / 2**20, step_mem_mb=extra / 2**20, state_mem_mb=state / 2**20)

    def timing_stats(self) -> dict[str, float]:
        ms = [1000 * t for t in self.times]
        cpu = [1000 * t for t in self.cpu_times]
        return {"ms_per_step": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms), "ms_all": ms,
                "cpu_ms_per_step": statistics.median(cpu), "cpu_ms_all": cpu}


def measure_interleaved(
    runners: dict[str, StepRunner], warmup: int, repeats: int, memory: bool = True, label: str = ""
) -> dict[str, dict[str, float]]:
    """Warm every objective up, then time them round-robin (one step each per round), so that a
    slow spell on a shared machine hits every objective alike; median over the rounds."""
    for runner in runners.values():
        for _ in range(warmup):
            runner.step()
    for round_ in range(repeats):
        for name, runner in runners.items():
            runner.timed_step()
            print(f"{label} round {round_ + 1}/{repeats} {name:11s} {1000 * runner.times[-1]:9.1f} ms "
                  f"(cpu {1000 * runner.cpu_times[-1]:9.1f} ms)", file=sys.stderr, flush=True)
    rows = {name: runner.timing_stats() for name, runner in runners.items()}
    if memory:
        for name, runner in runners.items():
            rows[name].update(runner.memory())
    base = rows["vanilla"]
    for row in rows.values():
        row["ratio_to_vanilla"] = row["ms_per_step"] / base["ms_per_step"]
        row["min_ratio_to_vanilla"] = row["ms_min"] / base["ms_min"]
        row["cpu_ratio_to_vanilla"] = row["cpu_ms_per_step"] / base["cpu_ms_per_step"]
        if "peak_mem_mb" in row:
            row["mem_ratio_to_vanilla"] = row["peak_mem_mb"] / base["peak_mem_mb"]
            row["step_mem_ratio_to_vanilla"] = row["step_mem_mb"] / base["step_mem_mb"]
    return rows


# ----------------------------------------------------------------------------- phase breakdown
def phases(model: nn.Module, x: Tensor, y: Tensor, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """Median ms of each phase of vanilla, r2et_noh and r2et steps, built from the library's pieces.

    The r2et phases reproduce ``ThicknessSurrogate`` (checked against it) so that the double
    backward can be timed on its own: ``backward`` of r2et_noh minus ``backward`` of vanilla is the
    cost of backpropagating through the input-gradient graph.
    """
    device = x.device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    cfg = OBJECTIVE_CONFIG

    reference = {kind: build_objective(kind, **cfg) for kind in ("r2et_noh", "r2et")}

    def run(kind: str, check: bool = False) -> dict[str, float]:
        marks: list[tuple[str, float]] = []
        expected = reference[kind](model, x, y).loss.item() if check else None

        def mark(label: str) -> None:
            _sync(device)
            marks.append((label, time.perf_counter()))

        optimizer.zero_grad(set_to_none=True)
        mark("start")
        if kind == "vanilla":
            loss = F.cross_entropy(model(x), y)
            mark("forward")
        elif kind == "input_grad_no_graph":
            xv = x.detach().requires_grad_(True)
            ce_i = F.cross_entropy(model(xv), y, reduction="none")
            mark("forward")
            (grad,) = torch.autograd.grad(ce_i.sum(), xv)
            mark("input_grad")
            return _durations(marks)
        else:
            xv = x.detach().requires_grad_(True)
            ce_i = F.cross_entropy(model(xv), y, reduction="none")
            ce = ce_i.mean()
            mark("forward")
            (grad,) = torch.autograd.grad(ce_i.sum(), xv, create_graph=True)
            mark("input_grad")
            r_g = gap_term(saliency_from_gradient(grad), cfg["k"], cfg["pair_set"]).mean()
            loss = ce + adaptive_weight(cfg["weight"], ce, r_g) * r_g
            mark("gap_term")
            if kind == "r2et":
                r_h = curvature_term(model, xv, y, grad, cfg["h"], cfg["target"]).mean()
                loss = loss + adaptive_weight(cfg["weight"], ce, r_h) * r_h
                mark("curvature_term")
            if expected is not None and not math.isclose(loss.item(), expected, rel_tol=1e-4):
                raise AssertionError(f"phase replica of {kind} gives {loss.item()}, the objective {expected}")
        loss.backward()
        mark("backward")
        optimizer.step()
        mark("optimizer")
        return _durations(marks)

    kinds = ("vanilla", "input_grad_no_graph", "r2et_noh", "r2et")
    run("r2et_noh", check=True)
    run("r2et", check=True)
    for kind in kinds:
        for _ in range(warmup):
            run(kind)
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(repeats):  # round-robin, as in measure_interleaved
        for kind in kinds:
            runs[kind].append(run(kind))
    return {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for kind, rs in runs.items()}


def _durations(marks: list[tuple[str, float]]) -> dict[str, float]:
    out = {label: 1000 * (t - marks[i][1]) for i, (label, t) in enumerate(marks[1:])}
    out["total"] = 1000 * (marks[-1][1] - marks[0][1])
    return out


# ----------------------------------------------------------------------------- reporting
def markdown_table(results: dict[str, dict[str, dict[str, float]]], isolated: bool = False) -> str:
    nan = float("nan")
    if isolated:
        lines = ["| backbone | objective | fastest ms | x vanilla (fastest) | min - max over invocations "
                 "| ms / step (median) | x vanilla (median) | min - max over invocations "
                 "| CPU x vanilla | peak MB | x vanilla |", "|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
        for backbone, rows in results.items():
            for name, r in rows.items():
                lines.append(
                    f"| {backbone} | {name} | {r['ms_min']:.0f} | {r['best_ratio_to_vanilla']:.2f} | "
                    f"{r['best_ratio_min']:.2f} - {r['best_ratio_max']:.2f} | "
                    f"{r['ms_per_step']:.0f} | {r['ratio_to_vanilla']:.2f} | "
                    f"{r['ratio_min']:.2f} - {r['ratio_max']:.2f} | {r['cpu_ratio_to_vanilla']:.2f} | "
                    f"{r.get('peak_mem_mb', nan):.0f} | {r.get('mem_ratio_to_vanilla', nan):.2f} |")
        return "\n".join(lines)
    lines = [
        "| backbone | objective | ms / step (median) | x vanilla | min ms | x vanilla | CPU ms | x vanilla "
        "| peak MB | x vanilla | step MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for backbone, rows in results.items():
        for name, r in rows.items():
            lines.append(
                f"| {backbone} | {name} | {r['ms_per_step']:.0f} | {r['ratio_to_vanilla']:.2f} | "
                f"{r['ms_min']:.0f} | {r['min_ratio_to_vanilla']:.2f} | "
                f"{r['cpu_ms_per_step']:.0f} | {r['cpu_ratio_to_vanilla']:.2f} | "
                f"{r.get('peak_mem_mb', nan):.0f} | {r.get('mem_ratio_to_vanilla', nan):.2f} | "
                f"{r.get('step_mem_mb', nan):.0f} |"
            )
    return "\n".join(lines)


def _hardware(device: torch.device) -> dict[str, object]:
    info: dict[str, object] = {
        "device": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------- isolation
def _child_run(args: argparse.Namespace, backbone: str, objective: str, memory: bool) -> dict[str, float]:
    """One objective alone in a fresh process (``--child-out``): its step timings (and memory)."""
    argv = ["--backbones", backbone, "--objectives", objective, "--batch-size", str(args.batch_size),
            "--warmup", str(args.warmup), "--repeats", str(args.repeats), "--device", args.device,
            "--resnet9-width", str(args.resnet9_width)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    argv += [] if memory else ["--no-memory"]
    return fresh_process("benchmarks.step_cost", argv)


def run_isolated(args: argparse.Namespace) -> tuple[dict, dict]:
    """Every objective in its own process, beside a fresh vanilla process, alternating order, over
    ``args.invocations`` invocations (see the module docstring). Returns (main JSON, details)."""
    pairs: dict[str, dict[str, list[dict]]] = {b: {o: [] for o in args.objectives if o != "vanilla"} for b in args.backbones}
    for inv in range(args.invocations):
        for backbone in args.backbones:
            for name in pairs[backbone]:
                order = ["vanilla", name] if inv % 2 == 0 else [name, "vanilla"]
                rows = {o: _child_run(args, backbone, o, memory=inv == 0 and not args.no_memory) for o in order}
                pairs[backbone][name].append(rows)
                print(f"invocation {inv + 1}/{args.invocations} {backbone} {name}: "
                      f"{rows[name]['ms_per_step']:.0f} ms vs vanilla {rows['vanilla']['ms_per_step']:.0f} ms "
                      f"= {rows[name]['ms_per_step'] / rows['vanilla']['ms_per_step']:.2f}x", file=sys.stderr, flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for backbone, by_name in pairs.items():
        vanilla_runs = [r["vanilla"] for runs in by_name.values() for r in runs]
        rows = {"vanilla": _isolated_row(vanilla_runs, [1.0] * len(vanilla_runs), [1.0] * len(vanilla_runs))}
        rows["vanilla"].update(best_ratio_to_vanilla=1.0, best_ratio_min=1.0, best_ratio_max=1.0)
        mem = next((r for r in vanilla_runs if "peak_mem_mb" in r), None)
        if mem:
            rows["vanilla"].update({k: mem[k] for k in ("peak_mem_mb", "step_mem_mb")}, mem_ratio_to_vanilla=1.0)
        for name, runs in by_name.items():
            ratios = [r[name]["ms_per_step"] / r["vanilla"]["ms_per_step"] for r in runs]
            cpu = [r[name]["cpu_ms_per_step"] / r["vanilla"]["cpu_ms_per_step"] for r in runs]
            rows[name] = _isolated_row([r[name] for r in runs], ratios, cpu)
            # the fastest step of each side over all its invocations: host noise only adds time
            best = [r[name]["ms_min"] / r["vanilla"]["ms_min"] for r in runs]
            rows[name].update(best_ratio_to_vanilla=min(r[name]["ms_min"] for r in runs) / min(r["vanilla"]["ms_min"] for r in runs),
                              best_ratios=best, best_ratio_min=min(best), best_ratio_max=max(best))
            first = runs[0]
            if "peak_mem_mb" in first[name]:
                rows[name].update(peak_mem_mb=first[name]["peak_mem_mb"], step_mem_mb=first[name]["step_mem_mb"],
                                  mem_ratio_to_vanilla=first[name]["peak_mem_mb"] / first["vanilla"]["peak_mem_mb"])
        results[backbone] = rows
    return results, {"pairs": pairs}


def _isolated_row(runs: list[dict], ratios: list[float], cpu_ratios: list[float]) -> dict[str, float]:
    medians = [r["ms_per_step"] for r in runs]
    return {"ms_per_step": statistics.median(medians), "ms_min": min(r["ms_min"] for r in runs),
            "ms_max": max(r["ms_max"] for r in runs), "ms_all": medians,
            "cpu_ms_per_step": statistics.median(r["cpu_ms_per_step"] for r in runs),
            "ratio_to_vanilla": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "ratio_spread": max(ratios) / min(ratios) - 1, "ratios": ratios,
            "cpu_ratio_to_vanilla": statistics.median(cpu_ratios), "invocations": len(runs)}


def run_fit(args: argparse.Namespace) -> dict:
    """images/s of ``train.py fit`` on the default config, vanilla vs r2et, fresh processes alternated."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parents[1]
    runs: dict[str, list[float]] = {"vanilla": [], "r2et": []}
    for inv in range(args.invocations):
        for objective in (["vanilla", "r2et"] if inv % 2 == 0 else ["r2et", "vanilla"]):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "fit.json"
                callbacks = json.dumps([{"class_path": "benchmarks.fit_throughput.FitThroughput",
                                         "init_args": {"out": str(out), "skip": args.fit_skip}}])
                env = dict(os.environ, WANDB_MODE="disabled")
                if args.threads:
                    env["OMP_NUM_THREADS"] = str(args.threads)
                subprocess.run([sys.executable, "train.py", "fit", "-c", "configs/default.yaml",
                                "--model.objective", objective, "--trainer.callbacks", callbacks,
                                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(args.fit_steps),
                                "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
                                "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
                               check=True, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                runs[objective].append(json.loads(out.read_text())["images_per_s"])
                print(f"fit invocation {inv + 1}/{args.invocations} {objective}: {runs[objective][-1]:.1f} images/s",
                      file=sys.stderr, flush=True)
    ratios = [v / r for v, r in zip(runs["vanilla"], runs["r2et"])]
    return {"config": "configs/default.yaml", "steps": args.fit_steps, "skipped": args.fit_skip, "images_per_s": runs,
            "r2et_cost_ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/step_cost.json"))
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=BACKBONES)
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--phases", action="store_true", help="also time the phases of vanilla / r2et_noh / r2et")
    parser.add_argument("--channels-last", action="store_true",
                        help=f"add the rows {', '.join(CHANNELS_LAST_ROWS)} (timed in the same rounds)")
    parser.add_argument("--extra-repeats", type=int, default=3, help="timed rounds of the phase breakdown")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--resnet9-width", type=int, default=64, help="64 = the reference ResNet-9 (smaller: smoke tests)")
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--isolated", dest="layout", action="store_const", const="isolated",
                        help="(default) each objective in a fresh process beside a fresh vanilla one, alternated")
    layout.add_argument("--interleaved", dest="layout", action="store_const", const="interleaved",
                        help="all objectives in one process, round-robin (biased: see the module docstring)")
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)  # one objective, as JSON
    parser.set_defaults(layout="isolated")
    parser.add_argument("--invocations", type=int, default=3, help="isolated: invocations of every pair (default 3)")
    parser.add_argument("--fit", action="store_true", help="also time train.py fit on the default config (images/s)")
    parser.add_argument("--fit-steps", type=int, default=32, help="--fit: training steps per run (default 32)")
    parser.add_argument("--fit-skip", type=int, default=3, help="--fit: first steps not timed (default 3)")
    args = parser.parse_args(argv)
    if args.child_out is not None:  # one objective, this process: the row as JSON (benchmarks.isolation)
        if args.threads:
            torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        (name,) = args.objectives
        loss_fn, library, channels_last = loss_functions((name,))[name]
        model = build_model(args.backbones[0], device, channels_last, library, args.resnet9_width)
        runner = StepRunner(model, loss_fn, *make_batch(args.batch_size, device, channels_last))
        for _ in range(args.warmup):
            runner.step()
        for _ in range(args.repeats):
            runner.timed_step()
        row = runner.timing_stats()
        if not args.no_memory:
            row.update(runner.memory())
        args.child_out.write_text(json.dumps(row))
        return row
    if "vanilla" not in args.objectives:
        args.objectives.insert(0, "vanilla")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.channels_last:
        args.objectives += [row for row in CHANNELS_LAST_ROWS if row not in args.objectives]
    fns = loss_functions(tuple(args.objectives))

    def run_all(objectives: list[str], repeats: int) -> dict[str, dict[str, dict[str, float]]]:
        results: dict[str, dict[str, dict[str, float]]] = {}
        for backbone in args.backbones:
            batches = {cl: make_batch(args.batch_size, device, cl) for cl in (False, True)}
            runners = {}
            for name in objectives:
                loss_fn, library, channels_last = fns[name]
                model = build_model(backbone, device, channels_last, library, args.resnet9_width)
                runners[name] = StepRunner(model, loss_fn, *batches[channels_last])
            results[backbone] = measure_interleaved(runners, args.warmup, repeats, not args.no_memory, backbone)
            del runners
        return results

    settings = dict(vars(args), out=str(args.out), objective_config=OBJECTIVE_CONFIG, activation="softplus(0.5)",
                    optimizer="SGD(lr=1e-3, momentum=0.9, weight_decay=5e-4)", input="32x32 RGB, fixed random batch")
    details: dict[str, object] = {"settings": settings, "hardware": _hardware(device)}
    start = time.time()
    if args.layout == "isolated":
        results, details["isolated"] = run_isolated(args)
    else:
        results = run_all(args.objectives, args.repeats)
    keep = ("ms_per_step", "ratio_to_vanilla", "peak_mem_mb", "step_mem_mb", "mem_ratio_to_vanilla",
            "ms_min", "ms_max", "min_ratio_to_vanilla", "cpu_ms_per_step", "cpu_ratio_to_vanilla",
            "ratio_min", "ratio_max", "ratio_spread", "invocations", "best_ratio_to_vanilla", "best_ratio_min",
            "best_ratio_max")
    main_json: dict = {b: {o: {k: round(v, 3) for k, v in r.items() if k in keep} for o, r in rows.items()}
                       for b, rows in results.items()}
    details["results"] = results
    if args.fit:
        main_json["fit"] = details["fit"] = run_fit(args)
    if args.phases:
        details["phases"] = {}
        for backbone in args.backbones:
            x, y = make_batch(args.batch_size, device)
            model = build_model(backbone, device, library_layers=True, width=args.resnet9_width)
            details["phases"][backbone] = phases(model, x, y, args.warmup, args.extra_repeats)
    details["wall_s"] = time.time() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(main_json, indent=2) + "\n")
    args.out.with_name(args.out.stem + "_details.json").write_text(json.dumps(details, indent=2, default=str) + "\n")
    print(markdown_table(results, isolated=args.layout == "isolated"))
    if args.fit:
        fit = main_json["fit"]
        print(f"\ntrain.py fit (default config): vanilla {statistics.median(fit['images_per_s']['vanilla']):.1f} "
              f"images/s, r2et {statistics.median(fit['images_per_s']['r2et']):.1f} images/s: r2et costs "
              f"{fit['r2et_cost_ratio']:.2f}x ({fit['ratio_min']:.2f}-{fit['ratio_max']:.2f})")
    if args.phases:
        print("\nphases (median ms):\n" + json.dumps(details["phases"], indent=1))
    return main_json


if __name__ == "__main__":
    main()

"""The frontier study's stages: pretrain, fine-tunes over each method's sweep (training seeds),
the near settings' extra seeds, evaluation of every model, then the frontier and matched blocks.

Training goes through the project's own pieces: ``RobustClassifier`` (objective, activation swap,
``init_from``) and the project's DataModule, fitted by a ``lightning.Trainer``. Each stage writes
one JSON record under ``<work>/stages/<task>/`` when it is complete (written atomically, after
its checkpoint); a stage whose record (and checkpoint) exists with the same settings is reused,
so an interrupted run continues where it stopped: a stage cut by SIGTERM or SIGINT leaves no
record and is redone (``--force`` redoes everything, ``--redo PATTERN`` the matching stages).

What is chosen, and on which images (nothing on test images): the matched accuracies are
``matched_drops`` points below the seed-mean validation accuracy of ``matched_reference``'s first
setting, and the settings next to them (:func:`near_settings`) come from the validation
accuracies of the first ``seeds`` seeds.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from explanations.evaluation import eps_label, eps_tag
from explanations.files import atomic_write
from explanations.statistics import Curve, matched_bootstrap, rank_correlation
from lightning_modules.classifier import RobustClassifier, load_model_weights

from benchmarks.reproduce.data import build_datamodule, eval_sets
from benchmarks.reproduce.evaluate import accuracy, evaluate_model, sweep_metrics
from benchmarks.reproduce.presets import MATCHED_PAIRS, METHOD_RECIPES, PARAM_SHORT, Preset, TaskConfig, estimate

#: The budget key of the paper-protocol column in the frontier and matched blocks.
PAPER = "paper"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def setting_label(method: str, value: float | None) -> str:
    """``w=0.1``, ``beta=10``, ``step=1``, ``wd=0.005``; ``-`` for a method without a parameter."""
    param = METHOD_RECIPES[method][2]
    return "-" if param is None or value is None else f"{PARAM_SHORT[param]}={_fmt(value)}"


def run_name(method: str, value: float | None, seed: int) -> str:
    """File-system friendly name of one fine-tune, e.g. ``r2et-w=0.1-seed0``."""
    label = setting_label(method, value)
    return f"{method}-seed{seed}" if label == "-" else f"{method}-{label}-seed{seed}"


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(_json_safe(json.loads(json.dumps(data, default=float))), indent=2, allow_nan=False))


def is_sweep(method: str) -> bool:
    """A method whose curve has a swept strength (an anchor has one setting and no parameter)."""
    return METHOD_RECIPES[method][2] is not None


def starts_at_sp(task: TaskConfig, method: str) -> bool:
    """A Softplus method with its own objective (a regularizer or AT): weight 0 is the SP run at
    the task's beta, which then starts its curve (when SP's frontier has that beta)."""
    objective, activation, _ = METHOD_RECIPES[method]
    return (activation == "softplus" and objective != "vanilla"
            and any(v is not None and abs(v - task.softplus_beta) < 1e-12 for v in task.frontier.get("sp", [])))


class Study:
    """One preset on one machine: holds the paths, the cache policy and the logger."""

    def __init__(
        self, preset: Preset, work_dir: str | Path, data_dir: str | None, seed: int = 0, force: bool = False,
        redo: list[str] | None = None, log: Callable[[str], None] = print, weights_file: str | None = None,
    ) -> None:
        self.preset, self.seed, self.force, self.redo = preset, seed, force, list(redo or [])
        self.work = Path(work_dir)
        self.data_dir, self.weights_file = data_dir, weights_file
        self.log = log
        self.accelerator = preset.accelerator
        if self.accelerator == "auto":
            self.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        self.device = torch.device("cuda" if self.accelerator == "gpu" else "cpu")
        self.done = 0  # stages computed in this invocation

    # ------------------------------------------------------------------ cache
    def _stage_path(self, task: str, stage: str) -> Path:
        return self.work / "stages" / task / f"{stage}.json"

    def ckpt_path(self, task: str, run: str) -> Path:
        return self.work / "ckpt" / task / f"{run}.ckpt"

    def _cached(self, task: str, stage: str, fingerprint: str, needs: Path | None = None) -> dict | None:
        """The stage record if it exists, was made with the same settings and its checkpoint is there."""
        path = self._stage_path(task, stage)
        if self.force or any(fnmatch.fnmatch(f"{task}/{stage}", p) for p in self.redo):
            return None
        if not path.is_file() or (needs is not None and not needs.is_file()):
            return None
        record = json.loads(path.read_text())
        if record.get("fingerprint") != fingerprint:
            self.log(f"   {task}/{stage}: record made with other settings, recomputing")
            return None
        return record

    def fingerprints(self, task: TaskConfig) -> dict[str, str]:
        """Hashes of the settings each stage kind depends on (a changed setting invalidates records).

        pretrain: data, model and pretraining budget, seed. finetune: that plus the training
        settings (not the frontier's values, seeds, matched accuracies or evaluation: a new value
        or seed is a new run; old runs stay valid) and the validation split. eval: that plus the
        evaluation settings and the test part of the split.
        """
        cfg = dataclasses.asdict(task)
        pre_keys = ("dataset", "backbone", "backbone_kwargs", "image_size", "train_size", "augment", "batch_size",
                    "pretrain_epochs", "pretrain_lr", "pretrain_weight_decay", "pretrained", "val_size", "split_seed")
        pre = {k: cfg[k] for k in pre_keys}
        pre.update(seed=self.seed, data_dir=str(self.data_dir))
        if task.pretrained:
            pre.update(weights=_file_id(self.weights_file))
        skip = ("eval", "frontier", "seeds", "near_seeds", "matched_drops", "matched_reference", "matched_resamples")
        ft = {"pre": pre, **{k: v for k, v in cfg.items() if k not in skip}}
        ev = {"ft": ft, "eval": cfg["eval"]}
        return {"pretrain": _digest(pre), "finetune": _digest(ft), "eval": _digest(ev)}

    # ------------------------------------------------------------------ training
    def model_kwargs(self, task: TaskConfig, method: str, value: float | None) -> dict[str, Any]:
        """RobustClassifier arguments (without optimizer/init_from) of one run."""
        objective, activation, param = METHOD_RECIPES[method]
        kwargs: dict[str, Any] = dict(
            backbone=task.backbone, backbone_kwargs=dict(task.backbone_kwargs), num_classes=10,
            activation=activation, softplus_beta=task.softplus_beta, objective=objective, k=task.k,
            pool=task.pool, target="loss",
        )
        if param == "weight":
            kwargs["weight"] = float(value)
        elif param == "softplus_beta":
            kwargs["softplus_beta"] = float(value)
        elif param == "at_step":
            kwargs["objective_kwargs"] = {**task.at_kwargs, "step_size": float(value)}
        return kwargs

    def _fit(self, task_name: str, task: TaskConfig, run: str, kwargs: dict[str, Any], *, lr: float,
             weight_decay: float, epochs: int, train_size: int, init_from: Path | None,
             seed: int) -> dict[str, Any]:
        dm = build_datamodule(task, self.data_dir, train_size)
        L.seed_everything(seed, workers=True, verbose=False)
        model = RobustClassifier(
            **kwargs,
            optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay),
            lr_scheduler=functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=max(1, epochs)),
            init_from=None if init_from is None else str(init_from),
        )
        trainer = L.Trainer(
            accelerator=self.accelerator, devices=1, max_epochs=epochs, inference_mode=False,
            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10,
            logger=CSVLogger(str(self.work / "logs" / task_name), name=run),
        )
        wall, cpu = time.perf_counter(), time.process_time()
        trainer.fit(model, datamodule=dm)
        if trainer.interrupted:  # never record a fit that did not finish
            raise KeyboardInterrupt(f"the fit of {run} was interrupted")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        ckpt = self.ckpt_path(task_name, run)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(str(ckpt))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        n = len(dm.train_dataset)
        return {
            "run": run, "train_images": n, "epochs": epochs, "lr": lr, "weight_decay": weight_decay,
            "train_seconds": round(wall, 2), "train_cpu_seconds": round(cpu, 2),
            "ms_per_image_epoch": round(1000 * wall / max(1, n * epochs), 3),
            "train_metrics": metrics, "model_kwargs": kwargs, "checkpoint": str(ckpt),
            "threads": torch.get_num_threads(), "device": self.accelerator, "created": time.time(), "seed": seed,
        }

    def load_net(self, kwargs: dict[str, Any], ckpt: str | Path) -> torch.nn.Module:
        net = RobustClassifier(**kwargs).model
        load_model_weights(net, ckpt)
        return net.to(self.device).eval()

    # ------------------------------------------------------------------ stages
    def stage_plan(self, task_name: str) -> dict[str, Any]:
        """How many stages the task has and how many are already recorded (fine-tunes and
        evaluations of the first ``seeds`` seeds; the near seeds as the upper bound of
        :func:`presets.estimate`), with the cost model's seconds per stage kind."""
        task: TaskConfig = getattr(self.preset, task_name)
        fp = self.fingerprints(task)
        runs = [run_name(m, v, s) for m, values in task.frontier.items() for v in values for s in range(task.seeds)]
        recorded = lambda stage: self._stage_path(task_name, stage).is_file()  # noqa: E731
        est = estimate(task)
        return {
            "pretrain": 1, "finetune": len(runs), "eval": len(runs),
            "near_at_most": int(est["models"]) - len(runs),
            "recorded": sum(recorded(f"finetune/{r}") + recorded(f"eval/{r}") for r in runs) + recorded("pretrain"),
            "estimate_seconds": {k: round(v) for k, v in est.items() if k != "models"}, "fingerprints": fp,
        }

    def run_task(self, task_name: str) -> dict[str, Any]:
        task: TaskConfig = getattr(self.preset, task_name)
        log = self.log
        check_task(task)
        plan = self.stage_plan(task_name)
        est = plan["estimate_seconds"]
        log(f"== {task_name}: {task.backbone} {task.backbone_kwargs}; {plan['finetune']} fine-tunes and {plan['eval']} "
            f"evaluations (+ at most {plan['near_at_most']} of each for the near seeds), {plan['recorded']} stages "
            f"recorded already; cost model: {est['total'] / 3600:.1f} h in all (pretrain {est['pretrain']} s, fine-tunes "
            f"{est['finetune']} s, near seeds {est['near']} s, evaluations {est['eval']} s)")
        sets = eval_sets(task, self.data_dir)
        split = sets["split"]
        result: dict[str, Any] = {"split": {k: v for k, v in split.items() if not k.endswith("_ids")}, "runs": {},
                                  "eval": {}, "estimate_seconds": est}
        fp = self.fingerprints(task)

        def chained(kind: str, parent: dict) -> str:  # a record is stale when its parent was redone
            return _digest({"settings": fp[kind], "parent": parent.get("created")})

        pre = self._pretrain(task_name, task, sets, fp)
        result["pretrain"] = pre
        pre_ckpt = self.ckpt_path(task_name, "pretrain")

        def fine_tune(method: str, value: float | None, seed: int) -> dict[str, Any]:
            run = run_name(method, value, seed)
            stage, ft_fp = f"finetune/{run}", chained("finetune", pre)
            info = self._cached(task_name, stage, ft_fp, self.ckpt_path(task_name, run))
            if info is None:
                _, _, param = METHOD_RECIPES[method]
                log(f"-- fine-tune {run} ({task.finetune_epochs} epoch(s) on {task.finetune_size or task.train_size} images)")
                kwargs = self.model_kwargs(task, method, value)
                info = self._fit(task_name, task, run, kwargs, lr=task.finetune_lr,
                                 weight_decay=float(value) if param == "weight_decay" else 0.0,
                                 epochs=task.finetune_epochs, train_size=task.finetune_size or task.train_size,
                                 init_from=pre_ckpt, seed=self.seed + seed)
                info["sweep"] = sweep_metrics(self.load_net(kwargs, self.ckpt_path(task_name, run)), sets["val_acc"],
                                              None, task.eval, task.k, task.pool, kwargs["activation"] == "relu", 0,
                                              self.device)
                info.update(method=method, param=param, value=value, setting=setting_label(method, value),
                            training_seed=seed, fingerprint=ft_fp)
                write_json(self._stage_path(task_name, stage), info)
                self.done += 1
            log(f"   {run}: val acc {info['sweep']['val_acc']:.4f} ({info['train_seconds']:.0f} s)")
            result["runs"][run] = info
            return info

        # 1. every setting of every method with the first `seeds` training seeds
        for method, values in task.frontier.items():
            for value in values:
                for seed in range(task.seeds):
                    fine_tune(method, value, seed)
        # 2. the matched accuracies and the settings next to them (validation accuracies only)
        result["plan"] = near_settings(task, result["runs"])
        log(f"-- matched accuracies (val): {[round(a, 4) for a in result['plan']['accuracies']]}; near settings: "
            + "; ".join(f"{m}: {[setting_label(m, v) for v in vs]}" for m, vs in result["plan"]["near"].items()))
        for method, values in result["plan"]["near"].items():
            for value in values:
                for seed in range(task.seeds, task.near_seeds):
                    fine_tune(method, value, seed)
        # 3. every model on the test images
        for run, info in result["runs"].items():
            stage, ev_fp = f"eval/{run}", chained("eval", info)
            ev = self._cached(task_name, stage, ev_fp)
            if ev is None:
                log(f"-- evaluate {run}")
                net = self.load_net(info["model_kwargs"], self.ckpt_path(task_name, run))
                wall, cpu = time.perf_counter(), time.process_time()
                ev = evaluate_model(net, sets["test"], sets["test_acc"], task.eval, task.k, task.pool,
                                    info["model_kwargs"]["activation"] == "relu", self.device, log=log,
                                    extras=info["training_seed"] == 0)
                ev["eval_seconds"] = round(time.perf_counter() - wall, 2)
                ev["eval_cpu_seconds"] = round(time.process_time() - cpu, 2)
                ev["fingerprint"] = ev_fp
                write_json(self._stage_path(task_name, stage), ev)
                self.done += 1
            result["eval"][run] = ev
        # 4. the frontier and matched blocks
        result["frontier"] = frontier_block(task, result)
        result["matched"] = matched_block(task, result)
        result["thickness_correlation"] = thickness_correlation(task, result)
        return result

    def _pretrain(self, task_name: str, task: TaskConfig, sets: dict, fp: dict[str, str]) -> dict[str, Any]:
        """The start of every fine-tune: published weights adapted by a vanilla fit, or a model
        trained from scratch (ReLU, with weight decay), once."""
        log = self.log
        pre_ckpt = self.ckpt_path(task_name, "pretrain")
        pre = self._cached(task_name, "pretrain", fp["pretrain"], pre_ckpt)
        if pre is None:
            pre_kwargs = self.model_kwargs(task, "vanilla", None)
            published: dict[str, Any] = {}
            if task.pretrained:
                weights = self.weights_file
                if not weights or not Path(weights).is_file():
                    raise FileNotFoundError(
                        f"the {task_name} task adapts published weights (pretrained: true) but the weights file "
                        f"{weights!r} does not exist; pass --weights-file (see ../shared/weights/README.md)")
                start = RobustClassifier(**pre_kwargs, weights_file=str(weights)).model.to(self.device).eval()
                published = {"weights_file": str(weights), "test_acc": accuracy(start, sets["test_acc"], self.device),
                             "val_acc": accuracy(start, sets["val_acc"], self.device), "test_size": len(sets["test_acc"])}
                log(f"-- adapt the published weights: test acc {published['test_acc']:.4f} before "
                    f"({task.pretrain_epochs} epoch(s) on {task.train_size} images)")
                fit_kwargs = {**pre_kwargs, "weights_file": str(weights)}
            else:
                log(f"-- pretrain ({task.pretrain_epochs} epochs on {task.train_size} images)")
                fit_kwargs = pre_kwargs
            pre = self._fit(task_name, task, "pretrain", fit_kwargs, lr=task.pretrain_lr,
                            weight_decay=task.pretrain_weight_decay, epochs=task.pretrain_epochs,
                            train_size=task.train_size, init_from=None, seed=self.seed)
            pre["model_kwargs"], pre["published"] = pre_kwargs, published
            net = self.load_net(pre_kwargs, pre_ckpt)
            pre["test_acc"], pre["test_size"] = accuracy(net, sets["test_acc"], self.device), len(sets["test_acc"])
            pre["sweep"] = sweep_metrics(net, sets["val_acc"], None, task.eval, task.k, task.pool, True, 0, self.device)
            # what the activation swap alone does to the start (documents the beta choice)
            pre["swap_val_acc"] = {
                str(beta): accuracy(self.load_net({**pre_kwargs, "activation": "softplus", "softplus_beta": beta}, pre_ckpt),
                                    sets["val_acc"], self.device)
                for beta in sorted({2.0, 5.0, 10.0, float(task.softplus_beta)})
            }
            pre["fingerprint"] = fp["pretrain"]
            write_json(self._stage_path(task_name, "pretrain"), pre)
            self.done += 1
        log(f"   pretrain: val acc {pre['sweep']['val_acc']:.4f}, test acc {pre['test_acc']:.4f} ({pre['train_seconds']:.0f} s)")
        return pre


# ---------------------------------------------------------------------------------- analysis
def _settings(task: TaskConfig, method: str) -> list[tuple[str, float | None]]:
    """The points of a method's curve in order of strength: (method, value), starting with the
    SP run at the task's beta for the Softplus regularizers and AT (weight 0)."""
    start = [("sp", task.softplus_beta)] if starts_at_sp(task, method) else []
    return start + [(method, v) for v in task.frontier[method]]


def _by_setting(runs: dict[str, dict], method: str, value: float | None) -> dict[int, dict]:
    return {info["training_seed"]: info for info in runs.values()
            if info["method"] == method and info["setting"] == setting_label(method, value)}


def near_settings(task: TaskConfig, runs: dict[str, dict]) -> dict[str, Any]:
    """The matched accuracies and the settings next to them, from validation accuracies only.

    Reference: the seed-mean val accuracy of ``matched_reference``'s first setting; the matched
    accuracies are ``matched_drops`` points below it. For each swept method, the seed-mean curve
    of its settings (first ``seeds`` seeds; for a regularizer or AT, starting at the SP run) is
    followed from the weakest setting; at each matched accuracy the two settings of the first
    bracketing segment are *near* (``near``: method -> values of its own settings). Anchors are
    near themselves (they are compared at their own accuracy), and so is every setting of a
    *short* curve, one that brackets fewer than two matched accuracies (or none, with one matched
    accuracy) (``short``): it is also
    compared at each of its own settings' accuracies.
    """
    ref_method = task.matched_reference
    if ref_method not in task.frontier:
        return {"reference": None, "accuracies": [], "near": {}}
    ref = [i["sweep"]["val_acc"] for s, i in _by_setting(runs, ref_method, task.frontier[ref_method][0]).items()
           if s < task.seeds]
    reference = sum(ref) / len(ref)
    accuracies = [reference - d / 100.0 for d in task.matched_drops]
    near: dict[str, list] = {}
    short: list[str] = []
    for method in task.frontier:
        if not is_sweep(method) or len(task.frontier[method]) == 1 and not starts_at_sp(task, method):
            near[method] = list(task.frontier[method])
            continue
        points = _settings(task, method)
        accs = []
        for m, v in points:
            first = [i["sweep"]["val_acc"] for s, i in _by_setting(runs, m, v).items() if s < task.seeds]
            accs.append(sum(first) / len(first))
        chosen: list = []
        reached = 0
        for a in accuracies:
            for j in range(len(points) - 1):
                if min(accs[j], accs[j + 1]) <= a <= max(accs[j], accs[j + 1]):
                    chosen += [points[j], points[j + 1]]
                    reached += 1
                    break
        if reached < min(2, len(accuracies)):
            short.append(method)
            chosen += [(method, v) for v in task.frontier[method]]
        own = [v for m, v in points if m == method and (m, v) in chosen]
        if own:
            near[method] = own
        if any(m == "sp" and m != method for m, _ in chosen):  # the shared start: SP's run
            near.setdefault("sp", [])
            if task.softplus_beta not in near["sp"]:
                near["sp"].append(task.softplus_beta)
    return {"reference_method": ref_method, "reference": reference, "accuracies": accuracies,
            "drops_points": list(task.matched_drops), "near": near, "short": short}


def budgets(task: TaskConfig) -> list[str]:
    """The budget keys of the frontier and matched blocks: ``1/255`` ... and ``paper``."""
    return [eps_label(e) for e in sorted(task.eval.eps_list)] + ([PAPER] if task.eval.paper_size else [])


def _per_image(ev: dict, budget: str) -> list[float]:
    if budget == PAPER:
        return ev["per_image"]["paper"]
    return ev["per_image"][f"worst/{eps_tag(_eps_of(budget))}"]


def _eps_of(label: str) -> float:
    return float(label.split("/")[0]) / 255.0


def frontier_block(task: TaskConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Per method, per setting (label), per training seed: ``setting``, ``val_acc``,
    ``test_acc``, ``p_at_k_worst`` (by budget ``1/255`` ...), ``p_at_k_paper`` and the run, its
    thickness and training cost; per method also ``param`` and ``order`` (settings weakest first;
    ``start``: the SP setting a regularizer's curve starts at, when it does)."""
    out: dict[str, Any] = {}
    for method, values in task.frontier.items():
        block: dict[str, Any] = {"param": METHOD_RECIPES[method][2], "order": [setting_label(method, v) for v in values],
                                 "start": f"sp {setting_label('sp', task.softplus_beta)}" if starts_at_sp(task, method) else None,
                                 "settings": {}}
        for value in values:
            seeds = {}
            for seed, info in sorted(_by_setting(result["runs"], method, value).items()):
                ev = result["eval"][info["run"]]
                seeds[str(seed)] = {
                    "setting": value, "run": info["run"], "val_acc": info["sweep"]["val_acc"], "test_acc": ev["test_acc"],
                    "p_at_k_worst": {eps_label(_eps_of(b)): ev["p_at_k"]["worst"][eps_tag(_eps_of(b))]["mean"]
                                     for b in budgets(task) if b != PAPER},
                    "p_at_k_paper": (ev.get("paper") or {}).get("p_at_k", {}).get("mean"),
                    "paper_stopped_by_flip": (ev.get("paper") or {}).get("stopped_by_flip", {}).get("mean"),
                    "thickness_boundary": (ev.get("thickness_boundary") or {}).get("mean"),
                    "thickness_all_pairs": (ev.get("thickness_all_pairs") or {}).get("mean"),
                    "train_seconds": info["train_seconds"], "train_cpu_seconds": info["train_cpu_seconds"],
                    # AT's training attack, mean over the last epoch's batches (pixel units)
                    "attack_l2": info["train_metrics"].get("train/attack_l2_epoch"),
                    "attack_linf": info["train_metrics"].get("train/attack_linf_epoch"),
                    "attack_flipped": info["train_metrics"].get("train/attack_flipped_epoch"),
                }
            block["settings"][setting_label(method, value)] = seeds
        out[method] = block
    return out


def curve(task: TaskConfig, result: dict[str, Any], method: str, budget: str, only: float | None = None) -> Curve:
    """A method's :class:`Curve` at one budget: val accuracies and per-image test P@k per setting
    (strength order, SP's run first for a regularizer or AT) and training seed; ``only``: just
    that value's setting (a one-setting curve, compared at its own accuracy)."""
    accs, vals, keys = [], [], []
    points = _settings(task, method) if only is None else [(method, only)]
    for m, v in points:
        seeds = _by_setting(result["runs"], m, v)
        accs.append({s: i["sweep"]["val_acc"] for s, i in seeds.items()})
        vals.append({s: _per_image(result["eval"][i["run"]], budget) for s, i in seeds.items()})
        keys.append(f"{m} {setting_label(m, v)}")  # the SP start is the same runs in every curve
    return Curve(accs, vals, keys)


def matched_block(task: TaskConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Per pair ``a_vs_b`` (``MATCHED_PAIRS`` whose methods are both in the frontier) and budget: a
    list of rows at the matched accuracies (an anchor b: one row at b's own accuracy; a short
    curve b, see :func:`near_settings`: also one row at each of its settings' own accuracies,
    ``at_setting``) with ``accuracy``, ``paired_diff`` (a - b), ``ci_low``, ``ci_high``,
    ``seeds_agree`` and the rest of :class:`explanations.statistics.MatchedDiff`; accuracies a
    curve does not reach are listed under ``out_of_range``."""
    out: dict[str, Any] = {}
    plan = result["plan"]
    ids = None
    for run, ev in result["eval"].items():
        if ids is None:
            ids, settings = ev["ids"], ev["protocol"]["settings"]
        elif ev["ids"] != ids or ev["protocol"]["settings"] != settings:
            raise ValueError(f"the evaluation of {run} was made on other images or with other protocol settings; "
                             "rerun the stale eval stages (--redo 'TASK/eval/*')")
    for a, b in MATCHED_PAIRS:
        if a not in task.frontier or b not in task.frontier or not is_sweep(a):
            continue
        anchor = not is_sweep(b) or (len(task.frontier[b]) == 1 and not starts_at_sp(task, b))
        pair: dict[str, Any] = {"a": a, "b": b, "anchor": anchor, "by_budget": {}}
        for i, budget in enumerate(budgets(task)):
            ca, cb = curve(task, result, a, budget), curve(task, result, b, budget)
            rows, missing = [], []
            targets = [None] if anchor else plan["accuracies"]
            for target in targets:
                res = matched_bootstrap(ca, cb, target, resamples=task.matched_resamples, seed=i)
                if res is None:
                    missing.append(target)
                    continue
                rows.append({**res.as_dict(), "at_setting": setting_label(b, task.frontier[b][0]) if anchor else None})
            if not anchor and b in plan.get("short", []):
                for value in task.frontier[b]:
                    res = matched_bootstrap(ca, curve(task, result, b, budget, only=value), None,
                                            resamples=task.matched_resamples, seed=i)
                    label = setting_label(b, value)
                    if res is None:
                        missing.append(label)
                        continue
                    rows.append({**res.as_dict(), "at_setting": label})
            pair["by_budget"][budget] = {"rows": rows, "out_of_range": missing}
        out[f"{a}_vs_{b}"] = pair
    return out


def thickness_correlation(task: TaskConfig, result: dict[str, Any]) -> dict[str, Any]:
    """Spearman rank correlation across every evaluated model (each training seed of each setting
    is one model) of its mean boundary / all-pairs thickness at ``eval.eps`` and its mean
    worst-case P@k at that budget."""
    head = eps_tag(task.eval.eps)
    evs = [ev for ev in result["eval"].values() if "thickness_boundary" in ev]
    pk = [ev["p_at_k"]["worst"][head]["mean"] for ev in evs]
    return {"models": len(evs), "eps": eps_label(task.eval.eps),
            **{pairs: rank_correlation([ev[f"thickness_{pairs}"]["mean"] for ev in evs], pk)
               for pairs in ("boundary", "all_pairs")}}


def check_task(task: TaskConfig) -> None:
    """Refuse settings the study cannot honour, before any work (names the value and what is valid)."""
    if not any(abs(task.eval.eps - e) < 1e-12 for e in task.eval.eps_list):
        raise ValueError(f"eval.eps={task.eval.eps!r} (the thickness budget) must be one of eval.eps_list={list(task.eval.eps_list)}")
    unknown = sorted(set(task.frontier) - set(METHOD_RECIPES))
    if unknown:
        raise ValueError(f"frontier methods {unknown} are not known; valid: {sorted(METHOD_RECIPES)}")
    for method, values in task.frontier.items():
        param = METHOD_RECIPES[method][2]
        if not values:
            raise ValueError(f"frontier.{method} is empty: give at least one value (null for vanilla)")
        if param is None and values != [None]:
            raise ValueError(f"frontier.{method}={values!r}: {method} has no swept parameter; use [null]")
        if param is not None and any(not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0 for v in values):
            raise ValueError(f"frontier.{method}={values!r}: its {param} values must be positive numbers, weakest first")
        if len(set(values)) != len(values):
            raise ValueError(f"frontier.{method}={values!r} lists a value twice")
    if not 1 <= task.seeds <= task.near_seeds:
        raise ValueError(f"seeds={task.seeds} and near_seeds={task.near_seeds} must satisfy 1 <= seeds <= near_seeds")
    if task.matched_reference not in task.frontier:
        raise ValueError(f"matched_reference={task.matched_reference!r} is not in the frontier {sorted(task.frontier)}")
    if any(not isinstance(d, (int, float)) or d < 0 for d in task.matched_drops):
        raise ValueError(f"matched_drops={task.matched_drops!r} must be non-negative accuracy drops in points")


def _json_safe(data: Any) -> Any:
    """NaN / inf floats as null, so the files are strict JSON."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_json_safe(v) for v in data]
    return data


def _file_id(path: str | None) -> str | None:
    """A weights file's identity for the cache: path and size (a replaced file invalidates the stage)."""
    if not path:
        return None
    p = Path(path)
    return f"{p.resolve()}:{p.stat().st_size}" if p.is_file() else str(p)


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

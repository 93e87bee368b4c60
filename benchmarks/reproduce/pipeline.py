"""The study's stages: pretrain, fine-tune sweep, selection, evaluation (resumable).

Training goes through the project's own pieces: ``RobustClassifier`` (objective, activation swap,
``init_from``) and the project's DataModules, fitted by a ``lightning.Trainer``. Each stage writes
a JSON file under ``<work>/stages/<task>/``; a stage whose JSON (and checkpoint) exists is skipped,
so a crashed run continues where it stopped (``--force`` redoes everything, ``--redo PATTERN``
the matching stages).
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

from explanations.evaluation import eps_tag
from explanations.files import atomic_write
from lightning_modules.classifier import RobustClassifier, load_model_weights

from benchmarks.reproduce.data import build_datamodule, eval_sets
from benchmarks.reproduce.evaluate import accuracy, evaluate_model, sweep_metrics
from benchmarks.reproduce.presets import METHOD_RECIPES, Preset, TaskConfig


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def run_name(method: str, param: str | None, value: float | None) -> str:
    """File-system friendly name of one fine-tune, e.g. ``r2et-weight=0.1``."""
    if param is None or value is None:
        return method
    return f"{method}-{param}={_fmt(value)}"


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(_json_safe(json.loads(json.dumps(data, default=float))), indent=2, allow_nan=False))


class Study:
    """One preset on one machine: holds the paths, the cache policy and the logger."""

    def __init__(
        self, preset: Preset, work_dir: str | Path, data_dirs: dict[str, str | None], seed: int = 0,
        force: bool = False, redo: list[str] | None = None, log: Callable[[str], None] = print,
        weights_files: dict[str, str | None] | None = None,
    ) -> None:
        self.preset, self.seed, self.force, self.redo = preset, seed, force, list(redo or [])
        self.work = Path(work_dir)
        self.data_dirs = data_dirs
        self.weights_files = dict(weights_files or {})
        self.log = log
        self.accelerator = preset.accelerator
        if self.accelerator == "auto":
            self.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
        self.device = torch.device("cuda" if self.accelerator == "gpu" else "cpu")

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

        pretrain: data, model and pretraining budget, seed. finetune: that plus every task field
        except the method list, grids, defaults, inheritance and floor (a new grid value is a new
        run; old runs stay valid), plus the evaluation fields the sweep uses. eval: that plus the
        evaluation settings.
        """
        cfg = dataclasses.asdict(task)
        pre_keys = ("dataset", "backbone", "backbone_kwargs", "image_size", "train_size", "val_fraction",
                    "augment", "batch_size", "val_size", "pretrain_epochs", "pretrain_lr", "pretrain_weight_decay",
                    "pretrained")
        pre = {k: cfg[k] for k in pre_keys}
        pre.update(seed=self.seed, data_dir=str(self.data_dirs.get(task.dataset)))
        if task.pretrained:
            pre.update(pretrained=True, weights=_file_id(self.weights_files.get(task.dataset)))
        skip = ("eval", "methods", "grids", "defaults", "inherit", "accuracy_floor", "seed_methods", "seeds", "val_sweep")
        ft = {"pre": pre, **{k: v for k, v in cfg.items() if k not in skip}}
        ft["sweep_eval"] = {k: cfg["eval"][k] for k in ("eps", "relu_surrogate", "surrogate_beta", "seed", "batch_size")}
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
        if param == "weight" and value is not None:
            kwargs["weight"] = float(value)
        elif param == "softplus_beta" and value is not None:
            kwargs["softplus_beta"] = float(value)
        elif param == "at_eps":
            at = {"eps": float(value if value is not None else task.eval.eps), "steps": task.at_steps}
            at.update(task.at_kwargs)
            if value is not None:
                at["eps"] = float(value)
            kwargs["objective_kwargs"] = at
        return kwargs

    def _fit(self, task_name: str, task: TaskConfig, run: str, kwargs: dict[str, Any], *, lr: float,
             weight_decay: float, epochs: int, train_size: int, init_from: Path | None,
             seed: int | None = None) -> dict[str, Any]:
        data_dir = self.data_dirs[task.dataset]
        dm = build_datamodule(task, data_dir, train_size)
        seed = self.seed if seed is None else seed
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
            "threads": torch.get_num_threads(), "device": self.accelerator, "created": time.time(),
            "seed": seed,
        }

    def _fine_tune(self, task_name: str, task: TaskConfig, sets: dict, run: str, stage: str, kwargs: dict[str, Any],
                   init_from: Path, *, weight_decay: float, epochs: int, record: dict[str, Any],
                   seed: int | None = None, score_attack: bool = True) -> dict[str, Any]:
        """One fine-tune stage from ``init_from`` on the task's fine-tuning images: fit, score on the
        validation split (accuracy, and val P@k under the sweep's ERAttack when ``score_attack``),
        add ``record`` and write the stage record."""
        info = self._fit(task_name, task, run, kwargs, lr=task.finetune_lr, weight_decay=weight_decay, epochs=epochs,
                         train_size=task.finetune_size or task.train_size, init_from=init_from, seed=seed)
        info["sweep"] = sweep_metrics(
            self.load_net(kwargs, self.ckpt_path(task_name, run)), sets["val_acc"],
            sets["val_attack"] if score_attack else None, task.eval, task.k, task.pool,
            kwargs["activation"] == "relu", task.sweep_attack_steps if score_attack else 0, self.device,
        )
        info.update(record)
        write_json(self._stage_path(task_name, stage), info)
        return info

    def load_net(self, kwargs: dict[str, Any], ckpt: str | Path) -> torch.nn.Module:
        net = RobustClassifier(**kwargs).model
        load_model_weights(net, ckpt)
        return net.to(self.device).eval()

    # ------------------------------------------------------------------ stages
    def run_task(self, task_name: str) -> dict[str, Any]:
        task: TaskConfig = getattr(self.preset, task_name)
        log = self.log
        log(f"== {task_name}: {task.backbone} {task.backbone_kwargs} at {task.image_size} px, methods {list(task.methods)}")
        check_task(task)
        sets = eval_sets(task, self.data_dirs[task.dataset])
        result: dict[str, Any] = {"runs": {}, "selection": {}, "eval": {}}
        fp = self.fingerprints(task)

        def chained(kind: str, parent: dict) -> str:  # a record is stale when its parent was redone
            return _digest({"settings": fp[kind], "parent": parent.get("created")})

        # 1. vanilla pretraining (ReLU, with weight decay), once
        pre_ckpt = self.ckpt_path(task_name, "pretrain")
        pre = self._cached(task_name, "pretrain", fp["pretrain"], pre_ckpt)
        if pre is None:
            pre_kwargs = self.model_kwargs(task, "vanilla", None)
            published: dict[str, Any] = {}
            if task.pretrained:
                weights = self.weights_files.get(task.dataset)
                if not weights or not Path(weights).is_file():
                    raise FileNotFoundError(
                        f"the {task_name} task adapts published weights (pretrained: true) but the weights file "
                        f"{weights!r} does not exist; pass --weights-file (see ../shared/weights/README.md)")
                start = RobustClassifier(**pre_kwargs, weights_file=str(weights)).model.to(self.device).eval()
                published = {"weights_file": str(weights), "test_acc": accuracy(start, sets["test_acc"], self.device),
                             "val_acc": accuracy(start, sets["val_acc"], self.device), "test_size": len(sets["test_acc"])}
                log(f"-- adapt the published weights: test acc {published['test_acc']:.4f} before "
                    f"({task.pretrain_epochs} epoch(s) on {task.train_size} images)")
                pre_kwargs_fit = {**pre_kwargs, "weights_file": str(weights)}
            else:
                log(f"-- pretrain ({task.pretrain_epochs} epochs on {task.train_size} images)")
                pre_kwargs_fit = pre_kwargs
            pre = self._fit(
                task_name, task, "pretrain", pre_kwargs_fit,
                lr=task.pretrain_lr, weight_decay=task.pretrain_weight_decay, epochs=task.pretrain_epochs,
                train_size=task.train_size, init_from=None,
            )
            pre["model_kwargs"] = pre_kwargs
            pre["published"] = published
            net = self.load_net(pre["model_kwargs"], pre_ckpt)
            pre["test_acc"] = accuracy(net, sets["test_acc"], self.device)
            pre["test_size"] = len(sets["test_acc"])
            pre["sweep"] = sweep_metrics(net, sets["val_acc"], None, task.eval, task.k, task.pool, True, 0, self.device)
            # what the activation swap alone does to the pretrained weights (documents the beta choice)
            pre["swap_val_acc"] = {
                str(beta): accuracy(self.load_net({**pre["model_kwargs"], "activation": "softplus", "softplus_beta": beta}, pre_ckpt), sets["val_acc"], self.device)
                for beta in sorted({2.0, 5.0, 10.0, float(task.softplus_beta)})
            }
            pre["fingerprint"] = fp["pretrain"]
            write_json(self._stage_path(task_name, "pretrain"), pre)
        log(f"   pretrain: {pre['train_seconds']:.0f} s, val acc {pre['sweep']['val_acc']:.3f}, test acc {pre.get('test_acc', float('nan')):.4f}")
        result["pretrain"] = pre

        # 2. fine-tunes: every grid point, vanilla first (the accuracy floor), inheritors last
        order = [m for m in task.methods if m == "vanilla"] + [
            m for m in task.methods if m != "vanilla" and m not in task.inherit
        ] + [m for m in task.methods if m in task.inherit]
        floor = None
        for method in order:
            _, _, param = METHOD_RECIPES[method]
            if method in task.grids:
                grid, source = list(task.grids[method]), "sweep"
            elif method in task.inherit:
                parent = task.inherit[method]
                grid, source = [result["selection"][parent]["value"]], f"inherited from {parent}"
            elif method in task.defaults:
                grid, source = [task.defaults[method]], "fixed"
            else:
                grid, source = [None], "fixed"
            if param is None:
                grid = [None]
            points = []
            for value in grid:
                run = run_name(method, param, value)
                ckpt = self.ckpt_path(task_name, run)
                stage = f"finetune/{run}"
                ft_fp = chained("finetune", pre)
                info = self._cached(task_name, stage, ft_fp, ckpt)
                if info is None:
                    log(f"-- fine-tune {run} ({task.finetune_epochs} epoch(s) on {task.finetune_size or task.train_size} images)")
                    info = self._fine_tune(
                        task_name, task, sets, run, stage, self.model_kwargs(task, method, value), pre_ckpt,
                        weight_decay=float(value) if param == "weight_decay" else 0.0, epochs=task.finetune_epochs,
                        record=dict(method=method, param=param, value=value, fingerprint=ft_fp),
                    )
                sw = info["sweep"]
                pk = sw.get("val_p_at_k", {}).get("mean")
                log(f"   {run}: {info['train_seconds']:.0f} s, val acc {sw['val_acc']:.3f}" + ("" if pk is None else f", val P@k {pk:.3f}"))
                result["runs"][run] = info
                points.append(info)
            if method == "vanilla":
                floor = points[0]["sweep"]["val_acc"] - task.accuracy_floor / 100.0
            chosen, note = select(points, floor)
            result["selection"][method] = {
                "run": chosen["run"], "param": param, "value": chosen["value"], "source": source,
                "note": note, "floor": floor, "points": [p["run"] for p in points],
            }

        # 3. training seeds of the selected settings (same images, same budget, another seed)
        result["seed_runs"] = {}
        for method in task.methods:
            sel = result["selection"][method]
            runs = {0: sel["run"]}
            if method in task.seed_methods:
                base = result["runs"][sel["run"]]
                for seed in range(1, task.seeds):
                    run = f"{sel['run']}-seed{seed}"
                    stage = f"finetune/{run}"
                    ft_fp = chained("finetune", pre)
                    info = self._cached(task_name, stage, ft_fp, self.ckpt_path(task_name, run))
                    if info is None:
                        log(f"-- fine-tune {run} (training seed {self.seed + seed})")
                        info = self._fine_tune(
                            task_name, task, sets, run, stage, base["model_kwargs"], pre_ckpt,
                            weight_decay=base["weight_decay"], epochs=task.finetune_epochs, seed=self.seed + seed,
                            score_attack=False,
                            record=dict(method=method, param=base.get("param"), value=base.get("value"), fingerprint=ft_fp),
                        )
                    result["runs"][run] = info
                    runs[seed] = run
            result["seed_runs"][method] = {str(k): v for k, v in runs.items()}

        # 4. evaluation of each selected model (every seed) on the fixed test subset
        result["seed_eval"] = {}
        for method in task.methods:
            result["seed_eval"][method] = {}
            for seed, run in result["seed_runs"][method].items():
                info = result["runs"][run]
                extras = seed == "0"
                stage = f"eval/{run}"
                ev_fp = chained("eval", info)
                ev = self._cached(task_name, stage, ev_fp)
                if ev is None:
                    log(f"-- evaluate {run}" + ("" if extras else " (main block)"))
                    net = self.load_net(info["model_kwargs"], self.ckpt_path(task_name, run))
                    wall, cpu = time.perf_counter(), time.process_time()
                    ev = evaluate_model(
                        net, sets["test"], sets["test_acc"], task.eval, task.k, task.pool,
                        info["model_kwargs"]["activation"] == "relu", self.device, log=log, extras=extras,
                    )
                    ev["eval_seconds"] = round(time.perf_counter() - wall, 2)
                    ev["eval_cpu_seconds"] = round(time.process_time() - cpu, 2)
                    ev["fingerprint"] = ev_fp
                    write_json(self._stage_path(task_name, stage), ev)
                result["seed_eval"][method][seed] = ev
            result["eval"][method] = result["seed_eval"][method]["0"]
        result["comparisons"] = comparisons(task, result)

        # 5. the validation-only sweep (why R2ET does or does not beat its controls)
        result["val_sweep"] = {}
        for variant in task.val_sweep:
            name, method, changes = variant["name"], variant["method"], dict(variant.get("set") or {})
            _, _, param = METHOD_RECIPES[method]
            value = changes.pop("weight", "selected") if param == "weight" else None
            if value == "selected":
                value = result["selection"][method]["value"]
            if param == "softplus_beta":
                value = changes.pop("softplus_beta", result["selection"][method]["value"])
            epochs = int(changes.pop("epochs", task.finetune_epochs))
            kwargs = self.model_kwargs(task, method, value)
            kwargs.update(changes)
            run = f"valsweep-{name}"
            stage = f"valsweep/{name}"
            ft_fp = _digest({"parent": chained("finetune", pre), "variant": variant, "resolved": [value, epochs]})
            info = self._cached(task_name, stage, ft_fp, self.ckpt_path(task_name, run))
            if info is None:
                log(f"-- validation sweep {name}: {method}, {param}={value}, {epochs} epoch(s), {changes}")
                info = self._fine_tune(
                    task_name, task, sets, run, stage, kwargs, pre_ckpt, weight_decay=0.0, epochs=epochs,
                    record=dict(method=method, param=param, value=value, variant=variant, fingerprint=ft_fp),
                )
            sw = info["sweep"]
            pk = sw.get("val_p_at_k", {}).get("mean")
            log(f"   {name}: val acc {sw['val_acc']:.3f}" + ("" if pk is None else f", val P@k {pk:.3f}"))
            result["val_sweep"][name] = info
        return result


#: The study's comparisons: R2ET against each of these (paired over the same test images).
COMPARED = ("vanilla", "wd", "sp", "est_h", "grad_norm", "at", "r2et_noh", "r2et_mm")


def comparisons(task: TaskConfig, result: dict[str, Any], reference: str = "r2et") -> dict[str, Any]:
    """Paired per-image differences of worst-case P@k, reference minus each other method.

    For every training seed s of the reference, its per-image worst-case P@k is paired with the
    other method's seed s (its seed 0 when it has no seed s) on the same images, with a bootstrap
    interval over images per seed (``seeds``; ``stats.paired_bootstrap``). ``seeds_agree``: every
    seed's interval excludes zero on the same side. ``paired_diff`` / ``ci_low`` / ``ci_high``: the
    seed-averaged per-image difference and its 95% bootstrap interval. Headline budget
    ``task.eval.eps``; every budget in ``by_eps``. Refuses records made on other images or with
    other protocol settings.
    """
    from explanations.statistics import paired_bootstrap, seeds_agree

    evals = result.get("seed_eval", {})
    if reference not in evals:
        return {}
    headline = eps_tag(task.eval.eps)
    ref_ids = evals[reference]["0"]["ids"]
    out: dict[str, Any] = {}
    for other in COMPARED:
        if other not in evals:
            continue
        pairs = []  # (seed, reference eval, other eval, other's seed)
        for seed, ev in sorted(evals[reference].items(), key=lambda item: int(item[0])):
            o_seed = seed if seed in evals[other] else "0"
            ev_o = evals[other][o_seed]
            for e in (ev, ev_o):
                if e["ids"] != ref_ids or e["protocol"]["settings"] != evals[reference]["0"]["protocol"]["settings"]:
                    raise ValueError(f"comparison {reference} vs {other}: the evaluations were made on other images or "
                                     "with other protocol settings; rerun the stale eval stages (--redo 'TASK/eval/*')")
            pairs.append((seed, ev, ev_o, o_seed))
        per_eps: dict[str, Any] = {}
        for key in evals[reference]["0"]["per_image"]:
            if not key.startswith("worst/"):
                continue
            diffs, rows = [], []
            for seed, ev, ev_o, o_seed in pairs:
                d = paired_bootstrap(ev["per_image"][key], ev_o["per_image"][key], seed=int(seed))
                diffs.append(d)
                rows.append({"seed": int(seed), "other_seed": int(o_seed), **d.as_dict(),
                             "test_acc_diff": ev["test_acc"] - ev_o["test_acc"]})
            # the interval of the seed-averaged per-image difference (one resample of images for all seeds)
            mean_a = torch.tensor([e["per_image"][key] for _, e, _, _ in pairs], dtype=torch.float64).mean(0)
            mean_b = torch.tensor([e["per_image"][key] for _, _, e, _ in pairs], dtype=torch.float64).mean(0)
            pooled = paired_bootstrap(mean_a, mean_b, seed=0)
            per_eps[key.split("/", 1)[1]] = {
                "paired_diff": pooled.paired_diff, "ci_low": pooled.ci_low, "ci_high": pooled.ci_high,
                "seeds_agree": seeds_agree(diffs), "seeds": rows,
            }
        block = dict(per_eps[headline])
        block.update(reference=reference, other=other, eps=task.eval.eps, by_eps=per_eps,
                     n_seeds=len(evals[reference]), other_seeds=len(evals[other]))
        out[other] = block
    return out


def check_task(task: TaskConfig) -> None:
    """Refuse settings the study cannot honour, before any work (names the value and what is valid)."""
    if not any(abs(task.eval.eps - e) < 1e-12 for e in task.eval.eps_list):
        raise ValueError(f"eval.eps={task.eval.eps!r} (the headline budget) must be one of eval.eps_list={list(task.eval.eps_list)}")
    unknown = sorted(set(task.seed_methods) - set(task.methods))
    if unknown:
        raise ValueError(f"seed_methods {unknown} are not in methods={list(task.methods)}")
    for variant in task.val_sweep:
        name, method = variant.get("name"), variant.get("method")
        if not name or method not in METHOD_RECIPES:
            raise ValueError(f"val_sweep variant {variant!r} needs a name and a method in {sorted(METHOD_RECIPES)}")
        if method not in task.methods:
            raise ValueError(f"val_sweep variant {name!r}: method {method!r} is not in methods={list(task.methods)}")
        param = METHOD_RECIPES[method][2]
        if param not in (None, "weight", "softplus_beta"):
            raise ValueError(f"val_sweep variant {name!r}: method {method!r} (swept by {param}) is not supported; "
                             "valid: methods with a regularizer weight, sp, vanilla")
        unknown = sorted(set(variant.get("set") or {}) - {"weight", "softplus_beta", "k", "pair_set", "epochs"})
        if unknown:
            raise ValueError(f"val_sweep variant {name!r}: unknown keys {unknown}; valid: weight, softplus_beta, k, pair_set, epochs")


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


def select(points: list[dict[str, Any]], floor: float | None) -> tuple[dict[str, Any], str]:
    """The sweep point with the best val P@k among those at or above the accuracy floor."""
    if len(points) == 1:
        return points[0], "single value"
    ok = [p for p in points if floor is None or p["sweep"]["val_acc"] >= floor - 1e-12]
    if not ok:
        best = max(points, key=lambda p: p["sweep"]["val_acc"])
        return best, "no value met the accuracy floor: the most accurate one is used"
    best = max(ok, key=lambda p: (p["sweep"].get("val_p_at_k", {}).get("mean", float("-inf")), p["sweep"]["val_acc"]))
    return best, f"best val P@k of {len(ok)}/{len(points)} values above the floor"

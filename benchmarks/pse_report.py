"""Promotion-suppression analysis of a trained checkpoint, written to a folder.

    python benchmarks/pse_report.py --ckpt logs/.../last.ckpt --out pse_report \\
        -c configs/default.yaml [--split test] [--num-samples 256] [--eps 0.0313] [--norm l2] ...

Writes ``<out>/pse_<split>.json`` (settings and every number the PSEAnalysis callback logs, without
the ``pse/`` prefix) and ``<out>/pse_<split>.png`` (example perturbations per category). The data
comes from the ``data:`` section of the config files (later files win). Every field of
``explanations.pse.PSESettings`` is a flag (``--target-rule least_likely``, ``--cutoffs 0.25 0.75``,
``--cam-layer backbone.layer4``, ...). Definitions: docs/pse.md.

The attack budget defaults to the ``callbacks.PSEAnalysis`` settings of the config files (e.g.
configs/default.yaml: eps 32/255, 10 steps, for the saturated synthetic glyphs), else to
``PSESettings`` (8/255); flags win. When every targeted attack fails, a hint says how to raise the
budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.pse_analysis import analyze_checkpoint  # noqa: E402
from explanations.pse import CATEGORIES, PSESettings  # noqa: E402


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    return lambda text: None if text.lower() in ("none", "null") else kind(text)


HELP = {
    "eps": "targeted PGD budget (pixel units; l_inf radius, or the l2 radius with --norm l2)",
    "steps": "PGD iterations",
    "step_size": "PGD step (null: 2.5 eps / steps)",
    "norm": "threat model: linf or l2",
    "target_rule": "target class: random (seeded per image), least_likely or second_likely",
    "kappa": "C&W margin confidence",
    "rand_init": "start PGD from a random point of the ball",
    "early_stop": "stop a sample once its attack succeeds",
    "cutoffs": "phi cut-offs between suppression / balanced / promotion",
    "only_correct": "analyse correctly classified images only",
    "include_failed": "count failed attacks in the category shares",
    "group_size": "side g of the g x g pixel groups",
    "group_chunk_size": "images per batched forward pass of the group analysis",
    "cam_method": "gradcam or cam",
    "cam_layer": "layer of the CAM (null: the model's default)",
    "cam_quantile": "CAM region: top fraction of pixels",
    "unit_layer": "layer of the unit analysis (null: the CAM layer)",
    "unit_threshold": "relative change tau that counts a unit as promoted/suppressed",
}


def config_defaults(configs: list[str] | None) -> dict:
    """PSESettings fields set by a ``callbacks.PSEAnalysis`` entry of the config files (later win)."""
    import yaml

    fields = {f.name for f in dataclasses.fields(PSESettings)}
    found: dict = {}
    for path in configs or ["configs/default.yaml"]:
        if not Path(path).is_file():
            continue
        trainer = (yaml.safe_load(Path(path).read_text()) or {}).get("trainer") or {}
        for cb in trainer.get("callbacks") or []:
            if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("PSEAnalysis"):
                found.update({k: v for k, v in (cb.get("init_args") or {}).items() if k in fields})
    return found


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a RobustClassifier checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-c", "--config", action="append", default=None,
                   help="LightningCLI config file(s) whose data: section builds the data (default configs/default.yaml)")
    p.add_argument("--split", choices=("val", "test"), default="test", help="data split analysed")
    p.add_argument("--num-samples", type=int, default=256, help="class-balanced seeded images analysed")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="picks the images and the random targets")
    p.add_argument("--num-examples", type=int, default=3, help="examples per category in the figure")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    hints = typing.get_type_hints(PSESettings)
    for f in dataclasses.fields(PSESettings):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        extra = dict(default=f.default, help=f"{HELP.get(f.name, f.name)} (default: %(default)s)")
        if f.name == "cutoffs":
            p.add_argument(flag, type=float, nargs=2, metavar=("LO", "HI"), **extra)
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=_bool, metavar="BOOL", **extra)
        elif "float" in hint:
            p.add_argument(flag, type=_optional(float), **extra)
        elif "int" in hint:
            p.add_argument(flag, type=int, **extra)
        else:
            p.add_argument(flag, type=_optional(str), **extra)
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser()
    known, _ = p.parse_known_args(argv)
    p.set_defaults(**config_defaults(known.config))
    args = p.parse_args(argv)
    try:  # the same validators as the API and the callback (explanations.validation)
        settings = PSESettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PSESettings)})
    except ValueError as exc:
        p.error(str(exc))
    values = analyze_checkpoint(
        args.ckpt, args.out, configs=args.config, split=args.split, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=args.seed, num_examples=args.num_examples,
        device=args.device, settings=settings,
    )
    shares = "  ".join(f"{c}={values[f'frac_{c}']:.3f}" for c in CATEGORIES)
    print(f"PSE ({args.split}, {int(values['num_analysed'])} analysed, success rate "
          f"{values['attack_success_rate']:.3f}, {int(values['num_failed'])} failed): {shares}")
    print(f"wrote {Path(args.out) / f'pse_{args.split}.json'} and .png")
    if values["num_success"] == 0:
        print(f"hint: every targeted attack failed at eps={settings.eps:.4g} ({settings.eps * 255:.3g}/255) with "
              f"{settings.steps} steps, so there are no perturbations to sort; raise --eps (the synthetic data "
              "needs about 32/255) or --steps")
    return values


if __name__ == "__main__":
    main()

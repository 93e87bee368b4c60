"""Promotion-suppression analysis of a trained checkpoint, written to a folder.

    python benchmarks/pse_report.py --ckpt logs/.../last.ckpt --out pse_report \\
        -c configs/default.yaml [--split test] [--num-samples 256] [--eps 0.0313] [--norm l2] ...

Writes ``<out>/pse_<split>.json`` (settings and every number the PSEAnalysis callback logs, without
the ``pse/`` prefix) and ``<out>/pse_<split>.png`` (example perturbations per category). The data
comes from the ``data:`` section of the config files (later files win). Every field of
``explanations.pse.PSESettings`` is a flag (``--target-rule least_likely``, ``--cutoffs 0.25 0.75``,
``--cam-layer backbone.layer4``, ...). Definitions: docs/pse.md.
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a RobustClassifier checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-c", "--config", action="append", default=None,
                   help="LightningCLI config file(s) whose data: section builds the data (default configs/default.yaml)")
    p.add_argument("--split", choices=("val", "test"), default="test")
    p.add_argument("--num-samples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-examples", type=int, default=3, help="examples per category in the figure")
    p.add_argument("--device", default="cpu")
    hints = typing.get_type_hints(PSESettings)
    for f in dataclasses.fields(PSESettings):
        flag = "--" + f.name.replace("_", "-")
        hint = str(hints[f.name])
        if f.name == "cutoffs":
            p.add_argument(flag, type=float, nargs=2, default=f.default, metavar=("LO", "HI"))
        elif isinstance(f.default, bool):
            p.add_argument(flag, type=_bool, default=f.default, metavar="BOOL")
        elif "float" in hint:
            p.add_argument(flag, type=_optional(float), default=f.default)
        elif "int" in hint:
            p.add_argument(flag, type=int, default=f.default)
        else:
            p.add_argument(flag, type=_optional(str), default=f.default)
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parser().parse_args(argv)
    settings = PSESettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PSESettings)})
    values = analyze_checkpoint(
        args.ckpt, args.out, configs=args.config, split=args.split, num_samples=args.num_samples,
        batch_size=args.batch_size, seed=args.seed, num_examples=args.num_examples,
        device=args.device, settings=settings,
    )
    shares = "  ".join(f"{c}={values[f'frac_{c}']:.3f}" for c in CATEGORIES)
    print(f"PSE ({args.split}, {int(values['num_analysed'])} analysed, success rate "
          f"{values['attack_success_rate']:.3f}, {int(values['num_failed'])} failed): {shares}")
    print(f"wrote {Path(args.out) / f'pse_{args.split}.json'} and .png")
    return values


if __name__ == "__main__":
    main()

"""Promotion-suppression analysis of a trained checkpoint, written to a folder.

    python benchmarks/pse_report.py --ckpt logs/.../last.ckpt --out pse_report \\
        -c configs/default.yaml [--split test] [--num-samples 256] [--eps 0.0313] [--norm l2] ...

Writes ``<out>/pse_<split>.json`` (settings and every number the PSEAnalysis callback logs, without
the ``pse/`` prefix) and ``<out>/pse_<split>.png`` (example perturbations per category).

The config files are read as ``train.py`` reads them (``lightning_modules.cli.build_from_configs``;
later files win): their datamodule gives the data, and the settings of their
``callbacks.PSEAnalysis`` entry (e.g. configs/default.yaml: eps 32/255, 10 steps, for the
saturated synthetic glyphs; else the ``PSESettings`` defaults, 8/255) are the defaults of the
flags. Every field of ``explanations.pse.PSESettings`` is a flag (``--target-rule least_likely``,
``--cutoffs 0.25 0.75``, ``--cam-layer backbone.layer4``, ...), made from the field's type and
documentation, so flags win. When every targeted attack fails, a hint says how to raise the
budget. Definitions: docs/pse.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning import LightningDataModule  # noqa: E402

from callbacks._eval_subset import EvalSubset  # noqa: E402
from explanations.files import file_sha256  # noqa: E402
from explanations.pse import CATEGORIES, PSESettings, run_analysis, summarize  # noqa: E402
from explanations.pse_report import ExampleCollector, write_pse_report  # noqa: E402

DEFAULT_CONFIG = "configs/default.yaml"


def analyze_checkpoint(
    ckpt: str | Path,
    out_dir: str | Path,
    datamodule: LightningDataModule,
    split: Literal["val", "test"] = "test",
    num_samples: int = 256,
    batch_size: int = 64,
    seed: int = 0,
    num_examples: int = 3,
    device: str = "cpu",
    settings: PSESettings | None = None,
) -> dict[str, float]:
    """PSE analysis of a RobustClassifier checkpoint on ``datamodule``'s split; writes
    ``pse_<split>.json`` and ``.png`` to ``out_dir`` and returns the numbers (no ``pse/`` prefix).

    The images are the class-balanced seeded subset the callback would analyse (one process).
    """
    from lightning_modules.classifier import RobustClassifier
    from lightning_modules.reliability import ensure_writable_dir

    ensure_writable_dir(out_dir, "PSE report folder", "--out")  # a bad --out fails now, not after the attacks
    settings = settings or PSESettings()
    module = RobustClassifier.load_from_checkpoint(
        str(ckpt), map_location=device, init_from=None, pretrained=False, weights_file=None
    )
    model = module.model.to(device)
    datamodule.prepare_data()
    datamodule.setup("test" if split == "test" else "validate")
    dataset = getattr(datamodule, f"{split}_dataset", None)
    if dataset is None:
        dataset = (datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()).dataset
    subset = EvalSubset(dataset, num_samples, seed, 0, 1, batch_size)
    collector = ExampleCollector(num_examples, settings.group_size)
    start = time.perf_counter()
    sums, _, _ = run_analysis(model, subset, settings, device, seed, on_batch=collector.add)
    if sums is None:
        raise RuntimeError("no usable sample in the evaluation subset")
    values = summarize(sums, settings)
    write_pse_report(
        out_dir, f"pse_{split}", values, settings, collector,
        extra=dict(checkpoint=str(ckpt), checkpoint_sha256=file_sha256(ckpt), split=split,
                   data=f"{type(datamodule).__qualname__}: " + (datamodule.describe_split(split)
                        if hasattr(datamodule, "describe_split") else "provenance not stated"),
                   num_samples=num_samples, seed=seed, seconds=time.perf_counter() - start),
        class_names=getattr(datamodule, "class_names", None),
    )
    return values


def from_configs(configs: list[str]) -> tuple[LightningDataModule, PSESettings | None]:
    """The datamodule and the last ``PSEAnalysis``'s settings (None without one) that ``train.py``
    builds from these config files."""
    from callbacks.pse_analysis import PSEAnalysis
    from lightning_modules.cli import build_from_configs

    cli = build_from_configs(configs)
    found = [cb.settings for cb in cli.trainer.callbacks if isinstance(cb, PSEAnalysis)]
    return cli.datamodule, (found[-1] if found else None)


# ------------------------------------------------------------------------------------------------
# Flags made from the PSESettings fields
# ------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """A dataclass's field documentation: its docstring's ``Args:`` entries, one line each (the
    same parser LightningCLI's help uses, docstring_parser)."""
    import docstring_parser

    return {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse(cls.__doc__ or "").params}


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = f"{kind.__name__} or null"  # argparse names it in "invalid ... value"
    return parse


def _flag_spec(name: str, hint: Any) -> dict[str, Any]:
    """argparse keywords (type, choices, nargs, metavar) for a field of type ``hint``."""
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and rest[0] in (int, float, str):
            return dict(type=_optional(rest[0]), metavar=f"{rest[0].__name__.upper()}|null")
    elif typing.get_origin(hint) is Literal:
        return dict(type=str, choices=list(args))
    elif hint is bool:
        return dict(type=_bool, metavar="true|false")
    elif hint in (int, float, str):
        return dict(type=hint)
    elif typing.get_origin(hint) is tuple and len(set(args)) == 1 and args[0] in (int, float):  # fixed length
        return dict(type=args[0], nargs=len(args), metavar=tuple(args[0].__name__.upper() for _ in args))
    raise TypeError(f"settings field {name!r}: pse_report cannot make a flag of the type {hint}; "
                    "give it a flag in benchmarks/pse_report.py")


def add_settings_flags(p: argparse.ArgumentParser, cls: type = PSESettings) -> None:
    """One flag per field of the settings dataclass: ``--field-name``, with the field's doc as help
    and its type (choices for ``Literal`` fields) and default; an undocumented field is an error."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    group = p.add_argument_group(f"analysis settings ({cls.__module__}.{cls.__qualname__})")
    for f in dataclasses.fields(cls):
        if not docs.get(f.name):
            raise ValueError(f"{cls.__qualname__}.{f.name} has no entry in the class docstring's Args: section "
                             "(the one help text of the settings)")
        group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
                           help=f"{docs[f.name]} (default: %(default)s)", **_flag_spec(f.name, hints[f.name]))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a RobustClassifier checkpoint")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("-c", "--config", action="append", default=None,
                   help=f"LightningCLI config file(s), read as train.py reads them: the data, and the defaults of the "
                        f"settings below from their callbacks.PSEAnalysis entry (default {DEFAULT_CONFIG})")
    p.add_argument("--split", choices=("val", "test"), default="test", help="data split analysed")
    p.add_argument("--num-samples", type=int, default=256, help="class-balanced seeded images analysed")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.add_argument("--seed", type=int, default=0, help="picks the images and the random targets")
    p.add_argument("--num-examples", type=int, default=3, help="examples per category in the figure")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    add_settings_flags(p)
    return p


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = parser()
    known, _ = p.parse_known_args(argv)
    datamodule, configured = from_configs(known.config or [DEFAULT_CONFIG])
    if configured is not None:
        p.set_defaults(**dataclasses.asdict(configured))
    args = p.parse_args(argv)
    try:  # the same validators as the API and the callback (explanations.validation)
        settings = PSESettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PSESettings)})
    except ValueError as exc:
        p.error(str(exc))
    values = analyze_checkpoint(
        args.ckpt, args.out, datamodule, split=args.split, num_samples=args.num_samples,
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

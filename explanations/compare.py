"""Compare two evaluation reports made on the same images: ``python -m explanations.compare A B``.

A and B are report folders (``robustness_report.json`` + ``robustness_per_image.jsonl``, written by
``train.py validate|test -c configs/evaluate.yaml``) or per-image files. Prints, per attack and
budget, the mean of each and the paired per-image difference A - B with its bootstrap interval
(:func:`explanations.report.compare_reports`); refused, naming the difference, when the two were
made on other images or with other protocol settings.

Examples:
    python -m explanations.compare logs/evaluate/version_0 logs/evaluate/version_1
    python -m explanations.compare A B --metric spearman --out comparison.json
"""

from __future__ import annotations

import argparse
import json
import sys

from explanations.report import compare_reports, comparison_markdown


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m explanations.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="report folder or per-image file of evaluation A")
    parser.add_argument("b", help="report folder or per-image file of evaluation B (same images and protocol)")
    parser.add_argument("--metric", default="p_at_k", help="per-image metric: p_at_k (default), spearman, kendall, flip_rate")
    parser.add_argument("--resamples", type=int, default=10_000, help="bootstrap resamples (default 10000)")
    parser.add_argument("--level", type=float, default=0.95, help="interval level in (0, 1) (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--out", help="also write the comparison as JSON to this file")
    args = parser.parse_args(argv)
    try:
        result = compare_reports(args.a, args.b, args.metric, args.resamples, args.level, args.seed)
    except (ValueError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(comparison_markdown(result), end="")
    if args.out:
        from explanations.files import atomic_write

        atomic_write(args.out, json.dumps(result, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

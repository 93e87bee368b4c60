"""The evaluation report: JSON and Markdown, per-image records, and the paired comparison of two reports.

- :func:`build_report`: the JSON report from the means (and standard errors) of an evaluation,
  with a ``measured`` block saying what was measured (model and weights with their hash, data,
  split and its provenance, images, k as a count, attack steps and restarts, seed, time).
- :func:`report_markdown`: its Markdown rendering. :func:`write_report_files` writes both
  (atomically) and the plots (:mod:`explanations.plots`); :func:`save_report` adds the
  late-failure rule: when the folder cannot be written, the numbers go to the log and to a file
  in the temporary folder, and :class:`ReportWriteError` names both.
- :class:`PerImageLog`: per-image values in JSON lines (``robustness_per_image.jsonl``), written
  batch by batch, so an interrupted evaluation resumes where it stopped; its header fingerprints
  the evaluation (protocol settings, weights, data, image ids) and a mismatch is refused.
- :func:`compare_reports`: per attack and budget, the paired per-image difference of two reports
  made on the same images with the same protocol, with a bootstrap interval
  (:func:`explanations.statistics.paired_bootstrap`); ``python -m explanations.compare A B``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from explanations.evaluation import NOISE, WORST, THICKNESS_KEYS, EvaluationProtocol, EvaluationResult, eps_label, eps_tag
from explanations.files import atomic_write

__all__ = [
    "PER_IMAGE_FILE", "REPORT_FILE", "PerImageLog", "ReportWriteError", "build_report", "compare_reports",
    "read_per_image", "report_markdown", "save_report", "write_report_files",
]

REPORT_FILE = "robustness_report.json"
MARKDOWN_FILE = "robustness_report.md"
PER_IMAGE_FILE = "robustness_per_image.jsonl"
PER_IMAGE_FORMAT = "robust-explainers/per-image/1"
_METRICS = ("p_at_k", "spearman", "kendall", "flip_rate", "localization")


def _clean(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def build_report(protocol: EvaluationProtocol, means: dict[str, float], num_images: int,
                 notes: Sequence[str] = (), method: str | None = None, se: dict[str, float] | None = None,
                 measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report from the means of an evaluation (``EvaluationResult.means()`` or reduced).

    ``{"num_images", "k", "accuracy", "p_at_k": {"worst"|"noise"|<attack>: {"8/255": P@k}},
    "spearman", "kendall", "flip_rate", "localization" (same layout), "thickness": {"all_pairs",
    "boundary"}, "se": the standard errors in the same layout, "methods": {<method>: the same
    blocks}, "attacks", "eps", "settings", "measured", "notes"}``; the top-level blocks are those
    of ``method`` (default: the first method).
    """
    se = se or {}
    sources = sorted({key.split("/")[1] for key in means if key.startswith("p_at_k/")},
                     key=lambda s: (s != WORST, s == NOISE, protocol.names.index(s) if s in protocol.names else 99, s))

    def block(m: str, values: dict[str, float]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric in _METRICS:
            table = {src: {eps_label(e): _clean(values.get(f"{metric}/{src}/{m}/{eps_tag(e)}")) for e in protocol.eps}
                     for src in sources if f"{metric}/{src}/{m}/{eps_tag(protocol.eps[0])}" in means}
            if table:
                out[metric] = table
        thick = {p: _clean(values.get(f"thickness/{p}/{m}")) for p in THICKNESS_KEYS.values() if f"thickness/{p}/{m}" in means}
        if thick:
            out["thickness"] = {p: thick.get(p) for p in THICKNESS_KEYS.values()}
        if f"localization/clean/{m}" in means:
            out["localization_clean"] = _clean(values.get(f"localization/clean/{m}"))
        return out

    first = method or protocol.methods[0]
    errors = block(first, se) if se else {}
    if se and "accuracy" in se:
        errors["accuracy"] = _clean(se["accuracy"])
    report: dict[str, Any] = {
        "num_images": int(num_images),
        "k": protocol.k_count if protocol.k_count is not None else protocol.k,
        "accuracy": _clean(means.get("accuracy", float("nan"))),
        **block(first, means),
        "se": errors,
        "method": first,
        "methods": {m: block(m, means) for m in protocol.methods},
        "attacks": [s for s in sources if s != WORST],
        "eps": [eps_label(e) for e in protocol.eps],
        "settings": protocol.settings(),
        "measured": dict(measured or {}),
        "notes": list(notes),
    }
    return report


def _fmt(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def measured_lines(measured: dict[str, Any]) -> list[str]:
    """'What was measured' as Markdown bullet lines (also printed by the final summary)."""
    lines = []
    model = measured.get("model") or {}
    if model:
        weights = model.get("weights") or {}
        source = weights.get("source", "unknown")
        where = f" {weights['path']}" if weights.get("path") else (f" {weights['name']}" if weights.get("name") else "")
        digest = f" (sha256 {weights['sha256'][:16]})" if weights.get("sha256") else ""
        lines.append(f"- model: {model.get('backbone', '?')} ({model.get('parameters', '?')} parameters), "
                     f"weights: {source}{where}{digest}")
    data = measured.get("data") or {}
    if data:
        where = f" at {data['data_dir']}" if data.get("data_dir") else ""
        lines.append(f"- data: {data.get('datamodule', '?')}{where}, split `{data.get('split', '?')}` "
                     f"({data.get('split_size', '?')} images): {data.get('provenance', 'provenance unknown')}")
        if data.get("subset"):
            lines.append(f"- images: {data['subset']}")
    protocol = measured.get("protocol") or {}
    if protocol:
        restarts = ", ".join(f"{n} {r}" for n, r in (protocol.get("restarts") or {}).items())
        lines.append(f"- protocol: k = {protocol.get('k')} of {protocol.get('features')} features, "
                     f"{protocol.get('steps')} attack steps, restarts: {restarts or 'n/a'}, seed {protocol.get('seed')}")
    timing = measured.get("time") or {}
    if timing:
        resumed = f", {timing['resumed_images']} images reused from an earlier run" if timing.get("resumed_images") else ""
        lines.append(f"- time: {timing.get('seconds', float('nan')):.1f} s{resumed}")
    return lines


def report_markdown(report: dict[str, Any]) -> str:
    """A short Markdown rendering of :func:`build_report`'s report (mean ± standard error)."""
    eps = report["eps"]
    se = (report.get("se") or {}).get("p_at_k", {})
    acc_se = (report.get("se") or {}).get("accuracy")
    accuracy = _fmt(report["accuracy"]) + (f" ± {acc_se:.3f}" if acc_se is not None else "")
    lines = ["# Explanation robustness report", ""]
    measured = measured_lines(report.get("measured") or {})
    if measured:
        lines += ["What was measured:", "", *measured, ""]
    lines += [
        f"{report['num_images']} images, k = {report['k']}, clean accuracy {accuracy}, method {report['method']}.", "",
        "P@k (share of the clean top-k still in the top-k; lower = more fragile), mean ± standard error over the "
        "images. `worst` is the per-image worst case over the ensemble and over all smaller budgets.", "",
        "| attack | " + " | ".join(eps) + " |", "|---|" + "---|" * len(eps),
    ]
    for src, row in report["p_at_k"].items():
        cells = []
        for e in eps:
            err = (se.get(src) or {}).get(e)
            cells.append(_fmt(row[e]) + (f" ± {err:.3f}" if err is not None and row[e] is not None else ""))
        lines.append(f"| {src} | " + " | ".join(cells) + " |")
    if "thickness" in report:
        lines += ["", "Top-k thickness (1 = the top-k ranking never changes in the ball): "
                  + ", ".join(f"{p} {_fmt(v, 4)}" for p, v in report["thickness"].items())
                  + ". Read `boundary` (top-k vs the next k, the pairs ERAttack and R2ET's gap work on); "
                  "`all_pairs` is dominated by easy pairs."]
    if report.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report_files(report: dict[str, Any], out_dir: str | Path, images: dict[str, dict[str, Any]] | None = None,
                       class_names: list[str] | None = None) -> list[Path]:
    """Write ``robustness_report.json`` (atomically, first), ``robustness_report.md`` and the PNG plots."""
    from explanations.plots import plot_report

    out = Path(out_dir)
    paths = [atomic_write(out / REPORT_FILE, json.dumps(report, indent=2)),
             atomic_write(out / MARKDOWN_FILE, report_markdown(report))]
    return paths + plot_report(report, out, images, class_names)


class ReportWriteError(OSError):
    """The report could not be written; the message says where its numbers were kept instead."""


def save_report(report: dict[str, Any], out_dir: str | Path, images: dict[str, dict[str, Any]] | None = None,
                class_names: list[str] | None = None, log: Callable[[str], None] | None = None) -> list[Path]:
    """:func:`write_report_files`; on an ``OSError`` the JSON goes to ``log`` and to a file in the
    temporary folder, then :class:`ReportWriteError` names the folder, the reason and that file."""
    try:
        return write_report_files(report, out_dir, images, class_names)
    except OSError as exc:
        text = json.dumps(report, indent=2)
        if log is not None:
            log(f"the report could not be written to {out_dir}; its numbers:\n{text}")
        kept = "the log above"
        try:
            fd, name = tempfile.mkstemp(prefix="robustness_report-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            kept = f"{name} and the log"
        except OSError:
            pass
        raise ReportWriteError(
            exc.errno, f"cannot write the robustness report into {str(out_dir)!r} ({exc.strerror or exc}); "
            f"its numbers are kept in {kept}", getattr(exc, "filename", None),
        ) from exc


# ------------------------------------------------------------------ per-image records


class PerImageLog:
    """Per-image values of one evaluation as JSON lines, appended batch by batch.

    Line 1 ``{"header": {"format", "fingerprint", "keys"}}``; then one line per image
    ``{"id": dataset index, "label": y, "v": [values in key order, null for NaN]}``. Every append
    is flushed and fsynced, so a stop loses at most the batch in progress.

    Args:
        path: the file (``robustness_per_image.jsonl`` for one process, a ``.part-<rank>`` file
            per DDP rank while running).
        fingerprint: what identifies the evaluation (protocol settings, weights, data, image ids);
            resuming from a file with another fingerprint is refused, naming what differs.
        keys: the per-image value keys in column order.
    """

    def __init__(self, path: str | Path, fingerprint: dict[str, Any], keys: Sequence[str]) -> None:
        self.path, self.fingerprint, self.keys = Path(path), _jsonable(fingerprint), list(keys)

    def header(self, complete: bool = False) -> dict[str, Any]:
        return {"format": PER_IMAGE_FORMAT, "fingerprint": self.fingerprint, "keys": self.keys, "complete": complete}

    def check(self, header: dict[str, Any], source: Path) -> None:
        """Refuse a file made by another evaluation, naming the differing entries."""
        if header.get("format") != PER_IMAGE_FORMAT:
            raise ValueError(f"{source} is not a per-image results file of this project (format {header.get('format')!r})")
        diff = sorted(_differences(header.get("fingerprint") or {}, self.fingerprint))
        if header.get("keys") != self.keys:
            diff.append("keys (the metrics recorded)")
        if diff:
            raise ValueError(
                f"{source} holds the per-image results of another evaluation (it differs in: {', '.join(diff)}); "
                "give another report_dir, or delete the file to evaluate from the start"
            )

    def start(self, folder_files: Sequence[Path] = (), ids: set[int] | None = None
              ) -> dict[int, tuple[int | None, list[float | None]]]:
        """Rows already evaluated, from ``folder_files`` (earlier complete or partial files of the
        same evaluation, checked; only ``ids`` when given, e.g. this rank's shard), then (re)start
        this log with them. Returns {id: (label, values)}."""
        done: dict[int, tuple[int | None, list[float | None]]] = {}
        for file in folder_files:
            header, rows = _read_lines(file)
            self.check(header, file)
            done.update(rows if ids is None else {i: r for i, r in rows.items() if i in ids})
        lines = [json.dumps({"header": self.header()})]
        lines += [json.dumps({"id": i, "label": lab, "v": v}) for i, (lab, v) in sorted(done.items())]
        atomic_write(self.path, "\n".join(lines) + "\n")
        return done

    def append(self, result: EvaluationResult) -> None:
        """Append one batch's rows (flushed and fsynced)."""
        rows = _rows(result, self.keys)
        with open(self.path, "a") as f:
            f.write("".join(json.dumps({"id": i, "label": lab, "v": v}) + "\n" for i, lab, v in rows))
            f.flush()
            os.fsync(f.fileno())

    def write_complete(self, path: Path, rows: dict[int, tuple[int | None, list[float | None]]]) -> Path:
        """The complete file (all images, sorted by id, ``complete: true``), written atomically."""
        lines = [json.dumps({"header": self.header(complete=True)})]
        lines += [json.dumps({"id": i, "label": lab, "v": v}) for i, (lab, v) in sorted(rows.items())]
        return atomic_write(path, "\n".join(lines) + "\n")


def _rows(result: EvaluationResult, keys: Sequence[str]) -> list[tuple[int, int | None, list[float | None]]]:
    matrix = torch.stack([result.values[k].double() for k in keys], 1) if keys else torch.zeros(result.num_images, 0)
    labels = result.labels.tolist() if result.labels is not None else [None] * result.num_images
    return [(int(i), None if lab is None else int(lab), [None if math.isnan(v) else v for v in row])
            for i, lab, row in zip(result.ids.tolist(), labels, matrix.tolist())]


def rows_of(result: EvaluationResult, keys: Sequence[str]) -> dict[int, tuple[int | None, list[float | None]]]:
    """{id: (label, values in key order)} of a result."""
    return {i: (lab, v) for i, lab, v in _rows(result, keys)}


def result_from_rows(rows: dict[int, tuple[int | None, list[float | None]]], keys: Sequence[str],
                     ids: Sequence[int] | None = None) -> EvaluationResult:
    """An :class:`EvaluationResult` (values only) from per-image rows, in ``ids`` order (default: sorted)."""
    order = sorted(rows) if ids is None else [int(i) for i in ids if int(i) in rows]
    matrix = torch.tensor([[float("nan") if v is None else v for v in rows[i][1]] for i in order],
                          dtype=torch.float64).reshape(len(order), len(keys))
    labels = [rows[i][0] for i in order]
    return EvaluationResult({k: matrix[:, j].float() for j, k in enumerate(keys)}, torch.tensor(order, dtype=torch.long),
                            labels=None if any(lab is None for lab in labels) else torch.tensor(labels, dtype=torch.long))


def _read_lines(path: Path) -> tuple[dict[str, Any], dict[int, tuple[int | None, list[float | None]]]]:
    header: dict[str, Any] | None = None
    rows: dict[int, tuple[int | None, list[float | None]]] = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                if number > 1:  # a line cut by the stop: the rows before it are intact
                    break
                raise ValueError(f"{path} is not a per-image results file (line 1 is not JSON)") from None
            if header is None:
                if "header" not in item:
                    raise ValueError(f"{path} is not a per-image results file (no header line)")
                header = item["header"]
                continue
            rows[int(item["id"])] = (item.get("label"), item["v"])
    if header is None:
        raise ValueError(f"{path} is empty")
    return header, rows


def read_per_image(path: str | Path) -> tuple[dict[str, Any], EvaluationResult]:
    """(header, result) of a per-image file, or of the ``robustness_per_image.jsonl`` in a report folder."""
    path = Path(path)
    if path.is_dir():
        path = path / PER_IMAGE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no per-image results at {path} (written by an evaluation with report: true)")
    header, rows = _read_lines(path)
    return header, result_from_rows(rows, header["keys"])


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(name)
            else:
                out += _differences(a[key], b[key], name)
        return out
    return [] if a == b else [prefix or "value"]


# ------------------------------------------------------------------ comparing two reports


#: Fingerprint entries that may differ between two compared reports (what is being compared).
COMPARED = ("model",)


def compare_reports(a: str | Path, b: str | Path, metric: str = "p_at_k", resamples: int = 10_000,
                    level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Paired per-image comparison of two evaluations (report folders or per-image files).

    For each source (worst, each attack, noise) and budget: mean of A, mean of B and the mean
    paired difference A - B with its percentile-bootstrap interval over images. Refused
    (``ValueError`` naming the difference) when the two were made on other images (ids or labels)
    or with other protocol settings or data.
    """
    from explanations.statistics import paired_bootstrap

    (ha, ra), (hb, rb) = read_per_image(a), read_per_image(b)
    for header, where in ((ha, a), (hb, b)):
        if not header.get("complete"):
            raise ValueError(f"{where}: the per-image results are incomplete (an interrupted evaluation); "
                             "finish it first (rerun the same command with the same report_dir)")
    fa, fb = ha["fingerprint"], hb["fingerprint"]
    ids_a, ids_b = ra.ids.tolist(), rb.ids.tolist()
    if ids_a != ids_b:
        only_a, only_b = sorted(set(ids_a) - set(ids_b)), sorted(set(ids_b) - set(ids_a))
        raise ValueError(f"the two evaluations were made on other images: {len(ids_a)} and {len(ids_b)} images, "
                         f"{len(only_a)} ids only in A (e.g. {only_a[:5]}), {len(only_b)} only in B (e.g. {only_b[:5]})")
    diff = [d for d in _differences({k: v for k, v in fa.items() if k not in COMPARED},
                                    {k: v for k, v in fb.items() if k not in COMPARED})]
    if diff:
        raise ValueError(f"the two evaluations differ in {', '.join(diff)}: a paired comparison needs the same "
                         "images and protocol settings")
    if ra.labels is not None and rb.labels is not None and not torch.equal(ra.labels, rb.labels):
        bad = (ra.labels != rb.labels).nonzero().flatten()[:5].tolist()
        raise ValueError(f"the two evaluations disagree on the labels of the same ids (e.g. ids {[ids_a[i] for i in bad]}): "
                         "they read other data")
    keys = [k for k in ha["keys"] if k.startswith(f"{metric}/") and k in rb.values]
    if not keys:
        raise ValueError(f"metric {metric!r} is not in the per-image results; recorded: "
                         f"{sorted({k.split('/')[0] for k in ha['keys']})}")
    rows = []
    for key in keys:
        _, src, method, tag = key.split("/")
        d = paired_bootstrap(ra.values[key], rb.values[key], resamples=resamples, level=level, seed=seed)
        rows.append({"source": src, "method": method, "eps": tag, "mean_a": _nanmean(ra.values[key]),
                     "mean_b": _nanmean(rb.values[key]), **d.as_dict()})
    order = {WORST: 0, NOISE: 2}
    rows.sort(key=lambda r: (r["method"], order.get(r["source"], 1), r["source"], float(r["eps"][4:])))
    return {"a": str(a), "b": str(b), "metric": metric, "num_images": len(ids_a), "level": level,
            "resamples": resamples, "model_a": fa.get("model"), "model_b": fb.get("model"), "rows": rows}


def _nanmean(v: Tensor) -> float:
    v = v.double()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")


def comparison_markdown(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (difference = A - B; ``resolved`` when the interval excludes 0)."""
    pct = round(result["level"] * 100)
    lines = [f"Paired comparison of {result['metric']} on {result['num_images']} images (A - B; {pct}% bootstrap "
             f"interval over images, {result['resamples']} resamples)", "",
             f"- A: {result['a']}", f"- B: {result['b']}", "",
             f"| method | attack | eps | A | B | A - B | {pct}% interval | resolved |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        eps = r["eps"][4:] + "/255"
        verdict = {1: "A higher", -1: "B higher", 0: "no"}[r["sign"]]
        lines.append(f"| {r['method']} | {r['source']} | {eps} | {r['mean_a']:.3f} | {r['mean_b']:.3f} | "
                     f"{r['paired_diff']:+.3f} | [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] | {verdict} |")
    return "\n".join(lines) + "\n"


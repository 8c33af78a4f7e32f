"""MetricReports as people read them: a text table for the node UI, a JSON-friendly dict, the paper's markdown table
(one row per metric: mean ± std over the samples, n, which direction is better), metrics.csv (one row per sample and
metric) and PNG plots (per-sample bars for each metric, the histogram of the lip-sync proxy's A/V offsets).

A report here is anything with `values` (name -> float), `notes` (list of str) and `extra` (dict), as the metric
functions return. Non-finite values are kept: PSNR of identical frames is inf, a metric that could not be computed
for a sample is nan (left out of its mean and its n). The JSON forms write them as the strings "inf", "-inf", "nan",
because strict JSON has no such numbers.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ARROWS = {"higher": "↑", "lower": "↓"}
OFFSET_KEY = "av_offset_frames"  # the lip-sync proxy's best lag in frames, in MetricReport.extra

# Plot geometry: fixed inches at a fixed dpi (no tight bounding box), so every PNG has a predictable pixel size.
DPI = 100
BAR_COLUMNS = 3
BAR_PANEL_INCHES = (4.0, 3.0)
HISTOGRAM_INCHES = (6.0, 4.0)


def merge(*reports):
    """One MetricReport from several of the same sample (speech, video, sync): their values, notes and extra."""
    from . import MetricReport

    out = MetricReport()
    for r in reports:
        out.values.update(r.values)
        out.notes.extend(r.notes)
        out.extra.update(r.extra)
    return out


def better(name: str) -> str | None:
    """'higher' or 'lower' from the library's METRICS table; None for a name it does not know."""
    from . import METRICS

    info = METRICS.get(name)
    return info.better if info is not None else None


def label(name: str) -> str:
    arrow = ARROWS.get(better(name), "")
    return f"{name} {arrow}".rstrip()


def fmt(value: float) -> str:
    if value is None or math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"


def json_number(value: float):
    """A float as strict JSON can hold it: finite numbers stay numbers, the others become "inf" / "-inf" / "nan"."""
    value = float(value)
    return value if math.isfinite(value) else fmt(value)


def to_dict(report) -> dict:
    """The JSON-friendly form of one report: values (with each metric's better direction), notes and extra."""
    return {"values": {k: json_number(v) for k, v in report.values.items()},
            "better": {k: better(k) for k in report.values},
            "notes": list(report.notes),
            "extra": _json_ready(report.extra)}


def _json_ready(obj):
    if isinstance(obj, Mapping):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float):
        return json_number(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _json_ready(obj.tolist())
    return obj


def text_table(report, title: str = "") -> str:
    """What a node shows: one line per metric (name, better direction, value), then the notes."""
    lines = [title] if title else []
    if report.values:
        width = max(len(label(k)) for k in report.values)
        lines += [f"{label(k):<{width}}  {fmt(v)}" for k, v in report.values.items()]
    else:
        lines.append("no metric could be computed")
    if OFFSET_KEY in report.extra:
        lines.append(f"A/V offset (lip-sync proxy): {report.extra[OFFSET_KEY]:+d} frames (positive: audio late)")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


@dataclass
class Summary:
    """One metric over the samples: mean and population standard deviation of the non-nan values, and their count."""
    name: str
    mean: float
    std: float
    n: int


def summarise(reports: Mapping[str, object]) -> list[Summary]:
    """Per metric, in first-seen order, over every sample's report (nan values are left out)."""
    names = list(dict.fromkeys(k for r in reports.values() for k in r.values))
    out = []
    for name in names:
        xs = [float(r.values[name]) for r in reports.values() if name in r.values and not math.isnan(r.values[name])]
        if not xs:
            out.append(Summary(name, math.nan, math.nan, 0))
            continue
        mean = sum(xs) / len(xs)
        std = 0.0 if all(x == xs[0] for x in xs) else \
            (math.nan if math.isinf(mean) else math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)))
        out.append(Summary(name, mean, std, len(xs)))
    return out


def mean_std(s: Summary) -> str:
    """"mean ± std" with four significant digits of the mean and the std to the same decimals, as papers print."""
    if not math.isfinite(s.mean) or not math.isfinite(s.std):
        return fmt(s.mean)
    decimals = max(0, 3 - math.floor(math.log10(abs(s.mean)))) if s.mean else 4
    return f"{s.mean:.{decimals}f} ± {s.std:.{decimals}f}"


def markdown_table(reports: Mapping[str, object], test_set: Mapping[str, tuple] = None) -> str:
    """The paper's layout: one row per metric with its better direction, mean ± std over the samples, and n; then
    the test-set FID / FVD (one distance over the pooled features; n = feature rows per side) when there are any."""
    rows = ["| Metric | Better | Mean ± std | n |", "|---|:-:|---:|---:|"]
    for s in summarise(reports):
        rows.append(f"| {s.name} | {ARROWS.get(better(s.name), '')} | {mean_std(s)} | {s.n} |")
    for name, (value, n) in (test_set or {}).items():
        rows.append(f"| {name} (test set, pooled) | {ARROWS.get(better(name), '')} | {fmt(value)} | {n} |")
    return "\n".join(rows) + "\n"


def grouped_notes(reports: Mapping[str, object]) -> list[str]:
    """Each distinct note once, after the samples it concerns ("man, Woman: fid skipped: ...")."""
    samples: dict[str, list[str]] = {}
    for sample, r in reports.items():
        for note in dict.fromkeys(r.notes):
            samples.setdefault(note, []).append(sample)
    return [f"{', '.join(names)}: {note}" for note, names in samples.items()]


def notes_markdown(reports: Mapping[str, object]) -> str:
    lines = grouped_notes(reports)
    return ("\n## Notes\n\n" + "\n".join(f"- {line}" for line in lines) + "\n") if lines else ""


def write_csv(path: Path, reports: Mapping[str, object]) -> Path:
    """metrics.csv: one row per sample and metric (sample, metric, value, better)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sample", "metric", "value", "better"])
        for sample, r in reports.items():
            for name, value in r.values.items():
                writer.writerow([sample, name, repr(float(value)), better(name) or ""])
    return Path(path)


def bar_figure_size(metric_count: int) -> tuple[int, int]:
    """Pixel (width, height) of the per-sample bar chart of `metric_count` metrics."""
    rows = max(1, math.ceil(metric_count / BAR_COLUMNS))
    cols = min(max(metric_count, 1), BAR_COLUMNS)
    return round(cols * BAR_PANEL_INCHES[0] * DPI), round(rows * BAR_PANEL_INCHES[1] * DPI)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def plot_per_sample(path: Path, reports: Mapping[str, object]) -> Path | None:
    """One bar panel per metric, one bar per sample (inf drawn hatched at the panel's top; nan and n/a, a metric the
    sample does not have, labelled over an empty slot)."""
    names = list(dict.fromkeys(k for r in reports.values() for k in r.values))
    if not names:
        return None
    plt = _pyplot()
    width, height = bar_figure_size(len(names))
    cols = min(len(names), BAR_COLUMNS)
    rows = math.ceil(len(names) / BAR_COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(width / DPI, height / DPI), dpi=DPI, squeeze=False)
    samples = list(reports)
    for ax, name in zip(axes.flat, names):
        values = [float(reports[s].values[name]) if name in reports[s].values else None for s in samples]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        top = max(finite + [1.0]) * 1.1 if finite else 1.0
        shown = [v if v is not None and math.isfinite(v) else top if v == math.inf else 0.0 for v in values]
        bars = ax.bar(range(len(samples)), shown, color="#4c72b0")
        for bar, v in zip(bars, values):
            if v is None or not math.isfinite(v):
                bar.set_hatch("//")
                bar.set_alpha(0.4)
                ax.annotate("n/a" if v is None else fmt(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_title(label(name), fontsize=9)
        ax.set_xticks(range(len(samples)), samples, rotation=30, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()  # arranges the panels inside the fixed figure size (savefig keeps that size)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def plot_offsets(path: Path, reports: Mapping[str, object]) -> Path | None:
    """Histogram of the lip-sync proxy's A/V offsets (frames; positive: audio late), one bin per frame."""
    offsets = [int(r.extra[OFFSET_KEY]) for r in reports.values() if r.extra.get(OFFSET_KEY) is not None]
    if not offsets:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=HISTOGRAM_INCHES, dpi=DPI)
    low, high = min(offsets + [0]) - 1, max(offsets + [0]) + 1
    ax.hist(offsets, bins=[b - 0.5 for b in range(low, high + 2)], color="#dd8452", edgecolor="black")
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("A/V offset in frames (lip-sync proxy; positive: audio late)")
    ax.set_ylabel("samples")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"A/V offset, n = {len(offsets)}")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return Path(path)


def histogram_size() -> tuple[int, int]:
    return round(HISTOGRAM_INCHES[0] * DPI), round(HISTOGRAM_INCHES[1] * DPI)


def write_all(out_dir: Path, reports: Mapping[str, object], test_set: Mapping[str, tuple] = None) -> dict[str, Path]:
    """metrics.csv, metrics.md (table + notes), metrics.json and the plots that have data, in `out_dir`."""
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"csv": write_csv(out_dir / "metrics.csv", reports)}
    md = out_dir / "metrics.md"
    md.write_text("# Evaluation\n\n" + markdown_table(reports, test_set) + notes_markdown(reports))
    written["markdown"] = md
    summary = {s.name: {"mean": json_number(s.mean), "std": json_number(s.std), "n": s.n, "better": better(s.name)}
               for s in summarise(reports)}
    js = out_dir / "metrics.json"
    pooled = {name: {"value": json_number(v), "n": n, "better": better(name)} for name, (v, n) in (test_set or {}).items()}
    js.write_text(json.dumps({"summary": summary, "test_set": pooled,
                              "samples": {k: to_dict(r) for k, r in reports.items()}},
                             indent=1, allow_nan=False) + "\n")
    written["json"] = js
    for key, plot, name in (("bars", plot_per_sample, "per_sample.png"), ("offsets", plot_offsets, "av_offset.png")):
        path = plot(out_dir / name, reports)
        if path is not None:
            written[key] = path
    return written

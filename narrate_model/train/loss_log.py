"""The run's loss log (``loss_log.csv``) and loss curve (``loss_curve.png``).

One CSV row per optimiser step (``split`` = train) and per validation (``split`` = val): the step, every named loss,
the learning rate, the training time so far and a note (why a step was skipped). The curve is drawn with Pillow,
which ComfyUI already needs, rather than matplotlib, to add no dependency for one line chart.
"""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

PLOT_SIZE = (800, 480)
_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


class LossLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns = None
        if self.path.exists():
            with open(self.path, newline="") as f:
                self.columns = next(csv.reader(f), None)

    def truncate_after(self, step: int) -> None:
        """Drop rows a resumed run will write again (those after the checkpoint it resumes from)."""
        if self.columns:
            self._rewrite([r for r in self.read() if int(r["step"]) <= step])

    def append(self, step: int, split: str, losses: dict, lr: float, time_s: float, note: str = "") -> None:
        if not self.columns:
            self.columns = ["step", "split", *losses, "lr", "time_s", "note"]
            self._rewrite([])
        new_names = [k for k in losses if k not in self.columns]
        if new_names:  # a loss first seen now: widen the table, keeping the rows
            rows, self.columns = self.read(), [*self.columns[:-3], *new_names, *self.columns[-3:]]
            self._rewrite(rows)
        row = {"step": step, "split": split, "lr": f"{lr:.6g}", "time_s": f"{time_s:.2f}", "note": note,
               **{k: repr(float(v)) for k, v in losses.items()}}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="").writerow(row)

    def loss_names(self) -> list[str]:
        return self.columns[2:-3] if self.columns else []

    def _rewrite(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def plot(log: LossLog, out: Path) -> Path:
    """Every loss against the step (log scale when all are positive); validations as dots."""
    rows, names = log.read(), log.loss_names()
    series = {}
    for r in rows:
        for name in names:
            value = float(r[name]) if r.get(name) not in (None, "") else math.nan
            if math.isfinite(value):
                series.setdefault((r["split"], name), []).append((int(r["step"]), value))
    w, h = PLOT_SIZE
    image = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 70, w - 170, 20, h - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    points = [p for s in series.values() for p in s]
    if points:
        log_y = all(v > 0 for _, v in points)
        ys = [math.log10(v) if log_y else v for _, v in points]
        x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
        y0, y1 = min(ys), max(ys)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def xy(step, value):
            v = math.log10(value) if log_y else value
            return (left + (step - x0) / (x1 - x0) * (right - left), bottom - (v - y0) / (y1 - y0) * (bottom - top))

        order = sorted(series, key=lambda key: (key[0], names.index(key[1])))  # train before val, loss order
        for i, (split, name) in enumerate(order):
            pts = series[(split, name)]
            colour = _COLOURS[names.index(name) % len(_COLOURS)]
            coords = [xy(s, v) for s, v in pts]
            if split == "train" and len(coords) > 1:
                draw.line(coords, fill=colour, width=2)
            else:
                for x, y in coords:
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
            draw.text((right + 10, top + 16 * i), f"{split} {name}", fill=colour)
        fmt = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
        draw.text((4, top + 14), "log scale" if log_y else "", fill="grey")
        draw.text((4, top), fmt(y1), fill="black")
        draw.text((4, bottom - 10), fmt(y0), fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        draw.text((right - 60, bottom + 6), f"step {x1}", fill="black")
    tmp = Path(out).with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)
    return Path(out)

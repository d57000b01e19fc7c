"""Charts of the monitor's results: small SVG line and bar charts written here, with no JavaScript and no
library, so the server's dashboard (lmops/serve/dashboard.py) and `lmops monitor show --plot out.html`
work offline; `--plot out.png` draws the same with matplotlib when it is installed.

- `line_chart(points, threshold=..., marked=...)`: a time series as an SVG string, its threshold a dashed
  line (a value per point: a calibrated threshold may change from run to run), marked points (alerts)
  red; `others` adds series of their own colour (p95 beside p50).
- `bar_chart(points)`: a count per time bucket (requests per minute).
- `write_plot(results, path)`: one chart per (signal, deployment) of monitor results, as a standalone
  HTML page (or a PNG).

Every text that reaches the SVG is escaped: signal and deployment names come from the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING

from lmops.errors import LmopsError

if TYPE_CHECKING:
    from lmops.store import MonitorResult

Point = tuple[datetime, float | None]  # None: no value (a gap in the line)

WIDTH, HEIGHT = 360, 150
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 46, 10, 22, 22
LINE, THRESHOLD, ALERT, GRID, TEXT = "#2563eb", "#b45309", "#dc2626", "#e5e7eb", "#374151"
OTHER_COLOURS = ("#7c3aed", "#059669", "#db2777")


def fmt(value: float | None) -> str:
    """A number as a person reads it: 4 significant digits, '-' for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.4g}"


# ----------------------------------------------------------------------------- charts

def line_chart(points: Sequence[Point], *, threshold: float | None | Sequence[float | None] = None,
               marked: Iterable[datetime] = (), title: str = "", others: Mapping[str, Sequence[Point]] | None = None,
               label: str = "value", width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG line chart of points (oldest first). threshold: one value, or one per point (drawn as a
    dashed line through them); marked: the times of points drawn as red dots (alerts); others: more series
    by name, in colours of their own."""
    others = dict(others or {})
    thresholds = _per_point(threshold, len(points))
    marked = set(marked)
    series = [(label, list(points), LINE), *((n, list(p), OTHER_COLOURS[i % len(OTHER_COLOURS)])
                                            for i, (n, p) in enumerate(others.items()))]
    values = [v for _, pts, _ in series for _, v in pts if _finite(v)] + [t for t in thresholds if _finite(t)]
    times = [t for _, pts, _ in series for t, _ in pts]
    frame = _Frame(times, values, width, height)
    out = [frame.open(title)]
    if not times:
        out.append(frame.note("no data"))
        return "".join(out) + "</svg>"
    if any(_finite(t) for t in thresholds):
        out.append(_path([(frame.x(t), frame.y(v)) for (t, _), v in zip(points, thresholds)], THRESHOLD,
                         dashed=True, title=f"threshold: {fmt(_last(thresholds))}"))
    for name, pts, colour in series:
        out.append(_path([(frame.x(t), frame.y(v)) for t, v in pts], colour))
        for t, v in pts:
            if not _finite(v):
                continue
            alert = t in marked and colour == LINE
            out.append(f'<circle cx="{frame.x(t):.1f}" cy="{frame.y(v):.1f}" r="{3.5 if alert else 2}" '
                       f'fill="{ALERT if alert else colour}"><title>{escape(_when(t))} {escape(name)} {fmt(v)}'
                       f'{" ALERT" if alert else ""}</title></circle>')
    if others:
        out.append(frame.legend([(n, c) for n, _, c in series]))
    return "".join(out) + "</svg>"


def bar_chart(points: Sequence[tuple[datetime, float]], *, title: str = "", label: str = "count",
              width: int = WIDTH, height: int = HEIGHT) -> str:
    """An SVG bar chart: one bar per (bucket start, value), buckets evenly spaced, oldest first."""
    frame = _Frame([t for t, _ in points], [0.0, *(v for _, v in points)], width, height)
    out = [frame.open(title)]
    if not points:
        out.append(frame.note("no data"))
        return "".join(out) + "</svg>"
    step = (frame.right - frame.left) / len(points)
    for i, (t, v) in enumerate(points):
        top = frame.y(v)
        out.append(f'<rect x="{frame.left + i * step + step * 0.1:.1f}" y="{top:.1f}" width="{max(step * 0.8, 1):.1f}" '
                   f'height="{max(frame.bottom - top, 0):.1f}" fill="{LINE}"><title>{escape(_when(t))} '
                   f'{escape(label)} {fmt(v)}</title></rect>')
    return "".join(out) + "</svg>"


def split_bar(shares: Mapping[str, float], *, width: int = WIDTH, height: int = 18) -> str:
    """A horizontal bar of shares (percent; traffic by deployment), each part labelled."""
    total = sum(v for v in shares.values() if v > 0)
    out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img"><rect width="{width}" height="{height}" fill="{GRID}"/>')]
    x = 0.0
    colours = (LINE, *OTHER_COLOURS)
    for i, (name, share) in enumerate(v for v in shares.items() if v[1] > 0):
        w = width * share / total
        out.append(f'<rect x="{x:.1f}" width="{w:.1f}" height="{height}" fill="{colours[i % len(colours)]}">'
                   f'<title>{escape(name)} {fmt(share)}%</title></rect>')
        if w > 40:
            out.append(f'<text x="{x + 4:.1f}" y="{height - 5}" font-size="11" fill="#fff">{escape(name)} '
                       f'{fmt(share)}%</text>')
        x += w
    return "".join(out) + "</svg>"


# ----------------------------------------------------------------------------- monitor results

def result_charts(results: Sequence[MonitorResult]) -> list[tuple[str, str, MonitorResult, str]]:
    """One chart per (signal, deployment) of results (oldest first): (signal, deployment label, the
    latest result, SVG), sorted by deployment then signal."""
    groups: dict[tuple[str, str], list[MonitorResult]] = {}
    for r in results:
        groups.setdefault((_where(r), r.signal), []).append(r)
    out = []
    for (where, signal), rows in sorted(groups.items()):
        rows.sort(key=lambda r: (r.ts, r.id))
        svg = line_chart([(r.ts, r.value) for r in rows], threshold=[r.threshold for r in rows],
                         marked=[r.ts for r in rows if r.alert], title=f"{signal} · {where}", label=signal)
        out.append((signal, where, rows[-1], svg))
    return out


def write_plot(results: list[MonitorResult], path: Path) -> None:
    """One chart per (signal, deployment): a standalone HTML page (.html, .htm), or with matplotlib a PNG."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        _write_png(results, path)
        return
    if suffix not in (".html", ".htm"):
        raise LmopsError(f"--plot {path}: write an .html page (no dependencies) or a .png (needs matplotlib)")
    cells = "".join(f'<figure>{svg}<figcaption>latest {fmt(last.value)}, threshold {fmt(last.threshold)}'
                    f'{" <b>ALERT</b>" if last.alert else ""}</figcaption></figure>'
                    for _, _, last, svg in result_charts(results))
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>lmops monitor</title>"
            f"<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:{TEXT}}}figure{{display:inline-block;"
            f"margin:0 1em 1em 0}}figcaption{{font-size:12px}}</style></head><body><h1>lmops monitor</h1>"
            f"<p>{len(results)} results; dashed: threshold, red: alert.</p>{cells or '<p>no results</p>'}"
            f"</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _write_png(results: Sequence[MonitorResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmopsError(f"--plot {path}: a PNG needs matplotlib (pip install matplotlib); or write an .html "
                         "page, which needs nothing") from None
    groups: dict[tuple[str, str], list[MonitorResult]] = {}
    for r in results:
        groups.setdefault((_where(r), r.signal), []).append(r)
    keys = sorted(groups) or [("", "no results")]
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        ax.set_title(f"{key[1]} · {key[0]}" if key[0] else key[1], fontsize=9)
        series = sorted(groups.get(key, []), key=lambda r: (r.ts, r.id))
        ts = [r.ts for r in series]
        ax.plot(ts, [math.nan if r.value is None else r.value for r in series], color=LINE, marker=".")
        ax.plot(ts, [math.nan if r.threshold is None else r.threshold for r in series], color=THRESHOLD,
                linestyle="--")
        alerts = [r for r in series if r.alert and r.value is not None]
        ax.scatter([r.ts for r in alerts], [r.value for r in alerts], color=ALERT, zorder=3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.autofmt_xdate()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- helpers

class _Frame:
    """The plot area of a chart: scales from times and values to pixels, axes, labels."""

    def __init__(self, times: Sequence[datetime], values: Sequence[float], width: int, height: int):
        self.width, self.height = width, height
        self.left, self.right = PAD_LEFT, width - PAD_RIGHT
        self.top, self.bottom = PAD_TOP, height - PAD_BOTTOM
        stamps = [t.timestamp() for t in times]
        self.t0, self.t1 = (min(stamps), max(stamps)) if stamps else (0.0, 1.0)
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-12:
            pad = abs(hi) * 0.1 or 1.0
            lo, hi = lo - pad, hi + pad
        else:
            pad = (hi - lo) * 0.08
            lo, hi = (lo if lo == 0 else lo - pad), hi + pad  # counts start at 0, not below
        self.lo, self.hi = lo, hi
        self.times = times

    def x(self, t: datetime) -> float:
        if self.t1 == self.t0:
            return (self.left + self.right) / 2
        return self.left + (t.timestamp() - self.t0) / (self.t1 - self.t0) * (self.right - self.left)

    def y(self, v: float | None) -> float | None:
        if not _finite(v):
            return None
        return self.bottom - (v - self.lo) / (self.hi - self.lo) * (self.bottom - self.top)

    def open(self, title: str) -> str:
        w, h = self.width, self.height
        out = [(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
                'role="img" font-family="system-ui,sans-serif">'),
               f'<title>{escape(title)}</title>' if title else "",
               (f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
                f'height="{self.bottom - self.top}" fill="#fff" stroke="{GRID}"/>'),
               f'<text x="{self.left}" y="14" font-size="12" fill="{TEXT}">{escape(title)}</text>' if title else ""]
        for v, y in ((self.hi, self.top), (self.lo, self.bottom)):
            out.append(f'<text x="{self.left - 4}" y="{y + 4:.1f}" font-size="10" fill="{TEXT}" '
                       f'text-anchor="end">{fmt(v)}</text>')
        if self.times:
            span_days = (self.t1 - self.t0) > 86400
            first, last = min(self.times), max(self.times)
            for t, anchor, x in ((first, "start", self.left), (last, "end", self.right)):
                when = f"{t:%m-%d %H:%M}" if span_days else f"{t:%H:%M}"
                out.append(f'<text x="{x}" y="{self.height - 6}" font-size="10" fill="{TEXT}" '
                           f'text-anchor="{anchor}">{when}</text>')
        return "".join(out)

    def note(self, text: str) -> str:
        return (f'<text x="{(self.left + self.right) / 2}" y="{(self.top + self.bottom) / 2}" font-size="12" '
                f'fill="{TEXT}" text-anchor="middle">{escape(text)}</text>')

    def legend(self, entries: Sequence[tuple[str, str]]) -> str:
        out, x = [], self.right
        for name, colour in reversed(entries):
            x -= 8 + 7 * len(name)
            out.append(f'<text x="{x}" y="14" font-size="11" fill="{colour}">{escape(name)}</text>')
        return "".join(out)


def _path(xy: Sequence[tuple[float, float | None]], colour: str, dashed: bool = False, title: str = "") -> str:
    """A polyline through the points with a y, broken where one has none."""
    parts, pen_down = [], False
    for x, y in xy:
        if y is None:
            pen_down = False
            continue
        parts.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
        pen_down = True
    if not parts:
        return ""
    dash = ' stroke-dasharray="5,4"' if dashed else ""
    inner = f"<title>{escape(title)}</title>" if title else ""
    return f'<path d="{" ".join(parts)}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}>{inner}</path>'


def _per_point(threshold, n: int) -> list[float | None]:
    if threshold is None or isinstance(threshold, (int, float)):
        return [threshold] * n
    values = list(threshold)
    if len(values) != n:
        raise ValueError(f"{len(values)} thresholds for {n} points")
    return values


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def _last(values: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(values) if _finite(v)), None)


def _when(t: datetime) -> str:
    return f"{t:%Y-%m-%d %H:%M:%S}"


def _where(r: MonitorResult) -> str:
    """The deployment a result is of, as a person names it."""
    if r.endpoint:
        return f"{r.endpoint}/{r.deployment}" if r.deployment else r.endpoint
    return f"model v{r.model_version}" if r.model_version else "model"

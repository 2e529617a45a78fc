"""Self-contained HTML reports: image grids (inline PNG) and plots (inline SVG drawn here, so the
report needs no plotting library and opens anywhere, offline)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from typing import Sequence

import numpy as np
import torch

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
W, H, ML, MR, MT, MB = 460, 300, 58, 16, 34, 46


def image_grid_uri(images: torch.Tensor, nrow: int = 8, min_cell: int = 64) -> str:
    """uint8/float ``(N, C, H, W)`` -> ``data:image/png`` URI of a grid (nearest upscaling of tiny images)."""
    from PIL import Image

    x = images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.cpu()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    up = max(1, math.ceil(min_cell / max(h, w)))
    ncol = min(nrow, n)
    rows = math.ceil(n / ncol)
    pad = 2
    canvas = np.full((rows * (h * up + pad) + pad, ncol * (w * up + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = x[i].permute(1, 2, 0).numpy().repeat(up, 0).repeat(up, 1)
        y0, x0 = pad + r * (h * up + pad), pad + c * (w * up + pad)
        canvas[y0:y0 + h * up, x0:x0 + w * up] = tile
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (m * step) <= n:
            step *= m
            break
    t = math.ceil(lo / step) * step
    out = []
    while t <= hi + 1e-12:
        out.append(round(t, 10))
        t += step
    return out


class _Axes:
    def __init__(self, xlo, xhi, ylo, yhi, title, xlabel, ylabel):
        pad_y = (yhi - ylo) * 0.05 or 1.0
        self.xlo, self.xhi = xlo, (xhi if xhi > xlo else xlo + 1)
        self.ylo, self.yhi = ylo - pad_y, yhi + pad_y
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
                      f'font-size="11"><rect width="{W}" height="{H}" fill="white"/>',
                      f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13" font-weight="bold">'
                      f'{html.escape(title)}</text>',
                      f'<text x="{(ML + W - MR) / 2}" y="{H - 8}" text-anchor="middle">{html.escape(xlabel)}</text>',
                      f'<text transform="translate(14,{(MT + H - MB) / 2}) rotate(-90)" text-anchor="middle">'
                      f'{html.escape(ylabel)}</text>']
        for t in _ticks(self.xlo, self.xhi):
            x = self.px(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{H - MB}" x2="{x:.1f}" y2="{H - MB + 4}" stroke="#333"/>'
                              f'<text x="{x:.1f}" y="{H - MB + 16}" text-anchor="middle">{t:g}</text>')
        for t in _ticks(self.ylo, self.yhi):
            y = self.py(t)
            self.parts.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{ML - 5}" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
        self.parts.append(f'<rect x="{ML}" y="{MT}" width="{W - ML - MR}" height="{H - MT - MB}" fill="none" '
                          'stroke="#333"/>')

    def px(self, v):
        return ML + (v - self.xlo) / (self.xhi - self.xlo) * (W - ML - MR)

    def py(self, v):
        return H - MB - (v - self.ylo) / (self.yhi - self.ylo) * (H - MT - MB)

    def legend(self, labels):
        for i, lab in enumerate(labels):
            y = MT + 12 + 14 * i
            self.parts.append(f'<rect x="{W - MR - 130}" y="{y - 8}" width="10" height="10" '
                              f'fill="{COLORS[i % len(COLORS)]}"/><text x="{W - MR - 116}" y="{y + 1}">'
                              f'{html.escape(str(lab))[:22]}</text>')

    def svg(self):
        return "".join(self.parts) + "</svg>"


def svg_lines(series: dict, title: str, xlabel: str, ylabel: str) -> str:
    """One polyline with markers per label: ``{label: (xs, ys)}``."""
    xs = [float(v) for s in series.values() for v in s[0]]
    ys = [float(v) for s in series.values() for v in s[1] if math.isfinite(float(v))]
    if not xs or not ys:  # e.g. PSNR of identical runs is +inf everywhere
        ys = [0.0]
    ax = _Axes(min(xs), max(xs), min(ys), max(ys), title, xlabel, ylabel)
    for i, (lab, (sx, sy)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        pts = [(ax.px(float(a)), ax.py(float(b))) for a, b in zip(sx, sy) if math.isfinite(float(b))]
        ax.parts.append('<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>'.format(
            c, " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)))
        ax.parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in pts]
    ax.legend(series)
    return ax.svg()


def svg_histograms(data: dict, title: str, xlabel: str, bins: int = 30, lo=None, hi=None) -> str:
    """Overlaid density histograms (step outlines): ``{label: values}``."""
    arrs = {k: np.asarray(torch.as_tensor(v).detach().float().cpu()) for k, v in data.items()}
    lo = min(a.min() for a in arrs.values()) if lo is None else lo
    hi = max(a.max() for a in arrs.values()) if hi is None else hi
    hi = hi if hi > lo else lo + 1
    edges = np.linspace(lo, hi, bins + 1)
    dens = {k: np.histogram(a, edges, density=True)[0] for k, a in arrs.items()}
    ax = _Axes(lo, hi, 0, max(float(d.max()) for d in dens.values()), title, xlabel, "density")
    for i, (k, d) in enumerate(dens.items()):
        pts = []
        for j, v in enumerate(d):
            pts += [(ax.px(edges[j]), ax.py(v)), (ax.px(edges[j + 1]), ax.py(v))]
        c = COLORS[i % len(COLORS)]
        ax.parts.append('<polyline fill="{}" fill-opacity="0.15" stroke="{}" stroke-width="1.5" points="{}"/>'.format(
            c, c, " ".join(f"{a:.1f},{b:.1f}" for a, b in
                           [(ax.px(lo), ax.py(0))] + pts + [(ax.px(hi), ax.py(0))])))
    ax.legend(dens)
    return ax.svg()


def svg_scatter(points: dict, title: str, xlabel: str = "PC 1", ylabel: str = "PC 2", max_points: int = 1500) -> str:
    """Scatter of 2-D points per label: ``{label: (N, 2)}``."""
    pts = {k: np.asarray(torch.as_tensor(v).detach().float().cpu())[:max_points] for k, v in points.items()}
    allp = np.concatenate(list(pts.values()))
    ax = _Axes(float(allp[:, 0].min()), float(allp[:, 0].max()), float(allp[:, 1].min()), float(allp[:, 1].max()),
               title, xlabel, ylabel)
    for i, (k, p) in enumerate(pts.items()):
        c = COLORS[i % len(COLORS)]
        ax.parts += [f'<circle cx="{ax.px(a):.1f}" cy="{ax.py(b):.1f}" r="2" fill="{c}" fill-opacity="0.45"/>'
                     for a, b in p]
    ax.legend(pts)
    return ax.svg()


def pca_2d(*feature_sets: torch.Tensor) -> list[torch.Tensor]:
    """Project several feature sets on the top-2 principal axes of their union."""
    allf = torch.cat([f.double().cpu() for f in feature_sets])
    mu = allf.mean(0)
    _, _, v = torch.pca_lowrank(allf - mu, q=2, center=False, niter=4)
    return [((f.double().cpu() - mu) @ v).float() for f in feature_sets]


CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1200px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 16px;min-width:110px}
.k{color:#666;font-size:12px} .v{font-size:22px;font-weight:bold}
figure{display:inline-block;margin:8px;vertical-align:top}
figcaption{text-align:center;color:#555;font-size:13px} img{image-rendering:pixelated;max-width:560px}
table{border-collapse:collapse} td{border-bottom:1px solid #eee;padding:3px 10px;font-size:13px}
pre{background:#f6f6f6;padding:10px;overflow:auto}"""


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.5g}"
    return html.escape(str(v))


def write_report(path, title: str, metrics: dict, info: dict, grids: dict | None = None,
                 plots: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> None:
    """Write one HTML file (atomically): headline numbers, image grids, plots, then the full JSON."""
    from ..atomic import write_text

    write_text(path, render_report(title, metrics, info, grids, plots, notes))


def render_report(title: str, metrics: dict, info: dict, grids: dict | None = None,
                  plots: Sequence[tuple[str, str]] = (), notes: Sequence[str] = ()) -> str:
    """The report's HTML: headline numbers, image grids, plots, then the full JSON."""
    cards = "".join(f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{_fmt(v)}</div></div>'
                    for k, v in metrics.items() if isinstance(v, (int, float)))
    grid_html = "".join(f'<figure><img src="{uri}"/><figcaption>{html.escape(name)}</figcaption></figure>'
                        for name, uri in (grids or {}).items())
    plot_html = "".join(f'<figure>{svg}<figcaption>{html.escape(cap)}</figcaption></figure>' for cap, svg in plots)
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{_fmt(v)}</td></tr>" for k, v in info.items())
    note_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style>
</head><body><h1>{html.escape(title)}</h1><div class="cards">{cards}</div>
<h2>Samples</h2>{grid_html}<h2>Plots</h2>{plot_html}
<h2>Protocol</h2><table>{rows}</table><ul>{note_html}</ul>
<h2>All numbers</h2><pre>{html.escape(json.dumps(metrics, indent=2, default=str))}</pre></body></html>"""
    return doc

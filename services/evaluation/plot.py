"""Accuracy against IoU threshold, one line per adapter version (the paper's figure), drawn with PIL.

PIL rather than matplotlib: matplotlib is not a dependency of this project, and the figure is simple.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
WIDTH, HEIGHT = 720, 460
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 40, 60


def plot_accuracy(
    curves: Mapping[str, Mapping[float, float]], path: Path, title: str = "REC accuracy"
) -> Path:
    """Write a PNG of Acc@t (points) against t for every named curve; returns `path`."""
    if not curves:
        raise ValueError("nothing to plot")
    thresholds = sorted({t for curve in curves.values() for t in curve})
    top = min(100.0, max(10.0, (max(max(c.values()) for c in curves.values()) // 10 + 1) * 10))
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()

    def x_of(t: float) -> float:
        span = (thresholds[-1] - thresholds[0]) or 1.0
        return LEFT + (t - thresholds[0]) / span * (WIDTH - LEFT - RIGHT)

    def y_of(value: float) -> float:
        return HEIGHT - BOTTOM - value / top * (HEIGHT - TOP - BOTTOM)

    _axes(draw, font, thresholds, top, x_of, y_of)
    draw.text((LEFT, 12), title, fill="black", font=font)
    for index, (name, curve) in enumerate(curves.items()):
        color = PALETTE[index % len(PALETTE)]
        points = [(x_of(t), y_of(curve[t])) for t in thresholds if t in curve]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color)
        legend_y = TOP + 18 * index
        draw.line((WIDTH - RIGHT + 15, legend_y + 6, WIDTH - RIGHT + 35, legend_y + 6), fill=color, width=3)
        draw.text((WIDTH - RIGHT + 40, legend_y), name[:22], fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def _axes(
    draw: ImageDraw.ImageDraw,
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    thresholds: Sequence[float],
    top: float,
    x_of: Callable[[float], float],
    y_of: Callable[[float], float],
) -> None:
    x0, y0 = LEFT, HEIGHT - BOTTOM
    draw.line((x0, TOP, x0, y0, WIDTH - RIGHT, y0), fill="black", width=1)
    for step in range(0, int(top) + 1, 10):
        y = y_of(step)
        draw.line((x0 - 4, y, x0, y), fill="black")
        draw.line((x0 + 1, y, WIDTH - RIGHT, y), fill=(230, 230, 230))
        draw.text((x0 - 28, y - 6), f"{step}", fill="black", font=font)
    for t in thresholds:
        x = x_of(t)
        draw.line((x, y0, x, y0 + 4), fill="black")
        draw.text((x - 8, y0 + 8), f"{t:g}", fill="black", font=font)
    draw.text(((LEFT + WIDTH - RIGHT) / 2 - 40, HEIGHT - 28), "IoU threshold", fill="black", font=font)
    draw.text((8, TOP - 20), "Acc (%)", fill="black", font=font)

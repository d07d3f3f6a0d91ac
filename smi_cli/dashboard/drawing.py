"""Terminal drawing: eighth-block charts and half-block images (glyphs every font draws one cell wide)."""

from __future__ import annotations

import math

from PIL import Image
from rich.style import Style
from rich.text import Text

BLOCKS = " ▁▂▃▄▅▆▇█"


def resample(values: list[float], points: int) -> list[float]:
    """At most ``points`` values: the mean of each equal-width bucket of the series."""
    if len(values) <= points:
        return list(values)
    buckets = []
    for i in range(points):
        start = i * len(values) // points
        end = max((i + 1) * len(values) // points, start + 1)
        buckets.append(sum(values[start:end]) / (end - start))
    return buckets


def bar_chart(values: list[float], width: int, height: int, low: float | None = None, high: float | None = None) -> list[str]:
    """``values`` as ``height`` rows of eighth-block bars, one column per bucket of the series."""
    width, height = max(width, 1), max(height, 1)
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return [" " * width] * height
    columns = resample(finite, width)
    low = min(columns) if low is None else low
    high = max(columns) if high is None else high
    span = (high - low) or 1.0
    eighths = [max(1, round((v - low) / span * height * 8)) for v in columns]
    rows = []
    for row in range(height - 1, -1, -1):  # top row first
        rows.append("".join(BLOCKS[min(8, max(0, e - row * 8))] for e in eighths))
    return rows


def half_blocks(image: Image.Image, width: int, height: int) -> Text:
    """An RGB image in ``height`` rows of ``width`` cells, two pixels per cell ("▀")."""
    image = image.convert("RGB")
    scale = min(width / image.width, 2 * height / image.height)
    size = (max(1, int(image.width * scale)), max(2, int(image.height * scale) // 2 * 2))
    pixels = image.resize(size, Image.Resampling.NEAREST).load()
    text = Text()
    for y in range(0, size[1], 2):
        for x in range(size[0]):
            top, bottom = pixels[x, y], pixels[x, y + 1]
            text.append("▀", Style(color=f"rgb({top[0]},{top[1]},{top[2]})", bgcolor=f"rgb({bottom[0]},{bottom[1]},{bottom[2]})"))
        if y + 2 < size[1]:
            text.append("\n")
    return text

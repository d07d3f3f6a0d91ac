"""PNG grids of a synthetic batch, with stopped patches greyed out."""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smi_engine.errors import SmiError
from smi_engine.files import read_regular, write_bytes
from smi_engine.models import Normalizer
from smi_engine.vit.patches import PatchGrid

STOPPED_TINT = (0.42, 0.46, 0.56)  # slate grey: stands out from grey pixels of greyscale images
STOPPED_VISIBILITY = 0.15  # how much of a stopped patch still shows through
MIN_TILE = 96  # small images are enlarged (nearest neighbour) to at least this many pixels
#: What a run's ``preview`` event may name: one of its own previews, nothing else.
PREVIEW_NAME = re.compile(r"^previews/batch-\d{5}-it\d{5}\.png$")
PREVIEW_BYTES, PREVIEW_PIXELS = 32 * 2**20, 64 * 2**20  # a decompression bomb stops here


def read_preview(run_dir: Path, relative: str) -> Image.Image:
    """A preview a run's events name, as RGB: only a PNG of its own ``previews/`` folder, read
    without following links or waiting on a FIFO, bounded in bytes and in pixels."""
    if not isinstance(relative, str) or not PREVIEW_NAME.match(relative):
        raise SmiError(f"preview {relative!r} is not one of the run's previews/*.png: not shown")
    data = read_regular(Path(run_dir) / relative, PREVIEW_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > PREVIEW_PIXELS:
                    raise Image.DecompressionBombWarning(f"{image.width}x{image.height} pixels")
                return image.convert("RGB")
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise SmiError(f"preview {relative} is too large to show ({exc})") from None


def preview_pixels(
    images: torch.Tensor, keep: torch.Tensor | None, normalizer: Normalizer, grid: PatchGrid
) -> torch.Tensor:
    """(B, C, H, W) normalised -> (B, 3, H, W) in [0, 1] with stopped patches greyed."""
    pixels = normalizer.pixels(images)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if keep is not None:
        stopped = ~grid.pixel_mask(keep.cpu())
        tint = torch.tensor(STOPPED_TINT).view(1, 3, 1, 1)
        pixels = torch.where(stopped, (1 - STOPPED_VISIBILITY) * tint + STOPPED_VISIBILITY * pixels, pixels)
    return pixels


PAD = 2
COLUMNS = 8


def grid_image(pixels: torch.Tensor, columns: int = COLUMNS, pad: int = PAD) -> Image.Image:
    """Tile (B, 3, H, W) pixels in [0, 1] into one RGB image, ``columns`` per row."""
    b, _, h, w = pixels.shape
    scale = max(1, math.ceil(MIN_TILE / max(h, w)))
    columns = min(b, columns)
    rows = math.ceil(b / columns)
    tile_h, tile_w = h * scale, w * scale
    canvas = np.full((rows * (tile_h + pad) + pad, columns * (tile_w + pad) + pad, 3), 255, np.uint8)
    arr = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    for i in range(b):
        r, c = divmod(i, columns)
        y, x = pad + r * (tile_h + pad), pad + c * (tile_w + pad)
        canvas[y : y + tile_h, x : x + tile_w] = arr[i]
    return Image.fromarray(canvas)


def split_tiles(image: Image.Image, count: int, columns: int = COLUMNS, pad: int = PAD) -> list[Image.Image]:
    """The ``count`` tiles of a preview grid, in order (the inverse of ``grid_image``)."""
    columns = min(count, columns)
    rows = math.ceil(count / columns)
    tile_w = (image.width - pad) // columns - pad
    tile_h = (image.height - pad) // rows - pad
    return [
        image.crop((pad + c * (tile_w + pad), pad + r * (tile_h + pad), pad + c * (tile_w + pad) + tile_w, pad + r * (tile_h + pad) + tile_h))
        for r, c in (divmod(i, columns) for i in range(count))
    ]


def save_preview(
    path: Path, images: torch.Tensor, keep: torch.Tensor | None, normalizer: Normalizer, grid: PatchGrid
) -> None:
    buffer = io.BytesIO()
    grid_image(preview_pixels(images, keep, normalizer, grid)).save(buffer, format="PNG")
    write_bytes(path, buffer.getvalue())

"""A run's synthetic images out of smi: PNG files in an ImageFolder layout, or one ``.npz``.

Images are denormalised to pixels with the teacher's mean and std (what was optimised lives
in the normalised space: shown raw it "looks like noise"), the same conversion the previews use.
Patches outside an image's keep mask are black, or transparent (``stopped="transparent"``: an
alpha channel). The folder appears whole or not at all: it is written beside its target and
renamed into place.

    DIR/0/000000.png ...   one folder per class, named by the label, zero-padded so that the
                           sorted order torchvision's ImageFolder uses is the label order
    DIR/classes.json       folder name -> class name, where the teacher knows its classes
    DIR/images.csv         file, label, trajectory, emitted_at, patches (per image)
    DIR/pool.npz           (--format npz) pixels (N, H, W, C) uint8 as above, images (N, C, H, W)
                           float32 as stored, labels, keep, mean, std, trajectory, emitted_at
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from smi_engine.errors import SmiError
from smi_engine.pool import Pool, load_pool, run_teacher

FORMATS = ("png", "npz")
STOPPED = ("black", "transparent")


def export_pool(run_dir: str | Path, to: str | Path, format: str = "png", stopped: str = "black") -> dict[str, Any]:
    """Write the pool of ``run_dir`` into the new folder ``to``; returns what was written."""
    run_dir, to = Path(run_dir), Path(to)
    if format not in FORMATS:
        raise SmiError(f"unknown --format {format!r}: use {' or '.join(FORMATS)}")
    if stopped not in STOPPED:
        raise SmiError(f"unknown --stopped {stopped!r}: use {' or '.join(STOPPED)}")
    if to.exists() and (not to.is_dir() or any(to.iterdir())):
        raise SmiError(f"--to {to} already holds files: choose a new folder (nothing is ever overwritten)")
    spec = run_teacher(run_dir)
    if spec is None:
        raise SmiError(f"{run_dir} does not record its teacher (config.json): export a run made by smi invert or distill")
    pool = load_pool(run_dir)
    if pool.normalizer is None:
        raise SmiError(f"{run_dir} does not record the normalisation its images are stored in (an older run): "
                       "invert again with this smi")
    pixels = export_pixels(pool, transparent=stopped == "transparent")
    to.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{to.name}.", dir=to.parent))
    try:
        if format == "png":
            files = _write_image_folder(staging, pool, pixels, spec.classes)
        else:
            files = _write_npz(staging, pool, pixels)
        if to.exists():
            to.rmdir()  # empty, checked above
        os.replace(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"run_dir": str(run_dir), "to": str(to), "format": format, "stopped": stopped, "images": len(pool),
            "files": files}


def export_pixels(pool: Pool, transparent: bool = False) -> np.ndarray:
    """(N, H, W, C) uint8: the images as pixels, patches outside each keep mask black, or with
    an alpha channel that hides them (C grows by one)."""
    if transparent:
        pixels = torch.cat([pool.normalizer.pixels(pool.images), pool.pixel_mask().float().cpu()], dim=1)
    else:
        pixels = pool.pixels()
    return (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def _write_image_folder(folder: Path, pool: Pool, pixels: np.ndarray, classes: tuple[str, ...] | None) -> int:
    labels = pool.labels.tolist()
    width = max(1, len(str(max(max(labels), len(classes or ()) - 1))))
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}.get(pixels.shape[-1])
    if mode is None:
        raise SmiError(f"images with {pixels.shape[-1]} channels cannot be PNG files: use --format npz")
    names = []
    for index, (label, image) in enumerate(zip(labels, pixels)):
        name = f"{label:0{width}d}/{index:06d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if mode == "L" else image, mode).save(buffer, format="PNG")
        (folder / name).write_bytes(buffer.getvalue())
        names.append(name)
    with open(folder / "images.csv", "w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["file", "label", "trajectory", "emitted_at", "patches"])
        for i, name in enumerate(names):
            out.writerow([name, labels[i], _at(pool.trajectory, i), _at(pool.emitted_at, i), int(pool.keep[i].sum())])
    if classes:
        (folder / "classes.json").write_text(json.dumps({f"{k:0{width}d}": v for k, v in enumerate(classes)}, indent=2) + "\n")
    return len(names)


def _at(values: torch.Tensor | None, index: int) -> int | str:
    return "" if values is None else int(values[index])


def _write_npz(folder: Path, pool: Pool, pixels: np.ndarray) -> int:
    arrays = {"pixels": pixels, "images": pool.images.numpy(), "labels": pool.labels.numpy(), "keep": pool.keep.numpy(),
              "mean": np.asarray(pool.normalizer.mean, np.float32), "std": np.asarray(pool.normalizer.std, np.float32)}
    for key in ("trajectory", "emitted_at"):
        if getattr(pool, key) is not None:
            arrays[key] = getattr(pool, key).numpy()
    np.savez_compressed(folder / "pool.npz", **arrays)
    return 1

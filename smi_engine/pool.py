"""Synthetic data on disk: one safetensors shard per inverted batch, read back as a Dataset.

Each shard holds ``images`` (M, C, H, W) float32 in the teacher's normalised space, ``labels``
(M,) int64 and ``keep`` (M, rows, cols) bool: the patches each image holds. Pixels outside the
mask keep whatever they were when the image was made; consumers decide whether to drop those
patches as tokens (ViTs) or blank them to the normaliser's zero (other models). Inverted shards
also hold ``trajectory`` (M,) int64, the run-wide index of the trajectory an image comes from,
and ``emitted_at`` (M,) int64, the iteration it was made at: a batch of B trajectories under an
emitting selection (Patch Rebirth) holds E * B images, each stop's B in order, then the final B.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch.utils.data import Dataset

from smi_engine.errors import SmiError
from smi_engine.files import atomic_path, open_regular, own_folder, read_json
from smi_engine.models import ModelSpec, Normalizer
from smi_engine.vit.patches import image_pixel_mask

SHARD_PATTERN = re.compile(r"^batch-(\d+)-r(\d+)\.safetensors$")


def shard_name(batch: int, rank: int) -> str:
    return f"batch-{batch:05d}-r{rank}.safetensors"


def write_shard(pool_dir: Path, batch: int, rank: int, pool: "Pool", metadata: dict[str, str]) -> Path:
    path = pool_dir / shard_name(batch, rank)
    tensors = {
        "images": pool.images.detach().float().cpu().contiguous(),
        "labels": pool.labels.detach().long().cpu().contiguous(),
        "keep": pool.keep.detach().bool().cpu().contiguous(),
    }
    for key in OPTIONAL_FIELDS:
        if getattr(pool, key) is not None:
            tensors[key] = getattr(pool, key).detach().long().cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    return path


def shard_batches(pool_dir: Path) -> dict[int, Path]:
    """Batch index -> shard path, for every finished shard in a pool folder."""
    found = {}
    if own_folder(pool_dir):
        for path in pool_dir.iterdir():
            match = SHARD_PATTERN.match(path.name)
            if match:
                found[int(match.group(1))] = path
    return dict(sorted(found.items()))


#: Per-image provenance that inverted shards carry and older or hand-made ones may lack.
OPTIONAL_FIELDS = ("trajectory", "emitted_at")


@dataclass
class Pool:
    """Synthetic images with what each holds: ``images`` (N, C, H, W) float32 in the
    ``normalizer``'s space (the teacher's, where known), ``labels`` (N,), ``keep`` (N, rows,
    cols) bool, and where inverted, the ``trajectory`` and iteration (``emitted_at``) of each."""

    images: torch.Tensor
    labels: torch.Tensor
    keep: torch.Tensor
    trajectory: torch.Tensor | None = None
    emitted_at: torch.Tensor | None = None
    normalizer: Normalizer | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def kept_fraction(self) -> float:
        return float(self.keep.float().mean()) if len(self) else 0.0

    def pixels(self) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] on the CPU: the images as pictures (what previews and ``smi
        export`` show), patches outside each keep mask black."""
        return self.stored_in().pixels(self.images) * self.pixel_mask().cpu()

    def stored_in(self) -> Normalizer:
        """The normalisation the images are stored in, or a one-line error where it is unknown."""
        if self.normalizer is None:
            raise SmiError("this pool does not know the normalisation its images are stored in: set pool.normalizer "
                           "to the teacher's (smi_engine.models.Normalizer(mean, std))")
        return self.normalizer

    def pixel_mask(self) -> torch.Tensor:
        """(N, 1, H, W) bool: the pixels of each image's kept patches."""
        return image_pixel_mask(self.images, self.keep)

    def select(self, rows: torch.Tensor) -> "Pool":
        """The images at ``rows`` (indices or a bool mask), with their provenance."""
        take = {key: getattr(self, key) for key in ("images", "labels", "keep", *OPTIONAL_FIELDS)}
        return Pool(**{k: None if v is None else v[rows] for k, v in take.items()}, normalizer=self.normalizer)

    def renormalized(self, target: Normalizer) -> "Pool":
        """The same images stored in ``target``'s normalisation (another model's input)."""
        if self.stored_in() == target:
            return self
        images = target.normalize(self.normalizer.denormalize(self.images))
        return replace(self, images=images, normalizer=target)

    @staticmethod
    def concat(pools: list["Pool"]) -> "Pool":
        """One pool of several in one normalisation (provenance kept where every part has it)."""
        if len({p.normalizer for p in pools}) > 1:
            raise SmiError("pools stored in different normalisations cannot be joined: renormalise them first")
        optional = {key: torch.cat([getattr(p, key) for p in pools]) if all(getattr(p, key) is not None for p in pools)
                    else None for key in OPTIONAL_FIELDS}
        return Pool(*(torch.cat([getattr(p, key) for p in pools]) for key in ("images", "labels", "keep")),
                    **optional, normalizer=pools[0].normalizer)


def run_teacher(run_dir: str | Path) -> ModelSpec | None:
    """The teacher whose normalisation a run's pool is stored in (an inversion's model, a
    distillation's teacher), or None for a bare pool folder or a run that does not record it."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        recorded = read_json(path)
    except (OSError, ValueError) as exc:
        raise SmiError(f"{path} is unreadable ({exc}): its pool's normalisation is unknown; re-run it") from None
    config = recorded.get("config", {}) if isinstance(recorded, dict) else None
    spec = (config.get("model") or config.get("teacher")) if isinstance(config, dict) else None
    return ModelSpec.from_dict(spec) if isinstance(spec, dict) else None


def load_pool(run_dir: str | Path) -> Pool:
    """Every shard of an inverted run directory (or of a bare pool folder), in batch order, with
    the normalisation its images are stored in where the run records it."""
    run_dir = Path(run_dir)
    pool_dir = run_dir / "pool" if own_folder(run_dir / "pool") else run_dir
    shards = shard_batches(pool_dir)
    if not shards:
        raise SmiError(f"{run_dir} holds no synthetic images (no pool/*.safetensors): run `smi invert --out {run_dir}` first")
    parts = []
    for path in shards.values():
        try:
            with os.fdopen(open_regular(path, os.O_RDONLY), "rb") as handle:  # never through a link
                part = load(handle.read())
        except (SafetensorError, OSError) as exc:
            raise SmiError(f"pool shard {path} is unreadable ({exc}): delete it and `smi invert --resume`") from None
        check_shard(path, part)
        parts.append(part)
    teacher = run_teacher(run_dir) if pool_dir != run_dir else None
    normalizer = Normalizer(teacher.mean, teacher.std) if teacher and teacher.mean and teacher.std else None
    try:
        return Pool.concat([Pool(**{k: part.get(k) for k in ("images", "labels", "keep", *OPTIONAL_FIELDS)},
                                 normalizer=normalizer) for part in parts])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise SmiError(f"pool shards in {pool_dir} do not belong together ({exc}): keep one run per folder") from None


def check_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A shard is what ``write_shard`` writes, or a one-line error naming the file and the field:
    float32 finite images (M, C, H, W), int64 labels and bool keep masks for the same M images, a
    mask grid that divides the image, and at least one patch in every image."""
    def bad(field: str, why: str) -> SmiError:
        return SmiError(f"pool shard {path}: {field} {why}; delete the shard (smi invert --resume remakes it)")

    for key, dtype in (("images", torch.float32), ("labels", torch.int64), ("keep", torch.bool)):
        if key not in tensors:
            raise bad(key, "is missing")
        if tensors[key].dtype != dtype:
            raise bad(key, f"is {tensors[key].dtype}, not {dtype}")
    images, labels, keep = tensors["images"], tensors["labels"], tensors["keep"]
    if images.dim() != 4 or labels.dim() != 1 or keep.dim() != 3:
        raise bad("images/labels/keep", f"have shapes {tuple(images.shape)}/{tuple(labels.shape)}/{tuple(keep.shape)}")
    if not len(images) == len(labels) == len(keep):
        raise bad("labels/keep", f"count {len(labels)}/{len(keep)} for {len(images)} images")
    (h, w), (rows, cols) = images.shape[2:], keep.shape[1:]
    if not (0 < rows <= h and 0 < cols <= w and h % rows == 0 and w % cols == 0):
        raise bad("keep", f"is a {rows}x{cols} grid, which does not tile {h}x{w} images")
    if not bool(torch.isfinite(images).all()):
        raise bad("images", "hold NaN or infinite values")
    if len(keep) and not bool(keep.flatten(1).any(1).all()):
        raise bad("keep", "leaves an image with no patch")
    if bool((labels < 0).any()):
        raise bad("labels", "hold a negative class")


class PoolDataset(Dataset):
    """(image, label, keep) triples of a pool, for DataLoaders."""

    def __init__(self, pool: Pool):
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, index: int):
        return self.pool.images[index], self.pool.labels[index], self.pool.keep[index]

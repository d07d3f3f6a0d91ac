"""Where calibration (and distillation) images come from: ``--calib RUN_DIR | noise | real:SPEC``.

Synthetic pools are fed the way they were made: to a ViT with the same patch grid as sparse
tokens (stopped patches dropped; images keeping different numbers of patches, as Patch
Rebirth's, run in groups of equal count); to any other model, or with ``sparse="blanked"``, as
whole images with stopped patches at the normaliser's zero. Images are converted from the
pool's normalisation to the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from smi_engine.data import ModelInput, load_data, loader
from smi_engine.errors import SmiError
from smi_engine.models import Normalizer
from smi_engine.pool import Pool, load_pool
from smi_engine.vit.patches import blank_stopped
from smi_engine.quantization.names import SPARSE_FEEDS, check_sparse_calib
from smi_engine.vit.sparse_vit import SparseViT


@dataclass
class Batch:
    images: torch.Tensor  # (B, C, H, W) in the model's normalised space
    keep: torch.Tensor | None  # (B, rows, cols) for sparse images, else None
    labels: torch.Tensor | None = None

    def by_kept_count(self) -> list["Batch"]:
        """This batch split into batches whose images keep the same number of patches."""
        if self.keep is None:
            return [self]
        return [Batch(self.images[rows], self.keep[rows], None if self.labels is None else self.labels[rows])
                for rows in kept_count_groups(self.keep)]


def kept_count_groups(keep: torch.Tensor) -> list[torch.Tensor]:
    """The rows of a (B, rows, cols) keep mask grouped by how many patches they keep, fewest first."""
    counts = keep.flatten(1).sum(1)
    return [torch.nonzero(counts == c).squeeze(1) for c in counts.unique()]


class ModelFeeder:
    """Runs a model on (possibly sparse) images: sparse tokens where the model can drop them.

    A model that feeds sparse images its own way (a quantisation scheme's model with
    ``forward_masked(images, keep)`` and ``grid``) is asked to; a timm ViT is fed the kept
    patches as tokens; any other model gets stopped patches blanked to the normaliser's zero.
    """

    def __init__(self, model: nn.Module, normalizer: Normalizer, sparse: str = "tokens"):
        check_sparse_calib(sparse, SPARSE_FEEDS)
        self.model, self.normalizer, self.sparse = model, normalizer, sparse
        self.model_input = ModelInput.for_model(model, normalizer)
        self.masked, self.grid = None, None
        if sparse == "blanked":
            return
        if hasattr(model, "forward_masked"):
            self.masked, self.grid = model.forward_masked, model.grid
        else:
            try:
                vit = SparseViT(model)
                self.masked, self.grid = vit.forward_images, vit.grid
            except SmiError:
                pass

    def for_model(self, model: nn.Module) -> "ModelFeeder":
        """A feeder of another model (a quantised model's float reference), fed the same way."""
        return ModelFeeder(model, self.normalizer, self.sparse)

    def fits(self, images: torch.Tensor) -> bool:
        """Whether images already have this model's input size."""
        mi = self.model_input
        return tuple(images.shape[1:]) == (mi.channels, mi.height, mi.width)

    def __call__(self, batch: Batch, source: Normalizer) -> torch.Tensor:
        """Logits for a batch stored in the ``source`` normalisation."""
        images, keep = batch.images, batch.keep
        sparse = (keep is not None and self.masked is not None and self.fits(images)
                  and tuple(keep.shape[1:]) == (self.grid.rows, self.grid.cols))
        if keep is not None and not sparse:
            images, keep = blank_stopped(images, keep), None
        if source != self.normalizer or not self.fits(images):
            images = self.model_input(source.denormalize(images).clamp(0, 1))
        return self._masked(images, keep) if keep is not None else self.model(images)

    def _masked(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        groups = kept_count_groups(keep)
        if len(groups) == 1:
            return self.masked(images, keep)
        logits = torch.cat([self.masked(images[rows], keep[rows]) for rows in groups])
        return logits[torch.argsort(torch.cat(groups))]


def calibration_batches(source: str | Pool, size: int, batch_size: int, model_input: ModelInput,
                        generator: torch.Generator) -> tuple[Iterator[Batch], Normalizer, str]:
    """Batches of ``size`` calibration images, the normalisation they are in, and a label.
    ``source``: ``noise``, ``real:SPEC``, a run directory, or a pool in memory."""
    if isinstance(source, Pool):
        return _chosen(source, size, batch_size, generator, "the pool"), source.stored_in(), "pool in memory"
    if source == "noise":
        shape = (model_input.channels, model_input.height, model_input.width)

        def noise() -> Iterator[Batch]:
            for start in range(0, size, batch_size):
                yield Batch(torch.randn(min(batch_size, size - start), *shape, generator=generator), None)

        return noise(), model_input.normalizer, "noise"
    if source.startswith("real:"):
        splits = load_data(source[len("real:"):])
        subset = torch.utils.data.Subset(splits.train, torch.randperm(len(splits.train), generator=generator)[:size].tolist())
        batches = (Batch(images, None, labels) for images, labels in loader(subset, model_input, batch_size))
        return batches, model_input.normalizer, source
    path = Path(source)
    if not path.is_dir():
        raise SmiError(f"--calib {source!r} is neither noise, real:SPEC nor a run directory: invert one with `smi invert --out DIR`")
    pool = load_pool(path)
    if pool.normalizer is None:
        raise SmiError(f"{path} does not record the normalisation its images are stored in: pass a run directory made "
                       "by smi invert")
    return _chosen(pool, size, batch_size, generator, str(path)), pool.normalizer, str(path)


def _chosen(pool: Pool, size: int, batch_size: int, generator: torch.Generator, name: str) -> Iterator[Batch]:
    """``size`` images of the pool drawn at random, in batches."""
    if len(pool) < size:
        raise SmiError(f"{name} holds {len(pool)} synthetic images but --calib-size is {size}: invert more batches or lower --calib-size")
    return _pool_batches(pool.select(torch.randperm(len(pool), generator=generator)[:size]), batch_size)


def _pool_batches(pool: Pool, batch_size: int) -> Iterator[Batch]:
    for start in range(0, len(pool), batch_size):
        sl = slice(start, start + batch_size)
        keep = pool.keep[sl]
        yield Batch(pool.images[sl], None if bool(keep.all()) else keep, pool.labels[sl])

"""A batch of images under inversion, held as patches so that every per-iteration operation
costs in proportion to the patches still being inverted.

``param`` (B, K, D) holds the kept patches (the optimiser's leaf tensor); ``store`` (B, N, D)
holds every patch, stopped ones frozen. Feeding the teacher and the total-variation prior read
pixels through index maps instead of building full images; a full image is only materialised
when a loss asks for it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from smi_engine.vit.augment import Jitter
from smi_engine.vit.patches import PatchGrid


@functools.lru_cache(maxsize=8)
def _pixel_index(grid: PatchGrid, device: torch.device) -> torch.Tensor:
    """(C, H, W): each pixel's flat index in patch layout (patch * D + element)."""
    flat = torch.arange(grid.num_patches * grid.patch_dim, device=device).view(1, grid.num_patches, grid.patch_dim)
    return grid.unpatchify(flat)[0]


# The seed's four neighbour directions (dy, dx): right, down, down-left, down-right.
TV_OFFSETS = ((0, 1), (1, 0), (1, -1), (1, 1))


@functools.lru_cache(maxsize=8)
def _edge_elements(grid: PatchGrid, device: torch.device) -> torch.Tensor:
    """(E,): the elements of a patch on its border, the only ones with a neighbour in another patch."""
    border = torch.ones(grid.patch_h, grid.patch_w, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    positions = border.flatten().nonzero().flatten()
    return (torch.arange(grid.channels).view(-1, 1) * (grid.patch_h * grid.patch_w) + positions).flatten().to(device)


@functools.lru_cache(maxsize=16)
def _neighbour_index(grid: PatchGrid, device: torch.device, backward: bool = False) -> torch.Tensor:
    """(4, N, E): per direction, for each patch's border elements (``_edge_elements``), the flat
    patch-layout index of the element's neighbour (the one before it with ``backward``), or -1
    outside the image."""
    index = _pixel_index(grid, device)
    _, h, w = index.shape
    maps = []
    for dy, dx in TV_OFFSETS:
        dy, dx = (-dy, -dx) if backward else (dy, dx)
        neighbour = torch.full_like(index, -1)
        y0, y1, x0, x1 = max(0, -dy), h - max(0, dy), max(0, -dx), w - max(0, dx)
        neighbour[:, y0:y1, x0:x1] = index[:, y0 + dy : y1 + dy, x0 + dx : x1 + dx]
        maps.append(grid.patchify(neighbour[None])[0][:, _edge_elements(grid, device)])
    return torch.stack(maps)


def _neighbour_slices(h: int, w: int) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Per direction, the two slices of a (..., h, w) array whose difference is every pair of
    neighbours inside it: of a whole image, or of one patch (its inner pairs; only those across
    a patch's edge need index maps)."""
    return [((Ellipsis, slice(0, h - dy), slice(max(0, -dx), w - max(0, dx))),
             (Ellipsis, slice(dy, h), slice(max(0, dx), w - max(0, -dx)))) for dy, dx in TV_OFFSETS]


class _WithinPatchSums(torch.autograd.Function):
    """(B, K, D) patches -> (4,) per direction the sum of squares (or of absolute values) of the
    differences inside each patch. Written by hand: autograd's version of these slices spends
    most of its time zero-filling and copying slice gradients."""

    @staticmethod
    def forward(ctx, patches: torch.Tensor, grid: PatchGrid, squared: bool) -> torch.Tensor:
        ctx.save_for_backward(patches)
        ctx.grid, ctx.squared = grid, squared
        x = patches.view(*patches.shape[:2], grid.channels, grid.patch_h, grid.patch_w)
        diffs = (x[first] - x[second] for first, second in _neighbour_slices(grid.patch_h, grid.patch_w))
        return torch.stack([(d.square() if squared else d.abs()).sum() for d in diffs])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (patches,) = ctx.saved_tensors
        grid = ctx.grid
        x = patches.view(*patches.shape[:2], grid.channels, grid.patch_h, grid.patch_w)
        out = torch.zeros_like(x)
        for (first, second), weight in zip(_neighbour_slices(grid.patch_h, grid.patch_w), grad):
            diff = x[first] - x[second]
            slope = diff.mul_(2 * weight) if ctx.squared else diff.sign_().mul_(weight)
            out[first] += slope
            out[second] -= slope
        return out.view_as(patches), None, None


@dataclass
class NeighbourDifferences:
    """The image prior's pixel differences over the whole image, stopped pixels frozen, in the
    seed's four directions (right, down, down-left, down-right).

    ``patches`` (B, K, D): the kept patches, whose inner pairs are read off them directly;
    ``across`` (B, 4, M): every pair across a kept patch's edge (zeros pad), so gradients flow;
    ``frozen_squares``/``frozen_absolute`` (4,): sums over the pairs of two stopped pixels,
    constants of the stage; ``counts`` (4,): pairs per direction in the whole batch.
    """

    patches: torch.Tensor
    grid: PatchGrid
    across: torch.Tensor
    frozen_squares: torch.Tensor
    frozen_absolute: torch.Tensor
    counts: torch.Tensor

    def _per_direction(self, squared: bool) -> torch.Tensor:
        across = self.across.square() if squared else self.across.abs()
        return _WithinPatchSums.apply(self.patches, self.grid, squared) + across.sum(dim=(0, 2))

    def l2(self) -> torch.Tensor:
        """Sum over directions of the l2 norm of the differences (the seed's ``loss_var_l2``)."""
        squares = self._per_direction(squared=True) + self.frozen_squares
        return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt().sum()

    def l1(self) -> torch.Tensor:
        """Sum over directions of the mean absolute difference (the seed's ``loss_var_l1``)."""
        return ((self._per_direction(squared=False) + self.frozen_absolute) / self.counts.clamp_min(1)).sum()


@functools.lru_cache(maxsize=512)
def _jitter_elements(grid: PatchGrid, dy: int, dx: int, flip: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """For each element of a token under a roll by (dy, dx) (and flip): which of the four
    candidate source patches holds its pixel (0: same, 1: left, 2: up, 3: up-left), and the
    element index inside that patch. Both (D,)."""
    ph, pw = grid.patch_h, grid.patch_w
    i = torch.arange(ph).view(ph, 1).expand(ph, pw)
    j = torch.arange(pw).view(1, pw).expand(ph, pw)
    if flip:
        j = pw - 1 - j
    i, j = i - dy % ph, j - dx % pw  # position inside the source patch, negative: the one above/left
    which = 2 * (i < 0).long() + (j < 0).long()
    inner = torch.remainder(i, ph) * pw + torch.remainder(j, pw)
    element = torch.arange(grid.channels).view(-1, 1) * (ph * pw) + inner.flatten().view(1, -1)
    return which.flatten().repeat(grid.channels).to(device), element.flatten().to(device)


def _pack(mask: torch.Tensor, *columns: tuple[torch.Tensor, float | int]) -> list[torch.Tensor]:
    """Keep the entries of (b, 4, M) ``columns`` where ``mask`` holds, moved to the front of the
    last dimension, cut to the longest row, the rest filled with each column's padding value."""
    count = mask.sum(dim=-1, keepdim=True)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[..., : int(count.max())]
    filled = torch.arange(order.shape[-1], device=mask.device) < count
    return [torch.where(filled, values.gather(-1, order), padding) for values, padding in columns]


class SparseImage:
    def __init__(self, grid: PatchGrid, store: torch.Tensor, kept: torch.Tensor, param: torch.Tensor | None = None):
        self.grid = grid
        self.store = store  # (B, N, D)
        self.kept = kept  # (B, K) sorted
        source = store.gather(1, self._expand(kept)) if param is None else param
        self.param = source.detach().clone().requires_grad_(True)
        self._index_kept_set()

    def _expand(self, index: torch.Tensor) -> torch.Tensor:
        return index.unsqueeze(-1).expand(-1, -1, self.grid.patch_dim)

    def _index_kept_set(self) -> None:
        """Rebuild what depends on the kept set (once per stage, not per iteration)."""
        b, k = self.kept.shape
        device = self.kept.device
        self.row_of = torch.full((b, self.grid.num_patches), -1, dtype=torch.long, device=device)
        self.row_of.scatter_(1, self.kept, torch.arange(k, device=device).expand(b, -1))
        self._index_prior()

    def _index_prior(self) -> None:
        """The image prior's pairs across a kept patch's edge, per direction, packed (the pairs
        inside a patch are slices, ``_neighbour_slices``): kept-kept pairs as two indices
        into the flattened kept patches (each pair once, from its first pixel), kept-stopped
        pairs (either order) as one index and the stopped pixel's frozen value. Only border
        elements are looked at (60 of a 16x16 patch's 256): a stop re-indexes 10x faster.
        Padding points at an extra zero element, so it adds nothing. While dense, every image
        shares one map."""
        rows, kept = (self.row_of[:1], self.kept[:1]) if self.dense else (self.row_of, self.kept)
        b, k = kept.shape
        d = self.grid.patch_dim
        edge = _edge_elements(self.grid, kept.device)
        own = (torch.arange(k, device=kept.device).view(-1, 1) * d + edge).flatten().expand(b, 4, -1)  # (b, 4, K*E)
        store = self.store[: len(rows)].flatten(1)

        def partners(backward: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            target = _neighbour_index(self.grid, kept.device, backward)[:, kept].movedim(0, 1).flatten(2)  # (b, 4, K*E)
            row = rows.gather(1, (target.clamp_min(0) // d).flatten(1)).view_as(target)
            frozen = store.gather(1, target.clamp_min(0).flatten(1)).view_as(target)
            return target >= 0, torch.where(row >= 0, row * d + target % d, 0), row, frozen

        inside, partner, row, frozen = partners(backward=False)
        pad = k * d
        across = row != own.div(d, rounding_mode="floor")  # the partner is another kept patch (or stopped)
        self.tv_pairs = _pack(inside & (row >= 0) & across, (own, pad), (partner, pad))
        stopped_after = _pack(inside & (row < 0), (own, pad), (frozen, 0.0))
        if self.dense:
            self.tv_frozen_partners = stopped_after
        else:
            inside, _, row, frozen = partners(backward=True)
            stopped_before = _pack(inside & (row < 0), (own, pad), (frozen, 0.0))
            self.tv_frozen_partners = [torch.cat([a, c], dim=2) for a, c in zip(stopped_after, stopped_before)]
        self._frozen_pairs()

    def _frozen_pairs(self) -> None:
        """Per direction: the sums over pairs of two stopped pixels, and the pairs in the batch."""
        images = self.grid.unpatchify(self.store)
        stopped = self.grid.pixel_mask(~self.keep_mask()).to(images.dtype).expand_as(images)
        squares, absolute, counts = [], [], []
        for first, second in _neighbour_slices(*images.shape[-2:]):
            diff = (images[first] - images[second]) * stopped[first] * stopped[second]
            squares.append(diff.pow(2).sum())
            absolute.append(diff.abs().sum())
            counts.append(diff.numel())
        self.tv_frozen_squares, self.tv_frozen_absolute = torch.stack(squares), torch.stack(absolute)
        self.tv_counts = torch.tensor(counts, dtype=self.store.dtype, device=self.store.device)

    @property
    def dense(self) -> bool:
        return self.kept.shape[1] == self.grid.num_patches

    def keep_mask(self) -> torch.Tensor:
        return self.grid.mask_from_indices(self.kept)

    def patches(self, param: torch.Tensor | None = None) -> torch.Tensor:
        """All patches (B, N, D), the kept ones taken (differentiably) from ``param``."""
        param = self.param if param is None else param
        return param if self.dense else self.store.scatter(1, self._expand(self.kept), param)

    def images(self, param: torch.Tensor | None = None) -> torch.Tensor:
        return self.grid.unpatchify(self.patches(param))

    def tokens(self, jitter: Jitter, param: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch vectors the teacher sees for the kept patches under ``jitter``, and their cells.

        Rolled by (dy, dx) = (qy*ph + ry, qx*pw + rx), a token's pixels come from at most four
        source patches (its cell minus (qy, qx), and the neighbours above/left of that), and
        which one and where inside it depends only on the pixel's place in the token. So the
        index work splits into a per-element part (D) and a per-token part (B, K, 4). Pixels
        of stopped source patches come, frozen, from the store.
        """
        param = self.param if param is None else param
        positions = jitter.positions(self.grid, self.kept)
        if jitter.is_identity:
            return param, positions
        grid, d = self.grid, self.grid.patch_dim
        which, element = _jitter_elements(grid, jitter.dy, jitter.dx, jitter.flip, param.device)
        rows, cols = positions // grid.cols, positions % grid.cols
        if jitter.flip:
            cols = grid.cols - 1 - cols
        base_r, base_c = rows - jitter.dy // grid.patch_h, cols - jitter.dx // grid.patch_w
        source = torch.stack([
            torch.remainder(base_r - dr, grid.rows) * grid.cols + torch.remainder(base_c - dc, grid.cols)
            for dr in (0, 1) for dc in (0, 1)
        ], dim=-1)  # (B, K, 4) the candidate source patches of each token
        source_row = self.row_of.gather(1, source.flatten(1)).view_as(source)  # -1: stopped
        # Per-token arithmetic on (B, K, 4) first, then one expansion to (B, K, D) by gather.
        pick = which.view(1, 1, -1).expand(*source.shape[:2], -1)
        kept_index = (source_row.clamp_min(0) * d).gather(2, pick) + element
        kept_values = param.flatten(1).gather(1, kept_index.flatten(1))
        if self.dense:
            return kept_values.view_as(kept_index), positions
        from_param = (source_row >= 0).gather(2, pick).flatten(1)
        frozen_values = self.store.flatten(1).gather(1, ((source * d).gather(2, pick) + element).flatten(1))
        return torch.where(from_param, kept_values, frozen_values).view_as(kept_index), positions

    def neighbour_differences(self, param: torch.Tensor | None = None) -> NeighbourDifferences:
        """The total-variation prior's differences over the whole image, stopped pixels frozen:
        the kept ones move against their kept and stopped neighbours alike (the seed's prior)."""
        param = self.param if param is None else param
        flat = torch.cat([param.flatten(1), param.new_zeros(len(param), 1)], dim=1)  # the padding's zero

        def take(index: torch.Tensor) -> torch.Tensor:
            return flat.gather(1, index.expand(len(flat), -1, -1).flatten(1)).view(len(flat), *index.shape[1:])

        first, second = self.tv_pairs
        own, frozen = self.tv_frozen_partners
        across = torch.cat([take(first) - take(second), take(own) - frozen.expand(len(flat), -1, -1)], dim=2)
        return NeighbourDifferences(param, self.grid, across, self.tv_frozen_squares, self.tv_frozen_absolute,
                                    self.tv_counts)

    def shrink(self, selected: torch.Tensor) -> None:
        """Stop all but the ``selected`` (B, K') rows of the kept set: commit their pixels to the
        store, re-index. The caller carries optimiser state over."""
        with torch.no_grad():
            self.store.scatter_(1, self._expand(self.kept), self.param)
            self.kept = self.kept.gather(1, selected)
            self.param = self.param.detach().gather(1, self._expand(selected)).requires_grad_(True)
        self._index_kept_set()

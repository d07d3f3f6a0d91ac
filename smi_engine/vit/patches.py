"""The patch grid of a ViT input: images <-> patch vectors, keep masks <-> index lists.

Patch vectors are laid out ``(C, patch_h, patch_w)`` flattened, the layout of a ViT's patch
embedding convolution weight, so embedding a patch vector is one matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchGrid:
    channels: int
    height: int
    width: int
    patch_h: int
    patch_w: int

    @property
    def rows(self) -> int:
        return self.height // self.patch_h

    @property
    def cols(self) -> int:
        return self.width // self.patch_w

    @property
    def num_patches(self) -> int:
        return self.rows * self.cols

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch_h * self.patch_w

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, C*ph*pw), patches in row-major grid order."""
        b = images.shape[0]
        x = images.reshape(b, self.channels, self.rows, self.patch_h, self.cols, self.patch_w)
        return x.permute(0, 2, 4, 1, 3, 5).reshape(b, self.num_patches, self.patch_dim)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, C*ph*pw) -> (B, C, H, W); inverse of patchify."""
        b = patches.shape[0]
        x = patches.reshape(b, self.rows, self.cols, self.channels, self.patch_h, self.patch_w)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, self.channels, self.height, self.width)

    def mask_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, K) patch indices -> (B, rows, cols) bool keep mask."""
        mask = torch.zeros(indices.shape[0], self.num_patches, dtype=torch.bool, device=indices.device)
        mask.scatter_(1, indices, True)
        return mask.view(-1, self.rows, self.cols)

    def pixel_mask(self, keep: torch.Tensor) -> torch.Tensor:
        """(B, rows, cols) bool -> (B, 1, H, W) bool, each patch's flag spread over its pixels."""
        mask = keep.repeat_interleave(self.patch_h, dim=1).repeat_interleave(self.patch_w, dim=2)
        return mask.unsqueeze(1)


def indices_from_mask(keep: torch.Tensor) -> torch.Tensor:
    """(B, rows, cols) bool with the same count per image -> (B, K) sorted patch indices."""
    flat = keep.flatten(1)
    counts = flat.sum(1)
    if counts.numel() and not bool((counts == counts[0]).all()):
        raise ValueError("every image of a batch must keep the same number of patches")
    # argsort of the negated flags puts kept indices first, in ascending order (stable sort).
    order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)
    return order[:, : int(counts[0]) if counts.numel() else 0]


def image_pixel_mask(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) bool: the pixels of each image's kept patches; the patch size follows from
    the image and mask shapes."""
    _, c, h, w = images.shape
    rows, cols = keep.shape[1:]
    return PatchGrid(c, h, w, h // rows, w // cols).pixel_mask(keep.to(images.device))


def blank_stopped(images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Stopped patches set to the normaliser's zero (the mean colour): for models that cannot
    drop tokens."""
    return images * image_pixel_mask(images, keep).to(images.device, images.dtype)

"""DeepInversion's jitter (random roll) and horizontal flip, made consistent with dropped tokens.

The image is rolled by whole pixels and flipped as in DeepInversion; each kept patch is then fed
as the token at the grid cell where the bulk of its pixels landed (the roll rounded to the
nearest whole patch, as the seed does), carrying that cell's position embedding. A roll by a
whole number of patches moves every kept patch intact, so the teacher sees exactly the same
patch vectors at shifted positions; a sub-patch roll also mixes in up to half a patch of each
neighbour, frozen pixels included, which is the jitter that regularises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from smi_engine.vit.patches import PatchGrid


@dataclass(frozen=True)
class Jitter:
    dy: int = 0
    dx: int = 0
    flip: bool = False

    @classmethod
    def sample(cls, grid: PatchGrid, fraction: float, flip: bool, generator: torch.Generator) -> "Jitter":
        """Offsets uniform in [-fraction*H, fraction*H] x [-fraction*W, fraction*W], flip with p=0.5."""
        lim_y, lim_x = int(grid.height * fraction), int(grid.width * fraction)
        dy = int(torch.randint(-lim_y, lim_y + 1, (1,), generator=generator))
        dx = int(torch.randint(-lim_x, lim_x + 1, (1,), generator=generator))
        flipped = bool(torch.rand(1, generator=generator) < 0.5)
        return cls(dy=dy, dx=dx, flip=flip and flipped)

    @property
    def is_identity(self) -> bool:
        return self.dy == 0 and self.dx == 0 and not self.flip

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        out = torch.roll(images, shifts=(self.dy, self.dx), dims=(2, 3)) if (self.dy or self.dx) else images
        return torch.flip(out, dims=(3,)) if self.flip else out

    def positions(self, grid: PatchGrid, positions: torch.Tensor) -> torch.Tensor:
        """Grid cells (B, K) -> where those patches sit after the roll and flip, sorted per image."""
        # floor(d / p + 1/2): the nearest whole-patch shift.
        shift_r = (2 * self.dy + grid.patch_h) // (2 * grid.patch_h)
        shift_c = (2 * self.dx + grid.patch_w) // (2 * grid.patch_w)
        rows = torch.remainder(positions // grid.cols + shift_r, grid.rows)
        cols = torch.remainder(positions % grid.cols + shift_c, grid.cols)
        if self.flip:
            cols = grid.cols - 1 - cols
        return torch.sort(rows * grid.cols + cols, dim=1).values

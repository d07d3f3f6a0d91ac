"""Patch-space images: tokens under jitter, the sparse image prior, stopping."""

import pytest
import torch

from smi_engine.vit.augment import Jitter
from smi_engine.vit.patches import PatchGrid, indices_from_mask
from smi_engine.vit.sparse_image import SparseImage

GRID = PatchGrid(channels=2, height=24, width=32, patch_h=4, patch_w=8)  # 6x4 grid, non-square


def _image(kept_count: int | None = None, seed: int = 0) -> SparseImage:
    g = torch.Generator().manual_seed(seed)
    store = torch.randn(3, GRID.num_patches, GRID.patch_dim, generator=g)
    n = GRID.num_patches if kept_count is None else kept_count
    kept = torch.stack([torch.randperm(GRID.num_patches, generator=g)[:n].sort().values for _ in range(3)])
    return SparseImage(GRID, store, kept)


def _reference_tokens(image: SparseImage, jitter: Jitter) -> tuple[torch.Tensor, torch.Tensor]:
    """What the teacher sees if the full image is augmented first and kept tokens picked after."""
    positions = jitter.positions(GRID, image.kept)
    full = GRID.patchify(jitter.apply(image.images()))
    return full.gather(1, positions.unsqueeze(-1).expand(-1, -1, GRID.patch_dim)), positions


def test_patchify_round_trip_and_layout():
    images = torch.randn(2, 2, 24, 32)
    patches = GRID.patchify(images)
    assert patches.shape == (2, 24, 64)
    torch.testing.assert_close(GRID.unpatchify(patches), images)
    # patch (row 1, col 2) holds pixels [4:8, 16:24], flattened (C, ph, pw)
    torch.testing.assert_close(patches[:, 1 * 4 + 2], images[:, :, 4:8, 16:24].reshape(2, -1))


def test_mask_and_index_round_trip():
    kept = torch.tensor([[0, 5, 23], [1, 2, 3]])
    mask = GRID.mask_from_indices(kept)
    assert mask.shape == (2, 6, 4) and int(mask.sum()) == 6
    torch.testing.assert_close(indices_from_mask(mask), kept)
    with pytest.raises(ValueError):
        indices_from_mask(torch.tensor([[[True, False]], [[True, True]]]))


@pytest.mark.parametrize("kept_count", [None, 10])
@pytest.mark.parametrize("jitter", [Jitter(0, 0, False), Jitter(3, -5, False), Jitter(-2, 7, True), Jitter(8, -16, True), Jitter(5, 3, True)])
def test_tokens_equal_augmenting_the_full_image_first(kept_count, jitter):
    image = _image(kept_count)
    tokens, positions = image.tokens(jitter)
    expected, expected_positions = _reference_tokens(image, jitter)
    torch.testing.assert_close(positions, expected_positions)
    torch.testing.assert_close(tokens, expected)


def test_whole_patch_roll_moves_kept_patches_intact_with_their_position():
    image = _image(10)
    jitter = Jitter(dy=4, dx=-8, flip=False)  # one patch down, one patch left
    tokens, positions = image.tokens(jitter)
    rows, cols = image.kept // GRID.cols, image.kept % GRID.cols
    moved = ((rows + 1) % GRID.rows) * GRID.cols + (cols - 1) % GRID.cols
    order = torch.argsort(moved, dim=1)
    torch.testing.assert_close(positions, moved.gather(1, order))
    torch.testing.assert_close(tokens, image.param.gather(1, order.unsqueeze(-1).expand(-1, -1, GRID.patch_dim)))


def test_flip_mirrors_columns_and_patch_content():
    image = _image(5)
    tokens, positions = image.tokens(Jitter(0, 0, True))
    cols = GRID.cols - 1 - image.kept % GRID.cols
    mirrored = (image.kept // GRID.cols) * GRID.cols + cols
    order = torch.argsort(mirrored, dim=1)
    torch.testing.assert_close(positions, mirrored.gather(1, order))
    flipped = image.param.view(3, -1, 2, 4, 8).flip(-1).reshape(3, -1, GRID.patch_dim)
    torch.testing.assert_close(tokens, flipped.gather(1, order.unsqueeze(-1).expand(-1, -1, GRID.patch_dim)))


def test_stopped_neighbours_feed_frozen_pixels_and_get_no_gradient():
    image = _image(10)
    tokens, _ = image.tokens(Jitter(2, 3, False))
    tokens.sum().backward()
    assert image.param.grad is not None
    assert image.store.grad is None and not image.store.requires_grad


def _reference_tv(images: torch.Tensor):
    """The seed's prior (``get_image_prior_losses``) on full images: every pair of neighbours,
    stopped pixels included (they are frozen in ``images``, so only kept pixels get gradients)."""
    diffs = (
        images[:, :, :, :-1] - images[:, :, :, 1:],
        images[:, :, :-1, :] - images[:, :, 1:, :],
        images[:, :, 1:, :-1] - images[:, :, :-1, 1:],
        images[:, :, :-1, :-1] - images[:, :, 1:, 1:],
    )
    return sum(d.abs().mean() for d in diffs), sum(torch.norm(d) for d in diffs)


def _tv(image: SparseImage):
    differences = image.neighbour_differences()
    return differences.l1(), differences.l2()


@pytest.mark.parametrize("kept_count", [None, 13, 1])
def test_neighbour_differences_give_the_seeds_prior_on_the_whole_image(kept_count):
    image = _image(kept_count)
    for got, want in zip(_tv(image), _reference_tv(image.images())):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kept_count", [None, 13, 1])
def test_neighbour_differences_give_the_seeds_gradients(kept_count):
    """Pairs inside a patch (slices) and across its edges (index maps) together push each kept
    pixel exactly as the seed's prior on the whole image does."""
    image = _image(kept_count)
    got_l1, got_l2 = _tv(image)
    (got_l1 + got_l2).backward()
    param = image.param.detach().clone().requires_grad_(True)
    want_l1, want_l2 = _reference_tv(image.images(param))
    (want_l1 + want_l2).backward()
    torch.testing.assert_close(image.param.grad, param.grad, rtol=1e-5, atol=1e-6)


def test_a_lone_kept_patch_is_pulled_towards_its_stopped_neighbours():
    image = _image(1)
    image.neighbour_differences().l2().backward()
    grad = GRID.unpatchify(image.store.new_zeros(image.store.shape).scatter(
        1, image.kept.unsqueeze(-1).expand(-1, -1, GRID.patch_dim), image.param.grad))
    border = GRID.pixel_mask(image.keep_mask()) & ~torch.nn.functional.max_pool2d(
        (~GRID.pixel_mask(image.keep_mask())).float(), 3, 1, 1).eq(0)
    assert bool((grad.abs().sum(1, keepdim=True)[border] > 0).all())  # every border pixel feels a pull


def test_dense_prior_is_the_seed_formula():
    image = _image()
    images = image.images()
    diff1 = images[:, :, :, :-1] - images[:, :, :, 1:]
    diff2 = images[:, :, :-1, :] - images[:, :, 1:, :]
    diff3 = images[:, :, 1:, :-1] - images[:, :, :-1, 1:]
    diff4 = images[:, :, :-1, :-1] - images[:, :, 1:, 1:]
    l2 = torch.norm(diff1) + torch.norm(diff2) + torch.norm(diff3) + torch.norm(diff4)
    l1 = diff1.abs().mean() + diff2.abs().mean() + diff3.abs().mean() + diff4.abs().mean()
    got_l1, got_l2 = _tv(image)
    torch.testing.assert_close(got_l2, l2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_l1, l1, rtol=1e-5, atol=1e-5)


def test_shrink_commits_pixels_and_keeps_only_the_selected_rows():
    image = _image(10)
    with torch.no_grad():
        image.param.add_(1.0)
    before = image.param.detach().clone()
    kept_before = image.kept.clone()
    selected = torch.tensor([[0, 3, 9]] * 3)
    image.shrink(selected)
    torch.testing.assert_close(image.kept, kept_before.gather(1, selected))
    torch.testing.assert_close(image.param, before.gather(1, selected.unsqueeze(-1).expand(-1, -1, GRID.patch_dim)))
    # the stopped rows' latest pixels now sit in the store, where nothing changes them any more
    stopped = kept_before[:, 1]
    torch.testing.assert_close(image.store[torch.arange(3), stopped], before[:, 1])
    assert image.param.is_leaf and image.param.requires_grad


@pytest.mark.parametrize("kept_count", [None, 9])
def test_prior_gradient_matches_autograd_through_the_full_image(kept_count):
    image = _image(kept_count)
    l1, l2 = _tv(image)
    (l1 + l2).backward()
    fast = image.param.grad.clone()
    image.param.grad = None
    ref_l1, ref_l2 = _reference_tv(image.images())
    (ref_l1 + ref_l2).backward()
    torch.testing.assert_close(fast, image.param.grad, rtol=1e-5, atol=1e-6)

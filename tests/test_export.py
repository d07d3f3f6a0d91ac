"""smi export: a run's images as pixels that other tools read (torchvision's ImageFolder, numpy)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from smi_engine.models import Normalizer
from smi_engine.pool import load_pool

from .conftest import TINY_MODEL_ARGS, assert_one_line_error, smi, tree_snapshot


@pytest.fixture(scope="module")
def pri_run(tmp_path_factory):
    """A Patch Rebirth run: 2 batches of 3 trajectories, 2 images each (12 images, 32 patches each)."""
    out = tmp_path_factory.mktemp("export") / "run"
    smi("invert", "--model", "vit_tiny_patch16_224", "--model-args", TINY_MODEL_ARGS, "--mean", "0.5", "--std", "0.5",
        "--iterations", "4", "--batch-size", "3", "--batches", "2", "--schedule", "every:2", "--selection", "pri",
        "--device", "cpu", "--out", out, "--quiet", check=True)
    return out


def _expected_pixels(run):
    pool = load_pool(run)
    pixels = Normalizer((0.5,), (0.5,)).denormalize(pool.images).clamp(0, 1)
    inside = pool.keep.repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x4 patches
    return pool, (pixels[:, 0] * 255).round().to(torch.uint8), inside


def test_png_export_is_an_image_folder_of_denormalised_pixels_with_stopped_patches_black(pri_run, tmp_path):
    to = tmp_path / "png"
    result = json.loads(smi("export", pri_run, "--to", to, "--json", check=True).stdout)
    assert result["images"] == 12 and result["files"] == 12
    pool, expected, inside = _expected_pixels(pri_run)
    folder = ImageFolder(str(to))
    assert len(folder) == 12 and folder.classes == sorted(folder.classes)
    assert [folder.class_to_idx[c] for c in folder.classes] == list(range(len(folder.classes)))
    by_file = {path.split("/")[-1]: label for path, label in folder.samples}
    for index in range(12):
        name = f"{index:06d}.png"
        assert int(folder.classes[by_file[name]]) == int(pool.labels[index])  # folder name = the label
        with Image.open(next(to.glob(f"*/{name}"))) as image:
            assert image.mode == "L" and image.size == (32, 32)
            array = torch.from_numpy(np.array(image))
        assert torch.equal(array[inside[index]], expected[index][inside[index]])
        assert int(array[~inside[index]].max()) == 0  # not in this image: black
    rows = (to / "images.csv").read_text().splitlines()
    assert rows[0] == "file,label,trajectory,emitted_at,patches" and len(rows) == 13
    assert rows[1].endswith(",0,2,32")  # trajectory 0, emitted at iteration 2, 32 of 64 patches


def test_transparent_export_hides_stopped_patches_in_an_alpha_channel(pri_run, tmp_path):
    to = tmp_path / "rgba"
    smi("export", pri_run, "--to", to, "--stopped", "transparent", "--quiet", check=True)
    pool, expected, inside = _expected_pixels(pri_run)
    with Image.open(next(to.glob("*/000004.png"))) as image:
        assert image.mode == "LA"
        grey, alpha = (torch.from_numpy(a.copy()) for a in np.asarray(image).transpose(2, 0, 1))
    assert torch.equal(alpha, inside[4].to(torch.uint8) * 255)
    assert torch.equal(grey, expected[4])  # the pixels themselves are all there, under the alpha


def test_npz_export_holds_the_arrays(pri_run, tmp_path):
    to = tmp_path / "npz"
    smi("export", pri_run, "--to", to, "--format", "npz", "--quiet", check=True)
    arrays = np.load(to / "pool.npz")
    pool, expected, inside = _expected_pixels(pri_run)
    assert np.array_equal(arrays["images"], pool.images.numpy()) and np.array_equal(arrays["keep"], pool.keep.numpy())
    assert np.array_equal(arrays["labels"], pool.labels.numpy())
    assert np.array_equal(arrays["trajectory"], pool.trajectory.numpy())
    assert arrays["pixels"].shape == (12, 32, 32, 1)
    assert np.array_equal(arrays["pixels"][..., 0], (expected * inside).numpy())
    assert arrays["mean"].tolist() == [0.5] and arrays["std"].tolist() == [0.5]


def test_export_never_overwrites_and_bad_options_write_nothing(pri_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "mine.txt").write_text("keep me")
    before = tree_snapshot(tmp_path)
    assert_one_line_error(smi("export", pri_run, "--to", taken), "already holds files", "choose a new folder")
    assert_one_line_error(smi("export", pri_run, "--to", tmp_path / "x", "--format", "tiff"), "unknown --format 'tiff'")
    assert_one_line_error(smi("export", pri_run, "--to", tmp_path / "x", "--stopped", "grey"), "unknown --stopped 'grey'")
    assert_one_line_error(smi("export", tmp_path / "taken", "--to", tmp_path / "x"), "config.json")
    assert tree_snapshot(tmp_path) == before

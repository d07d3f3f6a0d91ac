"""Real datasets from local files, fitted to models."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from smi_engine.data import ModelInput, load_data
from smi_engine.errors import SmiError
from smi_engine.models import Normalizer

from .conftest import FASHION_MNIST, IMAGENET_SAMPLE

needs_fashion = pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
needs_imagenet_sample = pytest.mark.skipif(not IMAGENET_SAMPLE.is_dir(), reason="../shared/data/imagenet-sample is not next to this checkout")


def test_digits_split_is_stratified_and_fixed():
    data = load_data("digits")
    assert (len(data.train), len(data.val)) == (1442, 355) and data.channels == 1
    image, label = data.val[0]
    assert image.shape == (1, 8, 8) and 0 <= float(image.min()) and float(image.max()) <= 1
    labels = torch.tensor([int(data.val[i][1]) for i in range(len(data.val))])
    assert torch.bincount(labels).min() >= 34  # every class held out (a fifth of each)


@needs_fashion
def test_fashion_mnist_from_the_debian_package():
    data = load_data("fashion-mnist")
    assert (len(data.train), len(data.val)) == (60000, 10000) and data.classes[9] == "Ankle boot"
    image, label = data.train[0]
    assert image.shape == (1, 28, 28) and int(label) == 9  # the first training image is an ankle boot


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reader_and_its_errors(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    for split, n in (("train", 3), ("t10k", 2)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.array([7, 1, 2][:n]))
    data = load_data(f"fashion-mnist:{tmp_path}")
    image, label = data.train[1]
    assert int(label) == 1 and float(image[0, 0, 0]) == pytest.approx((784 % 256) / 255)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SmiError, match="t10k-labels-idx1-ubyte.gz is missing"):
        load_data(f"fashion-mnist:{tmp_path}")
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(SmiError, match="not a valid IDX file"):
        load_data(f"fashion-mnist:{tmp_path}")


def _cifar10(root, payload=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(folder / name, "wb") as handle:
            pickle.dump(payload if (payload is not None and name == "test_batch") else batch, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}, handle)


def test_cifar10_in_torchvisions_layout(tmp_path):
    _cifar10(tmp_path)
    data = load_data(f"cifar10:{tmp_path}")
    assert (len(data.train), len(data.val), data.num_classes) == (20, 4, 10)
    image, label = data.val[2]
    assert image.shape == (3, 32, 32) and int(label) == 2


@pytest.mark.parametrize("labels, message", [([0, 1, 2], "holds 3 labels for 4 images"), ([0, 1, 2, 12], "outside 0..9"),
                                             ("abcd", "not a CIFAR batch")])
def test_cifar_batches_whose_labels_do_not_match_are_refused(tmp_path, labels, message):
    _cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    with open(batch, "rb") as handle:
        data = pickle.load(handle)
    with open(batch, "wb") as handle:
        pickle.dump({**data, "labels": labels}, handle)
    with pytest.raises(SmiError, match=f"data_batch_3.*{message}"):
        load_data(f"cifar10:{tmp_path}")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_cifar_pickles_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    _cifar10(tmp_path / "root", payload=_Payload(marker))
    with pytest.raises(SmiError, match="not a CIFAR batch"):
        load_data(f"cifar10:{tmp_path / 'root'}")
    assert not marker.exists()


def test_missing_and_unknown_data(tmp_path):
    with pytest.raises(SmiError, match="smi data fetch cifar100"):
        load_data(f"cifar100:{tmp_path}")
    with pytest.raises(SmiError, match="unknown --data 'mnist'"):
        load_data("mnist")
    with pytest.raises(SmiError, match="does not exist"):
        load_data(f"imagefolder:{tmp_path / 'nope'}")


def test_imagefolder_orders_classes_by_name(tmp_path):
    for name, colour in (("n02", (255, 0, 0)), ("n01", (0, 255, 0))):
        (tmp_path / name).mkdir()
        Image.new("RGB", (40, 30), colour).save(tmp_path / name / "a.png")
    data = load_data(f"imagefolder:{tmp_path}")
    assert data.classes == ("n01", "n02")
    image, label = data.val[0]
    assert int(label) == 0 and image.shape == (3, 30, 40) and float(image[1].mean()) == pytest.approx(1.0)


@needs_imagenet_sample
def test_imagenet_sample_has_the_standard_class_order():
    data = load_data(f"imagefolder:{IMAGENET_SAMPLE}")
    assert data.num_classes == 1000 and len(data.val) == 1000
    assert data.classes[0] == "n01440764" and data.classes[-1] == "n15075141"  # tench ... toilet tissue
    image, label = data.val[999]
    assert int(label) == 999 and min(image.shape[1:]) == 256


def test_model_input_sizes_channels_and_normalisation():
    fit = ModelInput(3, 32, 32, Normalizer((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    same = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(fit(same), (same - 0.5) / 0.25)  # no resize or crop at the model's size
    grey = torch.rand(1, 32, 32)
    out = fit(grey)
    assert out.shape == (3, 32, 32) and torch.equal(out[0], out[2])  # grey replicated
    assert fit(torch.rand(1, 3, 28, 28)).shape == (1, 3, 32, 32)  # smaller: resized
    big = torch.zeros(1, 3, 64, 80)
    big[..., :, 38:42] = 1.0  # a bright stripe in the middle survives the centre crop
    cropped = fit(big)
    assert cropped.shape == (1, 3, 32, 32) and float(cropped[0, 0, :, 15:17].mean()) > 0
    to_grey = ModelInput(1, 8, 8, Normalizer((0.0,), (1.0,)))
    rgb = torch.zeros(3, 8, 8)
    rgb[1] = 1.0
    assert float(to_grey(rgb).mean()) == pytest.approx(0.587, rel=1e-4)
    with pytest.raises(SmiError, match="2 channels"):
        fit(torch.rand(2, 32, 32))

"""Real datasets for teachers, evaluation and calibration: ``--data SPEC``.

SPEC is one of ``digits`` (scikit-learn's bundled 8x8 digits), ``fashion-mnist[:DIR]`` (the
four ``*-idx?-ubyte.gz`` files, as Debian's ``dataset-fashion-mnist`` installs them),
``cifar10:ROOT`` / ``cifar100:ROOT`` (torchvision's ``cifar-10-batches-py`` layout) and
``imagefolder:DIR`` (class sub-folders; sorted names give the class index, so an ImageNet
folder of WordNet ids gets the standard order; ``DIR/train`` and ``DIR/val`` are used when
present). Images load as float tensors in [0, 1]; ``ModelInput`` then fits them to a model.
``SPEC@CLASSES`` keeps only some classes (``fashion-mnist@0-4``, ``digits@0,2,4``), relabelled
0..k-1 in the order given: data disjoint from another task, e.g. to pretrain a student.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from smi_engine.errors import SmiError
from smi_engine.models import Normalizer, model_input_size

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
SPEC_HELP = "digits, fashion-mnist[:DIR], cifar10:ROOT, cifar100:ROOT or imagefolder:DIR, each optionally @CLASSES (e.g. @0-4)"


class TensorImages(Dataset):
    """Images held in memory: uint8 (N, C, H, W) + labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float = 255.0):
        self.images, self.labels, self.scale = images, labels.long(), scale

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int):
        return self.images[index].float() / self.scale, self.labels[index]


class ClassSubset(Dataset):
    """The samples of some classes of a dataset, relabelled 0..k-1 in the order of ``classes``."""

    def __init__(self, dataset: Dataset, classes: list[int]):
        labels = _labels(dataset)
        new_label = {old: new for new, old in enumerate(classes)}
        self.dataset, self.new_label = dataset, new_label
        self.indices = [i for i, label in enumerate(labels) if label in new_label]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        image, label = self.dataset[self.indices[index]]
        return image, torch.tensor(self.new_label[int(label)])


class FolderImages(Dataset):
    """Image files in class folders, decoded on access."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.files[index]
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array).permute(2, 0, 1).float() / 255.0, torch.tensor(label)


@dataclass
class DataSplits:
    name: str
    train: Dataset
    val: Dataset
    classes: tuple[str, ...]
    channels: int

    @property
    def num_classes(self) -> int:
        return len(self.classes)


# -- readers ------------------------------------------------------------------------------------
def _digits() -> DataSplits:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)  # 0..16
    labels = torch.from_numpy(bunch.target)
    # A fixed, class-stratified 80/20 split: every fifth image of each class is held out.
    held_out = torch.zeros(len(labels), dtype=torch.bool)
    for digit in range(10):
        held_out[(labels == digit).nonzero().flatten()[4::5]] = True
    train = TensorImages(images[~held_out], labels[~held_out], scale=16.0)
    val = TensorImages(images[held_out], labels[held_out], scale=16.0)
    return DataSplits("digits", train, val, tuple(str(d) for d in range(10)), 1)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"expected {int(np.prod(shape))} values, found {array.size}")
    return array.reshape(shape)


def _fashion_mnist(folder: Path) -> DataSplits:
    def split(prefix: str) -> TensorImages:
        found = {}
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            candidates = [folder / f"{prefix}-{kind}.gz", folder / f"{prefix}-{kind}"]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise SmiError(
                    f"Fashion-MNIST file {prefix}-{kind}.gz is missing in {folder}: "
                    "install Debian's dataset-fashion-mnist or point fashion-mnist:DIR at the four idx files"
                )
            try:
                found[kind] = _read_idx(path)
            except (OSError, ValueError, EOFError, struct.error) as exc:
                raise SmiError(f"{path} is not a valid IDX file ({exc}): re-download Fashion-MNIST") from None
        images, labels = found["images-idx3-ubyte"], found["labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise SmiError(f"Fashion-MNIST {prefix} has {len(images)} images but {len(labels)} labels: re-download it")
        return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))

    return DataSplits("fashion-mnist", split("train"), split("t10k"), FASHION_CLASSES, 1)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR's python batches are pickles; allow only what rebuilds plain numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "bytes"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(io.BytesIO(handle.read()), encoding="latin1").load()
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise SmiError(f"{path} is not a CIFAR batch ({exc}): re-download with `smi data fetch`") from None


def _cifar(root: Path, hundred: bool) -> DataSplits:
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    name = "cifar100" if hundred else "cifar10"
    if not folder.is_dir():
        raise SmiError(f"{folder} not found: fetch the dataset with `smi data fetch {name} {root}`")
    train_files = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    label_key = "fine_labels" if hundred else "labels"

    def split(files: list[str]) -> TensorImages:
        images, labels = [], []
        for file in files:
            try:
                batch = _unpickle(folder / file)
            except FileNotFoundError:
                raise SmiError(f"{folder / file} is missing: re-fetch with `smi data fetch {name} {root}`") from None
            try:
                data, batch_labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[label_key], dtype=np.int64)
                data = data.reshape(-1, 3, 32, 32)
            except (KeyError, TypeError, ValueError) as exc:
                raise SmiError(f"{folder / file} is not a CIFAR batch ({type(exc).__name__}: {exc}): "
                               f"re-fetch with `smi data fetch {name} {root}`") from None
            if batch_labels.shape != (len(data),) or (len(batch_labels) and not 0 <= batch_labels.min() <= batch_labels.max() < classes_count):
                raise SmiError(f"{folder / file}: {label_key} holds {batch_labels.size} labels for {len(data)} images, or a "
                               f"class outside 0..{classes_count - 1}: re-fetch with `smi data fetch {name} {root}`")
            images.append(data)
            labels.extend(batch_labels.tolist())
        return TensorImages(torch.from_numpy(np.concatenate(images)), torch.tensor(labels))

    classes_count = 100 if hundred else 10
    meta = _unpickle(folder / ("meta" if hundred else "batches.meta"))
    classes = tuple(meta["fine_label_names" if hundred else "label_names"])
    return DataSplits(name, split(train_files), split(["test"] if hundred else ["test_batch"]), classes, 3)


def _image_folder(root: Path) -> DataSplits:
    if not root.is_dir():
        raise SmiError(f"image folder {root} does not exist: check the path")

    def scan(folder: Path, classes: list[str]) -> list[tuple[Path, int]]:
        files = []
        for index, name in enumerate(classes):
            files += [(p, index) for p in sorted((folder / name).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
        return files

    train_dir, val_dir = (root / "train", root / "val") if (root / "train").is_dir() and (root / "val").is_dir() else (root, root)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise SmiError(f"{train_dir} has no class sub-folders: lay images out as DIR/<class>/<image>.jpg")
    train, val = scan(train_dir, classes), scan(val_dir, classes)
    if not val:
        raise SmiError(f"{val_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return DataSplits(f"imagefolder:{root}", FolderImages(train), FolderImages(val), tuple(classes), 3)


def _labels(dataset: Dataset) -> list[int]:
    if isinstance(dataset, TensorImages):
        return dataset.labels.tolist()
    if isinstance(dataset, FolderImages):
        return [label for _, label in dataset.files]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def check_fits(model_name: str, num_classes: int, model_classes: tuple[str, ...] | None, splits: "DataSplits",
               data: str, role: str = "the model") -> None:
    """Refuse to measure a model on data it was not trained for, in one line: another number of
    classes, or (where the model records them) other class names, as a Fashion-MNIST model on
    the digits, both ten classes."""
    if num_classes != splits.num_classes:
        raise SmiError(f"{role} {model_name} has {num_classes} classes but {data} has {splits.num_classes}: "
                       "evaluate on the data it was trained for")
    if model_classes and tuple(model_classes) != tuple(splits.classes):
        shown = ", ".join(model_classes[:3]) + (", ..." if len(model_classes) > 3 else "")
        raise SmiError(f"{role} {model_name} was trained on other classes ({shown}) than {data} holds "
                       f"({', '.join(splits.classes[:3])}, ...): evaluate on the data it was trained for")


def parse_classes(text: str, num_classes: int) -> list[int]:
    """``0-4`` / ``0,2,7`` / ``0-2,8`` -> class indices, checked against the dataset."""
    chosen: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            chosen += list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise SmiError(f"bad class selection @{text}: write indices and ranges, e.g. @0-4 or @0,2,7") from None
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= c < num_classes for c in chosen):
        raise SmiError(f"class selection @{text} must name distinct classes in 0..{num_classes - 1}, e.g. @0-4")
    return chosen


def load_data(spec: str) -> DataSplits:
    """The dataset a ``--data`` SPEC names."""
    base, at, selection = spec.partition("@")
    splits = _load(base)
    if not at:
        return replace(splits, name=spec)  # named as the user wrote it, for configs and summaries
    classes = parse_classes(selection, splits.num_classes)
    return DataSplits(spec, ClassSubset(splits.train, classes), ClassSubset(splits.val, classes),
                      tuple(splits.classes[c] for c in classes), splits.channels)


def _load(spec: str) -> DataSplits:
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        return _digits()
    if kind == "fashion-mnist":
        return _fashion_mnist(Path(arg or FASHION_MNIST_DIR))
    if kind in ("cifar10", "cifar100") and arg:
        return _cifar(Path(arg), kind == "cifar100")
    if kind == "imagefolder" and arg:
        return _image_folder(Path(arg))
    raise SmiError(f"unknown --data {spec!r}: use {SPEC_HELP}")


# -- fitting images to a model ------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInput:
    """Fits [0, 1] images to a model: size (resize, or resize + centre crop for larger images,
    as timm's eval transform), channels (grey replicated; colour to luminance) and normalisation."""

    channels: int
    height: int
    width: int
    normalizer: Normalizer
    crop_pct: float = 0.875

    @classmethod
    def for_model(cls, model: torch.nn.Module, normalizer: Normalizer) -> "ModelInput":
        import timm

        c, h, w = model_input_size(model)
        crop_pct = timm.data.resolve_model_data_config(model).get("crop_pct") or 1.0
        return cls(c, h, w, normalizer, float(crop_pct))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) or (C, H, W) pixels in [0, 1] -> the model's normalised input."""
        single = images.dim() == 3
        x = images.unsqueeze(0) if single else images
        x = self._channels(x.float())
        h, w = x.shape[-2:]
        if (h, w) != (self.height, self.width):
            if h > self.height and w > self.width:
                scale = max(self.height, self.width) / self.crop_pct / min(h, w)
                x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True, align_corners=False)
                top, left = (x.shape[-2] - self.height) // 2, (x.shape[-1] - self.width) // 2
                x = x[..., top : top + self.height, left : left + self.width]
            else:
                x = F.interpolate(x, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        x = self.normalizer.normalize(x)
        return x[0] if single else x

    def collate(self, samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """DataLoader collate: fit a list of (image, label) samples, batched when sizes agree."""
        images = [image for image, _ in samples]
        labels = torch.stack([torch.as_tensor(label) for _, label in samples])
        if all(image.shape == images[0].shape for image in images):
            return self(torch.stack(images)), labels
        return torch.stack([self(image) for image in images]), labels

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if c == self.channels:
            return x
        if c == 1:
            return x.expand(-1, self.channels, -1, -1)
        if self.channels == 1 and c == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            return (x * weights).sum(1, keepdim=True)
        raise SmiError(f"images have {c} channels but the model takes {self.channels}: pick matching data or in_chans")


def loader(dataset: Dataset, model_input: ModelInput, batch_size: int, shuffle: bool = False, seed: int = 0) -> DataLoader:
    """Batches of model-ready (images, labels); shuffling is seeded."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=model_input.collate)

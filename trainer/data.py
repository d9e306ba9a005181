"""Training and evaluation data: image folders, list files, zips, CIFAR-LT and a synthetic long-tailed set.

Every source becomes an ``ImageDataset``: an image source (files, zip members, or an in-memory uint8
array), one target per image and the class names, which always come from the data (folder names,
CIFAR's label names, the list file's paths). Long-tailed subsets use the standard exponential profile:
class ``i`` of ``C`` (in class-name order) keeps ``int(n_max * (1 / IR) ** (i / (C - 1)))`` images.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
DATA_FORMATS = ("auto", "imagefolder", "list", "zip", "cifar", "synthetic")


class DataError(ValueError):
    """The data cannot be read or does not describe a classification task."""


# ---------------------------------------------------------------------------------------------- image sources
class FileSource:
    """Images as files on disk."""

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(p) for p in paths]

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        with Image.open(self.paths[index]) as img:
            return img.convert("RGB")

    def subset(self, indices: Sequence[int]) -> FileSource:
        return FileSource([self.paths[i] for i in indices])


class ZipSource:
    """Images as members of a zip archive (read in place; stored or deflated members both work).

    The archive handle is opened lazily per process, so DataLoader workers never share a file offset.
    """

    def __init__(self, archive: str | Path, members: Sequence[str]):
        self.archive = str(archive)
        self.members = list(members)
        self._handle: zipfile.ZipFile | None = None
        self._pid = -1

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self) -> dict[str, Any]:
        return {"archive": self.archive, "members": self.members, "_handle": None, "_pid": -1}

    def load(self, index: int) -> Image.Image:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = zipfile.ZipFile(self.archive), os.getpid()
        with self._handle.open(self.members[index]) as fh, Image.open(fh) as img:
            return img.convert("RGB")

    def subset(self, indices: Sequence[int]) -> ZipSource:
        return ZipSource(self.archive, [self.members[i] for i in indices])


class ArraySource:
    """Images as a uint8 ``[N, H, W, 3]`` array (torchvision's CIFAR, the synthetic generator)."""

    def __init__(self, array: np.ndarray):
        self.array = np.ascontiguousarray(array, dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.array)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.array[index])

    def subset(self, indices: Sequence[int]) -> ArraySource:
        return ArraySource(self.array[np.asarray(indices, dtype=np.int64)])


Source = FileSource | ZipSource | ArraySource


@dataclass
class ImageDataset(Dataset):
    """Images with targets and class names; ``transform`` turns a PIL image into a tensor.

    Attributes:
        source: where the images come from.
        targets: class index per image.
        class_names: index -> name.
        transform: PIL image -> tensor (set by the trainer once the backbone's data config is known).
    """

    source: Source
    targets: list[int]
    class_names: list[str]
    transform: Callable[[Image.Image], Any] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        img = self.source.load(index)
        return (self.transform(img) if self.transform else img), self.targets[index]

    def subset(self, indices: Sequence[int]) -> ImageDataset:
        return ImageDataset(self.source.subset(indices), [self.targets[i] for i in indices], self.class_names)

    def class_counts(self) -> list[int]:
        """Images per class, in class-index order (0 for classes without images)."""
        counts = Counter(self.targets)
        return [counts.get(i, 0) for i in range(len(self.class_names))]

    def with_classes(self, class_names: Sequence[str]) -> ImageDataset:
        """Re-index targets to another class list (e.g. the training set's), by name."""
        if list(class_names) == self.class_names:
            return self
        index = {name: i for i, name in enumerate(class_names)}
        missing = sorted(set(self.class_names) - set(index))
        if missing:
            raise DataError(f"classes {missing[:5]} are not in the training set")
        targets = [index[self.class_names[t]] for t in self.targets]
        return ImageDataset(self.source, targets, list(class_names), self.transform)


# --------------------------------------------------------------------------------------------------- readers
def _split_targets(labels: Sequence[str]) -> tuple[list[int], list[str]]:
    class_names = sorted(set(labels))
    index = {name: i for i, name in enumerate(class_names)}
    return [index[label] for label in labels], class_names


def _check(dataset: ImageDataset, what: str) -> ImageDataset:
    if len(dataset) == 0:
        raise DataError(f"no images found in {what}")
    return dataset


def image_folder(root: str | Path) -> ImageDataset:
    """An ImageFolder layout: ``root/<class>/**/<image>``; class names are the sub-folder names (sorted).

    Args:
        root: directory with one sub-folder per class.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory")
    paths, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                paths.append(path)
                labels.append(class_dir.name)
    targets, class_names = _split_targets(labels)
    return _check(ImageDataset(FileSource(paths), targets, class_names), str(root))


def split_zip_path(spec: str | Path) -> tuple[Path, str] | None:
    """``/data/set.zip/train`` -> (``/data/set.zip``, ``train/``); ``None`` when no path part is a zip file."""
    path = Path(spec)
    for i, part in enumerate(path.parts):
        if part.lower().endswith(".zip"):
            archive = Path(*path.parts[: i + 1])
            if archive.is_file():
                inner = "/".join(path.parts[i + 1 :])
                return archive, (inner.rstrip("/") + "/") if inner else ""
    return None


def zip_folder(archive: str | Path, prefix: str = "") -> ImageDataset:
    """An ImageFolder layout inside a zip: ``<prefix><class>/<image>`` members.

    Args:
        archive: the zip file.
        prefix: folder inside the archive (``train/``), empty for the top level.
    """
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.lower().endswith(IMAGE_EXTENSIONS))
    members, labels = [], []
    for name in names:
        rest = name[len(prefix) :].split("/")
        if len(rest) >= 2:
            members.append(name)
            labels.append(rest[0])
    targets, class_names = _split_targets(labels)
    return _check(ImageDataset(ZipSource(archive, members), targets, class_names), f"{archive}:{prefix}")


def list_file(path: str | Path, root: str | Path | None = None) -> ImageDataset:
    """A split file of ``relative/path label`` lines (as Places-LT and ImageNet-LT are distributed).

    Class names: the parent folder name shared by every image of a label when there is one (Places-LT's
    ``/a/airfield/0001.jpg``), else the label number.

    Args:
        path: the list file.
        root: directory the relative paths start from (default: the list file's directory).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    paths, labels = [], []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{path}:{lineno}: expected 'relative/path label', got {line!r}")
        paths.append(root / parts[0].lstrip("/"))
        labels.append(int(parts[1]))
    if not labels:
        raise DataError(f"no images listed in {path}")
    num_classes = max(labels) + 1
    if min(labels) < 0:
        raise DataError(f"{path}: labels must be >= 0")
    folders: dict[int, set[str]] = {}
    for p, label in zip(paths, labels, strict=True):
        folders.setdefault(label, set()).add(p.parent.name)
    names = [next(iter(folders[i])) if len(folders.get(i, ())) == 1 else str(i) for i in range(num_classes)]
    if len(set(names)) != num_classes:  # two labels share a folder name: numbers are the honest names
        names = [str(i) for i in range(num_classes)]
    return ImageDataset(FileSource(paths), labels, names)


def torchvision_cifar(root: str | Path, num_classes: int, train: bool, download: bool = True) -> ImageDataset:
    """CIFAR-10 or CIFAR-100 through torchvision: downloaded into ``root`` when online, else read from a local copy.

    Args:
        root: torchvision's CIFAR root (holds ``cifar-10-batches-py`` / ``cifar-100-python``).
        num_classes: 10 or 100.
        train: training or test split.
        download: try downloading when the local copy is missing.
    """
    from torchvision import datasets

    cls = {10: datasets.CIFAR10, 100: datasets.CIFAR100}.get(num_classes)
    if cls is None:
        raise DataError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError:
        if not download:
            raise DataError(f"no CIFAR-{num_classes} copy under {root}") from None
        try:
            ds = cls(str(root), train=train, download=True)
        except Exception as exc:  # offline: URLError / OSError
            raise DataError(f"CIFAR-{num_classes} is not under {root} and cannot be downloaded: {exc}") from exc
    return ImageDataset(ArraySource(ds.data), [int(t) for t in ds.targets], list(ds.classes))


def long_tail_counts(num_classes: int, n_max: int, imbalance_ratio: float) -> list[int]:
    """``int(n_max * (1 / IR) ** (i / (C - 1)))`` for class ``i``: the standard exponential profile.

    Args:
        num_classes: C.
        n_max: images kept for class 0.
        imbalance_ratio: IR = n_max / n_min.
    """
    if num_classes < 2:
        return [n_max] * num_classes
    return [max(1, int(n_max * (1.0 / imbalance_ratio) ** (i / (num_classes - 1)))) for i in range(num_classes)]


def long_tailed_subset(
    dataset: ImageDataset, imbalance_ratio: float, n_max: int | None = None, seed: int | None = None
) -> ImageDataset:
    """Keep the first ``long_tail_counts(...)[i]`` images of class ``i`` (dataset order, so it is reproducible).

    Args:
        dataset: a (usually balanced) dataset.
        imbalance_ratio: IR.
        n_max: images kept for the largest class (default: the smallest class size, so every class can fill
            its quota).
        seed: another split: the quotas go to the classes in a seeded random order (which classes are the
            head and which the tail) and each class keeps a seeded random choice of its images.
    """
    counts = dataset.class_counts()
    n_max = n_max or min(c for c in counts if c > 0)
    keep = long_tail_counts(len(counts), n_max, imbalance_ratio)
    if seed is None:
        return per_class_subset(dataset, keep)
    gen = torch.Generator().manual_seed(seed)
    keep = [keep[i] for i in torch.argsort(torch.randperm(len(keep), generator=gen)).tolist()]
    order = torch.randperm(len(dataset), generator=gen).tolist()
    taken, indices = [0] * len(keep), []
    for i in order:
        t = dataset.targets[i]
        if taken[t] < keep[t]:
            taken[t] += 1
            indices.append(i)
    return dataset.subset(sorted(indices))


def per_class_subset(dataset: ImageDataset, keep: Sequence[int] | int) -> ImageDataset:
    """The first ``keep[c]`` (or ``keep``) images of each class, in dataset order.

    Args:
        dataset: the dataset to cut.
        keep: a quota per class, or one quota for all classes.
    """
    quota = [keep] * len(dataset.class_names) if isinstance(keep, int) else list(keep)
    taken = [0] * len(quota)
    indices = []
    for i, t in enumerate(dataset.targets):
        if taken[t] < quota[t]:
            taken[t] += 1
            indices.append(i)
    return dataset.subset(indices)


def synthetic_long_tailed(
    num_classes: int = 10,
    n_max: int = 50,
    imbalance_ratio: float = 10.0,
    img_size: int = 32,
    seed: int = 0,
    class_seed: int = 1234,
) -> ImageDataset:
    """A learnable synthetic set: each class is a smooth colour pattern; images are shifted, noisy copies.

    Class patterns depend on ``class_seed`` only, so a training and a validation set made with different
    ``seed`` values describe the same classes.

    Args:
        num_classes: C.
        n_max: images of class 0.
        imbalance_ratio: IR (1 gives a balanced set).
        img_size: side of the square images.
        seed: seed of the per-image variation.
        class_seed: seed of the class patterns.
    """
    patterns = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(class_seed))
    patterns = torch.nn.functional.interpolate(patterns, size=(img_size, img_size), mode="bilinear")
    gen = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for c, n in enumerate(long_tail_counts(num_classes, n_max, imbalance_ratio)):
        shifts = torch.randint(-img_size // 8, img_size // 8 + 1, (n, 2), generator=gen).tolist()
        for dy, dx in shifts:
            img = torch.roll(patterns[c], shifts=(dy, dx), dims=(1, 2))
            img = (img + 0.15 * torch.randn(img.shape, generator=gen)).clamp(0, 1)
            images.append((img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy())
            targets.append(c)
    names = [f"class_{c:03d}" for c in range(num_classes)]
    return ImageDataset(ArraySource(np.stack(images)), targets, names)


def write_image_folder(dataset: ImageDataset, root: str | Path) -> Path:
    """Write a dataset as ``root/<class>/<index>.png`` (demos and CLI tests with synthetic data)."""
    root = Path(root)
    for i in range(len(dataset)):
        img, target = dataset.source.load(i), dataset.targets[i]
        folder = root / dataset.class_names[target]
        folder.mkdir(parents=True, exist_ok=True)
        img.save(folder / f"{i:06d}.png")
    return root


# ---------------------------------------------------------------------------------------------- entry point
def parse_synthetic(spec: str) -> dict[str, Any]:
    """``synthetic[:C[:N_MAX[:IR[:SEED]]]]`` -> keyword arguments of ``synthetic_long_tailed``."""
    parts = spec.split(":")[1:]
    keys = ("num_classes", "n_max", "imbalance_ratio", "seed")
    casts = (int, int, float, int)
    try:
        return {k: cast(v) for k, cast, v in zip(keys, casts, parts, strict=False) if v}
    except ValueError as exc:
        raise DataError(f"bad synthetic spec {spec!r}: expected synthetic:C:N_MAX:IR:SEED") from exc


def detect_format(spec: str, cifar: int | None = None) -> str:
    """The data format a ``--train``/``--val`` value most likely is."""
    if spec.startswith("synthetic"):
        return "synthetic"
    if cifar:
        return "cifar"
    if split_zip_path(spec):
        return "zip"
    path = Path(spec)
    if path.is_file():
        return "list"
    return "imagefolder"


def load_dataset(
    spec: str,
    split: str,
    data_format: str = "auto",
    root: str | Path | None = None,
    cifar: int | None = None,
    img_size: int = 32,
) -> ImageDataset:
    """Open ``--train`` / ``--val`` data of any supported format.

    Args:
        spec: a folder, a list file, ``archive.zip/inner/folder``, a CIFAR root, or ``synthetic:...``.
        split: ``train`` or ``val`` (CIFAR's split; the synthetic set's variation seed).
        data_format: one of ``DATA_FORMATS``; ``auto`` guesses from ``spec``.
        root: image root for list files.
        cifar: 10 or 100 for torchvision CIFAR.
        img_size: side of synthetic images.
    """
    fmt = detect_format(spec, cifar) if data_format == "auto" else data_format
    if fmt == "synthetic":
        kwargs = {"img_size": img_size, **parse_synthetic(spec)}
        kwargs["seed"] = kwargs.get("seed", 0) + (0 if split == "train" else 1_000_003)
        return synthetic_long_tailed(**kwargs)
    if fmt == "cifar":
        return torchvision_cifar(spec, cifar or 10, train=split == "train")
    if fmt == "zip":
        found = split_zip_path(spec)
        if found is None:
            raise DataError(f"{spec} does not name a zip file (expected archive.zip or archive.zip/inner/folder)")
        return zip_folder(*found)
    if fmt == "list":
        return list_file(spec, root)
    if fmt == "imagefolder":
        return image_folder(spec)
    raise DataError(f"unknown data format {fmt!r}; expected one of {', '.join(DATA_FORMATS)}")


# ------------------------------------------------------------------------------------------------ transforms
def train_transform(data_config: dict[str, Any], min_scale: float = 0.08) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + horizontal flip + the backbone's normalisation (method note).

    Args:
        data_config: the backbone's timm data config (input size, interpolation, mean, std).
        min_scale: RandomResizedCrop's lower area bound (torchvision's default 0.08).
    """
    size = tuple(data_config["input_size"][1:])
    interpolation = transforms.InterpolationMode(data_config.get("interpolation", "bicubic"))
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size, scale=(min_scale, 1.0), interpolation=interpolation),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(data_config["mean"], data_config["std"]),
        ]
    )

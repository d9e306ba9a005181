"""Data sources: image folders, list files, zips, the long-tailed profile, synthetic data."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from trainer.data import (
    DataError,
    image_folder,
    list_file,
    load_dataset,
    long_tail_counts,
    long_tailed_subset,
    synthetic_long_tailed,
    train_transform,
    write_image_folder,
)


def test_long_tail_profile_matches_the_standard_cifar_numbers():
    c100 = long_tail_counts(100, 500, 100)
    assert c100[0] == 500 and c100[-1] == 5 and sum(c100) == 10847  # CIFAR-100-LT, IR 100 (method note)
    assert long_tail_counts(10, 500, 100) == [int(500 * 0.01 ** (i / 9)) for i in range(10)]


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_long_tailed(num_classes=4, n_max=12, imbalance_ratio=4, img_size=16, seed=0)


def test_synthetic_is_long_tailed_and_reproducible(synthetic):
    assert synthetic.class_counts() == [12, 7, 4, 3]
    again = synthetic_long_tailed(num_classes=4, n_max=12, imbalance_ratio=4, img_size=16, seed=0)
    assert (again.source.array == synthetic.source.array).all()


def test_image_folder_zip_and_list_file_agree(tmp_path, synthetic):
    root = write_image_folder(synthetic, tmp_path / "folder" / "train")
    folder = image_folder(root)
    assert folder.class_names == synthetic.class_names
    assert folder.class_counts() == synthetic.class_counts()

    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(root.rglob("*.png")):
            zf.write(path, "train/" + path.relative_to(root).as_posix())
    zipped = load_dataset(f"{archive}/train", "train")
    assert zipped.class_names == folder.class_names and zipped.targets == folder.targets
    assert (np.asarray(zipped[3][0]) == np.asarray(folder[3][0])).all()

    lines = []  # Places-LT style: a leading slash, paths relative to the root
    for path, target in zip(folder.source.paths, folder.targets, strict=True):
        rel = path[len(str(root)) + 1 :]
        lines.append(f"/{rel} {target}")
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    listed = list_file(tmp_path / "train.txt", root)
    assert listed.class_names == folder.class_names  # names recovered from the folders
    assert listed.targets == folder.targets
    assert load_dataset(str(tmp_path / "train.txt"), "train", root=root).targets == folder.targets


def test_long_tailed_subset_keeps_the_first_images(synthetic):
    balanced = synthetic_long_tailed(num_classes=3, n_max=10, imbalance_ratio=1, img_size=8)
    lt = long_tailed_subset(balanced, imbalance_ratio=10)
    assert lt.class_counts() == [10, 3, 1]


def test_val_classes_are_reindexed_by_name(synthetic):
    val = synthetic.subset([0, 20])  # classes 0 and 2 only... still named with all 4 classes
    reordered = val.with_classes(list(reversed(synthetic.class_names)))
    assert reordered.targets == [3, 1]
    with pytest.raises(DataError):
        val.with_classes(synthetic.class_names[:2])


def test_synthetic_spec_and_train_transform():
    ds = load_dataset("synthetic:3:6:2", "train", img_size=16)
    val = load_dataset("synthetic:3:6:2", "val", img_size=16)
    assert ds.class_counts() == [6, 4, 3] and ds.class_names == val.class_names
    assert not (ds.source.array == val.source.array).all()
    cfg = {"input_size": (3, 24, 24), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    ds.transform = train_transform(cfg)
    image, target = ds[0]
    assert image.shape == (3, 24, 24) and target == 0


def test_bad_list_file_is_reported(tmp_path):
    (tmp_path / "bad.txt").write_text("a.jpg notanumber\n")
    with pytest.raises(DataError, match=r"bad\.txt:1"):
        list_file(tmp_path / "bad.txt")

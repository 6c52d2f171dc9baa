"""Data loading: demo subset, IDX files, ImageFolder, splits, channel/size adaptation, bad input."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from edgeprune.data import (
    FMNIST_MEAN,
    FMNIST_STD,
    DataBundle,
    denormalize,
    fashion_mnist_dir,
    load_data,
    load_demo_arrays,
    read_idx_images,
    read_idx_labels,
    stratified_split,
    write_idx,
)
from edgeprune.errors import DataError, EdgepruneError


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.numpy().tobytes() for row in x.reshape(len(x), -1)}


def test_demo_asset_is_balanced_uint8_subset():
    images, labels = load_demo_arrays()
    assert images.shape == (4000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [400] * 10


def test_demo_splits_sized_disjoint_balanced_normalized():
    b = load_data("demo", calib_size=1000, eval_size=2000, test_size=1000)
    assert b.calib_x.shape == (1000, 1, 28, 28) and b.eval_x.shape == (2000, 1, 28, 28) and len(b.test) == 1000
    assert b.calib_x.dtype == torch.float32 and b.calib_y.dtype == torch.int64
    assert (b.num_classes, b.in_chans, b.image_size, len(b.class_names)) == (10, 1, 28, 10)
    # Disjoint as images, not only as indices (the demo subset has no duplicate images).
    assert not (_rows(b.calib_x) & _rows(b.eval_x))
    assert b.calib_y.bincount().tolist() == [100] * 10
    assert b.eval_y.bincount().tolist() == [200] * 10
    x = torch.cat([b.calib_x, b.eval_x])
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
    raw = denormalize(b.eval_x, b.mean, b.std)
    assert raw.min().item() == pytest.approx(0.0, abs=1e-6) and raw.max().item() == pytest.approx(1.0, abs=1e-6)


def test_split_is_seeded():
    a, b = (
        load_data("demo", calib_size=50, eval_size=50, seed=1),
        load_data("demo", calib_size=50, eval_size=50, seed=1),
    )
    c = load_data("demo", calib_size=50, eval_size=50, seed=2)
    assert torch.equal(a.calib_x, b.calib_x) and torch.equal(a.eval_y, b.eval_y)
    assert not torch.equal(a.calib_x, c.calib_x)


def test_split_shrinks_in_proportion_when_too_big():
    labels = np.repeat(np.arange(4), 25)  # 100 images
    calib, ev = stratified_split(labels, 300, 100, seed=0)
    assert (len(calib), len(ev)) == (75, 25)
    assert not set(calib) & set(ev)
    calib, ev = stratified_split(np.array([0, 1]), 1000, 1000)
    assert (len(calib), len(ev)) == (1, 1)
    with pytest.raises(DataError, match="at least 2 images"):
        stratified_split(np.array([3]), 1, 1)
    # Three ways: each keeps at least one image, the rest in proportion, all of them used.
    parts = stratified_split(labels, 2, 10, 2000, seed=0)
    assert [len(p) for p in parts] == [1, 1, 98]
    assert len(set(np.concatenate(parts))) == 100
    assert [len(p) for p in stratified_split(labels, 30, 20, 50)] == [30, 20, 50]  # fits: as asked
    with pytest.raises(DataError, match="sizes must be ≥ 1"):
        stratified_split(labels, 3, 0)


def test_custom_normalization_and_resize():
    b = load_data("demo", calib_size=10, eval_size=20, mean=(0.5,), std=(0.25,), image_size=32)
    assert b.eval_x.shape == (20, 1, 32, 32) and b.image_size == 32 and b.mean == (0.5,)
    raw = denormalize(b.eval_x, (0.5,), (0.25,))
    assert -1e-5 < raw.min().item() and raw.max().item() < 1 + 1e-5
    with pytest.raises(DataError, match="1 value"):
        load_data("demo", mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))


def test_with_channels_round_trip(demo_data: DataBundle):
    rgb = demo_data.with_channels(3)
    assert rgb.eval_x.shape[1] == 3 and rgb.in_chans == 3 and len(rgb.mean) == 3
    raw_grey = denormalize(demo_data.eval_x, demo_data.mean, demo_data.std)
    raw_rgb = denormalize(rgb.eval_x, rgb.mean, rgb.std)
    assert torch.allclose(raw_rgb, raw_grey.expand(-1, 3, -1, -1), atol=1e-5)
    back = rgb.with_channels(1)  # luma weights sum to 1: grey → RGB → grey is the identity
    assert torch.allclose(denormalize(back.eval_x, back.mean, back.std), raw_grey, atol=1e-5)
    assert demo_data.with_channels(1) is demo_data
    with pytest.raises(DataError, match="--in-chans"):
        demo_data.with_channels(2)


def test_resized_keeps_labels(demo_data: DataBundle):
    big = demo_data.resized(56)
    assert big.eval_x.shape == (400, 1, 56, 56) and big.image_size == 56
    assert torch.equal(big.eval_y, demo_data.eval_y)
    # Bilinear up-sampling keeps the mean brightness of each image.
    assert torch.allclose(big.eval_x.mean((1, 2, 3)), demo_data.eval_x.mean((1, 2, 3)), atol=0.02)


# ----------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["imgs-idx3-ubyte", "imgs-idx3-ubyte.gz"])
def test_idx_round_trip(tmp_path: Path, name: str):
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2, 8], dtype=np.uint8)
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / ("labels-" + name), labels)
    assert np.array_equal(read_idx_images(tmp_path / name), images)
    got = read_idx_labels(tmp_path / ("labels-" + name))
    assert got.dtype == np.int64 and got.tolist() == labels.tolist()


def test_idx_rejects_corrupt_files(tmp_path: Path):
    write_idx(tmp_path / "labels.gz", np.arange(10, dtype=np.uint8))
    with pytest.raises(DataError, match="magic"):
        read_idx_images(tmp_path / "labels.gz")
    write_idx(tmp_path / "img", np.zeros((4, 3, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "img").read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_idx_images(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="cannot read"):
        read_idx_images(tmp_path / "bad.gz")
    with gzip.open(tmp_path / "tiny.gz", "wb") as fh:
        fh.write(b"\x00\x00")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx_labels(tmp_path / "tiny.gz")
    with pytest.raises(DataError, match="not found"):
        read_idx_images(tmp_path / "missing.gz")


def test_fashion_mnist_from_env_dir(monkeypatch: pytest.MonkeyPatch, fmnist_idx_dir: Path):
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(fmnist_idx_dir))
    assert fashion_mnist_dir() == fmnist_idx_dir
    b = load_data("fashion-mnist", calib_size=100, eval_size=150, test_size=100)
    assert b.name == "fashion-mnist" and len(b.calib_x) == 100 and len(b.eval_x) == 150 and len(b.test) == 100
    images, _ = load_demo_arrays()
    x = ((torch.from_numpy(images[:600]).float() / 255 - FMNIST_MEAN[0]) / FMNIST_STD[0]).unsqueeze(1)
    train, t10k = x[:300], x[300:]  # as the fixture wrote them
    assert _rows(b.calib_x) <= _rows(train)  # calibration: the train files
    assert _rows(b.eval_x) <= _rows(t10k)  # selection: the t10k files


def test_fashion_mnist_missing_dir_names_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_data("fashion-mnist")
    monkeypatch.setenv("EDGEPRUNE_FASHION_MNIST", str(tmp_path))  # exists, but holds no IDX files
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_data("fashion-mnist")


# ----------------------------------------------------------------------------------------------- ImageFolder


def _make_imagefolder(root: Path, per_class: int, mode: str = "L") -> np.ndarray:
    images, labels = load_demo_arrays()
    written = []
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i, idx in enumerate(np.flatnonzero(labels == c)[:per_class]):
            PIL.Image.fromarray(images[idx]).convert(mode).save(root / f"class_{c}" / f"{i:03d}.png")
            written.append(images[idx])
    return np.stack(written)


def test_imagefolder_grey_pngs(tmp_path: Path):
    written = _make_imagefolder(tmp_path / "data", per_class=8)
    b = load_data(f"imagefolder:{tmp_path / 'data'}", calib_size=6, eval_size=100, test_size=100, image_size=28)
    assert b.name == f"imagefolder:{(tmp_path / 'data').resolve()}"
    assert b.class_names == ["class_0", "class_1", "class_2"] and b.num_classes == 3 and b.in_chans == 1
    test_x, _ = b.test_split("test of the loader")
    assert (len(b.calib_x), len(b.eval_x), len(test_x)) == (2, 11, 11)  # shrunk to fit, proportionally
    assert b.eval_y.bincount(minlength=3).min() >= 3  # stratified: each class in the selection split
    raw = (denormalize(torch.cat([b.calib_x, b.eval_x, test_x]), b.mean, b.std) * 255).round().to(torch.uint8)
    assert _rows(raw) == _rows(torch.from_numpy(written))  # the pixels, unchanged at the native size


def test_imagefolder_rgb_default_size(tmp_path: Path):
    _make_imagefolder(tmp_path / "rgb", per_class=2, mode="RGB")
    b = load_data(f"imagefolder:{tmp_path / 'rgb'}", calib_size=2, eval_size=4)
    assert b.in_chans == 3 and b.eval_x.shape[1:] == (3, 224, 224) and b.image_size == 224
    assert b.mean == (0.485, 0.456, 0.406)
    assert b.with_channels(1).eval_x.shape[1] == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "not found"),
        (lambda p: p.mkdir(), "no class sub-folders"),
        (lambda p: (p / "cats").mkdir(parents=True), "no images"),
        (lambda p: (p.mkdir(), (p / "x.txt").write_text("hi")), "no class sub-folders"),
    ],
    ids=["missing", "empty", "class-without-images", "file-not-folder-inside"],
)
def test_imagefolder_bad_folders(tmp_path: Path, setup, message: str):
    folder = tmp_path / "d"
    setup(folder)
    with pytest.raises(DataError, match=message):
        load_data(f"imagefolder:{folder}")


def test_imagefolder_two_images_are_too_few(tmp_path: Path):
    for cls, name in (("a", "x.png"), ("b", "y.png")):  # two classes: the image count is the only problem
        (tmp_path / "d" / cls).mkdir(parents=True)
        PIL.Image.new("L", (8, 8)).save(tmp_path / "d" / cls / name)
    with pytest.raises(DataError, match="at least 3 images .one each to calibrate, select and test., found 2"):
        load_data(f"imagefolder:{tmp_path / 'd'}")


def test_imagefolder_corrupt_image_is_named(tmp_path: Path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    for name in ("ok.png", "ok2.png"):
        PIL.Image.new("L", (8, 8)).save(tmp_path / "d" / "a" / name)
    (tmp_path / "d" / "b").mkdir()  # a second class, so the corrupt file is the only problem
    PIL.Image.new("L", (8, 8)).save(tmp_path / "d" / "b" / "ok3.png")
    (tmp_path / "d" / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png"):
        load_data(f"imagefolder:{tmp_path / 'd'}")


@pytest.mark.parametrize("spec", ["mnist", "imagefolder:", "folder:/tmp", ""])
def test_unknown_spec_lists_valid_forms(spec: str):
    with pytest.raises(EdgepruneError) as info:
        load_data(spec)
    assert "imagefolder:" in str(info.value) and "\n" not in str(info.value)

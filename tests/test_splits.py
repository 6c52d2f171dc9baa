"""The honest protocol (issue 15): three disjoint splits per source, a sealed test split, and fine-tuning that
trains on calibration, stops early on selection and says whether it improved at all."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import timm
import torch

from edgeprune.data import (
    SPLIT_NAMES,
    DataBundle,
    SealedSplitError,
    SplitInfo,
    default_selection_size,
    denormalize,
    fashion_mnist_dir,
    load_data,
    load_demo_arrays,
    read_fashion_mnist,
    stratified_split,
)
from edgeprune.errors import DataError
from edgeprune.evaluation import accuracy
from edgeprune.inventory import build_inventory
from edgeprune.masking import build_masks
from edgeprune.models import load_model
from edgeprune.recovery import PAPER_LR, default_lr, finetune, model_kind


def _hashes(raw: torch.Tensor | np.ndarray) -> list[bytes]:
    """One content hash per uint8 image."""
    arr = np.asarray(raw, dtype=np.uint8)
    return [hashlib.blake2b(img.tobytes(), digest_size=16).digest() for img in arr.reshape(len(arr), -1)]


def _raw(b: DataBundle, x: torch.Tensor) -> torch.Tensor:
    """A bundle's normalized images back to the uint8 pixels they were read as (native size)."""
    return (denormalize(x, b.mean, b.std) * 255).round().clamp(0, 255).to(torch.uint8)


def _split_hashes(b: DataBundle) -> dict[str, list[bytes]]:
    test_x, _ = b.test_split("test of the split")
    return {name: _hashes(_raw(b, x)) for name, x in zip(SPLIT_NAMES, (b.calib_x, b.eval_x, test_x))}


def _assert_disjoint(hashes: dict[str, list[bytes]]) -> None:
    for name, h in hashes.items():
        assert len(set(h)) == len(h), f"{name} holds an image twice"
    seen: set[bytes] = set()
    for name, h in hashes.items():
        assert not seen & set(h), f"an image of the {name} split is also in an earlier split"
        seen |= set(h)


# ------------------------------------------------------------------------------------------------ splits


def test_stratified_split_three_ways_disjoint_by_index_and_prefix_stable():
    _, labels = load_demo_arrays()
    calib, select, test = stratified_split(labels, 1000, 1000, 2000, seed=3)
    assert (len(calib), len(select), len(test)) == (1000, 1000, 2000)
    assert len(set(calib) | set(select) | set(test)) == 4000  # by index: no image in two splits
    assert [np.bincount(labels[i]).tolist() for i in (calib, select, test)] == [[100] * 10, [100] * 10, [200] * 10]
    # The first splits do not depend on the later sizes: the selection split is the same with a smaller test.
    again = stratified_split(labels, 1000, 1000, 5, seed=3)
    assert np.array_equal(again[0], calib) and np.array_equal(again[1], select) and set(again[2]) <= set(test)


def test_demo_splits_default_sizes_disjoint_by_content():
    b = load_data("demo")
    assert [(s.name, s.size, s.source) for s in b.splits()] == [
        ("calibration", 1000, "demo"),
        ("selection", 1000, "demo"),
        ("test", 2000, "demo"),
    ]
    hashes = _split_hashes(b)
    _assert_disjoint(hashes)
    images, _ = load_demo_arrays()
    assert set().union(*map(set, hashes.values())) == set(_hashes(images))  # 4 000: every image in one split


def test_demo_sizes_that_do_not_fit_shrink_in_proportion():
    b = load_data("demo", calib_size=1000, eval_size=2000, test_size=2000)  # 5 000 asked of 4 000
    assert [s.size for s in b.splits()] == [800, 1600, 1600]
    b = load_data("demo", calib_size=1, eval_size=1, test_size=10_000)
    assert [s.size for s in b.splits()] == [1, 1, 3998]
    with pytest.raises(DataError, match="test sizes must be ≥ 1, got 10, 10 and 0"):
        load_data("demo", calib_size=10, eval_size=10, test_size=0)


def test_fashion_mnist_calibrates_on_the_train_file_and_tests_on_the_test_file():
    try:
        fashion_mnist_dir()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    b = load_data("fashion-mnist", calib_size=500, eval_size=300, test_size=700, seed=1)
    assert [(s.name, s.size, s.source) for s in b.splits()] == [
        ("calibration", 500, "fashion-mnist train"),
        ("selection", 300, "fashion-mnist test"),
        ("test", 700, "fashion-mnist test"),
    ]
    hashes = _split_hashes(b)
    _assert_disjoint(hashes)
    train = set(_hashes(read_fashion_mnist("train")[0]))
    t10k = set(_hashes(read_fashion_mnist("test")[0]))
    assert set(hashes["calibration"]) <= train
    assert set(hashes["selection"]) <= t10k and set(hashes["test"]) <= t10k
    assert b.calib_y.bincount().tolist() == [50] * 10  # stratified over the 60 k


def test_the_default_selection_split_takes_what_the_held_out_images_leave_between_1000_and_4000():
    assert default_selection_size(10_000, 2000) == 4000  # fashion-mnist's test file beside a 2000-image test split
    assert default_selection_size(10_000, 7500) == 2500
    assert default_selection_size(4000, 3000) == 1000  # the demo: 4000 images, calibration 1000 + test 2000
    assert default_selection_size(500, 3000) == 1000  # a small folder: the floor, then all three shrink together
    assert [s.size for s in load_data("demo").splits()] == [1000, 1000, 2000]
    assert [s.size for s in load_data("demo", calib_size=500).splits()] == [500, 1500, 2000]
    try:
        fashion_mnist_dir()
    except DataError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    b = load_data("fashion-mnist", calib_size=100, test_size=2000)
    assert [(s.size, s.source) for s in b.splits()][1:] == [(4000, "fashion-mnist test"), (2000, "fashion-mnist test")]


def _png_folder(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for i, (img, label) in enumerate(zip(images, labels)):
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(img).save(root / classes[label] / f"{i:03d}.png")


def _demo_images(per_class: int, classes: int, skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_demo_arrays()
    idx = np.concatenate([np.flatnonzero(labels == c)[skip : skip + per_class] for c in range(classes)])
    return images[idx], labels[idx]


def test_imagefolder_without_train_val_splits_three_ways(tmp_path: Path):
    images, labels = _demo_images(6, 3)
    _png_folder(tmp_path / "d", images, labels, ["a", "b", "c"])
    b = load_data(f"imagefolder:{tmp_path / 'd'}", calib_size=4, eval_size=6, test_size=8, image_size=28)
    assert [(s.name, s.size, s.source) for s in b.splits()] == [
        ("calibration", 4, "imagefolder"),
        ("selection", 6, "imagefolder"),
        ("test", 8, "imagefolder"),
    ]
    hashes = _split_hashes(b)
    _assert_disjoint(hashes)
    assert set().union(*map(set, hashes.values())) == set(_hashes(images))


def test_imagefolder_with_train_and_val_uses_them(tmp_path: Path):
    train_images, train_labels = _demo_images(4, 3)
    val_images, val_labels = _demo_images(4, 3, skip=4)
    keep = val_labels != 1  # val/ has no folder for class b: its labels still follow train/'s class order
    _png_folder(tmp_path / "d" / "train", train_images, train_labels, ["a", "b", "c"])
    _png_folder(tmp_path / "d" / "val", val_images[keep], val_labels[keep], ["a", "b", "c"])
    b = load_data(f"imagefolder:{tmp_path / 'd'}", calib_size=5, eval_size=3, test_size=5, image_size=28)
    assert b.class_names == ["a", "b", "c"]
    assert [(s.name, s.size, s.source) for s in b.splits()] == [
        ("calibration", 5, "imagefolder train/"),
        ("selection", 3, "imagefolder val/"),
        ("test", 5, "imagefolder val/"),
    ]
    hashes = _split_hashes(b)
    _assert_disjoint(hashes)
    assert set(hashes["calibration"]) <= set(_hashes(train_images))
    assert set(hashes["selection"]) | set(hashes["test"]) == set(_hashes(val_images[keep]))
    label_of = dict(zip(_hashes(val_images), val_labels.tolist()))
    assert [label_of[h] for h in hashes["selection"]] == b.eval_y.tolist()  # c is label 2 in val/ as in train/


def test_imagefolder_val_class_missing_from_train_is_refused(tmp_path: Path):
    images, labels = _demo_images(3, 3)
    _png_folder(tmp_path / "d" / "train", images[labels < 2], labels[labels < 2], ["a", "b", "c"])
    _png_folder(tmp_path / "d" / "val", images, labels, ["a", "b", "c"])
    with pytest.raises(DataError, match=r"val has images of class\(es\) c that .*train has no folder for"):
        load_data(f"imagefolder:{tmp_path / 'd'}", image_size=28)


# ------------------------------------------------------------------------------------------------ sealed test


def test_the_test_split_is_sealed_until_opened_and_the_opening_is_recorded():
    b = load_data("demo", calib_size=50, eval_size=50, test_size=100)
    assert not b.test.opened and b.splits()[2] == SplitInfo("test", 100, "demo", ())
    with pytest.raises(SealedSplitError, match=r"sealed.*test_split\(reason="):
        _ = b.test_x
    with pytest.raises(SealedSplitError):
        _ = b.test_y
    with pytest.raises(ValueError, match="needs a reason"):
        b.test_split("  ")
    assert not b.test.opened  # a refused opening is not one
    x, y = b.test_split("final evaluation")
    assert x.shape == (100, 1, 28, 28) and torch.equal(b.test_x, x) and torch.equal(b.test_y, y)
    assert [o.reason for o in b.test.openings] == ["final evaluation"]
    assert b.test.openings[0].at.endswith("+00:00")  # when, in UTC
    assert b.splits()[2].opened_for == ("final evaluation",)


def test_channels_and_resize_transform_the_test_split_without_opening_it():
    b = load_data("demo", calib_size=50, eval_size=50, test_size=100)
    rgb = b.with_channels(3).resized(32)
    assert not b.test.opened and not rgb.test.opened
    with pytest.raises(SealedSplitError):
        _ = rgb.test_x
    x, y = rgb.test_split("final evaluation")
    assert x.shape == (100, 3, 32, 32) and torch.equal(y, b.test.open("compare")[1])
    assert [o.reason for o in b.test.openings] == ["final evaluation", "compare"]  # one log for the same images
    assert rgb.calib_x.shape[1:] == rgb.eval_x.shape[1:] == (3, 32, 32)


def test_a_bundle_built_without_a_test_split_says_so():
    b = replace(load_data("demo", calib_size=10, eval_size=10, test_size=10), test=None)  # as benchmarks build them
    assert [s.name for s in b.splits()] == ["calibration", "selection"]
    with pytest.raises(DataError, match="has no test split"):
        b.test_split("final evaluation")
    assert b.select_x is b.eval_x and b.select_y is b.eval_y
    assert b.resized(32).with_channels(3).eval_x.shape == (10, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ recovery


def _tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, in_chans=1, depth=2
    ).eval()


def test_default_lr_is_the_papers_for_cnns_and_transformers():
    cnn, vit = load_model("demo"), _tiny_vit()
    assert model_kind(cnn) == "cnn" and default_lr(cnn) == PAPER_LR["cnn"] == 1e-4
    assert model_kind(vit) == "transformer" and default_lr(vit) == PAPER_LR["transformer"] == 5e-5
    torch_attention = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.MultiheadAttention(8, 2))
    assert default_lr(torch_attention) == 5e-5


def _pruned_demo(sparsity: float) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = load_model("demo")
    prunable = [p for p in build_inventory(model) if p.prunable]
    masks = build_masks({p.name: p.weight.detach().abs() for p in prunable}, {p.name: sparsity for p in prunable})
    return model, masks


def test_finetune_trains_on_calibration_stops_on_selection_and_reports_steps(demo_data: DataBundle):
    """The demo CNN at 70 % (magnitude, no BN re-calibration: near chance) wins accuracy back in 8 steps."""
    model, masks = _pruned_demo(0.7)
    x, y, val = demo_data.calib_x, demo_data.calib_y, (demo_data.eval_x[:200], demo_data.eval_y[:200])
    res = finetune(model, masks, x, y, val=val, epochs=2, lr=1e-3, batch_size=50, patience=5)
    assert (res.train_images, res.val_images) == (200, 200)  # all of calibration trains, selection judges
    assert res.steps == 2 * 4 and res.epochs_run == 2 and res.lr == 1e-3
    assert res.improved and res.best_epoch >= 0 and res.best_val_accuracy > res.start_accuracy + 0.03, res
    assert res.best_val_accuracy == max(res.history)
    assert accuracy(model, *val) == pytest.approx(res.best_val_accuracy)  # the best epoch's weights are kept


def test_finetune_that_cannot_improve_says_so():
    """lr 0 on a model without BatchNorm (nothing else changes in training mode): the start weights stay
    best, and the result says recovery did not improve instead of passing them off as fine-tuned."""
    model = _tiny_vit()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)
    val = (torch.randn(30, 1, 32, 32, generator=g), torch.randint(0, 10, (30,), generator=g))
    res = finetune(model, {}, x, y, val=val, epochs=2, lr=0.0, batch_size=20, patience=5)
    assert res.steps == 4 and res.epochs_run == 2 and res.lr == 0.0
    assert not res.improved and res.best_epoch == -1
    assert res.history == [res.start_accuracy] * 2 and res.best_val_accuracy == res.start_accuracy
    # Without val, the old behaviour: a tenth of calibration is held out for early stopping.
    res = finetune(model, {}, x, y, epochs=1, lr=0.0, batch_size=20)
    assert (res.train_images, res.val_images, res.steps) == (36, 4, 2)
    assert finetune(model, {}, x, y, val=val, epochs=0).lr == 5e-5  # lr None: the paper's rate

"""Shared fixtures: small slices of the bundled demo data (no downloads, a few hundred images)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeprune.data import DataBundle, load_data, load_demo_arrays, write_idx


@pytest.fixture(scope="session")
def demo_data() -> DataBundle:
    """Demo data, 200 calibration and 400 evaluation images (1×28×28, 10 classes, normalized)."""
    return load_data("demo", calib_size=200, eval_size=400)


@pytest.fixture(scope="session")
def fmnist_idx_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Fashion-MNIST-layout folder (four .gz IDX files) holding 300 demo images as 'train' and 'test'."""
    images, labels = load_demo_arrays()
    folder = tmp_path_factory.mktemp("fmnist")
    for prefix, sl in (("train", slice(0, 300)), ("t10k", slice(300, 600))):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[sl])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels[sl].astype(np.uint8))
    return folder

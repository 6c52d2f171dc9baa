"""Build the bundled demo subset `edgeprune/assets/demo_fmnist.npz` from the Fashion-MNIST test set.

    python scripts/make_demo_data.py [--n 4000] [--seed 0] [--fmnist-dir DIR] [--out PATH]

4000 test images, class-balanced (400 per class), drawn with a fixed seed, stored as uint8 (N, 28, 28)
`images` and int64 `labels` plus the source indices (`test_index`), compressed. The demo model is
trained on the 60k training set only, so these images are unseen by it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from edgeprune.data import DEMO_NPZ, read_fashion_mnist


def make_demo(images: np.ndarray, labels: np.ndarray, n: int, seed: int) -> dict[str, np.ndarray]:
    classes = np.unique(labels)
    if n % len(classes):
        raise SystemExit(f"--n must be a multiple of the {len(classes)} classes, got {n}")
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(labels == c), n // len(classes), replace=False) for c in classes]
    index = np.sort(np.concatenate(picked))
    return {
        "images": images[index].astype(np.uint8),
        "labels": labels[index].astype(np.int64),
        "test_index": index.astype(np.int64),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fmnist-dir", default=None, help="folder with the IDX files (default: Debian's)")
    parser.add_argument("--out", type=Path, default=DEMO_NPZ)
    args = parser.parse_args()
    images, labels = read_fashion_mnist("test", args.fmnist_dir)
    arrays = make_demo(images, labels, args.n, args.seed)
    tmp = args.out.with_name(args.out.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, args.out)
    counts = np.bincount(arrays["labels"])
    size_mb = args.out.stat().st_size / 1e6
    print(f"wrote {args.out} ({size_mb:.2f} MB): {len(arrays['labels'])} images, per class {counts}")


if __name__ == "__main__":
    main()

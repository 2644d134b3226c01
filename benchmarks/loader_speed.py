"""DataLoader throughput over a cached manifest: images/s with and without augmentation.

Writes a small SYNTHETIC dataset (fundus_lib.data.synthetic) at ``--source-size`` px into a
temporary folder, caches it at ``--size`` px with :func:`fundus_lib.data.cache.build_cache`, then
times full passes of a DataLoader over :class:`~fundus_lib.data.datasets.FundusDataset` (tasks
dr + masks, ``--workers`` worker processes) after one warm-up pass. Prints one figure per line.
Usage: ``python benchmarks/loader_speed.py [--size 224] [--workers 2] [--images 64] [--epochs 2]``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader

from fundus_lib.data.cache import build_cache
from fundus_lib.data.datasets import FundusDataset
from fundus_lib.data.sources.synthetic import load_synthetic
from fundus_lib.data.synthetic import write_dataset
from fundus_lib.data.transforms import eval_transform, train_transform
from fundus_lib.utils import seed_worker


def images_per_second(loader: DataLoader, epochs: int) -> float:
    """Images delivered per second over ``epochs`` passes (workers persist; one warm-up pass)."""
    for _ in loader:
        pass
    count, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            count += len(batch["image"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="cached and network input side (px)")
    parser.add_argument("--source-size", type=int, default=512, help="side of the generated images (px)")
    parser.add_argument("--images", type=int, default=64, help="images in the dataset")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2, help="timed passes per setting")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temp:
        source = load_synthetic(write_dataset(Path(temp) / "synthetic", n=args.images, size=args.source_size,
                                              seed=0, workers=max(1, args.workers)))
        start = time.perf_counter()
        cached = build_cache(source, Path(temp) / "cache", args.size, workers=args.workers, progress=False)
        rate = args.images / (time.perf_counter() - start)
        print(f"build_cache {args.source_size}->{args.size}px, {args.workers} workers: {rate:.1f} images/s")
        for name, transform in (("eval (resize only)", eval_transform(args.size)),
                                ("train (crop, flips, rotation, jitter)", train_transform(args.size))):
            dataset = FundusDataset(cached, tasks=("dr", "masks"), transform=transform, image_size=args.size)
            loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                worker_init_fn=seed_worker, persistent_workers=args.workers > 0)
            rate = images_per_second(loader, args.epochs)
            print(f"loader {name} at {args.size}px, {args.workers} workers: {rate:.1f} images/s")


if __name__ == "__main__":
    main()

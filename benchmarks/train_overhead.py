"""Overhead of fit() against a bare PyTorch loop on the same model, data and device.

Prints images/s of both and their ratio (one figure per line). Both loops see identical
batches from one in-memory DataLoader, so the difference is what fit() adds: moving batch dicts,
the NaN check, loss bookkeeping, progress bars (off here, as in CI) and the history row.

    python benchmarks/train_overhead.py [--epochs 3] [--image-size 64] [--device auto]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fundus_lib.models import build_model
from fundus_lib.train import fit
from fundus_lib.utils import choose_device


class InMemory(Dataset):
    """Random images and labels held in memory, as batch dicts like FundusDataset's."""

    def __init__(self, n: int, size: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.labels = torch.randint(0, 5, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"image": self.images[index], "dr": self.labels[index]}


def loss_fn(outputs: dict, batch: dict) -> torch.Tensor:
    return nn.functional.cross_entropy(outputs["dr"], batch["dr"])


def bare_loop(model: nn.Module, loader: DataLoader, epochs: int, device: torch.device) -> float:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.to(device).train()
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            images, labels = batch["image"].to(device), batch["dr"].to(device)
            loss = nn.functional.cross_entropy(model(images)["dr"], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started)


def with_fit(model: nn.Module, loader: DataLoader, epochs: int, device: torch.device) -> float:
    started = time.perf_counter()
    history = fit(model, loss_fn, loader, epochs=epochs, lr=1e-3, device=device, progress=False,
                  amp=False, channels_last=False)
    return len(loader.dataset) * len(history) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating measurements of each loop")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = choose_device(args.device)
    loader = DataLoader(InMemory(args.images, args.image_size), batch_size=args.batch_size, shuffle=False)

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build_model("individual", task="dr", backbone="resnet18", n_dr=5)

    bare_loop(fresh(), loader, 1, device)  # warm-up (allocator, kernels)
    bare, fitted = [], []
    for _ in range(args.repeats):  # alternate so drifting machine load hits both alike
        bare.append(bare_loop(fresh(), loader, args.epochs, device))
        fitted.append(with_fit(fresh(), loader, args.epochs, device))
    best_bare, best_fit = max(bare), max(fitted)
    print(f"device: {device}, ResNet-18, {args.image_size}px, batch {args.batch_size}, {args.images} images x {args.epochs} epochs")
    print(f"bare loop images/s: {best_bare:.1f}")
    print(f"fit() images/s: {best_fit:.1f}")
    print(f"fit() overhead: {100 * (best_bare / best_fit - 1):+.1f} %")


if __name__ == "__main__":
    main()

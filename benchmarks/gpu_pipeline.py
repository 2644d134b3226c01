"""Does the loop or the data path show in the profile? Model-only vs bare loop vs fit(), and predict().

For each case (CANet / ResNet-50 at 224 and 512 px, L-Net-16s at 512 px by default) prints, in
training images/s on the same device, precision (bf16 autocast + channels_last on CUDA, fp32 on
the CPU) and batch size:

(a) model-only — training steps on one batch already on the device, no data path at all;
(b) bare loop  — a hand-written loop over the in-memory tensor data path (``TensorLoader``:
    per-image augmentation on the device, normalisation), no bookkeeping;
(c) fit()      — :func:`fundus_lib.train.fit` over the same loader;

then the ratios fit/model-only (target >= 90 % on an H200) and bare/fit overhead (target <= 3 %),
and ``predict()`` ms/image against a model-only inference loop (target within 10 %).
The data are a small synthetic set (``--images`` per case) cycled for ``--epochs``.

    python benchmarks/gpu_pipeline.py                 # CANet 224/512 and L-Net 512 on CUDA; ResNet-18 64 px on a CPU
    python benchmarks/gpu_pipeline.py --cases canet:224 --batch 128
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from typing import Callable

import torch
from torch import nn

from fundus_lib.data.pipeline import make_loaders, synthetic_benchmark
from fundus_lib.losses import DualLoss
from fundus_lib.models import build_model
from fundus_lib.models.canet import canet_loss
from fundus_lib.models.lnet import LNet
from fundus_lib.train import fit, predict
from fundus_lib.utils import choose_device, seed_everything

GPU_CASES = ("canet:224", "canet:512", "lnet:512")
CPU_CASES = ("resnet18:64",)  # ResNet-50 at 224 px trains at a few images/s on a laptop CPU


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case(name: str) -> tuple[Callable[[], nn.Module], Callable, tuple[str, ...]]:
    """(model factory, loss, dataset tasks) of a benchmark case."""
    if name == "canet":
        return (lambda: build_model("canet", n_dr=5), lambda out, batch: canet_loss(out, batch, lam=0.25),
                ("dr", "dme"))
    if name == "resnet18":  # a CPU-sized grader: the loop's overhead shows more on a fast model
        return (lambda: build_model("individual", task="dr", backbone="resnet18", n_dr=5),
                lambda out, batch: nn.functional.cross_entropy(out["dr"], batch["dr"]), ("dr",))
    if name == "lnet":
        return (lambda: LNet("16s"), DualLoss(), ("masks", "lesion_present"))
    raise SystemExit(f"unknown case {name!r}; use canet, lnet or resnet18")


def _context(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


def _device_batch(loader, device: torch.device) -> dict:
    batch = next(iter(loader.to(device)))
    if device.type == "cuda":
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    return batch


def _step(model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, batch: dict,
          device: torch.device) -> None:
    with _context(device):
        loss = loss_fn(model(batch["image"]), batch)
        loss = loss[0] if isinstance(loss, tuple) else loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def model_only(factory, loss_fn, loader, device, steps: int) -> float:
    """(a) images/s of training steps on one device-resident batch."""
    model = _prepare(factory(), device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = _device_batch(loader, device)
    _step(model, loss_fn, optimizer, batch, device)  # warm-up
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        _step(model, loss_fn, optimizer, batch, device)
    _sync(device)
    return steps * len(batch["image"]) / (time.perf_counter() - started)


def bare_loop(factory, loss_fn, loader, device, epochs: int) -> float:
    """(b) images/s of a plain loop over the tensor data path."""
    model = _prepare(factory(), device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    on_device = loader.to(device)
    _step(model, loss_fn, optimizer, next(iter(on_device)), device)  # warm-up
    _sync(device)
    seen, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in on_device:
            if device.type == "cuda":
                batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
            _step(model, loss_fn, optimizer, batch, device)
            seen += len(batch["image"])
    _sync(device)
    return seen / (time.perf_counter() - started)


def with_fit(factory, loss_fn, loader, device, epochs: int) -> float:
    """(c) images/s of fit() over the same loader (history's own timing, validation excluded)."""
    model = factory()
    fit(model, loss_fn, loader, epochs=1, lr=1e-4, device=device, progress=False)  # warm-up
    history = fit(model, loss_fn, loader, epochs=epochs, lr=1e-4, device=device, progress=False)
    return float(history["images_per_s"].median())


@torch.no_grad()
def inference_ms(factory, loader, device, repeats: int) -> tuple[float, float]:
    """(model-only ms/image on device batches, predict() ms/image over the loader)."""
    model = _prepare(factory(), device).eval()
    batches = [b["image"] for b in loader.to(device)]
    if device.type == "cuda":
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    with _context(device):
        model(batches[0])
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        with _context(device):
            for images in batches:
                model(images)
    _sync(device)
    images = repeats * sum(len(b) for b in batches)
    bare = 1000 * (time.perf_counter() - started) / images
    predict(model, loader, device=device, progress=False)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        predict(model, loader, device=device, progress=False)
    return bare, 1000 * (time.perf_counter() - started) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None,
                        help=f"model:size, model in canet, lnet, resnet18 (default: {GPU_CASES} on CUDA, {CPU_CASES} "
                             "elsewhere)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--images", type=int, default=512, help="synthetic images per case (training set)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="model-only steps")
    parser.add_argument("--repeats", type=int, default=2, help="alternating measurements of each variant (best kept)")
    parser.add_argument("--data-root", default=None, help="where the synthetic sets go (default: a temp folder)")
    args = parser.parse_args()
    device = choose_device(args.device)
    cases = args.cases or (GPU_CASES if device.type == "cuda" else CPU_CASES)
    precision = "bf16 autocast + channels_last" if device.type == "cuda" else "fp32"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {device} ({name}), {precision}, batch {args.batch}")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.data_root or scratch
        for case in cases:
            model_name, size = case.split(":")
            factory, loss_fn, tasks = _case(model_name)
            manifest = synthetic_benchmark(args.images, 1, args.batch, int(size), seed=0, root=root)
            loaders = make_loaders(manifest, tasks, image_size=int(size), batch_size=args.batch, data_path="memory")
            seed_everything(0)
            a = b = c = 0.0
            for _ in range(args.repeats):  # alternate, keep the best: load drift hits every variant alike
                a = max(a, model_only(factory, loss_fn, loaders["train"], device, args.steps))
                b = max(b, bare_loop(factory, loss_fn, loaders["train"], device, args.epochs))
                c = max(c, with_fit(factory, loss_fn, loaders["train"], device, args.epochs))
            bare_ms, predict_ms = inference_ms(factory, loaders["test"], device, repeats=3)
            label = f"{model_name} {size}px"
            print(f"{label} (a) model-only train images/s: {a:.1f}")
            print(f"{label} (b) bare loop over the tensor data path images/s: {b:.1f}")
            print(f"{label} (c) fit() over the tensor data path images/s: {c:.1f}")
            print(f"{label} fit() / model-only: {100 * c / a:.1f} %")
            print(f"{label} fit() overhead over the bare loop: {100 * (b / c - 1):+.1f} %")
            print(f"{label} inference model-only ms/image: {bare_ms:.3f}")
            print(f"{label} predict() ms/image: {predict_ms:.3f} ({100 * (predict_ms / bare_ms - 1):+.1f} %)")


if __name__ == "__main__":
    main()

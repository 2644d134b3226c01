"""Speed of CLPI (Yang et al., T-Cyb 2022): the lesion attention generator alone and the whole CLPI.

Random batches (no data loading), the paper's networks: the generator of Table II and CLPI with a
DenseNet-121 grading module (the image graded at half the generator's input). Inference =
eval-mode forward without autograd, in ms/image, at 512 and 1024 px (``--sizes``); training =
forward, cross-entropy on the grades, backward and an Adam step, in images/s, at the first size.
On CUDA each figure is measured again with bf16 autocast and channels_last. The paper reports
0.028 s per 1024 x 1024 image for the whole framework on one P40.

Prints one figure per line. Usage: ``python benchmarks/clpi_speed.py [--device auto] [--batch 2]
[--sizes 512 1024] [--iters 2] [--warmup 1] [--widths paper]``.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from fundus_lib.models.clpi import CLPI, clpi_loss
from fundus_lib.utils import choose_device, seconds_per_call


def _autocast(fast: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if fast else contextlib.nullcontext()


def inference_ms(model: nn.Module, device: torch.device, batch_size: int, size: int, iters: int, warmup: int,
                 fast: bool) -> float:
    """Eval-mode forward of ``model`` on a random (batch, 3, size, size) batch, in ms per image."""
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.inference_mode(), _autocast(fast):
            model(images)

    return 1000.0 * seconds_per_call(step, device, iters, warmup) / batch_size


def training_images_per_s(model: CLPI, device: torch.device, batch_size: int, size: int, iters: int, warmup: int,
                          fast: bool) -> float:
    """Training steps of the whole CLPI (grade cross-entropy, Adam) on random batches, in images/s."""
    memory_format = torch.channels_last if fast else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    batch = {"dr": torch.randint(0, 5, (batch_size,), device=device)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(fast):
            loss = clpi_loss(model(images), batch)
        loss.backward()
        optimizer.step()

    return batch_size / seconds_per_call(step, device, iters, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="generator input sides (px)")
    parser.add_argument("--iters", type=int, default=2, help="timed iterations per figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    parser.add_argument("--widths", default="paper", choices=("paper", "authors"), help="generator widths")
    args = parser.parse_args()
    device = choose_device(args.device)
    modes = [False]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        modes.append(True)
    for fast in modes:
        precision = "bf16+channels_last" if fast else "fp32"
        torch.manual_seed(0)
        model = CLPI(n_dr=5, widths=args.widths, backbone="densenet121")
        for size in args.sizes:
            label = f"{size}px batch {args.batch} {device.type} {precision}"
            generator_ms = inference_ms(model.generator, device, args.batch, size, args.iters, args.warmup, fast)
            print(f"generator ({args.widths} widths) {label} inference: {generator_ms:.1f} ms/image")
            clpi_ms = inference_ms(model, device, args.batch, size, args.iters, args.warmup, fast)
            print(f"clpi (densenet121 at {size // 2}px) {label} inference: {clpi_ms:.1f} ms/image")
        size = args.sizes[0]
        train_ips = training_images_per_s(model, device, args.batch, size, args.iters, args.warmup, fast)
        print(f"clpi (densenet121 at {size // 2}px) {size}px batch {args.batch} {device.type} {precision} "
              f"train: {train_ips:.2f} images/s")


if __name__ == "__main__":
    main()

"""Speed of CANet and of joint training (ResNet-50): training images/s and inference ms/image.

Random 224 x 224 batches (no data loading). Training = forward, Eq. 7 loss (lambda = 0.25 for
CANet, 0 for the joint baseline, which has no auxiliary heads), backward and an Adam step.
Inference = eval-mode forward without autograd. On CUDA each model is measured again with bf16
autocast and channels_last memory format. The paper reports 0.02 s per image at inference on a
Titan Xp.

Prints one figure per line. Usage: ``python benchmarks/canet_speed.py [--device auto] [--batch 8]
[--iters 3] [--warmup 1] [--size 224]``.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from torch import nn

from fundus_lib.models import build_model
from fundus_lib.models.canet import canet_loss
from fundus_lib.utils import choose_device, seconds_per_call


def measure(model: nn.Module, lam: float, device: torch.device, batch_size: int, size: int, iters: int,
            warmup: int, bf16_channels_last: bool) -> tuple[float, float]:
    """(training images/s, inference ms/image) of ``model`` on random batches."""
    memory_format = torch.channels_last if bf16_channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    images = torch.randn(batch_size, 3, size, size, device=device).contiguous(memory_format=memory_format)
    batch = {"dr": torch.randint(0, 2, (batch_size,), device=device),
             "dme": torch.randint(0, 3, (batch_size,), device=device)}
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=1e-4)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if bf16_channels_last else contextlib.nullcontext())

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            total, _ = canet_loss(model(images), batch, lam=lam)
        total.backward()
        optimizer.step()

    def infer_step() -> None:
        with torch.inference_mode(), autocast:
            model(images)

    model.train()
    train_seconds = seconds_per_call(train_step, device, iters, warmup)
    model.eval()
    infer_seconds = seconds_per_call(infer_step, device, iters, warmup)
    return batch_size / train_seconds, 1000.0 * infer_seconds / batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--batch", type=int, default=8, help="images per batch")
    parser.add_argument("--size", type=int, default=224, help="image side (px)")
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per figure")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing")
    args = parser.parse_args()
    device = choose_device(args.device)
    modes = [False]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        modes.append(True)
    for name, lam in (("canet", 0.25), ("joint", 0.0)):
        for fast in modes:
            torch.manual_seed(0)
            train_ips, infer_ms = measure(build_model(name), lam, device, args.batch, args.size, args.iters,
                                          args.warmup, fast)
            label = f"{name} resnet50 {args.size}px batch {args.batch} {device.type} {'bf16+channels_last' if fast else 'fp32'}"
            print(f"{label} train: {train_ips:.1f} images/s")
            print(f"{label} inference: {infer_ms:.1f} ms/image")


if __name__ == "__main__":
    main()

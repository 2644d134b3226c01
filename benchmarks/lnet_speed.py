"""L-Net / SiAN speed and memory: one figure per line.

- L-Net segmentation training throughput (images/s; SGD momentum 0.95, dual loss) at each size;
- L-Net inference latency (ms/image, batch 1, eval mode, no gradients) at each size;
- SiAN (Conv attention, feature fusion, L-Net-16s side branch) inference peak memory at the largest
  size, weights included. The paper quotes "about 1.5 GB GPU memory" at 896 x 896. On CUDA the
  figure is ``torch.cuda.max_memory_allocated``; on CPU it is the growth of the peak resident set
  size (``ru_maxrss``) of a fresh process from before the model is built to after one forward pass
  (it includes allocator slack, so it reads higher than the tensors alone).

Inputs are random tensors: speed does not depend on image content. Few iterations are timed after
one warm-up, so CPU figures are rough. Usage::

    python benchmarks/lnet_speed.py [--device auto|cpu|cuda] [--sizes 299 896] [--iters 2] [--batch 2]
"""
from __future__ import annotations

import argparse
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

from fundus_lib.losses import DualLoss
from fundus_lib.models.lnet import LNet
from fundus_lib.models.sian import SiAN
from fundus_lib.utils import choose_device, seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_images_per_second(model: LNet, size: int, batch_size: int, iters: int, device: torch.device) -> float:
    """Segmentation training steps (forward, dual loss, backward, SGD step) per second, times batch size."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.95, weight_decay=1e-4)
    loss_fn = DualLoss()
    images = torch.randn(batch_size, 3, size, size, device=device)
    masks = (torch.rand(batch_size, model.n_lesions, size, size, device=device) > 0.99).float()
    batch = {"masks": masks, "mask_valid": torch.ones(batch_size, model.n_lesions, device=device),
             "lesion_present": masks.amax(dim=(2, 3))}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = loss_fn(model(images), batch)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    _sync(device)
    return iters * batch_size / (time.perf_counter() - start)


@torch.no_grad()
def inference_ms_per_image(model: torch.nn.Module, size: int, iters: int, device: torch.device) -> float:
    """Mean latency of a batch-1 forward pass in eval mode."""
    model.eval()
    image = torch.randn(1, 3, size, size, device=device)
    model(image)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        model(image)
    _sync(device)
    return 1000.0 * (time.perf_counter() - start) / iters


def sian_peak_memory_mb(size: int, device_name: str) -> float:
    """Peak memory (MiB) of building SiAN and running one batch-1 inference at ``size`` (see module doc)."""
    device = choose_device(device_name)
    seed_everything(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = SiAN(attention="conv", fusion="feature").to(device).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size, device=device))
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return (peak - before) / 2**20


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[299, 896])
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="training batch size")
    parser.add_argument("--variant", default="16s")
    return parser.parse_args()


def main() -> None:
    args = _parse_args()
    device = choose_device(args.device)
    # CPU peak RSS needs a fresh process (ru_maxrss never decreases); run it before anything else.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        memory_mb = pool.submit(sian_peak_memory_mb, max(args.sizes), str(device)).result()
    seed_everything(0)
    model = LNet(args.variant).to(device)
    print(f"device: {device} ({torch.get_num_threads()} CPU threads)")
    print(f"L-Net-{args.variant} parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    for size in args.sizes:
        rate = train_images_per_second(model, size, args.batch, args.iters, device)
        print(f"L-Net-{args.variant} training {size}px batch {args.batch}: {rate:.3f} images/s")
    for size in args.sizes:
        latency = inference_ms_per_image(model, size, args.iters, device)
        print(f"L-Net-{args.variant} inference {size}px: {latency:.1f} ms/image")
    print(f"SiAN (conv, feature fusion) inference peak memory {max(args.sizes)}px: {memory_mb:.0f} MiB "
          f"(paper: about 1.5 GB on GPU)")


if __name__ == "__main__":
    main()

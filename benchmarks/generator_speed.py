"""Speed of the SynthFundus generator on ONE core: images per second with all 8 lesion masks.

Prints one figure per line: in-memory generation (``generate``) at 256 and 512 px, measured both
as wall-clock and as process CPU time (the CPU figure is what one core delivers even when other
jobs share the machine), and ``write_dataset`` (PNG images + masks + labels) at 512 px.
Target from the spec: >= 20 images/s at 512 x 512.
"""
from __future__ import annotations

import os

for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[variable] = "1"

import tempfile  # noqa: E402 - thread limits must be set before the numeric libraries load
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import torch  # noqa: E402

from fundus_lib.data.synthetic import generate, write_dataset  # noqa: E402

IMAGES = 60
PRIOR = "idrid"


def measure(function) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    for size in (256, 512):
        generate(4, size, seed=0, prior=PRIOR)  # warm-up: caches and lazy imports
        wall, cpu = measure(lambda: generate(IMAGES, size, seed=1, prior=PRIOR))
        print(f"generate {size}x{size} + 8 masks, 1 core: {IMAGES / wall:.1f} images/s (wall clock)")
        print(f"generate {size}x{size} + 8 masks, 1 core: {IMAGES / cpu:.1f} images/s (process CPU time)")
    with tempfile.TemporaryDirectory() as folder:
        wall, cpu = measure(lambda: write_dataset(Path(folder) / "set", IMAGES, 512, seed=1, prior=PRIOR))
    print(f"write_dataset 512x512 PNG + masks + labels, 1 core: {IMAGES / wall:.1f} images/s (wall clock)")


if __name__ == "__main__":
    main()

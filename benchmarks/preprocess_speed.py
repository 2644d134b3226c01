"""Speed of each fundus_lib.preprocess step on skimage.data.retina() scaled to 512 x 512.

Prints one figure per line: ``<step> images/s``. Usage: ``python benchmarks/preprocess_speed.py
[--size 512] [--seconds 1.0]``.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import cv2
import numpy as np
import skimage.data

from fundus_lib import preprocess as pp


def images_per_second(step: Callable[[], object], seconds: float) -> float:
    """Call ``step`` repeatedly (after one warm-up call) for about ``seconds``; return calls/s."""
    step()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        calls += 1
    return calls / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="side of the square test image (px)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time spent per step")
    args = parser.parse_args()
    image = cv2.resize(skimage.data.retina(), (args.size, args.size), interpolation=cv2.INTER_AREA)
    fov = pp.detect_fov(image)
    steps: dict[str, Callable[[], object]] = {
        "to_rgb_uint8(uint16)": lambda: pp.to_rgb_uint8(image.astype(np.uint16) * 257),
        "detect_fov": lambda: pp.detect_fov(image),
        "crop_to_fov": lambda: pp.crop_to_fov(image, fov),
        "square_resize(256)": lambda: pp.square_resize(image, 256),
        "graham": lambda: pp.graham(image, fov=fov),
        "median_background": lambda: pp.median_background(image),
        "clahe_green": lambda: pp.clahe_green(image),
        "quality_scores": lambda: pp.quality_scores(image, fov),
        "preprocess(crop,graham)": lambda: pp.preprocess(image, ("crop", "graham"), size=args.size),
    }
    for name, step in steps.items():
        print(f"{name} at {args.size}px: {images_per_second(step, args.seconds):.1f} images/s")


if __name__ == "__main__":
    main()

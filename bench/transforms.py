"""Per-image cost of the training transform (crop, flip, optional RandAugment, resize, to_tensor).

    python bench/transforms.py
"""
import random
import time

import numpy as np
from PIL import Image

from navit_pe.transforms import TrainTransform


def main() -> None:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for size in [(32, 32), (16, 48), (48, 48)]:
        for ra in (False, True):
            tf, rng = TrainTransform(randaugment=ra), random.Random(0)
            for _ in range(50):
                tf(img, rng, size)
            n = 2000
            t0 = time.perf_counter()
            for _ in range(n):
                tf(img, rng, size)
            us = (time.perf_counter() - t0) / n * 1e6
            print(f"TrainTransform(randaugment={ra}) 32x32 -> {size}: {us:.1f} us/image")


if __name__ == "__main__":
    main()

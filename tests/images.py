"""Images the tests make themselves: folders of random-noise pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def noise_images(root: Path, count: int, size: tuple[int, int] = (16, 16), seed: int = 0, suffix: str = ".png") -> Path:
    """`count` random RGB images of `size` (width, height) named 00..NN in `root` (created)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"{i:02d}{suffix}")
    return root

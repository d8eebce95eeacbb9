"""Image folders that tests write: ``folder:`` datasets with learnable classes."""

import numpy as np
from PIL import Image

CLASSES = ("cat", "dog", "fox")


def write_folder(root, size=(12, 10), per_class=(6, 3), mode="RGB", suffix=".png"):
    """root/{train,test}/<class>/*: class k's images are mostly brightness 60 + 80 k, so they are learnable."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "test"), per_class, strict=True):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = np.clip(60 + 80 * k + rng.normal(0, 10, shape), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode).save(folder / f"{i}{suffix}")
    return root

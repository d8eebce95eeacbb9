"""Training augmentation as pure functions of a batch and a seeded ``numpy.random.Generator``.

The pipeline gives each batch its own generator, derived from the seed, the epoch and the
batch's position, so augmentation is reproducible and independent of threading.

- ``crop``: zero-pad and crop back at a random offset (the CIFAR convention);
- ``flip``: mirror left-right with probability 1/2;
- ``rrc``: timm's and torchvision's random-resized crop (``RandomResizedCropAndInterpolation.get_params``
  of timm 1.0.29: area 8-100 %, aspect ratio 3/4-4/3 drawn log-uniformly, ten tries, then the centre
  crop), resized back to the image's size with Pillow's bilinear filter. Deviations from timm's
  ImageNet training transform: the crop is drawn from the image as the dataset holds it (resized
  to ``--image-size`` and centre-cropped when loaded), not from the original file; the
  interpolation is bilinear, not timm's random choice of bilinear and bicubic; timm's colour
  jitter (0.4 by default) is not applied.
"""

from __future__ import annotations

import math

import numpy as np

from attnjax.data.images import _pil
from attnjax.validate import InputError

CHOICES = ("auto", "none", "crop", "flip", "crop+flip", "rrc", "rrc+flip")
RRC_SCALE = (0.08, 1.0)  # timm's and torchvision's defaults
RRC_RATIO = (3 / 4, 4 / 3)


def random_crop(images: np.ndarray, rng: np.random.Generator, padding: int) -> np.ndarray:
    """Zero-pad each image by ``padding`` on every side and crop it back at a random offset."""
    if padding <= 0:
        return images
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    top = rng.integers(0, 2 * padding + 1, b)
    left = rng.integers(0, 2 * padding + 1, b)
    out = np.empty_like(images)
    for i in range(b):  # a slice per image: 7x faster than one fancy-indexing gather at 32x32
        out[i] = padded[i, top[i] : top[i] + h, left[i] : left[i] + w]
    return out


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror each image left-right with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    out = images.copy()
    out[flip] = images[flip, :, ::-1]  # copies only the flipped half twice, not every pixel through np.where
    return out


def resized_crop_box(
    height: int, width: int, rng: np.random.Generator, scale=RRC_SCALE, ratio=RRC_RATIO
) -> tuple[int, int, int, int]:
    """``(top, left, crop height, crop width)`` of one random-resized crop, drawn as timm draws it."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height  # ten misses: the centre crop of the ratio nearest the image's
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image's random-resized crop (:func:`resized_crop_box`), resized back to its size (bilinear)."""
    Image = _pil()
    b, height, width, channels = images.shape
    out = np.empty_like(images)
    for i in range(b):
        top, left, h, w = resized_crop_box(height, width, rng)
        box = (left, top, left + w, top + h)
        # Pillow crops and resizes in one pass (antialiased when shrinking, as timm's PIL path);
        # uint8 images as one L/RGB image, floats one channel at a time in mode F.
        if images.dtype == np.uint8 and channels in (1, 3):
            pil = Image.fromarray(images[i, ..., 0] if channels == 1 else images[i])
            out[i] = np.asarray(pil.resize((width, height), Image.BILINEAR, box=box)).reshape(height, width, channels)
        else:
            for c in range(channels):
                pil = Image.fromarray(images[i, ..., c].astype(np.float32), mode="F")
                out[i, ..., c] = np.asarray(pil.resize((width, height), Image.BILINEAR, box=box))
    return out


def crop_padding(image_size: int) -> int:
    """The crop's padding: 4 pixels at 32x32 (the CIFAR convention), scaled with the image."""
    return max(1, round(image_size / 8))


def augment(images: np.ndarray, rng: np.random.Generator, mode: str) -> np.ndarray:
    """Apply ``mode`` (one of :data:`CHOICES` but ``auto``) to a batch of NHWC images."""
    if mode not in CHOICES[1:]:
        raise InputError(f"unknown augmentation {mode!r}; valid: {', '.join(CHOICES)}")
    if "rrc" in mode:
        images = random_resized_crop(images, rng)
    if mode.split("+")[0] == "crop":
        images = random_crop(images, rng, crop_padding(min(images.shape[1:3])))
    if "flip" in mode:
        images = random_flip(images, rng)
    return images


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """float32 ``(x - mean) / std`` per channel, with ``x`` the pixels in [0, 1]."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    # One conversion and one in-place multiply-subtract instead of four allocating passes: this
    # runs on the host for every batch, on the cores the train step computes on.
    unit = np.float32(1 / 255) if images.dtype == np.uint8 else np.float32(1)
    out = images.astype(np.float32)
    out *= unit / std
    out -= mean / std
    return out

"""Decoding and resizing single images (Pillow), for folders and TFDS datasets of varying size."""

from __future__ import annotations

import io

import numpy as np

from attnjax.validate import InputError


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise InputError(
            "reading image files needs Pillow: pip install 'attnjax[tfds]' (or pip install pillow)"
        ) from None
    return Image


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is ``size`` (bilinear), then crop the centre ``size`` x ``size``.

    Keeps the aspect ratio (no stretching), as image-classification evaluation usually does.
    """
    if image.shape[0] == image.shape[1] == size:
        return image
    Image = _pil()
    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    h, w = image.shape[:2]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    out = np.asarray(pil.crop((left, top, left + size, top + size)))
    return out[..., None] if channels == 1 else out


def decode_image(data: bytes | str, channels: int, name: str) -> np.ndarray:
    """Decode PNG/JPEG bytes or a file into (H, W, channels) uint8; ``name`` labels errors."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as pil:
            pil = pil.convert("L" if channels == 1 else "RGB")
            image = np.asarray(pil)
    except Exception as error:  # Pillow raises several types for corrupt or foreign files
        raise InputError(f"cannot read image {name}: {error}. Remove or replace that file.") from None
    return image[..., None] if channels == 1 else image


def channels_of(path: str) -> int:
    """1 for grayscale files, 3 for anything else (colour, palette, alpha is dropped)."""
    Image = _pil()
    try:
        with Image.open(path) as pil:
            return 1 if pil.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
    except Exception as error:
        raise InputError(f"cannot read image {path}: {error}. Remove or replace that file.") from None

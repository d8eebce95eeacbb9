"""timm's pretrained preprocessing: its ``pretrained_cfg`` (:class:`PretrainedConfig`) and its eval transform.

    from attnjax.data.pretrained_transforms import EvalTransform
    transform = EvalTransform.from_config(loaded.config)           # a PretrainedConfig (attnjax.models.pretrained)
    x = transform(image_uint8_hwc)                                  # (size, size, 3) float32, normalised

:class:`PretrainedConfig` holds the fields of timm's ``pretrained_cfg`` that evaluation uses, read from a
timm ``config.json`` (:func:`config_from_json`) or timm's generic ResNet defaults (:func:`default_config`).

:class:`EvalTransform` is timm's ``transforms_imagenet_eval`` with torchvision's arithmetic, in NumPy and Pillow
(no torch, no torchvision): the shorter side is resized to ``floor(size / crop_pct)`` (the longer one to
``int(scale * long / short)``, the aspect ratio kept) with the config's interpolation (Pillow's resampling, as
torchvision's on PIL images), the centre ``size`` x ``size`` is cropped (offsets ``round((h - size) / 2)``),
and pixels in [0, 1] are normalised by the config's mean and std. ``crop_mode="squash"`` resizes both sides to
``floor(size / crop_pct)`` instead; timm's ``"border"`` mode is refused. The result is (height, width,
channels), attnjax's layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from attnjax.data.images import _pil
from attnjax.validate import InputError

CROP_MODES = ("center", "squash")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # timm.data.IMAGENET_DEFAULT_MEAN
IMAGENET_STD = (0.229, 0.224, 0.225)  # timm.data.IMAGENET_DEFAULT_STD
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """How the weights expect their images: timm's ``pretrained_cfg`` fields that the eval transform uses.

    ``input_size`` is (channels, height, width); ``crop_pct`` the fraction of the resized image that the centre
    crop keeps (the shorter side is resized to ``height / crop_pct``); ``mean``/``std`` normalise pixels in
    [0, 1]. ``default`` is True where no config came with the weights and these are timm's generic defaults;
    ``note`` says where the values came from.
    """

    architecture: str
    num_classes: int = 1000
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    crop_mode: str = "center"
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    label_names: tuple[str, ...] | None = None
    default: bool = False
    note: str = ""

    @property
    def image_size(self) -> int:
        return int(self.input_size[-1])

    def to_timm(self) -> dict:
        """``config.json`` in timm's layout (``timm.models._hub.save_config_for_hf``), for :func:`save`."""
        cfg = {
            "input_size": list(self.input_size),
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "crop_pct": self.crop_pct,
            "crop_mode": self.crop_mode,
            "num_classes": self.num_classes,
            "first_conv": "conv1",
            "classifier": "fc",
        }
        out: dict[str, Any] = {"architecture": self.architecture, "num_classes": self.num_classes}
        if self.label_names:
            out["label_names"] = list(self.label_names)
        out["pretrained_cfg"] = cfg
        return out


def default_config(name: str, note: str = "") -> PretrainedConfig:
    """timm's generic ResNet ``pretrained_cfg`` (``_cfg`` in timm's resnet.py), marked as the default."""
    return PretrainedConfig(
        architecture=name,
        default=True,
        note=note
        or f"no config.json came with the weights: timm's default preprocessing for {name} "
        "(224 x 224, crop 0.875, bilinear, ImageNet mean/std) is assumed",
    )


def config_from_json(cfg: Mapping, name: str, where: str) -> PretrainedConfig:
    """A :class:`PretrainedConfig` from a timm ``config.json`` (``where`` names it in errors)."""
    if not isinstance(cfg, Mapping):
        raise InputError(f"{where} is not a timm config (a JSON object with 'pretrained_cfg')")
    if "pretrained_cfg" in cfg:
        pre = dict(cfg["pretrained_cfg"] or {})
        if "num_classes" in cfg:  # top-level overrides, as timm's _parse_model_cfg
            pre["num_classes"] = cfg["num_classes"]
        if "label_names" in cfg:
            pre["label_names"] = cfg["label_names"]
    else:  # timm's legacy flat layout
        pre = dict(cfg)
        if "labels" in pre:
            pre["label_names"] = pre.pop("labels")
    architecture = str(cfg.get("architecture", name))
    base = PretrainedConfig(architecture=architecture)
    try:
        input_size = tuple(int(v) for v in pre.get("input_size", base.input_size))
        mean = tuple(float(v) for v in pre.get("mean", base.mean))
        std = tuple(float(v) for v in pre.get("std", base.std))
        crop_pct = float(pre.get("crop_pct") or base.crop_pct)
        num_classes = int(pre.get("num_classes", base.num_classes))
    except (TypeError, ValueError) as error:
        raise InputError(f"{where}: a pretrained_cfg value is malformed ({error})") from None
    interpolation = str(pre.get("interpolation") or base.interpolation)
    if len(input_size) != 3 or input_size[1] != input_size[2] or min(input_size) < 1:
        raise InputError(f"{where}: input_size {list(input_size)} is not (channels, size, size)")
    if not 0 < crop_pct <= 1 or len(mean) != input_size[0] or len(std) != input_size[0] or min(std) <= 0:
        raise InputError(f"{where}: crop_pct {crop_pct}, mean {list(mean)} or std {list(std)} is malformed")
    if interpolation not in INTERPOLATIONS:
        raise InputError(f"{where}: interpolation {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
    labels = pre.get("label_names")
    if isinstance(labels, Mapping):
        labels = [labels[k] for k in sorted(labels, key=lambda k: int(k))]
    return PretrainedConfig(
        architecture=architecture,
        num_classes=num_classes,
        input_size=input_size,  # type: ignore[arg-type]
        crop_pct=crop_pct,
        crop_mode=str(pre.get("crop_mode") or "center"),
        interpolation=interpolation,
        mean=mean,
        std=std,
        label_names=tuple(map(str, labels)) if labels else None,
        note=f"preprocessing from {where}",
    )


def _resample(interpolation: str):
    Image = _pil()
    modes = {
        "nearest": Image.NEAREST,
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "lanczos": Image.LANCZOS,
        "box": Image.BOX,
        "hamming": Image.HAMMING,
    }
    if interpolation not in modes:
        raise InputError(f"interpolation {interpolation!r} is not one of {', '.join(modes)}")
    return modes[interpolation]


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """Resize, centre crop, normalise: one uint8 (H, W, C) image to a float32 (size, size, C) array."""

    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_mode: str = "center"

    def __post_init__(self):
        if self.image_size < 1 or not 0 < self.crop_pct <= 1:
            raise InputError(
                f"image size {self.image_size} and crop_pct {self.crop_pct}: need size >= 1, 0 < crop <= 1"
            )
        if self.crop_mode not in CROP_MODES:
            raise InputError(
                f"crop_mode {self.crop_mode!r} is not read; attnjax evaluates with {', '.join(CROP_MODES)}"
            )
        _resample(self.interpolation)

    @classmethod
    def from_config(cls, config, image_size: int | None = None) -> EvalTransform:
        """The transform of a :class:`~attnjax.models.pretrained.PretrainedConfig` (``image_size`` overrides its own)."""
        return cls(
            image_size=int(image_size or config.image_size),
            crop_pct=float(config.crop_pct),
            interpolation=config.interpolation,
            mean=tuple(config.mean),
            std=tuple(config.std),
            crop_mode=config.crop_mode,
        )

    @property
    def scale_size(self) -> int:
        return math.floor(self.image_size / self.crop_pct)

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """The resized and cropped uint8 image (before normalisation)."""
        Image = _pil()
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        h, w = image.shape[:2]
        size = self.scale_size
        if self.crop_mode == "squash":
            new_h, new_w = size, size
        elif w <= h:  # torchvision's Resize(int): the shorter side to `size`, the longer one truncated
            new_w, new_h = size, int(size * h / w)
        else:
            new_h, new_w = size, int(size * w / h)
        if (new_h, new_w) != (h, w):
            pil = pil.resize((new_w, new_h), _resample(self.interpolation))
        crop = self.image_size
        if crop > new_h or crop > new_w:  # only where crop_pct rounds past the image (torchvision pads with 0)
            raise InputError(f"image of {w}x{h} resized to {new_w}x{new_h} is smaller than the crop {crop}")
        top, left = round((new_h - crop) / 2.0), round((new_w - crop) / 2.0)
        out = np.asarray(pil.crop((left, top, left + crop, top + crop)))
        return out[..., None] if out.ndim == 2 else out

    def normalize(self, image: np.ndarray) -> np.ndarray:
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        if image.shape[-1] != mean.size:
            raise InputError(f"image has {image.shape[-1]} channels, the weights' mean/std {mean.size}")
        return (image.astype(np.float32) / np.float32(255.0) - mean) / std

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.normalize(self.resize_crop(image))

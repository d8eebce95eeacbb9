"""Input checks shared by blocks, models and the training loop.

Each raises :class:`InputError` (a ``ValueError``) with a message that names the problem and the fix, so that
a shape mistake surfaces at the module boundary instead of deep inside an XLA trace.
"""

from __future__ import annotations

import argparse
import sys


class InputError(ValueError):
    """Bad input from the user; the message names the problem and the fix."""


class CommandLineParser(argparse.ArgumentParser):
    """``argparse`` whose refusal is one line, as attnjax's own refusals are (no 20-line usage above it).

    The commands' parsers (train, compare, viz, blocks, block_cost) are of this class.
    """

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(2)


def check_nhwc(x, who: str) -> None:
    """Require a rank-4 (batch, height, width, channels) array."""
    if getattr(x, "ndim", None) != 4:
        shape = getattr(x, "shape", None)
        raise InputError(
            f"{who} expects images of shape (batch, height, width, channels) (NHWC, rank 4); "
            f"got shape {shape}. For a single image add a batch axis (x[None]); "
            "for NCHW arrays from PyTorch use x.transpose(0, 2, 3, 1)."
        )


def check_channels(x, expected: int, who: str) -> None:
    """Require the channel count that a trained model's parameters were made for."""
    if x.shape[-1] != expected:
        raise InputError(
            f"{who} was built for {expected}-channel images but got {x.shape[-1]} channels "
            f"(input shape {x.shape}). Feed images with {expected} channels "
            "(e.g. convert RGB/grayscale to match), or initialise a new model for this input."
        )


def check_divisible(batch_size: int, num_devices: int) -> None:
    """Require a global batch that splits evenly over the devices."""
    if batch_size <= 0 or batch_size % num_devices:
        lower = max(num_devices, batch_size // num_devices * num_devices)
        upper = (batch_size // num_devices + 1) * num_devices
        raise InputError(
            f"batch size {batch_size} does not split over {num_devices} devices: "
            f"use a multiple of {num_devices} (for example {lower} or {upper})."
        )

"""Image comparisons that hold on any CPU.

Float results differ in their last bits between machines (BLAS kernels pick other summation orders by CPU
and by the alignment of the weights in memory), and rounding to uint8 turns such a difference into a whole
level wherever a value sits on a rounding boundary. So images from two code paths are compared as the
decoded floats (diffusers' `output_type="np"`: H x W x 3 in [0, 1]) within FLOAT_ATOL, and as 8-bit pixels
within PIXEL_LEVELS levels. Where two runs must agree by construction (the same call twice), the same
tolerances apply: they are far below any change a feature makes (those move pixels by tens of levels).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

FLOAT_ATOL = 1e-4  # max abs difference of decoded float images in [0, 1] (1 level of 8 bits is 3.9e-3)
PIXEL_LEVELS = 1  # max abs difference of 8-bit pixels


def as_array(image) -> np.ndarray:
    return np.asarray(image)


def assert_float_images_close(ours, theirs, atol: float = FLOAT_ATOL) -> None:
    """Decoded float images (lists or arrays of H x W x 3) agree within `atol`, and are not flat fields."""
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.std() > 1e-3, "a flat image: equality would mean nothing"
    diff = np.abs(a - b).max()
    assert diff <= atol, f"decoded images differ by up to {diff:.3g} (tolerance {atol:g})"


def assert_pixels_close(ours, theirs, levels: int = PIXEL_LEVELS) -> None:
    """8-bit images (PIL or arrays) agree within `levels` per channel."""
    a, b = as_array(ours).astype(np.int16), as_array(theirs).astype(np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = int(np.abs(a - b).max())
    assert diff <= levels, f"pixels differ by up to {diff} levels (tolerance {levels})"


def mean_abs_difference(a, b) -> float:
    return float(np.abs(as_array(a).astype(np.float64) - as_array(b).astype(np.float64)).mean())


def gradient(w=40, h=24) -> Image.Image:
    """A test picture with structure in every channel: ramps in red and green, a dot grid in blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, w)[None, :]
    a[..., 1] = np.linspace(0, 255, h)[:, None]
    a[::3, ::5, 2] = 255
    return Image.fromarray(a)

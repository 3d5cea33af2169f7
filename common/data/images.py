"""Any image file → the uint8 ``28×28`` MNIST-like tensor LeNet-5 takes, once per image.

One conversion for every image fedvault reads: a holder's image folder (training data, see
:mod:`common.data.own`), the server's held-out folder and ``fedvault predict``'s inputs, so
a model sees the same geometry at training and at prediction time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from common.logs import one_line

MNIST_SIZE, MNIST_BOX = 28, 20  # MNIST: digit scaled into a 20×20 box centred in 28×28
INK_THRESHOLD = 64  # grey level (after inversion and contrast stretch) that counts as ink


def image_error(path: str | Path, err: Exception) -> str:
    """One line saying why ``path`` could not be used as an image."""
    if isinstance(err, FileNotFoundError):
        return f"{path}: no such file"
    if isinstance(err, IsADirectoryError):
        return f"{path}: is a directory, not an image file"
    return f"{path}: cannot read as an image ({type(err).__name__}: {one_line(err)})"


def load_image(path: str | Path) -> torch.Tensor:
    """Open an image file and make it MNIST-like (:func:`prepare_image`)."""
    with Image.open(path) as img:
        img.load()  # decode now: a truncated/corrupt file fails here, inside the with
        return prepare_image(img)


def prepare_image(img: Image.Image) -> torch.Tensor:
    """Any image → uint8 ``28×28`` tensor that looks like MNIST: white ink on black, the
    digit's bounding box scaled into a 20×20 box centred in the 28×28 frame.

    Steps: apply the EXIF orientation; flatten transparency (ink = the opaque strokes);
    greyscale; invert when the background is light (mean > 127); stretch the contrast to
    0-255; crop to the ink; resize preserving the aspect ratio; pad.
    """
    img = ImageOps.exif_transpose(img)
    gray = _flatten_alpha(img) if _has_alpha(img) else img.convert("L")
    if np.asarray(gray).mean() > 127:  # dark ink on a light background: MNIST is inverted
        gray = ImageOps.invert(gray)
    gray = ImageOps.autocontrast(gray)
    box = gray.point(lambda v: 255 if v >= INK_THRESHOLD else 0).getbbox()
    if box is not None:  # None: blank image, keep the whole frame
        gray = gray.crop(box)
    w, h = gray.size
    scale = MNIST_BOX / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = gray.resize(size, Image.Resampling.LANCZOS)
    frame = Image.new("L", (MNIST_SIZE, MNIST_SIZE), 0)
    frame.paste(gray, ((MNIST_SIZE - size[0]) // 2, (MNIST_SIZE - size[1]) // 2))
    return torch.from_numpy(np.array(frame, dtype=np.uint8))


def _has_alpha(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)


def _flatten_alpha(img: Image.Image) -> Image.Image:
    """Composite onto a background that contrasts with the ink (the opaque pixels)."""
    rgba = img.convert("RGBA")
    alpha = np.asarray(rgba.getchannel("A"), dtype=np.float64)
    if alpha.min() == 255:
        return rgba.convert("L")
    gray = np.asarray(rgba.convert("L"), dtype=np.float64)
    ink = (gray * alpha).sum() / max(alpha.sum(), 1.0)
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if ink < 128 else (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("L")

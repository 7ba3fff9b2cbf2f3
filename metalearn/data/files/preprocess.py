"""One image -> the uint8 array a data set's cache holds: used for the cache and for user images."""

import numpy as np
from PIL import Image, ImageOps


def image_array(image: Image.Image, *, mode: str, invert: bool, size: int) -> np.ndarray:
    """Convert to `mode`, optionally invert (Omniglot: black ink on white -> ink = 255), then
    resize to size x size with LANCZOS, as Prototypical Networks did. (H, W) or (H, W, C) uint8.
    """
    image = image.convert(mode)
    if invert:
        image = ImageOps.invert(image)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image)

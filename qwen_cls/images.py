"""An image as the model sees it: 8-bit RGB, whatever the file's mode. PIL and numpy only, so a serving client
(``scripts/vllm_classify.py``, in vLLM's own environment) converts images exactly as training did."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB the way image libraries' users expect: EXIF orientation applied; 16-bit (and 32-bit integer)
    grey levels scaled by their type's range, 65535 -> 255, not clipped at 255 (which would binarise them);
    float images taken as 0..1; transparency composited on white rather than dropped."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # I;16, I;16B, ... and I: a 16-bit PNG opens as either
        levels = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(levels), 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        im = Image.fromarray(np.clip(np.rint(np.asarray(im) * 255.0), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return im.convert("RGB")

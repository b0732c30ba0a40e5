#!/usr/bin/env python3
"""Decoded pixels of the odd-format test images, as Pillow gives them.

    pip install pillow
    python3 scripts/gen_decode_fixtures.py

Writes tests/fixtures/core/decoded.json: for each image, Pillow's decode after
exif_transpose, turned into RGB as transformers' convert_rgb does (transparency
composited onto white; CMYK and palettes converted), as base64 of the RGB bytes.
"""

import base64
import json
import os

from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "tests", "fixtures", "core", "images")
FILES = ["cmyk.jpg", "palette.png", "alpha.png", "exif6.jpg", "anim.gif"]


def to_rgb(img):
    # transformers.image_transforms.convert_to_rgb
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


out = {}
for f in FILES:
    img = to_rgb(ImageOps.exif_transpose(Image.open(os.path.join(IMAGES, f))))
    out[f] = {"mode_in": Image.open(os.path.join(IMAGES, f)).mode, "width": img.width, "height": img.height,
              "rgb": base64.b64encode(img.tobytes()).decode()}
with open(os.path.join(ROOT, "tests", "fixtures", "core", "decoded.json"), "w") as fh:
    json.dump(out, fh, indent=0)
print({k: v["mode_in"] for k, v in out.items()})

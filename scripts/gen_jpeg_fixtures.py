#!/usr/bin/env python3
"""Fixtures for JPEG decoding, made by Pillow (libjpeg-turbo):

    python3 scripts/gen_jpeg_fixtures.py   # writes tests/fixtures/jpeg/

  kinds/*.jpg       small JPEGs cut from a shared photo, one per kind the decoder
                    must get right: 4:2:0, 4:2:2 and 4:4:4 subsampling, progressive,
                    grayscale, CMYK (Adobe, as Pillow writes it), an odd size, and EXIF
                    orientations 3, 6 and 8
  kinds/*.png       what Pillow decodes each to, as transformers loads images
                    (ImageOps.exif_transpose, then convert("RGB")), lossless
  shared.json       for photos of ../shared/data (Flickr8k dev and full size,
                    COCO-mini, CIFAR-10, the reference JPEG): width, height and the
                    FNV-1a 64 hash of Pillow's RGB bytes, so the test compares every
                    byte without committing the pixels

Needs: pip install pillow
"""
import glob
import json
import os

import PIL
import PIL.features
from PIL import Image, ImageOps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "jpeg")
DATA = os.path.join(ROOT, "..", "shared", "data")


def fnv1a64(b):
    h = 0xCBF29CE484222325
    for x in b:
        h ^= x
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def load(path):
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def kinds():
    d = os.path.join(OUT, "kinds")
    os.makedirs(d, exist_ok=True)
    src = Image.open(os.path.join(DATA, "reference-images/flickr8k-fullres/1000268201_693b08cb0e.jpg"))
    crop = src.convert("RGB").crop((40, 60, 136, 132))  # 96x72
    saves = {
        "s420": dict(quality=90, subsampling=2),
        "s422": dict(quality=90, subsampling=1),
        "s444": dict(quality=90, subsampling=0),
        "progressive": dict(quality=85, progressive=True),
    }
    for name, kw in saves.items():
        crop.save(os.path.join(d, name + ".jpg"), **kw)
    crop.convert("L").save(os.path.join(d, "gray.jpg"), quality=90)
    crop.convert("CMYK").save(os.path.join(d, "cmyk.jpg"), quality=90)
    src.convert("RGB").crop((0, 0, 77, 53)).save(os.path.join(d, "odd_size.jpg"), quality=80)
    for o in (3, 6, 8):
        exif = Image.Exif()
        exif[0x0112] = o
        crop.save(os.path.join(d, f"orientation{o}.jpg"), quality=90, exif=exif)
    for f in sorted(glob.glob(os.path.join(d, "*.jpg"))):
        load(f).save(f[:-4] + ".png")


def shared():
    files = (sorted(glob.glob(os.path.join(DATA, "reference-images/flickr8k-fullres/*.jpg")))
             + [os.path.join(DATA, "flickr8k/images", l.strip()) for l in
                open(os.path.join(DATA, "flickr8k/Flickr_8k.devImages.txt")).readlines()[:24]]
             + sorted(glob.glob(os.path.join(DATA, "coco-mini-train/train2017/*.jpg")))[:12]
             + sorted(glob.glob(os.path.join(DATA, "cifar10/*/0000.jpg")))
             + [os.path.join(DATA, "reference-images/pokemon.jpeg")])
    out = {}
    for f in files:
        im = load(f)
        out[os.path.relpath(f, DATA)] = {"width": im.width, "height": im.height,
                                         "fnv1a64": fnv1a64(im.tobytes())}
    meta = {"pillow": PIL.__version__, "libjpeg_turbo": PIL.features.version("libjpeg_turbo"),
            "photos": out}
    with open(os.path.join(OUT, "shared.json"), "w") as fh:
        json.dump(meta, fh, indent=1)


if __name__ == "__main__":
    kinds()
    shared()

#!/usr/bin/env python3
"""Fixtures for tests/anyres.rs: LLaVA-NeXT's AnyRes preprocessing as transformers does it.

    PYTHONPATH=/tmp/torchpy python3 scripts/gen_anyres_fixtures.py
    # writes tests/fixtures/anyres/tiles.json

LlavaNextImageProcessorPil with llava-hf/llava-v1.6-mistral-7b-hf's settings (336-pixel tiles,
shortest edge 336, CLIP's mean and std, bicubic; image_grid_pinpoints [[336,672],[672,336],
[672,672],[1008,336],[336,1008]]) on held-out full-resolution photos of several aspect ratios: a
lossless PNG (640x480) and the wide diagram (2162x762), and Flickr8k's full-resolution JPEGs
(portrait 375x500, near-square 500x487, wide 500x303). For each: image_sizes, the number of tiles,
and per tile its channel means, mean absolute value and top-left 4x4 corner; and the number of
image tokens LlavaNextProcessor writes for it (patch size 14, one additional token, the `default`
selection), with a second pinpoint list ([[336,336],[336,672],[672,336]]) for the count.
"""
import json
import os

import numpy as np
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REF = os.path.join(os.path.dirname(ROOT), "shared/data/reference-images")
OUT = os.path.join(ROOT, "tests/fixtures/anyres/tiles.json")
PHOTOS = ["coco-000000039769-two-cats.png", "clip-diagram.png",
          "flickr8k-fullres/1000268201_693b08cb0e.jpg",
          "flickr8k-fullres/1019077836_6fc9b15408.jpg",
          "flickr8k-fullres/1020651753_06077ec457.jpg"]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SMALL = [[336, 336], [336, 672], [672, 336]]


def count(pinpoints, h, w):
    """LlavaNextProcessor's image-token count, without a tokenizer."""
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints)
    proc.patch_size, proc.num_additional_image_tokens = 14, 1
    return proc._get_number_of_features(h, w, 336, 336) - 1  # the `default` selection


def main():
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=PINPOINTS)
    cases = []
    for name in PHOTOS:
        img = Image.open(os.path.join(REF, name))
        out = ip(images=img, return_tensors="np")
        px = out["pixel_values"][0]
        h, w = (int(x) for x in out["image_sizes"][0])
        cases.append({
            "photo": name, "image_size": [h, w], "tiles": int(px.shape[0]),
            "means": [[round(float(c), 6) for c in t.mean(axis=(1, 2))] for t in px],
            "abs_means": [round(float(np.abs(t).mean()), 6) for t in px],
            "corners": [np.round(t[:, :4, :4], 5).tolist() for t in px],
            "tokens": count(PINPOINTS, h, w),
            "tokens_small_grid": count(SMALL, h, w),
        })
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    json.dump({"transformers": __import__("transformers").__version__, "pinpoints": PINPOINTS,
               "small_grid": SMALL, "cases": cases}, open(OUT, "w"))
    for c in cases:
        print(c["photo"], c["image_size"], c["tiles"], c["tokens"], c["tokens_small_grid"])


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fixtures for clasp's colour jitter, made with torchvision's own functional ops.

    pip install torch torchvision pillow safetensors
    python3 scripts/gen_augment_fixtures.py   # writes tests/fixtures/train/color_jitter.safetensors

torchvision's ColorJitter on PIL images (the path open_clip's training
transform takes) draws a random order and four factors, then applies
adjust_brightness, adjust_contrast, adjust_saturation and adjust_hue. The
draws come from torch's RNG, which clasp does not reproduce; the ops are
deterministic given the factors, so the fixtures pin each op, and a chain of
all four, on small crops of real photos (and a synthetic image with pure
and grey colours, the edge cases of the HSV round trip).
"""
import os

import numpy as np
import torch
import torchvision.transforms.functional as F
from PIL import Image
from safetensors.torch import save_file

HERE = os.path.dirname(__file__)
OUT = os.path.join(HERE, "..", "tests", "fixtures", "train", "color_jitter.safetensors")
PHOTOS = os.path.join(HERE, "..", "..", "shared", "data", "reference-images")

OPS = {
    "brightness": F.adjust_brightness,
    "contrast": F.adjust_contrast,
    "saturation": F.adjust_saturation,
    "hue": F.adjust_hue,
}
FACTORS = {
    "brightness": [0.6, 1.37],
    "contrast": [0.55, 1.4],
    "saturation": [0.0, 0.7, 1.5],
    "hue": [-0.31, -0.05, 0.12, 0.5],
}


def images():
    out = {}
    for i, name in enumerate(["pokemon.jpeg", "flickr8k-fullres/1000268201_693b08cb0e.jpg"]):
        im = Image.open(os.path.join(PHOTOS, name)).convert("RGB")
        w, h = im.size
        out[f"photo{i}"] = im.crop((w // 3, h // 3, w // 3 + 20, h // 3 + 14))
    # Pure, grey, near-grey and saturated colours.
    rng = np.random.default_rng(0)
    synth = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    synth[0, :8] = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255], [255, 0, 255], [128, 128, 128], [0, 0, 0]]
    synth[1, :4] = [[255, 255, 255], [10, 11, 10], [200, 199, 201], [1, 0, 0]]
    out["synthetic"] = Image.fromarray(synth, "RGB")
    return out


def main():
    tensors = {}
    for iname, im in images().items():
        tensors[f"{iname}/input"] = torch.from_numpy(np.array(im))
        for op, factors in FACTORS.items():
            for k, f in enumerate(factors):
                tensors[f"{iname}/{op}/{k}"] = torch.from_numpy(np.array(OPS[op](im, f)))
                tensors[f"{iname}/{op}/{k}/factor"] = torch.tensor([f], dtype=torch.float64)
        # A chain in a non-default order, as ColorJitter applies them.
        chained = im
        for op, f in [("hue", 0.08), ("saturation", 1.3), ("brightness", 0.8), ("contrast", 1.2)]:
            chained = OPS[op](chained, f)
        tensors[f"{iname}/chain"] = torch.from_numpy(np.array(chained))
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT)
    print(f"wrote {OUT}: {os.path.getsize(OUT)} bytes")


if __name__ == "__main__":
    main()

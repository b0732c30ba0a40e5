#!/usr/bin/env python3
"""Fixtures for running image towers at other resolutions, from transformers:

    python3 scripts/gen_resolution_fixtures.py   # writes tests/fixtures/resolution/

  expected.safetensors  random pixels at sizes other than the trained 32x32
                        (non-square, larger, smaller; shared by the models) and the image features of
                        the committed tiny CLIP, Chinese-CLIP and SigLIP with
                        interpolate_pos_encoding=True
  budget.json           get_image_size_for_max_num_patches (Siglip2ImageProcessor's
                        NaFlex rule) on many image sizes, patch sizes and budgets
Needs: pip install torch transformers safetensors
"""
import json
import os
import random

import torch
from safetensors.torch import save_file
from transformers import ChineseCLIPModel, CLIPModel, SiglipModel
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "resolution")
FIX = os.path.join(ROOT, "tests", "fixtures")
SIZES = [(48, 32), (40, 40), (24, 40), (16, 8)]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(5)
    out = {f"{h}x{w}.pixel_values": torch.randn(2, 3, h, w) for h, w in SIZES}
    for name, cls, d in [("clip", CLIPModel, "core/tiny-clip"), ("cn", ChineseCLIPModel, "core/tiny-chinese-clip"),
                         ("siglip", SiglipModel, "siglip/tiny-siglip")]:
        model = cls.from_pretrained(os.path.join(FIX, d)).eval()
        for h, w in SIZES:
            px = out[f"{h}x{w}.pixel_values"]
            with torch.no_grad():
                f = model.get_image_features(pixel_values=px, interpolate_pos_encoding=True)
            f = getattr(f, "pooler_output", f)
            out[f"{name}.{h}x{w}.image_features"] = f
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, "expected.safetensors"))
    rng = random.Random(9)
    cases = [(rng.randint(1, 4000), rng.randint(1, 4000), rng.choice([8, 14, 16, 32]),
              rng.choice([16, 64, 196, 256, 576, 1024])) for _ in range(300)]
    cases += [(1, 1, 16, 256), (224, 224, 16, 196), (10000, 10, 16, 256), (10, 10000, 14, 256), (333, 500, 32, 49)]
    budget = [[h, w, p, n, *get_image_size_for_max_num_patches(h, w, p, n)] for h, w, p, n in cases]
    json.dump(budget, open(os.path.join(OUT, "budget.json"), "w"))
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"resolution fixtures: {len(out)} tensors, {len(budget)} budget cases, {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fixtures for the AnyRes feature packing (crates/vlm/src/anyres.rs's test): transformers'
`LlavaNextModel.pack_image_features` on random tile features.

    PYTHONPATH=/tmp/torchpy python3 scripts/gen_anyres_pack_fixtures.py
    # writes tests/fixtures/anyres/pack.json

A tower of 336-pixel tiles in 84-pixel patches (4x4 tokens a tile, so the fixture stays small;
the packing's arithmetic is the same at 24x24), 8 channels, llava-v1.6's image_grid_pinpoints;
for each image size, features for the base image and every tile (torch.manual_seed(0)), the
image_newline, and the packed sequence transformers makes of them.
"""
import json
import os
from types import SimpleNamespace

import torch
from transformers.models.llava_next.modeling_llava_next import (LlavaNextModel,
                                                                image_size_to_num_patches)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/anyres/pack.json")
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIZES = [[480, 640], [762, 2162], [500, 375], [487, 500], [303, 500], [336, 336]]


def main():
    torch.manual_seed(0)
    cfg = SimpleNamespace(image_grid_pinpoints=PINPOINTS,
                          vision_config=SimpleNamespace(image_size=336, patch_size=84))
    me = SimpleNamespace(config=cfg)
    newline = torch.randn(8)
    cases = []
    for h, w in SIZES:
        n = image_size_to_num_patches([h, w], PINPOINTS, 336)
        feats = torch.randn(n, 16, 8)
        packed, lens = LlavaNextModel.pack_image_features(me, [feats], torch.tensor([[h, w]]),
                                                          "default", image_newline=newline)
        cases.append({"image_size": [h, w], "tiles": n,
                      "features": [round(float(x), 6) for x in feats.flatten()],
                      "packed": [[round(float(x), 6) for x in row] for row in packed[0]]})
    json.dump({"transformers": __import__("transformers").__version__, "pinpoints": PINPOINTS,
               "newline": [round(float(x), 6) for x in newline], "cases": cases}, open(OUT, "w"))
    for c in cases:
        print(c["image_size"], c["tiles"], len(c["packed"]))


if __name__ == "__main__":
    main()

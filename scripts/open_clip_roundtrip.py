#!/usr/bin/env python3
"""`clasp convert --to hf` of open_clip checkpoints, loaded by transformers:
CLIPModel's image and text embeddings against open_clip's own
(tests/fixtures/open_clip/expected.safetensors, made by open_clip_torch).

    cargo build --release && python3 scripts/open_clip_roundtrip.py

Prints the max-abs difference per checkpoint and exits 1 above 1e-4.
Needs: pip install torch transformers safetensors
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors import safe_open
from transformers import CLIPModel, CLIPTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures", "open_clip")
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target", "release", "clasp"))


def main():
    f = safe_open(os.path.join(FIX, "expected.safetensors"), "pt")
    texts = json.loads(f.metadata()["texts"])[:-1]  # the last has an HTML entity (see the Rust test)
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for name in ["tiny-gelu", "tiny-quickgelu"]:
            out = os.path.join(tmp, name)
            subprocess.run([CLASP, "convert", "--model", os.path.join(FIX, name), "--to", "hf", "--output", out],
                           check=True)
            model = CLIPModel.from_pretrained(out).eval()
            tok = CLIPTokenizerFast.from_pretrained(out)
            enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
            with torch.no_grad():
                img = model.get_image_features(pixel_values=f.get_tensor(f"{name}.pixel_values"))
                txt = model.get_text_features(**enc)
            img = getattr(img, "pooler_output", img)
            txt = getattr(txt, "pooler_output", txt)
            di = (img - f.get_tensor(f"{name}.image_features")).abs().max().item()
            dt = (txt - f.get_tensor(f"{name}.text_features")[: len(texts)]).abs().max().item()
            print(f"{name}: transformers vs open_clip, image {di:.2e}, text {dt:.2e}")
            worst = max(worst, di, dt)
    sys.exit(0 if worst < 1e-4 else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Checks that transformers loads a VQ tokenizer folder clasp trained (`clasp train --task vq`)
and gives clasp's codes and pixels:

    PYTHONPATH=/tmp/torchpy python3 scripts/vq_roundtrip.py RUN/checkpoint IMAGE CODES.jsonl

CODES.jsonl is `clasp tokenize-image -m RUN/checkpoint IMAGE`'s output. Prints the codes'
agreement and the decoded pixels' largest difference from clasp's `detokenize-image` PNG
given as a fourth argument (if any), in levels.
"""
import json
import sys

import numpy as np
import torch
from PIL import Image
from transformers import Emu3VQVAE
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

folder, image, codes_file = sys.argv[1:4]
model, info = Emu3VQVAE.from_pretrained(folder, output_loading_info=True)
missing = [k for k in info["missing_keys"] if not k.endswith("num_batches_tracked")]
assert not missing and not info["unexpected_keys"], info
proc = Emu3ImageProcessor.from_pretrained(folder)
b = proc(Image.open(image), return_tensors="pt")
with torch.no_grad():
    codes = model.encode(b["pixel_values"], b["image_sizes"]).image_tokens[0]
    pixels = model.decode(codes.unsqueeze(0))[0]
theirs = json.loads(open(codes_file).readline())["codes"]
same = (codes == torch.tensor(theirs)).float().mean().item()
print(f"codes: {same:.4f} of positions equal ({tuple(codes.shape)})")
if len(sys.argv) > 4:
    # Emu3ImageProcessor.postprocess's numbers: unnormalise, scale, clip, truncate (CHW).
    png = np.asarray(proc.postprocess([pixels.numpy()], return_tensors="np")["pixel_values"])
    ours = np.asarray(Image.open(sys.argv[4]).convert("RGB")).transpose(2, 0, 1)
    print("decoded pixels: largest difference", int(np.abs(png.astype(int) - ours.astype(int)).max()), "levels")

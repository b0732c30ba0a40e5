#!/usr/bin/env python3
"""A clasp-written checkpoint loads in transformers with the same embeddings.

    python3 scripts/checkpoint_roundtrip.py CLASP_CHECKPOINT_DIR

Loads the directory with CLIPModel / ChineseCLIPModel /
VisionTextDualEncoderModel (LiT runs; from its config's model_type) and strict key checking, embeds the reference photos and a few
captions with transformers, runs `clasp embed` on the same inputs, and
prints the differences. Exits 1 when a key is missing or unexpected, text
embeddings differ by more than 1e-4, or an image cosine is below 0.9999 (the
criteria of scripts/fullsize_parity.py). A LiT checkpoint on a CNN tower
loads too: BatchNorm's num_batches_tracked counters (not weights; clasp does
not save them) may be missing, and with `clasp_text_pooling: "mean"` the text
side is pooled by the mean of transformers' text states (transformers itself
ignores that key and would use BERT's pooler).
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fullsize_parity import processor_from  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["a photo of a cat", "two dogs running on the grass", "一只猫", "a child in a pink dress"]


def main():
    ckpt = sys.argv[1]
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    from transformers import AutoTokenizer, ChineseCLIPModel, CLIPModel, VisionTextDualEncoderModel
    chinese = cfg["model_type"] == "chinese_clip"
    cls = {"chinese_clip": ChineseCLIPModel, "vision-text-dual-encoder": VisionTextDualEncoderModel}.get(
        cfg["model_type"], CLIPModel)
    max_pos = cfg["text_config"].get("max_position_embeddings", 77 if not chinese else 512)
    ctx = min(max_pos, 52) if chinese else min(max_pos, 77)
    model, info = cls.from_pretrained(ckpt, output_loading_info=True)
    # BatchNorm's step counters (a CNN tower's num_batches_tracked) are not
    # weights and clasp does not save them; eval mode never reads them.
    info["missing_keys"] = [k for k in info.get("missing_keys", []) if not k.endswith("num_batches_tracked")]
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        print("loading problems:", bad)
        sys.exit(1)
    model.eval()
    tok = AutoTokenizer.from_pretrained(ckpt)
    proc = processor_from(os.path.join(ckpt, "preprocessor_config.json"))
    ref = os.path.join(ROOT, "..", "shared", "data", "reference-images", "flickr8k-fullres")
    images = [os.path.join(ref, f) for f in sorted(os.listdir(ref))][:4]
    with torch.no_grad():
        px = proc(images=[ImageOps.exif_transpose(Image.open(p)) for p in images], return_tensors="pt")["pixel_values"]
        ie = torch.nn.functional.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1).numpy()
        tk = tok(TEXTS, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
        if cfg.get("clasp_text_pooling") == "mean":
            # clasp's key, which transformers ignores: pool the text tower's
            # states by their mean over the mask, then project.
            h = model.text_model(input_ids=tk["input_ids"], attention_mask=tk["attention_mask"]).last_hidden_state
            m = tk["attention_mask"].unsqueeze(-1).float()
            te = model.text_projection((h * m).sum(1) / m.sum(1))
        else:
            te = model.get_text_features(input_ids=tk["input_ids"], attention_mask=tk["attention_mask"]).pooler_output
        te = torch.nn.functional.normalize(te, dim=-1).numpy()
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "e.npy")
        args = [os.path.join(ROOT, "target", "release", "clasp"), "embed", "-q", "-m", ckpt, "-o", out]
        for p in images:
            args += ["--image", p]
        for t in TEXTS:
            args += ["--text", t]
        subprocess.run(args, check=True)
        ci = np.load(os.path.join(d, "e.image.npy"))
        ct = np.load(os.path.join(d, "e.text.npy"))
    cos = float((ci * ie).sum(-1).min())
    dt = float(np.abs(ct - te).max())
    print(f"transformers loaded {ckpt} with no missing or unexpected keys")
    print(f"text embeddings max-abs difference {dt:.2e}; image cosine min {cos:.7f}")
    sys.exit(0 if dt <= 1e-4 and cos >= 0.9999 else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Full-size parity: random-weight checkpoints built from the real configs in
../shared/assets (clip-vit-base-patch32, chinese-clip-vit-base-patch16) with
save_pretrained, then `clasp embed` against transformers on every reference
photo and 50 captions per language.

    cargo build --release && python3 scripts/fullsize_parity.py [--keep DIR]

Acceptance: texts max-abs <= 1e-4; images cosine >= 0.9999 (from image files).
Not run in CI (it builds ~600 MB of checkpoints); figures go in the notes.
"""
import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers import CLIPConfig, CLIPModel, ChineseCLIPConfig, ChineseCLIPModel, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_core_fixtures import processor_from  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
ASSETS = os.path.join(SHARED, "assets")
CLASP = os.path.join(ROOT, "target", "release", "clasp")


def captions(lang, n):
    if lang == "en":
        lines = open(os.path.join(SHARED, "data/flickr8k/Flickr8k.token.txt"), encoding="utf-8").read().splitlines()
        caps = [l.split("\t", 1)[1] for l in lines]
    else:
        lines = open(os.path.join(SHARED, "data/flickr8k/flickr8kzhc.caption.txt"), encoding="utf-8").read().splitlines()
        caps = [l.split(" ", 1)[1] for l in lines if " " in l]
    return random.Random(7).sample(caps, n)


def images():
    ref = os.path.join(SHARED, "data/reference-images")
    files = [os.path.join(ref, f) for f in sorted(os.listdir(ref)) if os.path.isfile(os.path.join(ref, f))]
    full = os.path.join(ref, "flickr8k-fullres")
    return files + [os.path.join(full, f) for f in sorted(os.listdir(full))]


def build(kind, out):
    src = os.path.join(ASSETS, kind)
    cfg_json = json.load(open(os.path.join(src, "config.json")))
    torch.manual_seed(0)
    if cfg_json["model_type"] == "clip":
        model = CLIPModel(CLIPConfig.from_pretrained(src))
    else:
        model = ChineseCLIPModel(ChineseCLIPConfig.from_pretrained(src))
    model.eval().save_pretrained(out)
    for f in os.listdir(src):
        if f != "config.json":
            shutil.copy(os.path.join(src, f), out)
    return model


def run(kind, lang, ctx, work):
    d = os.path.join(work, kind)
    model = build(kind, d)
    tok = AutoTokenizer.from_pretrained(d)
    proc = processor_from(os.path.join(d, "preprocessor_config.json"))
    texts = captions(lang, 50)
    imgs = images()
    with torch.no_grad():
        enc = tok(texts, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
        t = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        t = getattr(t, "pooler_output", t)
        px = proc(images=[ImageOps.exif_transpose(Image.open(p)) for p in imgs], return_tensors="pt")["pixel_values"]
        i = model.get_image_features(pixel_values=px)
        i = getattr(i, "pooler_output", i)
    t = torch.nn.functional.normalize(t, dim=-1).numpy()
    i = torch.nn.functional.normalize(i, dim=-1).numpy()

    tf = os.path.join(work, f"{kind}.texts.txt")
    open(tf, "w", encoding="utf-8").write("\n".join(texts))
    out = os.path.join(work, f"{kind}.npy")
    args = [CLASP, "embed", "-q", "--model", d, "--texts-from", tf, "--output", out]
    for p in imgs:
        args += ["--image", p]
    subprocess.run(args, check=True)
    ct = np.load(out.replace(".npy", ".text.npy"))
    ci = np.load(out.replace(".npy", ".image.npy"))
    text_maxabs = float(np.abs(ct - t).max())
    cos = (ci * i).sum(-1)
    res = {"model": kind, "texts": len(texts), "images": len(imgs), "text_max_abs": text_maxabs,
           "image_cosine_min": float(cos.min()), "image_cosine_mean": float(cos.mean()),
           "image_max_abs": float(np.abs(ci - i).max())}
    res["pass"] = bool(text_maxabs <= 1e-4 and cos.min() >= 0.9999)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="build the checkpoints here and keep them")
    a = ap.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="clasp-fullsize-")
    os.makedirs(work, exist_ok=True)
    results = [run("clip-vit-base-patch32", "en", 77, work),
               run("chinese-clip-vit-base-patch16", "zh", 52, work)]
    for r in results:
        print(json.dumps(r))
    if not a.keep:
        shutil.rmtree(work)
    sys.exit(0 if all(r["pass"] for r in results) else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Full-size parity: random-weight checkpoints built from the real configs,
then `clasp embed` against their reference on every reference photo and 50
captions per language:
- clip-vit-base-patch32, chinese-clip-vit-base-patch16: the configs in
  ../shared/assets, with transformers (save_pretrained);
- siglip-base-patch16-224, siglip2-base-patch16-naflex: transformers'
  SiglipConfig() and Siglip2Config() defaults, which are those models'
  configs, with the fixtures' SentencePiece and Gemma-format tokenizers (the
  real ones are not on this machine);
- open_clip ViT-B-32: open_clip_torch's own config, saved in open_clip's
  layout (open_clip_config.json + open_clip_model.safetensors), against
  open_clip's encode_image / encode_text and its tokenizer and transform.

    cargo build --release && python3 scripts/fullsize_parity.py [--keep DIR] [--models a,b]

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
    ct, ci = clasp_embed(d, texts, imgs, work, kind)
    return compare(kind, texts, imgs, t, i, ct, ci)


def clasp_embed(d, texts, imgs, work, name):
    tf = os.path.join(work, f"{name}.texts.txt")
    open(tf, "w", encoding="utf-8").write("\n".join(texts))
    out = os.path.join(work, f"{name}.npy")
    args = [CLASP, "embed", "-q", "--model", d, "--texts-from", tf, "--output", out]
    for p in imgs:
        args += ["--image", p]
    subprocess.run(args, check=True)
    return np.load(out.replace(".npy", ".text.npy")), np.load(out.replace(".npy", ".image.npy"))


def compare(name, texts, imgs, t, i, ct, ci):
    t = torch.nn.functional.normalize(t, dim=-1).numpy()
    i = torch.nn.functional.normalize(i, dim=-1).numpy()
    text_maxabs = float(np.abs(ct - t).max())
    cos = (ci * i).sum(-1)
    res = {"model": name, "texts": len(texts), "images": len(imgs), "text_max_abs": text_maxabs,
           "image_cosine_min": float(cos.min()), "image_cosine_mean": float(cos.mean()),
           "image_max_abs": float(np.abs(ci - i).max())}
    res["pass"] = bool(text_maxabs <= 1e-4 and cos.min() >= 0.9999)
    return res


FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def run_siglip(work, v2):
    torch.manual_seed(0)
    name = "siglip2-base-patch16-naflex" if v2 else "siglip-base-patch16-224"
    d = os.path.join(work, name)
    if v2:
        from transformers import Siglip2Config, Siglip2Model
        from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
        tok = AutoTokenizer.from_pretrained(os.path.join(FIXTURES, "siglip", "tiny-siglip2"))
        model = Siglip2Model(Siglip2Config()).eval()
        proc = Siglip2ImageProcessorPil(do_convert_rgb=True)  # composites alpha onto white, as clasp
    else:
        from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
        tok = SiglipTokenizer(vocab_file=os.path.join(FIXTURES, "siglip", "tiny-siglip", "spiece.model"))
        model = SiglipModel(SiglipConfig()).eval()
        proc = SiglipImageProcessorPil(do_convert_rgb=True)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    proc.save_pretrained(d)
    texts = captions("en", 50) + captions("zh", 50)
    imgs = images()
    with torch.no_grad():
        ids = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
        t = model.get_text_features(input_ids=ids)
        enc = proc(images=[ImageOps.exif_transpose(Image.open(p)) for p in imgs], return_tensors="pt")
        if v2:
            i = model.get_image_features(pixel_values=enc["pixel_values"],
                                         pixel_attention_mask=enc["pixel_attention_mask"],
                                         spatial_shapes=enc["spatial_shapes"])
        else:
            i = model.get_image_features(pixel_values=enc["pixel_values"])
    t = getattr(t, "pooler_output", t)
    i = getattr(i, "pooler_output", i)
    ct, ci = clasp_embed(d, texts, imgs, work, name)
    return compare(name, texts, imgs, t, i, ct, ci)


def on_white(im):
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "P") and (im.mode != "P" or "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im


def run_open_clip(work, arch="ViT-B-32"):
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    d = os.path.join(work, f"open_clip-{arch}")
    os.makedirs(d, exist_ok=True)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(d, "open_clip_model.safetensors"))
    pp = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
          "interpolation": "bicubic", "resize_mode": "shortest"}
    json.dump({"model_cfg": open_clip.get_model_config(arch), "preprocess_cfg": pp},
              open(os.path.join(d, "open_clip_config.json"), "w"), indent=2)
    for f in ["vocab.json", "merges.txt"]:  # the real CLIP BPE, as open_clip's bundled one
        shutil.copy(os.path.join(ASSETS, "clip-vit-base-patch32", f), d)
    tok = open_clip.get_tokenizer(arch)
    texts = captions("en", 50)
    imgs = images()
    with torch.no_grad():
        t = model.encode_text(tok(texts))
        # open_clip drops alpha where clasp (and transformers) composite onto
        # white, a documented difference: composite first so the models are
        # what is compared.
        i = model.encode_image(torch.stack([preprocess(on_white(Image.open(p))) for p in imgs]))
    ct, ci = clasp_embed(d, texts, imgs, work, f"open_clip-{arch}")
    return compare(f"open_clip {arch}", texts, imgs, t, i, ct, ci)


ALL = ["clip", "chinese-clip", "siglip", "siglip2", "open_clip"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="build the checkpoints here and keep them")
    ap.add_argument("--models", default=",".join(ALL), help="a comma list of " + ", ".join(ALL))
    a = ap.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="clasp-fullsize-")
    os.makedirs(work, exist_ok=True)
    runs = {
        "clip": lambda: run("clip-vit-base-patch32", "en", 77, work),
        "chinese-clip": lambda: run("chinese-clip-vit-base-patch16", "zh", 52, work),
        "siglip": lambda: run_siglip(work, False),
        "siglip2": lambda: run_siglip(work, True),
        "open_clip": lambda: run_open_clip(work),
    }
    results = []
    for m in a.models.split(","):
        r = runs[m]()
        print(json.dumps(r), flush=True)
        results.append(r)
    if not a.keep:
        shutil.rmtree(work)
    sys.exit(0 if all(r["pass"] for r in results) else 1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Fixtures for open_clip's own checkpoint layout, made by open_clip_torch:

    python3 scripts/gen_open_clip_fixtures.py   # writes tests/fixtures/open_clip/

  tiny-gelu/        open_clip_config.json ({"model_cfg", "preprocess_cfg"}) and
                    open_clip_model.safetensors: a random-init open_clip CLIP
                    (ViT image tower, exact GELU), with the tiny CLIP BPE
                    vocabulary of tests/fixtures/core/tiny-clip as vocab.json +
                    merges.txt (as open_clip repositories on the Hub carry them)
  tiny-quickgelu/   the same layout with QuickGELU (the "-quickgelu" models)
                    and a pickled state dict, open_clip_pytorch_model.bin
  expected.safetensors  token ids from open_clip's tokenizer (SimpleTokenizer
                    over the same merges, zero padding), pixels through
                    open_clip's own eval transform, and encode_image /
                    encode_text outputs
  tiny-epoch/       tiny-gelu's weights as open_clip's training loop saves
                    them: epoch_3.pt, torch.save of {"epoch", "name",
                    "state_dict" (keys prefixed "module.", as DDP has them),
                    "optimizer"}, beside tiny-gelu's open_clip_config.json and
                    vocabulary (`python3 scripts/gen_open_clip_fixtures.py
                    extras` writes this and the next without touching the rest)
  tiny_jit.pt       tiny-quickgelu's model as OpenAI published CLIP: a
                    TorchScript archive (torch.jit.trace, torch.jit.save)
  vit_b_32_shapes.json  the state-dict shapes of ViT-B-32 (OpenAI's names)
  bundled_tokens.json   open_clip's default tokenizer (the BPE vocabulary its
                    package ships, context 77) on a few texts
  rn50/             OpenAI's RN50 CLIP at its real config (open_clip's
                    RN50.json) with weights from a formula both sides compute
                    (scripts/formula.py; tests/common restates it), since
                    random RN50 weights are 400 MB: manifest.json (every
                    state-dict key and shape), open_clip_config.json, and
                    expected.safetensors (encode_image of two held-out photos
                    through open_clip's own RN50 transform, encode_text of
                    three captions, and the token ids); written by
                    `python3 scripts/gen_open_clip_fixtures.py rn50`
  tiny-rn/          a narrow ModifiedResNet CLIP (layers [1, 1, 1, 1], width
                    8, 64 pixels) under tiny-gelu's text tower and vocabulary,
                    as manifest.json and open_clip_config.json: the tests
                    write its weights by the same formula (every verb runs on
                    it; RN50 holds the parity)
  convnext_base/    LAION's ConvNeXt-B CLIP at open_clip's real config
                    (convnext_base.json: timm's convnext_base trunk, average
                    pool, LayerNorm, linear projection), the same way as rn50/
  tiny-convnext/    convnext_atto at 64 pixels under tiny-gelu's text tower,
                    as tiny-rn/ (`python3 scripts/gen_open_clip_fixtures.py
                    convnext` writes these two)
  configs/          open_clip's bundled model configs of ViT-B-32, B-16, L-14,
                    H-14 and their -quickgelu variants (for the translation test)
Needs: pip install open_clip_torch torch safetensors pillow
"""
import gzip
import json
import os
import shutil

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer

from formula import formula
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "open_clip")
TINY = os.path.join(ROOT, "tests", "fixtures", "core", "tiny-clip")
SHARED = os.path.join(ROOT, "..", "shared")
REAL = ["ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14"]


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(os.path.join(OUT, "configs"))
    cfgdir = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    for name in REAL:
        for suffix in ["", "-quickgelu"]:
            shutil.copy(os.path.join(cfgdir, f"{name}{suffix}.json"), os.path.join(OUT, "configs"))
    # open_clip's tokenizer over tiny-clip's merges: the same vocabulary order
    # (bytes, bytes</w>, merges, the two special tokens).
    merges = open(os.path.join(TINY, "merges.txt")).read().splitlines()
    bpe = os.path.join(OUT, "_bpe.txt.gz")
    with gzip.open(bpe, "wt") as f:
        f.write("\n".join(merges))  # no trailing newline: open_clip would read an empty merge
    vocab_n = len(json.load(open(os.path.join(TINY, "vocab.json"))))
    tok = SimpleTokenizer(bpe_path=bpe, context_length=16)
    os.remove(bpe)
    assert len(tok.encoder) == vocab_n, (len(tok.encoder), vocab_n)
    texts = ["a photo of a cat", "the dog", "an ant on the cat!", "x", "the cat the dog " * 6,
             "Hello,   WORLD  &amp; friends"]
    ids = tok(texts)
    exp = {"input_ids": ids.int()}
    photos = [os.path.join(SHARED, "data/reference-images/flickr8k-fullres", f)
              for f in sorted(os.listdir(os.path.join(SHARED, "data/reference-images/flickr8k-fullres")))][:2]
    # 500x334: resized to 47x32, an odd margin of 15 that torchvision's
    # CenterCrop rounds to 8 (half to even) where transformers floors to 7.
    photos.append(os.path.join(SHARED, "data/reference-images/flickr8k-fullres/1012212859_01547e3f17.jpg"))
    photos.append(os.path.join(SHARED, "data/reference-images/clip-diagram.png"))
    for name, quick, fmt in [("tiny-gelu", False, "safetensors"), ("tiny-quickgelu", True, "bin")]:
        torch.manual_seed(3 if quick else 2)
        model_cfg = {"embed_dim": 16, "quick_gelu": quick,
                     "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 8},
                     "text_cfg": {"context_length": 16, "vocab_size": vocab_n, "width": 24, "heads": 4, "layers": 2}}
        model = CLIP(**model_cfg).eval()
        with torch.no_grad():
            model.logit_scale.fill_(2.3)
            for n, p in model.named_parameters():  # LayerNorms away from identity
                if ".ln_" in n or n.startswith("ln_"):
                    p.add_(0.1 * torch.randn_like(p))
        d = os.path.join(OUT, name)
        os.makedirs(d)
        sd = {k: v.contiguous() for k, v in model.state_dict().items()}
        if fmt == "safetensors":
            save_file(sd, os.path.join(d, "open_clip_model.safetensors"))
        else:
            torch.save(sd, os.path.join(d, "open_clip_pytorch_model.bin"))
        preprocess_cfg = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
                          "interpolation": "bicubic", "resize_mode": "shortest"}
        json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg},
                  open(os.path.join(d, "open_clip_config.json"), "w"), indent=2)
        for f in ["vocab.json", "merges.txt"]:
            shutil.copy(os.path.join(TINY, f), d)
        _, _, preprocess = open_clip.create_model_and_transforms(
            "ViT-B-32", pretrained=None, image_mean=preprocess_cfg["mean"], image_std=preprocess_cfg["std"],
            force_image_size=32)
        px = torch.stack([preprocess(Image.open(p)) for p in photos])
        with torch.no_grad():
            exp[f"{name}.pixel_values"] = px
            exp[f"{name}.image_features"] = model.encode_image(px)
            exp[f"{name}.text_features"] = model.encode_text(ids)
    meta = {"texts": json.dumps(texts), "photos": json.dumps([os.path.relpath(p, ROOT) for p in photos])}
    save_file({k: v.contiguous() for k, v in exp.items()}, os.path.join(OUT, "expected.safetensors"), metadata=meta)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"open_clip fixtures: {total / 1024:.0f} KiB")


def extras():
    from safetensors.torch import load_file
    d = os.path.join(OUT, "tiny-epoch")
    os.makedirs(d, exist_ok=True)
    sd = load_file(os.path.join(OUT, "tiny-gelu", "open_clip_model.safetensors"))
    ckpt = {"epoch": 3, "name": "tiny-gelu",
            "state_dict": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}
    torch.save(ckpt, os.path.join(d, "epoch_3.pt"))
    for f in ["open_clip_config.json", "vocab.json", "merges.txt"]:
        shutil.copy(os.path.join(OUT, "tiny-gelu", f), d)
    # tiny-quickgelu as a TorchScript archive, the format of OpenAI's .pt files.
    qcfg = json.load(open(os.path.join(OUT, "tiny-quickgelu", "open_clip_config.json")))["model_cfg"]
    m = CLIP(**qcfg).eval()
    m.load_state_dict(torch.load(os.path.join(OUT, "tiny-quickgelu", "open_clip_pytorch_model.bin")))
    px = torch.zeros(1, 3, qcfg["vision_cfg"]["image_size"], qcfg["vision_cfg"]["image_size"])
    txt = torch.zeros(1, qcfg["text_cfg"]["context_length"], dtype=torch.long)
    with torch.no_grad():
        traced = torch.jit.trace(m, (px, txt))
    torch.jit.save(traced, os.path.join(OUT, "tiny_jit.pt"))
    vit = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    json.dump({k: list(v.shape) for k, v in vit.state_dict().items()},
              open(os.path.join(OUT, "vit_b_32_shapes.json"), "w"))
    texts = ["a photo of a cat", "Two dogs play in the snow.", "un café à Paris, s'il vous plaît",
             "Hello,   WORLD  &amp; friends", "一只猫", "x" * 300]
    tok = open_clip.get_tokenizer("ViT-B-32")
    ids = tok(texts)
    json.dump({"texts": texts, "input_ids": ids.tolist()},
              open(os.path.join(OUT, "bundled_tokens.json"), "w"))
    print("wrote tiny-epoch/ and bundled_tokens.json")


def tiny_rn(name="tiny-rn", vision_cfg=None):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    gelu = json.load(open(os.path.join(OUT, "tiny-gelu", "open_clip_config.json")))
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": vision_cfg or {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                 "text_cfg": gelu["model_cfg"]["text_cfg"]}
    model = CLIP(**model_cfg)
    manifest = {k: list(v.shape) for k, v in model.state_dict().items() if v.is_floating_point()}
    json.dump({"formula": "scripts/formula.py", "shapes": manifest},
              open(os.path.join(d, "manifest.json"), "w"))
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": gelu["preprocess_cfg"]},
              open(os.path.join(d, "open_clip_config.json"), "w"), indent=2)
    for f in ["vocab.json", "merges.txt"]:
        shutil.copy(os.path.join(OUT, "tiny-gelu", f), d)
    # The image side against open_clip (the text tower is tiny-gelu's).
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.copy_(formula(k, list(v.shape)))
    model.eval()
    _, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, force_image_size=model_cfg["vision_cfg"]["image_size"])
    photos = ["data/reference-images/coco-000000039769-two-cats.png",
              "data/flickr8k/images/2090545563_a4e66ec76b.jpg"]
    px = torch.stack([preprocess(Image.open(os.path.join(SHARED, p))) for p in photos])
    with torch.no_grad():
        img = model.encode_image(px)
    save_file({"image_features": img.contiguous()}, os.path.join(d, "expected.safetensors"),
              metadata={"photos": json.dumps(photos)})


def rn50(arch="RN50", out="rn50"):
    if arch == "RN50":
        tiny_rn()
    d = os.path.join(OUT, out)
    os.makedirs(d, exist_ok=True)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    model.eval()
    sd = model.state_dict()
    manifest = {}
    with torch.no_grad():
        for k, v in sd.items():
            if not v.is_floating_point():
                continue
            manifest[k] = list(v.shape)
            v.copy_(formula(k, list(v.shape)))
    json.dump({"formula": "scripts/formula.py", "shapes": manifest},
              open(os.path.join(d, "manifest.json"), "w"))
    cfgdir = os.path.join(os.path.dirname(open_clip.__file__), "model_configs")
    model_cfg = json.load(open(os.path.join(cfgdir, f"{arch}.json")))
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {
        "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
        "interpolation": "bicubic", "resize_mode": "shortest"}},
        open(os.path.join(d, "open_clip_config.json"), "w"), indent=2)
    photos = ["data/reference-images/coco-000000039769-two-cats.png",
              "data/flickr8k/images/2090545563_a4e66ec76b.jpg"]
    texts = ["two cats sleeping on a pink blanket", "a child rides a tricycle",
             "A dog runs through the snow ."]
    px = torch.stack([preprocess(Image.open(os.path.join(SHARED, p))) for p in photos])
    ids = open_clip.get_tokenizer(arch)(texts)
    with torch.no_grad():
        img = model.encode_image(px)
        txt = model.encode_text(ids)
    print(arch, "image features", img.abs().max().item(), "text", txt.abs().max().item())
    save_file({"image_features": img.contiguous(), "text_features": txt.contiguous(),
               "input_ids": ids.int().contiguous()}, os.path.join(d, "expected.safetensors"),
              metadata={"photos": json.dumps(photos), "texts": json.dumps(texts)})


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["extras"]:
        extras()
    elif sys.argv[1:] == ["rn50"]:
        rn50()
    elif sys.argv[1:] == ["convnext"]:
        tiny_rn("tiny-convnext", {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                  "timm_pool": "", "timm_proj": "linear", "image_size": 64})
        rn50("convnext_base", "convnext_base")
    else:
        main()
        extras()

#!/usr/bin/env python3
"""Generates the committed fixtures for clasp's core parity tests with the
reference implementation (transformers, PIL backend).

    python3 scripts/gen_core_fixtures.py        # writes tests/fixtures/core/

Outputs (all small):
  tiny-clip/, tiny-chinese-clip/   random-init checkpoints via save_pretrained,
                                   with small real-format tokenizers
  models_expected.safetensors      inputs and CLIPModel / ChineseCLIPModel outputs
  tokens.json                      token ids from the real tokenizers in
                                   ../shared/assets for >= 200 EN and ZH strings
  images/                          small test images in every supported format
  pixels.safetensors               reference pixel tensors (uint8 form, see below)
Needs: pip install torch transformers pillow safetensors numpy (no torchvision
needed; the PIL backend is used explicitly).
"""
import io
import json
import os
import random
import shutil
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file
from transformers import (CLIPConfig, CLIPModel, ChineseCLIPConfig, ChineseCLIPModel,
                          CLIPTokenizer, BertTokenizer, AutoTokenizer)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
OUT = os.path.join(ROOT, "tests", "fixtures", "core")
ASSETS = os.path.join(SHARED, "assets")
MEAN = [0.48145466, 0.4578275, 0.40821073]
STD = [0.26862954, 0.26130258, 0.27577711]

torch.manual_seed(0)
random.seed(0)
np.random.seed(0)


def english_captions(n):
    lines = open(os.path.join(SHARED, "data/flickr8k/Flickr8k.token.txt"), encoding="utf-8").read().splitlines()
    rng = random.Random(1)
    return [l.split("\t", 1)[1] for l in rng.sample(lines, n)]


def chinese_captions(n):
    lines = open(os.path.join(SHARED, "data/flickr8k/flickr8kzhc.caption.txt"), encoding="utf-8").read().splitlines()
    rng = random.Random(2)
    return [l.split(" ", 1)[1] for l in rng.sample(lines, n) if " " in l]


EDGE_CASES = [
    "", " ", "a", "A PHOTO OF A CAT.", "a photo of a cat", "  leading and   inner   spaces  ",
    "tabs\tand\nnewlines\r\n", "don't won't it's we're they've I'm you'll he'd",
    "Hello, world! How's it going?!?", "...", "!!!???", "(parentheses) [brackets] {braces}",
    "email@example.com http://example.com/path?q=1&x=2", "#hashtag @mention $100 50% 3.14159",
    "1234567890", "1st 2nd 3rd 4th", "café naïve résumé façade", "Ünïcödé àccénts ÀÉÎÕÜ",
    "emoji 😀🐶🍕🚀", "👨‍👩‍👧‍👦 family", "🇺🇸🇨🇳 flags", "mixed 中文 and English 混合",
    "日本語のテキスト", "한국어 텍스트", "Русский текст", "العربية", "עברית", "ελληνικά",
    "full-width ＡＢＣ１２３", "ｈａｌｆ", "ligature ﬁ ﬂ", "zero\u200bwidth", "soft\u00adhyphen",
    "<|startoftext|> inside", "<|endoftext|> inside", "[CLS] [SEP] [PAD] [MASK] [UNK]",
    "a " * 100, "supercalifragilisticexpialidocious " * 10,
    "一只猫坐在垫子上。" * 10, "一只狗在草地上奔跑", "红色苹果", "红苹果", "两个男孩在踢足球！",
    "她说：“你好，世界。”", "（括号）【书名号】《书》", "１２３ 全角数字", "Ｈｅｌｌｏ　全角空格",
    "中英mixed混合text文本", "emoji表情😀在中文里", "繁體中文測試", "a red apple", "a red-colored apple",
    "The quick brown fox jumps over the lazy dog. " * 8,
]


def tokens_fixture():
    en = english_captions(110)
    zh = chinese_captions(70)
    strings = EDGE_CASES + en + zh
    clip = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "clip-vit-base-patch32"))
    cn = AutoTokenizer.from_pretrained(os.path.join(ASSETS, "chinese-clip-vit-base-patch16"))
    out = {"transformers": __import__("transformers").__version__, "strings": strings}
    for name, tok, ctx in [("clip", clip, 77), ("chinese_clip", cn, 52)]:
        enc = tok(strings, padding="max_length", max_length=ctx, truncation=True)
        out[name] = {"context": ctx, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                     "class": type(tok).__name__}
    json.dump(out, open(os.path.join(OUT, "tokens.json"), "w"), ensure_ascii=False)
    print("tokens:", len(strings), "strings")


def bytes_to_unicode():
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def tiny_clip_tokenizer(dirname):
    """A real-format CLIP BPE vocabulary, small: the 256 byte symbols, each with
    and without </w>, a few dozen merges, and the two special tokens."""
    syms = list(bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms]
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("o", "n"), ("i", "n"), ("e", "r"),
              ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    for a, b in merges:
        vocab.append(a + b)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(dirname, exist_ok=True)
    json.dump({t: i for i, t in enumerate(vocab)}, open(os.path.join(dirname, "vocab.json"), "w"))
    with open(os.path.join(dirname, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(dirname)
    return tok, len(vocab)


def tiny_bert_vocab(dirname):
    chars = {}
    for c in "".join(chinese_captions(400)):
        chars[c] = chars.get(c, 0) + 1
    common = [c for c, _ in sorted(chars.items(), key=lambda kv: -kv[1]) if c.strip()][:300]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?")
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"] + ["the", "cat", "dog", "##s"]
    vocab += [c for c in common if c not in vocab]
    os.makedirs(dirname, exist_ok=True)
    open(os.path.join(dirname, "vocab.txt"), "w").write("\n".join(vocab) + "\n")
    return BertTokenizer.from_pretrained(dirname), len(vocab)


def write_processor(dirname, kind, size):
    if kind == "clip":
        cfg = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": size},
               "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size}}
    else:  # the old name that published Chinese-CLIP configs carry
        cfg = {"image_processor_type": "ChineseCLIPFeatureExtractor",
               "feature_extractor_type": "ChineseCLIPFeatureExtractor", "do_resize": True,
               "size": {"height": size, "width": size}, "resample": 3, "do_center_crop": False,
               "crop_size": {"height": size, "width": size}}
    cfg.update({"do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
                "image_std": STD, "do_convert_rgb": True})
    json.dump(cfg, open(os.path.join(dirname, "preprocessor_config.json"), "w"), indent=1)


def processor_from(cfg_path):
    """transformers 5 no longer resolves *FeatureExtractor names; build the PIL
    processor from the file's parameters (the same arithmetic either way)."""
    c = json.load(open(cfg_path))
    size = c["size"] if isinstance(c["size"], dict) else {"shortest_edge": c["size"]}
    return CLIPImageProcessorPil(do_resize=c["do_resize"], size=size, resample=c["resample"],
                                 do_center_crop=c["do_center_crop"], crop_size=c["crop_size"],
                                 do_rescale=c["do_rescale"], rescale_factor=c["rescale_factor"],
                                 do_normalize=c["do_normalize"], image_mean=c["image_mean"],
                                 image_std=c["image_std"], do_convert_rgb=c["do_convert_rgb"])


def tiny_models():
    tensors = {}
    texts_en = ["a photo of a cat", "the dog", "an ant on the cat", "x", "the cat the dog " * 6]
    texts_zh = ["一只猫", "两只狗在草地上跑", "the cat", "红色的苹果和一个男人" * 8]

    d = os.path.join(OUT, "tiny-clip")
    tok, vocab_n = tiny_clip_tokenizer(d)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab_n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, hidden_act="quick_gelu",
                         bos_token_id=vocab_n - 2, eos_token_id=vocab_n - 1, pad_token_id=vocab_n - 1),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, hidden_act="quick_gelu"),
        projection_dim=20)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial logit scale so logits test exp()
        model.logit_scale.fill_(2.0)
    model.save_pretrained(d)
    tok.save_pretrained(d)  # writes tokenizer.json too
    write_processor(d, "clip", 32)
    enc = tok(texts_en, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    px = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    tensors.update({"clip.pixel_values": px, "clip.input_ids": enc["input_ids"].int(),
                    "clip.attention_mask": enc["attention_mask"].int(), "clip.image_features": img,
                    "clip.text_features": txt, "clip.logits_per_image": out.logits_per_image})
    json.dump(texts_en, open(os.path.join(OUT, "tiny-clip.texts.json"), "w"))

    d = os.path.join(OUT, "tiny-chinese-clip")
    tok, vocab_n = tiny_bert_vocab(d)
    cfg = ChineseCLIPConfig(
        text_config=dict(vocab_size=vocab_n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, type_vocab_size=2),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=20)
    model = ChineseCLIPModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    write_processor(d, "chinese_clip", 32)
    enc = tok(texts_zh, padding="max_length", max_length=52, truncation=True, return_tensors="pt")
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    tensors.update({"cn.pixel_values": px, "cn.input_ids": enc["input_ids"].int(),
                    "cn.attention_mask": enc["attention_mask"].int(), "cn.image_features": img,
                    "cn.text_features": txt, "cn.logits_per_image": out.logits_per_image})
    json.dump(texts_zh, open(os.path.join(OUT, "tiny-chinese-clip.texts.json"), "w"), ensure_ascii=False)
    save_file({k: v.contiguous().numpy() for k, v in tensors.items()},
              os.path.join(OUT, "models_expected.safetensors"))
    print("models: ok")


def tiny_dual_encoder():
    """A VisionTextDualEncoderModel (CLIP vision + BERT text, LiT's layout):
    its own expected file, so it can be made without remaking the rest."""
    from transformers import BertConfig, CLIPVisionConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel
    torch.manual_seed(7)
    texts = ["a photo of a cat", "the dog", "一只猫在草地上", "the cat the dog " * 20]
    d = os.path.join(OUT, "tiny-dual-encoder")
    tok, vocab_n = tiny_bert_vocab(d)
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(
        CLIPVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                         image_size=32, patch_size=8),
        BertConfig(vocab_size=vocab_n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64),
        projection_dim=20)
    model = VisionTextDualEncoderModel(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.8)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    write_processor(d, "clip", 32)
    enc = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px)
        img = model.get_image_features(pixel_values=px).pooler_output
        txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
    tensors = {"dual.pixel_values": px, "dual.input_ids": enc["input_ids"].int(),
               "dual.attention_mask": enc["attention_mask"].int(), "dual.image_features": img,
               "dual.text_features": txt, "dual.logits_per_image": out.logits_per_image}
    json.dump(texts, open(os.path.join(OUT, "tiny-dual-encoder.texts.json"), "w"), ensure_ascii=False)
    save_file({k: v.contiguous().numpy() for k, v in tensors.items()},
              os.path.join(OUT, "dual_expected.safetensors"))
    print("dual encoder: ok")


def test_images():
    """Small images in every format and colour mode clasp must read."""
    d = os.path.join(OUT, "images")
    os.makedirs(d, exist_ok=True)
    base = Image.open(os.path.join(SHARED, "data/reference-images/flickr8k-fullres/1000268201_693b08cb0e.jpg"))
    base = base.convert("RGB").resize((60, 45), Image.BICUBIC)
    base.save(os.path.join(d, "rgb.jpg"), quality=90)
    base.save(os.path.join(d, "rgb.png"))
    base.save(os.path.join(d, "rgb.webp"), lossless=True)
    base.save(os.path.join(d, "rgb.bmp"))
    base.save(os.path.join(d, "rgb.tiff"))
    base.convert("L").save(os.path.join(d, "gray.png"))
    base.convert("P", palette=Image.ADAPTIVE, colors=32).save(os.path.join(d, "palette.png"))
    frames = [base.convert("P", palette=Image.ADAPTIVE), base.rotate(90, expand=False).convert("P")]
    frames[0].save(os.path.join(d, "anim.gif"), save_all=True, append_images=frames[1:])
    rgba = base.convert("RGBA")
    a = np.array(rgba)
    a[..., 3] = np.tile(np.linspace(0, 255, 60).astype(np.uint8), (45, 1))
    Image.fromarray(a, "RGBA").save(os.path.join(d, "alpha.png"))
    # 16-bit grayscale PNG
    g16 = (np.array(base.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(g16).save(os.path.join(d, "gray16.png"))
    base.convert("CMYK").save(os.path.join(d, "cmyk.jpg"), quality=95)
    # EXIF orientation 6 (rotate 90 CW to display): store the pixels rotated the other way
    ex = Image.Exif()
    ex[274] = 6
    base.transpose(Image.ROTATE_90).save(os.path.join(d, "exif6.jpg"), exif=ex.tobytes(), quality=90)
    # invalid inputs
    open(os.path.join(d, "zero.jpg"), "wb").close()
    raw = open(os.path.join(d, "rgb.jpg"), "rb").read()
    open(os.path.join(d, "truncated.jpg"), "wb").write(raw[: len(raw) // 3])
    open(os.path.join(d, "not-an-image.png"), "wb").write(b"this is text, not a PNG\n" * 4)


def pixels():
    """Reference pixel tensors. Each processed tensor equals
    (u8 / 255 - mean) / std for a u8 HWC image, so the u8 form is stored (checked
    below to reproduce the float tensor to 1e-6): compact and lossless."""
    out = {}
    ref = os.path.join(SHARED, "data/reference-images")
    small = sorted(os.path.join(OUT, "images", f) for f in os.listdir(os.path.join(OUT, "images"))
                   if not f.startswith(("zero", "truncated", "not-")))
    refs = [os.path.join(ref, f) for f in sorted(os.listdir(ref)) if os.path.isfile(os.path.join(ref, f))]
    full = [os.path.join(ref, "flickr8k-fullres", f) for f in sorted(os.listdir(os.path.join(ref, "flickr8k-fullres")))]
    procs = {"clip224": os.path.join(ASSETS, "clip-vit-base-patch32/preprocessor_config.json"),
             "cn224": os.path.join(ASSETS, "chinese-clip-vit-base-patch16/preprocessor_config.json"),
             "clip32": os.path.join(OUT, "tiny-clip/preprocessor_config.json"),
             "cn32": os.path.join(OUT, "tiny-chinese-clip/preprocessor_config.json")}
    # every image at 32 px with both processors; at 224 three representative cases
    # (a 224 px tensor is 150 KB, so not all)
    jobs = [(p, k) for p in small + refs + full for k in ("clip32", "cn32")]
    jobs += [(os.path.join(ref, "coco-000000039769-two-cats.png"), "clip224"),
             (os.path.join(ref, "clip-diagram.png"), "clip224"),  # RGBA, very wide
             (full[0], "cn224")]  # portrait full-resolution photo, straight resize
    names = []
    mean = np.array(MEAN, dtype=np.float64)[:, None, None]
    std = np.array(STD, dtype=np.float64)[:, None, None]
    for path, k in jobs:
        proc = processor_from(procs[k])
        # Image.open + exif_transpose, as load_image does, but without its
        # convert("RGB"): that would drop alpha, while the processor's own
        # convert_to_rgb composites transparency onto white.
        img = ImageOps.exif_transpose(Image.open(path))
        pv = proc(images=img, return_tensors="np")["pixel_values"][0]  # CHW f32
        u8 = np.rint((pv.astype(np.float64) * std + mean) * 255).astype(np.int64)
        assert u8.min() >= 0 and u8.max() <= 255
        back = ((u8 / 255.0 - mean) / std).astype(np.float32)
        assert np.abs(back - pv).max() < 1e-5, (path, np.abs(back - pv).max())
        rel = os.path.relpath(path, ROOT)
        key = f"{k}:{rel}"
        out[key] = u8.astype(np.uint8).transpose(1, 2, 0).copy()
        names.append(key)
    save_file(out, os.path.join(OUT, "pixels.safetensors"), metadata={"keys": json.dumps(names)})
    print("pixels:", len(names), "tensors")


def file_features():
    """Features of image files through the processor, for the CLI tests."""
    files = ["images/rgb.png", "images/alpha.png", "images/palette.png"]
    exp = dict(__import__("safetensors.numpy", fromlist=["load_file"]).load_file(
        os.path.join(OUT, "models_expected.safetensors")))
    for prefix, d, texts, cls in [("clip", "tiny-clip", "tiny-clip.texts.json", CLIPModel),
                                  ("cn", "tiny-chinese-clip", "tiny-chinese-clip.texts.json", ChineseCLIPModel)]:
        model = cls.from_pretrained(os.path.join(OUT, d)).eval()
        proc = processor_from(os.path.join(OUT, d, "preprocessor_config.json"))
        imgs = [ImageOps.exif_transpose(Image.open(os.path.join(OUT, f))) for f in files]
        px = torch.from_numpy(proc(images=imgs, return_tensors="np")["pixel_values"])
        with torch.no_grad():
            f = model.get_image_features(pixel_values=px)
        f = getattr(f, "pooler_output", f)
        exp[f"{prefix}.file_image_features"] = f.numpy()
        img = f / f.norm(dim=-1, keepdim=True)
        t = torch.from_numpy(exp[f"{prefix}.text_features"])
        t = t / t.norm(dim=-1, keepdim=True)
        exp[f"{prefix}.file_logits_per_image"] = (model.logit_scale.exp() * img @ t.T).detach().numpy()
    save_file(exp, os.path.join(OUT, "models_expected.safetensors"), metadata={"files": json.dumps(files)})


if __name__ == "__main__":
    if sys.argv[1:] == ["dual"]:
        tiny_dual_encoder()
        sys.exit(0)
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    tokens_fixture()
    tiny_models()
    test_images()
    file_features()
    pixels()
    tiny_dual_encoder()
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"total fixture size: {total / 1024:.0f} KiB")

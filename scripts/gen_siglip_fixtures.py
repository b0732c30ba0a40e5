#!/usr/bin/env python3
"""Generates the committed SigLIP fixtures with the reference implementations:
transformers' SiglipModel and SiglipTokenizer (the slow, sentencepiece one:
SigLIP has no fast tokenizer) and sentencepiece itself.

    python3 scripts/gen_siglip_fixtures.py      # writes tests/fixtures/siglip/

    python3 scripts/gen_siglip_fixtures.py siglip2   # only tiny-siglip2/

Outputs (small):
  tiny-siglip/              a random-init SiglipModel (save_pretrained) with a
                            SentencePiece unigram model that sentencepiece trains
                            here on Flickr8k's English and Chinese captions
                            (no SigLIP vocabulary can be fetched here; the file
                            format and the algorithm are what is tested)
  expected.safetensors      pixel values of real photos through
                            SiglipImageProcessor (PIL), token ids, and the
                            model's image and text embeddings and logits
  tokens.json               SiglipTokenizer ids (padding to max_length 64) for
                            edge cases and captions, English and Chinese
  tiny-siglip2/             a random-init Siglip2Model (NaFlex) with a Gemma
                            tokenizer.json that transformers converts from a
                            byte-fallback BPE SentencePiece model trained here
  expected2.safetensors     Siglip2ImageProcessor's patches, masks and spatial
                            shapes for non-square photos (max_num_patches 16),
                            token ids, embeddings and logits
Needs: pip install torch transformers sentencepiece protobuf pillow safetensors
"""
import io
import json
import os
import random
import shutil

import numpy as np
import sentencepiece as spm
import torch
from PIL import Image, ImageOps
from safetensors.numpy import save_file
from transformers import SiglipConfig, SiglipModel, SiglipTokenizer
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
OUT = os.path.join(ROOT, "tests", "fixtures", "siglip")
FLICKR = os.path.join(SHARED, "data/flickr8k")

torch.manual_seed(0)


def captions(lang, n, seed):
    if lang == "en":
        lines = open(os.path.join(FLICKR, "Flickr8k.token.txt"), encoding="utf-8").read().splitlines()
        caps = [l.split("\t", 1)[1] for l in lines]
    else:
        lines = open(os.path.join(FLICKR, "flickr8kzhc.caption.txt"), encoding="utf-8").read().splitlines()
        caps = [l.split(" ", 1)[1] for l in lines if " " in l]
    return random.Random(seed).sample(caps, n)


EDGE_CASES = [
    "", " ", "a", "A PHOTO OF A CAT.", "a photo of a cat", "  leading and   inner   spaces  ",
    "tabs\tand\nnewlines\r\n", "don't won't it's we're", "Hello, world! How's it going?!?", "...",
    "(parentheses) [brackets] {braces}", "email@example.com http://example.com/path?q=1&x=2",
    "#hashtag @mention $100 50% 3.14159", "1234567890", "café naïve résumé", "Ünïcödé ÀÉÎÕÜ",
    "emoji 😀🐶🍕", "full-width ＡＢＣ１２３", "ligature ﬁ ﬂ", "zero\u200bwidth", "▁already▁marked",
    "</s> inside", "<unk> inside", "a dog</s>", "mixed 中文 and English 混合", "她说：“你好，世界。”",
    "（括号）【书名号】", "Ｈｅｌｌｏ　全角空格", "一只猫坐在垫子上。" * 10, "a " * 100,
    "The quick brown fox jumps over the lazy dog. " * 8, "zzzzqqqxxj", "Ωμέγα", "Русский текст",
]


def train_spm(d):
    """A unigram model with sentencepiece's default normalizer (nmt_nfkc,
    whose precompiled charsmap clasp must apply) and SigLIP's special ids."""
    text = captions("en", 6000, 1) + captions("zh", 3000, 2)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=os.path.join(d, "spiece"), vocab_size=1000,
        model_type="unigram", character_coverage=0.9995, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", minloglevel=2)
    os.remove(os.path.join(d, "spiece.vocab"))


def photos():
    """Non-square real photos and the small test images."""
    ref = os.path.join(SHARED, "data/reference-images")
    full = [os.path.join(ref, "flickr8k-fullres", f)
            for f in sorted(os.listdir(os.path.join(ref, "flickr8k-fullres")))][:3]
    core = os.path.join(ROOT, "tests/fixtures/core/images")
    return full + [os.path.join(ref, "clip-diagram.png"), os.path.join(core, "alpha.png"),
                   os.path.join(core, "exif6.jpg")]


def main():
    d = os.path.join(OUT, "tiny-siglip")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    train_spm(d)
    tok = SiglipTokenizer(vocab_file=os.path.join(d, "spiece.model"))
    vocab_n = tok.vocab_size
    cfg = SiglipConfig(
        text_config=dict(vocab_size=vocab_n, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8))
    model = SiglipModel(cfg).eval()
    with torch.no_grad():  # SigLIP's published init: scale log(10), bias -10; non-trivial here
        model.logit_scale.fill_(2.1)
        model.logit_bias.fill_(-3.5)
        # random-init LayerNorms are identity; perturb them so they are tested
        for n, p in model.named_parameters():
            if "layernorm" in n.lower() or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    proc = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    proc.save_pretrained(d)

    strings = EDGE_CASES + captions("en", 120, 11) + captions("zh", 60, 12)
    enc = tok(strings, padding="max_length", max_length=64, truncation=True)
    json.dump({"transformers": __import__("transformers").__version__, "strings": strings,
               "input_ids": enc["input_ids"]},
              open(os.path.join(OUT, "tokens.json"), "w"), ensure_ascii=False)

    texts = ["a photo of a cat", "two dogs run on the grass", "一只猫在草地上", "A MAN, riding a bike!",
             "the cat the dog " * 20]
    files = photos()
    imgs = [ImageOps.exif_transpose(Image.open(p)) for p in files]
    px = proc(images=imgs, return_tensors="pt")["pixel_values"]
    ids = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=px)
        img = model.get_image_features(pixel_values=px)
        txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    tensors = {"pixel_values": px, "input_ids": ids.int(), "image_features": img, "text_features": txt,
               "logits_per_image": out.logits_per_image}
    meta = {"files": json.dumps([os.path.relpath(p, ROOT) for p in files]), "texts": json.dumps(texts)}
    save_file({k: v.contiguous().numpy() for k, v in tensors.items()},
              os.path.join(OUT, "expected.safetensors"), metadata=meta)
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"siglip fixtures: {len(strings)} strings, {len(files)} photos, {total / 1024:.0f} KiB")


def siglip2():
    from transformers import GemmaTokenizer, Siglip2Config, Siglip2Model
    from transformers.models.siglip2.image_processing_pil_siglip2 import Siglip2ImageProcessorPil
    torch.manual_seed(1)
    d = os.path.join(OUT, "tiny-siglip2")
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    work = os.path.join(OUT, "_spm")
    os.makedirs(work, exist_ok=True)
    text = captions("en", 6000, 3) + captions("zh", 2000, 4)
    # Gemma's SentencePiece settings: BPE with byte fallback, no dummy
    # prefix, digits split, no normalization.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_prefix=os.path.join(work, "tokenizer"), vocab_size=1200,
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        character_coverage=0.98, minloglevel=2)  # rarer Chinese characters fall back to bytes
    tok = GemmaTokenizer.from_pretrained(work)
    shutil.rmtree(work)
    cfg = Siglip2Config(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           patch_size=8, num_patches=16))
    model = Siglip2Model(cfg).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-2.5)
        for n, p in model.named_parameters():
            if "layernorm" in n.lower() or "layer_norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    tc = os.path.join(d, "tokenizer_config.json")  # no path of this machine in the fixture
    json.dump({k: v for k, v in json.load(open(tc)).items() if k != "vocab_file"}, open(tc, "w"), indent=2)
    proc = Siglip2ImageProcessorPil(patch_size=8, max_num_patches=16, do_convert_rgb=True)
    proc.save_pretrained(d)
    texts = ["a photo of a cat", "two dogs run on the grass", "一只猫在草地上", "A MAN, riding a bike!",
             "the cat the dog " * 20]
    files = photos()
    imgs = [ImageOps.exif_transpose(Image.open(p)) for p in files]
    enc = proc(images=imgs, return_tensors="pt")
    ids = tok(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=enc["pixel_values"],
                    pixel_attention_mask=enc["pixel_attention_mask"], spatial_shapes=enc["spatial_shapes"])
        img = model.get_image_features(pixel_values=enc["pixel_values"],
                                       pixel_attention_mask=enc["pixel_attention_mask"],
                                       spatial_shapes=enc["spatial_shapes"])
        txt = model.get_text_features(input_ids=ids)
    img = getattr(img, "pooler_output", img)
    txt = getattr(txt, "pooler_output", txt)
    tensors = {"pixel_values": enc["pixel_values"], "pixel_attention_mask": enc["pixel_attention_mask"].int(),
               "spatial_shapes": enc["spatial_shapes"].int(), "input_ids": ids.int(), "image_features": img,
               "text_features": txt, "logits_per_image": out.logits_per_image}
    meta = {"files": json.dumps([os.path.relpath(p, ROOT) for p in files]), "texts": json.dumps(texts)}
    save_file({k: v.contiguous().numpy() for k, v in tensors.items()},
              os.path.join(OUT, "expected2.safetensors"), metadata=meta)
    print("siglip2 fixtures: shapes", enc["spatial_shapes"].tolist())


if __name__ == "__main__":
    import sys
    if sys.argv[1:] != ["siglip2"]:
        main()
    siglip2()

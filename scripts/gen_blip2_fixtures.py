#!/usr/bin/env python3
"""Fixtures for BLIP-2's Q-Former, made by transformers:

    PYTHONPATH=/tmp/torchpy python3 scripts/gen_blip2_fixtures.py [itm] [small] [stage1] [itg]
    # writes tests/fixtures/blip2/

  itm/config.json   a Blip2Config with the Q-Former of Salesforce/blip2-itm-vit-g
                    (768 wide, 12 layers, 12 heads, cross-attention every 2nd
                    layer onto 1408-wide image features, the text feed-forward
                    on, BERT's 30523-token vocabulary with [DEC]) and its heads
                    (32 queries, a 256-d ITC space); its vision tower is cut to
                    one layer, since the fixture feeds the Q-Former image
                    features directly
  itm/manifest.json every non-vision state-dict key and its shape: the weights
                    are scripts/formula.py's `hashed` (tests/common restates it), since
                    the real Q-Former's 107M random weights are 430 MB
  itm/expected.safetensors
                    the inputs (token ids of three captions and their mask,
                    from all-MiniLM-L6-v2's uncased BERT vocabulary, which is
                    BLIP-2's) and transformers' outputs on two images' 257x1408
                    features (10 x `hashed` of "image_embedding.0" and ".1"):
                    Blip2ForImageTextRetrieval's ITC logits (images x texts)
                    and ITM logits (image i with text j, every pair), the
                    queries' last hidden state (first 16 channels and row
                    sums) and the ITC image and text embeddings

  small/            a whole Blip2ForImageTextRetrieval scaled down for speed
                    (ViT: 96 wide, 2 layers, 224 pixels in 14-pixel patches;
                    Q-Former: 64 wide, 2 layers, 8 queries, a 32-d ITC space),
                    as config.json, preprocessor_config.json (the BLIP
                    processor at 224) and manifest.json; the test writes its
                    `hashed` weights as model.safetensors beside MiniLM's
                    tokenizer and loads the folder as a user's would.
                    expected.safetensors: BlipImageProcessorPil's pixels of two
                    Flickr8k dev photos (channel means and a corner), the token
                    ids, and the ITC scores and ITM logits (every pair)

  stage1.safetensors  BLIP-2's stage-1 ITC and ITM losses on small/'s Q-Former
                    and heads, written from LAVIS's `Blip2Qformer.forward` (its
                    image_id path, which is the label-smoothed CE when ids are
                    unique): four image-feature rows of which two are the same
                    photo, three captions of different lengths (padding) and a
                    fourth; ITC over max-over-queries similarities / temp with
                    targets 0.9 * same-photo share + 0.1 / B; ITM on the
                    positive pairs, each text with a hard negative image and each
                    image with a hard negative text, drawn from the ITC softmax
                    with same-photo pairs masked (the fixture keeps the
                    weights and the drawn indices); losses and the gradients of
                    the temperature, the query tokens, the ITM head and one
                    Q-Former weight

  itg.safetensors   BLIP-2's stage-1 ITG (the Q-Former's captioning loss), written
                    as LAVIS computes it: the queries' pass (self-attention among
                    the queries, cross-attention to the photo) caches each
                    layer's query keys and values; the caption, its first token
                    replaced by [DEC] (id 30522), then runs through the text
                    path attending to the cached queries and to itself
                    causally (padding masked), through BERT's LM head (dense,
                    GELU, LayerNorm, the word embeddings tied, a bias:
                    `cls.predictions.*`, `hashed` weights); the loss is the
                    next-token cross-entropy with label smoothing 0.1, padding
                    ignored; with the gradients of the query tokens, the LM
                    head's dense layer and a text feed-forward weight

Needs: pip install torch transformers safetensors; the MiniLM tokenizer in
~/.cache/clasp/all-MiniLM-L6-v2 (scripts/get-model.sh minilm).
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import (AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval,
                          Blip2QFormerConfig, Blip2VisionConfig)
from transformers.modeling_outputs import BaseModelOutputWithPooling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from blip2_reference import decoder_inputs, itc_itm, itg_loss  # noqa: E402
from formula import hashed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/blip2")
FLICKR = os.path.join(os.path.dirname(ROOT), "shared/data/flickr8k")
MINILM = os.path.expanduser("~/.cache/clasp/all-MiniLM-L6-v2")
CAPTIONS = ["a black dog runs across the grass", "two children play in the snow",
            "a man in a red jacket climbs a rock face"]
PATCHES = 257  # ViT-g at 224 pixels: 16 x 16 patches and the class token


class Features(torch.nn.Module):
    """Stands in for the vision tower: its input is already the features."""

    def forward(self, pixel_values=None, **kwargs):
        return BaseModelOutputWithPooling(last_hidden_state=pixel_values,
                                          pooler_output=pixel_values[:, 0])


def itm_model():
    d = os.path.join(OUT, "itm")
    os.makedirs(d, exist_ok=True)
    q = Blip2QFormerConfig(vocab_size=30523, use_qformer_text_input=True,
                           encoder_hidden_size=1408)
    v = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=1,
                          num_attention_heads=16, image_size=224, patch_size=14)
    cfg = Blip2Config(vision_config=v.to_dict(), qformer_config=q.to_dict(),
                      text_config={"model_type": "opt"}, num_query_tokens=32,
                      image_text_hidden_size=256)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    sd = {k: t for k, t in model.state_dict().items() if not k.startswith("vision_model.")}
    manifest = {k: list(t.shape) for k, t in sd.items()}
    model.load_state_dict({k: hashed(k, s) for k, s in manifest.items()}, strict=False)
    model.vision_model = Features()
    cfg.save_pretrained(d)
    json.dump({"formula": "scripts/formula.py hashed", "shapes": manifest},
              open(os.path.join(d, "manifest.json"), "w"))

    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # Unit-scale features, as the vision tower's post-LayerNorm gives them.
    image = torch.stack([10 * hashed(f"image_embedding.{i}", (PATCHES, 1408)) for i in range(2)])
    with torch.no_grad():
        itc = model(pixel_values=image, input_ids=ids, attention_mask=mask)
        itm = torch.stack([
            model(pixel_values=image[i:i + 1].expand(len(CAPTIONS), -1, -1), input_ids=ids,
                  attention_mask=mask, use_image_text_matching_head=True).logits_per_image
            for i in range(2)])  # [image, text, 2]
        queries = model.qformer(query_embeds=model.query_tokens.expand(2, -1, -1),
                                encoder_hidden_states=image).last_hidden_state
    out = {
        "input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64),
        "itc": itc.logits_per_image.contiguous(),
        "image_embeds": itc.image_embeds.contiguous(),
        "text_embeds": itc.text_embeds.contiguous(),
        "itm": itm.contiguous(),
        "queries_head": queries[:, :, :16].contiguous(),
        "queries_rowsum": queries.sum(-1).contiguous(),
    }
    save_file(out, os.path.join(d, "expected.safetensors"),
              metadata={"transformers": __import__("transformers").__version__})
    print("itc", itc.logits_per_image, "\nitm", itm.softmax(-1)[..., 1])


def small_model():
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from PIL import Image
    d = os.path.join(OUT, "small")
    os.makedirs(d, exist_ok=True)
    q = Blip2QFormerConfig(vocab_size=30523, hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           use_qformer_text_input=True)
    v = Blip2VisionConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                          num_attention_heads=4, image_size=224, patch_size=14)
    cfg = Blip2Config(vision_config=v.to_dict(), qformer_config=q.to_dict(),
                      text_config={"model_type": "opt"}, num_query_tokens=8,
                      image_text_hidden_size=32)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    manifest = {k: list(t.shape) for k, t in model.state_dict().items()}
    model.load_state_dict({k: hashed(k, s) for k, s in manifest.items()})
    cfg.save_pretrained(d)
    proc = BlipImageProcessorPil(size={"height": 224, "width": 224})
    proc.save_pretrained(d)
    json.dump({"formula": "scripts/formula.py hashed", "shapes": manifest},
              open(os.path.join(d, "manifest.json"), "w"))

    photos = sorted(os.listdir(os.path.join(FLICKR, "images")))
    dev = [line.strip() for line in open(os.path.join(FLICKR, "Flickr_8k.devImages.txt"))][:2]
    images = [Image.open(os.path.join(FLICKR, "images", f)) for f in dev]
    assert all(f in photos for f in dev)
    pixels = proc(images=images, return_tensors="pt")["pixel_values"]
    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        itc = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
        itm = torch.stack([
            model(pixel_values=pixels[i:i + 1].expand(len(CAPTIONS), -1, -1, -1), input_ids=ids,
                  attention_mask=mask, use_image_text_matching_head=True).logits_per_image
            for i in range(2)])
    out = {
        "input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64),
        "pixel_means": pixels.mean(dim=(2, 3)).contiguous(),
        "pixel_corner": pixels[:, :, :8, :8].contiguous(),
        "itc": itc.logits_per_image.contiguous(), "itm": itm.contiguous(),
    }
    save_file(out, os.path.join(d, "expected.safetensors"),
              metadata={"transformers": __import__("transformers").__version__,
                        "photos": json.dumps(dev), "texts": json.dumps(CAPTIONS)})
    print("small itc", itc.logits_per_image, "\nsmall itm", itm.softmax(-1)[..., 1])


def small_hashed(d):
    """small/'s model with its `hashed` weights, in eval mode: no dropout (attention's
    is functional, not a module), so losses are deterministic; gradients flow all the same."""
    cfg = Blip2Config.from_pretrained(d)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    manifest = json.load(open(os.path.join(d, "manifest.json")))["shapes"]
    model.load_state_dict({k: hashed(k, s) for k, s in manifest.items()})
    return cfg, model


def stage1():
    d = os.path.join(OUT, "small")
    cfg, model = small_hashed(d)
    h = cfg.vision_config.hidden_size
    image = torch.stack([10 * hashed(f"stage1.image.{i}", (257, h)) for i in range(3)])
    image_ids = torch.tensor([0, 1, 1, 2])
    image_embeds = image[image_ids]  # rows 1 and 2: the same photo
    tok = AutoTokenizer.from_pretrained(MINILM)
    texts = CAPTIONS + ["a dog"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    temp = torch.tensor(0.07, requires_grad=True)
    bs = ids.shape[0]

    g = torch.Generator().manual_seed(0)
    loss_itc, loss_itm, r = itc_itm(model, image_embeds, image_ids, ids, mask, temp, g)
    weights_t2i, weights_i2t = r["weights_t2i"], r["weights_i2t"]
    neg_image, neg_text, logits = r["neg_image"], r["neg_text"], r["logits"]
    (loss_itc + loss_itm).backward()
    qw = "qformer.encoder.layer.0.crossattention.attention.key.weight"
    params = dict(model.named_parameters())
    out = {
        "input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64),
        "image_ids": image_ids.to(torch.int64),
        "loss_itc": loss_itc.detach().reshape(1), "loss_itm": loss_itm.detach().reshape(1),
        "weights_t2i": weights_t2i, "weights_i2t": weights_i2t,
        "neg_image": neg_image.to(torch.int64), "neg_text": neg_text.to(torch.int64),
        "itm_logits": logits.detach(),
        "grad_temp": temp.grad.reshape(1), "grad_query_tokens": params["query_tokens"].grad,
        "grad_itm_head": params["itm_head.weight"].grad, "grad_qformer_key": params[qw].grad,
    }
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "stage1.safetensors"),
              metadata={"transformers": __import__("transformers").__version__,
                        "texts": json.dumps(texts), "qformer_key": qw})
    print("stage1 itc", float(loss_itc), "itm", float(loss_itm), "neg", neg_image.tolist(), neg_text.tolist())


ITG_HEAD = {"cls.predictions.transform.dense.weight": "hh", "cls.predictions.transform.dense.bias": "h",
            "cls.predictions.transform.LayerNorm.weight": "h", "cls.predictions.transform.LayerNorm.bias": "h",
            "cls.predictions.bias": "v"}


def itg():
    d = os.path.join(OUT, "small")
    cfg, model = small_hashed(d)
    qc = cfg.qformer_config
    H, V = qc.hidden_size, qc.vocab_size
    shapes = {k: {"hh": [H, H], "h": [H], "v": [V]}[s] for k, s in ITG_HEAD.items()}
    head = {k: hashed(k, s).requires_grad_(True) for k, s in shapes.items()}
    h = cfg.vision_config.hidden_size
    image = torch.stack([10 * hashed(f"stage1.image.{i}", (257, h)) for i in range(3)])[[0, 1, 1, 2]]
    tok = AutoTokenizer.from_pretrained(MINILM)
    texts = CAPTIONS + ["a dog"]
    enc = tok(texts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    bos, pad = 30522, 0
    dec, labels = decoder_inputs(ids, bos, pad)
    loss, logits = itg_loss(model, head, image, dec, mask, labels)
    loss.backward()
    params = dict(model.named_parameters())
    tw = "qformer.encoder.layer.1.intermediate.dense.weight"
    p = "cls.predictions."
    out = {"loss_itg": loss.detach().reshape(1), "logits_head": logits[:, :, :16].detach().contiguous(),
           "grad_query_tokens": params["query_tokens"].grad,
           "grad_lm_dense": head[p + "transform.dense.weight"].grad, "grad_text_ffn": params[tw].grad,
           "input_ids": ids.to(torch.int64), "attention_mask": mask.to(torch.int64)}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(d, "itg.safetensors"),
              metadata={"transformers": __import__("transformers").__version__, "bos": str(bos),
                        "head_shapes": json.dumps(shapes), "text_ffn": tw})
    print("itg loss", float(loss))


if __name__ == "__main__":
    which = sys.argv[1:] or ["itm", "small", "stage1", "itg"]
    if "itm" in which:
        itm_model()
    if "small" in which:
        small_model()
    if "stage1" in which:
        stage1()
    if "itg" in which:
        itg()

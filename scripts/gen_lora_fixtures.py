#!/usr/bin/env python3
"""Fixture for tests/vlm.rs's LoRA test: PEFT loads the adapter that clasp's stage 2 saves.

    cargo build --release && python3 scripts/gen_lora_fixtures.py

1. `clasp assemble` joins tests/fixtures/vlm/vision and SmolLM2-135M-Instruct (seed 0), as
   scripts/gen_vlm_fixtures.py does.
2. `clasp train --stage 2` runs 2 steps (batch 2, lr 1e-3, LoRA rank 4, alpha 8, on all seven
   projections, BCIF's objective: lm, infonce and geometric under the bcif schedule) from it on
   Flickr8k train, seed 0, and saves the VLM with its adapter
   (adapter_model.safetensors + adapter_config.json) beside the base weights.
3. transformers loads the base model (LlavaForConditionalGeneration) and PEFT
   (`PeftModel.from_pretrained`) the adapter; for a held-out photo and the captioning prompt this
   records, at the last 24 positions, the logits of 64 fixed ids and of the top 16 with the
   adapter, and the largest change the adapter makes (so the test cannot pass with the adapter
   ignored). PEFT's merge_and_unload must give the same logits.

The test reruns step 2 in clasp (the run is seeded) and compares. The learning rate is small on
purpose: Adam moves every weight by about lr whatever its gradient's size, so a gradient element
near zero whose sign flips with float rounding (another GEMM kernel, AVX2 against AVX-512) moves
its weight by 2 lr. At 1e-2 that alone moved a logit by 1e-3; at 1e-3 the adapter still changes
the logits by about 1 and rounding stays far below the test's 1e-3. Needs torch, transformers 5,
peft, pillow.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/vlm")
SHARED = os.path.join(ROOT, "..", "shared", "data", "flickr8k")
IMAGE = "2090545563_a4e66ec76b.jpg"
USER = "<image>\nDescribe the image."
TRAIN = ["--stage", "2", "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--lora-rank", "4",
         "--lora-alpha", "8", "--seed", "0", "--objective", "lm,infonce:1,geometric:0.5",
         "--schedule", "bcif", "--set", "conflict_every=1"]


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


def main():
    clasp = os.path.join(ROOT, "target/release/clasp")
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([clasp, "assemble", "--vision", os.path.join(OUT, "vision"), "--llm", gguf,
                        "--connector", "mlp2x-gelu", "--seed", "0", "-o", vlm], check=True)
        run = os.path.join(tmp, "run")
        subprocess.run([clasp, "train", "--init", vlm, "--dataset", "flickr8k:" + SHARED, *TRAIN,
                        "--output", run], check=True)
        ckpt = os.path.join(run, "checkpoint")
        # transformers would load the adapter beside the weights by itself: the base model
        # comes from a copy without it.
        bare = os.path.join(tmp, "base")
        os.makedirs(bare)
        for f in os.listdir(ckpt):
            if not f.startswith("adapter_"):
                os.symlink(os.path.join(ckpt, f), os.path.join(bare, f))
        base, info = LlavaForConditionalGeneration.from_pretrained(bare, dtype=torch.float32,
                                                                   output_loading_info=True)
        assert not any(info.values()), info
        base.eval()
        proc = LlavaProcessor.from_pretrained(bare)
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": USER}],
                                                  tokenize=False, add_generation_prompt=True)
        enc = proc(images=Image.open(os.path.join(SHARED, "images", IMAGE)), text=text,
                   return_tensors="pt")
        with torch.no_grad():
            plain = base(**enc).logits[0]
        model = PeftModel.from_pretrained(base, ckpt)
        model.eval()
        lora = [n for n, _ in model.named_modules() if n.endswith("lora_A")]
        assert len(lora) == 30 * 7, f"PEFT adapted {len(lora)} modules, expected 210"
        assert not any("vision_tower" in n for n in lora), "the vision tower was adapted"
        with torch.no_grad():
            adapted = model(**enc).logits[0]
            merged = model.merge_and_unload()(**enc).logits[0]
        merge_gap = float((merged - adapted).abs().max())
        assert merge_gap < 1e-3, merge_gap
        fixed = list(range(0, 49152, 769))[:64]
        last = adapted[-24:]
        top = torch.topk(last, 16, dim=-1)
        fx = {
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "image": IMAGE, "user": USER, "train_args": TRAIN,
            "input_ids": enc["input_ids"][0].tolist(),
            "pixel_values": [round(float(x), 6) for x in enc["pixel_values"].flatten()],
            "argmax": adapted.argmax(-1).tolist(),
            "fixed_ids": fixed,
            "fixed": r5(last[:, fixed]),
            "top_ids": top.indices.tolist(),
            "top": r5(top.values),
            "adapter_effect": float((adapted - plain).abs().max()),
            "peft_merge_gap": merge_gap,
        }
        json.dump(fx, open(os.path.join(OUT, "lora_logits.json"), "w"))
        print("adapter changes the logits by up to", fx["adapter_effect"])


if __name__ == "__main__":
    sys.exit(main())

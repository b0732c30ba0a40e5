#!/usr/bin/env python3
"""Fixtures for tests/llava_next_video.rs: what transformers computes on a LLaVA-NeXT-Video model
that clasp saves.

    cargo build --release && pip install --no-deps --target /tmp/tv torchvision && \
        cd /tmp && PYTHONPATH=/tmp/torchpy:/tmp/tv python3 /work/main/scripts/gen_llava_next_video_fixtures.py

(The video processor needs torchvision; PyPI's newest, 0.29.2, serves torch 2.15's CPU ops here.)

1. Four frames, each a different crop of the two-cats PNG resized (PIL bicubic) to the tower's
   32x32, are written to tests/fixtures/llava_next/frames/ (a few KB): at the tower's size the
   video processor's resize and crop leave them as they are, so both sides read the same pixels.
2. `clasp assemble --anyres ... --video` joins the committed random-weight CLIP tower with
   SmolLM2 (seed 0) and saves a LlavaNextVideoForConditionalGeneration folder.
3. transformers loads it with LlavaNextVideoForConditionalGeneration and LlavaNextVideoProcessor
   (every tensor read) and, for the four frames as one video and a `<video>` prompt, records the
   processor's input_ids, each frame's channel means and the logits: every position's argmax, and
   at the last 24 positions 64 fixed vocabulary ids and the top 16.
"""

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from transformers import LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/llava_next")
REF = os.path.join(ROOT, "..", "shared", "data", "reference-images")
PINPOINTS = "32x64,64x32,64x64,32x96,96x32"
USER = "<video>\nDescribe the video."
CROPS = [(0, 0, 320, 240), (320, 0, 640, 240), (0, 240, 320, 480), (160, 120, 480, 360)]


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    frames_dir = os.path.join(OUT, "frames")
    os.makedirs(frames_dir, exist_ok=True)
    cats = Image.open(os.path.join(REF, "coco-000000039769-two-cats.png")).convert("RGB")
    frames = []
    for i, box in enumerate(CROPS):
        f = cats.crop(box).resize((32, 32), Image.BICUBIC)
        f.save(os.path.join(frames_dir, f"f{i}.png"))
        frames.append(np.asarray(Image.open(os.path.join(frames_dir, f"f{i}.png")).convert("RGB")))
    vision = os.path.join(ROOT, "tests/fixtures/vlm/vision")
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--vision", vision,
                        "--llm", gguf, "--anyres", PINPOINTS, "--video", "--seed", "0", "-o", vlm],
                       check=True)
        model, info = LlavaNextVideoForConditionalGeneration.from_pretrained(
            vlm, dtype=torch.float32, output_loading_info=True)
        model.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers did not load every tensor: {bad}"
        proc = LlavaNextVideoProcessor.from_pretrained(vlm)
        text = proc.tokenizer.apply_chat_template([{"role": "user", "content": USER}],
                                                  tokenize=False, add_generation_prompt=True)
        enc = proc(videos=[np.stack(frames)], text=text, return_tensors="pt")
        pv = enc["pixel_values_videos"][0]
        with torch.no_grad():
            logits = model(**enc).logits[0]
        last = logits[-24:]
        top = torch.topk(last, 16, dim=-1)
        fixed = list(range(0, 49152, 769))[:64]
        ids = enc["input_ids"][0].tolist()
        case = {"frames": len(frames), "frame_means": r5(pv.mean(dim=(2, 3))),
                "video_tokens": ids.count(model.config.video_token_index), "input_ids": ids,
                "argmax": logits.argmax(-1).tolist(), "fixed_ids": fixed, "fixed": r5(last[:, fixed]),
                "top_ids": top.indices.tolist(), "top": r5(top.values)}
        print("video tokens", case["video_tokens"])
        json.dump({"transformers": __import__("transformers").__version__, "pinpoints": PINPOINTS,
                   "user": USER, "case": case},
                  open(os.path.join(OUT, "video_logits.json"), "w"))


if __name__ == "__main__":
    sys.exit(main())

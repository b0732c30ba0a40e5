#!/usr/bin/env python3
"""What clasp saves, transformers loads with the same outputs.

    cargo build --release && python3 scripts/llm_roundtrip.py

`clasp convert` writes SmolLM2 (GGUF) as a LlamaForCausalLM checkpoint; transformers
loads that folder with plain from_pretrained, and its logits, tokenizer ids and chat
template are compared with transformers' own load of the GGUF. Exits 1 on a mismatch.
"""

import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True, capture_output=True,
                      text=True).stdout.strip().splitlines()[-1]
d, name = os.path.dirname(gguf), os.path.basename(gguf)
with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "smollm2-hf")
    subprocess.run([os.path.join(ROOT, "target/release/clasp"), "convert", "-m", gguf, "-o", out], check=True)
    ref_tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    texts = ["Hello world", "你好，世界 🐶", "def f(x):\n    return x", "<|im_start|>user\nhi<|im_end|>"]
    bad = 0
    for t in texts:
        if tok(t)["input_ids"] != ref_tok(t)["input_ids"]:
            print("tokenizer differs on", repr(t)); bad += 1
    msgs = [{"role": "user", "content": "Describe the image."}]
    if tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) != \
            ref_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True):
        print("chat template differs"); bad += 1
    worst = 0.0
    for p in ["Describe a dog running on a beach.", "中国的首都是哪里？", "Why is the sky blue?"]:
        ids = ref_tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        x = torch.tensor([list(ids)])
        with torch.no_grad():
            a = ref(x).logits[0]
            b = model(x).logits[0]
        worst = max(worst, (a - b).abs().max().item())
    print(f"max |logit difference| over every position of 3 prompts: {worst:.2e}")
    if worst > 1e-3:
        bad += 1
    sys.exit(1 if bad else 0)

#!/usr/bin/env python3
"""Fixtures for clasp's language model, made by transformers from the same GGUF.

    pip install torch transformers gguf accelerate
    python3 scripts/gen_llm_fixtures.py [GGUF]   # default: scripts/get-smollm2.sh's file

Writes tests/fixtures/llm/:
  tokens.json   - token ids of >= 300 strings (English, Chinese, emoji, code,
                  whitespace runs, special tokens in text), and their decodes;
  chat.json     - chat-template renders and ids (apply_chat_template with
                  add_generation_prompt=True);
  logits.json   - for 20 chat prompts (English and Chinese): the prompt ids,
                  last-position logits at the top 32 and at 512 fixed vocabulary
                  positions, and the full vector's sum, sum of squares, max and
                  argmax; and the greedy 48-token continuation of generate().

transformers loads the GGUF and dequantizes it to f32: the reference for
clasp's f32 path.
"""

import json
import os
import subprocess
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "llm")


def gguf_path():
    if len(sys.argv) > 1:
        return sys.argv[1]
    out = subprocess.run([os.path.join(ROOT, "scripts", "get-smollm2.sh")], check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def strings():
    base = [
        "Hello world", "hello world", "HELLO WORLD", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
        "a dog running on a beach", "A child in a pink dress is climbing up a set of stairs in an entry way.",
        "I'm", "you're", "they've", "she'll", "we'd", "it's", "DON'T", "don't stop", "rock'n'roll",
        "12345", "3.14159", "1,000,000", "2026-12-01", "+1 (555) 010-9999", "0x7fff", "1e-9", "v1.2.3",
        "你好，世界", "一只狗在海滩上奔跑", "一个穿着粉红色连衣裙的小女孩正在爬楼梯。", "中文和English混合", "北京是中国的首都",
        "日本語のテキスト", "한국어 텍스트", "Привет, мир", "Ελληνικά", "مرحبا بالعالم", "שלום עולם", "हिन्दी",
        "😀", "👍🏽", "🐶🏖️", "family: 👨‍👩‍👧‍👦", "flags 🇫🇷🇯🇵", "❤️ love", "emoji😀inside", "★☆✓✗",
        "def f(x):\n    return x * 2\n", "fn main() { println!(\"hi\"); }", "for (int i = 0; i < n; ++i) {}",
        "import numpy as np", "SELECT * FROM t WHERE id = 1;", "<div class=\"a\">x</div>", "a->b && c || !d",
        "    four leading spaces", "trailing spaces    ", "two  spaces", "tab\tseparated\tvalues", "\t\tindent",
        "line1\nline2", "para1\n\npara2", "\r\nwindows\r\n", "   ", "\n", "\n\n\n", " ", "  x  ", "a\u00a0b",
        "<|im_start|>user\nhi<|im_end|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "text<|endoftext|>more",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n", "<repo_name>clasp<file_sep>",
        "<|im_start |>", "< |im_end| >", "<|notatoken|>", "<im_start>",
        "café", "naïve résumé", "Straße", "Ångström", "ﬁ ligature", "Ⅻ", "x²+y²", "e\u0301", "İstanbul",
        "https://example.com/path?q=1&r=2", "user@example.com", "C:\\Windows\\System32", "/usr/bin/env python3",
        "$100.00", "50%", "#hashtag", "@mention", "~tilde~", "`code`", "**bold**", "_italic_", "[link](url)",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "abababababababab", "!!!!!!", "??", "...", "—dash–", "“quotes”",
        "Mr. Smith went to Washington.", "U.S.A.", "e.g. i.e. etc.", "CamelCaseIdentifier", "snake_case_name",
        "SmolLM2 is a small language model.", "Describe the image.", "请描述这张图片。", "What is in this photo?",
    ]
    words = ["dog", "cat", "beach", "runs", "the", "red", "ball", "child", "狗", "海滩", "奔跑", "红色", "🙂", "2",
             "  ", "\n", "<|im_end|>", "'s", "x=1;", "é"]
    rng = np.random.default_rng(0)
    extra = []
    while len(base) + len(extra) < 320:
        k = int(rng.integers(2, 8))
        parts = [words[int(i)] for i in rng.integers(0, len(words), k)]
        sep = [" ", "", " ", ", "][int(rng.integers(0, 4))]
        extra.append(sep.join(parts))
    return base + extra


PROMPTS = [
    "Describe a dog running on a beach.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to code.",
    "Explain what a neural network is in one sentence.",
    "List the colors of the rainbow.",
    "What does a cat like to eat?",
    "Summarize: A child in a pink dress climbs the stairs.",
    "Translate 'good morning' into French.",
    "How many legs does a spider have?",
    "Write a short caption for a photo of mountains at sunset.",
    "Why is the sky blue?",
    "Name a famous painting.",
    "What is 12 times 7?",
    "描述一只在海滩上奔跑的狗。",
    "中国的首都是哪里？",
    "请用一句话介绍你自己。",
    "写一句关于春天的诗。",
    "猫喜欢吃什么？",
    "一个穿粉色裙子的小女孩在做什么？",
]


def main():
    path = gguf_path()
    d, name = os.path.dirname(path), os.path.basename(path)
    os.makedirs(OUT, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)

    items = []
    for s in strings():
        ids = tok(s)["input_ids"]
        items.append({"text": s, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(OUT, "tokens.json"), "w") as f:
        json.dump({"source": name, "items": items}, f, ensure_ascii=False, indent=0)
    print(f"tokens.json: {len(items)} strings")

    convs = [
        [{"role": "user", "content": "Describe a dog running on a beach."}],
        [{"role": "system", "content": "You describe photos."}, {"role": "user", "content": "<image>\nDescribe the image."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
         {"role": "user", "content": "Tell me a joke."}],
        [{"role": "user", "content": "请描述这张图片。"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  \n\n"}],
    ]
    chats = []
    for m in convs:
        text = tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        ids = tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        chats.append({"messages": m, "text": text, "ids": list(ids)})
    with open(os.path.join(OUT, "chat.json"), "w") as f:
        json.dump(chats, f, ensure_ascii=False, indent=1)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    sample_idx = np.random.default_rng(1).choice(vocab, 512, replace=False).tolist()
    out = {"source": name, "sample_idx": sample_idx, "prompts": []}
    for p in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = list(ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(x).logits[0, -1].double()
            gen = model.generate(x, do_sample=False, max_new_tokens=48, attention_mask=torch.ones_like(x))
        top = torch.topk(logits, 32)
        cont = gen[0, len(ids):].tolist()
        out["prompts"].append({
            "prompt": p,
            "ids": ids,
            "top_ids": top.indices.tolist(),
            "top_logits": top.values.tolist(),
            "sample_logits": logits[sample_idx].tolist(),
            "sum": logits.sum().item(),
            "sum_sq": (logits * logits).sum().item(),
            "max": logits.max().item(),
            "argmax": int(logits.argmax()),
            "greedy": cont,
            "greedy_text": tok.decode(cont, skip_special_tokens=True),
        })
        print(p, "->", out["prompts"][-1]["greedy_text"][:80].replace("\n", " "))
    with open(os.path.join(OUT, "logits.json"), "w") as f:
        json.dump(out, f, ensure_ascii=False)


if __name__ == "__main__":
    main()

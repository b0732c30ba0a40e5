#!/usr/bin/env python3
"""Language-model speed: clasp (quantized and f32) against transformers (f32) and
llama.cpp (llama-cpp-python, same GGUF), interleaved round by round on the same
threads. Prefill over a 256-token prompt, greedy decode of 128 new tokens with
EOS ignored, at batch 1 and 8. Also the peak RSS of `clasp generate`.

    cargo build --release --examples && python3 bench/llm_speed.py --rounds 3

Prints a markdown table of medians and ratios; --json FILE keeps the raw runs.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 2


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = re.search(r"flags\s*:\s*(.*)", text).group(1).split()
        keep = [f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))]
        return model, " ".join(sorted(keep))
    except OSError:
        return platform.processor(), ""


def gguf():
    out = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


def clasp_run(model, precision, batch, prompt, new):
    exe = os.path.join(ROOT, "target/release/examples/bench_llm")
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    out = subprocess.run([exe, model, precision, str(batch), str(prompt), str(new)], check=True,
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


TORCH = None


def torch_run(model, batch, prompt, new):
    global TORCH
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(THREADS)
    if TORCH is None:
        d, name = os.path.dirname(model), os.path.basename(model)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
        TORCH = (tok, m)
    tok, m = TORCH
    text = "A dog runs along the beach at sunset while children build sandcastles and gulls circle overhead. "
    ids = []
    while len(ids) < prompt:
        ids += tok(text)["input_ids"]
    x = torch.tensor([ids[:prompt]] * batch)
    with torch.no_grad():
        t = time.perf_counter()
        out = m(x, use_cache=True)
        prefill = time.perf_counter() - t
        past = out.past_key_values
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new):
            out = m(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - t
    return {"prefill_tok_s": batch * prompt / prefill, "decode_tok_s": batch * new / decode}


LLAMA = None


def llamacpp_run(model, prompt, new):
    global LLAMA
    import numpy as np
    from llama_cpp import Llama
    if LLAMA is None:
        LLAMA = Llama(model_path=model, n_threads=THREADS, n_threads_batch=THREADS, n_ctx=1024, n_batch=512,
                      verbose=False)
    llm = LLAMA
    text = "A dog runs along the beach at sunset while children build sandcastles and gulls circle overhead. "
    ids = []
    while len(ids) < prompt:
        ids += llm.tokenize(text.encode(), add_bos=False)
    ids = ids[:prompt]
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(new):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    decode = time.perf_counter() - t
    return {"prefill_tok_s": prompt / prefill, "decode_tok_s": new / decode}


def peak_rss_mb(model):
    exe = os.path.join(ROOT, "target/release/clasp")
    out = subprocess.run(["/usr/bin/time", "-f", "%M", exe, "generate", "-m", model, "--chat", "-p",
                          "Describe a dog running on a beach.", "--max-tokens", "128", "--json"],
                         capture_output=True, text=True, env=dict(os.environ, RAYON_NUM_THREADS=str(THREADS)))
    return int(out.stderr.strip().splitlines()[-1]) / 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = gguf()
    have_llamacpp = True
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        have_llamacpp = False
        print(f"llama-cpp-python not importable ({e}); llama.cpp column left out", file=sys.stderr)

    configs = [("clasp Q4_1", 1), ("clasp Q4_1", 8), ("clasp f32", 1), ("clasp f32", 8),
               ("transformers f32", 1), ("transformers f32", 8)]
    if have_llamacpp:
        configs.append(("llama.cpp Q4_1", 1))
    runs = {c: [] for c in configs}
    for r in range(args.rounds):
        for name, b in configs:
            if name == "clasp Q4_1":
                res = clasp_run(model, "quantized", b, args.prompt, args.new)
            elif name == "clasp f32":
                res = clasp_run(model, "f32", b, args.prompt, args.new)
            elif name == "transformers f32":
                res = torch_run(model, b, args.prompt, args.new)
            else:
                res = llamacpp_run(model, args.prompt, args.new)
            runs[(name, b)].append(res)
            print(f"round {r} {name} b{b}: prefill {res['prefill_tok_s']:.1f} tok/s, decode {res['decode_tok_s']:.1f} tok/s",
                  file=sys.stderr)
    med = {c: {k: statistics.median(x[k] for x in v) for k in ("prefill_tok_s", "decode_tok_s")} for c, v in runs.items()}
    rss = peak_rss_mb(model)
    size = os.path.getsize(model) / 2**20
    cpu, flags = cpu_flags()
    print(f"CPU: {cpu}; {THREADS} threads; flags: {flags}")
    kernel = runs[("clasp Q4_1", 1)][0].get("kernel")
    print(f"clasp Q4_1 kernel: {kernel}; {args.rounds} interleaved rounds, medians; prompt {args.prompt} tokens, {args.new} new\n")
    print("| engine | batch | prefill tok/s | decode tok/s | decode vs transformers f32 | decode vs llama.cpp |")
    print("|---|---|---|---|---|---|")
    for (name, b), m in med.items():
        tf = med[("transformers f32", b)]["decode_tok_s"]
        lc = med.get(("llama.cpp Q4_1", b), {}).get("decode_tok_s")
        lc_ratio = f"{m['decode_tok_s'] / lc:.2f}" if lc else "—"
        print(f"| {name} | {b} | {m['prefill_tok_s']:.1f} | {m['decode_tok_s']:.1f} | {m['decode_tok_s'] / tf:.2f} | {lc_ratio} |")
    # The KV cache clasp holds at the end: candle's KvCache grows in steps of
    # 64 positions; f32 keys and values for every layer and KV head.
    import gguf as gguf_reader
    meta = gguf_reader.GGUFReader(model).fields
    val = lambda k: int(meta[k].contents())
    prompt_len = 38  # the chat-templated prompt below
    slots = -(-(prompt_len + 128) // 64) * 64
    kv = val("llama.block_count") * 2 * val("llama.attention.head_count_kv") * val("llama.rope.dimension_count") * 4 * slots / 2**20
    budget = 1.5 * size + kv
    print(f"\nPeak RSS of `clasp generate` (Q4_1, 128 new tokens): {rss:.0f} MiB; GGUF file {size:.1f} MiB; "
          f"KV cache {kv:.1f} MiB; budget 1.5 x file + KV cache = {budget:.1f} MiB ({rss / budget:.2f} of it)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": {f"{k[0]} b{k[1]}": v for k, v in runs.items()}, "rss_mb": rss}, f, indent=1)


if __name__ == "__main__":
    main()

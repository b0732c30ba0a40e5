#!/usr/bin/env python3
"""BLIP-2's stage-1 training step on the Q-Former (ITC + ITM + ITG, forward and backward):
clasp (`cargo run --release --example bench_qformer`) against PyTorch (transformers'
Blip2ForImageTextRetrieval modules with the reference losses of scripts/blip2_reference.py,
written from LAVIS), interleaved in one run, same sizes, same threads (bench/qformer.md).

    cargo build --release --example bench_qformer
    PYTHONPATH=/tmp/torchpy python3 bench/qformer.py [--rounds 3] [--iters 2] [--batch 4] [--note TEXT]

Sizes: blip2-itm-vit-g's Q-Former (768 wide, 12 layers, 12 heads, cross-attention every 2nd
layer onto 257 x 1408 image features, 32 queries, a 256-d ITC space), captions of 16 tokens.
Each side reports its median step time and its peak resident memory (the Rust process's own;
PyTorch's is this process's, model included). Timings are not tests.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from blip2_reference import decoder_inputs, itc_itm, itg_loss  # noqa: E402

EXAMPLE = os.path.join(ROOT, "target/release/examples/bench_qformer")
MARK = "<!-- notes: kept by bench/qformer.py -->"
SIZES = dict(hidden=768, layers=12, heads=12, queries=32, encoder=1408, patches=257, text=16)


def cpu():
    name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    keep = sorted({f for f in flags if f.startswith(("avx512", "amx", "avx2"))})
    return f"{name} ({os.cpu_count()} cores; {' '.join(keep)})"


def torch_model(batch):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig
    s = SIZES
    q = Blip2QFormerConfig(vocab_size=30523, hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                           num_attention_heads=s["heads"], intermediate_size=4 * s["hidden"],
                           use_qformer_text_input=True)
    v = Blip2VisionConfig(hidden_size=s["encoder"], intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=16)
    cfg = Blip2Config(vision_config=v.to_dict(), qformer_config=q.to_dict(), text_config={"model_type": "opt"},
                      num_query_tokens=s["queries"], image_text_hidden_size=256)
    model = Blip2ForImageTextRetrieval(cfg).eval()
    with torch.no_grad():
        model.query_tokens.normal_(0, 0.02)
    H, V = s["hidden"], 30523
    head = {"cls.predictions.transform.dense.weight": torch.randn(H, H) * 0.02,
            "cls.predictions.transform.dense.bias": torch.zeros(H),
            "cls.predictions.transform.LayerNorm.weight": torch.ones(H),
            "cls.predictions.transform.LayerNorm.bias": torch.zeros(H),
            "cls.predictions.bias": torch.zeros(V)}
    for t in head.values():
        t.requires_grad_(True)
    g = torch.Generator().manual_seed(7)
    image = torch.randn(batch, s["patches"], s["encoder"], generator=g)
    ids = torch.randint(1000, 30000, (batch, s["text"]), generator=g)
    ids[:, 0] = 101
    mask = torch.ones_like(ids)
    return model, head, image, ids, mask


def torch_steps(batch, iters):
    model, head, image, ids, mask = torch_model(batch)
    temp = torch.tensor(0.07, requires_grad=True)
    image_ids = torch.arange(batch)
    dec, labels = decoder_inputs(ids, 30522, 0)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        itc, itm, _ = itc_itm(model, image, image_ids, ids, mask, temp, g)
        itg, _ = itg_loss(model, head, image, dec, mask, labels)
        (itc + itm + itg).backward()
        out.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return out


def torch_itm(ks):
    """Re-ranking one caption against K photos' cached features with the ITM head."""
    model, _, _, ids, _ = torch_model(1)
    s = SIZES
    out = {}
    with torch.no_grad():
        for k in ks:
            feats = torch.randn(k, s["patches"], s["encoder"])
            idk = ids[:1].expand(k, -1)
            q = model.query_tokens.expand(k, -1, -1)
            att = torch.ones(k, q.shape[1] + idk.shape[1], dtype=torch.long)
            t0 = time.perf_counter()
            h = model.qformer(query_embeds=model.embeddings(input_ids=idk, query_embeds=q),
                              query_length=q.shape[1], attention_mask=att,
                              encoder_hidden_states=feats).last_hidden_state
            model.itm_head(h[:, :q.shape[1], :]).mean(1)
            out[str(k)] = 1000 * (time.perf_counter() - t0)
    return out


def clasp_steps(batch, iters, ks=()):
    s = SIZES
    args = [str(x) for x in (s["hidden"], s["layers"], s["heads"], s["queries"], s["encoder"], s["patches"],
                             batch, s["text"], iters, *ks)]
    # The example reports its own VmHWM: getrusage(RUSAGE_CHILDREN) would count this Python's
    # pages, which the forked child holds until it execs (they read the same before).
    r = subprocess.run([EXAMPLE, *args], check=True, capture_output=True, text=True,
                       env={**os.environ, "RAYON_NUM_THREADS": str(torch.get_num_threads())})
    res = json.loads(r.stdout.strip().splitlines()[-1])
    return res["step_s"], res["peak_rss_mb"], res.get("itm_ms", {})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--note", default="", help="what else ran on the machine, for the table")
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    c, t = [], []
    rss = 0
    ks = [16, 32, 128]
    for r in range(a.rounds):
        last = r == a.rounds - 1
        steps, rss, c_itm = clasp_steps(a.batch, a.iters, ks if last else ())
        c += steps[1:] if len(steps) > 1 else steps  # the first iteration warms up
        ts = torch_steps(a.batch, a.iters)
        t += ts[1:] if len(ts) > 1 else ts
        print(f"round {r}: clasp {steps}, torch {ts}", flush=True)
    t_itm = torch_itm(ks)
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    mc, mt = statistics.median(c), statistics.median(t)
    lines = ["# BLIP-2 stage-1 step on the Q-Former: clasp against PyTorch", "",
             "Written by `bench/qformer.py` (see its header). ITC + ITM + ITG, forward and backward, "
             f"batch {a.batch}, the Q-Former of blip2-itm-vit-g (768 wide, 12 layers, 32 queries, 257 x 1408 "
             f"image features), captions of {SIZES['text']} tokens; {a.rounds} interleaved rounds of "
             f"{a.iters} steps, the first step of each round dropped.", "",
             "| | median step (s) | peak RSS (MB) |", "|---|---|---|",
             f"| clasp | {mc:.2f} | {rss:.0f} |",
             f"| PyTorch {torch.__version__} (transformers modules, reference losses) | {mt:.2f} | "
             f"{torch_rss / 1024:.0f} (this process, model included) |", "",
             f"clasp / PyTorch step time: **{mc / mt:.2f}x** ({torch.get_num_threads()} threads each).", "",
             "Re-ranking latency added to one query with the photos' features at hand (the ITM head on "
             "K caption-photo pairs, no graph; the vision tower's features are not included: with "
             "BLIP-2's ViT-g they cost seconds a photo here, so `--rerank` wants them cached):", "",
             "| K | clasp (ms) | PyTorch (ms) |", "|---|---|---|"]
    lines += [f"| {k} | {c_itm.get(str(k), float('nan')):.0f} | {t_itm[str(k)]:.0f} |" for k in ks]
    lines += ["",
             f"Machine: {cpu()}. {a.note}".rstrip(), ""]
    # The notes below the marker are written by hand and kept across runs.
    path = os.path.join(ROOT, "bench/qformer.md")
    old = open(path).read() if os.path.isfile(path) else ""
    notes = old[old.index(MARK):] if MARK in old else MARK + "\n"
    open(path, "w").write("\n".join(lines) + "\n" + notes)
    print("\n".join(lines))


if __name__ == "__main__":
    main()

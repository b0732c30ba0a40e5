#!/usr/bin/env python3
"""The bridge's speed against PyTorch: the training step of stage 1 (connector only) and
stage 2 (connector + LoRA r 8 on all seven projections), clasp against transformers'
LlavaForConditionalGeneration (+ PEFT for stage 2) with the same frozen parts, the same
batch of 8 Flickr8k train captions, AdamW; then captioning throughput (greedy, 48 new tokens)
at batch 1 and 8; and peak memory. Rounds alternate clasp and PyTorch on the same 2 threads.

    cargo build --release && python3 bench/bridge_speed.py [--rounds 3] [--model VLM] [--packed-llm]

The model is a stage-1 mlp2x_gelu checkpoint trained by bench/bridge.py (transformers loads
that connector; the resampler is clasp's own). Writes the table to bench/bridge_speed.md.
"""

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.path.join(ROOT, "target/release/clasp")
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
DATA = "flickr8k:" + os.path.join(SHARED, "data/flickr8k")
THREADS = 2
STEPS = 4


def cpu_flags():
    text = open("/proc/cpuinfo").read()
    model = re.search(r"model name\s*:\s*(.*)", text).group(1)
    flags = re.search(r"flags\s*:\s*(.*)", text).group(1).split()
    return model, " ".join(sorted(f for f in flags if f.startswith(("avx", "fma", "f16c"))))


def clasp_steps(model, stage, tmp, extra=()):
    """Median step time of a short `clasp train` run, and its peak RSS (MiB)."""
    out = os.path.join(tmp, f"clasp_s{stage}_{time.time_ns()}")
    args = [CLASP, "train", "--init", model, "--dataset", DATA, "--steps", str(STEPS + 2),
            "--batch-size", "8", "--lr", "1e-3", "--output", out, "--save-every", "0", *extra]
    if stage == 2:
        args += ["--stage", "2"]
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    rss = peak_rss(args, env)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    # The first two steps warm the allocator and caches.
    return statistics.median(8 / r["images_per_s"] for r in rows[2:]), rss


def peak_rss(args, env):
    """Runs `args` and returns its own peak RSS (MiB): VmHWM of /proc/PID/status, polled until it
    exits. getrusage(RUSAGE_CHILDREN) cannot serve: its maximum is over every child so far, and a
    child started by (v)fork from this large process begins with the parent's resident pages."""
    # stderr to a file, not a pipe: a full pipe would stall the run.
    log = tempfile.TemporaryFile()
    p = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    peak = 0
    while p.poll() is None:
        try:
            for line in open(f"/proc/{p.pid}/status"):
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError, ValueError):
            pass
        time.sleep(0.05)
    log.seek(0)
    err = log.read().decode(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"{args[0]} failed: {err[-2000:]}")
    return peak / 1024


class Torch:
    def __init__(self, model):
        import torch
        from PIL import Image
        from transformers import LlavaForConditionalGeneration, LlavaProcessor
        torch.set_num_threads(THREADS)
        self.torch = torch
        self.dir = model
        self.proc = LlavaProcessor.from_pretrained(model)
        self.Llava = LlavaForConditionalGeneration
        lines = open(os.path.join(SHARED, "data/flickr8k/Flickr8k.token.txt")).read().splitlines()
        train = open(os.path.join(SHARED, "data/flickr8k/Flickr_8k.trainImages.txt")).read().split()
        caps = {}
        for l in lines:
            k, c = l.split("\t")
            caps.setdefault(k.split("#")[0], c)
        self.batch = [(Image.open(os.path.join(SHARED, "data/flickr8k/images", n)).convert("RGB"),
                       caps[n]) for n in train[:8]]
        self.dev = [Image.open(os.path.join(SHARED, "data/flickr8k/images", n)).convert("RGB")
                    for n in open(os.path.join(SHARED, "data/flickr8k/Flickr_8k.devImages.txt")).read().split()[:16]]

    def inputs(self):
        tok = self.proc.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": "<image>\nDescribe the image."}],
                                       tokenize=False, add_generation_prompt=True)
        rows, labels, pix = [], [], []
        for img, cap in self.batch:
            enc = self.proc(images=img, text=text, return_tensors="pt")
            p = enc["input_ids"][0].tolist()
            a = tok(cap.strip(), add_special_tokens=False)["input_ids"][:48] + [tok.eos_token_id]
            rows.append(p + a)
            labels.append([-100] * len(p) + a)
            pix.append(enc["pixel_values"][0])
        t = max(len(r) for r in rows)
        T = self.torch
        return dict(
            input_ids=T.tensor([r + [tok.eos_token_id] * (t - len(r)) for r in rows]),
            attention_mask=T.tensor([[1] * len(r) + [0] * (t - len(r)) for r in rows]),
            labels=T.tensor([l + [-100] * (t - len(l)) for l in labels]),
            pixel_values=T.stack(pix))

    def steps(self, stage):
        T = self.torch
        model = self.Llava.from_pretrained(self.dir, dtype=T.float32)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
        if stage == 2:
            from peft import LoraConfig, get_peft_model
            cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=(
                r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
            model = get_peft_model(model, cfg)
            for n, p in model.named_parameters():
                if "multi_modal_projector" in n:
                    p.requires_grad_(True)
        model.train()
        opt = T.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        batch = self.inputs()
        times = []
        for i in range(STEPS + 2):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            if i >= 2:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def caption(self, batch):
        T = self.torch
        model = self.Llava.from_pretrained(self.dir, dtype=T.float32).eval()
        tok = self.proc.tokenizer
        tok.padding_side = "left"
        text = tok.apply_chat_template([{"role": "user", "content": "<image>\nDescribe the image."}],
                                       tokenize=False, add_generation_prompt=True)
        t0 = time.perf_counter()
        with T.no_grad():
            for i in range(0, len(self.dev), batch):
                imgs = self.dev[i:i + batch]
                enc = self.proc(images=imgs, text=[text] * len(imgs), return_tensors="pt", padding=True)
                model.generate(**enc, max_new_tokens=48, do_sample=False)
        return len(self.dev) / (time.perf_counter() - t0)


def clasp_caption(model, batch, tmp):
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    dev = open(os.path.join(SHARED, "data/flickr8k/Flickr_8k.devImages.txt")).read().split()[:16]
    imgs = [os.path.join(SHARED, "data/flickr8k/images", n) for n in dev]
    t0 = time.perf_counter()
    subprocess.run([CLASP, "caption", "--model", model, "--batch-size", str(batch),
                    "--max-tokens", "48", *imgs], check=True, capture_output=True, env=env)
    return len(imgs) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packed-llm", action="store_true",
                    help="train with clasp's --packed-llm (the frozen LLM on packed AVX-512 copies)")
    ap.add_argument("--model", default=os.path.join(ROOT, "bench/.work/bridge/mlp_200_s0/checkpoint"))
    a = ap.parse_args()
    torch = Torch(a.model)
    res = {k: [] for k in ["c1", "t1", "c2", "t2", "cc1", "tc1", "cc8", "tc8"]}
    rss = {1: 0.0, 2: 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for stage in (1, 2):
                t, m = clasp_steps(a.model, stage, tmp, ["--packed-llm"] if a.packed_llm else [])
                res[f"c{stage}"].append(t)
                rss[stage] = max(rss[stage], m)
                res[f"t{stage}"].append(torch.steps(stage))
            for b in (1, 8):
                res[f"cc{b}"].append(clasp_caption(a.model, b, tmp))
                res[f"tc{b}"].append(torch.caption(b))
            print(f"round {r + 1}: " + json.dumps({k: round(v[-1], 3) for k, v in res.items()}),
                  file=sys.stderr, flush=True)
    torch_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    med = {k: statistics.median(v) for k, v in res.items()}
    model, flags = cpu_flags()
    lines = [
        "# The bridge's speed against PyTorch",
        "",
        f"Made by `python3 bench/bridge_speed.py --rounds {a.rounds}` on {model} "
        f"({THREADS} threads; CPU flags: {flags}); medians over rounds that alternate clasp and "
        "PyTorch. Model: the stage-1 mlp2x_gelu VLM of bench/bridge.md (tiny CLIP tower, "
        "64 image tokens, SmolLM2-135M f32). Steps: batch 8 Flickr8k train captions, AdamW, "
        f"the median of {STEPS} steps after 2 warm-up steps per round. PyTorch: transformers' "
        "LlavaForConditionalGeneration (+ PEFT LoRA r 8 on q/k/v/o/gate/up/down for stage 2), "
        "everything but the trained parts frozen.",
        "",
        "| measure | clasp | PyTorch | clasp / PyTorch time |",
        "|---|---|---|---|",
        f"| stage-1 step (s) | {med['c1']:.2f} | {med['t1']:.2f} | {med['c1'] / med['t1']:.2f} |",
        f"| stage-2 step (s) | {med['c2']:.2f} | {med['t2']:.2f} | {med['c2'] / med['t2']:.2f} |",
        f"| captioning, batch 1 (images/s) | {med['cc1']:.2f} | {med['tc1']:.2f} | {med['tc1'] / med['cc1']:.2f} |",
        f"| captioning, batch 8 (images/s) | {med['cc8']:.2f} | {med['tc8']:.2f} | {med['tc8'] / med['cc8']:.2f} |",
        "",
        f"Peak memory: `clasp train` {rss[1]:.0f} MiB (stage 1), {rss[2]:.0f} MiB (stage 2), max RSS of "
        f"the process; the PyTorch process (all its runs, both stages and captioning) {torch_rss:.0f} MiB.",
        "clasp's captioning figure is `clasp caption`'s wall time for 16 photos, model loading "
        "included; PyTorch's excludes loading.",
    ]
    open(os.path.join(ROOT, "bench/bridge_speed.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

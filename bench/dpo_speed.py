#!/usr/bin/env python3
"""DPO step time and peak memory, clasp against TRL, on the same VLM and the same batches.

    cargo build --release
    PYTHONPATH=/tmp/torchpy python3 bench/dpo_speed.py [--steps 6] [--batch 4] [--rounds 2]

The model is the Llava `clasp assemble` makes from tests/fixtures/vlm/vision and SmolLM2-135M-
Instruct; the pairs are tests/fixtures/dpo/vlm/prefs.jsonl repeated to fill the batches; LoRA
rank 8 on every projection of the language model, sigmoid loss, beta 0.1. Each side runs in
its own process (peak RSS from getrusage of that child), clasp and TRL interleaved for
--rounds rounds; the first step of each run is left out of the step time (warm-up). Torch gets
the same two threads clasp has. Writes bench/dpo_speed.md.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
PREFS = os.path.join(ROOT, "tests/fixtures/dpo/vlm/prefs.jsonl")

TRL_CHILD = r'''
import json, os, sys, time, torch
import datasets.fingerprint
counter = iter(range(10**9))
datasets.fingerprint.Hasher.hash = classmethod(lambda cls, value: f"{next(counter):016x}")
from datasets import Dataset
from peft import LoraConfig
from PIL import Image
from transformers import LlavaForConditionalGeneration, LlavaProcessor
from trl import DPOConfig, DPOTrainer
vlm, prefs, steps, batch, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.set_num_threads(2)
base = os.path.dirname(prefs)
rows = []
for l in open(prefs):
    r = json.loads(l)
    rows.append({"images": [Image.open(os.path.join(base, r["images"][0])).convert("RGB")],
                 "prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
rows = (rows * (steps * batch // len(rows) + 1))[: steps * batch]
model = LlavaForConditionalGeneration.from_pretrained(vlm, dtype=torch.float32)
proc = LlavaProcessor.from_pretrained(vlm)
args = DPOConfig(output_dir=out, beta=0.1, report_to=[], per_device_train_batch_size=batch,
                 use_cpu=True, bf16=False, max_length=None, learning_rate=1e-4, max_steps=steps,
                 logging_steps=1, save_strategy="no", dataloader_num_workers=0)
lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                  target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                     processing_class=proc, peft_config=lora)
times = []
from transformers import TrainerCallback
class T(TrainerCallback):
    def on_step_begin(self, *a, **k): self.t = time.perf_counter()
    def on_step_end(self, *a, **k): times.append(time.perf_counter() - self.t)
trainer.add_callback(T())
trainer.train()
print(json.dumps({"step_s": times}))
'''


def child_peak_kb():
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def run_clasp(vlm, prefs, steps, batch, tmp):
    out = os.path.join(tmp, f"clasp_{time.time_ns()}")
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", CLASP, "train", "--task", "dpo", "--init", vlm,
                        "--prefs", prefs, "--steps", str(steps), "--batch-size", str(batch),
                        "--lr", "1e-4", "--lora-rank", "8", "--lora-alpha", "16", "--output", out],
                       capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    step = [batch / r["images_per_s"] for r in rows[1:]]
    peak = int(p.stderr.strip().splitlines()[-1])
    return statistics.median(step), peak / 1024, time.perf_counter() - t0


def run_trl(vlm, prefs, steps, batch, tmp):
    out = os.path.join(tmp, f"trl_{time.time_ns()}")
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-c", TRL_CHILD, vlm, prefs,
                        str(steps), str(batch), out], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(p.stderr[-3000:])
    times = json.loads([l for l in p.stdout.splitlines() if l.startswith("{")][-1])["step_s"]
    peak = int(p.stderr.strip().splitlines()[-1])
    return statistics.median(times[1:]), peak / 1024, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    gguf = subprocess.run([os.path.join(ROOT, "scripts/get-smollm2.sh")], check=True,
                          capture_output=True, text=True).stdout.strip().splitlines()[-1]
    with tempfile.TemporaryDirectory() as tmp:
        vlm = os.path.join(tmp, "vlm")
        subprocess.run([CLASP, "assemble", "--vision", os.path.join(ROOT, "tests/fixtures/vlm/vision"),
                        "--llm", gguf, "-o", vlm], check=True, capture_output=True)
        # Enough pairs for the batches: the fixture's four, repeated (paths made absolute).
        prefs = os.path.join(tmp, "prefs.jsonl")
        lines = []
        for l in open(PREFS):
            r = json.loads(l)
            r["images"] = [os.path.normpath(os.path.join(os.path.dirname(PREFS), r["images"][0]))]
            lines.append(json.dumps(r))
        open(prefs, "w").write("\n".join(lines * (a.steps * a.batch // len(lines) + 1)) + "\n")
        res = {"clasp": [], "trl": []}
        for _ in range(a.rounds):
            res["clasp"].append(run_clasp(vlm, prefs, a.steps, a.batch, tmp))
            res["trl"].append(run_trl(vlm, prefs, a.steps, a.batch, tmp))
    flags = sorted({f for l in open("/proc/cpuinfo") if l.startswith("flags")
                    for f in l.split(":")[1].split() if f.startswith(("avx", "amx", "fma"))})
    model = next((l.split(":")[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    med = {k: (statistics.median(r[0] for r in v), max(r[1] for r in v)) for k, v in res.items()}
    lines = ["# DPO step: clasp against TRL", "",
             f"Written by `bench/dpo_speed.py` (--steps {a.steps} --batch {a.batch} --rounds {a.rounds}). "
             "The Llava of `clasp assemble` (tests/fixtures/vlm/vision, 32×32 photos, 16 image tokens; "
             "SmolLM2-135M-Instruct in f32), LoRA r 8 on all seven projections, sigmoid loss, batches of "
             f"{a.batch} pairs; the reference is the model with its adapter disabled on both sides. "
             "Median step time without each run's first step; peak RSS of the whole process.", "",
             f"CPU: {model}, {os.cpu_count()} threads; flags: {' '.join(flags)}; Python {platform.python_version()}.", "",
             "| | step time (s) | peak RSS (MiB) |", "|---|---|---|"]
    for k in ("clasp", "trl"):
        lines.append(f"| {k} | {med[k][0]:.2f} | {med[k][1]:.0f} |")
    lines += ["", f"clasp / TRL step time: {med['clasp'][0] / med['trl'][0]:.2f}×; peak memory "
              f"{med['clasp'][1] / med['trl'][1]:.2f}×.", "",
              "Per round (step s, peak MiB): " + "; ".join(
                  f"{k} " + ", ".join(f"{s:.2f}/{m:.0f}" for s, m, _ in v) for k, v in res.items())]
    open(os.path.join(ROOT, "bench/dpo_speed.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A VQ image tokenizer trained here (bench/vq.md): `clasp train --task vq` on Flickr8k train,
scored by `clasp eval vq` on held-out Flickr8k dev photos.

    cargo build --release && python3 bench/vq.py [--seeds 0] [--steps 300] [--limit 200]
        [--table-only]

For each seed s:
1. `clasp train --task vq` at 64 x 64 pixels (8 x 8 codes of a 1024-code book, 32 base channels,
   one residual block a level), batch 16, lr 5e-4 (cosine, 10% warm-up), unused codes restarted
   every 25 steps; resumable (an interrupted run continues).
2. `clasp eval vq` of its checkpoint on the first --limit dev photos, with the run's untrained
   start (RUN/init) as the baseline and torchvision's MobileNetV2 for the perceptual score:
   PSNR, SSIM and the perceptual cosine of the reconstructions, each beside the wrong photo's
   reconstruction, the bicubic thumbnail at the code grid's size and the untrained tokenizer,
   with the paired t of the difference; the codebook's use over the dev photos.

Work goes to bench/.work/vq/; each finished measurement is kept in bench/vq_runs/ (its report
and the picture grid of seed 0) and the table is written from those records.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
FLICKR = "flickr8k:" + os.path.join(SHARED, "data/flickr8k")
WORK = os.path.join(ROOT, "bench/.work/vq")
RUNS = os.path.join(ROOT, "bench/vq_runs")


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(seed, steps):
    out = os.path.join(WORK, f"vq64_s{seed}")
    if os.path.exists(os.path.join(out, "state")):
        run([CLASP, "train", "--resume", out])
    else:
        run([CLASP, "train", "--task", "vq", "--dataset", FLICKR, "--steps", str(steps),
             "--batch-size", "16", "--lr", "5e-4", "--save-every", "50", "--seed", str(seed),
             "--set", "vq_restart_every=25", "--output", out])
    return out


def evaluate(seed, run_dir, limit):
    mnv2 = subprocess.run([os.path.join(ROOT, "scripts/get-model.sh"), "mobilenet_v2"],
                          check=True, capture_output=True, text=True).stdout.strip()
    report = os.path.join(WORK, f"report_s{seed}")
    out = subprocess.run([CLASP, "eval", "vq", "-m", os.path.join(run_dir, "checkpoint"), "-d", FLICKR,
                          "--split", "dev", "--limit", str(limit), "--baseline",
                          os.path.join(run_dir, "init"), "--perceptual", mnv2, "--report", report,
                          "--json"], check=True, capture_output=True, text=True).stdout
    r = json.loads(out)
    metrics = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    r["steps"] = metrics[-1]["step"]
    r["last_recon_l1"] = metrics[-1]["losses"]["recon_l1"]
    r["seed"] = seed
    r["cpu_flags"] = cpu_flags()
    os.makedirs(RUNS, exist_ok=True)
    json.dump(r, open(os.path.join(RUNS, f"vq64_s{seed}.json"), "w"), indent=1)
    if seed == 0:
        shutil.copy(os.path.join(report, "grid.png"), os.path.join(ROOT, "bench/vq_grid.png"))


def cpu_flags():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags = set(line.split(":")[1].split())
            break
    keep = [f for f in sorted(flags) if f.startswith(("avx", "amx", "fma", "f16c"))]
    return " ".join(keep)


def table():
    rows = []
    for f in sorted(os.listdir(RUNS)) if os.path.isdir(RUNS) else []:
        r = json.load(open(os.path.join(RUNS, f)))
        rows.append(r)
    lines = ["# A VQ image tokenizer trained by clasp", "",
             "Made by `python3 bench/vq.py --table-only`; see its docstring for the setup. "
             "Scored on held-out Flickr8k dev photos at 64 x 64 pixels.", "",
             "| seed | steps | photos | codes used (of 1024) | perplexity | metric | reconstruction | "
             "wrong photo | thumbnail (8 x 8, bicubic) | untrained start |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for m in ["psnr", "ssim", "perceptual"]:
            s = r["scores"].get(m)
            if not s:
                continue

            def cell(k):
                e = s.get(k)
                if not e:
                    return "—"
                t = e.get("reconstruction_minus_this", {}).get("paired_t")
                return f"{e['mean']:.3f}" + (f" (t {t:.1f})" if t is not None else "")
            lines.append(f"| {r['seed']} | {r['steps']} | {r['photos']} | {r['codebook']['used']} | "
                         f"{r['codebook']['perplexity']:.0f} | {m} | {cell('reconstruction')} | "
                         f"{cell('wrong_photo')} | {cell('thumbnail')} | {cell('baseline')} |")
    lines += ["", "t: the paired t of (reconstruction − that column) over the photos.", "",
              "![Dev photos (top) over their reconstructions (bottom), seed 0](vq_grid.png)", ""]
    path = os.path.join(ROOT, "bench/vq.md")
    notes = ""
    if os.path.exists(path):
        old = open(path).read()
        marker = "<!-- notes: kept by bench/vq.py -->"
        if marker in old:
            notes = old[old.index(marker):]
    open(path, "w").write("\n".join(lines) + "\n" + (notes or "<!-- notes: kept by bench/vq.py -->\n"))
    print("\n".join(lines))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--table-only", action="store_true")
    a = ap.parse_args()
    if not a.table_only:
        for s in [int(x) for x in a.seeds.split(",")]:
            if os.path.exists(os.path.join(RUNS, f"vq64_s{s}.json")):
                continue
            d = train(s, a.steps)
            evaluate(s, d, a.limit)
    table()


if __name__ == "__main__":
    sys.exit(main())

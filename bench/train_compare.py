#!/usr/bin/env python3
"""Summarise a clasp vs PyTorch training comparison (issue 4's side by side).

For each seed S, with the same init, data order and hyperparameters:

    D=flickr8k:../shared/data/flickr8k
    clasp train --preset tiny --dataset $D --steps 300 --batch-size 32 --crop-scale 1 --seed S \\
        --save-every 0 --eval-dataset $D --output RUNS/clasp_sS > RUNS/clasp_sS.json
    python3 bench/train_reference.py --init RUNS/clasp_sS/init --dataset ../shared/data/flickr8k \\
        --steps 300 --batch-size 32 --seed S --output RUNS/torch_sS
    clasp eval retrieval --json --model RUNS/torch_sS/checkpoint --dataset $D --split dev > RUNS/torch_sS.json
    # LiT: the MiniLM text tower locked, a from-scratch image tower
    clasp train --preset tiny --text-init MINILM_DIR --lock-text ... --output RUNS/lit_sS > RUNS/lit_sS.json
    # the same with the text tower pooled as sentence-transformers trained it
    clasp train --preset tiny --text-init MINILM_DIR --text-pooling mean --lock-text ... \
        --output RUNS/litmean_sS > RUNS/litmean_sS.json

then `python3 bench/train_compare.py RUNS`. Prints dev R@1/5/10 in both
directions and mean recall per run and as mean ± std over seeds, and the
median wall time per step from each run's metrics.jsonl (clasp: the whole
step including any wait for data, which its workers decode while the model
runs; PyTorch: the serial loading of the batch plus the step, data_s + step_s). Step times are only
comparable between runs made one after another on a quiet machine.
"""
import glob
import json
import os
import re
import statistics
import sys

KEYS = [("text→image", "image_retrieval_recall@"), ("image→text", "text_retrieval_recall@")]


def dev_metrics(path):
    text = open(path).read().strip()
    # clasp train prints the final dev metrics as the last JSON object.
    start = text.rfind("\n{")
    return json.loads(text[start + 1:] if start >= 0 else text)


def step_time(run_dir):
    rows = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    rows = rows[5:] or rows
    if "step_s" in rows[0]:
        # The reference loads each batch serially inside the step: its wall
        # time per step is the loading plus the compute.
        return statistics.median(r["step_s"] + r.get("data_s", 0.0) for r in rows)
    return statistics.median(32 / r["images_per_s"] for r in rows)


def main():
    runs = sys.argv[1]
    table = {}
    for js in sorted(glob.glob(os.path.join(runs, "*_s*.json"))):
        m = re.match(r"(\w+)_s(\d+)\.json$", os.path.basename(js))
        if not m or os.path.getsize(js) == 0:
            continue
        kind, seed = m.group(1), int(m.group(2))
        d = dev_metrics(js)
        vals = [100 * d[p + str(k)] for _, p in KEYS for k in (1, 5, 10)] + [100 * d["mean_recall"]]
        t = step_time(os.path.join(runs, f"{kind}_s{seed}"))
        table.setdefault(kind, []).append((seed, vals, t))
    head = "| run | seed | t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean recall | s/step |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for kind, rows in table.items():
        for seed, vals, t in rows:
            print(f"| {kind} | {seed} | " + " | ".join(f"{v:.2f}" for v in vals) + f" | {t:.3f} |")
        if len(rows) > 1:
            cols = list(zip(*[v for _, v, _ in rows]))
            cells = [f"{statistics.mean(c):.2f} ± {statistics.stdev(c):.2f}" for c in cols]
            ts = statistics.median(t for _, _, t in rows)
            print(f"| **{kind}** | mean ± std | " + " | ".join(cells) + f" | {ts:.3f} |")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What `clasp export onnx` gives an ONNX Runtime user, side by side: the
f32 graphs, clasp's `--precision int8` graphs, and ONNX Runtime's own
`quantize_dynamic` of the f32 graphs, on the ViT-B/32 config (random
weights; speed does not depend on them), CPU.

    python3 bench/onnx_export.py [--model DIR] [--rounds 7] [--threads 2]

Needs `pip install onnx onnxruntime numpy` and a release build of clasp
(`cargo build --release`). Rounds are interleaved (f32, clasp int8, ORT
int8, f32, ...); each figure is the median over rounds of that round's
median iteration. Prints the CPU flags, the file sizes, images/s at batch 8
and texts/s at batch 1 and 32, and the ratios to f32; writes
bench/out/onnx_export.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "bench", ".work", "onnx_export")
OUT = os.path.join(ROOT, "bench", "out")


def cpu_flags():
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    keep = sorted(f for f in flags if f in ("avx2", "fma") or f.startswith(("avx512", "amx")))
    return " ".join(keep)


def export(model, precision):
    out = os.path.join(WORK, precision)
    subprocess.run(
        [os.path.join(ROOT, "target", "release", "clasp"), "export", "onnx", "--model", model,
         "--output", out, "--precision", precision],
        check=True,
    )
    return out


def median_time(fn, iters):
    fn()  # warm-up
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.join(ROOT, "bench", ".work", "clip-vit-base-patch32"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    print(f"cpu flags: {cpu_flags()}")
    dirs = {"f32": export(a.model, "f32"), "clasp-int8": export(a.model, "int8")}
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qdir = os.path.join(WORK, "ort-int8")
    os.makedirs(qdir, exist_ok=True)
    for g in ("vision.onnx", "text.onnx"):
        quantize_dynamic(os.path.join(dirs["f32"], g), os.path.join(qdir, g),
                         per_channel=True, weight_type=QuantType.QInt8)
    dirs["ort-int8"] = qdir

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = a.threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    sess = {
        k: {g: ort.InferenceSession(os.path.join(d, f"{g}.onnx"), opts, providers=["CPUExecutionProvider"])
            for g in ("vision", "text")}
        for k, d in dirs.items()
    }
    rng = np.random.default_rng(0)
    px = rng.standard_normal((8, 3, 224, 224)).astype(np.float32)
    ids1 = rng.integers(1, 49000, (1, 16)).astype(np.int64)
    ids32 = rng.integers(1, 49000, (32, 16)).astype(np.int64)
    cases = {
        "images/s b8": (lambda s: s["vision"].run(None, {"pixel_values": px}), 8, 5),
        "texts/s b1": (lambda s: s["text"].run(None, {"input_ids": ids1}), 1, 40),
        "texts/s b32": (lambda s: s["text"].run(None, {"input_ids": ids32}), 32, 10),
    }
    runs = {k: {c: [] for c in cases} for k in sess}
    for r in range(a.rounds):
        for c, (fn, n, iters) in cases.items():
            for k, s in sess.items():
                runs[k][c].append(n / median_time(lambda: fn(s), iters))
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
    # Agreement with the f32 graphs on these inputs (random weights: a
    # check that the int8 graphs compute the same function, not a quality
    # figure).
    ref = sess["f32"]["vision"].run(None, {"pixel_values": px})[0]
    result = {"cpu_flags": cpu_flags(), "model": a.model, "threads": a.threads, "rounds": a.rounds, "rows": {}}
    for k in sess:
        v = sess[k]["vision"].run(None, {"pixel_values": px})[0]
        size = sum(os.path.getsize(os.path.join(dirs[k], f"{g}.onnx")) for g in ("vision", "text"))
        row = {c: statistics.median(runs[k][c]) for c in cases}
        row["MB"] = size / 1e6
        row["min image cosine to f32"] = float((v * ref).sum(1).min())
        result["rows"][k] = row
    f32 = result["rows"]["f32"]
    print(f"\n| graphs | MB | " + " | ".join(cases) + " | min image cosine to f32 |")
    print("|---|---|" + "---|" * len(cases) + "---|")
    for k, row in result["rows"].items():
        cells = [f"{row[c]:.1f} ({row[c] / f32[c]:.2f}x)" for c in cases]
        print(f"| {k} | {row['MB']:.0f} | " + " | ".join(cells) + f" | {row['min image cosine to f32']:.5f} |")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "onnx_export.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()

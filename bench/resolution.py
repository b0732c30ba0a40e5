#!/usr/bin/env python3
"""Does a larger or aspect-keeping input change retrieval recall?

    python3 bench/resolution.py [--checkpoint DIR]

The checkpoint is the best dual encoder `clasp train` makes here (default:
bench/bridge.py's vision tower, the tiny preset, 64 px with 8 px patches, an
8x8 grid, trained 1000 steps on Flickr8k). CLIP's 224 -> 336 px is a 1.5x
larger grid (7x7 -> 10.5x10.5 at B/32, 14x14 -> 21x21 at L/14); the same
ratio here is 64 -> 96 px. Each row is `clasp eval retrieval` on the Flickr8k
dev split (1000 photos, 5000 captions) with the flags shown; positions are
interpolated bicubically as transformers' interpolate_pos_encoding does.
Writes bench/out/resolution.json and prints a Markdown table.
"""
import argparse
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target", "release", "clasp"))
DATA = os.path.join(ROOT, "..", "shared", "data", "flickr8k")

ROWS = [
    ("trained size (64 px, centre crop)", []),
    ("--image-size 96 (the 224->336 ratio)", ["--image-size", "96"]),
    ("--image-size 128", ["--image-size", "128"]),
    ("--keep-aspect (<= 64 patches)", ["--keep-aspect"]),
    ("--keep-aspect --image-size 96 (<= 144 patches)", ["--keep-aspect", "--image-size", "96"]),
]


def cpu_flags():
    try:
        flags = next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    keep = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return " ".join(sorted(keep))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "bench/.work/bridge/vision/checkpoint"))
    a = ap.parse_args()
    print("cpu flags:", cpu_flags())
    out = []
    for name, flags in ROWS:
        cmd = [CLASP, "eval", "retrieval", "-m", a.checkpoint, "-d", f"flickr8k:{DATA}", "--split", "dev",
               "--json", "--no-cache", "-q", *flags]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        out.append({"setting": name, "flags": flags, **{k: r[k] for k in r if "recall" in k or k == "seconds"}})
        print(f"{name}: mean recall {r['mean_recall'] * 100:.2f}", flush=True)
    os.makedirs(os.path.join(ROOT, "bench/out"), exist_ok=True)
    json.dump({"checkpoint": a.checkpoint, "cpu": cpu_flags(), "rows": out},
              open(os.path.join(ROOT, "bench/out/resolution.json"), "w"), indent=1)
    base = out[0]["mean_recall"]
    print("\n| input | I->T R@1 | I->T R@5 | T->I R@1 | T->I R@5 | mean recall | vs trained |")
    print("|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['setting']} | {r['text_retrieval_recall@1'] * 100:.2f} | {r['text_retrieval_recall@5'] * 100:.2f} "
              f"| {r['image_retrieval_recall@1'] * 100:.2f} | {r['image_retrieval_recall@5'] * 100:.2f} "
              f"| {r['mean_recall'] * 100:.2f} | {(r['mean_recall'] - base) * 100:+.2f} |")


if __name__ == "__main__":
    main()

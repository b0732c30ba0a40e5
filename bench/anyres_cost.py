#!/usr/bin/env python3
"""What AnyRes costs at captioning time (bench/RESULTS.md): the same assembled model on
MobileNetV2 (mlp2x_gelu, seed 0) with and without LLaVA-NeXT's tiling, captioning the same
full-resolution COCO photos (../shared/data/coco-mini-train), interleaved in one run.

    cargo build --release && PYTHONPATH=/tmp/torchpy python3 bench/anyres_cost.py [--photos 16] [--rounds 2]

Per variant: image tokens per photo (the base image's 49, or LlavaNextProcessor's count for the
tiled one, computed by transformers from each photo's size with the tower's 7 positions per 224-
pixel tile), and seconds per photo for `clasp caption` (greedy, 24 new tokens, batch 8), median
over rounds. Untrained connectors: the captions are not the point, the cost is (the tokens
generated are the same count either way). Timings are not tests.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
from lit import cpu  # noqa: E402

CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
COCO = os.path.join(ROOT, "..", "shared", "data", "coco-mini-train", "train2017")
PINPOINTS = [[224, 448], [448, 224], [448, 448], [224, 672], [672, 224]]


def model(name):
    return subprocess.run([os.path.join(ROOT, "scripts/get-model.sh"), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def tiled_tokens(h, w):
    """LlavaNextProcessor's image-token count for a 224-pixel tile of 7x7 positions."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)
    proc.image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS)
    proc.patch_size, proc.num_additional_image_tokens = 32, 0
    return proc._get_number_of_features(h, w, 224, 224)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    # Full resolution: the 80 COCO photos (Flickr8k's here are 224x224, which AnyRes would only
    # upsample).
    photos = sorted(os.path.join(COCO, n) for n in os.listdir(COCO))[:a.photos]
    mnv2, llm = model("mobilenet_v2"), model("smollm2")
    pins = ",".join(f"{h}x{w}" for h, w in PINPOINTS)
    sizes = [Image.open(p).size for p in photos]  # (w, h)
    tokens = {"square (49 tokens)": [49] * len(photos),
              "AnyRes": [tiled_tokens(h, w) for w, h in sizes]}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for name, extra in [("square (49 tokens)", []), ("AnyRes", ["--anyres", pins])]:
            d = os.path.join(tmp, str(len(dirs)))
            subprocess.run([CLASP, "assemble", "--vision", mnv2, "--llm", llm, "--seed", "0", "-o", d,
                            *extra], check=True, capture_output=True)
            dirs[name] = d
        secs = {k: [] for k in dirs}
        for r in range(a.rounds):
            order = list(dirs) if r % 2 == 0 else list(dirs)[::-1]
            for name in order:
                t = time.perf_counter()
                subprocess.run([CLASP, "caption", "-m", dirs[name], *photos, "--max-tokens", "24",
                                "--batch-size", "8"], check=True, capture_output=True)
                secs[name].append((time.perf_counter() - t) / len(photos))
                print(f"round {r + 1}, {name}: {secs[name][-1]:.2f} s/photo", file=sys.stderr)
    print(f"\nCPU: {cpu()}; {len(photos)} full-resolution COCO photos, 24 new tokens, batch 8, "
          f"median of {a.rounds} rounds\n")
    print("| variant | image tokens per photo (mean, min–max) | s per photo |")
    print("|---|---|---|")
    for name in dirs:
        t = tokens[name]
        print(f"| {name} | {statistics.mean(t):.0f} ({min(t)}–{max(t)}) | "
              f"{statistics.median(secs[name]):.2f} |")
    base, tiled = (statistics.median(secs[k]) for k in dirs)
    print(f"\nAnyRes / square: {tiled / base:.2f}x the time, "
          f"{statistics.mean(tokens['AnyRes']) / 49:.1f}x the image tokens")


if __name__ == "__main__":
    main()

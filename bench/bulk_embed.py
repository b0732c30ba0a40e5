#!/usr/bin/env python3
"""Bulk embedding against clip-retrieval (issue 38, item 5), into bench/bulk_embed.md:

    cargo build --release && PYTHONPATH=/tmp/crpy:/tmp/torchpy:/tmp/tv python3 bench/bulk_embed.py \
        [--shards 2] [--batch 64] [--rounds 2]

The same model on both sides: open_clip's ViT-B-32 with random weights (seed 0; no pretrained
CLIP exists here), saved in open_clip's layout, which `clip-retrieval inference` loads through
all_clip (`open_clip:ViT-B-32/PATH`) and `clasp embed` loads as an open_clip folder. Both embed
the images and captions of the first --shards WebDataset shards of Flickr8k train (1000 samples a
shard; bench/data_parallel.py writes them) into clip-retrieval's layout. Runs alternate
(clip-retrieval, clasp, clip-retrieval, clasp, ...) and the best wall time of each is reported,
with the agreement of the two outputs (cosine of each image's and caption's embeddings).

clip-retrieval's install pulls torch; it is set up outside CI:
    pip install --target /tmp/crpy --no-deps clip-retrieval==2.45.0 all_clip fire==0.5.0 \
        braceexpand "webdataset<0.3" open_clip_torch ftfy regex pyarrow pandas termcolor wcwidth timm
with torch and torchvision on PYTHONPATH (/tmp/torchpy, /tmp/tv here).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from data_parallel import cpu  # bench/ is on the path of a script run from it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target/release/clasp"))
WORK = os.path.join(ROOT, "bench/.work/bulk_embed")
SHARDS = os.path.join(ROOT, "bench/.work/data_parallel/wds")
OUT = os.path.join(ROOT, "bench/bulk_embed.md")


def model_dir():
    d = os.path.join(WORK, "vit-b-32")
    if os.path.isfile(os.path.join(d, "open_clip_model.safetensors")):
        return d
    import open_clip
    import torch
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    os.makedirs(d, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(d, "open_clip_model.safetensors"))
    cfg = open_clip.get_model_config("ViT-B-32")
    pre = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD),
           "interpolation": "bicubic", "resize_mode": "shortest"}
    json.dump({"model_cfg": cfg, "preprocess_cfg": pre}, open(os.path.join(d, "open_clip_config.json"), "w"))
    return d


def clip_retrieval(spec, out, batch):
    """`clip_retrieval.clip_inference.main` in a script of its own (its DataLoader workers are
    spawned, so they re-import a real main module)."""
    shutil.rmtree(out, ignore_errors=True)
    # clip-retrieval imports wandb when it loads; inference without --enable_wandb never calls
    # it, so an empty module stands in for that heavy package.
    stub = os.path.join(WORK, "stub")
    os.makedirs(stub, exist_ok=True)
    open(os.path.join(stub, "wandb.py"), "w").write("# unused by clip_inference without wandb\n")
    runner = os.path.join(WORK, "run_clip_retrieval.py")
    open(runner, "w").write(
        "from clip_retrieval.clip_inference.main import main\n"
        "if __name__ == '__main__':\n"
        f"    main(input_dataset={spec!r}, output_folder={out!r}, input_format='webdataset',\n"
        f"         batch_size={batch}, num_prepro_workers=2, enable_text=True, enable_image=True,\n"
        "         enable_metadata=False, wds_image_key='jpg', wds_caption_key='txt',\n"
        f"         clip_model='open_clip:ViT-B-32/{model_dir()}/open_clip_model.safetensors',\n"
        "         use_jit=False, output_partition_count=1)\n")
    env = dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "") + ":" + stub)
    t = time.time()
    subprocess.run([sys.executable, runner], check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=3600)
    return time.time() - t


def clasp(spec, out, batch):
    shutil.rmtree(out, ignore_errors=True)
    t = time.time()
    subprocess.run([CLASP, "embed", "-m", model_dir(), "--dataset", "wds:" + spec,
                    "--output-dir", out, "--batch-size", str(batch)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t


def load(out, kind):
    """A tool's embeddings of `kind` by sample key (parts in order; clip-retrieval's rows follow
    its DataLoader workers' interleaving, so rows are matched by key, not position)."""
    import pyarrow.parquet as pq
    keys, rows = [], []
    for f in sorted(glob.glob(os.path.join(out, f"{kind}_emb", f"{kind}_emb_*.npy"))):
        i = f.rsplit("_", 1)[1][:-4]
        rows.append(np.load(f).astype(np.float32))
        keys += pq.read_table(os.path.join(out, "metadata", f"metadata_{i}.parquet"))["image_path"].to_pylist()
    return dict(zip(keys, np.concatenate(rows)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(WORK, exist_ok=True)
    spec = os.path.join(SHARDS, "{000000..%06d}.tar" % (a.shards - 1))
    n = 1000 * a.shards
    times = {"clip-retrieval": [], "clasp": []}
    for _ in range(a.rounds):
        times["clip-retrieval"].append(clip_retrieval(spec, os.path.join(WORK, "cr"), a.batch))
        times["clasp"].append(clasp(spec, os.path.join(WORK, "clasp"), a.batch))
        print(times, file=sys.stderr, flush=True)
    agree = {}
    for kind in ("img", "text"):
        a_, b_ = load(os.path.join(WORK, "cr"), kind), load(os.path.join(WORK, "clasp"), kind)
        assert sorted(a_) == sorted(b_), (kind, len(a_), len(b_))
        x = np.stack([a_[k] for k in sorted(a_)])
        y = np.stack([b_[k] for k in sorted(a_)])
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        agree[kind] = float(cos.min())
    model, flags = cpu()
    best = {k: min(v) for k, v in times.items()}
    md = ["# Bulk embedding: clasp against clip-retrieval (issue 38)", "",
          f"`bench/bulk_embed.py --shards {a.shards} --batch {a.batch} --rounds {a.rounds}` on "
          f"{model} ({flags}), 2 cores, {time.strftime('%Y-%m-%d')}: {n} Flickr8k photos and one "
          "caption each from WebDataset shards, open_clip ViT-B-32 (random weights, the same "
          "file on both sides), image and text embeddings and metadata in clip-retrieval's layout. "
          "Best wall time of the interleaved rounds, start-up included.", "",
          "| tool | wall | photos/s (with their captions) | ratio |", "|---|---:|---:|---:|",
          f"| clip-retrieval inference (torch, 2 preprocessing workers) | {best['clip-retrieval']:.1f} s | "
          f"{n / best['clip-retrieval']:.1f} | 1.00 |",
          f"| clasp embed --dataset wds:... --output-dir | {best['clasp']:.1f} s | "
          f"{n / best['clasp']:.1f} | {best['clip-retrieval'] / best['clasp']:.2f}× |", "",
          f"All rounds (s): {json.dumps({k: [round(t, 1) for t in v] for k, v in times.items()})}.",
          f"Agreement: the lowest cosine between the two tools' embeddings of the same photo is "
          f"{agree['img']:.7f}, of the same caption {agree['text']:.7f} (both store float16), "
          "matched by sample key (clip-retrieval's rows follow its two workers' interleaving).", ""]
    open(OUT, "w").write("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()

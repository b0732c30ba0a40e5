#!/usr/bin/env python3
"""PyTorch reference for `clasp train`: the same run, step for step.

    python3 bench/train_reference.py --init RUN/init --dataset ../shared/data/flickr8k \
        --steps 1000 --batch-size 32 --lr 5e-4 --seed 0 --output runs/torch_s0

It starts from the same checkpoint (`clasp train --preset tiny` writes its
initial weights to OUTPUT/init), draws the same batches (the same splitmix64
generator and epoch order as src/train/trainer.rs: every image once per
epoch, one caption drawn per image), and uses the same hyperparameters:
open_clip's ClipLoss on normalised features, torch AdamW with decay on weight
matrices only (the groups of src/train/optim.rs), the cosine schedule with
linear warmup, clip_grad_norm_, and CLIP's logit_scale clamp. It writes
OUTPUT/checkpoint (save_pretrained, loadable by `clasp eval`) and
OUTPUT/metrics.jsonl with the wall time of every step.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

M64 = (1 << 64) - 1


class Rng:
    """splitmix64, as src/train/trainer.rs."""

    def __init__(self, seed):
        self.s = seed & M64

    def next_u64(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & M64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
        return z ^ (z >> 31)

    def below(self, n):
        return self.next_u64() % n

    def shuffle(self, v):
        for i in range(len(v) - 1, 0, -1):
            j = self.below(i + 1)
            v[i], v[j] = v[j], v[i]


class Order:
    def __init__(self, seed):
        self.rng, self.pairs, self.pos = Rng(seed), [], 0

    def next_batch(self, per_image, n):
        if self.pos + n > len(self.pairs):
            imgs = list(range(len(per_image)))
            self.rng.shuffle(imgs)
            self.pairs = [(i, per_image[i][self.rng.below(len(per_image[i]))]) for i in imgs]
            self.pos = 0
        b = self.pairs[self.pos:self.pos + n]
        self.pos += n
        return b


def flickr8k(root, split):
    """The same image and caption order as clasp's Flickr8k reader."""
    ids = [l.strip() for l in open(os.path.join(root, f"Flickr_8k.{split}Images.txt")) if l.strip()]
    index = {k: i for i, k in enumerate(ids)}
    per_image = [[] for _ in ids]
    captions = []
    for line in open(os.path.join(root, "Flickr8k.token.txt"), encoding="utf-8"):
        line = line.rstrip("\r\n")
        if "\t" not in line:
            continue
        key, cap = line.split("\t", 1)
        img = key.rsplit("#", 1)[0]
        if img in index and cap.strip():
            per_image[index[img]].append(cap.strip())
    images, caps_per = [], []
    for k, caps in zip(ids, per_image):
        if caps:
            images.append(os.path.join(root, "images", k))
            caps_per.append(caps)
    flat, per = [], []
    for caps in caps_per:
        per.append(list(range(len(flat), len(flat) + len(caps))))
        flat.extend(caps)
    return images, flat, per


def no_decay(name, p):
    keys = ("layer_norm", "layernorm", "LayerNorm", "logit_scale", "logit_bias", "token_embedding",
            "position_embedding", "word_embeddings", "token_type_embeddings", "class_embedding")
    return p.ndim < 2 or name.endswith(".bias") or any(k in name for k in keys)


def cosine_lr(step, base, warmup, total):
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--init", required=True)
    ap.add_argument("--dataset", required=True, help="a Flickr8k directory")
    ap.add_argument("--split", default="train")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--weight-decay", type=float, default=0.2)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0,
                    help="load batches in this many DataLoader worker processes while the step runs "
                         "(0: serially inside the step)")
    ap.add_argument("--output", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warmup = a.warmup if a.warmup is not None else a.steps // 10
    os.makedirs(a.output, exist_ok=True)
    model = CLIPModel.from_pretrained(a.init).float().train()
    tok = CLIPTokenizer.from_pretrained(a.init)
    proc = CLIPImageProcessor.from_pretrained(a.init)
    images, captions, per_image = flickr8k(a.dataset, a.split)
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if no_decay(n, p) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                             {"params": plain, "weight_decay": 0.0}], lr=a.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    order = Order(a.seed)
    ctx = model.config.text_config.max_position_embeddings
    log = open(os.path.join(a.output, "metrics.jsonl"), "w")
    batches = [order.next_batch(per_image, a.batch_size) for _ in range(a.steps)]

    def load(batch):
        px = proc(images=[Image.open(images[i]).convert("RGB") for i, _ in batch], return_tensors="pt")["pixel_values"]
        enc = tok([captions[c] for _, c in batch], padding=True, truncation=True, max_length=ctx, return_tensors="pt")
        return len(batch), px, dict(enc)

    if a.workers > 0:
        # The same batches in the same order, loaded ahead by worker processes.
        loader = iter(torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=load,
                                                  num_workers=a.workers, prefetch_factor=2))
        next_batch = lambda: next(loader)
    else:
        pending = iter(batches)
        next_batch = lambda: load(next(pending))
    for step in range(a.steps):
        t0 = time.perf_counter()
        n, px, enc = next_batch()
        t1 = time.perf_counter()
        lr = cosine_lr(step, a.lr, warmup, a.steps)
        for g in opt.param_groups:
            g["lr"] = lr
        img = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        txt = F.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        loss = loss_fn(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        t2 = time.perf_counter()
        log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": lr,
                              "temperature": model.logit_scale.exp().item(),
                              "data_s": t1 - t0, "step_s": t2 - t1, "images_per_s": n / (t2 - t0)}) + "\n")
        log.flush()
    model.eval().save_pretrained(os.path.join(a.output, "checkpoint"))
    for f in os.listdir(a.init):
        if f not in ("config.json", "model.safetensors"):
            import shutil
            shutil.copy(os.path.join(a.init, f), os.path.join(a.output, "checkpoint", f))
    print("wrote", os.path.join(a.output, "checkpoint"))


if __name__ == "__main__":
    main()

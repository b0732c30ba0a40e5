#!/usr/bin/env python3
"""What int8 costs in quality, for clasp's `--precision int8` and for ONNX
Runtime's own int8 model (`quantize_dynamic`, per-channel int8 weights); and
clasp's `--precision bf16` where the CPU has avx512_bf16.

    python3 bench/int8_quality.py [--photos 500] [--checkpoint DIR]

Needs `pip install torch transformers onnx onnxruntime pillow`.

1. The real-config ViT-B/32 with random weights (bench/embed_throughput.py's
   checkpoint): the cosine between int8 and f32 embeddings of the first
   `--photos` Flickr8k dev photos and one caption of each; mean and minimum.
2. The best checkpoint `clasp train` makes here (default: bench/bridge.py's
   vision tower, the tiny preset trained 1000 steps): Flickr8k dev
   Recall@1/5/10 both ways with f32 and int8, for clasp (`clasp eval
   retrieval --precision`) and ONNX Runtime (the same checkpoint exported by
   torch.onnx from transformers, pixels from transformers' CLIPProcessor,
   recall computed as CLIP_benchmark does).

Writes bench/out/int8_quality.json and prints a Markdown table.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import embed_throughput as et  # noqa: E402

ROOT = et.ROOT
DATA = os.path.join(et.SHARED, "data", "flickr8k")
CLASP = os.environ.get("CLASP_BIN", os.path.join(ROOT, "target", "release", "clasp"))


def dev_pairs():
    """Flickr8k dev: image paths and their captions (5 each), in file order."""
    names = [l.strip() for l in open(os.path.join(DATA, "Flickr_8k.devImages.txt")) if l.strip()]
    caps = {}
    for line in open(os.path.join(DATA, "Flickr8k.token.txt"), encoding="utf-8"):
        key, text = line.rstrip("\n").split("\t", 1)
        caps.setdefault(key.split("#")[0], []).append(text)
    names = [n for n in names if n in caps]
    return [os.path.join(DATA, "images", n) for n in names], [caps[n] for n in names]


def clasp_embed(model, images, texts, precision, work):
    os.makedirs(work, exist_ok=True)
    il, tl = os.path.join(work, "images.txt"), os.path.join(work, "texts.txt")
    open(il, "w").write("\n".join(os.path.abspath(p) for p in images))
    open(tl, "w").write("\n".join(texts))
    out = os.path.join(work, f"emb_{precision}.npy")
    subprocess.run([CLASP, "embed", "-m", model, "--images-from", il, "--texts-from", tl,
                    "--precision", precision, "-o", out, "-q"], check=True)
    return np.load(out.replace(".npy", ".image.npy")), np.load(out.replace(".npy", ".text.npy"))


def cosines(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    c = (a * b).sum(1)
    return {"mean": float(c.mean()), "min": float(c.min())}


def ort_embed(side, images, texts, proc):
    from PIL import Image
    img = []
    for i in range(0, len(images), 32):
        px = proc(images=[Image.open(p).convert("RGB") for p in images[i:i + 32]],
                  return_tensors="np")["pixel_values"].astype(np.float32)
        img.append(side.image(px))
    txt = [side.text(texts[i:i + 64]) for i in range(0, len(texts), 64)]
    return np.concatenate(img), np.concatenate(txt)


def recall(img, txt, caps_per_image):
    """CLIP_benchmark's retrieval metrics: image retrieval is text->image (each
    caption's image in the top k), text retrieval image->text (any of the
    image's captions in the top k)."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    owner = np.repeat(np.arange(len(img)), caps_per_image)
    s = txt @ img.T  # [texts, images]
    out = {}
    rank_t2i = (s > s[np.arange(len(txt)), owner][:, None]).sum(1)
    for k in (1, 5, 10):
        out[f"image_retrieval_recall@{k}"] = float((rank_t2i < k).mean())
    st = s.T  # [images, texts]
    for k in (1, 5, 10):
        top = np.argsort(-st, axis=1, kind="stable")[:, :k]
        out[f"text_retrieval_recall@{k}"] = float((owner[top] == np.arange(len(img))[:, None]).any(1).mean())
    out["mean_recall"] = float(np.mean(list(out.values())))
    return out


def clasp_recall(model, precision):
    j = subprocess.run([CLASP, "eval", "retrieval", "-m", model, "-d", f"flickr8k:{DATA}", "--split", "dev",
                        "--json", "--no-cache", "--precision", precision, "-q"],
                       check=True, capture_output=True, text=True).stdout
    r = json.loads(j)
    keys = [f"{w}_retrieval_recall@{k}" for w in ("text", "image") for k in (1, 5, 10)]
    return {**{k: r[k] for k in keys}, "mean_recall": r["mean_recall"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--photos", type=int, default=500)
    ap.add_argument("--checkpoint", default=os.path.join(et.WORK, "bridge", "vision", "checkpoint"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    import torch
    from transformers import CLIPProcessor
    torch.set_num_threads(a.threads)
    model, flags = et.cpu_info()
    images, caps = dev_pairs()
    res = {"cpu": model, "flags": flags}

    # 1. Random-weight ViT-B/32: int8 against f32, per stack.
    d = et.checkpoint()
    ims, txs = images[:a.photos], [c[0] for c in caps[:a.photos]]
    work = os.path.join(et.WORK, "int8_quality")
    f_img, f_txt = clasp_embed(d, ims, txs, "f32", work)
    q_img, q_txt = clasp_embed(d, ims, txs, "int8", work)
    res["vitb32_clasp"] = {"image": cosines(q_img, f_img), "text": cosines(q_txt, f_txt)}
    if "avx512_bf16" in flags:
        b_img, b_txt = clasp_embed(d, ims, txs, "bf16", work)
        res["vitb32_clasp_bf16"] = {"image": cosines(b_img, f_img), "text": cosines(b_txt, f_txt)}
    tside = et.Torch(d)
    proc = CLIPProcessor.from_pretrained(d)
    of = ort_embed(et.Ort(d, a.threads, tside), ims, txs, proc)
    oq = ort_embed(et.Ort(d, a.threads, tside, int8=True), ims, txs, proc)
    res["vitb32_ort"] = {"image": cosines(oq[0], of[0]), "text": cosines(oq[1], of[1])}
    # The two f32 stacks agree (the same model): a check on the setup.
    res["vitb32_clasp_vs_ort_f32"] = {"image": cosines(f_img, of[0]), "text": cosines(f_txt, of[1])}
    print(json.dumps(res, indent=1), file=sys.stderr)

    # 2. The trained checkpoint's dev recall.
    ck = a.checkpoint
    res["checkpoint"] = ck
    res["recall_clasp_f32"] = clasp_recall(ck, "f32")
    res["recall_clasp_int8"] = clasp_recall(ck, "int8")
    if "avx512_bf16" in flags:
        res["recall_clasp_bf16"] = clasp_recall(ck, "bf16")
    cside = et.Torch(ck)
    cproc = CLIPProcessor.from_pretrained(ck)
    flat = [t for c in caps for t in c]
    owork = os.path.join(et.WORK, "int8_quality", "onnx_checkpoint")
    for name, int8 in (("recall_ort_f32", False), ("recall_ort_int8", True)):
        side = et.Ort(ck, a.threads, cside, int8=int8, work=owork)
        i, t = ort_embed(side, images, flat, cproc)
        res[name] = recall(i, t, 5)
    os.makedirs(et.OUT, exist_ok=True)
    json.dump(res, open(os.path.join(et.OUT, "int8_quality.json"), "w"), indent=1)

    c, o = res["vitb32_clasp"], res["vitb32_ort"]
    print(f"\nCPU: {model}; flags: {flags}\n")
    print(f"ViT-B/32 (random weights, real config), {a.photos} Flickr8k dev photos and captions, "
          "cosine of int8 or bf16 to the same stack's f32:\n")
    print("| stack | images mean | images min | texts mean | texts min |\n|---|---|---|---|---|")
    rows = [("clasp int8", c), ("ONNX Runtime int8", o)]
    if "vitb32_clasp_bf16" in res:
        rows.insert(1, ("clasp bf16", res["vitb32_clasp_bf16"]))
    for n, r in rows:
        print(f"| {n} | {r['image']['mean']:.5f} | {r['image']['min']:.5f} | "
              f"{r['text']['mean']:.5f} | {r['text']['min']:.5f} |")
    print(f"\nFlickr8k dev recall (%), {ck}:\n")
    keys = [f"{w}_retrieval_recall@{k}" for w in ("image", "text") for k in (1, 5, 10)] + ["mean_recall"]
    print("| run | t→i R@1 | R@5 | R@10 | i→t R@1 | R@5 | R@10 | mean | Δ mean vs its f32 (points) |")
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [("clasp f32", "recall_clasp_f32", "recall_clasp_f32"),
            ("clasp int8", "recall_clasp_int8", "recall_clasp_f32"),
            ("clasp bf16", "recall_clasp_bf16", "recall_clasp_f32"),
            ("ONNX Runtime f32", "recall_ort_f32", "recall_ort_f32"),
            ("ONNX Runtime int8", "recall_ort_int8", "recall_ort_f32")]
    for n, key, base in (r for r in runs if r[1] in res):
        r = res[key]
        delta = 100 * (r["mean_recall"] - res[base]["mean_recall"])
        print(f"| {n} | " + " | ".join(f"{100 * r[k]:.2f}" for k in keys) + f" | {delta:+.2f} |")


if __name__ == "__main__":
    main()

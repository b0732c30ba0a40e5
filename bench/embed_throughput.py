#!/usr/bin/env python3
"""Encoder throughput, side by side: clasp vs PyTorch (transformers) vs ONNX
Runtime, on the ViT-B/32 config (random weights; speed does not depend on
them), CPU, batch 1 and 32, images/s and texts/s.

    python3 bench/embed_throughput.py [--rounds 5] [--threads 2] [--variants default,int8,openblas]

Needs `pip install torch transformers onnx onnxruntime pillow`.

Each clasp variant is a build of the bench binary with that cargo feature
(`default`: none; `openblas` needs `apt install libopenblas-dev`), or `int8`
and `bf16`: the default build run with `--precision int8` or `bf16`. All are measured in the same
interleaved rounds as PyTorch, ONNX Runtime f32 and ONNX Runtime's own int8
model (`quantize_dynamic`, per-channel int8 weights).

Rounds are interleaved (clasp, torch, ort, clasp, ...) on the same machine,
and each figure is the median over rounds of that round's median iteration.
Texts are real Flickr8k captions, padded to the longest in the batch by all
three stacks (outputs are identical to padding to 77). Results are printed and
written to bench/out/embed_throughput.json.
"""
import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared")
WORK = os.path.join(ROOT, "bench", ".work")
OUT = os.path.join(ROOT, "bench", "out")


def checkpoint():
    d = os.path.join(WORK, "clip-vit-base-patch32")
    if not os.path.exists(os.path.join(d, "model.safetensors")):
        from transformers import CLIPConfig, CLIPModel
        src = os.path.join(SHARED, "assets/clip-vit-base-patch32")
        torch.manual_seed(0)
        CLIPModel(CLIPConfig.from_pretrained(src)).eval().save_pretrained(d)
        for f in os.listdir(src):
            if f != "config.json":
                shutil.copy(os.path.join(src, f), d)
    return d


def captions(n):
    lines = open(os.path.join(SHARED, "data/flickr8k/Flickr8k.token.txt"), encoding="utf-8").read().splitlines()
    return [l.split("\t", 1)[1] for l in random.Random(3).sample(lines, n)]


class Torch:
    name = "pytorch"

    def __init__(self, d):
        from transformers import CLIPModel, AutoTokenizer
        self.m = CLIPModel.from_pretrained(d).eval()
        self.tok = AutoTokenizer.from_pretrained(d)

    def image(self, px):
        with torch.inference_mode():
            out = self.m.get_image_features(pixel_values=torch.from_numpy(px))
            out = getattr(out, "pooler_output", out)
            return torch.nn.functional.normalize(out, dim=-1).numpy()

    def text(self, texts):
        enc = self.tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        with torch.inference_mode():
            out = self.m.get_text_features(**enc)
            out = getattr(out, "pooler_output", out)
            return torch.nn.functional.normalize(out, dim=-1).numpy()


class Ort:
    name = "onnxruntime"

    def __init__(self, d, threads, torch_side, int8=False, work=WORK):
        import onnxruntime as ort
        os.makedirs(work, exist_ok=True)
        m = torch_side.m
        vis, txt = os.path.join(work, "vision.onnx"), os.path.join(work, "text.onnx")

        class V(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, pixel_values):
                o = self.m.get_image_features(pixel_values=pixel_values)
                return getattr(o, "pooler_output", o)

        class T(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                o = self.m.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
                return getattr(o, "pooler_output", o)

        if not os.path.exists(vis):
          with torch.no_grad():
            s = m.config.vision_config.image_size
            torch.onnx.export(V(), (torch.randn(2, 3, s, s),), vis, input_names=["pixel_values"],
                              output_names=["image_embeds"], dynamic_axes={"pixel_values": {0: "b"}},
                              opset_version=17, dynamo=False)
        if not os.path.exists(txt):
          with torch.no_grad():
            ids = torch.ones(2, 12, dtype=torch.long)
            torch.onnx.export(T(), (ids, ids), txt, input_names=["input_ids", "attention_mask"],
                              output_names=["text_embeds"],
                              dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}},
                              opset_version=17, dynamo=False)
        if int8:
            self.name = "onnxruntime-int8"
            vis, txt = quantized(vis), quantized(txt)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.v = ort.InferenceSession(vis, so, providers=["CPUExecutionProvider"])
        self.t = ort.InferenceSession(txt, so, providers=["CPUExecutionProvider"])
        self.tok = torch_side.tok

    def image(self, px):
        out = self.v.run(None, {"pixel_values": px})[0]
        return out / np.linalg.norm(out, axis=-1, keepdims=True)

    def text(self, texts):
        enc = self.tok(texts, padding=True, truncation=True, max_length=77, return_tensors="np")
        out = self.t.run(None, {"input_ids": enc["input_ids"].astype(np.int64),
                                "attention_mask": enc["attention_mask"].astype(np.int64)})[0]
        return out / np.linalg.norm(out, axis=-1, keepdims=True)


def quantized(path):
    """ONNX Runtime's dynamic int8 model of `path` (per-channel int8 weights,
    activations quantized at run time), made once."""
    out = path.replace(".onnx", ".int8.onnx")
    if not os.path.exists(out):
        from onnxruntime.quantization import QuantType, quantize_dynamic
        quantize_dynamic(path, out, per_channel=True, weight_type=QuantType.QInt8)
    return out


def cpu_info():
    txt = open("/proc/cpuinfo").read()
    model = next((l.split(":", 1)[1].strip() for l in txt.splitlines() if l.startswith("model name")), "?")
    flags = txt.split("flags")[1].split("\n")[0].split(":", 1)[1].split()
    keep = sorted({f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))})
    return model, " ".join(keep)


def py_rates(fn, arg, batch, iters):
    fn(arg)  # warm-up
    rates = []
    for _ in range(iters):
        t = time.perf_counter()
        fn(arg)
        rates.append(batch / (time.perf_counter() - t))
    return rates


def build_variant(variant):
    """Builds bench_embed with the variant's feature and keeps a copy of it."""
    feats = [] if variant == "default" else ["--features", variant]
    subprocess.run(["cargo", "build", "--release", "--example", "bench_embed", *feats], cwd=ROOT, check=True)
    os.makedirs(WORK, exist_ok=True)
    exe = os.path.join(WORK, f"bench_embed-{variant}")
    shutil.copy(os.path.join(ROOT, "target", "release", "examples", "bench_embed"), exe)
    return exe


def clasp_rates(exe, d, kind, batch, iters, texts_file, precision="f32"):
    out = subprocess.run([exe, d, kind, str(batch), str(iters), texts_file, precision], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["items_per_s"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--only", help="comma list of cases, e.g. image32,text32")
    ap.add_argument("--variants", default="default",
                    help="comma list of clasp builds: default (no feature) and/or openblas")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    variants = a.variants.split(",")
    built = {}
    exes = {}  # name -> (binary, precision)
    for v in variants:
        feat = "default" if v in ("int8", "bf16") else v
        if feat not in built:
            built[feat] = build_variant(feat)
        name = {"default": "clasp", "int8": "clasp-int8", "bf16": "clasp-bf16"}.get(v, f"clasp+{v}")
        exes[name] = (built[feat], v if v in ("int8", "bf16") else "f32")
    model, flags = cpu_info()
    print(f"CPU: {model}; flags: {flags}", file=sys.stderr)
    d = checkpoint()
    tside = Torch(d)
    oside = Ort(d, a.threads, tside)
    qside = Ort(d, a.threads, tside, int8=True)
    texts = captions(32)
    os.makedirs(OUT, exist_ok=True)
    tf = os.path.join(OUT, "captions.txt")
    open(tf, "w").write("\n".join(texts))
    cases = [("image", 1, 8), ("image", 32, 2), ("text", 1, 20), ("text", 32, 4)]
    if a.only:
        keep = a.only.split(",")
        cases = [c for c in cases if f"{c[0]}{c[1]}" in keep]
    sides = [*exes, "pytorch", "onnxruntime", "onnxruntime-int8"]
    res = {f"{k}{b}": {s: [] for s in sides} for k, b, _ in cases}
    rng = np.random.default_rng(0)
    for r in range(a.rounds):
        for kind, b, iters in cases:
            key = f"{kind}{b}"
            arg = rng.standard_normal((b, 3, 224, 224), dtype=np.float32) if kind == "image" else texts[:b]
            for name, (exe, prec) in exes.items():
                res[key][name].append(statistics.median(clasp_rates(exe, d, kind, b, iters, tf, prec)))
            for side in (tside, oside, qside):
                fn = side.image if kind == "image" else side.text
                res[key][side.name].append(statistics.median(py_rates(fn, arg, b, iters)))
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    print(f"\n(items/s, median of {a.rounds} rounds; ratios are clasp build / PyTorch and / ONNX Runtime)")
    print(f"{'case':<10}" + "".join(f"{n:>17}" for n in sides)
          + "".join(f"{n + '/pt':>18}{n + '/ort':>18}{n + '/ort8':>20}" for n in exes))
    summary = {}
    for key, v in res.items():
        m = {k: statistics.median(x) for k, x in v.items()}
        ratios = {}
        for n in exes:
            ratios[f"{n}_vs_pytorch"] = m[n] / m["pytorch"]
            ratios[f"{n}_vs_onnxruntime"] = m[n] / m["onnxruntime"]
            ratios[f"{n}_vs_onnxruntime_int8"] = m[n] / m["onnxruntime-int8"]
            ratios[f"{n}_vs_pytorch_per_round"] = [c / p for c, p in zip(v[n], v["pytorch"])]
        summary[key] = {**m, **ratios, "rounds": v}
        print(f"{key:<10}" + "".join(f"{m[n]:>17.2f}" for n in sides)
              + "".join(f"{m[n] / m['pytorch']:>18.2f}{m[n] / m['onnxruntime']:>18.2f}"
                        f"{m[n] / m['onnxruntime-int8']:>20.2f}" for n in exes))
        for n in exes:
            print(f"  {n}/pytorch per round: " + ", ".join(f"{r:.2f}" for r in ratios[f"{n}_vs_pytorch_per_round"]))
    json.dump({"threads": a.threads, "variants": variants, "torch": torch.__version__,
               "cpu": model, "flags": flags, "results": summary},
              open(os.path.join(OUT, "embed_throughput.json"), "w"), indent=1)


if __name__ == "__main__":
    main()

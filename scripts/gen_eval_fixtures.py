#!/usr/bin/env python3
"""Fixtures for clasp's evaluation metrics, computed by CLIP_benchmark itself.

    pip install clip-benchmark torch scikit-learn
    python3 scripts/gen_eval_fixtures.py   # writes tests/fixtures/eval/metrics.json

Recall@K comes from CLIP_benchmark's own `recall_at_k` and `batchify`
(clip_benchmark/metrics/zeroshot_retrieval.py), top-1/top-5 accuracy from its
`accuracy`, and mean per-class recall from sklearn's `balanced_accuracy_score`
(clip_benchmark/metrics/zeroshot_classification.py).

Two deliberate deviations, both recorded in the output:
* Ties. torch.topk picks arbitrarily among equal scores at the top-k boundary
  (its choice changes with tensor size). While CLIP_benchmark's functions run
  here, torch.topk is replaced by a stable one: among equal scores the lower
  index ranks first. For every case the fixture also says whether torch's own
  topk gave the same numbers (`torch_topk_agrees`).
* Aggregation. CLIP_benchmark's `evaluate` averages hits in float32; the
  fixture keeps both that value (`*_f32`) and the exact fraction in float64,
  which clasp reports.
* k larger than the candidate count (a single-item set) makes torch.topk fail;
  k is clamped to the number of candidates.

Median rank and mAP are not in CLIP_benchmark; they are computed here with a
sort-based torch transcription: the median (numpy's) of each query's first
positive rank, and the mean over queries of average precision over all
positives.
"""
import json
import os

import numpy as np
import torch
from clip_benchmark.metrics import zeroshot_retrieval as zr
from sklearn.metrics import balanced_accuracy_score

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "eval", "metrics.json")
KS = [1, 5, 10]
_orig_topk = torch.topk


def stable_topk(x, k, dim=-1, largest=True, sorted=True):
    assert largest and dim in (1, -1)
    idx = torch.sort(x, dim=dim, descending=True, stable=True).indices[:, :k]
    return torch.gather(x, dim, idx), idx


class patched_topk:
    def __enter__(self):
        torch.topk = stable_topk
        torch.Tensor.topk = lambda self, k, dim=-1, largest=True, sorted=True: stable_topk(self, k, dim, largest, sorted)

    def __exit__(self, *a):
        torch.topk = _orig_topk
        torch.Tensor.topk = _orig_tensor_topk


_orig_tensor_topk = torch.Tensor.topk


def retrieval_expected(scores, caption_image):
    """scores: float32 [n_texts, n_images]; caption_image: list of image index per text."""
    n_texts, n_images = scores.shape
    positive_pairs = torch.zeros_like(scores, dtype=bool)
    positive_pairs[torch.arange(n_texts), torch.tensor(caption_image)] = True
    batch_size = 16

    def recalls(use_stable):
        out = {}
        for k in KS:
            for name, S, P in (("image", scores, positive_pairs), ("text", scores.T, positive_pairs.T)):
                kk = min(k, S.shape[1])
                if use_stable:
                    with patched_topk():
                        r = zr.batchify(zr.recall_at_k, S, P, batch_size, "cpu", k=kk)
                else:
                    r = zr.batchify(zr.recall_at_k, S, P, batch_size, "cpu", k=kk)
                hit = r > 0
                out[f"{name}_retrieval_recall@{k}"] = hit.double().mean().item()
                out[f"{name}_retrieval_recall@{k}_f32"] = hit.float().mean().item()
        return out

    m = recalls(True)
    torch_m = recalls(False)
    m["torch_topk_agrees"] = all(m[k] == torch_m[k] for k in m if not k.endswith("_f32"))
    m["mean_recall"] = float(np.mean([m[f"{d}_retrieval_recall@{k}"] for d in ("image", "text") for k in KS]))

    def ranks(S, P):
        order = torch.sort(S, dim=1, descending=True, stable=True).indices
        pos_sorted = torch.gather(P, 1, order)  # [q, n] positives in ranked order
        first, aps = [], []
        for row in pos_sorted:
            r = torch.nonzero(row).flatten().double() + 1.0  # 1-based ranks of positives
            first.append(r[0].item())
            aps.append((torch.arange(1, len(r) + 1, dtype=torch.float64) / r).mean().item())
        return first, aps

    f, a = ranks(scores, positive_pairs)
    m["image_retrieval_median_rank"] = float(np.median(f))
    m["image_retrieval_map"] = float(np.mean(a))
    m["image_retrieval_first_ranks"] = [int(x) for x in f]
    f, a = ranks(scores.T, positive_pairs.T)
    m["text_retrieval_median_rank"] = float(np.median(f))
    m["text_retrieval_map"] = float(np.mean(a))
    m["text_retrieval_first_ranks"] = [int(x) for x in f]
    return m


def cb_accuracy(output, target, topk=(1,)):
    """clip_benchmark/metrics/zeroshot_classification.py `accuracy`, line for
    line, except the last step: 1.6.2 calls float() on a 1-element numpy
    array, which numpy >= 2.x rejects; `.item()` gives the same number."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).item() / n for k in topk]


def classification_expected(logits, target):
    n_classes = logits.shape[1]
    t = torch.tensor(target)
    with patched_topk():
        if n_classes >= 5:
            acc1, acc5 = cb_accuracy(logits, t, topk=(1, 5))
        else:
            (acc1,) = cb_accuracy(logits, t, topk=(1,))
            acc5 = None
    if n_classes >= 5:
        o1, o5 = cb_accuracy(logits, t, topk=(1, 5))
    else:
        (o1,), o5 = cb_accuracy(logits, t, topk=(1,)), None
    pred = logits.argmax(axis=1)
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": float(balanced_accuracy_score(t.numpy(), pred.numpy())),
        "pred": pred.tolist(),
        "torch_topk_agrees": (o1, o5) == (acc1, acc5),
    }


def main():
    g = torch.Generator().manual_seed(1234)
    cases = []

    def add_retrieval(name, scores, caption_image):
        scores = scores.to(torch.float32)
        cases.append({
            "name": name,
            "kind": "retrieval",
            "n_images": scores.shape[1],
            "caption_image": list(caption_image),
            "scores": [float(x) for x in scores.flatten().tolist()],
            "expected": retrieval_expected(scores, caption_image),
        })

    # 1. 40 images x 5 captions, continuous scores with a signal.
    n_img = 40
    cap = [i for i in range(n_img) for _ in range(5)]
    s = torch.randn(len(cap), n_img, generator=g) * 0.1
    s[torch.arange(len(cap)), torch.tensor(cap)] += 0.12
    add_retrieval("five_captions", s, cap)

    # 2. Heavy ties: scores on a coarse grid, 1-4 captions per image, shuffled.
    n_img = 24
    counts = torch.randint(1, 5, (n_img,), generator=g).tolist()
    cap = [i for i in range(n_img) for _ in range(counts[i])]
    perm = torch.randperm(len(cap), generator=g).tolist()
    cap = [cap[p] for p in perm]
    s = torch.randint(0, 5, (len(cap), n_img), generator=g).float() / 4
    add_retrieval("ties", s, cap)

    # 3. All scores equal: every ranking is decided by the tie rule alone.
    cap = [0, 0, 1, 2, 2, 2]
    add_retrieval("all_equal", torch.zeros(6, 3), cap)

    # 4. A single image with a single caption.
    add_retrieval("single", torch.tensor([[0.3]]), [0])

    # 5. Up to 7 captions per image, uneven; few images (k=10 > n_images).
    n_img = 8
    counts = [1, 7, 2, 3, 1, 5, 4, 2]
    cap = [i for i in range(n_img) for _ in range(counts[i])]
    s = torch.rand(len(cap), n_img, generator=g)
    add_retrieval("uneven_few_images", s, cap)

    def add_cls(name, logits, target):
        logits = logits.to(torch.float32)
        cases.append({
            "name": name,
            "kind": "classification",
            "n_classes": logits.shape[1],
            "targets": list(target),
            "logits": [float(x) for x in logits.flatten().tolist()],
            "expected": classification_expected(logits, target),
        })

    t = torch.randint(0, 10, (80,), generator=g)
    l = torch.randn(80, 10, generator=g)
    l[torch.arange(80), t] += 1.0
    add_cls("ten_classes", l, t.tolist())
    t = torch.randint(0, 7, (50,), generator=g)  # classes 7..9 never true
    l = torch.randint(0, 3, (50, 10), generator=g).float()
    add_cls("ten_classes_ties_absent", l, t.tolist())
    t = torch.randint(0, 3, (30,), generator=g)
    l = torch.randn(30, 3, generator=g)
    add_cls("three_classes", l, t.tolist())

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"generator": "scripts/gen_eval_fixtures.py", "clip_benchmark": "1.6.2", "cases": cases}, f)
    for c in cases:
        print(c["name"], "torch_topk_agrees:", c["expected"]["torch_topk_agrees"])
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

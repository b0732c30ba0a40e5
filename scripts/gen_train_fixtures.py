#!/usr/bin/env python3
"""Fixtures for clasp's training objectives, made with open_clip's own losses.

    pip install open_clip_torch torch safetensors
    python3 scripts/gen_train_fixtures.py   # writes tests/fixtures/train/losses.safetensors

For each case: raw image and text features (as the towers' projections give
them), the log temperature and the SigLIP bias. The reference path is the
one CLIP training takes: L2-normalise the features, exponentiate the log
scale, then open_clip.loss.ClipLoss / SigLipLoss. Expected values: the loss
and its gradients with respect to both feature matrices, the log scale and
the bias.
"""
import os

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "losses.safetensors")


def case(name, b, d, log_scale, bias, seed, out):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g, dtype=torch.float64)
    txt = torch.randn(b, d, generator=g, dtype=torch.float64)
    # Make positives somewhat aligned, as during training.
    txt = txt + 0.5 * img
    for loss_name, fn in (("infonce", ClipLoss()), ("siglip", SigLipLoss())):
        i = img.clone().float().requires_grad_(True)
        t = txt.clone().float().requires_grad_(True)
        s = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
        bb = torch.tensor(bias, dtype=torch.float32, requires_grad=True)
        fi, ft = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
        if loss_name == "infonce":
            loss = fn(fi, ft, s.exp())
        else:
            loss = fn(fi, ft, s.exp(), bb)
        loss.backward()
        p = f"{name}.{loss_name}."
        out[p + "loss"] = loss.detach().reshape(1)
        out[p + "grad_image"] = i.grad
        out[p + "grad_text"] = t.grad
        out[p + "grad_log_scale"] = s.grad.reshape(1)
        if loss_name == "siglip":
            out[p + "grad_bias"] = bb.grad.reshape(1)
    out[name + ".image"] = img.float()
    out[name + ".text"] = txt.float()
    out[name + ".log_scale"] = torch.tensor([log_scale], dtype=torch.float32)
    out[name + ".bias"] = torch.tensor([bias], dtype=torch.float32)


def main():
    out = {}
    case("b8_d16", 8, 16, 2.659260036932778, -10.0, 1, out)  # CLIP's init ln(1/0.07); SigLIP's bias init
    case("b32_d64", 32, 64, 4.6052, -3.0, 2, out)  # scale at the ln(100) clamp
    case("b1_d8", 1, 8, 0.0, 0.0, 3, out)  # a single pair
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

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


CORE = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "core")
STEP_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "adamw_step.safetensors")


def no_decay(name, p):
    """clasp's rule (crates/train/src/optim.rs): open_clip's (ndim < 2, norms,
    biases, logit_scale) plus token/position/class embeddings."""
    keys = ("layer_norm", "layernorm", "LayerNorm", "logit_scale", "logit_bias", "token_embedding",
            "position_embedding", "word_embeddings", "token_type_embeddings", "class_embedding")
    return p.ndim < 2 or name.endswith(".bias") or any(k in name for k in keys)


def adamw_step():
    """One training step of the tiny CLIP: open_clip's ClipLoss on the
    model's normalised features, clip_grad_norm_(1.0), torch AdamW with two
    parameter groups, then CLIP's clamp of logit_scale to [0, ln 100]."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(os.path.join(CORE, "tiny-clip")).float().train()
    tok = CLIPTokenizer.from_pretrained(os.path.join(CORE, "tiny-clip"))
    g = torch.Generator().manual_seed(5)
    size = model.config.vision_config.image_size
    pixels = torch.randn(4, 3, size, size, generator=g)
    enc = tok(["a photo of a cat", "the dog", "an ant on the cat", "x"], padding="max_length",
              max_length=model.config.text_config.max_position_embeddings, truncation=True, return_tensors="pt")
    decay, plain = [], []
    for n, p in model.named_parameters():
        (plain if no_decay(n, p) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2}, {"params": plain, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    txt = F.normalize(model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output, dim=-1)
    loss = ClipLoss()(img, txt, model.logit_scale.exp())
    loss.backward()
    grads = {f"grad.{n}": p.grad.detach().clone().contiguous() for n, p in model.named_parameters() if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, 4.605170185988092)
    out = {f"param.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    out.update(grads)
    out["pixel_values"] = pixels
    out["input_ids"] = enc["input_ids"].to(torch.int64)
    out["attention_mask"] = enc["attention_mask"].to(torch.int64)
    out["loss"] = loss.detach().reshape(1)
    out["grad_norm"] = norm.detach().reshape(1)
    save_file(out, STEP_OUT)
    print("wrote", STEP_OUT, os.path.getsize(STEP_OUT), "bytes; loss", loss.item(), "grad norm", norm.item())


def main():
    adamw_step()
    out = {}
    case("b8_d16", 8, 16, 2.659260036932778, -10.0, 1, out)  # CLIP's init ln(1/0.07); SigLIP's bias init
    case("b32_d64", 32, 64, 4.6052, -3.0, 2, out)  # scale at the ln(100) clamp
    case("b1_d8", 1, 8, 0.0, 0.0, 3, out)  # a single pair
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

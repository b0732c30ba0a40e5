#!/usr/bin/env python3
"""Fixtures for the seed documents' alignment objectives, in torch, written
from the formulas of issue 5 (no library ships them):

    pip install torch safetensors
    python3 scripts/gen_objective_fixtures.py   # writes tests/fixtures/train/objectives.safetensors

- DAA: anchor = mean of the batch's normalised text features; image weights
  w = n * softmax((1 - cos(image_i, anchor)) / tau_w), computed on detached
  features; loss = symmetric InfoNCE with each pair's terms weighted by w.
- triplet (VSE++, Faghri et al. 2018): hinge(margin + s_neg - s_pos) in both
  directions on cosine similarities; `max` takes the hardest negative per
  anchor, `sum` all; the sum over anchors is divided by the batch size.
- distill (and distill_feature, adding 0.7 * mean(1 - cos(W s, t)) over images
  and texts, halved, through a projection W): teacher and student logits, each exp(own log scale) * image @ text.T,
  softened by T; loss = T^2 * (KL(P_t || P_s) rows + columns) / 2 with torch's
  kl_div(reduction="batchmean"); the teacher is a constant.
- albef (momentum distillation, Li et al. 2021, from ALBEF's `ALBEF.forward`
  without its queue): sim = scale * image @ text.T; the momentum features'
  sim_m at the student's scale, without a graph; targets = alpha *
  softmax(sim_m) + (1 - alpha) * I by rows (and by columns for text->image);
  loss = the mean of -sum(log_softmax(sim) * targets) both ways, alpha 0.4;
  the teacher's features stand for the momentum towers'.
- adversarial: a ReLU MLP discriminator behind a gradient-reversal layer
  (scale 0.7), BCE or WGAN critic loss, WGAN-GP's penalty by double backward,
  and spectral norm by one power iteration, as torch.nn.utils.spectral_norm.
- ewc: lambda/2 * sum_i F_i (theta_i - theta*_i)^2 and its gradient.
- geometric (BCIF): mean(max(0, s_neg - s_pos + margin)) over the k hardest
  in-batch negatives of every image anchor and every text anchor; 0 for a
  batch of one.

Inputs are raw features (as the projections give them); like training, the
reference L2-normalises them first, and the gradients are with respect to the
raw features and the log temperature. Cases include the degenerate ones the
issue asks for: a batch of 1, identical features, and uniform DAA weights.
"""
import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "train", "objectives.safetensors")
DAA_TEMP, TRIPLET_MARGIN, GEO_MARGIN, GEO_K = 0.05, 0.2, 0.3, 3


def daa(fi, ft, scale):
    n = fi.shape[0]
    with torch.no_grad():
        anchor = ft.mean(0, keepdim=True)
        cos = (fi * anchor).sum(1) / (fi.norm(dim=1) * anchor.norm()).clamp_min(1e-8)
        w = torch.softmax((1 - cos) / DAA_TEMP, 0) * n
    logits = scale * fi @ ft.T
    labels = torch.arange(n)
    li = F.cross_entropy(logits, labels, reduction="none")
    lt = F.cross_entropy(logits.T, labels, reduction="none")
    return 0.5 * ((w * li).sum() + (w * lt).sum()) / n


def triplet(fi, ft, mode):
    s = fi @ ft.T
    n = s.shape[0]
    d = s.diag()
    eye = torch.eye(n, dtype=torch.bool)
    cost_c = (TRIPLET_MARGIN + s - d[:, None]).clamp(min=0).masked_fill(eye, 0)  # image anchors
    cost_i = (TRIPLET_MARGIN + s - d[None, :]).clamp(min=0).masked_fill(eye, 0)  # caption anchors
    if mode == "max":
        total = cost_c.max(1)[0].sum() + cost_i.max(0)[0].sum()
    else:
        total = cost_c.sum() + cost_i.sum()
    return total / n


def geometric(fi, ft):
    s = fi @ ft.T
    n = s.shape[0]
    k = min(GEO_K, n - 1)
    if k == 0:
        return (s * 0).sum()
    d = s.diag()
    neg = s.masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    top_i = neg.topk(k, dim=1)[0]  # [n, k]: image anchor i's hardest captions
    top_t = neg.topk(k, dim=0)[0]  # [k, n]: caption anchor j's hardest images
    costs = torch.cat([(top_i - d[:, None] + GEO_MARGIN).clamp(min=0).flatten(),
                       (top_t - d[None, :] + GEO_MARGIN).clamp(min=0).flatten()])
    return costs.mean()


def distill(fi, ft, scale, teacher, temp):
    ti, tt, tls = teacher
    student = scale * fi @ ft.T / temp
    tlog = (tls.exp() * ti @ tt.T / temp).detach()
    kl = lambda t, s: F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True)
    return temp * temp * 0.5 * (kl(tlog, student) + kl(tlog.T, student.T))


def albef(fi, ft, scale, teacher, alpha):
    ti, tt, _ = teacher
    sim_i2t = scale * fi @ ft.T
    sim_t2i = scale * ft @ fi.T
    with torch.no_grad():
        s = scale.detach()
        eye = torch.eye(fi.shape[0])
        i2t_targets = alpha * F.softmax(s * ti @ tt.T, dim=1) + (1 - alpha) * eye
        t2i_targets = alpha * F.softmax(s * tt @ ti.T, dim=1) + (1 - alpha) * eye
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


OBJECTIVES = {
    "daa": lambda fi, ft, sc: daa(fi, ft, sc),
    "triplet_max": lambda fi, ft, sc: triplet(fi, ft, "max"),
    "triplet_sum": lambda fi, ft, sc: triplet(fi, ft, "sum"),
    "geometric": lambda fi, ft, sc: geometric(fi, ft),
}
DISTILL = {"distill_t1": 1.0, "distill_t2": 2.0}


def case(name, img, txt, log_scale, out):
    for oname, fn in OBJECTIVES.items():
        i = img.clone().float().requires_grad_(True)
        t = txt.clone().float().requires_grad_(True)
        s = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
        loss = fn(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s.exp())
        loss.backward()
        p = f"{name}.{oname}."
        out[p + "loss"] = loss.detach().reshape(1)
        out[p + "grad_image"] = i.grad if i.grad is not None else torch.zeros_like(i)
        out[p + "grad_text"] = t.grad if t.grad is not None else torch.zeros_like(t)
        out[p + "grad_log_scale"] = (s.grad if s.grad is not None else torch.zeros(())).reshape(1)
    # A teacher: other features of the same batch, partly agreeing.
    g = torch.Generator().manual_seed(img.shape[0] * 1000 + img.shape[1])
    t_img = F.normalize(img + 0.7 * torch.randn(img.shape, generator=g), dim=-1)
    t_txt = F.normalize(txt + 0.7 * torch.randn(txt.shape, generator=g), dim=-1)
    t_ls = torch.tensor(3.0)
    for oname, temp in DISTILL.items():
        i = img.clone().float().requires_grad_(True)
        t = txt.clone().float().requires_grad_(True)
        s = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
        loss = distill(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s.exp(), (t_img, t_txt, t_ls), temp)
        loss.backward()
        p = f"{name}.{oname}."
        out[p + "loss"] = loss.detach().reshape(1)
        out[p + "grad_image"] = i.grad
        out[p + "grad_text"] = t.grad
        out[p + "grad_log_scale"] = s.grad.reshape(1)
    i = img.clone().float().requires_grad_(True)
    t = txt.clone().float().requires_grad_(True)
    s = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
    loss = albef(F.normalize(i, dim=-1), F.normalize(t, dim=-1), s.exp(), (t_img, t_txt, t_ls), 0.4)
    loss.backward()
    p = f"{name}.albef."
    out[p + "loss"] = loss.detach().reshape(1)
    out[p + "grad_image"], out[p + "grad_text"] = i.grad, t.grad
    out[p + "grad_log_scale"] = s.grad.reshape(1)
    # The feature-level term: weight 0.7, through a projection W.
    W = torch.randn(img.shape[1], img.shape[1], generator=g) * 0.3 + torch.eye(img.shape[1])
    i = img.clone().float().requires_grad_(True)
    t = txt.clone().float().requires_grad_(True)
    s = torch.tensor(log_scale, dtype=torch.float32, requires_grad=True)
    w = W.clone().requires_grad_(True)
    fi, ft = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
    gap = lambda x, tt: (1 - ((x @ w.T) * tt).sum(1) / (x @ w.T).norm(dim=1)).mean()
    loss = distill(fi, ft, s.exp(), (t_img, t_txt, t_ls), 1.0) + 0.7 * 0.5 * (gap(fi, t_img) + gap(ft, t_txt))
    loss.backward()
    p = f"{name}.distill_feature."
    out[p + "loss"] = loss.detach().reshape(1)
    out[p + "grad_image"], out[p + "grad_text"] = i.grad, t.grad
    out[p + "grad_log_scale"] = s.grad.reshape(1)
    out[p + "grad_projection"] = w.grad
    out[name + ".distill_projection"] = W
    out[name + ".teacher_image"] = t_img.float()
    out[name + ".teacher_text"] = t_txt.float()
    out[name + ".teacher_log_scale"] = t_ls.reshape(1).float()
    out[name + ".image"] = img.float()
    out[name + ".text"] = txt.float()
    out[name + ".log_scale"] = torch.tensor([log_scale], dtype=torch.float32)


def random_pair(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(b, d, generator=g)
    txt = torch.randn(b, d, generator=g) + 0.5 * img  # positives somewhat aligned
    return img, txt


def ewc_case(out):
    """EWC's penalty lambda/2 * sum F (theta - theta*)^2 over two parameters."""
    g = torch.Generator().manual_seed(21)
    lam = 7.5
    total = 0
    params = {}
    for name, shape in (("a.weight", (3, 4)), ("b.bias", (5,))):
        theta = torch.randn(shape, generator=g).requires_grad_(True)
        star = torch.randn(shape, generator=g)
        fisher = torch.rand(shape, generator=g)
        total = total + (fisher * (theta - star) ** 2).sum()
        params[name] = (theta, star, fisher)
    loss = lam / 2 * total
    loss.backward()
    out["ewc.lambda"] = torch.tensor([lam])
    out["ewc.loss"] = loss.detach().reshape(1)
    for name, (theta, star, fisher) in params.items():
        out[f"ewc.param.{name}"] = theta.detach()
        out[f"ewc.theta.{name}"] = star
        out[f"ewc.fisher.{name}"] = fisher
        out[f"ewc.grad.{name}"] = theta.grad


class ReverseGrad(torch.autograd.Function):
    """Gradient reversal (Ganin & Lempitsky 2015): identity, gradient * -s."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.s * g, None


def spectral(w, u):
    """torch's spectral_norm in training mode: one power iteration from u."""
    with torch.no_grad():
        v = F.normalize(w.T @ u, dim=0, eps=1e-12)
        u = F.normalize(w @ v, dim=0, eps=1e-12)
    return w / torch.dot(u, w @ v)


def adversarial_case(name, img, txt, hidden, seed, out):
    """A one-hidden-layer ReLU discriminator on the normalised features;
    settings: bce, wgan, wgan + gradient penalty, each optionally spectral."""
    g = torch.Generator().manual_seed(seed)
    dim = img.shape[1]
    w1 = torch.randn(hidden, dim, generator=g) * 0.5
    b1 = torch.randn(hidden, generator=g) * 0.1
    w2 = torch.randn(1, hidden, generator=g) * 0.5
    b2 = torch.randn(1, generator=g) * 0.1
    u1 = F.normalize(torch.randn(hidden, generator=g), dim=0)
    u2 = torch.ones(1)
    eps = torch.rand(img.shape[0], generator=g)
    out[f"{name}.adv.w1"], out[f"{name}.adv.b1"], out[f"{name}.adv.w2"], out[f"{name}.adv.b2"] = w1, b1, w2, b2
    out[f"{name}.adv.u1"], out[f"{name}.adv.u2"], out[f"{name}.adv.eps"] = u1, u2, eps
    settings = {"bce": ("bce", 0.0, False), "wgan": ("wgan", 0.0, False), "wgan_gp": ("wgan", 10.0, False),
                "bce_sn": ("bce", 0.0, True), "wgan_gp_sn": ("wgan", 10.0, True)}
    for sname, (kind, gp, sn) in settings.items():
        i = img.clone().requires_grad_(True)
        t = txt.clone().requires_grad_(True)
        P = [p.clone().requires_grad_(True) for p in (w1, b1, w2, b2)]
        ew1 = spectral(P[0], u1) if sn else P[0]
        ew2 = spectral(P[2], u2) if sn else P[2]
        disc = lambda x: (F.relu(x @ ew1.T + P[1]) @ ew2.T + P[3]).squeeze(1)
        fi, ft = F.normalize(i, dim=-1), F.normalize(t, dim=-1)
        di, dt = disc(ReverseGrad.apply(fi, 0.7)), disc(ReverseGrad.apply(ft, 0.7))
        if kind == "bce":
            loss = 0.5 * (F.binary_cross_entropy_with_logits(di, torch.ones_like(di))
                          + F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt)))
        else:
            loss = dt.mean() - di.mean()
        if gp > 0:
            xh = (eps[:, None] * fi + (1 - eps[:, None]) * ft).detach().requires_grad_(True)
            grad = torch.autograd.grad(disc(xh).sum(), xh, create_graph=True)[0]
            loss = loss + gp * ((grad.norm(2, dim=1) - 1) ** 2).mean()
        loss.backward()
        p = f"{name}.adv_{sname}."
        out[p + "loss"] = loss.detach().reshape(1)
        out[p + "grad_image"], out[p + "grad_text"] = i.grad, t.grad
        for k, q in zip(("w1", "b1", "w2", "b2"), P):
            out[p + "grad_" + k] = q.grad


def main():
    out = {}
    adversarial_case("b8_d16", *random_pair(8, 16, 11), 6, 31, out)
    adversarial_case("b1_d8", *random_pair(1, 8, 14), 5, 32, out)
    ewc_case(out)
    case("b8_d16", *random_pair(8, 16, 11), 2.659260036932778, out)
    case("b16_d32", *random_pair(16, 32, 12), 4.6052, out)
    case("b3_d8", *random_pair(3, 8, 13), 1.0, out)  # fewer negatives than the geometric k
    case("b1_d8", *random_pair(1, 8, 14), 0.0, out)  # a batch of one
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(15))
    case("identical_b4_d8", row.repeat(4, 1), row.repeat(4, 1) * 2.0, 2.0, out)
    # Uniform DAA weights: images on orthogonal axes, texts symmetric about them.
    case("uniform_b4_d4", torch.eye(4) * 3.0, torch.eye(4) + 0.25, 2.0, out)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, OUT)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()

//! A contrastive step across ranks: open_clip's `--gather-with-grad` (and
//! `--local-loss`), written as a two-stage backward since candle has no
//! collective operation in its graph.
//!
//! 1. Each rank embeds its share of the global batch (micro-batch by
//!    micro-batch without a graph under `accum_freq`).
//! 2. The features of every rank are gathered; the loss is taken on them as
//!    leaves (the whole global batch's, or with `local_loss` this rank's
//!    rows'), and its backward gives the gradient of the loss with respect
//!    to every feature, and to the temperature and bias directly.
//! 3. With gather-with-grad, those feature gradients are summed over ranks
//!    (what the backward of `torch.distributed.nn.all_gather` does): every
//!    rank's loss reaches this rank's features. Without it, only this
//!    rank's own loss does, as open_clip without the flag.
//! 4. This rank's rows of that gradient flow back through its towers
//!    (`sum(features ⊙ gradient)`), micro-batch by micro-batch.
//! 5. All gradients are averaged over ranks (DDP), the loss with them.
//!
//! With gather-with-grad the result is the one-process gradient of the
//! global batch exactly, global or local loss alike.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::{all_reduce_grads, gather_rows, Collective};
use crate::objectives::{Batch, Objective, Teacher};
use crate::step::{add_grads, micro_features, teacher_view, Inputs};
use crate::{Error, Result};

/// The ranks, and how features cross them (open_clip's flags).
#[derive(Clone, Copy)]
pub struct Gather<'a> {
    pub group: &'a dyn Collective,
    /// The gathered features carry their gradient back to their rank.
    pub with_grad: bool,
    /// Each rank takes the loss of its own rows against the global batch.
    pub local_loss: bool,
}

/// The global batch's loss (averaged over ranks) and the averaged gradients
/// of `vars`, this rank holding the rows `x` of it. Runs in grad mode. One
/// process alone takes the one-process step ([`crate::step`]).
pub fn contrastive_grads(
    model: &clasp_core::model::Model,
    objective: &dyn Objective,
    x: &Inputs,
    bias: Option<&Var>,
    vars: &[(String, Var)],
    accum: usize,
    gather: Gather,
) -> Result<(f64, GradStore)> {
    let c = gather.group;
    if c.world() == 1 {
        return crate::step::contrastive_grads(model, objective, x, bias, vars, accum);
    }
    let _mode = clasp_core::model::grad_mode_guard(true);
    let n = x.ids.dim(0)?;
    let k = accum.clamp(1, n.max(1));
    let bounds: Vec<(usize, usize)> = (0..k).map(|j| (j * n / k, (j + 1) * n / k)).collect();
    let micro = |r: (usize, usize)| micro_features(model, x, r);
    // 1. This rank's features; with one micro-batch the graph is kept.
    let mut kept: Option<(Tensor, Tensor)> = None;
    let (img, txt) = if k == 1 {
        let (i, t) = micro((0, n))?;
        let d = (i.detach(), t.detach());
        kept = Some((i, t));
        d
    } else {
        let mut is = Vec::with_capacity(k);
        let mut ts = Vec::with_capacity(k);
        for &r in &bounds {
            let (i, t) = micro(r)?;
            is.push(i.detach());
            ts.push(t.detach());
        }
        (Tensor::cat(&is, 0)?, Tensor::cat(&ts, 0)?)
    };
    // 2. Every rank's features as leaves, and the loss on them.
    let (all_img, at) = gather_rows(c, &img)?;
    let (all_txt, _) = gather_rows(c, &txt)?;
    let tv = match &x.teacher {
        Some(t) => {
            let (ti, tt, ls) = teacher_view(t, x.images)?;
            Some((gather_rows(c, &ti)?.0, gather_rows(c, &tt)?.0, ls))
        }
        None => None,
    };
    let gi = Var::from_tensor(&all_img)?;
    let gt = Var::from_tensor(&all_txt)?;
    let b = Batch {
        image: gi.as_tensor(),
        text: gt.as_tensor(),
        log_scale: model.logit_scale(),
        bias: bias.map(|b| b.as_tensor()),
        teacher: tv.as_ref().map(|(image, text, log_scale)| Teacher {
            image,
            text,
            log_scale,
        }),
    };
    let loss = if gather.local_loss {
        objective.local_loss(&b, at..at + n).ok_or_else(|| {
            Error::Report(format!(
                "--local-loss: the objective `{}` has no local form (infonce and siglip have)",
                objective.name()
            ))
        })??
    } else {
        objective.loss(&b)?
    };
    let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let mut head = loss.backward()?;
    // 3. The features' gradient, summed over ranks with gather-with-grad.
    let feature_grad = |g: Option<&Tensor>, like: &Tensor| -> Result<Tensor> {
        let g = match g {
            Some(g) => g.clone(),
            None => like.zeros_like()?,
        };
        if !gather.with_grad {
            return Ok(g);
        }
        let mut buf = g.flatten_all()?.to_vec1::<f32>()?;
        c.all_reduce_sum(&mut buf)?;
        Ok(Tensor::from_vec(buf, g.shape(), g.device())?)
    };
    let d_img = feature_grad(head.get(gi.as_tensor()), &all_img)?.narrow(0, at, n)?;
    let d_txt = feature_grad(head.get(gt.as_tensor()), &all_txt)?.narrow(0, at, n)?;
    // 4. Through this rank's towers, micro-batch by micro-batch.
    let mut total: Option<GradStore> = None;
    for (j, &(a, e)) in bounds.iter().enumerate() {
        let (i, t) = match (j, kept.take()) {
            (0, Some(f)) => f,
            _ => micro((a, e))?,
        };
        let s = ((i * d_img.narrow(0, a, e - a)?)?.sum_all()?
            + (t * d_txt.narrow(0, a, e - a)?)?.sum_all()?)?;
        let g = s.backward()?;
        total = Some(match total {
            None => g,
            Some(acc) => add_grads(acc, &g, vars)?,
        });
    }
    let mut total = total.expect("at least one micro-batch");
    // The temperature's and bias's gradients come from the loss itself.
    for (_, v) in vars {
        if let Some(g) = head.remove(v.as_tensor()) {
            let sum = match total.get(v.as_tensor()) {
                Some(a) => (a + g)?,
                None => g,
            };
            total.insert(v.as_tensor(), sum);
        }
    }
    // 5. Averaged over ranks; the loss rides along.
    let mut extra = [loss_value as f32];
    all_reduce_grads(c, vars, &mut total, &mut extra)?;
    // A global loss is the same on every rank; local ones are averaged.
    let loss = if gather.local_loss {
        extra[0] as f64 / c.world() as f64
    } else {
        loss_value
    };
    Ok((loss, total))
}

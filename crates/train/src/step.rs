//! One contrastive step's loss and gradients, optionally accumulated over
//! micro-batches with cached features (open_clip's `accum_freq`).
//!
//! With accumulation, a first pass embeds every micro-batch without keeping
//! the graph; then each micro-batch is embedded again with the graph, put in
//! place of its cached features, and the full-batch loss is backpropagated.
//! Summed over micro-batches this is exactly the full-batch gradient, at the
//! memory of one micro-batch. One deliberate difference from open_clip: the
//! temperature (and SigLIP bias) take part in the graph of the first
//! micro-batch only, so their gradient is the full-batch one too (open_clip
//! counts it once per micro-batch).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use super::objectives::{Batch, Objective, Teacher};
use crate::Result;
use clasp_core::model::{l2_normalize, Model};

/// A batch's images as the image side takes them.
#[derive(Clone, Debug)]
pub enum Images {
    /// Prepared pixels [B, C, S, S].
    Pixels(Tensor),
    /// The locked image tower's pooled outputs [B, C], computed once per
    /// run ([`super::feature_cache`]).
    Pooled(Tensor),
}

impl Images {
    /// Rows [a, a + len).
    pub(crate) fn narrow(&self, a: usize, len: usize) -> Result<Self> {
        Ok(match self {
            Images::Pixels(t) => Images::Pixels(t.narrow(0, a, len)?),
            Images::Pooled(t) => Images::Pooled(t.narrow(0, a, len)?),
        })
    }
}

/// One batch of inputs: images, token ids and mask [B, T].
pub struct Inputs<'a> {
    pub images: &'a Images,
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
    pub locked: Locked<'a>,
    /// A frozen teacher with the batch's texts in its own tokenization.
    pub teacher: Option<TeacherInputs<'a>>,
}

/// A distillation teacher: a loaded model (run without a graph on the
/// inference kernels) and the batch's token ids and mask from its tokenizer.
/// Pixels are shared with the student (the trainer checks that the two
/// preprocess alike).
#[derive(Clone, Copy)]
pub struct TeacherInputs<'a> {
    pub model: &'a Model,
    pub ids: &'a Tensor,
    pub mask: &'a Tensor,
}

/// The teacher's normalised features of the whole batch and its log scale.
/// Cached pooled images (a locked image tower) go through the teacher's own
/// projection: that is the momentum towers' view, whose image tower is the
/// locked one (a distillation teacher never meets a cache).
pub(crate) fn teacher_view(t: &TeacherInputs, images: &Images) -> Result<(Tensor, Tensor, Tensor)> {
    let _mode = clasp_core::model::grad_mode_guard(false);
    let img = match images {
        Images::Pixels(px) => t.model.image_features(px)?,
        Images::Pooled(p) => t.model.project_image(p)?,
    };
    Ok((
        l2_normalize(&img)?.detach(),
        l2_normalize(&t.model.text_features(t.ids, t.mask)?)?.detach(),
        t.model.logit_scale().detach(),
    ))
}

/// Frozen towers (LiT). A locked tower's output comes from the model given
/// here, an inference snapshot (`Trainable::snapshot`; valid for the whole
/// run, since a locked tower never changes), without a graph and on the fast
/// inference kernels; only what is above it learns. The training model itself
/// must not run outside grad mode: its inference kernels hold q/k/v copies
/// made before the checkpoint's values were loaded.
#[derive(Clone, Copy, Default)]
pub struct Locked<'a> {
    pub image: Option<&'a Model>,
    pub text: Option<&'a Model>,
}

/// A tower's pooled output: from the training model with its graph, or, when
/// locked, from the frozen snapshot without one.
fn pooled(
    frozen: Option<&Model>,
    model: &Model,
    f: impl Fn(&Model) -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(frozen) = frozen else {
        return f(model);
    };
    let _mode = clasp_core::model::grad_mode_guard(false);
    Ok(f(frozen)?.detach())
}

pub(crate) fn features(
    model: &Model,
    images: &Images,
    ids: &Tensor,
    mask: &Tensor,
    locked: Locked,
) -> Result<(Tensor, Tensor)> {
    // A locked tower's snapshot runs in f32; the projections in the model's
    // dtype (bf16 under mixed precision).
    let dt = model.param_dtype()?;
    let img = match images {
        Images::Pooled(p) => p.detach().to_dtype(dt)?,
        Images::Pixels(px) => pooled(locked.image, model, |m| {
            m.image_pooled(&px.to_dtype(m.param_dtype()?)?)
        })?
        .to_dtype(dt)?,
    };
    let txt = pooled(locked.text, model, |m| m.text_pooled(ids, mask))?.to_dtype(dt)?;
    // The loss runs in f32 whatever the towers computed in (mixed precision).
    let f32 = |t: Tensor| t.to_dtype(DType::F32);
    Ok((
        l2_normalize(&f32(model.project_image(&img)?)?)?,
        l2_normalize(&f32(model.project_text(&txt)?)?)?,
    ))
}

/// The features of rows [a, b) of the batch (all of it: no narrowing).
pub(crate) fn micro_features(
    model: &Model,
    x: &Inputs,
    (a, b): (usize, usize),
) -> Result<(Tensor, Tensor)> {
    if (a, b) == (0, x.ids.dim(0)?) {
        return features(model, x.images, x.ids, x.mask, x.locked);
    }
    let part = |t: &Tensor| t.narrow(0, a, b - a);
    features(
        model,
        &x.images.narrow(a, b - a)?,
        &part(x.ids)?,
        &part(x.mask)?,
        x.locked,
    )
}

/// The loss of the batch and the gradients of `vars`, accumulated over
/// `accum` micro-batches (1: one pass). Runs in grad mode.
pub fn contrastive_grads(
    model: &Model,
    objective: &dyn Objective,
    x: &Inputs,
    bias: Option<&Var>,
    vars: &[(String, Var)],
    accum: usize,
) -> Result<(f64, GradStore)> {
    let _mode = clasp_core::model::grad_mode_guard(true);
    run(model, objective, x, bias, vars, accum.max(1))
}

fn run(
    model: &Model,
    objective: &dyn Objective,
    x: &Inputs,
    bias: Option<&Var>,
    vars: &[(String, Var)],
    accum: usize,
) -> Result<(f64, GradStore)> {
    let n = x.ids.dim(0)?;
    let scalar = |l: &Tensor| -> Result<f64> { Ok(l.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let tv = match &x.teacher {
        Some(t) => Some(teacher_view(t, x.images)?),
        None => None,
    };
    let teacher = tv.as_ref().map(|(image, text, log_scale)| Teacher {
        image,
        text,
        log_scale,
    });
    if accum == 1 || n < 2 {
        let (img, txt) = features(model, x.images, x.ids, x.mask, x.locked)?;
        let b = Batch {
            image: &img,
            text: &txt,
            log_scale: model.logit_scale(),
            bias: bias.map(|b| b.as_tensor()),
            teacher,
        };
        let l = objective.loss(&b)?;
        return Ok((scalar(&l)?, l.backward()?));
    }
    let k = accum.min(n);
    let bounds: Vec<(usize, usize)> = (0..k).map(|j| (j * n / k, (j + 1) * n / k)).collect();
    // The features of the micro-batch of rows [a, b).
    let micro = |r: (usize, usize)| micro_features(model, x, r);
    // 1. Cached features, no graph kept.
    let mut cached: Vec<(Tensor, Tensor)> = Vec::with_capacity(k);
    for &r in &bounds {
        let (i, t) = micro(r)?;
        cached.push((i.detach(), t.detach()));
    }
    // 2. Each micro-batch with its graph, in place of its cached features.
    let mut total: Option<GradStore> = None;
    let mut loss = 0.0;
    for (j, &r) in bounds.iter().enumerate() {
        let (ij, tj) = micro(r)?;
        let imgs: Vec<&Tensor> = (0..k)
            .map(|q| if q == j { &ij } else { &cached[q].0 })
            .collect();
        let txts: Vec<&Tensor> = (0..k)
            .map(|q| if q == j { &tj } else { &cached[q].1 })
            .collect();
        let (img, txt) = (Tensor::cat(&imgs, 0)?, Tensor::cat(&txts, 0)?);
        let (ls, bs) = if j == 0 {
            (
                model.logit_scale().clone(),
                bias.map(|b| b.as_tensor().clone()),
            )
        } else {
            (
                model.logit_scale().detach(),
                bias.map(|b| b.as_tensor().detach()),
            )
        };
        let b = Batch {
            image: &img,
            text: &txt,
            log_scale: &ls,
            bias: bs.as_ref(),
            teacher,
        };
        let l = objective.loss(&b)?;
        if j == 0 {
            loss = scalar(&l)?;
        }
        let g = l.backward()?;
        total = Some(match total {
            None => g,
            Some(acc) => add_grads(acc, &g, vars)?,
        });
    }
    Ok((loss, total.expect("at least one micro-batch")))
}

/// `acc` plus `g`, var by var (a var in only one of them keeps its gradient).
pub(crate) fn add_grads(
    mut acc: GradStore,
    g: &GradStore,
    vars: &[(String, Var)],
) -> Result<GradStore> {
    for (_, v) in vars {
        if let Some(gv) = g.get(v.as_tensor()) {
            let sum = match acc.get(v.as_tensor()) {
                Some(a) => (a + gv)?,
                None => gv.clone(),
            };
            acc.insert(v.as_tensor(), sum);
        }
    }
    Ok(acc)
}

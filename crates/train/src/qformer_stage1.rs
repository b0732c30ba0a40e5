//! BLIP-2's stage-1 objectives on a Q-Former with its retrieval heads, as
//! LAVIS's `Blip2Qformer.forward` computes them (its `image_id` path, which
//! is the label-smoothed cross-entropy when every photo in the batch is
//! distinct):
//!
//! - **ITC**: each photo's query embeddings against each caption's [CLS]
//!   embedding, the best query's cosine divided by the learnable temperature;
//!   targets 0.9 · (the row's same-photo pairs, shared) + 0.1 / B, both ways.
//! - **ITM**: the matching head on the positive pairs, on each caption with
//!   a hard negative photo and on each photo with a hard negative caption;
//!   the negatives are drawn from the ITC softmax with same-photo pairs
//!   masked, so a duplicate photo is never a caption's negative.
//!
//! ITG (the Q-Former's captioning loss) is not here yet.

use candle_core::{DType, Tensor, D};
use clasp_core::model::qformer::QFormerHeads;

use crate::{Error, Result};

/// The two losses of one batch, with what the hard negatives came from.
pub struct Stage1 {
    pub itc: Tensor,
    pub itm: Tensor,
    /// Softmax weights of the negatives: per caption over photos, per photo
    /// over captions [B, B] (same-photo pairs at 0).
    pub weights_t2i: Vec<Vec<f32>>,
    pub weights_i2t: Vec<Vec<f32>>,
    /// Each caption's negative photo, each photo's negative caption.
    pub neg_image: Vec<usize>,
    pub neg_text: Vec<usize>,
    /// The ITM logits [3B, 2]: positives, captions with negative photos,
    /// photos with negative captions.
    pub itm_logits: Tensor,
}

/// Draws an index from weights that sum to 1 (a caption's or a photo's
/// negatives).
pub type Draw<'a> = &'a mut dyn FnMut(&[f32]) -> usize;

/// ITC and ITM of a batch: `image` [B, P, E] the vision tower's features of
/// each row's photo, `image_ids` which photo each row is (equal ids: the
/// same photo), `ids`/`mask` [B, L] the captions, `temp` the temperature (a
/// scalar the loss divides by).
pub fn itc_itm(
    heads: &QFormerHeads,
    image: &Tensor,
    image_ids: &[usize],
    ids: &Tensor,
    mask: &Tensor,
    temp: &Tensor,
    draw: Draw,
) -> Result<Stage1> {
    let b = ids.dim(0)?;
    if b < 2 || image.dim(0)? != b || image_ids.len() != b {
        return Err(Error::Report(format!(
            "BLIP-2's stage 1 needs a batch of at least 2 photo-caption rows, got {b} captions, {} photos and {} photo ids",
            image.dim(0)?,
            image_ids.len()
        )));
    }
    let dev = ids.device();
    let image_feats = heads.image_embeds(image)?;
    let text_feat = heads.text_embeds(ids, mask)?;
    let sim_i2t = QFormerHeads::itc(&image_feats, &text_feat)?.broadcast_div(temp)?;
    let sim_t2i = sim_i2t.t()?.contiguous()?;
    let same: Vec<f32> = (0..b * b)
        .map(|k| f32::from(image_ids[k / b] == image_ids[k % b]))
        .collect();
    let same = Tensor::from_vec(same, (b, b), dev)?;
    let share = same.broadcast_div(&same.sum_keepdim(1)?)?;
    let targets = ((share * 0.9)? + 0.1 / b as f64)?;
    let ce = |s: &Tensor| -> Result<Tensor> {
        let lsm = candle_nn::ops::log_softmax(s, D::Minus1)?;
        Ok((lsm * &targets)?
            .sum_all()?
            .neg()?
            .affine(1.0 / b as f64, 0.0)?)
    };
    let itc = ((ce(&sim_i2t)? + ce(&sim_t2i)?)? * 0.5)?;

    // Hard negatives, without a graph: same-photo pairs at -10000.
    let weights = |s: &Tensor| -> Result<Vec<Vec<f32>>> {
        let masked = (s.detach() + (&same * -10000.0)?)?;
        Ok(candle_nn::ops::softmax(&masked, D::Minus1)?.to_vec2()?)
    };
    let (weights_t2i, weights_i2t) = (weights(&sim_t2i)?, weights(&sim_i2t)?);
    let neg_image: Vec<usize> = weights_t2i.iter().map(|w| draw(w)).collect();
    let neg_text: Vec<usize> = weights_i2t.iter().map(|w| draw(w)).collect();
    let index = |v: &[usize]| Tensor::from_vec(v.iter().map(|&i| i as u32).collect(), v.len(), dev);
    let (ni, nt) = (index(&neg_image)?, index(&neg_text)?);
    let ids_all = Tensor::cat(&[ids, ids, &ids.index_select(&nt, 0)?], 0)?;
    let mask_all = Tensor::cat(&[mask, mask, &mask.index_select(&nt, 0)?], 0)?;
    let images_all = Tensor::cat(&[image, &image.index_select(&ni, 0)?, image], 0)?;
    let itm_logits = heads.itm(&images_all, &ids_all, &mask_all)?;
    let labels: Vec<u32> = (0..3 * b).map(|k| u32::from(k < b)).collect();
    let labels = Tensor::from_vec(labels, 3 * b, dev)?;
    let itm = candle_nn::loss::cross_entropy(&itm_logits.to_dtype(DType::F32)?, &labels)?;
    Ok(Stage1 {
        itc,
        itm,
        weights_t2i,
        weights_i2t,
        neg_image,
        neg_text,
        itm_logits,
    })
}

/// Draws from `w` with the run's generator, by inverse CDF (the first index
/// whose running sum passes a uniform draw; a zero weight is never drawn).
pub fn draw_with(rng: &mut clasp_common::rng::Rng) -> impl FnMut(&[f32]) -> usize + '_ {
    move |w: &[f32]| {
        let u = rng.uniform() * w.iter().sum::<f32>();
        let mut acc = 0.0;
        for (i, &x) in w.iter().enumerate() {
            acc += x;
            if u < acc && x > 0.0 {
                return i;
            }
        }
        w.iter().rposition(|&x| x > 0.0).unwrap_or(0)
    }
}

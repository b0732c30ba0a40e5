//! `Blip2ForImageTextRetrieval`'s heads over the Q-Former (ITC and ITM), and
//! the captioning head of BLIP-2's stage 1 (ITG), which transformers does not
//! carry: LAVIS's `BertLMHeadModel` head under its names, `cls.predictions.*`.

use candle_core::{DType, Tensor, D};
use candle_nn::VarBuilder;

use super::{activate, l2_normalize, Activation, LayerNorm, Linear, QFormer, QFormerConfig};
use crate::{Error, Result};

/// `Blip2ForImageTextRetrieval` without its vision tower: the query tokens,
/// the Q-Former, the text embeddings, and the ITC and ITM heads.
#[derive(Debug, Clone)]
pub struct QFormerHeads {
    pub qformer: QFormer,
    query_tokens: Tensor,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    vision_projection: Linear,
    text_projection: Linear,
    itm_head: Linear,
    /// The captioning head, when the checkpoint has one (`cls.predictions.*`).
    pub itg: Option<ItgHead>,
}

/// BERT's LM head as LAVIS's Q-Former carries it: dense, the activation,
/// LayerNorm, then the word embeddings (tied) and a bias.
#[derive(Debug, Clone)]
pub struct ItgHead {
    dense: Linear,
    norm: LayerNorm,
    bias: Tensor,
    act: Activation,
}

/// The label smoothing of BLIP-2's captioning loss (LAVIS's `BertLMHeadModel`).
pub const ITG_LABEL_SMOOTHING: f64 = 0.1;

impl QFormerHeads {
    /// `vb` points at the model's root; `num_query_tokens` and
    /// `image_text_hidden_size` come from the `Blip2Config`.
    pub fn load(
        vb: VarBuilder,
        cfg: &QFormerConfig,
        num_query_tokens: usize,
        image_text_hidden_size: usize,
    ) -> Result<Self> {
        if !cfg.use_qformer_text_input {
            return Err(Error::Report(
                "an ITM/ITC model needs a Q-Former with a text feed-forward (use_qformer_text_input: true)".into(),
            ));
        }
        let h = cfg.hidden_size;
        let emb = vb.pp("embeddings");
        Ok(Self {
            qformer: QFormer::load(vb.pp("qformer"), cfg)?,
            query_tokens: vb.get((1, num_query_tokens, h), "query_tokens")?,
            word_embeddings: emb.get((cfg.vocab_size, h), "word_embeddings.weight")?,
            position_embeddings: emb.get(
                (cfg.max_position_embeddings, h),
                "position_embeddings.weight",
            )?,
            vision_projection: Linear::load(
                vb.pp("vision_projection"),
                h,
                image_text_hidden_size,
                true,
            )?,
            text_projection: Linear::load(
                vb.pp("text_projection"),
                h,
                image_text_hidden_size,
                true,
            )?,
            itm_head: Linear::load(vb.pp("itm_head"), h, 2, true)?,
            itg: if vb.contains_tensor("cls.predictions.bias") {
                let p = vb.pp("cls.predictions");
                Some(ItgHead {
                    dense: Linear::load(p.pp("transform.dense"), h, h, true)?,
                    norm: LayerNorm::load(p.pp("transform.LayerNorm"), h, cfg.layer_norm_eps)?,
                    bias: p.get(cfg.vocab_size, "bias")?,
                    act: cfg.hidden_act,
                })
            } else {
                None
            },
        })
    }

    /// BLIP-2's captioning loss (ITG) of image features [B, P, E] and their
    /// captions [B, L] (0/1 mask): each caption's first token becomes `bos`
    /// (the tokenizer's [DEC]); the queries read the photo and one another,
    /// the caption reads the queries and its own earlier tokens; the LM head
    /// predicts each next token, cross-entropy with label smoothing 0.1 over
    /// the real tokens. Returns the loss and the logits [B, L, vocab].
    pub fn itg_loss(
        &self,
        image: &Tensor,
        ids: &Tensor,
        mask: &Tensor,
        bos: u32,
    ) -> Result<(Tensor, Tensor)> {
        let head = self.itg.as_ref().ok_or_else(|| {
            Error::Report("this checkpoint has no captioning head (cls.predictions.*)".into())
        })?;
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let n = self.num_query_tokens();
        let mut dec = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        for row in &mut dec {
            row[0] = bos;
        }
        let dec = Tensor::new(dec, dev)?;
        let h = self.query_tokens.dim(2)?;
        let q = self.query_tokens.broadcast_as((b, n, h))?;
        let embeds = Tensor::cat(&[&q, &self.text_embeddings(&dec)?], 1)?;
        // Rows: queries see the queries; a text token sees the queries and
        // the real text tokens up to itself.
        let keep: Vec<f32> = mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let t = n + l;
        let mut allowed = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let ok = if j < n {
                        true
                    } else {
                        i >= n && j <= i && keep[bi * l + (j - n)] > 0.0
                    };
                    allowed[(bi * t + i) * t + j] = f32::from(ok);
                }
            }
        }
        let allowed = Tensor::from_vec(allowed, (b, 1, t, t), dev)?;
        let add = ((1.0 - allowed)? * f32::MIN as f64)?;
        let x = self
            .qformer
            .forward_additive(&embeds, n, Some(&add), Some(image))?;
        let text = x.narrow(1, n, l)?;
        let z = activate(&head.dense.forward(&text)?, head.act)?;
        let z = head.norm.forward(&z)?;
        let logits = z
            .broadcast_matmul(&self.word_embeddings.t()?)?
            .broadcast_add(&head.bias)?;
        // Next-token targets: positions 0..L-1 predict tokens 1..L.
        let v = logits.dim(2)?;
        let pred = logits.narrow(1, 0, l - 1)?.reshape((b * (l - 1), v))?;
        let lsm = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
        let targets = ids
            .to_dtype(DType::U32)?
            .narrow(1, 1, l - 1)?
            .flatten_all()?;
        let real = mask
            .to_dtype(DType::F32)?
            .narrow(1, 1, l - 1)?
            .flatten_all()?;
        let nll = lsm.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?;
        let smooth = lsm.mean(1)?.neg()?;
        let e = ITG_LABEL_SMOOTHING;
        let per = ((nll * (1.0 - e))? + (smooth * e)?)?;
        let count = real.sum_all()?;
        let loss = (per * &real)?.sum_all()?.broadcast_div(&count)?;
        Ok((loss, logits))
    }

    /// The learned queries [1, N, H].
    pub fn query_tokens(&self) -> &Tensor {
        &self.query_tokens
    }

    pub fn num_query_tokens(&self) -> usize {
        self.query_tokens.dim(1).unwrap_or(0)
    }

    /// `Blip2TextEmbeddings`: word embeddings plus positions 0.. for ids [B, L].
    fn text_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let max = self.position_embeddings.dim(0)?;
        if l > max {
            return Err(Error::Shape(format!(
                "a text of {l} tokens is longer than the Q-Former's {max} positions"
            )));
        }
        let h = self.word_embeddings.dim(1)?;
        let words = self
            .word_embeddings
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, h))?;
        Ok(words.broadcast_add(&self.position_embeddings.narrow(0, 0, l)?.unsqueeze(0)?)?)
    }

    /// The ITC image side: each query's L2-normalised projection [B, N, D].
    pub fn image_embeds(&self, image: &Tensor) -> Result<Tensor> {
        let q = self.qformer.queries(&self.query_tokens, image)?;
        l2_normalize(&self.vision_projection.forward(&q)?)
    }

    /// The ITC text side: the first token's L2-normalised projection [B, D]
    /// for ids [B, L] with their 0/1 mask.
    pub fn text_embeds(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self.text_states(ids, mask)?;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        l2_normalize(&self.text_projection.forward(&cls)?)
    }

    /// The Q-Former's last hidden states [B, L, H] of texts alone (no
    /// queries, no image): a BERT encoder's reading of them.
    pub fn text_states(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.qformer
            .forward(&self.text_embeddings(ids)?, 0, Some(mask), None)
    }

    /// BLIP-2's ITC score of every image with every text: the largest
    /// cosine over the image's queries, [images, texts].
    pub fn itc(image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        // [I, N, D] x [D, T] -> [I, N, T], max over N.
        let sims = image_embeds.broadcast_matmul(&text_embeds.t()?)?;
        Ok(sims.max(1)?)
    }

    /// The ITM logits [B, 2] (no match, match) of image features [B, P, E]
    /// paired row by row with texts [B, L] and their mask: the ITM head on
    /// the query outputs, averaged over the queries.
    pub fn itm(&self, image: &Tensor, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, _) = ids.dims2()?;
        let n = self.num_query_tokens();
        let h = self.query_tokens.dim(2)?;
        let q = self.query_tokens.broadcast_as((b, n, h))?;
        let embeds = Tensor::cat(&[&q, &self.text_embeddings(ids)?], 1)?;
        let qmask = Tensor::ones((b, n), mask.dtype(), mask.device())?;
        let mask = Tensor::cat(&[&qmask, mask], 1)?;
        let x = self.qformer.forward(&embeds, n, Some(&mask), Some(image))?;
        Ok(self.itm_head.forward(&x.narrow(1, 0, n)?)?.mean(1)?)
    }
}

//! LoRA held in the blocks: each projection's delta by its named slot (`lora::Proj`), setting and reading the adapter, and merging it into the f32 weights.

use super::*;

impl Llama {
    /// Adds the LoRA deltas of the projections from `first` on (`ys.len()`
    /// of them, in `lora::TARGETS` order: q, k, v or gate, up), which all
    /// read `x`, to their outputs.
    pub(super) fn adapt(
        &self,
        b: &Block,
        first: Proj,
        x: &Tensor,
        ys: &mut [Tensor],
    ) -> Result<()> {
        let Some(cfg) = &self.lora else {
            return Ok(());
        };
        for (j, y) in ys.iter_mut().enumerate() {
            if let Some(p) = &b.lora[first as usize + j] {
                *y = (&*y + p.delta(x, cfg.scale())?)?;
            }
        }
        Ok(())
    }

    /// Holds `lora` in the blocks, unmerged (its tensors may be training
    /// variables); `None` removes it.
    pub fn set_lora(&mut self, lora: Option<&Lora>) -> Result<()> {
        if let Some(l) = lora {
            if l.layers.len() != self.blocks.len() {
                return Err(Error::Shape(format!(
                    "a LoRA adapter of {} layers for a model of {}",
                    l.layers.len(),
                    self.blocks.len()
                )));
            }
        }
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.lora = match lora {
                Some(l) => l.layers[i].clone(),
                None => Default::default(),
            };
        }
        self.lora = lora.map(|l| l.cfg.clone());
        Ok(())
    }

    /// The adapter held in the blocks, if any.
    pub fn lora(&self) -> Option<Lora> {
        self.lora.as_ref().map(|cfg| Lora {
            cfg: cfg.clone(),
            layers: self.blocks.iter().map(|b| b.lora.clone()).collect(),
        })
    }

    /// Folds the held adapter into the f32 weights (`W + scale · B A`) and
    /// drops it; the outputs are unchanged up to float rounding.
    pub fn merge_lora(&mut self) -> Result<()> {
        let Some(cfg) = self.lora.take() else {
            return Ok(());
        };
        let scale = cfg.scale();
        let fold = |l: &mut Linear, p: &Option<LoraPair>| -> Result<()> {
            let Some(p) = p else { return Ok(()) };
            let w =
                match l {
                    Linear::Candle(candle_core::quantized::QMatMul::Tensor(w))
                    | Linear::Packed(w, _) => w.clone(),
                    _ => return Err(Error::Report(
                        "merging LoRA needs the f32 weights, and this language model was loaded quantized (`--precision f32` loads it dequantized)"
                            .into(),
                    )),
                };
            let merged = (w + (p.b.matmul(&p.a)? * scale)?)?;
            *l = Linear::Candle(candle_core::quantized::QMatMul::Tensor(merged));
            Ok(())
        };
        for b in self.blocks.iter_mut() {
            let pairs = std::mem::take(&mut b.lora);
            for (group, first) in [(&mut b.qkv, Proj::Q), (&mut b.gate_up, Proj::Gate)] {
                let Group::Split(parts) = group else {
                    return Err(Error::Report(
                        "merging LoRA needs the f32 weights, and this language model was loaded quantized (`--precision f32` loads it dequantized)"
                            .into(),
                    ));
                };
                for (j, part) in parts.iter_mut().enumerate() {
                    fold(part, &pairs[first as usize + j])?;
                }
            }
            fold(&mut b.o, &pairs[Proj::O as usize])?;
            fold(&mut b.down, &pairs[Proj::Down as usize])?;
        }
        Ok(())
    }
}

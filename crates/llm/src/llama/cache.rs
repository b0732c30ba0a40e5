//! The KV cache of a batch: per-row left padding, joining a prefilled sequence into a running batch, and dropping finished rows.

use super::*;

/// The per-sequence state of a batch: its KV cache and left padding.
#[derive(Debug, Clone)]
pub struct Cache {
    pub(super) layers: Vec<KvCache>,
    /// Padding positions at the start of each row.
    pub(super) pad: Vec<usize>,
    /// Positions filled so far, padding included (the same for every row).
    pub(super) len: usize,
}

impl Cache {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn batch_size(&self) -> usize {
        self.pad.len()
    }

    /// Padding positions at the start of each row.
    pub fn pad(&self) -> &[usize] {
        &self.pad
    }

    /// One cache holding `self`'s rows and then `other`'s: the shorter side
    /// is left-padded with masked zero positions, so every row keeps its own
    /// positions (a row's position is its column minus its padding). This is
    /// how a new sequence, prefilled alone, joins a running batch.
    pub fn join(self, other: Cache) -> Result<Cache> {
        if self.pad.is_empty() {
            return Ok(other);
        }
        if other.pad.is_empty() {
            return Ok(self);
        }
        if self.layers.len() != other.layers.len() {
            return Err(Error::Shape(format!(
                "joining caches of {} and {} layers",
                self.layers.len(),
                other.layers.len()
            )));
        }
        let len = self.len.max(other.len);
        let (da, db) = (len - self.len, len - other.len);
        let mut layers = Vec::with_capacity(self.layers.len());
        for (a, b) in self.layers.iter().zip(&other.layers) {
            let (ka, va) = kv_of(a)?;
            let (kb, vb) = kv_of(b)?;
            let k = Tensor::cat(&[&left_pad(&ka, da)?, &left_pad(&kb, db)?], 0)?;
            let v = Tensor::cat(&[&left_pad(&va, da)?, &left_pad(&vb, db)?], 0)?;
            layers.push(kv_from(&k, &v)?);
        }
        let pad = self
            .pad
            .iter()
            .map(|p| p + da)
            .chain(other.pad.iter().map(|p| p + db))
            .collect();
        Ok(Cache { layers, pad, len })
    }

    /// Keeps only the rows `keep` (in that order), and drops the leading
    /// columns that are padding in every kept row.
    pub fn retain(&mut self, keep: &[usize]) -> Result<()> {
        if let Some(&r) = keep.iter().find(|&&r| r >= self.pad.len()) {
            return Err(Error::Shape(format!(
                "row {r} of a cache of {} rows",
                self.pad.len()
            )));
        }
        let pad: Vec<usize> = keep.iter().map(|&r| self.pad[r]).collect();
        let cut = pad.iter().copied().min().unwrap_or(0).min(self.len);
        if keep.is_empty() {
            self.layers.iter_mut().for_each(KvCache::reset);
            self.pad.clear();
            self.len = 0;
            return Ok(());
        }
        if self.len > 0 {
            let dev = kv_of(&self.layers[0])?.0.device().clone();
            let idx = Tensor::from_vec(
                keep.iter().map(|&r| r as u32).collect::<Vec<_>>(),
                keep.len(),
                &dev,
            )?;
            for l in self.layers.iter_mut() {
                let (k, v) = kv_of(l)?;
                let n = self.len - cut;
                let k = k.narrow(2, cut, n)?.contiguous()?.index_select(&idx, 0)?;
                let v = v.narrow(2, cut, n)?.contiguous()?.index_select(&idx, 0)?;
                *l = kv_from(&k, &v)?;
            }
        }
        self.pad = pad.iter().map(|p| p - cut).collect();
        self.len -= cut;
        Ok(())
    }
}

/// A layer's keys and values so far, `[b, kv_heads, len, head_dim]`.
pub(super) fn kv_of(kv: &KvCache) -> Result<(Tensor, Tensor)> {
    match (kv.k()?, kv.v()?) {
        (Some(k), Some(v)) => Ok((k, v)),
        _ => Err(Error::Shape("an empty layer in a filled cache".into())),
    }
}

/// A layer cache holding `k` and `v`, with room to grow.
pub(super) fn kv_from(k: &Tensor, v: &Tensor) -> Result<KvCache> {
    let mut kv = KvCache::new(2, k.dim(2)?.max(1) + 64);
    kv.append(&k.contiguous()?, &v.contiguous()?)?;
    Ok(kv)
}

/// `x` `[b, h, t, d]` with `n` zero positions in front.
pub(super) fn left_pad(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 0 {
        return Ok(x.clone());
    }
    let (b, h, _, d) = x.dims4()?;
    let z = Tensor::zeros((b, h, n, d), x.dtype(), x.device())?;
    Ok(Tensor::cat(&[&z, x], 2)?)
}

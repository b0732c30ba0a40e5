//! LLaVA-NeXT's AnyRes on the model side: the features of an image's base
//! picture and tiles ([`clasp_core::preprocess::anyres::tiles`]) packed into
//! one sequence as transformers' `LlavaNextModel.pack_image_features` packs
//! them: the base picture's tokens, then the tiles' feature map (tile rows
//! and columns laid out as the picture) with the padding the aspect left
//! cut away (`unpad_image`), one `image_newline` after each row.

use candle_core::{Tensor, D};

use crate::{Error, Result};
use clasp_core::preprocess::anyres::unpadded_size;

/// Packs `feats` [1 + rows·cols, p·p, hidden] (the base picture's tokens,
/// then each tile's, row by row; a tile's tokens row-major p×p) of an image
/// whose original size is `image_size` (height, width), with `newline`
/// [hidden] after each row of the map. Returns [tokens, hidden].
pub fn pack(
    feats: &Tensor,
    grid: (usize, usize),
    image_size: (u32, u32),
    newline: Option<&Tensor>,
) -> Result<Tensor> {
    let (n, pp, hidden) = feats.dims3()?;
    let p = (pp as f64).sqrt().round() as usize;
    if p * p != pp || n != 1 + grid.0 * grid.1 {
        return Err(Error::Shape(format!(
            "AnyRes features: {n} pictures of {pp} tokens for a {}x{} grid of square tiles",
            grid.0, grid.1
        )));
    }
    let base = feats.get(0)?;
    if n == 1 {
        return Ok(match newline {
            Some(nl) => Tensor::cat(&[&base, &nl.unsqueeze(0)?], 0)?,
            None => base,
        });
    }
    let (rows, cols) = grid;
    // (R, C, p, p, H) -> (R, p, C, p, H) -> the map (R·p, C·p, H).
    let map = feats
        .narrow(0, 1, rows * cols)?
        .reshape((rows, cols, p, p, hidden))?
        .permute((0, 2, 1, 3, 4))?
        .reshape((rows * p, cols * p, hidden))?;
    let (full_h, full_w) = (rows * p, cols * p);
    let (h, w) = unpadded_size(image_size, grid, p);
    let map = map
        .narrow(0, (full_h - h) / 2, h)?
        .narrow(1, (full_w - w) / 2, w)?;
    let map = match newline {
        Some(nl) => {
            let col = nl.reshape((1, 1, hidden))?.broadcast_as((h, 1, hidden))?;
            Tensor::cat(&[&map, &col.contiguous()?], D::Minus2)?
        }
        None => map,
    };
    let width = map.dim(1)?;
    let flat = map.contiguous()?.reshape((h * width, hidden))?;
    Ok(Tensor::cat(&[&base, &flat], 0)?)
}

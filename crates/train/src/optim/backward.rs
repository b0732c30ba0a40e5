//! One optimiser step on a scalar loss, as every trainer takes it.

use super::*;

/// One optimiser step on a scalar loss: refused (naming `step`, 1-based)
/// when the loss is not finite, else its backward pass, the gradients
/// clipped to `max_norm` and `opt` stepped. Returns the loss.
pub fn backward_step(
    total: &Tensor,
    step: usize,
    vars: &[(String, Var)],
    opt: &mut GroupedAdamW,
    max_norm: f64,
) -> Result<f64> {
    let lv = total.to_scalar::<f32>()? as f64;
    if !lv.is_finite() {
        return Err(crate::Error::Report(format!(
            "step {step}: the loss is {lv}"
        )));
    }
    let mut grads = total.backward()?;
    clip_grad_norm(vars, &mut grads, max_norm)?;
    opt.step(&grads)?;
    Ok(lv)
}

//! Unit tests of `llama` (kept beside it, in their own file).
use super::*;

/// The GGUF q/k row order is Hugging Face's with each head's two halves
/// interleaved; `hf_tensors` must invert exactly that permutation.
#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    let heads = 2;
    let hd = 4;
    let rows = heads * hd;
    let hf: Vec<f32> = (0..rows * 3).map(|x| x as f32).collect();
    // llama.cpp's convert: reshape(heads, 2, hd/2, cols).swapaxes(1, 2).
    let mut gguf = vec![0f32; rows * 3];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + half * (hd / 2) + i;
                let dst = h * hd + i * 2 + half;
                gguf[dst * 3..dst * 3 + 3].copy_from_slice(&hf[src * 3..src * 3 + 3]);
            }
        }
    }
    let w = Tensor::from_vec(gguf, (rows, 3), &Device::Cpu).unwrap();
    let back = interleaved_to_half_rows(&w, heads)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(back, hf);
}

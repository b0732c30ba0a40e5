//! The third generation: one decoder over text and image tokens (Emu3's
//! design; Wang et al. 2024). A VQ tokenizer ([`Emu3Vq`]) turns an image
//! into a grid of codes; each code is a token of the language model's
//! vocabulary, so the same decoder reads an image (captioning) and writes one
//! (drawing).
//!
//! The layout is `Emu3Processor`'s: an image is
//! `<|image start|>{h}*{w}<|image token|>`, then its `h` rows of `w` code
//! tokens each closed by the end-of-row token `<|extra_200|>`, then
//! `<|extra_201|><|image end|>`; the processor writes the `<image>`
//! placeholder where the codes go and the model swaps their embeddings in,
//! which is the same sequence of embeddings as the code tokens themselves.
//! Every text starts with the tokenizer's bos token, as the processor adds it.
//!
//! [`NativeModel::assemble`] extends a llama-family model (SmolLM2 here)
//! with the structure tokens and one token per code. The new rows of the
//! embedding and of the (untied) output head start at the mean of the
//! model's own rows plus Gaussian noise of a tenth of their per-dimension
//! deviation, seeded: near the average token, so the text logits barely
//! move, yet distinct. The model saves as transformers'
//! `Emu3ForConditionalGeneration` (`native/checkpoint.rs`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clasp_core::model::emu3_vq::{self, Emu3Vq, Emu3VqConfig};
use clasp_core::preprocess::image::ImageProcessor;
use llm::llama::RopeLayout;
use llm::{Llama, LlmTokenizer};

use crate::{llm, rng::Rng, Error, Result};

#[path = "native/checkpoint.rs"]
mod checkpoint;
pub use checkpoint::is_native;
#[path = "native/draw.rs"]
mod draw;
pub use draw::{check_draw, default_draw_size, DrawOptions, NEGATIVE_PROMPT};

/// Begin of image.
pub const BOI: &str = "<|image start|>";
/// End of image.
pub const EOI: &str = "<|image end|>";
/// Between the size prefix and the codes.
pub const WRAPPER: &str = "<|image token|>";
/// End of a row of codes.
pub const EOL: &str = "<|extra_200|>";
/// After the last row.
pub const EOF: &str = "<|extra_201|>";
/// The processor's placeholder for one code or end-of-row token.
pub const PLACEHOLDER: &str = "<image>";

/// The token of code `i`, as Emu3 names it.
pub fn visual_token(i: usize) -> String {
    format!("<|visual token {i:06}|>")
}

/// The ids of the image structure and code tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageTokens {
    pub boi: u32,
    pub eoi: u32,
    pub wrapper: u32,
    pub eol: u32,
    pub eof: u32,
    pub placeholder: u32,
    /// The id of code 0; code `c` is `first_code + c`.
    pub first_code: u32,
    pub codebook: usize,
}

impl ImageTokens {
    /// Adds the tokens to `tok` (or finds them): the structure tokens, then
    /// one per code, in order so that the codes' ids are consecutive.
    fn add(tok: &mut LlmTokenizer, codebook: usize) -> Result<Self> {
        let mut id = |t: &str| tok.add_special_token(t);
        let (boi, eoi, wrapper) = (id(BOI), id(EOI), id(WRAPPER));
        let (eol, eof, placeholder) = (id(EOL), id(EOF), id(PLACEHOLDER));
        let codes = tok.add_special_tokens(&(0..codebook).map(visual_token).collect::<Vec<_>>());
        let first_code = codes[0];
        if let Some(c) = (0..codebook).find(|&c| codes[c] != first_code + c as u32) {
            return Err(Error::Tokenize(format!(
                "the tokenizer already holds {} out of order: code tokens must be consecutive",
                visual_token(c)
            )));
        }
        Ok(Self {
            boi,
            eoi,
            wrapper,
            eol,
            eof,
            placeholder,
            first_code,
            codebook,
        })
    }

    /// Finds the tokens in a tokenizer that has them.
    fn find(tok: &LlmTokenizer, codebook: usize) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                Error::Tokenize(format!("the tokenizer has no `{t}`: not a native model's"))
            })
        };
        let first_code = id(&visual_token(0))?;
        let last = id(&visual_token(codebook - 1))?;
        if last != first_code + codebook as u32 - 1 {
            return Err(Error::Tokenize(
                "the code tokens are not consecutive".into(),
            ));
        }
        Ok(Self {
            boi: id(BOI)?,
            eoi: id(EOI)?,
            wrapper: id(WRAPPER)?,
            eol: id(EOL)?,
            eof: id(EOF)?,
            placeholder: id(PLACEHOLDER)?,
            first_code,
            codebook,
        })
    }

    /// The structure tokens by name, in Emu3's order.
    pub fn structure(&self) -> [(&'static str, u32); 6] {
        [
            (BOI, self.boi),
            (EOI, self.eoi),
            (WRAPPER, self.wrapper),
            (EOL, self.eol),
            (EOF, self.eof),
            (PLACEHOLDER, self.placeholder),
        ]
    }

    /// The code of token `id`, if it is one.
    pub fn code(&self, id: u32) -> Option<usize> {
        (id >= self.first_code && ((id - self.first_code) as usize) < self.codebook)
            .then(|| (id - self.first_code) as usize)
    }

    /// A grid of codes ([h][w]) as the tokens that replace its
    /// placeholders: each row's codes, then end-of-row.
    pub fn grid(&self, codes: &[Vec<u32>]) -> Vec<u32> {
        let mut out = Vec::new();
        for row in codes {
            out.extend(row.iter().map(|&c| self.first_code + c));
            out.push(self.eol);
        }
        out
    }
}

/// The text an image stands for in a prompt (Emu3Processor's expansion).
pub fn image_text(h: usize, w: usize) -> String {
    format!(
        "{BOI}{h}*{w}{WRAPPER}{}{EOF}{EOI}",
        PLACEHOLDER.repeat(h * (w + 1))
    )
}

/// A decoder over text and image tokens, with its VQ tokenizer.
pub struct NativeModel {
    pub vq: Emu3Vq,
    vq_tensors: HashMap<String, Tensor>,
    pub llm: Llama,
    pub tokenizer: LlmTokenizer,
    pub tokens: ImageTokens,
    pub processor: ImageProcessor,
}

impl NativeModel {
    /// A language model (GGUF or a Hugging Face folder, held in f32) and a
    /// VQ tokenizer folder joined into one native model: the tokenizer and
    /// the vocabulary grow by the structure and code tokens (see the module
    /// notes for the new rows), seeded by `seed`.
    pub fn assemble(llm_path: &Path, vq_dir: &Path, seed: u64, device: &Device) -> Result<Self> {
        let vq_cfg = Emu3VqConfig::from_file(&vq_dir.join("config.json"))?;
        let vq_tensors = emu3_vq::read_tensors(vq_dir, device)?;
        let lm = llm::LanguageModel::load(llm_path, llm::Precision::F32, device)?;
        let mut tokenizer = lm.tokenizer;
        let tokens = ImageTokens::add(&mut tokenizer, vq_cfg.codebook_size)?;
        let vocab = tokenizer.vocab_size();
        let mut cfg = lm.model.config().clone();
        let mut tensors: HashMap<String, Tensor> = lm.model.hf_tensors()?.into_iter().collect();
        let embed = tensors
            .get("model.embed_tokens.weight")
            .cloned()
            .ok_or_else(|| Error::Report("the language model has no embeddings".into()))?;
        let head = tensors
            .remove("lm_head.weight")
            .unwrap_or_else(|| embed.clone());
        let mut rng = Rng(seed);
        tensors.insert(
            "model.embed_tokens.weight".into(),
            grow_rows(&embed, vocab, &mut rng)?,
        );
        tensors.insert("lm_head.weight".into(), grow_rows(&head, vocab, &mut rng)?);
        cfg.vocab_size = vocab;
        cfg.tie_word_embeddings = false;
        cfg.rope_layout = RopeLayout::Half;
        let llm = Llama::from_hf(
            candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device),
            cfg,
        )?;
        let processor = ImageProcessor::new(emu3_vq::processor_config(vq_dir)?);
        Self::from_parts(vq_cfg, vq_tensors, llm, tokenizer, tokens, processor)
    }

    fn from_parts(
        vq_cfg: Emu3VqConfig,
        vq_tensors: HashMap<String, Tensor>,
        llm: Llama,
        tokenizer: LlmTokenizer,
        tokens: ImageTokens,
        processor: ImageProcessor,
    ) -> Result<Self> {
        let device = llm.device().clone();
        let vb = candle_nn::VarBuilder::from_tensors(vq_tensors.clone(), DType::F32, &device);
        Ok(Self {
            vq: Emu3Vq::load(vb, &vq_cfg)?,
            vq_tensors,
            llm,
            tokenizer,
            tokens,
            processor,
        })
    }

    /// The codes of an image file, [h][w], after the processor's resize.
    pub fn image_codes(&self, path: &Path) -> Result<Vec<Vec<u32>>> {
        let px = self.processor.process_path_pixels(path)?;
        self.pixel_codes(&px.data, px.height, px.width)
    }

    /// The codes [h][w] of processed pixels (`[3, height, width]`, the
    /// processor's normalisation).
    pub fn pixel_codes(&self, data: &[f32], height: usize, width: usize) -> Result<Vec<Vec<u32>>> {
        let t = Tensor::from_slice(data, (1, 3, height, width), self.llm.device())?;
        let codes = self.vq.encode(&t)?.squeeze(0)?.to_dtype(DType::U32)?;
        Ok(codes.to_vec2()?)
    }

    /// The first id of the tokens the image tokens added (the structure
    /// tokens and the codes): every row from it on is new to the language
    /// model.
    pub fn image_rows_from(&self) -> usize {
        let t = &self.tokens;
        t.structure()
            .iter()
            .map(|&(_, id)| id)
            .chain([t.first_code])
            .min()
            .unwrap_or(t.first_code) as usize
    }

    /// The ids of a captioning prompt: `user` (a user turn with one
    /// `<image>`) rendered by the chat template with the generation prompt,
    /// the image's codes in its place.
    pub fn caption_prompt_ids(&self, user: &str, codes: &[Vec<u32>]) -> Result<Vec<u32>> {
        let text = self
            .tokenizer
            .render_chat(&[llm::Message::new("user", user)], true)?;
        self.prompt_ids(&text, &[codes.to_vec()])
    }

    /// What follows [`Self::draw_prompt_ids`] when the image is `codes`:
    /// each row and its end-of-row token, the end of the image and the end
    /// of the sequence (a drawing example's answer).
    pub fn draw_answer_ids(&self, codes: &[Vec<u32>]) -> Vec<u32> {
        let mut ids = self.tokens.grid(codes);
        ids.extend([self.tokens.eof, self.tokens.eoi]);
        ids.extend(self.tokenizer.eos_id());
        ids
    }

    /// The ids of `text` with each `<image>` in it standing for the next of
    /// `images`: bos, then the text as Emu3Processor expands and tokenizes
    /// it, with the placeholders replaced by the images' code and
    /// end-of-row tokens.
    pub fn prompt_ids(&self, text: &str, images: &[Vec<Vec<u32>>]) -> Result<Vec<u32>> {
        let parts: Vec<&str> = text.split(PLACEHOLDER).collect();
        if parts.len() - 1 != images.len() {
            return Err(Error::Report(format!(
                "the prompt has {} `{PLACEHOLDER}` and {} images were given",
                parts.len() - 1,
                images.len()
            )));
        }
        let mut expanded = parts[0].to_string();
        for (codes, rest) in images.iter().zip(&parts[1..]) {
            let (h, w) = (codes.len(), codes.first().map_or(0, Vec::len));
            expanded.push_str(&image_text(h, w));
            expanded.push_str(rest);
        }
        let mut ids: Vec<u32> = self.tokenizer.bos_id().into_iter().collect();
        ids.extend(self.tokenizer.encode(&expanded, false)?);
        let mut fill = images.iter().flat_map(|c| self.tokens.grid(c));
        for id in ids.iter_mut().filter(|i| **i == self.tokens.placeholder) {
            *id = fill
                .next()
                .ok_or_else(|| Error::Report("more placeholders than image tokens".into()))?;
        }
        Ok(ids)
    }

    /// The ids that ask for an image of `h` x `w` codes after `caption`
    /// (Emu3Processor's `return_for_image_generation`): bos, the caption,
    /// then the image's start and size prefix.
    pub fn draw_prompt_ids(&self, caption: &str, h: usize, w: usize) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.tokenizer.bos_id().into_iter().collect();
        ids.extend(
            self.tokenizer
                .encode(&format!("{caption}{BOI}{h}*{w}{WRAPPER}"), false)?,
        );
        Ok(ids)
    }

    /// Text for an image: `user` (a user turn with one `<image>`) rendered
    /// by the chat template, the image's codes in its place, then text
    /// generated with every image token suppressed.
    pub fn caption(
        &self,
        path: &Path,
        user: &str,
        opts: &llm::GenerateOptions,
    ) -> Result<llm::Generation> {
        let ids = self.caption_prompt_ids(user, &self.image_codes(path)?)?;
        let opts = self.text_only(opts.clone());
        llm::generate(&self.llm, &self.tokenizer, &ids, &opts, &mut |_| true)
    }

    /// [`Self::caption`] of an image from a dataset (a file or bytes).
    pub fn caption_source(
        &self,
        src: &clasp_core::data::ImageSource,
        user: &str,
        opts: &llm::GenerateOptions,
    ) -> Result<llm::Generation> {
        let img = clasp_core::preprocess::image::decode_image(&src.read()?, &src.path())?;
        let px = self.processor.process_pixels(&img)?;
        let codes = self.pixel_codes(&px.data, px.height, px.width)?;
        let ids = self.caption_prompt_ids(user, &codes)?;
        let opts = self.text_only(opts.clone());
        llm::generate(&self.llm, &self.tokenizer, &ids, &opts, &mut |_| true)
    }

    /// `opts` with every image token suppressed: the model answers in text.
    pub fn text_only(&self, mut opts: llm::GenerateOptions) -> llm::GenerateOptions {
        let t = &self.tokens;
        opts.suppress_tokens.extend(t.structure().map(|(_, id)| id));
        opts.suppress_tokens
            .extend(t.first_code..t.first_code + t.codebook as u32);
        opts
    }

    /// Logits [t, vocab] at every position of one sequence.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        let x = Tensor::new(ids, self.llm.device())?.unsqueeze(0)?;
        let mut cache = self.llm.new_cache(vec![0]);
        let h = self.llm.forward_embeds(&self.llm.embed(&x)?, &mut cache)?;
        Ok(self.llm.logits(&h)?.squeeze(0)?)
    }
}

/// `t` [rows, cols] grown to `rows` with rows drawn around the mean row.
fn grow_rows(t: &Tensor, rows: usize, rng: &mut Rng) -> Result<Tensor> {
    let (r, c) = t.dims2()?;
    if r >= rows {
        return Ok(t.clone());
    }
    let mean = t.mean(0)?;
    let std = t.broadcast_sub(&mean)?.sqr()?.mean(0)?.sqrt()?;
    let gauss = rng.normal((rows - r) * c, 1.0);
    let noise = Tensor::from_vec(gauss, (rows - r, c), t.device())?;
    let new = noise.broadcast_mul(&(std * 0.1)?)?.broadcast_add(&mean)?;
    Ok(Tensor::cat(&[t, &new], 0)?)
}

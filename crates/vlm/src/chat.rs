//! Conversations with images: turns whose content is text and image parts,
//! rendered as transformers' Llava processor renders them (each image part
//! becomes the `<image>` placeholder, parts joined by newlines, the whole
//! conversation through the language model's chat template, the assistant's
//! turn opened), then the placeholders expanded and filled with the images'
//! tokens.

use super::model::Vlm;
use super::native::NativeModel;
use crate::llm::{GenerateOptions, Llama, LlmTokenizer, Message, Prompt};
use crate::{Error, Result};
use candle_core::Tensor;
use clasp_core::preprocess::anyres::AnyResPixels;
use clasp_core::preprocess::image::{ImageProcessor, Pixels};

/// One part of a turn's content.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    /// An image's prepared pixels (the model's `image_processor`).
    Image(Pixels),
    /// An image tiled for a LLaVA-NeXT (AnyRes) model.
    Tiled(AnyResPixels),
    /// A video's prepared frames `[F, C, S, S]` (a LLaVA-NeXT-Video model).
    Video(Tensor),
}

/// One turn: a role (`system`, `user` or `assistant`) and its parts.
#[derive(Debug, Clone)]
pub struct Turn {
    pub role: String,
    pub parts: Vec<Part>,
}

impl Turn {
    pub fn text(role: &str, text: &str) -> Self {
        Self {
            role: role.into(),
            parts: vec![Part::Text(text.into())],
        }
    }
}

/// A model that answers conversations with images: a bridge ([`Vlm`]) or a
/// native model ([`NativeModel`]); or without them, a language model alone
/// ([`TextChat`]). What a chat front end (the server's
/// engine, `clasp ask`) needs of it.
pub trait ChatModel: Send + Sync {
    /// The decoder that generates the answer.
    fn llm(&self) -> &Llama;
    fn tokenizer(&self) -> &LlmTokenizer;
    /// How an image part's pixels are prepared; `None` for a model that
    /// reads no images (a language model alone, [`TextChat`]).
    fn image_processor(&self) -> Option<&ImageProcessor>;
    /// The prompt of a conversation, with the assistant's turn opened.
    fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt>;
    /// The video file at `path` as the part this model reads, or an error
    /// for a model that reads no videos.
    fn prepare_video(&self, path: &std::path::Path) -> Result<Part> {
        Err(Error::Report(format!(
            "{}: this model reads no videos (a LLaVA-NeXT-Video model does)",
            path.display()
        )))
    }
    /// A decoded image as the part this model reads: its processor's
    /// pixels (a LLaVA-NeXT model's tiles).
    fn prepare_image(&self, img: &image::RgbImage) -> Result<Part> {
        match self.image_processor() {
            Some(p) => Ok(Part::Image(p.process_pixels(img)?)),
            None => Err(Error::Report(
                "this model reads no images: it is a language model alone".into(),
            )),
        }
    }
    /// The options a chat answer runs with (a native model's image tokens
    /// suppressed: it answers in text).
    fn chat_options(&self, opts: GenerateOptions) -> GenerateOptions {
        opts
    }
}

/// The messages of a conversation and its images, in order: each image part
/// becomes `placeholder` where it stands, unless the text writes the
/// placeholders itself to place the images (their count is checked when
/// the prompt is rendered).
pub(crate) fn conversation_messages(
    turns: &[Turn],
    placeholder: &str,
) -> (Vec<Message>, Vec<Part>) {
    let written: usize = turns
        .iter()
        .flat_map(|t| &t.parts)
        .map(|p| match p {
            Part::Text(s) => s.matches(placeholder).count(),
            Part::Image(_) | Part::Tiled(_) | Part::Video(_) => 0,
        })
        .sum();
    let mut images = Vec::new();
    let mut messages = Vec::with_capacity(turns.len());
    for t in turns {
        let mut pieces = Vec::with_capacity(t.parts.len());
        for p in &t.parts {
            match p {
                Part::Text(s) => pieces.push(s.as_str()),
                // A video's placeholder stands where it is, whatever the text writes.
                video @ Part::Video(_) => {
                    images.push(video.clone());
                    pieces.push(crate::video::VIDEO_TOKEN);
                }
                image => {
                    images.push(image.clone());
                    if written == 0 {
                        pieces.push(placeholder);
                    }
                }
            }
        }
        messages.push(Message::new(&t.role, &pieces.join("\n")));
    }
    (messages, images)
}

impl ChatModel for Vlm {
    fn llm(&self) -> &Llama {
        &self.llm
    }
    fn tokenizer(&self) -> &LlmTokenizer {
        &self.tokenizer
    }
    fn image_processor(&self) -> Option<&ImageProcessor> {
        Some(Vlm::image_processor(self))
    }
    fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt> {
        Vlm::conversation_prompt(self, turns)
    }
    fn prepare_video(&self, path: &std::path::Path) -> Result<Part> {
        self.video_token_index().ok_or_else(|| {
            Error::Report(format!(
                "{}: this model reads no videos (a LLaVA-NeXT-Video model does)",
                path.display()
            ))
        })?;
        Ok(Part::Video(
            self.video_frames(path, crate::video::DEFAULT_FRAMES)?,
        ))
    }
    fn prepare_image(&self, img: &image::RgbImage) -> Result<Part> {
        match self.anyres() {
            Some(_) => Ok(Part::Tiled(self.anyres_pixels(img)?)),
            None => Ok(Part::Image(self.processor.process_pixels(img)?)),
        }
    }
}

impl Vlm {
    /// Answers `user` (one `<image>`) about a decoded image, prepared as the
    /// model reads images (tiled for a LLaVA-NeXT model).
    pub fn generate_image(
        &self,
        img: &image::RgbImage,
        user: &str,
        opts: &GenerateOptions,
    ) -> Result<crate::llm::Generation> {
        let mut g = match self.prepare_image(img)? {
            Part::Tiled(t) => self.generate_anyres(&[t], user, opts)?,
            Part::Image(px) => self.generate(&self.pixel_batch(&[px.data])?, user, opts)?,
            _ => unreachable!("an image is prepared as pixels or tiles"),
        };
        Ok(g.remove(0))
    }
}

/// The pixels of image parts for a fixed-size tower.
fn square_pixels(images: Vec<Part>) -> Result<Vec<Vec<f32>>> {
    images
        .into_iter()
        .map(|p| match p {
            Part::Image(px) => Ok(px.data),
            _ => Err(Error::Report(
                "this model reads its processor's pixels, not AnyRes tiles".into(),
            )),
        })
        .collect()
}

impl Vlm {
    /// The prompt of a conversation: its ids (images expanded) and, when it
    /// has images, its input embeddings. Each image part becomes a
    /// placeholder where it stands, unless the text writes the placeholders
    /// itself to place the images; then their count must equal the images'.
    pub fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt> {
        let (messages, images) = conversation_messages(turns, self.cfg.image_token.as_str());
        if images.iter().any(|p| matches!(p, Part::Video(_))) {
            let [Part::Video(frames)] = images.as_slice() else {
                return Err(Error::Report(
                    "a conversation with a video takes that one video and no image".into(),
                ));
            };
            return self.video_prompt(&messages, frames);
        }
        if self.anyres().is_some() && !images.is_empty() {
            // Each image takes the tokens its size asks for.
            let tiled = images
                .iter()
                .map(|p| match p {
                    Part::Tiled(t) => Ok(t),
                    _ => Err(Error::Report(
                        "a LLaVA-NeXT model reads tiled images (ChatModel::prepare_image)".into(),
                    )),
                })
                .collect::<Result<Vec<_>>>()?;
            return self.anyres_prompt(&messages, &tiled);
        }
        let ids = self.render_ids(&messages, images.len())?;
        if images.is_empty() {
            return Ok(Prompt::tokens(&ids));
        }
        let images = square_pixels(images)?;
        let pixels = self.pixel_batch(&images)?;
        let feats = self.image_features(&pixels)?;
        let embeds = self.input_embeds(&ids, &feats)?;
        Ok(Prompt {
            ids,
            embeds: Some(embeds),
        })
    }

    /// The ids of `messages` through the chat template with the assistant's
    /// turn opened, each placeholder expanded to the image's tokens; an error
    /// unless the placeholders in the text number `images`. What every
    /// prompt with images goes through: chats, captions and training.
    pub(crate) fn render_ids(&self, messages: &[Message], images: usize) -> Result<Vec<u32>> {
        if images > 0 && self.anyres().is_some() {
            return Err(Error::Report(
                "this LLaVA-NeXT (AnyRes) model gives each image as many tokens as its size asks: \
                 its prompts are built with the images' sizes (chat_prompt_sized)"
                    .into(),
            ));
        }
        Ok(self.expand_images(&self.render_unexpanded(messages, images)?))
    }

    /// [`Self::render_ids`] with the placeholders not yet expanded.
    pub(crate) fn render_unexpanded(
        &self,
        messages: &[Message],
        images: usize,
    ) -> Result<Vec<u32>> {
        let placeholder = self.cfg.image_token.as_str();
        let written: usize = messages
            .iter()
            .map(|m| m.content.matches(placeholder).count())
            .sum();
        if written != images {
            return Err(Error::Report(format!(
                "the prompt has {written} {placeholder} placeholder{} for {images} image{}",
                if written == 1 { "" } else { "s" },
                if images == 1 { "" } else { "s" }
            )));
        }
        let ids = if self.blip2_vision().is_some() {
            // Blip2Processor encodes the text as the tokenizer does by
            // default (its special tokens added).
            let text = self.tokenizer.render_chat(messages, true)?;
            self.tokenizer.encode(&text, true)?
        } else {
            self.tokenizer.encode_chat(messages, true)?
        };
        Ok(ids)
    }
}

impl ChatModel for NativeModel {
    fn llm(&self) -> &Llama {
        &self.llm
    }
    fn tokenizer(&self) -> &LlmTokenizer {
        &self.tokenizer
    }
    fn image_processor(&self) -> Option<&ImageProcessor> {
        Some(&self.processor)
    }
    /// The conversation through the chat template, each image's codes in
    /// its placeholder's place (`NativeModel::prompt_ids`).
    fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt> {
        let (messages, images) = conversation_messages(turns, crate::native::PLACEHOLDER);
        let text = self.tokenizer.render_chat(&messages, true)?;
        let codes = images
            .iter()
            .map(|p| match p {
                Part::Image(p) => self.pixel_codes(&p.data, p.height, p.width),
                _ => Err(Error::Report(
                    "a native model reads its processor's pixels, not tiles".into(),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Prompt::tokens(&self.prompt_ids(&text, &codes)?))
    }
    fn chat_options(&self, opts: GenerateOptions) -> GenerateOptions {
        self.text_only(opts)
    }
}

/// A language model alone as a chat model: conversations of text, through
/// its chat template. What `clasp serve --llm` answers with.
pub struct TextChat {
    pub llm: Llama,
    pub tokenizer: LlmTokenizer,
}

impl ChatModel for TextChat {
    fn llm(&self) -> &Llama {
        &self.llm
    }
    fn tokenizer(&self) -> &LlmTokenizer {
        &self.tokenizer
    }
    fn image_processor(&self) -> Option<&ImageProcessor> {
        None
    }
    fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt> {
        // No placeholder: an image part is refused, not placed.
        let (messages, images) = conversation_messages(turns, "");
        if !images.is_empty() {
            return Err(Error::Report(
                "this model reads no images: it is a language model alone".into(),
            ));
        }
        Ok(Prompt::tokens(
            &self.tokenizer.encode_chat(&messages, true)?,
        ))
    }
}

//! Conversations with images: turns whose content is text and image parts,
//! rendered as transformers' Llava processor renders them (each image part
//! becomes the `<image>` placeholder, parts joined by newlines, the whole
//! conversation through the language model's chat template, the assistant's
//! turn opened), then the placeholders expanded and filled with the images'
//! tokens.

use super::model::Vlm;
use crate::llm::{Message, Prompt};
use crate::{Error, Result};

/// One part of a turn's content.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    /// An image's prepared pixels (`Vlm::image_processor`).
    Image(Vec<f32>),
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

impl Vlm {
    /// The prompt of a conversation: its ids (images expanded) and, when it
    /// has images, its input embeddings. Each image part becomes a
    /// placeholder where it stands, unless the text writes the placeholders
    /// itself to place the images; then their count must equal the images'.
    pub fn conversation_prompt(&self, turns: &[Turn]) -> Result<Prompt> {
        let placeholder = self.cfg.image_token.as_str();
        let written: usize = turns
            .iter()
            .flat_map(|t| &t.parts)
            .map(|p| match p {
                Part::Text(s) => s.matches(placeholder).count(),
                Part::Image(_) => 0,
            })
            .sum();
        let mut images = Vec::new();
        let mut messages = Vec::with_capacity(turns.len());
        for t in turns {
            let mut pieces = Vec::with_capacity(t.parts.len());
            for p in &t.parts {
                match p {
                    Part::Text(s) => pieces.push(s.as_str()),
                    Part::Image(px) => {
                        images.push(px.clone());
                        if written == 0 {
                            pieces.push(placeholder);
                        }
                    }
                }
            }
            messages.push(Message::new(&t.role, &pieces.join("\n")));
        }
        let ids = self.render_ids(&messages, images.len())?;
        if images.is_empty() {
            return Ok(Prompt::tokens(&ids));
        }
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
        let ids = self.tokenizer.encode_chat(messages, true)?;
        Ok(self.expand_images(&ids))
    }
}

//! Where a run starts: the initial checkpoint a preset or a LiT pairing writes.

use super::{TextPooling, TrainConfig};
use crate::{Error, Result};

impl TrainConfig {
    /// For a preset, writes the initial checkpoint to OUTPUT/init (CLIP's
    /// initialisation, or LiT's: the preset's image tower with `text_init`'s
    /// text tower) and points `init` at it. Says what it wrote.
    pub fn materialize_init(&mut self) -> Result<Option<String>> {
        let image = match (&self.preset, &self.image_init) {
            (Some(p), _) => crate::presets::LitImage::Preset(p.clone()),
            (None, Some(p)) => crate::presets::LitImage::Pretrained(p.clone()),
            (None, None) => return Ok(None),
        };
        let dir = self.output_dir()?.join("init");
        let cpu = candle_core::Device::Cpu;
        let note = if let Some(text) = &self.text_init {
            let t =
                crate::presets::init_lit(&image, text, &dir, self.seed, self.text_pooling, &cpu)?;
            // The CNN's name, from the config the init wrote.
            let tower = match &t.config {
                clasp_core::model::ModelConfig::DualEncoder(c) => c.image_cnn.as_ref(),
                _ => None,
            }
            .map(|c| format!(" ({})", c.name()))
            .unwrap_or_default();
            let mut n = format!(
                "wrote a LiT init to {}: the image tower of {}{tower}, the text tower of {}",
                dir.display(),
                image.describe(),
                text.display()
            );
            if self.text_pooling == TextPooling::Mean {
                n.push_str(
                    "\nnote: mean text pooling is a clasp key (clasp_text_pooling); transformers \
                     loads the checkpoint but pools the text with BERT's pooler",
                );
            }
            n
        } else {
            let crate::presets::LitImage::Preset(preset) = image else {
                return Err(Error::Report(
                    "image_init needs text_init: a pretrained image tower is trained with a \
                     text tower that meets it (--text-init BERT_DIR, e.g. MiniLM)"
                        .into(),
                ));
            };
            // Without --tokenizer, CLIP's BPE as open_clip bundles it.
            let tok = self.tokenizer.as_deref();
            crate::presets::init_preset(&preset, tok, &dir, self.seed, &cpu)?;
            format!(
                "wrote the `{preset}` preset with CLIP's initialisation to {}",
                dir.display()
            )
        };
        self.adopt_init()?;
        Ok(Some(note))
    }

    /// Starts from the init [`Self::materialize_init`] wrote (another rank
    /// of a data-parallel run wrote it), when the config asks for one.
    pub fn adopt_init(&mut self) -> Result<()> {
        if self.preset.is_some() || self.image_init.is_some() {
            self.init = Some(self.output_dir()?.join("init").display().to_string());
        }
        self.preset = None;
        self.text_init = None;
        self.image_init = None;
        Ok(())
    }
}

//! Which task a config trains, and the keys that belong to one task only (refused by name in the other).

/// What a run trains, as the config's keys decide it (`llm`, `vision`, or a
/// vision-language `init` make a vision-language run).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// A CLIP-family dual encoder (contrastive training, LiT).
    DualEncoder,
    /// A LLaVA-style model: a connector (and stage 2's LoRA) over a frozen
    /// vision tower and language model.
    VisionLanguage,
}

/// Keys only a dual-encoder run reads.
pub(super) const DUAL_ENCODER_KEYS: &[&str] = &[
    "preset",
    "tokenizer",
    "text_init",
    "image_init",
    "text_lr",
    "text_pooling",
    "grad_clip_vision",
    "grad_clip_text",
    "conflict_group",
    "accum_freq",
    "crop_scale",
    "color_jitter",
    "color_jitter_prob",
    "precision",
    "lock_image",
    "lock_text",
    "negatives",
    "negatives_share",
    "fisher_batches",
    "ewc_anchor",
    "teacher",
];

/// Keys only a vision-language run reads.
pub(super) const VISION_LANGUAGE_KEYS: &[&str] = &[
    "connector",
    "queries",
    "resampler_layers",
    "resampler_heads",
    "vision_feature_layer",
    "stage",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "grad_clip_adapter",
    "contrastive_dim",
    "max_answer_tokens",
    "packed_llm",
    "eval_limit",
];

impl Task {
    pub fn name(self) -> &'static str {
        match self {
            Task::DualEncoder => "a dual-encoder (CLIP) training",
            Task::VisionLanguage => "a vision-language (--llm/--vision) training",
        }
    }

    /// The keys that belong to the other task, refused in this one.
    pub fn other_keys(self) -> &'static [&'static str] {
        match self {
            Task::DualEncoder => VISION_LANGUAGE_KEYS,
            Task::VisionLanguage => DUAL_ENCODER_KEYS,
        }
    }

    pub(super) fn hint(self) -> &'static str {
        match self {
            Task::DualEncoder => {
                "they belong to vision-language runs, which --llm and --vision (or a \
                 vision-language --init) start"
            }
            Task::VisionLanguage => {
                "they belong to dual-encoder runs; remove them (the adapter's clip is \
                 grad_clip_adapter)"
            }
        }
    }
}

//! Which task a config trains, and the keys that belong to one task only (refused by name in the other).

/// What a run trains: the config's `task` when given, else as its keys
/// decide it (`llm`, `vision`, or a vision-language `init` make a
/// vision-language run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// A CLIP-family dual encoder (contrastive training, LiT).
    DualEncoder,
    /// A LLaVA-style model: a connector (and stage 2's LoRA) over a frozen
    /// vision tower and language model.
    VisionLanguage,
    /// BLIP-2's stage 1 (`--task qformer`): a Q-Former with its ITC, ITM
    /// (and ITG) heads over a locked image tower (`vision`), its BERT from
    /// `text_init`.
    #[serde(alias = "q-former")]
    Qformer,
    /// Preference alignment (`--task dpo`): a LoRA adapter on the language
    /// model of a vision-language model (`init`) or of a language model
    /// alone (`llm`), trained on the pairs of `prefs` against the model as
    /// it started.
    Dpo,
    /// A reward model (`--task reward`): the same model read by a scalar
    /// head at the answer's end, trained with the Bradley–Terry loss on the
    /// pairs of `prefs` (LoRA on its language model, and the head).
    Reward,
    /// A VQ image tokenizer (`--task vq`): Emu3's VQ-VAE architecture
    /// trained to reconstruct the dataset's photos (`vq_*` keys).
    Vq,
    /// A native model (`--task native`, or an `init` that is one): one
    /// decoder over text and image tokens, trained to caption and to draw
    /// (LoRA and the image tokens' rows; `draw_ratio`).
    Native,
}

impl Task {
    /// A run on preference pairs (DPO or a reward model).
    pub fn is_preference(self) -> bool {
        matches!(self, Task::Dpo | Task::Reward)
    }
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
            Task::Qformer => "a Q-Former (BLIP-2 stage 1, --task qformer) training",
            Task::Dpo => "a preference (--task dpo) training",
            Task::Reward => "a reward-model (--task reward) training",
            Task::Vq => "a VQ tokenizer (--task vq) training",
            Task::Native => "a native-model (--task native) training",
        }
    }

    /// Whether a run of this task refuses `key`: one that belongs to
    /// another task only.
    pub fn refuses(self, key: &str) -> bool {
        match self {
            Task::DualEncoder => {
                VISION_LANGUAGE_KEYS.contains(&key)
                    || PREFERENCE_KEYS.contains(&key)
                    || VQ_KEYS.contains(&key)
                    || NATIVE_KEYS.contains(&key)
            }
            Task::VisionLanguage => {
                DUAL_ENCODER_KEYS.contains(&key)
                    || PREFERENCE_KEYS.contains(&key)
                    || VQ_KEYS.contains(&key)
                    || NATIVE_KEYS.contains(&key)
            }
            Task::Native => {
                (DUAL_ENCODER_KEYS.contains(&key)
                    || VISION_LANGUAGE_KEYS.contains(&key)
                    || PREFERENCE_KEYS.contains(&key)
                    || VQ_KEYS.contains(&key)
                    || VQ_ALSO_REFUSED.contains(&key))
                    && !NATIVE_READS.contains(&key)
            }
            Task::Vq => {
                DUAL_ENCODER_KEYS.contains(&key)
                    || VISION_LANGUAGE_KEYS.contains(&key)
                    || PREFERENCE_KEYS.contains(&key)
                    || NATIVE_KEYS.contains(&key)
                    || VQ_ALSO_REFUSED.contains(&key)
            }
            Task::Dpo | Task::Reward => {
                (DUAL_ENCODER_KEYS.contains(&key)
                    || VISION_LANGUAGE_KEYS.contains(&key)
                    || VQ_KEYS.contains(&key)
                    || NATIVE_KEYS.contains(&key)
                    || DPO_ALSO_REFUSED.contains(&key))
                    && !DPO_READS.contains(&key)
            }
            Task::Qformer => {
                (DUAL_ENCODER_KEYS.contains(&key)
                    || VISION_LANGUAGE_KEYS.contains(&key)
                    || PREFERENCE_KEYS.contains(&key)
                    || VQ_KEYS.contains(&key)
                    || NATIVE_KEYS.contains(&key)
                    || QFORMER_ALSO_REFUSED.contains(&key))
                    && !QFORMER_READS.contains(&key)
            }
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
            Task::Qformer => {
                "a Q-Former run reads its tower from `vision` (locked), its BERT from \
                 `text_init`, and `queries`"
            }
            Task::Vq => {
                "a VQ tokenizer run reads its photos from `dataset`, its size from the `vq_*` \
                 keys, or continues a VQ folder given as `init`"
            }
            Task::Native => {
                "a native run reads its model from `init` (`clasp assemble --native`), its pairs \
                 from `dataset`, `draw_ratio` and the LoRA keys"
            }
            Task::Dpo | Task::Reward => {
                "a preference run reads its model from `init` (a vision-language checkpoint) \
                 or `llm`, its pairs from `prefs`, and the LoRA keys"
            }
        }
    }
}

/// Keys only a preference run reads.
pub(super) const PREFERENCE_KEYS: &[&str] = &["prefs", "beta", "pref_loss", "label_smoothing"];
/// Of the other tasks' keys, the ones a preference run reads.
const DPO_READS: &[&str] = &[
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "grad_clip_adapter",
    "packed_llm",
];
/// Keys no task list holds that a preference run refuses too.
const DPO_ALSO_REFUSED: &[&str] = &["vision", "dataset", "schedule", "objective", "eval_dataset"];

/// The keys only a VQ run reads.
pub use crate::vq::VQ_KEYS;
/// Keys no task list holds that a VQ run refuses too.
const VQ_ALSO_REFUSED: &[&str] = &["llm", "vision", "schedule", "objective", "eval_dataset"];

/// The keys only a native run reads.
pub use crate::native_task::NATIVE_KEYS;
/// Of the other tasks' keys, the ones a native run reads.
const NATIVE_READS: &[&str] = &[
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "max_answer_tokens",
    "packed_llm",
];

/// Of the other tasks' keys, the ones a Q-Former run reads.
const QFORMER_READS: &[&str] = &["text_init", "queries"];
/// Keys no task list holds that a Q-Former run refuses too.
const QFORMER_ALSO_REFUSED: &[&str] = &["llm", "schedule"];

/// The objectives a Q-Former run can combine (`itc,itm,itg`, each with an
/// optional `:weight`).
pub const QFORMER_OBJECTIVES: [&str; 3] = ["itc", "itm", "itg"];

impl super::TrainConfig {
    /// A vision-language run's objective: `lm` (the answer tokens' loss)
    /// when the config keeps the default, else the one given (e.g.
    /// `lm,infonce:0.5,geometric:0.5`).
    pub fn vlm_objective(&self) -> String {
        if self.objective == Self::default().objective {
            "lm".into()
        } else {
            self.objective.clone()
        }
    }

    /// Stage 2's LoRA settings.
    pub fn lora(&self) -> crate::llm::lora::LoraConfig {
        crate::llm::lora::LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha,
            targets: self.lora_targets.clone(),
        }
    }

    /// A Q-Former run's objective: BLIP-2's three when the config keeps the
    /// default, else the ones given, with their weights.
    pub fn qformer_objectives(&self) -> crate::Result<Vec<(String, f64)>> {
        if self.objective == Self::default().objective {
            return Ok(QFORMER_OBJECTIVES
                .iter()
                .map(|n| (n.to_string(), 1.0))
                .collect());
        }
        self.objective
            .split(',')
            .map(|part| {
                let (name, w) = match part.trim().split_once(':') {
                    Some((n, w)) => (n, w.parse::<f64>().ok()),
                    None => (part.trim(), Some(1.0)),
                };
                match w {
                    Some(w) if QFORMER_OBJECTIVES.contains(&name) && w.is_finite() => {
                        Ok((name.to_string(), w))
                    }
                    _ => Err(crate::Error::Report(format!(
                        "objective: `{part}` is not one of a Q-Former run's (itc, itm, itg, each \
                         with an optional :weight)"
                    ))),
                }
            })
            .collect()
    }

    /// The connector this run builds.
    pub fn connector_kind(&self) -> crate::Result<clasp_vlm::ConnectorKind> {
        Ok(match self.connector {
            super::Connector::Mlp2xGelu => clasp_vlm::ConnectorKind::Mlp2xGelu,
            super::Connector::Resampler => clasp_vlm::ConnectorKind::Resampler {
                queries: self.queries,
                layers: self.resampler_layers,
                heads: self.resampler_heads,
            },
            super::Connector::QFormer => clasp_vlm::ConnectorKind::qformer(
                self.queries,
                self.resampler_layers,
                self.resampler_heads,
            ),
        })
    }

    /// What a preference run needs: a model and its pairs.
    pub(super) fn check_dpo(&self) -> crate::Result<()> {
        let bad = |key: &str, why: String| Err(crate::Error::Report(format!("{key}: {why}")));
        if self.init.is_some() == self.llm.is_some() {
            return bad(
                "init, llm",
                "a preference run starts from one model: --init VLM_CHECKPOINT or --llm \
                 GGUF_OR_FOLDER"
                    .into(),
            );
        }
        if self.preference.prefs.is_none() {
            return bad(
                "prefs",
                "give the preference pairs (JSON lines in TRL's format)".into(),
            );
        }
        self.preference
            .loss()
            .check()
            .or_else(|e| bad("beta, pref_loss, label_smoothing", e))?;
        self.lora().check().or_else(|e| bad("lora", e))
    }

    /// The checks of a task with its own trainer (Q-Former, VQ), if this
    /// run is one.
    pub(super) fn check_own_task(&self) -> Option<crate::Result<()>> {
        match self.task() {
            Task::Qformer => Some(self.check_qformer()),
            Task::Vq => Some(self.vq.check()),
            Task::Native => Some(self.check_native()),
            _ => None,
        }
    }

    /// What a native run needs: a native model, a share and an adapter.
    pub(super) fn check_native(&self) -> crate::Result<()> {
        let bad = |key: &str, why: String| Err(crate::Error::Report(format!("{key}: {why}")));
        match self.init.as_deref() {
            Some(i) if clasp_vlm::native::is_native(std::path::Path::new(i)) => {}
            Some(i) => {
                return bad(
                    "init",
                    format!("{i} is not a native (Emu3) model; make one with `clasp assemble --native VQ_DIR --llm GGUF`"),
                )
            }
            None => {
                return bad(
                    "init",
                    "a native run starts from a native model: --init NATIVE_DIR (`clasp assemble --native`)".into(),
                )
            }
        }
        self.native.check()?;
        self.lora().check().or_else(|e| bad("lora", e))
    }

    /// What a Q-Former run needs: its tower and its BERT.
    pub(super) fn check_qformer(&self) -> crate::Result<()> {
        let bad = |key: &str, why: &str| Err(crate::Error::Report(format!("{key}: {why}")));
        if self.init.is_none() && (self.vision.is_none() || self.text_init.is_none()) {
            return bad(
                "vision, text_init",
                "a Q-Former run needs --vision (the image tower: a pretrained CNN file or a \
                 CLIP-family checkpoint) and --text-init (a BERT folder, e.g. MiniLM, whose \
                 layers and vocabulary the Q-Former starts from), or --init Q_FORMER_FOLDER",
            );
        }
        if self.queries == 0 {
            return bad("queries", "a Q-Former needs at least one query");
        }
        self.qformer_objectives().map(|_| ())
    }
}

//! BLIP-2's stage 1 as a `clasp train` task (`--task qformer`): a Q-Former
//! with its ITC, ITM and ITG heads learns to read a locked image tower,
//! on (photo, caption) pairs, through the one training loop
//! ([`super::run::run`]).
//!
//! The tower is a pretrained CNN (`--vision mobilenet_v2.pth`): the queries
//! read its last feature map's positions, computed once per photo and kept
//! ([`FeatureCache`]; the tower is locked and nothing is augmented, as in
//! BLIP-2). The Q-Former starts from a BERT (`--text-init`, see
//! [`super::qformer_init`]); a new run writes that starting model to
//! OUTPUT/init first, so every run, new or resumed, starts from a folder.
//!
//! What it saves is a `Blip2ForImageTextRetrieval` folder in transformers'
//! names (`qformer.*`, `query_tokens`, `embeddings.*`, the projections and
//! `itm_head`), with the CNN's tensors as `vision_model.*` in its own names
//! and its `vision_config` naming its family (clasp reads that; transformers'
//! `Blip2VisionModel` is a ViT and cannot hold a CNN), LAVIS's captioning
//! head (`cls.predictions.*`) and temperature (`temp`) beside them, and the
//! BERT tokenizer with BLIP-2's `[DEC]`. `clasp search/eval --rerank-model`
//! takes it as it is.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use clasp_common::atomic::{write_dir, write_json};
use clasp_common::rng::Rng;
use clasp_core::model::blip2::{blip_processor_json, Blip2Config, Blip2Tower};
use clasp_core::model::qformer::QFormerHeads;

use super::config::TrainConfig;
use super::feature_cache::{FeatureCache, Source};
use super::hooks::StepLog;
use super::optim::{self, GroupedAdamW};
use super::order::{self, Order};
use super::qformer_init::{self, DEC, ITC_DIM, MAX_TEXT};
use super::qformer_stage1::{draw_with, itc_itm};
use super::run::{Prepare, Task};
use super::state::{self, checkpoint_dir, State};
use crate::data::{ImageSource, PairSet};
use crate::preprocess::{ImageProcessor, ImageProcessorConfig, TextTokenizer};
use crate::{Error, Result};

/// A Q-Former run in progress.
pub struct QFormerTrainer {
    cfg: TrainConfig,
    out: PathBuf,
    dev: Device,
    /// The tower is its `cnn` when it has one, else BLIP-2's ViT.
    blip2: Blip2Config,
    /// The tower's tensors, in its own names (saved as `vision_model.*`).
    tower: HashMap<String, Tensor>,
    /// Everything that learns, by its checkpoint name (`temp` included).
    vars: Vec<(String, Var)>,
    opt: GroupedAdamW,
    objectives: Vec<(String, f64)>,
    tokenizer: TextTokenizer,
    /// The folder the tokenizer files are copied from when saving.
    tokenizer_dir: PathBuf,
    bos: u32,
    proc: ImageProcessor,
    cache: Arc<FeatureCache>,
    set: PairSet,
    per_image: Vec<Vec<usize>>,
    order: Order,
    step: usize,
}

/// The tokenizer files a Q-Former folder carries.
const TOKENIZER_FILES: [&str; 3] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes a Q-Former folder: config, tensors (the tower's under
/// `vision_model.`), the tower's preprocessing, and the tokenizer files
/// `tokenizer` writes into the folder. The folder is filled beside the old
/// one and swapped in last, so `tokenizer` may read the old one.
fn write_folder(
    dir: &Path,
    blip2: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
    processor_json: &serde_json::Value,
    tokenizer: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    write_dir(dir, |tmp| {
        write_json(&tmp.join("config.json"), blip2)?;
        let w = tmp.join("model.safetensors");
        candle_core::safetensors::save(tensors, &w).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        write_json(&tmp.join("preprocessor_config.json"), processor_json)?;
        tokenizer(tmp)
    })
}

/// Copies a Q-Former folder's tokenizer files from `src` into `dst`.
fn copy_tokenizer(src: &Path, dst: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let from = src.join(f);
        if from.is_file() {
            std::fs::copy(&from, dst.join(f)).map_err(|e| Error::io(&from, e))?;
        }
    }
    Ok(())
}

/// The config.json of a Q-Former folder over a tower of `vision_config`.
fn blip2_json(
    vision_config: serde_json::Value,
    q: &clasp_core::model::qformer::QFormerConfig,
    queries: usize,
    itc_dim: usize,
) -> serde_json::Value {
    let mut qc = serde_json::to_value(q).expect("a config serialises");
    qc["model_type"] = "blip_2_qformer".into();
    serde_json::json!({
        "model_type": "blip-2",
        "architectures": ["Blip2ForImageTextRetrieval"],
        "vision_config": vision_config,
        "qformer_config": qc,
        "num_query_tokens": queries,
        "image_text_hidden_size": itc_dim,
    })
}

/// OUTPUT/init for a new run: the tower from `vision` (a pretrained CNN
/// file) and a Q-Former from `text_init` (a BERT folder), with the BERT's
/// tokenizer taught `[DEC]`.
fn materialize_init(cfg: &TrainConfig, out: &Path) -> Result<PathBuf> {
    let (vision, bert) = match (&cfg.vision, &cfg.text_init) {
        (Some(v), Some(b)) => (v, b),
        _ => unreachable!("TrainConfig::check asks for both"),
    };
    if !vision.is_file() {
        return Err(Error::Report(format!(
            "{}: a Q-Former run's tower is a pretrained CNN file (.pth or safetensors: \
             MobileNetV2, ResNet, EfficientNet-Lite); a CLIP-family ViT has a pre-LayerNorm \
             that Blip2VisionModel cannot hold",
            vision.display()
        )));
    }
    let (cnn, tensors) = clasp_core::model::cnn_tower::read_pretrained(vision)?;
    let width = cnn.vision_config().hidden_size;
    let fresh = qformer_init::from_bert(bert, width, cfg.queries, cfg.seed)?;
    let mut all: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with("classifier."))
        .map(|(k, v)| (format!("vision_model.{k}"), v))
        .collect();
    all.extend(fresh.tensors);
    let proc = ImageProcessor::new(cnn.processor());
    let init = out.join("init");
    let blip2 = blip2_json(cnn.to_vision_json(), &fresh.config, cfg.queries, ITC_DIM);
    write_folder(&init, &blip2, &all, &proc.config().to_hf_json(), |dir| {
        let tj = dir.join("tokenizer.json");
        fresh
            .tokenizer
            .save(&tj, false)
            .map_err(|e| Error::Tokenizer {
                path: tj.clone(),
                reason: e.to_string(),
            })?;
        write_json(
            &dir.join("tokenizer_config.json"),
            &serde_json::json!({
                "tokenizer_class": "BertTokenizer", "do_lower_case": true, "bos_token": DEC,
                "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "unk_token": "[UNK]", "mask_token": "[MASK]", "model_max_length": 512,
            }),
        )
    })?;
    Ok(init)
}

impl QFormerTrainer {
    /// A new run: from `init` (a Q-Former folder this task wrote), or from
    /// `vision` and `text_init` (written to OUTPUT/init first).
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        state::check_fresh_output(&out)?;
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let from = match &cfg.init {
            Some(i) => PathBuf::from(i),
            None => materialize_init(&cfg, &out)?,
        };
        let order = Order::new(cfg.seed);
        Self::build(cfg, &from, order, 0, None)
    }

    /// Continues the run saved in `out`, from its checkpoint.
    pub fn resume(out: &Path) -> Result<Self> {
        let (st, _, opt) = state::read_resume(out)?;
        Self::build(
            st.config,
            &checkpoint_dir(out),
            st.order,
            st.step,
            Some(opt),
        )
    }

    fn build(
        cfg: TrainConfig,
        from: &Path,
        order: Order,
        step: usize,
        opt_state: Option<HashMap<String, Tensor>>,
    ) -> Result<Self> {
        let dev = cfg.device.open()?;
        let out = cfg.output_dir()?.to_path_buf();
        let blip2 = Blip2Config::from_file(&from.join("config.json"))?;
        let w = from.join("model.safetensors");
        let all = candle_core::safetensors::load(&w, &dev).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        let mut tower = HashMap::new();
        let mut vars = Vec::new();
        for (k, t) in all {
            match k.strip_prefix("vision_model.") {
                Some(rest) => {
                    tower.insert(rest.to_string(), t);
                }
                None => vars.push((k, Var::from_tensor(&t.to_dtype(DType::F32)?)?)),
            }
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        if !vars.iter().any(|(n, _)| n == "temp") {
            vars.push((
                "temp".into(),
                Var::from_tensor(&Tensor::new(0.07f32, &dev)?)?,
            ));
        }
        let tokenizer = TextTokenizer::from_dir(from, MAX_TEXT)?;
        let bos = tokenizer
            .inner()
            .and_then(|t| t.token_to_id(DEC))
            .ok_or_else(|| {
                Error::Report(format!(
                    "{}: the tokenizer has no {DEC} (BLIP-2's captioning token)",
                    from.display()
                ))
            })?;
        let pp = from.join("preprocessor_config.json");
        let proc = ImageProcessor::new(match &blip2.cnn {
            Some(cnn) => cnn.processor(),
            None if pp.is_file() => ImageProcessorConfig::from_file(&pp)?,
            // BlipImageProcessor's rule, which is Chinese-CLIP's.
            None => {
                ImageProcessorConfig::chinese_clip_default(blip2.vision_config.image_size as u32)
            }
        });
        let (set, per_image) = order::training_pairs(&cfg)?;
        let cache = feature_tokens(&cfg, &blip2, &tower, &proc, &set.images, &dev)?;
        let opt = GroupedAdamW::for_run(&vars, &cfg, opt_state.as_ref(), step)?;
        let me = Self {
            objectives: cfg.qformer_objectives()?,
            cfg,
            out,
            dev,
            blip2,
            tower,
            vars,
            opt,
            tokenizer,
            tokenizer_dir: from.to_path_buf(),
            bos,
            proc,
            cache,
            set,
            per_image,
            order,
            step,
        };
        // The heads must build from the tensors (names and shapes).
        me.heads()?;
        Ok(me)
    }

    /// The Q-Former and its heads over the variables' own tensors, so
    /// gradients reach them.
    fn heads(&self) -> Result<QFormerHeads> {
        let t: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let vb = VarBuilder::from_tensors(t, DType::F32, &self.dev);
        QFormerHeads::load(
            vb,
            &self.blip2.qformer_config,
            self.blip2.num_query_tokens,
            self.blip2.image_text_hidden_size,
        )
    }

    fn temp(&self) -> &Var {
        &self
            .vars
            .iter()
            .find(|(n, _)| n == "temp")
            .expect("built with temp")
            .1
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// One optimiser step on distinct photos, each with one caption.
    pub fn step(&mut self, batch: &[(usize, usize)]) -> Result<StepLog> {
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let lr = optim::cosine_lr(self.step, cfg.lr, cfg.warmup_steps(), cfg.steps);
        self.opt.set_lr(lr);
        let images: Vec<usize> = batch.iter().map(|p| p.0).collect();
        let feats = self.cache.batch(&images, &self.dev)?;
        let texts = order::batch_texts(&self.set, batch);
        let (ids, mask) = self.tokenizer.encode(&texts)?.to_tensors(true, &self.dev)?;
        let (ids, mask) = (ids.to_dtype(DType::U32)?, mask.to_dtype(DType::F32)?);
        let heads = self.heads()?;
        let wants = |n: &str| {
            self.objectives
                .iter()
                .find(|(o, _)| o == n)
                .map(|(_, w)| *w)
        };
        let mut parts = BTreeMap::new();
        let mut total: Option<Tensor> = None;
        let mut add = |name: &str, w: f64, l: &Tensor| -> Result<()> {
            parts.insert(name.to_string(), l.to_scalar::<f32>()? as f64);
            let wl = (l * w)?;
            total = Some(match total.take() {
                Some(t) => (t + wl)?,
                None => wl,
            });
            Ok(())
        };
        {
            let _graph = clasp_core::model::grad_mode_guard(true);
            if wants("itc").is_some() || wants("itm").is_some() {
                // The hard negatives are the step's draw: a resumed run draws
                // the same.
                let mut rng = Rng(cfg.seed ^ 0x0017_C17E ^ ((self.step as u64) << 24));
                let mut draw = draw_with(&mut rng);
                let s = itc_itm(
                    &heads,
                    &feats,
                    &images,
                    &ids,
                    &mask,
                    self.temp().as_tensor(),
                    &mut draw,
                )?;
                if let Some(w) = wants("itc") {
                    add("itc", w, &s.itc)?;
                }
                if let Some(w) = wants("itm") {
                    add("itm", w, &s.itm)?;
                }
            }
            if let Some(w) = wants("itg") {
                let (l, _) = heads.itg_loss(&feats, &ids, &mask, self.bos)?;
                add("itg", w, &l)?;
            }
        }
        let total = total.expect("a Q-Former run has at least one objective");
        let lv = optim::backward_step(
            &total,
            self.step + 1,
            &self.vars,
            &mut self.opt,
            cfg.grad_clip,
        )?;
        // LAVIS keeps the temperature in [0.001, 0.5].
        let temp = self.temp().clone();
        temp.set(&temp.as_tensor().clamp(0.001f32, 0.5f32)?)?;
        self.step += 1;
        Ok(StepLog {
            step: self.step,
            loss: lv,
            lr,
            temperature: temp.as_tensor().to_scalar::<f32>()? as f64,
            images_per_s: batch.len() as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: None,
            grad_conflict: None,
            losses: Some(parts),
            skipped: Vec::new(),
            dev: None,
            comm_s: None,
            data_wait_s: None,
        })
    }

    /// Every tensor of the checkpoint: the tower's and the learned ones.
    fn checkpoint_tensors(&self) -> HashMap<String, Tensor> {
        let mut t: HashMap<String, Tensor> = self
            .tower
            .iter()
            .map(|(k, v)| (format!("vision_model.{k}"), v.clone()))
            .collect();
        t.extend(
            self.vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone())),
        );
        t
    }

    fn save_at(&self, order: &Order) -> Result<()> {
        // A run resumed from its checkpoint reads the tokenizer files from the
        // folder being replaced: `write_folder` swaps it in only at the end.
        write_folder(
            &checkpoint_dir(&self.out),
            &blip2_json(
                match &self.blip2.cnn {
                    Some(c) => c.to_vision_json(),
                    None => self.blip2.vision_config.to_hf_json(),
                },
                &self.blip2.qformer_config,
                self.blip2.num_query_tokens,
                self.blip2.image_text_hidden_size,
            ),
            &self.checkpoint_tensors(),
            &match self.blip2.cnn {
                Some(_) => self.proc.config().to_hf_json(),
                None => blip_processor_json(self.proc.config())?,
            },
            |dir| copy_tokenizer(&self.tokenizer_dir, dir),
        )?;
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        state::write(&self.out, &self.opt.state().into_iter().collect(), &st)
    }
}

/// The tower's feature-map tokens of every training photo, computed once
/// (and kept on disk for the next run on the same tower and photos).
fn feature_tokens(
    cfg: &TrainConfig,
    blip2: &Blip2Config,
    tower: &HashMap<String, Tensor>,
    proc: &ImageProcessor,
    images: &[ImageSource],
    dev: &Device,
) -> Result<Arc<FeatureCache>> {
    let vb = VarBuilder::from_tensors(tower.clone(), DType::F32, dev);
    let net = Blip2Tower::load(vb, blip2)?;
    let v = &blip2.vision_config;
    let mut named: Vec<(String, Tensor)> =
        tower.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let src = Source {
        encode: &|px| net.features(px),
        what: "tokens",
        proc,
        images,
        shape: (3, v.image_size, v.image_size),
        seed: cfg.seed,
        device: dev,
    };
    Ok(Arc::new(FeatureCache::load_or_fill(&src, &named)?))
}

impl Task for QFormerTrainer {
    crate::task_fields!(pairs);
    fn prepare(&self, start: usize) -> Prepare {
        let (proc, images, cache) = (
            self.proc.clone(),
            self.set.images.clone(),
            self.cache.clone(),
        );
        Box::new(move |n, k, pair: &(usize, usize)| {
            // A photo the cache could not read is read again, so the run
            // meets (and skips) its error.
            if cache.has(pair.0) {
                return Ok(Vec::new());
            }
            let plain = order::Augment {
                crop_scale: 1.0,
                jitter: None,
                seed: 0,
            };
            order::prepare_image(&proc, &images[pair.0], plain, start + n, k)
        })
    }
    /// ITC and ITM need a negative in the batch.
    fn min_batch(&self) -> usize {
        2
    }
    fn step(&mut self, batch: &[(usize, usize)], _pixels: &[Vec<f32>]) -> Result<StepLog> {
        QFormerTrainer::step(self, batch)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        QFormerTrainer::save_at(self, order)
    }
}

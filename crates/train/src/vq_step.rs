//! The VQ run's construction, step, checkpoint and its place in the loop.

use super::*;

impl VqTrainer {
    /// A new run: from `init` (a VQ folder), or a fresh model of the run's
    /// `vq_*` size written to OUTPUT/init first.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        cfg.check()?;
        let out = cfg.output_dir()?.to_path_buf();
        state::check_fresh_output(&out)?;
        std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
        let from = match &cfg.init {
            Some(i) => PathBuf::from(i),
            None => {
                let dev = cfg.device.open()?;
                let arch = cfg.vq.architecture();
                let init = out.join("init");
                let t = initial_tensors(&arch, cfg.seed, &dev)?;
                write_folder(&init, &arch, &t, &cfg.vq.processor())?;
                init
            }
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
        let arch = Emu3VqConfig::from_file(&from.join("config.json"))?;
        let w = from.join("model.safetensors");
        let all = candle_core::safetensors::load(&w, &dev).map_err(|e| Error::Weights {
            path: w.clone(),
            reason: e.to_string(),
        })?;
        let mut vars: Vec<(String, Var)> = all
            .into_iter()
            .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
            .map(|(k, t)| Ok((k, Var::from_tensor(&t.to_dtype(DType::F32)?)?)))
            .collect::<Result<_>>()?;
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let mut opt_state = opt_state;
        let usage = match opt_state.as_mut().and_then(|s| s.remove(USAGE)) {
            Some(u) => u.to_vec1()?,
            None => vec![0f32; arch.codebook_size],
        };
        let opt = GroupedAdamW::for_run(&vars, &cfg, opt_state.as_ref(), step)?;
        let side = cfg.vq.vq_image_size as u32;
        let saved_proc = match from.join("preprocessor_config.json") {
            p if p.is_file() => ImageProcessorConfig::from_file(&p)?,
            _ => cfg.vq.processor(),
        };
        let mut train = saved_proc.clone();
        train.resize = ResizeTo::Exact {
            height: side,
            width: side,
        };
        let (set, per_image) = order::training_pairs(&cfg)?;
        let me = Self {
            order,
            cfg,
            out,
            dev,
            arch,
            vars,
            opt,
            train_proc: ImageProcessor::new(train),
            saved_proc,
            set,
            per_image,
            usage,
            step,
        };
        me.model()?;
        Ok(me)
    }

    /// The model over the variables' own tensors, so gradients reach them.
    fn model(&self) -> Result<Emu3Vq> {
        let t: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        Emu3Vq::load(
            VarBuilder::from_tensors(t, DType::F32, &self.dev),
            &self.arch,
        )
    }

    fn codebook(&self) -> &Var {
        &self
            .vars
            .iter()
            .find(|(n, _)| n == "quantize.embedding.weight")
            .expect("a VQ model has a codebook")
            .1
    }

    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// One optimiser step on a batch of processed images.
    pub fn step(&mut self, pixels: &[Vec<f32>]) -> Result<StepLog> {
        let t0 = Instant::now();
        let cfg = &self.cfg;
        let lr = optim::cosine_lr(self.step, cfg.lr, cfg.warmup_steps(), cfg.steps);
        self.opt.set_lr(lr);
        let side = cfg.vq.vq_image_size;
        let flat: Vec<f32> = pixels.iter().flatten().copied().collect();
        let x = Tensor::from_vec(flat, (pixels.len(), 3, side, side), &self.dev)?;
        let vq = self.model()?;
        let mut parts = BTreeMap::new();
        let (total, codes, z_rows) = {
            let _graph = clasp_core::model::grad_mode_guard(true);
            let latents = vq.latents(&x)?;
            let codes = vq.quantize(&latents.detach())?;
            // z: [B, T', E, h, w] to [B, E, T', h, w], the embeddings' layout.
            let z = latents.permute((0, 2, 1, 3, 4))?.contiguous()?;
            let e = vq.embed_codes(&codes)?.contiguous()?;
            // The codebook moves to the latents; the latents commit to it.
            let codebook_loss = (z.detach() - &e)?.sqr()?.mean_all()?;
            let commit = (&z - e.detach())?.sqr()?.mean_all()?;
            let straight = (&z + (e.detach() - &z)?.detach())?;
            let recon = vq.decode_embedded(&straight, true)?;
            let l1 = (recon - &x)?.abs()?.mean_all()?;
            let total = ((&l1 + &codebook_loss)? + (commit.clone() * cfg.vq.vq_beta)?)?;
            parts.insert("recon_l1".to_string(), l1.to_scalar::<f32>()? as f64);
            parts.insert(
                "codebook".to_string(),
                codebook_loss.to_scalar::<f32>()? as f64,
            );
            parts.insert("commit".to_string(), commit.to_scalar::<f32>()? as f64);
            let rows = z
                .permute((0, 2, 3, 4, 1))?
                .reshape(((), self.arch.embed_dim))?
                .detach();
            (total, codes, rows)
        };
        let lv = optim::backward_step(
            &total,
            self.step + 1,
            &self.vars,
            &mut self.opt,
            cfg.grad_clip,
        )?;
        self.step += 1;

        // Codebook use: this batch's perplexity, and the restart check.
        let used: Vec<u32> = codes.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
        let mut counts = vec![0f64; self.arch.codebook_size];
        for &c in &used {
            counts[c as usize] += 1.0;
            self.usage[c as usize] += 1.0;
        }
        let (perplexity, codes_used) = clasp_core::model::emu3_vq::codebook_usage(&counts);
        parts.insert("perplexity".into(), perplexity);
        parts.insert("codes_used".into(), codes_used as f64);
        let every = cfg.vq.vq_restart_every;
        // The first step's check seeds the unused codes from the data (the
        // fresh codebook sits far from the encoder's first latents).
        if every > 0 && (self.step == 1 || self.step.is_multiple_of(every)) {
            let restarted = self.restart_dead(&z_rows)?;
            parts.insert("restarted".into(), restarted as f64);
        }
        Ok(StepLog {
            step: self.step,
            loss: lv,
            lr,
            temperature: 0.0,
            images_per_s: pixels.len() as f64 / t0.elapsed().as_secs_f64(),
            group_grad_norms: None,
            grad_conflict: None,
            losses: Some(parts),
            skipped: Vec::new(),
            dev: None,
            comm_s: None,
            data_wait_s: None,
        })
    }

    /// Moves every code unused since the last check onto a latent of the
    /// batch (drawn by the run's seed and step); the count.
    fn restart_dead(&mut self, rows: &Tensor) -> Result<usize> {
        let dead: Vec<usize> = (0..self.usage.len())
            .filter(|&c| self.usage[c] == 0.0)
            .collect();
        self.usage.iter_mut().for_each(|u| *u = 0.0);
        if dead.is_empty() {
            return Ok(0);
        }
        let rows: Vec<Vec<f32>> = rows.to_vec2()?;
        let mut rng = Rng(self.cfg.seed ^ 0xDEAD_C0DE ^ ((self.step as u64) << 16));
        let mut book: Vec<Vec<f32>> = self.codebook().as_tensor().to_vec2()?;
        for &c in &dead {
            book[c] = rows[rng.below(rows.len())].clone();
        }
        let t = Tensor::new(book, &self.dev)?;
        self.codebook().set(&t)?;
        Ok(dead.len())
    }

    fn checkpoint_tensors(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    fn save_at(&self, order: &Order) -> Result<()> {
        write_folder(
            &checkpoint_dir(&self.out),
            &self.arch,
            &self.checkpoint_tensors(),
            &self.saved_proc,
        )?;
        let st = State {
            step: self.step,
            order: order.clone(),
            config: self.cfg.clone(),
        };
        let mut tensors: HashMap<String, Tensor> = self.opt.state().into_iter().collect();
        tensors.insert(USAGE.into(), Tensor::new(self.usage.as_slice(), &self.dev)?);
        state::write(&self.out, &tensors, &st)
    }
}

impl Task for VqTrainer {
    crate::task_fields!(pairs);
    fn prepare(&self, start: usize) -> Prepare {
        let (proc, images) = (self.train_proc.clone(), self.set.images.clone());
        Box::new(move |n, k, pair: &(usize, usize)| {
            let plain = order::Augment {
                crop_scale: 1.0,
                jitter: None,
                seed: 0,
            };
            order::prepare_image(&proc, &images[pair.0], plain, start + n, k)
        })
    }
    fn min_batch(&self) -> usize {
        1
    }
    fn step(&mut self, _batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        VqTrainer::step(self, pixels)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        VqTrainer::save_at(self, order)
    }
}

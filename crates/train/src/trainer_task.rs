//! [`Task`] for the contrastive [`Trainer`]: what the one training loop
//! ([`super::super::run`]) asks of it; and EWC's Fisher pass after the run.

use super::*;

impl Task for Trainer {
    crate::task_fields!();
    fn images(&self) -> &[ImageSource] {
        &self.set.images
    }
    fn draw(&self, order: &mut Order, n: usize) -> Vec<Vec<(usize, usize)>> {
        Trainer::draw(self, order, n)
    }
    fn prepare(&self, start: usize) -> Prepare {
        let (proc, aug, images) = (self.proc.clone(), self.augment(), self.set.images.clone());
        let cache = self.cache.clone();
        // Augmentation is seeded by the position in the global batch.
        let at = self.dist.rank() * self.cfg.batch_size;
        Box::new(move |n, k, pair: &(usize, usize)| {
            // Cached images need no pixels; an image the cache could not
            // read is read again, so the run meets (and skips) its error.
            if cache.as_ref().is_some_and(|c| c.has(pair.0)) {
                return Ok(Vec::new());
            }
            order::prepare_image(&proc, &images[pair.0], aug, start + n, at + k)
        })
    }
    /// A contrastive loss needs a negative in the batch.
    fn min_batch(&self) -> usize {
        2
    }
    fn step(&mut self, batch: &[(usize, usize)], pixels: &[Vec<f32>]) -> Result<StepLog> {
        Trainer::step(self, batch, pixels)
    }
    fn save_at(&self, order: &Order) -> Result<()> {
        Trainer::save_at(self, order)
    }
    fn group(&self) -> &dyn crate::dist::Collective {
        self.dist.as_ref()
    }
    /// EWC's Fisher, when the config asks for it.
    fn finish(&mut self, progress: &dyn TrainProgress) -> Result<()> {
        if self.cfg.fisher_batches > 0 {
            self.fisher(progress)?;
        }
        Ok(())
    }
}

impl Trainer {
    /// EWC's diagonal Fisher for this task, on unaugmented batches in a
    /// fresh seeded order with the current weights, saved with the
    /// checkpoint.
    pub fn fisher(&self, progress: &dyn Progress) -> Result<()> {
        let mut o = Order::new(self.cfg.seed.wrapping_add(0xF15E));
        let mut sum = crate::ewc::FisherSum::default();
        progress.start("fisher", self.cfg.fisher_batches as u64);
        let plain = Augment {
            crop_scale: 1.0,
            jitter: None,
            seed: self.cfg.seed,
        };
        for k in 0..self.cfg.fisher_batches {
            let b = o.next_batch(&self.per_image, self.cfg.batch_size);
            let pixels = b
                .iter()
                .enumerate()
                .map(|(pos, (i, _))| {
                    order::prepare_image(&self.proc, &self.set.images[*i], plain, k, pos)
                })
                .collect::<Result<Vec<_>>>()?;
            let (ids, mask) = self
                .tokenizer
                .encode(&order::batch_texts(&self.set, &b))?
                .to_tensors(true, &self.dev)?;
            let images = Images::Pixels(self.pixel_tensor(&pixels)?);
            let inputs = crate::step::Inputs {
                images: &images,
                ids: &ids,
                mask: &mask,
                locked: crate::step::Locked {
                    image: self.frozen.as_ref().filter(|_| self.cfg.lock_image),
                    text: self.frozen.as_ref().filter(|_| self.cfg.lock_text),
                },
                teacher: None,
            };
            let (_, g) = crate::step::contrastive_grads(
                &self.t.model,
                &objectives::InfoNce,
                &inputs,
                None,
                &self.opt_vars,
                self.cfg.accum_freq,
            )?;
            sum.add(&self.opt_vars, &g)?;
            progress.inc(1);
        }
        progress.finish();
        sum.save(
            &self.opt_vars,
            &checkpoint_dir(&self.out).join(crate::ewc::FISHER_FILE),
        )
    }
}

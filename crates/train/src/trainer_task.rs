//! [`Task`] for the contrastive [`Trainer`]: what the one training loop
//! ([`super::super::run`]) asks of it.

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
    fn writer(&self) -> bool {
        self.dist.rank() == 0
    }
    fn agree_stop(&self, stop: bool) -> Result<bool> {
        crate::dist::any(self.dist.as_ref(), stop)
    }
    /// EWC's Fisher, when the config asks for it.
    fn finish(&mut self, progress: &dyn TrainProgress) -> Result<()> {
        if self.cfg.fisher_batches > 0 {
            self.fisher(progress)?;
        }
        Ok(())
    }
}

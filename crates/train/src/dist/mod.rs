//! Data parallelism: the collective operations ranks share, and the tensor
//! steps built on them (features gathered with their gradient, gradients
//! all-reduced).
//!
//! [`Collective`] is what a step needs of the process group: a sum over
//! ranks, a gather in rank order, a barrier and an abort. [`Single`] is the
//! one-process group (every operation the identity); `mpi` (cargo feature
//! `mpi`) is the group `mpirun`/`srun` starts, through rsmpi. The training
//! code knows only the trait, so a NCCL group (CUDA) would be one more
//! implementation of it.

use std::sync::Arc;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::{Error, Result};

#[cfg(feature = "mpi")]
pub mod mpi;
pub mod step;

/// A group of ranks running the same program on different data.
pub trait Collective: Send + Sync {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Element-wise sum over ranks, in place (the same length on every rank).
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `local` concatenated in rank order, and each rank's
    /// length (lengths may differ between ranks).
    fn all_gather(&self, local: &[f32]) -> Result<(Vec<f32>, Vec<usize>)>;
    /// Returns when every rank has called it.
    fn barrier(&self);
    /// Ends every rank of the job now (a rank that cannot go on must not
    /// leave the others waiting in a collective).
    fn abort(&self, code: i32) -> !;
    /// What the group is, for messages ("MPI (Open MPI v4.1.4)").
    fn describe(&self) -> String;
    /// Seconds spent in collective operations so far (0 alone).
    fn comm_seconds(&self) -> f64 {
        0.0
    }
}

/// One process alone.
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        Ok((local.to_vec(), vec![local.len()]))
    }
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// The group this process was started in: MPI's when a launcher
/// (`mpirun`, `mpiexec`, `srun`) started it with more than one rank and
/// clasp was built with the `mpi` feature, else [`Single`]. Started by a
/// launcher without the feature, it says so rather than train N copies.
pub fn from_launcher() -> Result<Arc<dyn Collective>> {
    let size = launcher_world_size();
    if size <= 1 {
        return Ok(Arc::new(Single));
    }
    #[cfg(feature = "mpi")]
    {
        Ok(Arc::new(mpi::Mpi::init()?))
    }
    #[cfg(not(feature = "mpi"))]
    Err(Error::Report(format!(
        "started by an MPI launcher with {size} ranks, but this clasp was built without MPI: \
         build it with `cargo build --release --features mpi` (needs an MPI library and \
         libclang, e.g. apt install libopenmpi-dev libclang-dev)"
    )))
}

/// The world size a launcher announced in the environment (1: none).
/// Open MPI sets `OMPI_COMM_WORLD_SIZE`, MPICH's Hydra and Slurm's PMI
/// `PMI_SIZE`, PMIx launchers `PMIX_SIZE`... (Slurm's `SLURM_NTASKS` alone is
/// not enough: it is also set inside a job step of one task.)
pub fn launcher_world_size() -> usize {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok())
    .filter_map(|v| v.trim().parse::<usize>().ok())
    .max()
    .unwrap_or(1)
}

/// Whether `flag` holds on any rank (every rank gets the same answer).
pub fn any(c: &dyn Collective, flag: bool) -> Result<bool> {
    if c.world() == 1 {
        return Ok(flag);
    }
    let mut v = [flag as u8 as f32];
    c.all_reduce_sum(&mut v)?;
    Ok(v[0] > 0.0)
}

/// `t` [n, ...] of every rank stacked in rank order, without a graph, and the
/// first row of this rank's part.
pub fn gather_rows(c: &dyn Collective, t: &Tensor) -> Result<(Tensor, usize)> {
    let dims = t.dims().to_vec();
    let row: usize = dims[1..].iter().product();
    let local = t
        .detach()
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (all, counts) = c.all_gather(&local)?;
    let offset = counts[..c.rank()].iter().sum::<usize>() / row.max(1);
    let mut shape = dims;
    shape[0] = all.len() / row.max(1);
    Ok((
        Tensor::from_vec(all, shape, t.device())?.to_dtype(t.dtype())?,
        offset,
    ))
}

/// Elements per all-reduce call: gradients go in buckets of this size (4M
/// floats, 16 MB), so the staging buffer stays small whatever the model.
const BUCKET: usize = 1 << 22;

/// Sums `vars`' gradients over ranks and divides by the world size (the mean
/// a data-parallel step applies), bucketed; `extra` (a loss, a flag) rides
/// along in the last bucket and comes back summed. A var without a gradient
/// on this rank counts as zeros, so every rank sends the same layout.
pub fn all_reduce_grads(
    c: &dyn Collective,
    vars: &[(String, Var)],
    grads: &mut GradStore,
    extra: &mut [f32],
) -> Result<()> {
    let world = c.world() as f64;
    // Sums a bucket (with `tail` appended, summed too) and puts each
    // member's mean back in `grads`.
    let flush = |bucket: &mut Vec<f32>,
                 members: &mut Vec<&Var>,
                 grads: &mut GradStore,
                 tail: &mut [f32]| {
        let n = bucket.len();
        bucket.extend_from_slice(tail);
        c.all_reduce_sum(bucket)?;
        tail.copy_from_slice(&bucket[n..]);
        let mut at = 0;
        for v in members.drain(..) {
            let t = v.as_tensor();
            let k = t.elem_count();
            let sum = Tensor::from_slice(&bucket[at..at + k], t.shape(), t.device())?;
            grads.insert(t, sum.affine(1.0 / world, 0.0)?.to_dtype(t.dtype())?);
            at += k;
        }
        bucket.clear();
        Ok::<_, Error>(())
    };
    let mut bucket: Vec<f32> = Vec::with_capacity(BUCKET);
    let mut members: Vec<&Var> = Vec::new();
    for (_, v) in vars {
        let t = v.as_tensor();
        if !bucket.is_empty() && bucket.len() + t.elem_count() > BUCKET {
            flush(&mut bucket, &mut members, grads, &mut [])?;
        }
        match grads.get(t) {
            Some(g) => bucket.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            None => bucket.extend(std::iter::repeat_n(0f32, t.elem_count())),
        }
        members.push(v);
    }
    flush(&mut bucket, &mut members, grads, extra)
}

/// A loss that is a mean over tokens (`tokens` of them on this rank, mean
/// `loss`) and its gradients, made the mean over every rank's tokens, as one
/// process would take it over the global batch: each rank weighs its
/// gradient by its share of the tokens, then the ranks' mean is taken.
/// Returns the global loss (one process alone: `loss`, untouched).
pub fn token_mean(
    c: &dyn Collective,
    vars: &[(String, Var)],
    grads: &mut GradStore,
    tokens: usize,
    loss: f64,
) -> Result<f64> {
    if c.world() == 1 {
        return Ok(loss);
    }
    let mut all = [tokens as f32];
    c.all_reduce_sum(&mut all)?;
    let weight = tokens as f64 * c.world() as f64 / all[0].max(1.0) as f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            let scaled = g.affine(weight, 0.0)?;
            grads.insert(v.as_tensor(), scaled);
        }
    }
    let mut extra = [(loss * weight) as f32];
    all_reduce_grads(c, vars, grads, &mut extra)?;
    Ok(extra[0] as f64 / c.world() as f64)
}

/// Fails, naming the ranks, unless every rank holds the same `vars` (they
/// start from the same checkpoint or seed; a rank that read another
/// checkpoint would silently train a different model). A checksum of each
/// rank's values is gathered.
pub fn check_same_weights(c: &dyn Collective, vars: &[(String, Var)]) -> Result<()> {
    if c.world() == 1 {
        return Ok(());
    }
    let mut h = blake3::Hasher::new();
    for (name, v) in vars {
        h.update(name.as_bytes());
        let x = v
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for f in x {
            h.update(&f.to_le_bytes());
        }
    }
    // The digest's first 8 bytes as four 16-bit integers, each exact in f32.
    let b = h.finalize();
    let mine: Vec<f32> = b.as_bytes()[..8]
        .chunks(2)
        .map(|p| u16::from_le_bytes([p[0], p[1]]) as f32)
        .collect();
    let (all, _) = c.all_gather(&mine)?;
    let differ: Vec<usize> = all
        .chunks(mine.len())
        .enumerate()
        .filter(|(_, h)| *h != &mine[..])
        .map(|(r, _)| r)
        .collect();
    if differ.is_empty() {
        Ok(())
    } else {
        Err(Error::Report(format!(
            "rank {} holds other starting weights than ranks {differ:?}: every rank must start \
             from the same checkpoint (a shared --init or --resume directory)",
            c.rank()
        )))
    }
}

/// The rows [rank·B, (rank+1)·B) of a global batch of `world`·B: this rank's
/// share, so that the ranks together take exactly what one process would
/// take at the global batch.
pub fn share<T: Clone>(c: &dyn Collective, global: &[T]) -> Vec<T> {
    global[share_start(c, global.len())..share_start_of(c.rank() + 1, c.world(), global.len())]
        .to_vec()
}

/// Where this rank's share of a global batch of `n` begins.
pub fn share_start(c: &dyn Collective, n: usize) -> usize {
    share_start_of(c.rank(), c.world(), n)
}

fn share_start_of(rank: usize, world: usize, n: usize) -> usize {
    rank * n / world
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objectives::{Batch, DistilledInfoNce, InfoNce, Objective, SigLip, Teacher};
    use candle_core::Device;

    /// `n` random unit rows of width `d`.
    fn unit_rows(n: usize, d: usize) -> Tensor {
        let t = Tensor::randn(0f32, 1.0, (n, d), &Device::Cpu).unwrap();
        clasp_core::model::l2_normalize(&t).unwrap()
    }

    /// The mean of every rank's local loss over its rows is the batch's
    /// loss: what lets `--local-loss` keep the global gradient.
    #[test]
    fn local_losses_average_to_the_global_loss() {
        let (n, d) = (6, 5);
        let (img, txt) = (unit_rows(n, d), unit_rows(n, d));
        let (ti, tt) = (unit_rows(n, d), unit_rows(n, d));
        let log_scale = Tensor::new(2.0f32, &Device::Cpu).unwrap();
        let bias = Tensor::new(-1.5f32, &Device::Cpu).unwrap();
        let teacher = Teacher {
            image: &ti,
            text: &tt,
            log_scale: &log_scale,
        };
        let b = Batch {
            image: &img,
            text: &txt,
            log_scale: &log_scale,
            bias: Some(&bias),
            teacher: Some(teacher),
        };
        let objectives: [&dyn Objective; 3] = [&InfoNce, &SigLip, &DistilledInfoNce { alpha: 0.4 }];
        for o in objectives {
            let global = o.loss(&b).unwrap().to_scalar::<f32>().unwrap();
            for parts in [vec![0..3, 3..6], vec![0..2, 2..4, 4..6]] {
                let k = parts.len() as f32;
                let mean: f32 = parts
                    .into_iter()
                    .map(|r| {
                        o.local_loss(&b, r)
                            .unwrap()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap()
                    })
                    .sum::<f32>()
                    / k;
                assert!(
                    (mean - global).abs() < 1e-5,
                    "{}: {mean} vs {global}",
                    o.name()
                );
            }
        }
    }

    /// Rank `.0` of `.1` ranks that all hold the same values: a sum
    /// multiplies each element by the world size.
    struct Same(usize, usize);
    impl Collective for Same {
        fn rank(&self) -> usize {
            self.0
        }
        fn world(&self) -> usize {
            self.1
        }
        fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
            buf.iter_mut().for_each(|x| *x *= self.1 as f32);
            Ok(())
        }
        fn all_gather(&self, l: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
            Ok((l.repeat(self.1), vec![l.len(); self.1]))
        }
        fn barrier(&self) {}
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
        fn describe(&self) -> String {
            String::new()
        }
    }

    /// Gradients over several buckets come back as the ranks' mean, each in
    /// its place; a var without a gradient gets zeros; `extra` is summed.
    #[test]
    fn gradients_across_buckets_come_back_averaged_in_place() {
        let dev = Device::Cpu;
        let sizes = [BUCKET - 5, 7, BUCKET + 3, 11];
        let vars: Vec<(String, Var)> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("v{i}"), Var::zeros(n, DType::F32, &dev).unwrap()))
            .collect();
        // A store from a backward (GradStore has no public constructor).
        let mut grads = vars[0].1.as_tensor().sum_all().unwrap().backward().unwrap();
        for (i, (_, v)) in vars.iter().enumerate() {
            if i != 1 {
                let g = Tensor::arange(0f32, sizes[i] as f32, &dev).unwrap();
                grads.insert(v.as_tensor(), (g + i as f64).unwrap());
            }
        }
        let mut extra = [1.5f32, -2.0];
        all_reduce_grads(&Same(0, 2), &vars, &mut grads, &mut extra).unwrap();
        assert_eq!(extra, [3.0, -4.0]);
        for (i, (_, v)) in vars.iter().enumerate() {
            let g: Vec<f32> = grads.get(v.as_tensor()).unwrap().to_vec1().unwrap();
            assert_eq!(g.len(), sizes[i]);
            for k in [0, sizes[i] / 2, sizes[i] - 1] {
                let want = if i == 1 { 0.0 } else { (k + i) as f32 };
                assert_eq!(g[k], want, "var {i} element {k}");
            }
        }
    }

    #[test]
    fn shares_split_a_global_batch_in_rank_order() {
        let global: Vec<usize> = (0..8).collect();
        let all: Vec<usize> = (0..2).flat_map(|r| share(&Same(r, 2), &global)).collect();
        assert_eq!(all, global);
        assert_eq!(share(&Same(1, 2), &global), vec![4, 5, 6, 7]);
        assert_eq!(share_start(&Same(1, 2), 8), 4);
    }
}

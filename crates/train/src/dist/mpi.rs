//! The MPI process group (cargo feature `mpi`), through rsmpi: the ranks
//! `mpirun -np N`, `mpiexec` or `srun` started.

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::Collective;
use crate::{Error, Result};

/// MPI_COMM_WORLD, initialised once; finalised when dropped.
pub struct Mpi {
    // Declared before `universe`: the communicator goes first.
    world: SimpleCommunicator,
    /// Nanoseconds spent in collectives.
    busy_ns: AtomicU64,
    _universe: Universe,
}

// SAFETY: rsmpi's handles are not marked Send/Sync because MPI's thread
// level decides it. `init` asks for MPI_THREAD_SERIALIZED, and clasp calls the
// group only from the training loop's thread (the image workers never touch
// it), so calls never overlap.
unsafe impl Send for Mpi {}
// SAFETY: as above: one thread at a time calls into MPI.
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialises MPI (once per process).
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Report("MPI was already initialised in this process".into()))?;
        if level < mpi::Threading::Serialized {
            tracing::warn!("the MPI library offers thread level {level:?}, below Serialized");
        }
        let world = universe.world();
        Ok(Self {
            world,
            busy_ns: AtomicU64::new(0),
            _universe: universe,
        })
    }
}

impl Mpi {
    fn count(&self, since: Instant) {
        self.busy_ns
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let t = Instant::now();
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        self.count(t);
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<(Vec<f32>, Vec<usize>)> {
        let t = Instant::now();
        let n = self.world();
        let mut counts = vec![0i32; n];
        self.world
            .all_gather_into(&(local.len() as i32), &mut counts[..]);
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |at, c| {
                let d = *at;
                *at += c;
                Some(d)
            })
            .collect();
        let total: i32 = counts.iter().sum();
        let mut all = vec![0f32; total as usize];
        {
            let mut part = PartitionMut::new(&mut all[..], &counts[..], &displs[..]);
            self.world.all_gather_varcount_into(local, &mut part);
        }
        self.count(t);
        Ok((all, counts.into_iter().map(|c| c as usize).collect()))
    }
    fn barrier(&self) {
        self.world.barrier();
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn comm_seconds(&self) -> f64 {
        self.busy_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }
    fn describe(&self) -> String {
        let v = mpi::environment::library_version().unwrap_or_else(|_| "MPI".into());
        format!(
            "{} ranks over MPI ({})",
            self.world(),
            v.lines().next().unwrap_or("").trim()
        )
    }
}

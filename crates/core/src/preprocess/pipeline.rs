//! The image-batch pipeline every front end shares: a worker thread prepares
//! batch n + 1 (its items in parallel) while the caller consumes batch n, and
//! each item keeps its own result, so a bad image is reported and its batch
//! goes on without it.

use std::sync::mpsc;

use rayon::prelude::*;

use crate::Result;

/// One prepared batch: each job with its result, in the order given.
pub type Prepared<J, T> = Vec<(J, Result<T>)>;

/// Runs `prepare(batch_no, position, &job)` over every job of every batch on
/// a worker thread, one batch ahead of `consume`, which receives each batch
/// in order. `consume` returns `Ok(false)` to stop early (the worker then
/// stops too); its first error ends the run and is returned.
pub fn prepare_ahead<J, T, P, C>(batches: Vec<Vec<J>>, prepare: P, mut consume: C) -> Result<()>
where
    J: Send + Sync,
    T: Send,
    P: Fn(usize, usize, &J) -> Result<T> + Sync,
    C: FnMut(Prepared<J, T>) -> Result<bool>,
{
    let (tx, rx) = mpsc::sync_channel::<Prepared<J, T>>(1);
    std::thread::scope(|s| {
        let prepare = &prepare;
        s.spawn(move || {
            for (n, batch) in batches.into_iter().enumerate() {
                let results: Vec<Result<T>> = batch
                    .par_iter()
                    .enumerate()
                    .map(|(k, j)| prepare(n, k, j))
                    .collect();
                let out = batch.into_iter().zip(results).collect();
                if tx.send(out).is_err() {
                    return; // the consumer stopped
                }
            }
        });
        for b in rx {
            if !consume(b)? {
                break;
            }
        }
        Ok(())
    })
}

/// A prepared batch split into the jobs that worked with their values, and
/// the ones that failed with their errors.
pub fn partition<J, T>(batch: Prepared<J, T>) -> (Vec<J>, Vec<T>, Vec<(J, crate::Error)>) {
    let (mut jobs, mut values, mut failed) = (Vec::new(), Vec::new(), Vec::new());
    for (j, r) in batch {
        match r {
            Ok(v) => {
                jobs.push(j);
                values.push(v);
            }
            Err(e) => failed.push((j, e)),
        }
    }
    (jobs, values, failed)
}

/// `items` cut into batches of `size` (at least 1).
pub fn batches<J>(items: Vec<J>, size: usize) -> Vec<Vec<J>> {
    let mut out = Vec::new();
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(size.max(1)).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_arrive_in_order_with_each_items_own_result() {
        let items: Vec<usize> = (0..10).collect();
        let mut seen = Vec::new();
        prepare_ahead(
            batches(items, 4),
            |n, k, j| {
                if j % 3 == 0 {
                    Err(crate::Error::Report(format!("bad {j}")))
                } else {
                    Ok((n, k, j * 10))
                }
            },
            |b| {
                let (ok, vals, failed) = partition(b);
                seen.push((
                    ok,
                    vals,
                    failed.into_iter().map(|(j, _)| j).collect::<Vec<_>>(),
                ));
                Ok(true)
            },
        )
        .unwrap();
        assert_eq!(seen.len(), 3);
        assert_eq!(seen[0].0, vec![1, 2]);
        assert_eq!(seen[0].1, vec![(0, 1, 10), (0, 2, 20)]);
        assert_eq!(seen[0].2, vec![0, 3]);
        assert_eq!(seen[2].1, vec![(2, 0, 80)]);
        assert_eq!(seen[2].2, vec![9]);
    }

    #[test]
    fn the_consumer_can_stop_early_and_its_error_is_returned() {
        let mut n = 0;
        prepare_ahead(
            batches((0..100).collect::<Vec<u32>>(), 2),
            |_, _, j| Ok(*j),
            |_| {
                n += 1;
                Ok(n < 3)
            },
        )
        .unwrap();
        assert_eq!(n, 3);
        let e = prepare_ahead(
            batches(vec![1u8, 2], 1),
            |_, _, j| Ok(*j),
            |_| Err(crate::Error::Report("stop".into())),
        );
        assert!(e.is_err());
    }
}

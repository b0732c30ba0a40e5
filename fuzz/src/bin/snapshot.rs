//! The files clasp keeps beside a store and maps at search time: the vector
//! snapshot (`STORE.mN.vecs`, read through `Snapshot`) and the HNSW graph
//! (`STORE.mN.gG.hnsw`, viewed by usearch). A file another process, a crash or
//! a disk left behind must be refused or rebuilt, never read out of bounds.
use clasp::index::engine::{ann_path, write_snapshot, AnnIndex, Snapshot};

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let loose = dir.path().join("loose.vecs");
    // A valid snapshot of 8 rows of width 4 beside a store, for the graph.
    let store = dir.path().join("s.sqlite");
    let snap = clasp::index::engine::snapshot_path(&store, 1);
    let rows: Vec<([u8; 32], Vec<f32>)> = (0..8u8)
        .map(|i| {
            let mut h = [0u8; 32];
            h[0] = i;
            let v: Vec<f32> = (0..4).map(|k| ((i as f32) - k as f32).sin()).collect();
            (h, v)
        })
        .collect();
    write_snapshot(&snap, 7, &rows).unwrap();
    afl::fuzz!(|data: &[u8]| {
        // The bytes as a snapshot file: refused, or every row readable.
        let _ = std::fs::write(&loose, data);
        if let Ok(s) = Snapshot::open_file(&loose) {
            assert_eq!(s.matrix().len(), s.n * s.dim);
            for r in 0..s.n.min(64) {
                let _ = (s.hash(r), s.row(r).iter().sum::<f32>());
            }
        }
        // The bytes as the HNSW graph of the valid snapshot: viewed and
        // searched when it claims the snapshot's size, else rebuilt.
        let _ = std::fs::write(ann_path(&store, 1, 7), data);
        if let Ok(a) = AnnIndex::open(&store, 1, Snapshot::open_file(&snap).unwrap()) {
            let _ = a.top_rows(&[0.5, -0.5, 0.25, 1.0], 3);
        }
    });
}

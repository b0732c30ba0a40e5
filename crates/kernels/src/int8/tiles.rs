//! Driving the tile kernels: the row and column blocking over a matrix (`drive`), one tile through the chosen kernel, and the scalar tile every SIMD one must equal.

use super::*;

#[inline(always)]
pub(super) fn encode(v: i8, shift: bool) -> u8 {
    if shift {
        (v as u8) ^ 0x80
    } else {
        v as u8
    }
}

/// One tile's exact products: up to [`MAX_TILE_ROWS`] rows × 2 panels.
pub(super) type Tile = [[i32; 2 * PANEL]; MAX_TILE_ROWS];

/// Runs the tiles of rows `rows` × panels `panels`, handing each finished
/// tile (first row, row count, first channel, channel count) to `sink`.
pub(super) fn drive(
    kernel: Int8Kernel,
    a: &QuantRows,
    rows: std::ops::Range<usize>,
    w: &QuantMatrix,
    panels: std::ops::Range<usize>,
    mut sink: impl FnMut(usize, usize, usize, usize, &Tile),
) {
    // The checks that make every kernel read in bounds: whole panels of
    // kp/4 groups, whole activation rows of kp bytes.
    assert_eq!(a.kp, w.kp, "activation and weight widths differ");
    assert!(rows.end <= a.m && a.data.len() == a.m * a.kp);
    assert!(panels.end <= w.panels() && w.packed.len() == w.panels() * w.kp * PANEL);
    let kernel = kernel.checked();
    let mut tile: Tile = [[0; 2 * PANEL]; MAX_TILE_ROWS];
    #[cfg(target_arch = "x86_64")]
    if kernel == Int8Kernel::Amx {
        amx::drive(a, rows, w, panels, &mut tile, sink);
        return;
    }
    let (mr, np) = kernel.tile();
    let groups = w.kp / GROUP;
    let panel_stride = w.kp * PANEL;
    // Rows in blocks of ROW_BLOCK, all panels for each block: the block's
    // output rows stay in L2 while each panel (kp * 16 bytes) is read from
    // L1 for all of the block's tiles.
    const ROW_BLOCK: usize = 64;
    let mut rb = rows.start;
    while rb < rows.end {
        let rb_end = (rb + ROW_BLOCK).min(rows.end);
        let mut p = panels.start;
        while p < panels.end {
            let pn = np.min(panels.end - p);
            let c0 = p * PANEL;
            let cn = (pn * PANEL).min(w.n - c0);
            let bpanel = &w.packed[p * panel_stride..(p + pn) * panel_stride];
            let mut r = rb;
            while r < rb_end {
                let rn = mr.min(rb_end - r);
                let arows = &a.data[r * a.kp..(r + rn) * a.kp];
                run_tile(kernel, arows, rn, a.kp, bpanel, pn, groups, &mut tile);
                if kernel.unsigned_activations() {
                    for row in tile.iter_mut().take(rn) {
                        for (c, v) in row.iter_mut().take(cn).enumerate() {
                            *v -= 128 * w.colsum[c0 + c];
                        }
                    }
                }
                sink(r, rn, c0, cn, &tile);
                r += rn;
            }
            p += pn;
        }
        rb = rb_end;
    }
}

/// One tile: `rn` activation rows (`arows`, rows of `kp` bytes) against `pn`
/// panels (`b`, each `kp * 16` bytes), into `out[..rn][..pn * 16]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run_tile(
    kernel: Int8Kernel,
    arows: &[u8],
    rn: usize,
    kp: usize,
    b: &[i8],
    pn: usize,
    groups: usize,
    out: &mut Tile,
) {
    // The bounds every kernel relies on, checked here, once per tile.
    assert!((1..=8).contains(&rn) && (1..=2).contains(&pn));
    assert_eq!(arows.len(), rn * kp);
    assert_eq!(b.len(), pn * kp * PANEL);
    assert_eq!(kp, groups * GROUP);
    match kernel {
        Int8Kernel::Scalar => tile_scalar(arows, rn, kp, b, pn, groups, out),
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => {
            assert_eq!(pn, 1, "the AVX2 tile is one panel wide");
            // SAFETY: `drive` only passes kernels this CPU runs (`checked`),
            // and the asserts above give the kernel rn rows of kp bytes and
            // one panel of groups * 64 bytes, which is all it reads.
            unsafe {
                match rn {
                    1 => avx2::tile::<1>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    2 => avx2::tile::<2>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    3 => avx2::tile::<3>(arows.as_ptr(), kp, b.as_ptr(), groups, out),
                    _ => {
                        assert_eq!(rn, 4, "the AVX2 tile has at most 4 rows");
                        avx2::tile::<4>(arows.as_ptr(), kp, b.as_ptr(), groups, out)
                    }
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => {
            let (a, bp, stride) = (arows.as_ptr(), b.as_ptr(), kp * PANEL);
            macro_rules! go {
                ($($r:literal),*) => {
                    match (rn, pn) {
                        $(
                            ($r, 1) => vnni::tile::<$r, 1>(a, kp, bp, stride, groups, out),
                            ($r, _) => vnni::tile::<$r, 2>(a, kp, bp, stride, groups, out),
                        )*
                        _ => unreachable!("rn is 1..=8 (asserted)"),
                    }
                };
            }
            // SAFETY: as for AVX2: a runnable kernel, rn rows of kp bytes and
            // pn panels of `stride` bytes, checked by the asserts above.
            unsafe { go!(1, 2, 3, 4, 5, 6, 7, 8) }
        }
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Amx => unreachable!("AMX runs whole blocks (amx::drive)"),
        #[cfg(not(target_arch = "x86_64"))]
        _ => tile_scalar(arows, rn, kp, b, pn, groups, out),
    }
}

pub(super) fn tile_scalar(
    arows: &[u8],
    rn: usize,
    kp: usize,
    b: &[i8],
    pn: usize,
    groups: usize,
    out: &mut Tile,
) {
    for r in 0..rn {
        let a = &arows[r * kp..(r + 1) * kp];
        for p in 0..pn {
            let panel = &b[p * kp * PANEL..(p + 1) * kp * PANEL];
            for c in 0..PANEL {
                let mut acc = 0i32;
                for g in 0..groups {
                    for j in 0..GROUP {
                        let w = panel[(g * PANEL + c) * GROUP + j] as i32;
                        acc += (a[g * GROUP + j] as i8) as i32 * w;
                    }
                }
                out[r][p * PANEL + c] = acc;
            }
        }
    }
}

use super::{QuantMatrix, QuantRows, Tile, KBLOCK, MAX_TILE_ROWS, PANEL};
use std::arch::asm;

/// Whether the CPU has AMX-TILE and AMX-INT8 and the kernel granted this
/// process the tile state (Linux 5.16+ asks for it once, per process).
pub(super) fn usable() -> bool {
    static USABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *USABLE.get_or_init(|| {
        use std::arch::x86_64::{__cpuid, __cpuid_count};
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86_64 CPU; leaf 7 is read only
        // when leaf 0 says it exists.
        let (max_leaf, leaf7) = unsafe {
            let max = __cpuid(0).eax;
            (max, if max >= 7 { __cpuid_count(7, 0).edx } else { 0 })
        };
        let tile = leaf7 >> 24 & 1 == 1;
        let int8 = leaf7 >> 25 & 1 == 1;
        max_leaf >= 7 && tile && int8 && request_tile_state()
    })
}

#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM takes two integers and
    // touches no memory of ours; it fails (non-zero) on kernels or CPUs
    // without AMX, and then no AMX instruction ever runs.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// Palette 1 with tiles 0-7 all 16 rows × 64 bytes: tmm0-3 the i32 sums
/// (16×16), tmm4-5 activations (16 rows × 64 inputs), tmm6-7 weights
/// (16 groups of 4 inputs × 16 channels).
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// 32 rows × 2 panels: `a0` and `a1` the two 16-row halves (rows `lda`
/// bytes apart), `b0` and `b1` the two panels, over `blocks` blocks of
/// 64 inputs, into `out`.
///
/// # Safety
/// [`usable`] is true; `blocks >= 1`; `a0` and `a1` each point to 16 rows
/// `lda` bytes apart, each with `blocks * 64` readable bytes; `b0` and
/// `b1` each to `blocks * 1024` readable bytes.
unsafe fn tile(
    a0: *const u8,
    a1: *const u8,
    lda: usize,
    b0: *const i8,
    b1: *const i8,
    blocks: usize,
    out: &mut Tile,
) {
    // The block loads its own tile configuration and keeps no tile
    // state past its end: tmm registers are never allocated by the
    // compiler, so nothing else reads or writes them.
    asm!(
        "ldtilecfg [{cfg}]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a0} + {lda}*1]",
        "tileloadd tmm5, [{a1} + {lda}*1]",
        "tileloadd tmm6, [{b0} + {bs}*1]",
        "tileloadd tmm7, [{b1} + {bs}*1]",
        "tdpbssd tmm0, tmm4, tmm6",
        "tdpbssd tmm1, tmm4, tmm7",
        "tdpbssd tmm2, tmm5, tmm6",
        "tdpbssd tmm3, tmm5, tmm7",
        "add {a0}, 64",
        "add {a1}, 64",
        "add {b0}, 1024",
        "add {b1}, 1024",
        "dec {n}",
        "jnz 2b",
        "tilestored [{c} + {cs}*1], tmm0",
        "tilestored [{c} + {cs}*1 + 64], tmm1",
        "tilestored [{c} + {cs}*1 + 2048], tmm2",
        "tilestored [{c} + {cs}*1 + 2112], tmm3",
        "tilerelease",
        cfg = in(reg) CONFIG.0.as_ptr(),
        a0 = inout(reg) a0 => _,
        a1 = inout(reg) a1 => _,
        lda = in(reg) lda,
        b0 = inout(reg) b0 => _,
        b1 = inout(reg) b1 => _,
        bs = in(reg) 64usize,
        n = inout(reg) blocks => _,
        c = in(reg) out.as_mut_ptr() as *mut u8,
        cs = in(reg) std::mem::size_of::<[i32; 2 * PANEL]>(),
        options(nostack)
    );
}

/// [`super::drive`] on AMX: blocks of 32 rows (16 when that is all
/// there is) × pairs of panels, panels in chunks that stay in L2 while
/// every row block passes over them.
pub(super) fn drive(
    a: &QuantRows,
    rows: std::ops::Range<usize>,
    w: &QuantMatrix,
    panels: std::ops::Range<usize>,
    out: &mut Tile,
    mut sink: impl FnMut(usize, usize, usize, usize, &Tile),
) {
    assert!(usable(), "AMX kernel on a CPU or OS without AMX");
    // What `super::drive` asserted, restated here: this safe function
    // makes the raw reads, so it checks their bounds itself.
    let kp = a.kp;
    assert!(kp == w.kp && kp.is_multiple_of(KBLOCK));
    assert!(rows.end <= a.m && a.data.len() == a.m * kp);
    assert!(panels.end <= w.panels() && w.packed.len() == w.panels() * kp * PANEL);
    assert_eq!(std::mem::size_of::<Tile>(), MAX_TILE_ROWS * 2 * PANEL * 4);
    let blocks = kp / KBLOCK;
    let panel_stride = kp * PANEL;
    let chunk = ((512 << 10) / panel_stride.max(1)).max(2) & !1;
    let mut scratch = Vec::new();
    let mut pc = panels.start;
    while pc < panels.end {
        let pc_end = (pc + chunk).min(panels.end);
        let mut r = rows.start;
        while r < rows.end {
            let rn = MAX_TILE_ROWS.min(rows.end - r);
            // Whole 16-row tiles are loaded: past the matrix's last row,
            // from a zero-padded copy.
            let whole = if rn <= 16 { 16 } else { 32 };
            let src: &[u8] = if r + whole <= a.m {
                &a.data[r * kp..(r + whole) * kp]
            } else {
                scratch.clear();
                scratch.resize(whole * kp, 0u8);
                scratch[..rn * kp].copy_from_slice(&a.data[r * kp..(r + rn) * kp]);
                &scratch
            };
            let a0 = src.as_ptr();
            // A 16-row block computes its rows twice rather than read
            // past them.
            let a1 = src[(whole - 16) * kp..].as_ptr();
            let mut p = pc;
            while p < pc_end {
                let pn = 2.min(pc_end - p);
                let b0 = w.packed[p * panel_stride..(p + 1) * panel_stride].as_ptr();
                let last = p + pn - 1;
                let b1 = w.packed[last * panel_stride..(last + 1) * panel_stride].as_ptr();
                if blocks == 0 {
                    out.iter_mut().for_each(|row| row.fill(0));
                } else {
                    // SAFETY: `usable()` was asserted; blocks >= 1; a0
                    // and a1 start 16 whole rows of kp = blocks * 64
                    // bytes inside `src`; b0 and b1 are whole panels of
                    // kp * 16 = blocks * 1024 bytes (sliced above).
                    unsafe { tile(a0, a1, kp, b0, b1, blocks, out) };
                }
                let c0 = p * PANEL;
                sink(r, rn, c0, (pn * PANEL).min(w.n - c0), out);
                p += pn;
            }
            r += rn;
        }
        pc = pc_end;
    }
}

//! bf16 matrix products on Intel AMX tiles (Sapphire Rapids and later), for the CPU paths
//! that multiply many activation rows by the same bf16 weights: prefill, batched decode and
//! the experts of a prefill chunk.
//!
//! The row kernels of [`crate::cpu_gemv`] widen each bf16 weight to f32 and run one 16-lane
//! FMA per weight pair and token; at a few tokens that is as fast as memory delivers weights,
//! but past about eight tokens it is compute-bound (the `small` preset prefilled at ~400
//! tok/s). One `tdpbf16ps` multiplies a 16×32 bf16 tile by a 32×16 one into 16×16 f32
//! accumulators (8192 multiply-adds); on the dev VM it sustains ~3.8 TFLOP/s on one core
//! against ~0.07 for the FMA loop.
//!
//! Layout: `y = W · xᵀ` with the weights as the A operand, so A tiles load straight from the
//! row-major `[rows, cols]` bf16 weights (16 rows × 32 inputs, row stride `cols · 2` bytes) and
//! nothing is repacked at load time. The activations are the B operand: [`Packed`] holds them
//! rounded to bf16 in the tile's pair-interleaved layout, 16 tokens per tile. Products of bf16
//! values are exact in f32 and the tiles accumulate in f32, so for activations that are
//! already bf16 values (a bf16 model's hidden states) the result differs from the row
//! kernels' only in summation order. (AMX reads bf16 denormals as zero.)
//!
//! Storage the tiles cannot load in place (Q8's int8 blocks) is converted a block of rows at
//! a time into a [`Staged`] buffer in tile order and multiplied by the same loop
//! ([`tile_block_staged`]); where the A tiles come from is the only difference ([`ATiles`]).
//!
//! The tiles are used only when the CPU has AMX-TILE and AMX-BF16, Linux grants the process
//! the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and `SWITCHYARD_AMX` is not `0`.

use half::bf16;

/// Rows of every tile: weight rows per A tile, input pairs per B tile, tokens per B tile row.
pub(crate) const TILE_ROWS: usize = 16;

/// Inputs per tile step: 16 bf16 pairs (64 bytes) per A-tile row.
pub(crate) const TILE_K: usize = 32;

/// Whether the AMX kernels run on this machine (checked once).
pub(crate) fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if crate::env_off("SWITCHYARD_AMX") {
            return false;
        }
        detect()
    })
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    /// `arch_prctl` code asking the kernel to let this process use an XSAVE feature.
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    /// The XSAVE feature number of the tile data registers.
    const XFEATURE_XTILEDATA: i64 = 18;
    /// `arch_prctl`'s system call number on x86_64.
    const SYS_ARCH_PRCTL: i64 = 158;
    let ret: i64;
    // SAFETY: a plain system call; it reads no memory and clobbers rcx/r11 as declared.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => ret,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack)
        );
    }
    ret == 0
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Fewest activation rows for which the tiles beat the row kernels. Decode on the `small`
/// preset (bf16, dev VM, 2026-11-29), tok/s with the threshold at 1 / 4 / 8 / 16: batch 1
/// 58–60 / 79–80 / 77–81 / –; batch 4 106–109 / 131–135 / 141–143 / –; batch 8 – / – /
/// 187–190 / 172–181; batch 16 – / – / 256–259 / 257–267. One token on the tiles wastes 15 of
/// their 16 columns and loads weights 16 rows apart instead of streaming rows.
const DEFAULT_MIN_TOKENS: usize = 8;

/// [`DEFAULT_MIN_TOKENS`], or `SWITCHYARD_AMX_MIN_TOKENS` (read once; a knob for tuning on
/// other CPUs).
pub(crate) fn min_tokens() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| crate::env_count("SWITCHYARD_AMX_MIN_TOKENS", DEFAULT_MIN_TOKENS))
}

/// Whether a `[rows, cols]` bf16 matrix can be multiplied on the tiles: whole A tiles only.
pub(crate) fn fits(rows: usize, cols: usize) -> bool {
    enabled() && rows.is_multiple_of(TILE_ROWS) && cols.is_multiple_of(TILE_K) && cols > 0
}

/// Whether every value is a bf16 value already, so rounding to bf16 for the tiles loses
/// nothing.
pub(crate) fn bf16_exact(x: &[f32]) -> bool {
    x.iter().all(|v| v.to_bits() & 0xffff == 0)
}

/// Activation rows rounded to bf16 and laid out as AMX B tiles: for each group of 16 tokens
/// and each input pair `p`, the 16 tokens' values `(x[t][2p], x[t][2p + 1])` in a row of 64
/// bytes. Tokens past the last are zero.
pub(crate) struct Packed {
    /// Each u32 one token's pair, the even input in the low half.
    pairs: Vec<u32>,
    tokens: usize,
    cols: usize,
}

impl Packed {
    /// Packs `tokens` rows of `cols` values; `row(t)` is token `t`'s row (`cols` a multiple of
    /// [`TILE_K`]).
    pub(crate) fn from_rows<'a>(
        tokens: usize,
        cols: usize,
        row: impl Fn(usize) -> &'a [f32],
    ) -> Self {
        assert!(cols.is_multiple_of(TILE_K));
        let groups = tokens.div_ceil(TILE_ROWS);
        let half = cols / 2;
        let mut pairs = vec![0u32; groups * TILE_ROWS * half];
        for (g, dst) in pairs.chunks_exact_mut(TILE_ROWS * half).enumerate() {
            let n = TILE_ROWS.min(tokens - g * TILE_ROWS);
            for lane in 0..n {
                let src = row(g * TILE_ROWS + lane);
                assert_eq!(src.len(), cols);
                pack_row(src, lane, dst);
            }
        }
        Self {
            pairs,
            tokens,
            cols,
        }
    }

    /// Packs row-major `[tokens, cols]` activations.
    pub(crate) fn new(x: &[f32], tokens: usize, cols: usize) -> Self {
        Self::from_rows(tokens, cols, |t| &x[t * cols..(t + 1) * cols])
    }

    /// Packs the transpose of row-major `[cols, tokens]` values: token `t`'s row is column
    /// `t`.
    pub(crate) fn from_columns(a: &[f32], cols: usize, tokens: usize) -> Self {
        assert!(cols.is_multiple_of(TILE_K) && a.len() == cols * tokens);
        let groups = tokens.div_ceil(TILE_ROWS);
        let mut pairs = vec![0u32; groups * TILE_ROWS * cols / 2];
        for (g, dst) in pairs.chunks_exact_mut(TILE_ROWS * cols / 2).enumerate() {
            let t0 = g * TILE_ROWS;
            let n = TILE_ROWS.min(tokens - t0);
            for (p, out) in dst.chunks_exact_mut(TILE_ROWS).enumerate() {
                let even = &a[2 * p * tokens + t0..][..n];
                let odd = &a[(2 * p + 1) * tokens + t0..][..n];
                pack_column_pair(even, odd, out);
            }
        }
        Self {
            pairs,
            tokens,
            cols,
        }
    }

    /// Tokens rounded up to whole tiles: the row length of [`tile_block`]'s output.
    pub(crate) fn padded(&self) -> usize {
        self.tokens.div_ceil(TILE_ROWS) * TILE_ROWS
    }

    /// An empty buffer for [`Self::reset`], so a loop that packs many small operands (prefill
    /// attention, per context chunk) reuses one allocation.
    pub(crate) const fn empty() -> Self {
        Self {
            pairs: Vec::new(),
            tokens: 0,
            cols: 0,
        }
    }

    /// Makes this `tokens` × `cols` (a multiple of [`TILE_K`]) with every value zero and
    /// returns the pairs to fill in: token `t`'s inputs `(2p, 2p + 1)` are the u32 at
    /// `((t / 16) · cols / 2 + p) · 16 + t % 16`, the even input in the low half.
    pub(crate) fn reset(&mut self, tokens: usize, cols: usize) -> &mut [u32] {
        assert!(cols.is_multiple_of(TILE_K));
        self.pairs.clear();
        self.pairs
            .resize(tokens.div_ceil(TILE_ROWS) * TILE_ROWS * cols / 2, 0);
        (self.tokens, self.cols) = (tokens, cols);
        &mut self.pairs
    }
}

/// Writes one token's row (`src`, `cols` values) into its lane of a packed group (`dst`,
/// `cols / 2` tile rows of 16 pairs).
fn pack_row(src: &[f32], lane: usize, dst: &mut [u32]) {
    debug_assert!(lane < TILE_ROWS && dst.len() * 2 == src.len() * TILE_ROWS);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16") && src.len().is_multiple_of(TILE_K) {
        // SAFETY: avx512f/avx512bf16 detected; `src.len()` is a multiple of 32 and `dst`
        // holds `src.len() / 2` rows of 16 (checked by the caller's layout).
        unsafe { pack_row_avx512(src, lane, dst) };
        return;
    }
    for (p, two) in src.chunks_exact(2).enumerate() {
        dst[p * TILE_ROWS + lane] = pair_bits(two[0], two[1]);
    }
}

/// [`pack_row`] 32 values at a time: rounded by `vcvtne2ps2bf16` (to nearest even, as
/// [`round_bits`]) and scattered to 16 tile rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_row_avx512(src: &[f32], lane: usize, dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let rows = _mm512_setr_epi32(
        0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240,
    );
    let base = dst.as_mut_ptr().add(lane) as *mut i32;
    let sp = src.as_ptr();
    let mut i = 0;
    while i < src.len() {
        let lo = _mm512_loadu_ps(sp.add(i));
        let hi = _mm512_loadu_ps(sp.add(i + 16));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_i32scatter_epi32::<4>(base.add(i / 2 * TILE_ROWS), rows, v);
        i += TILE_K;
    }
}

/// `src` rounded to bf16 (as [`pack_row`] rounds) into consecutive pairs: `dst[p]` holds
/// `src[2p]` in its low half and `src[2p + 1]` in its high half, a zero high half after an odd
/// last value. `dst.len() == src.len().div_ceil(2)`. The activation layout of
/// `crate::cpu_bf16dot`'s `vdpbf16ps` row kernel (a bf16 array in order, seen as u32 pairs).
pub(crate) fn round_pairs(src: &[f32], dst: &mut [u32]) {
    assert_eq!(dst.len(), src.len().div_ceil(2));
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512bf16") {
        done = src.len() / TILE_K * TILE_K;
        // SAFETY: avx512f/avx512bf16 detected; `src` holds `done` values and `dst` `done / 2`.
        unsafe { round_pairs_avx512(&src[..done], &mut dst[..done / 2]) };
    }
    let (src, dst) = (&src[done..], &mut dst[done / 2..]);
    for (two, d) in src.chunks(2).zip(dst.iter_mut()) {
        *d = pair_bits(two[0], two.get(1).copied().unwrap_or(0.0));
    }
}

/// [`round_pairs`] 32 values at a time (`src.len()` a multiple of 32): `vcvtne2ps2bf16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_pairs_avx512(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    let mut i = 0;
    while i < src.len() {
        let lo = _mm512_loadu_ps(sp.add(i));
        let hi = _mm512_loadu_ps(sp.add(i + 16));
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dp.add(i / 2) as *mut __m512i, v);
        i += TILE_K;
    }
}

/// One tile row from two input rows stored token-major: `out[t] = (even[t], odd[t])` for
/// `t < even.len()` (≤ 16); the rest stays zero.
fn pack_column_pair(even: &[f32], odd: &[f32], out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if even.len() == TILE_ROWS && std::is_x86_feature_detected!("avx512bf16") {
        // SAFETY: avx512f/avx512bf16 detected; `even`, `odd` and `out` hold 16 values.
        unsafe {
            use std::arch::x86_64::*;
            let e = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(_mm512_loadu_ps(even.as_ptr())),
            ));
            let o = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(
                _mm512_cvtneps_pbh(_mm512_loadu_ps(odd.as_ptr())),
            ));
            let v = _mm512_or_si512(e, _mm512_slli_epi32(o, 16));
            _mm512_storeu_si512(out.as_mut_ptr() as *mut __m512i, v);
        }
        return;
    }
    for ((o, e), d) in out.iter_mut().zip(even).zip(odd) {
        *o = pair_bits(*e, *d);
    }
}

/// Two f32 values rounded to bf16 (to nearest, ties to even; NaN stays NaN) as one u32, the
/// first in the low half: the pair a B-tile row holds per token.
#[inline]
fn pair_bits(a: f32, b: f32) -> u32 {
    round_bits(a) | (round_bits(b) << 16)
}

/// `v` rounded to bf16, as the bf16 bits in the low half of a u32.
#[inline]
fn round_bits(v: f32) -> u32 {
    let b = v.to_bits();
    if v.is_nan() {
        return (b >> 16) | 0x40;
    }
    (b.wrapping_add(0x7fff + ((b >> 16) & 1))) >> 16
}

/// The tile palette every kernel here uses: palette 1, all eight tiles 16 rows × 64 bytes.
#[repr(C, align(64))]
struct TileConfig([u8; 64]);

const CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        c[48 + t] = TILE_ROWS as u8; // rows
        t += 1;
    }
    TileConfig(c)
};

/// `out[r][t] = Σ_c w[r0 + r][c] · x[t][c]` for the weight rows `r0..r0 + out.len() /
/// x.padded()` (a multiple of 16) and every token of `x`; `w` is row-major `[rows, cols]`
/// bf16 and `out` `[rows, x.padded()]` f32 (padding tokens get zeros).
pub(crate) fn tile_block(w: &[bf16], cols: usize, r0: usize, x: &Packed, out: &mut [f32]) {
    assert!(enabled());
    assert!(cols == x.cols && cols.is_multiple_of(TILE_K) && cols > 0);
    let rows = out.len() / x.padded();
    assert!(rows.is_multiple_of(TILE_ROWS) && rows > 0);
    assert!((r0 + rows) * cols <= w.len(), "weight rows out of range");
    let a = ATiles {
        base: w[r0 * cols..].as_ptr() as *const u16,
        row_tile: TILE_ROWS * cols,
        step: TILE_K,
        stride: cols * 2,
    };
    // SAFETY: rows `r0..r0 + rows` lie inside `w` (checked); row tile `j`, step `s` starts
    // at `base + j·16·cols + s·32` and its 16 rows of 64 bytes lie `cols · 2` bytes apart,
    // inside rows `16j..16j + 16` and their inputs `32s..32s + 32`.
    unsafe { run_row_tiles(a, rows, x, out) }
}

/// One 16-row × 32-input A tile: 16 rows of 16 bf16 pairs, 64 bytes each.
const TILE_VALUES: usize = TILE_ROWS * TILE_K;

/// One A tile's values, aligned to a cache line so each tile row is one line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct ATile([u16; TILE_VALUES]);

/// A block of weight rows copied (e.g. dequantized) into tile order, for storage the tiles
/// cannot load in place: tile (step `s`, row tile `j`) — rows `16j..16j + 16`, inputs
/// `32s..32s + 32` — is 1 KiB at tile index `s · row_tiles + j`, its rows 64 bytes apart.
/// One k step's tiles sit together, so the kernel's pointer for every row tile advances by
/// the same `row_tiles` tiles per step. Reused across blocks (one per thread).
/// Where a quantized row's dequantized blocks of [`TILE_K`] bf16 values go: a plain row
/// (`[bf16]`, block `b` at `b · TILE_K`) or a row of a [`Staged`] block in tile order
/// ([`StagedRow`]). One dequantizing loop per format then fills both.
pub(crate) trait BlockSink {
    /// Block `b`'s slot.
    fn block(&mut self, b: usize) -> &mut [bf16; TILE_K];
}

impl BlockSink for [bf16] {
    fn block(&mut self, b: usize) -> &mut [bf16; TILE_K] {
        (&mut self[b * TILE_K..(b + 1) * TILE_K])
            .try_into()
            .expect("a block is TILE_K values")
    }
}

/// Row `.1` of the staged block `.0`.
pub(crate) struct StagedRow<'a>(pub(crate) &'a mut Staged, pub(crate) usize);

impl BlockSink for StagedRow<'_> {
    fn block(&mut self, b: usize) -> &mut [bf16; TILE_K] {
        self.0.chunk_mut(self.1, b)
    }
}

pub(crate) struct Staged {
    tiles: Vec<ATile>,
    rows: usize,
    cols: usize,
}

impl Staged {
    /// An empty buffer; [`Self::reset`] sizes it.
    pub(crate) const fn new() -> Self {
        Self {
            tiles: Vec::new(),
            rows: 0,
            cols: 0,
        }
    }

    /// Holds `rows` (a multiple of 16) × `cols` (a multiple of [`TILE_K`]) values from now on;
    /// the contents are stale until every chunk is written.
    pub(crate) fn reset(&mut self, rows: usize, cols: usize) {
        assert!(rows.is_multiple_of(TILE_ROWS) && cols.is_multiple_of(TILE_K));
        let n = rows / TILE_ROWS * (cols / TILE_K);
        self.tiles.resize(n, ATile([0; TILE_VALUES]));
        (self.rows, self.cols) = (rows, cols);
    }

    /// Row `r`'s inputs `32·step..32·step + 32`: one 64-byte row of tile (`step`, `r / 16`).
    #[inline]
    pub(crate) fn chunk_mut(&mut self, r: usize, step: usize) -> &mut [bf16; TILE_K] {
        assert!(r < self.rows && step < self.cols / TILE_K);
        let tile = &mut self.tiles[step * (self.rows / TILE_ROWS) + r / TILE_ROWS];
        let row = &mut tile.0[(r % TILE_ROWS) * TILE_K..][..TILE_K];
        // SAFETY: `bf16` is `repr(transparent)` over `u16`; the slice is exactly `TILE_K` long.
        unsafe { &mut *(row.as_mut_ptr() as *mut [bf16; TILE_K]) }
    }
}

/// `out[r][t]` for rows `r0..r0 + out.len() / x.padded()` of weights stored in a format the
/// tiles cannot load in place: `stage(r0, rows, buffer)` writes those rows into this thread's
/// staging buffer in tile order (e.g. dequantized to bf16), then [`tile_block_staged`]
/// multiplies them there. `total_rows` is the matrix's row count, checked against the block.
pub(crate) fn tile_block_via_stage(
    total_rows: usize,
    r0: usize,
    x: &Packed,
    out: &mut [f32],
    stage: impl FnOnce(usize, usize, &mut Staged),
) {
    thread_local! {
        /// Per thread: a block is staged and multiplied on one thread with no parallel loop
        /// in between, so the buffer is never borrowed twice.
        static STAGE: std::cell::RefCell<Staged> = const { std::cell::RefCell::new(Staged::new()) };
    }
    let rows = out.len() / x.padded();
    assert!(
        r0 + rows <= total_rows,
        "staged tile block rows out of range"
    );
    STAGE.with_borrow_mut(|st| {
        stage(r0, rows, st);
        tile_block_staged(st, x, out);
    })
}

/// [`tile_block`] for weights staged in tile order: `out[r][t] = Σ_c w[r][c] · x[t][c]` for
/// every row of `w` (`out` `[w.rows, x.padded()]`). The same kernel loop; each A tile loads
/// from its own contiguous 1 KiB (stride 64 bytes).
pub(crate) fn tile_block_staged(w: &Staged, x: &Packed, out: &mut [f32]) {
    assert!(enabled());
    assert!(w.cols == x.cols && w.cols > 0 && w.rows > 0);
    assert_eq!(
        out.len(),
        w.rows * x.padded(),
        "output is not [rows, padded tokens]"
    );
    let row_tiles = w.rows / TILE_ROWS;
    assert_eq!(w.tiles.len(), row_tiles * (w.cols / TILE_K));
    let a = ATiles {
        base: w.tiles.as_ptr() as *const u16,
        row_tile: TILE_VALUES,
        step: row_tiles * TILE_VALUES,
        stride: TILE_K * 2,
    };
    // SAFETY: `w.tiles` holds `row_tiles · cols / 32` tiles (checked); row tile `j`, step `s`
    // is tile `s · row_tiles + j`, 16 rows of 64 bytes each.
    unsafe { run_row_tiles(a, w.rows, x, out) }
}

/// Where a block's A tiles are: row tile `j` at k step `s` starts at `base + j · row_tile + s ·
/// step` (u16 elements), its 16 rows `stride` bytes apart.
#[derive(Clone, Copy)]
struct ATiles {
    base: *const u16,
    row_tile: usize,
    step: usize,
    stride: usize,
}

/// The block's row tiles two at a time (one at the end for an odd count) against every token
/// of `x` into `out` (`[rows, x.padded()]`).
///
/// # Safety
/// AMX is enabled; `a` describes `rows / 16` row tiles of `x.cols / 32` steps, every one
/// readable as 16 rows of 64 bytes.
unsafe fn run_row_tiles(a: ATiles, rows: usize, x: &Packed, out: &mut [f32]) {
    let pad = x.padded();
    assert!(out.len() >= rows * pad && rows.is_multiple_of(TILE_ROWS));
    let mut r = 0;
    while r < rows {
        let pair = r + TILE_ROWS < rows;
        let dst = &mut out[r * pad..];
        let at = ATiles {
            base: a.base.add(r / TILE_ROWS * a.row_tile),
            ..a
        };
        // SAFETY: as the caller promises for row tiles `r / 16` (and the next for a pair);
        // `x` holds `pad / 16` groups of `cols / 2` pair rows; `dst` holds 16 (32) rows of
        // `pad` values.
        if pair {
            tiles_unchecked::<2>(at, x, dst, pad);
        } else {
            tiles_unchecked::<1>(at, x, dst, pad);
        }
        r += 2 * TILE_ROWS;
    }
}

/// One AMX instruction with the operands it names.
macro_rules! amx {
    ($($t:tt)*) => {
        std::arch::asm!($($t)*, options(nostack))
    };
}

/// Row tiles `0..A` of `a` against every token group of `x` into `out` (`[16·A, pad]`).
/// Tiles: 0–3 accumulators (row tile × token group), 4–5 weights, 6–7 activations; two token
/// groups per pass share each weight tile load. bf16 weights load straight from the matrix,
/// rows `cols · 2` bytes apart (copying them into tile order first measured no faster: the
/// copy costs what the strided loads lose); storage that must be converted is staged
/// ([`Staged`]).
#[cfg(target_arch = "x86_64")]
unsafe fn tiles_unchecked<const A: usize>(a: ATiles, x: &Packed, out: &mut [f32], pad: usize) {
    let groups = pad / TILE_ROWS;
    let cols = x.cols;
    let (a_stride, b_stride, c_stride) = (a.stride, 64usize, pad * 4);
    let group_len = TILE_ROWS * cols;
    let a0 = a.base;
    let a1 = a0.add(if A == 2 { a.row_tile } else { 0 });
    let b = x.pairs.as_ptr() as *const u16;
    let c0 = out.as_mut_ptr();
    let c1 = c0.add(TILE_ROWS * pad);
    amx!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr());
    let mut g = 0;
    while g < groups {
        let two = g + 1 < groups;
        amx!("tilezero tmm0");
        amx!("tilezero tmm1");
        amx!("tilezero tmm2");
        amx!("tilezero tmm3");
        let bg = b.add(g * group_len);
        let mut k0 = 0;
        let mut ak = 0;
        while k0 < cols {
            let bt = bg.add(k0 * TILE_ROWS);
            amx!("tileloadd tmm4, [{p} + {s}*1]", p = in(reg) a0.add(ak), s = in(reg) a_stride);
            if A == 2 {
                amx!("tileloadd tmm5, [{p} + {s}*1]", p = in(reg) a1.add(ak), s = in(reg) a_stride);
            }
            amx!("tileloadd tmm6, [{p} + {s}*1]", p = in(reg) bt, s = in(reg) b_stride);
            if two {
                amx!("tileloadd tmm7, [{p} + {s}*1]", p = in(reg) bt.add(group_len), s = in(reg) b_stride);
            }
            amx!("tdpbf16ps tmm0, tmm4, tmm6");
            if two {
                amx!("tdpbf16ps tmm1, tmm4, tmm7");
            }
            if A == 2 {
                amx!("tdpbf16ps tmm2, tmm5, tmm6");
                if two {
                    amx!("tdpbf16ps tmm3, tmm5, tmm7");
                }
            }
            k0 += TILE_K;
            ak += a.step;
        }
        let col = g * TILE_ROWS;
        amx!("tilestored [{p} + {s}*1], tmm0", p = in(reg) c0.add(col), s = in(reg) c_stride);
        if two {
            amx!("tilestored [{p} + {s}*1], tmm1", p = in(reg) c0.add(col + TILE_ROWS), s = in(reg) c_stride);
        }
        if A == 2 {
            amx!("tilestored [{p} + {s}*1], tmm2", p = in(reg) c1.add(col), s = in(reg) c_stride);
            if two {
                amx!("tilestored [{p} + {s}*1], tmm3", p = in(reg) c1.add(col + TILE_ROWS), s = in(reg) c_stride);
            }
        }
        g += 2;
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tiles_unchecked<const A: usize>(_: ATiles, _: &Packed, _: &mut [f32], _: usize) {
    unreachable!("AMX is detected only on x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Tiles against f64 sums of the same bf16 values: token counts around the 16-token tile
    /// and the two-group pass, one and two weight blocks, widths of one and many tile steps;
    /// the same rows staged in tile order ([`Staged`]) give the same bits.
    #[test]
    fn tiles_match_f64_reference() {
        if !enabled() {
            eprintln!("skipped: this CPU or kernel has no AMX");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for &(rows, cols) in &[(16, 32), (32, 64), (48, 1024)] {
            let w: Vec<bf16> = (0..rows * cols)
                .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)))
                .collect();
            for tokens in [1, 5, 16, 17, 32, 33, 70] {
                let x: Vec<f32> = (0..tokens * cols)
                    .map(|_| bf16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
                    .collect();
                let p = Packed::new(&x, tokens, cols);
                let pt = {
                    let mut xt = vec![0f32; x.len()];
                    for t in 0..tokens {
                        for c in 0..cols {
                            xt[c * tokens + t] = x[t * cols + c];
                        }
                    }
                    Packed::from_columns(&xt, cols, tokens)
                };
                assert_eq!(p.pairs, pt.pairs, "column packing differs from row packing");
                let want = |r: usize, t: usize| -> f64 {
                    (0..cols)
                        .map(|c| w[r * cols + c].to_f64() * x[t * cols + c] as f64)
                        .sum()
                };
                let pad = p.padded();
                // Blocks of 16 and 48 rows (one and two row tiles per pass) at offsets.
                for (r0, n) in [(rows - 16, 16), (0, rows.min(48)), (0, rows.min(32))] {
                    let mut out = vec![f32::NAN; n * pad];
                    tile_block(&w, cols, r0, &p, &mut out);
                    // The same rows staged in tile order: the same sums in the same order.
                    let mut st = Staged::new();
                    st.reset(n, cols);
                    for r in 0..n {
                        for k in 0..cols / TILE_K {
                            st.chunk_mut(r, k)
                                .copy_from_slice(&w[(r0 + r) * cols + k * TILE_K..][..TILE_K]);
                        }
                    }
                    let mut staged = vec![f32::NAN; n * pad];
                    tile_block_staged(&st, &p, &mut staged);
                    assert!(
                        staged
                            .iter()
                            .zip(&out)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{rows}x{cols} tokens {tokens} rows {r0}+{n}: staged differs from in place"
                    );
                    for r in 0..n {
                        for t in 0..pad {
                            let want = if t < tokens { want(r0 + r, t) } else { 0.0 };
                            let got = out[r * pad + t] as f64;
                            assert!(
                                (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                                "{rows}x{cols} tokens {tokens} rows {r0}+{r} t{t}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The packing's rounding is `half`'s (to nearest, ties to even), NaN included.
    #[test]
    fn rounding_matches_half() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut vals: Vec<f32> = (0..100_000)
            .map(|_| f32::from_bits(rng.random::<u32>()))
            .collect();
        vals.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::MAX,
            f32::MIN_POSITIVE,
            1.0 + 1.0 / 256.0,
        ]);
        for v in vals {
            let want = bf16::from_f32(v);
            let got = bf16::from_bits(round_bits(v) as u16);
            if v.is_nan() {
                assert!(got.is_nan(), "{v:e}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{v:e}");
            }
        }
    }

    #[test]
    fn bf16_exactness_is_checked_per_value() {
        assert!(bf16_exact(&[0.0, 1.0, -2.5, bf16::from_f32(0.1).to_f32()]));
        assert!(!bf16_exact(&[1.0, 0.1]));
    }
}

//! The inner loops of the core: register-tiled complex multiply-accumulates, vectorised
//! across frequencies, compiled several times and chosen at run time (wheels target
//! baseline x86-64):
//!
//! - generic (any CPU) and AVX2: the same operations, so the same results bit for bit;
//! - AVX2+FMA block product: fused multiply-adds, equal to the generic build up to
//!   rounding (within 4·q·ε, tested);
//! - AVX-512F/DQ float32 block product: the FMA build's operations in the same order per
//!   accumulator on 512-bit registers (two rows per register, 4 × 4 tiles), so equal to
//!   the FMA build bit for bit (tested);
//! - AVX-512F+FMA kernel-gradient sums: float64 accumulators one register per tile,
//!   equal to the generic build up to float64 rounding (tested).
//!
//! Which build runs depends on the CPU only, never on the thread count or the batch.
//!
//! Spectra are stored as split real/imaginary planes in groups of q spectra (a row's
//! blocks, or a kernel row's blocks), each group packed as (F / LANES, q, LANES) with F
//! rounded up to `f_pad`, a multiple of [`LANES`] (see [`packed`]). Every kernel below
//! works on tiles of `LANES` frequencies, keeps its accumulators in registers across the
//! summed dimension and never sums across lanes, so results do not depend on how rows are
//! split between threads. Padding lanes hold finite values and are never read back into
//! results.
//!
//! When the last tile holds a single frequency (F ≡ 1 mod LANES: p = 1 and every p that
//! is a multiple of 16, p = 64, 256 and 4096 among them), a full tile would spend seven of
//! its eight lanes on padding: that tile is half the work at p = 16, a fifth at p = 64.
//! That frequency then runs with its lanes over output blocks (block product, against a
//! compact copy of the kernel spectra's last frequency) or input blocks (kernel-gradient
//! sums), with each value's operations unchanged, so the results are the same bit for bit
//! ([`last_tile`], [`kernel_grad_last_body`]).

use crate::Float;

/// Frequencies per tile.
pub(crate) const LANES: usize = 8;

/// Frequency stride for `f_n` frequencies.
pub(crate) fn padded_freqs(f_n: usize) -> usize {
    f_n.div_ceil(LANES) * LANES
}

/// Offset of frequency `f` of block `j` of row `r` in a chunk of `rows` rows stored in the
/// row-transposed layout (F / LANES, q, rows, LANES) used for the kernel gradient, whose
/// sums run over rows.
#[inline(always)]
pub(crate) fn packed_by_row(q: usize, rows: usize, r: usize, j: usize, f: usize) -> usize {
    (((f / LANES) * q + j) * rows + r) * LANES + f % LANES
}

/// Offset of frequency `f` of spectrum `j` inside a group of `q` spectra stored in the
/// packed layout (F / LANES, q, LANES): for each tile of frequencies the q spectra are
/// contiguous, so the sums over blocks stream through memory.
#[inline(always)]
pub(crate) fn packed(q: usize, j: usize, f: usize) -> usize {
    ((f / LANES) * q + j) * LANES + f % LANES
}

/// Complex planes (real part, imaginary part).
pub(crate) type Planes<'a, T> = (&'a [T], &'a [T]);
/// Mutable complex planes.
pub(crate) type PlanesMut<'a, T> = (&'a mut [T], &'a mut [T]);

type Lane<T> = [T; LANES];

macro_rules! dispatch_avx2 {
    ($generic:ident, $avx2:ident ( $($arg:expr),* )) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU supports AVX2, checked just above.
                return unsafe { $avx2($($arg),*) };
            }
        }
        $generic($($arg),*)
    }};
}
pub(crate) use dispatch_avx2;

/// `a += x·s` for one complex value, as every block-product kernel runs it: four fused
/// multiply-adds (FMA), or two products and a sum per part. One definition, so the kernels
/// that must agree bit for bit (tiles, the compact last tile, single blocks) do.
#[inline(always)]
fn mac<F: num_traits::Float, const FMA: bool>(
    (a_re, a_im): (&mut F, &mut F),
    (xr, xi): (F, F),
    (sr, si): (F, F),
) {
    if FMA {
        *a_re = xr.mul_add(sr, *a_re);
        *a_re = (-xi).mul_add(si, *a_re);
        *a_im = xr.mul_add(si, *a_im);
        *a_im = xi.mul_add(sr, *a_im);
    } else {
        *a_re = *a_re + (xr * sr - xi * si);
        *a_im = *a_im + (xr * si + xi * sr);
    }
}

/// `a += g·conj(x)` for one complex value, as the kernel-gradient sums run it (in T::Acc).
#[inline(always)]
fn conj_mac<F: num_traits::Float, const FMA: bool>(
    (a_re, a_im): (&mut F, &mut F),
    (gr, gi): (F, F),
    (xr, xi): (F, F),
) {
    if FMA {
        *a_re = gr.mul_add(xr, *a_re);
        *a_re = gi.mul_add(xi, *a_re);
        *a_im = gi.mul_add(xr, *a_im);
        *a_im = (-gr).mul_add(xi, *a_im);
    } else {
        *a_re = *a_re + (gr * xr + gi * xi);
        *a_im = *a_im + (gi * xr - gr * xi);
    }
}

#[inline(always)]
fn load<T: Float>(src: &[T], at: usize) -> Lane<T> {
    let mut v = [T::zero(); LANES];
    v.copy_from_slice(&src[at..at + LANES]);
    v
}

/// For every row r and output block i: y[r, i, :] = Σ_j x[r, j, :] ⊙ s[i, j, :].
///
/// Layouts: x has `rows` groups of q_a spectra, s q_b groups of q_a, y `rows` groups of
/// q_b, each group packed (see [`packed`]). `y` is overwritten. With `last` (s's last
/// frequency in the compact layout of [`last_tile`], for spectra whose last tile holds
/// one frequency), that tile is computed from it: the same values in that frequency,
/// zeros in the tile's padding lanes.
pub(crate) fn block_product<T: Float>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
    last: Option<Planes<'_, T>>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && avx512_block_available()
        {
            // SAFETY: T is f32 (checked just above), so the casts only rename the type;
            // the CPU supports AVX-512F/DQ and FMA.
            unsafe {
                return block_product_avx512_f32(
                    f_pad,
                    q_a,
                    q_b,
                    (cast_f32(x.0), cast_f32(x.1)),
                    (cast_f32(s.0), cast_f32(s.1)),
                    (cast_f32_mut(y.0), cast_f32_mut(y.1)),
                    last.map(|(l_re, l_im)| (cast_f32(l_re), cast_f32(l_im))),
                );
            }
        }
        if fma_available() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { block_product_fma(f_pad, q_a, q_b, x, s, y, last) };
        }
    }
    dispatch_avx2!(
        block_product_generic,
        block_product_avx2(f_pad, q_a, q_b, x, s, y, last)
    )
}

/// y = x ⊙ s for single spectra (q_a = q_b = 1), elementwise, with exactly the
/// operations that [`block_product`] runs for one block on this CPU (fused or not), so
/// that the result is the same bit for bit.
pub(crate) fn single_product<T: Float>(x: Planes<'_, T>, s: Planes<'_, T>, y: PlanesMut<'_, T>) {
    #[cfg(target_arch = "x86_64")]
    {
        if fma_available() {
            // SAFETY: the CPU supports AVX2 and FMA, checked just above.
            return unsafe { single_product_fma(x, s, y) };
        }
    }
    dispatch_avx2!(single_product_generic, single_product_avx2(x, s, y))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn single_product_fma<T: Float>(x: Planes<'_, T>, s: Planes<'_, T>, y: PlanesMut<'_, T>) {
    single_product_body::<T, true>(x, s, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn single_product_avx2<T: Float>(x: Planes<'_, T>, s: Planes<'_, T>, y: PlanesMut<'_, T>) {
    single_product_body::<T, false>(x, s, y)
}

fn single_product_generic<T: Float>(x: Planes<'_, T>, s: Planes<'_, T>, y: PlanesMut<'_, T>) {
    single_product_body::<T, false>(x, s, y)
}

#[inline(always)]
fn single_product_body<T: Float, const FMA: bool>(
    (x_re, x_im): Planes<'_, T>,
    (s_re, s_im): Planes<'_, T>,
    (y_re, y_im): PlanesMut<'_, T>,
) {
    let n = y_re.len();
    let (x_re, x_im, s_re, s_im, y_im) = (
        &x_re[..n],
        &x_im[..n],
        &s_re[..n],
        &s_im[..n],
        &mut y_im[..n],
    );
    for k in 0..n {
        let (xr, xi, sr, si) = (x_re[k], x_im[k], s_re[k], s_im[k]);
        // The accumulators of `Tile::product`, starting from zero, for one term.
        let (mut a_re, mut a_im) = (T::zero(), T::zero());
        mac::<T, FMA>((&mut a_re, &mut a_im), (xr, xi), (sr, si));
        y_re[k] = a_re;
        y_im[k] = a_im;
    }
}

/// Whether the fused multiply-add build of the kernels runs on this CPU (AVX2 and FMA).
#[cfg(target_arch = "x86_64")]
pub(crate) fn fma_available() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn block_product_avx2<T: Float>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
    last: Option<Planes<'_, T>>,
) {
    block_product_body::<T, false>(f_pad, q_a, q_b, x, s, y, last)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_product_fma<T: Float>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
    last: Option<Planes<'_, T>>,
) {
    block_product_body::<T, true>(f_pad, q_a, q_b, x, s, y, last)
}

fn block_product_generic<T: Float>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
    last: Option<Planes<'_, T>>,
) {
    block_product_body::<T, false>(f_pad, q_a, q_b, x, s, y, last)
}

#[inline(always)]
fn block_product_body<T: Float, const FMA: bool>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
    last: Option<Planes<'_, T>>,
) {
    let rows = x.0.len() / (q_a * f_pad);
    let (y_re, y_im) = y;
    for fb in (0..f_end(f_pad, last.is_some())).step_by(LANES) {
        let at = Region {
            f_pad,
            q_a,
            q_b,
            fb,
        };
        at.products::<T, FMA>(0..rows, 0..q_b, x, s, (&mut *y_re, &mut *y_im));
    }
    if let Some(last) = last {
        last_tile::<T, FMA>(f_pad, q_a, q_b, x, last, (y_re, y_im));
    }
}

/// Where the full tiles of the block product end: before the last tile when that one is
/// computed from the compact planes ([`last_tile`]).
fn f_end(f_pad: usize, compact_last: bool) -> usize {
    match compact_last {
        true => f_pad - LANES,
        false => f_pad,
    }
}

/// Row stride of the compact last-tile planes of a kernel orientation: `q_b` rounded up
/// to [`LANES`] (the values past `q_b` are zero).
pub(crate) fn last_stride(q_b: usize) -> usize {
    q_b.div_ceil(LANES) * LANES
}

/// The block product's last frequency tile when only its first lane is a frequency
/// (F = f_pad − LANES + 1: every even p that is a multiple of 16, for one). A full tile
/// would spend eight lanes on one frequency; here the lanes run over output blocks
/// instead, against `last`, that frequency's kernel spectra stored compact as (q_a,
/// [`last_stride`]`(q_b)`) (`last[j · stride + i]` = `s[i, j, F − 1]`). Every output gets
/// the very operations, in the same order, that [`Tile::product`] gives its lane 0 (so
/// the results are the same bit for bit); lanes 1.. of y's last tile are set to zero.
#[inline(always)]
fn last_tile<T: Float, const FMA: bool>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    last: Planes<'_, T>,
    y: PlanesMut<'_, T>,
) {
    let rows = x.0.len() / (q_a * f_pad);
    let stride = last_stride(q_b);
    assert!(last.0.len() >= q_a * stride && last.1.len() >= q_a * stride);
    let (y_re, y_im) = y;
    let mut r0 = 0;
    while r0 < rows {
        let nr = (rows - r0).min(4);
        let y = (&mut *y_re, &mut *y_im);
        match nr {
            4 => last_rows::<T, 4, FMA>(f_pad, q_a, q_b, r0, x, last, y),
            3 => last_rows::<T, 3, FMA>(f_pad, q_a, q_b, r0, x, last, y),
            2 => last_rows::<T, 2, FMA>(f_pad, q_a, q_b, r0, x, last, y),
            _ => last_rows::<T, 1, FMA>(f_pad, q_a, q_b, r0, x, last, y),
        }
        r0 += nr;
    }
}

/// Rows r0..r0 + R of [`last_tile`], LANES output blocks at a time.
#[inline(always)]
fn last_rows<'a, T: Float, const R: usize, const FMA: bool>(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    r0: usize,
    (x_re, x_im): Planes<'a, T>,
    (l_re, l_im): Planes<'_, T>,
    (y_re, y_im): PlanesMut<'_, T>,
) {
    let fb = f_pad - LANES;
    let stride = last_stride(q_b);
    // The last tile of each row's q_a spectra is contiguous (see `packed`): q_a lanes.
    let tile = |planes: &'a [T], r: usize| -> &'a [[T; LANES]] {
        let at = r * q_a * f_pad + packed(q_a, 0, fb);
        planes[at..at + q_a * LANES].as_chunks::<LANES>().0
    };
    let mut xs_re: [&[Lane<T>]; R] = [&[]; R];
    let mut xs_im: [&[Lane<T>]; R] = [&[]; R];
    for r in 0..R {
        xs_re[r] = tile(x_re, r0 + r);
        xs_im[r] = tile(x_im, r0 + r);
    }
    let (l_re, l_im) = (&l_re[..q_a * stride], &l_im[..q_a * stride]);
    let mut i0 = 0;
    while i0 < q_b {
        let mut acc_re = [[T::zero(); LANES]; R];
        let mut acc_im = [[T::zero(); LANES]; R];
        for j in 0..q_a {
            let sr = load(l_re, j * stride + i0);
            let si = load(l_im, j * stride + i0);
            for r in 0..R {
                let (xr, xi) = (xs_re[r][j][0], xs_im[r][j][0]);
                for l in 0..LANES {
                    // Tile::product's operations for lane 0, one output block per lane
                    let a = (&mut acc_re[r][l], &mut acc_im[r][l]);
                    mac::<T, FMA>(a, (xr, xi), (sr[l], si[l]));
                }
            }
        }
        for r in 0..R {
            for l in 0..LANES.min(q_b - i0) {
                let at = (r0 + r) * q_b * f_pad + packed(q_b, i0 + l, fb);
                y_re[at] = acc_re[r][l];
                y_im[at] = acc_im[r][l];
                y_re[at + 1..at + LANES].fill(T::zero());
                y_im[at + 1..at + LANES].fill(T::zero());
            }
        }
        i0 += LANES;
    }
}

/// One tile of frequencies of the block product, for any range of rows and outputs.
struct Region {
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    fb: usize,
}

impl Region {
    /// Rows `rows` × output blocks `outs` in register tiles of 2 × 2. Loop order:
    /// output-block pair, then row pair, so that one pair of kernel spectra rows stays in
    /// L1 while it is applied to every row. The tile shape changes which products share
    /// registers, never the order of any sum.
    #[inline(always)]
    fn products<T: Float, const FMA: bool>(
        &self,
        rows: std::ops::Range<usize>,
        outs: std::ops::Range<usize>,
        x: Planes<'_, T>,
        s: Planes<'_, T>,
        (y_re, y_im): PlanesMut<'_, T>,
    ) {
        let mut i0 = outs.start;
        while i0 < outs.end {
            let ni = (outs.end - i0).min(2);
            let mut r0 = rows.start;
            while r0 < rows.end {
                let nr = (rows.end - r0).min(2);
                let at = Tile {
                    f_pad: self.f_pad,
                    q_a: self.q_a,
                    q_b: self.q_b,
                    r0,
                    i0,
                    fb: self.fb,
                };
                match (nr, ni) {
                    (2, 2) => at.product::<T, 2, 2, FMA>(x, s, (&mut *y_re, &mut *y_im)),
                    (2, _) => at.product::<T, 2, 1, FMA>(x, s, (&mut *y_re, &mut *y_im)),
                    (_, 2) => at.product::<T, 1, 2, FMA>(x, s, (&mut *y_re, &mut *y_im)),
                    _ => at.product::<T, 1, 1, FMA>(x, s, (&mut *y_re, &mut *y_im)),
                }
                r0 += nr;
            }
            i0 += ni;
        }
    }
}

/// `v` as f32 values; only called when T is f32.
///
/// # Safety
/// T must be f32.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn cast_f32<T>(v: &[T]) -> &[f32] {
    // SAFETY: T is f32 (the caller's contract): same size, alignment and values.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<f32>(), v.len()) }
}

/// `v` as mutable f32 values; only called when T is f32.
///
/// # Safety
/// T must be f32.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn cast_f32_mut<T>(v: &mut [T]) -> &mut [f32] {
    // SAFETY: as in `cast_f32`.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<f32>(), v.len()) }
}

/// Whether the AVX-512 build of the float32 block product runs on this CPU (AVX-512F and
/// DQ, with FMA).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_block_available() -> bool {
    avx512_fma_available() && std::arch::is_x86_feature_detected!("avx512dq")
}

/// The float32 block product with 512-bit registers: each register holds one 8-frequency
/// tile of two rows (the kernel spectra tile broadcast to both halves), and a register
/// tile covers 4 rows × 4 output blocks (16 accumulators of 32 registers). Every
/// accumulator sees the same fused multiply-adds in the same order as in
/// `block_product_fma`, so the two give the same results bit for bit (tested); rows and
/// outputs left over go through the same portable tiles as there.
///
/// # Safety
/// The CPU must support AVX-512F, AVX-512DQ and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
unsafe fn block_product_avx512_f32(
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, f32>,
    s: Planes<'_, f32>,
    y: PlanesMut<'_, f32>,
    last: Option<Planes<'_, f32>>,
) {
    let rows = x.0.len() / (q_a * f_pad);
    // Every access below stays inside these lengths (offsets as in `packed`).
    let (n_x, n_s, n_y) = (rows * q_a * f_pad, q_b * q_a * f_pad, rows * q_b * f_pad);
    assert!(x.0.len() >= n_x && x.1.len() >= n_x, "x planes too short");
    assert!(
        s.0.len() >= n_s && s.1.len() >= n_s,
        "kernel planes too short"
    );
    assert!(y.0.len() >= n_y && y.1.len() >= n_y, "y planes too short");
    assert!(f_pad.is_multiple_of(LANES));
    let r_main = rows / 4 * 4;
    let (y_re, y_im) = y;
    for fb in (0..f_end(f_pad, last.is_some())).step_by(LANES) {
        // Output blocks in groups of 4, the last group 1-3 wide (same operations per
        // accumulator whatever the group's width).
        let mut i0 = 0;
        while i0 < q_b {
            let t = Avx512Tile {
                f_pad,
                q_a,
                q_b,
                i0,
                fb,
                r_main,
            };
            let y = (&mut *y_re, &mut *y_im);
            // SAFETY: AVX-512F/DQ and FMA (this function's contract); the planes hold the
            // lengths asserted above.
            unsafe {
                match q_b - i0 {
                    1 => t.rows::<1>(x, s, y),
                    2 => t.rows::<2>(x, s, y),
                    3 => t.rows::<3>(x, s, y),
                    _ => t.rows::<4>(x, s, y),
                }
            }
            i0 += 4;
        }
        // What the 4 × 4 tiles leave: the same portable FMA tiles as `block_product_fma`.
        let at = Region {
            f_pad,
            q_a,
            q_b,
            fb,
        };
        let y = (&mut *y_re, &mut *y_im);
        if r_main < rows {
            at.products::<f32, true>(r_main..rows, 0..q_b, x, s, y);
        }
    }
    if let Some(last) = last {
        // the FMA build's operations (as in `block_product_fma`), so the same bits
        last_tile::<f32, true>(f_pad, q_a, q_b, x, last, (y_re, y_im));
    }
}

/// The 4-row AVX-512 tiles of `block_product_avx512_f32` for output blocks i0..i0 + I at
/// frequency tile fb, over rows 0..r_main.
struct Avx512Tile {
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    i0: usize,
    fb: usize,
    r_main: usize,
}

impl Avx512Tile {
    /// Rows in groups of 4 (two rows per register) × I output blocks. Safety: AVX-512F/DQ
    /// and FMA available; x, s and y hold the lengths that `block_product_avx512_f32`
    /// asserts; i0 + I ≤ q_b, r_main ≤ rows.
    #[inline(always)]
    unsafe fn rows<const I: usize>(
        &self,
        x: Planes<'_, f32>,
        s: Planes<'_, f32>,
        (y_re, y_im): PlanesMut<'_, f32>,
    ) {
        use std::arch::x86_64::*;
        let (f_pad, q_a, q_b, i0, fb) = (self.f_pad, self.q_a, self.q_b, self.i0, self.fb);
        let t = fb / LANES;
        let (xr_p, xi_p, sr_p, si_p) = (x.0.as_ptr(), x.1.as_ptr(), s.0.as_ptr(), s.1.as_ptr());
        // Offsets of block j = 0 of this tile for the I outputs and, below, 4 rows.
        let mut sb = [0usize; I];
        for (ii, v) in sb.iter_mut().enumerate() {
            *v = (i0 + ii) * q_a * f_pad + t * q_a * LANES;
        }
        let mut r0 = 0;
        while r0 < self.r_main {
            let mut xb = [0usize; 4];
            for (rr, v) in xb.iter_mut().enumerate() {
                *v = (r0 + rr) * q_a * f_pad + t * q_a * LANES;
            }
            // SAFETY: AVX-512F (the caller's contract).
            let zero = unsafe { _mm512_setzero_ps() };
            let mut acc_re = [[zero; I]; 2];
            let mut acc_im = [[zero; I]; 2];
            for j in 0..q_a {
                let o = j * LANES;
                // SAFETY: xb[rr] + o + LANES <= n_x and sb[ii] + o + LANES <= n_s
                // (rows < rows, outputs < q_b, j < q_a, t < f_pad / LANES); unaligned
                // loads.
                unsafe {
                    let pair = |p: *const f32, a: usize, b: usize| {
                        _mm512_insertf32x8::<1>(
                            _mm512_castps256_ps512(_mm256_loadu_ps(p.add(a))),
                            _mm256_loadu_ps(p.add(b)),
                        )
                    };
                    let xr = [
                        pair(xr_p, xb[0] + o, xb[1] + o),
                        pair(xr_p, xb[2] + o, xb[3] + o),
                    ];
                    let xi = [
                        pair(xi_p, xb[0] + o, xb[1] + o),
                        pair(xi_p, xb[2] + o, xb[3] + o),
                    ];
                    for ii in 0..I {
                        let sr = _mm512_broadcast_f32x8(_mm256_loadu_ps(sr_p.add(sb[ii] + o)));
                        let si = _mm512_broadcast_f32x8(_mm256_loadu_ps(si_p.add(sb[ii] + o)));
                        for pr in 0..2 {
                            let (a_re, a_im) = (&mut acc_re[pr][ii], &mut acc_im[pr][ii]);
                            *a_re = _mm512_fmadd_ps(xr[pr], sr, *a_re);
                            *a_re = _mm512_fnmadd_ps(xi[pr], si, *a_re);
                            *a_im = _mm512_fmadd_ps(xr[pr], si, *a_im);
                            *a_im = _mm512_fmadd_ps(xi[pr], sr, *a_im);
                        }
                    }
                }
            }
            for pr in 0..2 {
                for ii in 0..I {
                    for half in 0..2 {
                        let r = r0 + 2 * pr + half;
                        let at = r * q_b * f_pad + packed(q_b, i0 + ii, fb);
                        let mut lo_re = [0f32; LANES];
                        let mut lo_im = [0f32; LANES];
                        // SAFETY: plain stores of register halves to local arrays.
                        unsafe {
                            let (v_re, v_im) = if half == 0 {
                                (
                                    _mm512_castps512_ps256(acc_re[pr][ii]),
                                    _mm512_castps512_ps256(acc_im[pr][ii]),
                                )
                            } else {
                                (
                                    _mm512_extractf32x8_ps::<1>(acc_re[pr][ii]),
                                    _mm512_extractf32x8_ps::<1>(acc_im[pr][ii]),
                                )
                            };
                            _mm256_storeu_ps(lo_re.as_mut_ptr(), v_re);
                            _mm256_storeu_ps(lo_im.as_mut_ptr(), v_im);
                        }
                        y_re[at..at + LANES].copy_from_slice(&lo_re);
                        y_im[at..at + LANES].copy_from_slice(&lo_im);
                    }
                }
            }
            r0 += 4;
        }
    }
}

/// Position of one register tile.
struct Tile {
    f_pad: usize,
    q_a: usize,
    q_b: usize,
    r0: usize,
    i0: usize,
    fb: usize,
}

impl Tile {
    /// R rows × I output blocks × LANES frequencies of the block product.
    #[inline(always)]
    fn product<'a, T: Float, const R: usize, const I: usize, const FMA: bool>(
        &self,
        (x_re, x_im): Planes<'a, T>,
        (s_re, s_im): Planes<'a, T>,
        (y_re, y_im): PlanesMut<'_, T>,
    ) {
        let (f_pad, q_a) = (self.f_pad, self.q_a);
        let mut acc_re = [[[T::zero(); LANES]; I]; R];
        let mut acc_im = [[[T::zero(); LANES]; I]; R];
        // Each group's tile of q_a spectra is contiguous (see `packed`): view it as q_a
        // lanes, so the loop over j indexes arrays of known length (no bounds checks).
        let tile = |planes: &'a [T], group: usize| -> &'a [[T; LANES]] {
            let at = group * q_a * f_pad + packed(q_a, 0, self.fb);
            planes[at..at + q_a * LANES].as_chunks::<LANES>().0
        };
        // Plain loops, not `std::array::from_fn`: its closures were not always inlined
        // (a call per tile and spectrum in the profile).
        let mut xs_re: [&[Lane<T>]; R] = [&[]; R];
        let mut xs_im: [&[Lane<T>]; R] = [&[]; R];
        for r in 0..R {
            xs_re[r] = tile(x_re, self.r0 + r);
            xs_im[r] = tile(x_im, self.r0 + r);
        }
        let mut ss_re: [&[Lane<T>]; I] = [&[]; I];
        let mut ss_im: [&[Lane<T>]; I] = [&[]; I];
        for i in 0..I {
            ss_re[i] = tile(s_re, self.i0 + i);
            ss_im[i] = tile(s_im, self.i0 + i);
        }
        for j in 0..q_a {
            let (mut xr, mut xi) = ([[T::zero(); LANES]; R], [[T::zero(); LANES]; R]);
            for r in 0..R {
                xr[r] = xs_re[r][j];
                xi[r] = xs_im[r][j];
            }
            let (mut sr, mut si) = ([[T::zero(); LANES]; I], [[T::zero(); LANES]; I]);
            for i in 0..I {
                sr[i] = ss_re[i][j];
                si[i] = ss_im[i][j];
            }
            for r in 0..R {
                for i in 0..I {
                    for l in 0..LANES {
                        let a = (&mut acc_re[r][i][l], &mut acc_im[r][i][l]);
                        mac::<T, FMA>(a, (xr[r][l], xi[r][l]), (sr[i][l], si[i][l]));
                    }
                }
            }
        }
        for r in 0..R {
            for i in 0..I {
                let at = (self.r0 + r) * self.q_b * f_pad + packed(self.q_b, self.i0 + i, self.fb);
                y_re[at..at + LANES].copy_from_slice(&acc_re[r][i]);
                y_im[at..at + LANES].copy_from_slice(&acc_im[r][i]);
            }
        }
    }
}

/// Kernel gradient for one tile of frequencies `fb`: for every output block i and input
/// block j, k[i, j, :] += Σ_r g[r, i, fb..fb+LANES] ⊙ conj(x[r, j, fb..fb+LANES]), over the
/// rows of one chunk in order.
///
/// Layouts: g and x hold one chunk of `rows` rows in the row-transposed layout (see
/// [`packed_by_row`]); k is this tile's slab, (q_out, q_in, LANES). `last`: the tile is
/// a last tile that holds one frequency, summed compact ([`kernel_grad_last_body`]; the
/// same bits in that frequency, lanes 1.. of k untouched).
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate_kernel_grad<T: Float>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T::Acc>,
    last: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx512_fma_available() {
            // SAFETY: the CPU supports AVX-512F and FMA, checked just above.
            return unsafe { accumulate_kernel_grad_avx512(q_out, q_in, rows, fb, g, x, k, last) };
        }
    }
    dispatch_avx2!(
        accumulate_kernel_grad_body,
        accumulate_kernel_grad_avx2(q_out, q_in, rows, fb, g, x, k, last)
    )
}

/// Rows per block of [`kernel_grad_last_body`]'s gathered input spectra.
const LAST_ROWS: usize = 16;

/// The kernel-gradient sums for a last tile that holds one frequency (F ≡ 1 mod LANES;
/// see [`last_tile`]): that frequency's sums with the lanes over input blocks instead of
/// over seven padding frequencies. Every k[i, j] gets the very operations, in the same
/// order (rows in order, fused or not), that [`GradTile::accumulate`] gives its lane 0,
/// so the same bits; lanes 1.. of k's tile are left as they are (nothing reads them).
#[inline(always)]
fn kernel_grad_last_body<T: Float, const FMA: bool>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    (g_re, g_im): Planes<'_, T>,
    (x_re, x_im): Planes<'_, T>,
    (k_re, k_im): PlanesMut<'_, T::Acc>,
) {
    let zero = <T::Acc as num_traits::Zero>::zero();
    let k_at = |i: usize, j: usize| (i * q_in + j) * LANES;
    let mut j0 = 0;
    while j0 < q_in {
        let nj = (q_in - j0).min(LANES);
        let mut r0 = 0;
        while r0 < rows {
            let nr = (rows - r0).min(LAST_ROWS);
            // lane 0 of x's tile for input blocks j0..j0 + nj of rows r0..r0 + nr, widened
            let mut xr = [[zero; LANES]; LAST_ROWS];
            let mut xi = [[zero; LANES]; LAST_ROWS];
            for r in 0..nr {
                for l in 0..nj {
                    let at = packed_by_row(q_in, rows, r0 + r, j0 + l, fb);
                    xr[r][l] = x_re[at].widen();
                    xi[r][l] = x_im[at].widen();
                }
            }
            for i in 0..q_out {
                let mut acc_re = [zero; LANES];
                let mut acc_im = [zero; LANES];
                for l in 0..nj {
                    acc_re[l] = k_re[k_at(i, j0 + l)];
                    acc_im[l] = k_im[k_at(i, j0 + l)];
                }
                for r in 0..nr {
                    let at = packed_by_row(q_out, rows, r0 + r, i, fb);
                    let (gr, gi) = (g_re[at].widen(), g_im[at].widen());
                    let (xr, xi) = (&xr[r], &xi[r]);
                    for l in 0..LANES {
                        // GradTile::accumulate's operations for lane 0: g ⊙ conj(x)
                        let a = (&mut acc_re[l], &mut acc_im[l]);
                        conj_mac::<_, FMA>(a, (gr, gi), (xr[l], xi[l]));
                    }
                }
                for l in 0..nj {
                    k_re[k_at(i, j0 + l)] = acc_re[l];
                    k_im[k_at(i, j0 + l)] = acc_im[l];
                }
            }
            r0 += nr;
        }
        j0 += LANES;
    }
}

/// Whether the AVX-512 build of the kernel-gradient sums runs on this CPU (AVX-512F with
/// FMA): one 8-lane float64 register per tile of frequencies, fused multiply-adds, and
/// 32 registers for a 4 × 2 block tile. Results differ from the generic build by
/// rounding in the float64 accumulators only (tested).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_fma_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("fma")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_kernel_grad_avx512<T: Float>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T::Acc>,
    last: bool,
) {
    accumulate_kernel_grad_tiles::<T, true>(q_out, q_in, rows, fb, g, x, k, last)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn accumulate_kernel_grad_avx2<T: Float>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T::Acc>,
    last: bool,
) {
    accumulate_kernel_grad_body(q_out, q_in, rows, fb, g, x, k, last)
}

/// Position of one kernel-gradient tile.
struct GradTile {
    q_out: usize,
    q_in: usize,
    rows: usize,
    i0: usize,
    j0: usize,
    fb: usize,
}

impl GradTile {
    /// I output blocks × J input blocks × LANES frequencies, summed over the chunk's rows
    /// (FMA: fused multiply-adds, one rounding per product term).
    #[inline(always)]
    fn accumulate<T: Float, const I: usize, const J: usize, const FMA: bool>(
        &self,
        (g_re, g_im): Planes<'_, T>,
        (x_re, x_im): Planes<'_, T>,
        (k_re, k_im): PlanesMut<'_, T::Acc>,
    ) {
        // Accumulated in T::Acc (f64): each product of two float32 values is exact there,
        // so the sum over many rows does not lose the float32 result to cancellation.
        let k_at = |i: usize, j: usize| ((self.i0 + i) * self.q_in + self.j0 + j) * LANES;
        let zero = <T::Acc as num_traits::Zero>::zero();
        let mut acc_re = [[[zero; LANES]; J]; I];
        let mut acc_im = [[[zero; LANES]; J]; I];
        for i in 0..I {
            for j in 0..J {
                acc_re[i][j] = load(k_re, k_at(i, j));
                acc_im[i][j] = load(k_im, k_at(i, j));
            }
        }
        for r in 0..self.rows {
            let mut gr = [[zero; LANES]; I];
            let mut gi = [[zero; LANES]; I];
            for i in 0..I {
                let at = packed_by_row(self.q_out, self.rows, r, self.i0 + i, self.fb);
                gr[i] = widen(load(g_re, at));
                gi[i] = widen(load(g_im, at));
            }
            let mut xr = [[zero; LANES]; J];
            let mut xi = [[zero; LANES]; J];
            for j in 0..J {
                let at = packed_by_row(self.q_in, self.rows, r, self.j0 + j, self.fb);
                xr[j] = widen(load(x_re, at));
                xi[j] = widen(load(x_im, at));
            }
            for i in 0..I {
                for j in 0..J {
                    for l in 0..LANES {
                        // g ⊙ conj(x)
                        let a = (&mut acc_re[i][j][l], &mut acc_im[i][j][l]);
                        conj_mac::<_, FMA>(a, (gr[i][l], gi[i][l]), (xr[j][l], xi[j][l]));
                    }
                }
            }
        }
        for i in 0..I {
            for j in 0..J {
                let at = k_at(i, j);
                k_re[at..at + LANES].copy_from_slice(&acc_re[i][j]);
                k_im[at..at + LANES].copy_from_slice(&acc_im[i][j]);
            }
        }
    }
}

#[inline(always)]
fn widen<T: Float>(v: Lane<T>) -> Lane<T::Acc> {
    let mut out = [<T::Acc as num_traits::Zero>::zero(); LANES];
    for l in 0..LANES {
        out[l] = v[l].widen();
    }
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_kernel_grad_body<T: Float>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T::Acc>,
    last: bool,
) {
    accumulate_kernel_grad_tiles::<T, false>(q_out, q_in, rows, fb, g, x, k, last)
}

/// Tiles of 2 × 2 blocks, or 4 × 2 (WIDE: the AVX-512 build with FMA, 32 registers); a
/// compact `last` tile with the same arithmetic (fused when WIDE).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn accumulate_kernel_grad_tiles<T: Float, const WIDE: bool>(
    q_out: usize,
    q_in: usize,
    rows: usize,
    fb: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T::Acc>,
    last: bool,
) {
    if last {
        return kernel_grad_last_body::<T, WIDE>(q_out, q_in, rows, fb, g, x, k);
    }
    let (k_re, k_im) = k;
    let mut i0 = 0;
    while i0 < q_out {
        let ni = (q_out - i0).min(if WIDE { 4 } else { 2 });
        let mut j0 = 0;
        while j0 < q_in {
            let nj = (q_in - j0).min(2);
            let t = GradTile {
                q_out,
                q_in,
                rows,
                i0,
                j0,
                fb,
            };
            let k = (&mut *k_re, &mut *k_im);
            match (ni, nj) {
                (4, 2) => t.accumulate::<T, 4, 2, WIDE>(g, x, k),
                (4, _) => t.accumulate::<T, 4, 1, WIDE>(g, x, k),
                (3, 2) => t.accumulate::<T, 3, 2, WIDE>(g, x, k),
                (3, _) => t.accumulate::<T, 3, 1, WIDE>(g, x, k),
                (2, 2) => t.accumulate::<T, 2, 2, WIDE>(g, x, k),
                (2, _) => t.accumulate::<T, 2, 1, WIDE>(g, x, k),
                (_, 2) => t.accumulate::<T, 1, 2, WIDE>(g, x, k),
                _ => t.accumulate::<T, 1, 1, WIDE>(g, x, k),
            }
            j0 += nj;
        }
        i0 += ni;
    }
}

/// True when every value is finite (no NaN, no ±Inf). Branch-free per block so that it
/// vectorises; stops at the first bad block.
pub(crate) fn all_finite<T: Float>(data: &[T]) -> bool {
    dispatch_avx2!(all_finite_body, all_finite_avx2(data))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn all_finite_avx2<T: Float>(data: &[T]) -> bool {
    all_finite_body(data)
}

#[inline(always)]
fn all_finite_body<T: Float>(data: &[T]) -> bool {
    let inf = T::infinity();
    data.chunks(1024).all(|block| {
        // |v| < inf is false for ±Inf and for NaN.
        block.iter().fold(true, |ok, &v| ok & (v.abs() < inf))
    })
}

#[cfg(test)]
mod tests {
    //! The AVX2 build of each kernel must give the generic build's results bit for bit (the
    //! property the module docs promise, which makes results independent of the CPU).
    use super::*;
    use crate::testutil::rel_err;

    /// Deterministic values over a wide dynamic range, so that any change in the order or
    /// the fusion of operations shows in the last bits.
    fn values<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut next = crate::testutil::xorshift(seed);
        (0..n)
            .map(|_| {
                let s = next();
                let u = (s >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
                let e = ((s >> 3) % 24) as i32 - 12;
                T::from((u * 2.0 - 1.0) * 2f64.powi(e)).unwrap_or_else(T::zero)
            })
            .collect()
    }

    fn bits<T: Float>(v: &[T]) -> Vec<u64> {
        v.iter()
            .map(|x| x.to_f64().unwrap_or(0.0).to_bits())
            .collect()
    }

    fn check_block_product<T: Float>() {
        for &(q_a, q_b, rows, f_n) in &[
            (1, 1, 1, 1),
            (3, 2, 5, 9),
            (4, 5, 3, 17),
            (7, 3, 2, 33),
            (4, 4, 4, 8),
            (5, 9, 11, 17),
            (16, 8, 13, 33),
            (2, 7, 8, 129),
        ] {
            let f_pad = padded_freqs(f_n);
            let (x_re, x_im) = (
                values::<T>(rows * q_a * f_pad, 1),
                values::<T>(rows * q_a * f_pad, 2),
            );
            let (s_re, s_im) = (
                values::<T>(q_b * q_a * f_pad, 3),
                values::<T>(q_b * q_a * f_pad, 4),
            );
            let n = rows * q_b * f_pad;
            let (mut g_re, mut g_im) = (vec![T::zero(); n], vec![T::zero(); n]);
            block_product_generic(
                f_pad,
                q_a,
                q_b,
                (&x_re, &x_im),
                (&s_re, &s_im),
                (&mut g_re, &mut g_im),
                None,
            );
            let (mut a_re, mut a_im) = (vec![T::zero(); n], vec![T::zero(); n]);
            // SAFETY: run only where the CPU has AVX2 (checked by the callers).
            unsafe {
                block_product_avx2(
                    f_pad,
                    q_a,
                    q_b,
                    (&x_re, &x_im),
                    (&s_re, &s_im),
                    (&mut a_re, &mut a_im),
                    None,
                )
            };
            assert_eq!(bits(&g_re), bits(&a_re), "re, {q_a} {q_b} {rows} {f_n}");
            assert_eq!(bits(&g_im), bits(&a_im), "im, {q_a} {q_b} {rows} {f_n}");
            if fma_available() {
                // The FMA build rounds once per multiply-add: equal up to rounding.
                let (mut f_re, mut f_im) = (vec![T::zero(); n], vec![T::zero(); n]);
                // SAFETY: the CPU has AVX2 and FMA.
                unsafe {
                    block_product_fma(
                        f_pad,
                        q_a,
                        q_b,
                        (&x_re, &x_im),
                        (&s_re, &s_im),
                        (&mut f_re, &mut f_im),
                        None,
                    )
                };
                let tol = T::epsilon().to_f64().unwrap_or(1.0) * 4.0 * q_a as f64;
                for (got, want) in [(&f_re, &g_re), (&f_im, &g_im)] {
                    let err = rel_err(got, want);
                    assert!(err <= tol, "fma path off by {err:e} > {tol:e}");
                }
                if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                    && avx512_block_available()
                {
                    // The AVX-512 build runs the same fused multiply-adds in the same
                    // order per accumulator: equal to the FMA build bit for bit.
                    let (mut v_re, mut v_im) = (vec![T::zero(); n], vec![T::zero(); n]);
                    // SAFETY: T is f32 and the CPU has AVX-512F/DQ and FMA.
                    unsafe {
                        block_product_avx512_f32(
                            f_pad,
                            q_a,
                            q_b,
                            (cast_f32(&x_re), cast_f32(&x_im)),
                            (cast_f32(&s_re), cast_f32(&s_im)),
                            (cast_f32_mut(&mut v_re), cast_f32_mut(&mut v_im)),
                            None,
                        )
                    };
                    assert_eq!(
                        bits(&v_re),
                        bits(&f_re),
                        "avx512 re, {q_a} {q_b} {rows} {f_n}"
                    );
                    assert_eq!(
                        bits(&v_im),
                        bits(&f_im),
                        "avx512 im, {q_a} {q_b} {rows} {f_n}"
                    );
                }
            }
        }
    }

    fn check_kernel_grad<T: Float>() {
        for &(q_out, q_in, rows, f_n) in &[
            (1, 1, 1, 1),
            (3, 2, 5, 9),
            (5, 4, 16, 17),
            (9, 7, 3, 33),
            (4, 3, 2, 8),
        ] {
            let f_pad = padded_freqs(f_n);
            let (g_re, g_im) = (
                values::<T>(rows * q_out * f_pad, 5),
                values::<T>(rows * q_out * f_pad, 6),
            );
            let (x_re, x_im) = (
                values::<T>(rows * q_in * f_pad, 7),
                values::<T>(rows * q_in * f_pad, 8),
            );
            let slab = q_out * q_in * LANES;
            for fb in (0..f_pad).step_by(LANES) {
                let start = values::<T>(slab, fb as u64 + 9);
                let start: Vec<T::Acc> = start.iter().map(|v| v.widen()).collect();
                let start_re = start.clone();
                let (mut k1_re, mut k1_im) = (start.clone(), start.clone());
                let (mut k2_re, mut k2_im) = (start.clone(), start);
                accumulate_kernel_grad_body(
                    q_out,
                    q_in,
                    rows,
                    fb,
                    (&g_re, &g_im),
                    (&x_re, &x_im),
                    (&mut k1_re, &mut k1_im),
                    false,
                );
                // SAFETY: as above.
                unsafe {
                    accumulate_kernel_grad_avx2(
                        q_out,
                        q_in,
                        rows,
                        fb,
                        (&g_re, &g_im),
                        (&x_re, &x_im),
                        (&mut k2_re, &mut k2_im),
                        false,
                    )
                };
                assert_eq!(bits(&k1_re), bits(&k2_re));
                assert_eq!(bits(&k1_im), bits(&k2_im));
                if avx512_fma_available() {
                    // The AVX-512 build fuses the multiply-adds: equal up to rounding in
                    // the float64 accumulators (2 roundings per term on either path).
                    let (mut k3_re, mut k3_im) = (start_re.clone(), start_re.clone());
                    // SAFETY: the CPU has AVX-512F and FMA.
                    unsafe {
                        accumulate_kernel_grad_avx512(
                            q_out,
                            q_in,
                            rows,
                            fb,
                            (&g_re, &g_im),
                            (&x_re, &x_im),
                            (&mut k3_re, &mut k3_im),
                            false,
                        )
                    };
                    let tol = f64::EPSILON * 4.0 * (rows + 1) as f64;
                    for (got, want) in [(&k3_re, &k1_re), (&k3_im, &k1_im)] {
                        let err = rel_err(got, want);
                        assert!(err <= tol, "avx512 path off by {err:e} > {tol:e}");
                    }
                }
            }
        }
    }

    /// The builds of the block product that the CPU runs.
    fn product_builds<T: Float>() -> Vec<&'static str> {
        let mut builds = vec!["generic"];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                builds.push("avx2");
            }
            if fma_available() {
                builds.push("fma");
            }
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && avx512_block_available()
            {
                builds.push("avx512");
            }
        }
        builds
    }

    /// One build of the block product (one of [`product_builds`]).
    #[allow(clippy::too_many_arguments)]
    fn run_product<T: Float>(
        build: &str,
        f_pad: usize,
        q_a: usize,
        q_b: usize,
        x: Planes<'_, T>,
        s: Planes<'_, T>,
        y: PlanesMut<'_, T>,
        last: Option<Planes<'_, T>>,
    ) {
        match build {
            "generic" => block_product_generic(f_pad, q_a, q_b, x, s, y, last),
            "portable fma" => block_product_body::<T, true>(f_pad, q_a, q_b, x, s, y, last),
            // SAFETY: product_builds lists a build only where the CPU runs it; avx512
            // only for T = f32.
            #[cfg(target_arch = "x86_64")]
            "avx2" => unsafe { block_product_avx2(f_pad, q_a, q_b, x, s, y, last) },
            #[cfg(target_arch = "x86_64")]
            "fma" => unsafe { block_product_fma(f_pad, q_a, q_b, x, s, y, last) },
            #[cfg(target_arch = "x86_64")]
            "avx512" => unsafe {
                block_product_avx512_f32(
                    f_pad,
                    q_a,
                    q_b,
                    (cast_f32(x.0), cast_f32(x.1)),
                    (cast_f32(s.0), cast_f32(s.1)),
                    (cast_f32_mut(y.0), cast_f32_mut(y.1)),
                    last.map(|l| (cast_f32(l.0), cast_f32(l.1))),
                )
            },
            other => panic!("no build {other}"),
        }
    }

    /// The compact last tile (`last=`) gives every build's own full-tile result bit for
    /// bit in the last frequency, and zeros in that tile's padding lanes; the other tiles
    /// are untouched by it.
    fn check_compact_last_tile<T: Float>() {
        for &(q_a, q_b, rows, f_n) in &[
            (1, 1, 1, 1),
            (1, 1, 3, 9),
            (3, 2, 5, 9),
            (4, 5, 3, 17),
            (7, 3, 2, 33),
            (5, 9, 11, 17),
            (16, 8, 13, 33),
            (2, 17, 8, 129),
            (9, 11, 6, 1),
        ] {
            let f_pad = padded_freqs(f_n);
            let fb = f_pad - LANES;
            assert_eq!(f_n, fb + 1);
            let (x_re, x_im) = (
                values::<T>(rows * q_a * f_pad, 21),
                values::<T>(rows * q_a * f_pad, 22),
            );
            let (s_re, s_im) = (
                values::<T>(q_b * q_a * f_pad, 23),
                values::<T>(q_b * q_a * f_pad, 24),
            );
            let stride = last_stride(q_b);
            let (mut l_re, mut l_im) =
                (vec![T::zero(); q_a * stride], vec![T::zero(); q_a * stride]);
            for i in 0..q_b {
                for j in 0..q_a {
                    let at = i * q_a * f_pad + packed(q_a, j, fb);
                    l_re[j * stride + i] = s_re[at];
                    l_im[j * stride + i] = s_im[at];
                }
            }
            let n = rows * q_b * f_pad;
            // the fused arithmetic through portable mul_add too (any CPU)
            let mut builds = product_builds::<T>();
            builds.push("portable fma");
            for name in builds {
                let (mut f_re, mut f_im) = (vec![T::zero(); n], vec![T::zero(); n]);
                let (x, s) = ((&x_re[..], &x_im[..]), (&s_re[..], &s_im[..]));
                run_product(name, f_pad, q_a, q_b, x, s, (&mut f_re, &mut f_im), None);
                let nan = T::nan();
                let (mut c_re, mut c_im) = (vec![nan; n], vec![nan; n]);
                run_product(
                    name,
                    f_pad,
                    q_a,
                    q_b,
                    (&x_re, &x_im),
                    (&s_re, &s_im),
                    (&mut c_re, &mut c_im),
                    Some((&l_re, &l_im)),
                );
                for r in 0..rows {
                    for i in 0..q_b {
                        for f in 0..f_pad {
                            let at = r * q_b * f_pad + packed(q_b, i, f);
                            let case =
                                format!("{name}: {q_a} {q_b} {rows} {f_n}, r {r} i {i} f {f}");
                            if f < f_n {
                                assert_eq!(bits(&[c_re[at]]), bits(&[f_re[at]]), "re {case}");
                                assert_eq!(bits(&[c_im[at]]), bits(&[f_im[at]]), "im {case}");
                            } else {
                                assert!(c_re[at] == T::zero() && c_im[at] == T::zero(), "{case}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The compact kernel-gradient sums of a last tile give what `accumulate_kernel_grad`
    /// gives lane 0 of that tile on this CPU, bit for bit, and leave the other lanes.
    fn check_compact_kernel_grad<T: Float>() {
        for &(q_out, q_in, rows, f_n) in &[
            (1, 1, 1, 1),
            (3, 2, 5, 9),
            (5, 4, 16, 17),
            (9, 17, 3, 33),
            (2, 9, 40, 9),
            (4, 3, 2, 129),
        ] {
            let f_pad = padded_freqs(f_n);
            let fb = f_pad - LANES;
            let (g_re, g_im) = (
                values::<T>(rows * q_out * f_pad, 25),
                values::<T>(rows * q_out * f_pad, 26),
            );
            let (x_re, x_im) = (
                values::<T>(rows * q_in * f_pad, 27),
                values::<T>(rows * q_in * f_pad, 28),
            );
            let slab = q_out * q_in * LANES;
            let start: Vec<T::Acc> = values::<T>(slab, 29).iter().map(|v| v.widen()).collect();
            let (mut k1_re, mut k1_im) = (start.clone(), start.clone());
            let (mut k2_re, mut k2_im) = (start.clone(), start.clone());
            let g = (&g_re[..], &g_im[..]);
            let x = (&x_re[..], &x_im[..]);
            accumulate_kernel_grad(q_out, q_in, rows, fb, g, x, (&mut k1_re, &mut k1_im), false);
            accumulate_kernel_grad(q_out, q_in, rows, fb, g, x, (&mut k2_re, &mut k2_im), true);
            for at in 0..slab {
                let want = match at % LANES {
                    0 => (k1_re[at], k1_im[at]),
                    _ => (start[at], start[at]),
                };
                let case = format!("{q_out} {q_in} {rows} {f_n}, at {at}");
                assert_eq!(bits(&[k2_re[at]]), bits(&[want.0]), "re {case}");
                assert_eq!(bits(&[k2_im[at]]), bits(&[want.1]), "im {case}");
            }
            // and each arithmetic (plain; fused, as the AVX-512 build runs it, here through
            // portable mul_add on any CPU) against its full tiles
            let (mut k3_re, mut k3_im) = (start.clone(), start.clone());
            let (mut k4_re, mut k4_im) = (start.clone(), start.clone());
            accumulate_kernel_grad_body(
                q_out,
                q_in,
                rows,
                fb,
                g,
                x,
                (&mut k3_re, &mut k3_im),
                false,
            );
            accumulate_kernel_grad_body(
                q_out,
                q_in,
                rows,
                fb,
                g,
                x,
                (&mut k4_re, &mut k4_im),
                true,
            );
            let (mut k5_re, mut k5_im) = (start.clone(), start.clone());
            let (mut k6_re, mut k6_im) = (start.clone(), start);
            let k5 = (&mut k5_re[..], &mut k5_im[..]);
            accumulate_kernel_grad_tiles::<T, true>(q_out, q_in, rows, fb, g, x, k5, false);
            let k6 = (&mut k6_re[..], &mut k6_im[..]);
            accumulate_kernel_grad_tiles::<T, true>(q_out, q_in, rows, fb, g, x, k6, true);
            for at in (0..slab).step_by(LANES) {
                assert_eq!(bits(&[k4_re[at]]), bits(&[k3_re[at]]), "plain re at {at}");
                assert_eq!(bits(&[k4_im[at]]), bits(&[k3_im[at]]), "plain im at {at}");
                assert_eq!(bits(&[k6_re[at]]), bits(&[k5_re[at]]), "fused re at {at}");
                assert_eq!(bits(&[k6_im[at]]), bits(&[k5_im[at]]), "fused im at {at}");
            }
        }
    }

    #[test]
    fn compact_last_tile_gives_the_full_tiles_bits() {
        check_compact_last_tile::<f32>();
        check_compact_last_tile::<f64>();
        check_compact_kernel_grad::<f32>();
        check_compact_kernel_grad::<f64>();
    }

    #[test]
    fn avx2_and_generic_paths_agree_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        {
            if !std::arch::is_x86_feature_detected!("avx2") {
                eprintln!("no AVX2 on this CPU: nothing to compare");
                return;
            }
            check_block_product::<f32>();
            check_block_product::<f64>();
            check_kernel_grad::<f32>();
            check_kernel_grad::<f64>();
            let mut v = values::<f32>(5000, 11);
            assert_eq!(all_finite_body(&v), unsafe { all_finite_avx2(&v) });
            v[4321] = f32::NAN;
            assert!(!all_finite_body(&v) && !unsafe { all_finite_avx2(&v) });
        }
    }
}

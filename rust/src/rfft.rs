//! Real FFTs of one length p whose spectra come out as (and go in from) split
//! real/imaginary planes, the layout the rest of the core works in.
//!
//! For even p (every block size people use), a real signal x of length p is transformed
//! with one complex FFT of length h = p / 2 (rustfft, AVX where the CPU has it) of
//! z[n] = x[2n] + i·x[2n+1], followed by a vectorised split step:
//!
//! ```text
//!     X[k] = ½ (Z[k] + conj Z[h−k]) − ½ i·W^k (Z[k] − conj Z[h−k]),   W = e^{−2πi/p}
//! ```
//!
//! for k = 0..=h (Z periodic in h), written straight into split planes. The inverse
//! undoes it: Z[k] = (X[k] + conj X[h−k]) + i·conj(W^k)(X[k] − conj X[h−k]), then an
//! inverse complex FFT of length h whose interleaved output is the signal. Conventions
//! are realfft's: forward unnormalised, inverse unnormalised (returns p·x), the imaginary
//! parts of the DC and Nyquist bins ignored by the inverse. Odd p goes through realfft.
//!
//! The split steps contain no fused multiply-adds and no sums across lanes, so the AVX2
//! build gives the generic build's results bit for bit.

use std::sync::Arc;

use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

use crate::alloc::{colour, AVec};
use crate::simd::{padded_freqs, LANES};
use crate::{BcaError, Float};

fn fft_err(e: impl std::fmt::Display) -> BcaError {
    BcaError::Fft(e.to_string())
}

enum Plan<T: Float> {
    /// p = 2h: complex FFTs of length h and the split twiddles ½·W^k, k < f_pad.
    Even {
        fwd: Arc<dyn Fft<T>>,
        inv: Arc<dyn Fft<T>>,
        tw_re: Vec<T>,
        tw_im: Vec<T>,
    },
    Odd {
        r2c: Arc<dyn RealToComplex<T>>,
        c2r: Arc<dyn ComplexToReal<T>>,
    },
}

/// Forward and inverse real FFTs of length p (shared, immutable).
pub(crate) struct RealFft<T: Float> {
    p: usize,
    f_pad: usize,
    scratch_len: usize,
    plan: Plan<T>,
}

/// Per-thread buffers for [`RealFft`].
pub(crate) struct FftScratch<T> {
    /// The complex buffer: h values (even p) or F values (odd p).
    buf: AVec<Complex<T>>,
    scratch: AVec<Complex<T>>,
    /// Time samples (odd p only).
    time: AVec<T>,
    /// Four split planes of f_pad values.
    a_re: AVec<T>,
    a_im: AVec<T>,
    b_re: AVec<T>,
    b_im: AVec<T>,
}

impl<T> FftScratch<T> {
    pub(crate) fn bytes(&self) -> usize {
        self.buf.bytes()
            + self.scratch.bytes()
            + self.time.bytes()
            + self.a_re.bytes()
            + self.a_im.bytes()
            + self.b_re.bytes()
            + self.b_im.bytes()
    }
}

impl<T: Float> RealFft<T> {
    /// Plans for length `p` (≥ 1). Planning allocates infallibly: callers probe first.
    pub(crate) fn new(p: usize) -> Self {
        let f_pad = padded_freqs(p / 2 + 1);
        if p >= 2 && p.is_multiple_of(2) {
            let h = p / 2;
            let mut planner = FftPlanner::<T>::new();
            let fwd = planner.plan_fft_forward(h);
            let inv = planner.plan_fft_inverse(h);
            let scratch_len = fwd
                .get_inplace_scratch_len()
                .max(inv.get_inplace_scratch_len());
            let (mut tw_re, mut tw_im) = (vec![T::zero(); f_pad], vec![T::zero(); f_pad]);
            for k in 0..=h {
                let angle = -2.0 * std::f64::consts::PI * k as f64 / p as f64;
                tw_re[k] = T::from(0.5 * angle.cos()).unwrap_or_else(T::zero);
                tw_im[k] = T::from(0.5 * angle.sin()).unwrap_or_else(T::zero);
            }
            RealFft {
                p,
                f_pad,
                scratch_len,
                plan: Plan::Even {
                    fwd,
                    inv,
                    tw_re,
                    tw_im,
                },
            }
        } else {
            let mut planner = RealFftPlanner::<T>::new();
            let r2c = planner.plan_fft_forward(p);
            let c2r = planner.plan_fft_inverse(p);
            let scratch_len = r2c.get_scratch_len().max(c2r.get_scratch_len());
            RealFft {
                p,
                f_pad,
                scratch_len,
                plan: Plan::Odd { r2c, c2r },
            }
        }
    }

    /// Frequency stride (F = p / 2 + 1 rounded up to the SIMD tile).
    pub(crate) fn f_pad(&self) -> usize {
        self.f_pad
    }

    /// Fresh buffers for one thread.
    pub(crate) fn scratch(&self) -> Result<FftScratch<T>, BcaError> {
        let what = "an FFT workspace";
        let (buf_len, time_len) = match self.plan {
            // one more than h: room for the periodic copy Z[h] = Z[0] (see `forward`)
            Plan::Even { .. } => (self.p / 2 + 1, 0),
            Plan::Odd { .. } => (self.p / 2 + 1, self.p),
        };
        Ok(FftScratch {
            buf: AVec::try_new(buf_len, Complex::default(), colour::FFT_BUF, what)?,
            scratch: AVec::try_new(
                self.scratch_len,
                Complex::default(),
                colour::FFT_SCRATCH,
                what,
            )?,
            time: AVec::try_new(time_len, T::zero(), colour::FFT_TIME, what)?,
            a_re: AVec::try_new(self.f_pad, T::zero(), colour::FFT_PLANES[0], what)?,
            a_im: AVec::try_new(self.f_pad, T::zero(), colour::FFT_PLANES[1], what)?,
            b_re: AVec::try_new(self.f_pad, T::zero(), colour::FFT_PLANES[2], what)?,
            b_im: AVec::try_new(self.f_pad, T::zero(), colour::FFT_PLANES[3], what)?,
        })
    }

    /// Spectrum of `block` (at most p samples, zero-padded to p), handed to `sink` one
    /// tile at a time: `sink(t, re, im)` gets frequencies t·LANES.. (padding lanes zero).
    /// Returns false, without calling `sink`, when `block` holds NaN or ±Inf (checked
    /// while it is copied, not in a separate pass).
    #[inline]
    pub(crate) fn forward(
        &self,
        block: &[T],
        ws: &mut FftScratch<T>,
        mut sink: impl FnMut(usize, &[T; LANES], &[T; LANES]),
    ) -> Result<bool, BcaError> {
        let n = block.len().min(self.p);
        match &self.plan {
            Plan::Even {
                fwd, tw_re, tw_im, ..
            } => {
                let h = self.p / 2;
                {
                    let flat = as_flat_mut(&mut ws.buf[..h]);
                    if !copy_finite(&mut flat[..n], &block[..n]) {
                        return Ok(false);
                    }
                    flat[n..].fill(T::zero());
                }
                fwd.process_with_scratch(&mut ws.buf[..h], &mut ws.scratch);
                // Z is periodic: Z[h] = Z[0], so the split's first tile needs no special case
                ws.buf[h] = ws.buf[0];
                let FftScratch {
                    buf,
                    a_re,
                    a_im,
                    b_re,
                    b_im,
                    ..
                } = ws;
                split_forward(h, &buf[..=h], (a_re, a_im), (b_re, b_im), (tw_re, tw_im));
            }
            Plan::Odd { r2c, .. } => {
                if !copy_finite(&mut ws.time[..n], &block[..n]) {
                    return Ok(false);
                }
                ws.time[n..].fill(T::zero());
                r2c.process_with_scratch(&mut ws.time, &mut ws.buf, &mut ws.scratch)
                    .map_err(fft_err)?;
                let f_n = ws.buf.len();
                for (k, c) in ws.buf.iter().enumerate() {
                    ws.a_re[k] = c.re;
                    ws.a_im[k] = c.im;
                }
                ws.a_re[f_n..].fill(T::zero());
                ws.a_im[f_n..].fill(T::zero());
            }
        }
        // ws.a now holds the spectrum (padding lanes zero), on either path.
        let tiles = ws.a_re.as_chunks::<LANES>().0.iter();
        for (t, (re, im)) in tiles.zip(ws.a_im.as_chunks::<LANES>().0).enumerate() {
            sink(t, re, im);
        }
        Ok(true)
    }

    /// Whether [`convolve_block`](Self::convolve_block) runs on this CPU for this length:
    /// even p, float32, AVX2 and FMA.
    pub(crate) fn can_convolve(&self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            matches!(self.plan, Plan::Even { .. })
                && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && crate::simd::fma_available()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// `dst ← inverse(forward(block) ⊙ s)` for one whole block (`block` and `dst` of p
    /// samples; inverse unnormalised), where [`can_convolve`](Self::can_convolve): the
    /// split steps and the product run as one pass between the two complex FFTs
    /// (rfft_avx2.rs), with the operations of `forward`, `simd::single_product` and
    /// `inverse`, so the result is theirs bit for bit. Returns false, leaving `dst`
    /// unspecified, when `block` holds NaN or ±Inf.
    pub(crate) fn convolve_block(
        &self,
        block: &[T],
        s: Planes<'_, T>,
        dst: &mut [T],
        ws: &mut FftScratch<T>,
    ) -> Result<bool, BcaError> {
        let p = self.p;
        let applies = self.can_convolve() && block.len() == p && dst.len() == p;
        let (
            Plan::Even {
                fwd,
                inv,
                tw_re,
                tw_im,
            },
            true,
        ) = (&self.plan, applies)
        else {
            return Err(BcaError::invalid(
                "block",
                "convolve_block does not apply here",
            ));
        };
        let h = p / 2;
        if !copy_finite(as_flat_mut(&mut ws.buf[..h]), block) {
            return Ok(false);
        }
        fwd.process_with_scratch(&mut ws.buf[..h], &mut ws.scratch);
        let out = as_complex_mut(dst);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: can_convolve: T is f32 (so the casts only rename the type) and the CPU
        // has AVX2 and FMA; buf and out hold h values, the spectrum and twiddle planes
        // f_pad > h.
        unsafe {
            crate::rfft_avx2::split_product_split(
                h,
                cast_complex_f32(&ws.buf[..h]),
                (crate::simd::cast_f32(s.0), crate::simd::cast_f32(s.1)),
                (crate::simd::cast_f32(tw_re), crate::simd::cast_f32(tw_im)),
                cast_complex_f32_mut(out),
            );
        }
        inv.process_with_scratch(out, &mut ws.scratch);
        Ok(true)
    }

    /// Unnormalised inverse (p · x) of the spectrum that `source(t)` gives tile by tile
    /// into `dst` (its first `dst.len()` ≤ p samples). The imaginary parts of the DC and
    /// Nyquist bins are ignored.
    #[inline]
    pub(crate) fn inverse<'s>(
        &self,
        source: impl Fn(usize) -> (&'s [T], &'s [T]),
        dst: &mut [T],
        ws: &mut FftScratch<T>,
    ) -> Result<(), BcaError>
    where
        T: 's,
    {
        let n = dst.len().min(self.p);
        for t in 0..self.f_pad / LANES {
            let (re, im) = source(t);
            let at = t * LANES;
            ws.a_re[at..at + LANES].copy_from_slice(&re[..LANES]);
            ws.a_im[at..at + LANES].copy_from_slice(&im[..LANES]);
        }
        self.inverse_contiguous(&mut dst[..n], ws)
    }

    /// Like [`inverse`](Self::inverse), from the f_pad-long planes `ws.a_*` already
    /// filled by the caller (see [`FftScratch::planes_mut`]).
    pub(crate) fn inverse_contiguous(
        &self,
        dst: &mut [T],
        ws: &mut FftScratch<T>,
    ) -> Result<(), BcaError> {
        let n = dst.len().min(self.p);
        match &self.plan {
            Plan::Even {
                inv, tw_re, tw_im, ..
            } => {
                let h = self.p / 2;
                let FftScratch {
                    buf,
                    scratch,
                    a_re,
                    a_im,
                    b_re,
                    b_im,
                    ..
                } = ws;
                if n == self.p {
                    // A whole block: transform in place in the destination.
                    let out = as_complex_mut(dst);
                    split_inverse(h, (a_re, a_im), (b_re, b_im), (tw_re, tw_im), out);
                    inv.process_with_scratch(out, scratch);
                } else {
                    split_inverse(h, (a_re, a_im), (b_re, b_im), (tw_re, tw_im), &mut buf[..h]);
                    inv.process_with_scratch(&mut buf[..h], scratch);
                    dst[..n].copy_from_slice(&as_flat_mut(&mut buf[..h])[..n]);
                }
            }
            Plan::Odd { c2r, .. } => {
                for (k, c) in ws.buf.iter_mut().enumerate() {
                    *c = Complex::new(ws.a_re[k], ws.a_im[k]);
                }
                // realfft refuses a nonzero imaginary DC bin (rounding can leave one).
                ws.buf[0].im = T::zero();
                c2r.process_with_scratch(&mut ws.buf, &mut ws.time, &mut ws.scratch)
                    .map_err(fft_err)?;
                dst[..n].copy_from_slice(&ws.time[..n]);
            }
        }
        Ok(())
    }
}

impl<T> FftScratch<T> {
    /// The f_pad-long split planes that [`RealFft::inverse_contiguous`] reads.
    pub(crate) fn planes_mut(&mut self) -> (&mut [T], &mut [T]) {
        (&mut self.a_re, &mut self.a_im)
    }
}

/// The samples of complex values, interleaved (re, im, re, im, …).
fn as_flat_mut<T: Float>(v: &mut [Complex<T>]) -> &mut [T] {
    let len = v.len() * 2;
    // SAFETY: `Complex<T>` is `#[repr(C)]` { re: T, im: T }, so a slice of n complex
    // values is 2n contiguous, initialised, properly aligned T values; the borrow is
    // carried over.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<T>(), len) }
}

/// An even number of samples as complex values (pairs).
fn as_complex_mut<T: Float>(v: &mut [T]) -> &mut [Complex<T>] {
    debug_assert!(v.len().is_multiple_of(2));
    let len = v.len() / 2;
    // SAFETY: as in `as_flat_mut`: `Complex<T>` is `#[repr(C)]` { re: T, im: T } with
    // the alignment of T, so 2n contiguous T values are n complex values.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<Complex<T>>(), len) }
}

/// `dst ← src`; true when every value is finite (no NaN, no ±Inf).
fn copy_finite<T: Float>(dst: &mut [T], src: &[T]) -> bool {
    crate::simd::dispatch_avx2!(copy_finite_body, copy_finite_avx2(dst, src))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn copy_finite_avx2<T: Float>(dst: &mut [T], src: &[T]) -> bool {
    copy_finite_body(dst, src)
}

#[inline(always)]
fn copy_finite_body<T: Float>(dst: &mut [T], src: &[T]) -> bool {
    let inf = T::infinity();
    // |v| < inf is false for ±Inf and for NaN; branch-free so that it vectorises.
    dst.iter_mut().zip(src).fold(true, |ok, (d, &v)| {
        *d = v;
        ok & (v.abs() < inf)
    })
}

type PlanesMut<'a, T> = (&'a mut [T], &'a mut [T]);
type Planes<'a, T> = (&'a [T], &'a [T]);

/// The one-pass AVX2 split steps (rfft_avx2.rs) from this h = p/2 on: below it the two
/// edge tiles they do one bin at a time outweigh the pass they save (p = 64 ran 5-10%
/// slower than the three-pass generic build).
const ONE_PASS_MIN_H: usize = 64;

/// Split step of the forward transform: `z` (h values) → spectrum in `x` (f_pad values,
/// zero past h), using `r` as room for the reversed conjugate.
fn split_forward<T: Float>(
    h: usize,
    z: &[Complex<T>],
    x: PlanesMut<'_, T>,
    r: PlanesMut<'_, T>,
    tw: Planes<'_, T>,
) {
    #[cfg(target_arch = "x86_64")]
    if h >= ONE_PASS_MIN_H
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && std::arch::is_x86_feature_detected!("avx2")
    {
        // SAFETY: T is f32 (checked just above), so the casts only rename the type; the
        // CPU has AVX2 (and AVX-512F where that build runs); the sizes are the ones
        // split_forward_body works with.
        unsafe {
            let (z, tw) = (
                cast_complex_f32(z),
                (crate::simd::cast_f32(tw.0), crate::simd::cast_f32(tw.1)),
            );
            let x = (
                crate::simd::cast_f32_mut(x.0),
                crate::simd::cast_f32_mut(x.1),
            );
            if crate::rfft_avx2::avx512_available() {
                return crate::rfft_avx2::split_forward_avx512(h, z, x, tw);
            }
            return crate::rfft_avx2::split_forward(h, z, x, tw);
        }
    }
    let z = &z[..h];
    crate::simd::dispatch_avx2!(split_forward_body, split_forward_avx2(h, z, x, r, tw))
}

/// `v` as complex f32 values. Safety: T is f32.
#[cfg(target_arch = "x86_64")]
unsafe fn cast_complex_f32<T>(v: &[Complex<T>]) -> &[Complex<f32>] {
    // SAFETY: T is f32 (the caller's contract); Complex is repr(C) {re, im}.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<Complex<f32>>(), v.len()) }
}

/// `v` as mutable complex f32 values. Safety: T is f32.
#[cfg(target_arch = "x86_64")]
unsafe fn cast_complex_f32_mut<T>(v: &mut [Complex<T>]) -> &mut [Complex<f32>] {
    // SAFETY: T is f32 (the caller's contract); Complex is repr(C) {re, im}.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<Complex<f32>>(), v.len()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn split_forward_avx2<T: Float>(
    h: usize,
    z: &[Complex<T>],
    x: PlanesMut<'_, T>,
    r: PlanesMut<'_, T>,
    tw: Planes<'_, T>,
) {
    split_forward_body(h, z, x, r, tw)
}

#[inline(always)]
fn split_forward_body<T: Float>(
    h: usize,
    z: &[Complex<T>],
    (x_re, x_im): PlanesMut<'_, T>,
    (r_re, r_im): PlanesMut<'_, T>,
    (tw_re, tw_im): Planes<'_, T>,
) {
    let f_pad = x_re.len();
    let half = T::from(0.5).unwrap_or_else(T::zero);
    // x ← Z (periodic: Z[h] = Z[0]), r[k] ← Z[h − k]; zero past h.
    for (k, c) in z.iter().enumerate() {
        x_re[k] = c.re;
        x_im[k] = c.im;
    }
    x_re[h] = z[0].re;
    x_im[h] = z[0].im;
    x_re[h + 1..].fill(T::zero());
    x_im[h + 1..].fill(T::zero());
    reverse_into(&mut r_re[..=h], &x_re[..=h]);
    reverse_into(&mut r_im[..=h], &x_im[..=h]);
    r_re[h + 1..].fill(T::zero());
    r_im[h + 1..].fill(T::zero());
    let (x_re, x_im) = (&mut x_re[..f_pad], &mut x_im[..f_pad]);
    let (r_re, r_im, tw_re, tw_im) = (
        &r_re[..f_pad],
        &r_im[..f_pad],
        &tw_re[..f_pad],
        &tw_im[..f_pad],
    );
    for k in 0..f_pad {
        let (zr, zi, rr, ri) = (x_re[k], x_im[k], r_re[k], r_im[k]);
        // E = Z[k] + conj Z[h−k], D = Z[k] − conj Z[h−k]
        let (er, ei) = (zr + rr, zi - ri);
        let (dr, di) = (zr - rr, zi + ri);
        // X = ½E − ½i·W^k·D = ½E + (½W^k)(D_im − i·D_re)
        x_re[k] = half * er + (tw_re[k] * di + tw_im[k] * dr);
        x_im[k] = half * ei + (tw_im[k] * di - tw_re[k] * dr);
    }
}

/// `dst[k] = src[len − 1 − k]` (vectorises, unlike the indexed loop).
#[inline(always)]
fn reverse_into<T: Copy>(dst: &mut [T], src: &[T]) {
    for (d, s) in dst.iter_mut().zip(src.iter().rev()) {
        *d = *s;
    }
}

/// Split step of the inverse: spectrum in `x` (f_pad values; the imaginary parts of bins
/// 0 and h are ignored) → `z` (h values), using `r` as room for the reversed conjugate.
fn split_inverse<T: Float>(
    h: usize,
    x: PlanesMut<'_, T>,
    r: PlanesMut<'_, T>,
    tw: Planes<'_, T>,
    z: &mut [Complex<T>],
) {
    #[cfg(target_arch = "x86_64")]
    if h >= ONE_PASS_MIN_H
        && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && std::arch::is_x86_feature_detected!("avx2")
    {
        // SAFETY: T is f32 (checked just above); the CPU has AVX2 (and AVX-512F where
        // that build runs); the sizes are the ones split_inverse_body works with.
        unsafe {
            let x = (
                crate::simd::cast_f32_mut(x.0),
                crate::simd::cast_f32_mut(x.1),
            );
            let tw = (crate::simd::cast_f32(tw.0), crate::simd::cast_f32(tw.1));
            let z = cast_complex_f32_mut(z);
            if crate::rfft_avx2::avx512_available() {
                return crate::rfft_avx2::split_inverse_avx512(h, x, tw, z);
            }
            return crate::rfft_avx2::split_inverse(h, x, tw, z);
        }
    }
    crate::simd::dispatch_avx2!(split_inverse_body, split_inverse_avx2(h, x, r, tw, z))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn split_inverse_avx2<T: Float>(
    h: usize,
    x: PlanesMut<'_, T>,
    r: PlanesMut<'_, T>,
    tw: Planes<'_, T>,
    z: &mut [Complex<T>],
) {
    split_inverse_body(h, x, r, tw, z)
}

#[inline(always)]
fn split_inverse_body<T: Float>(
    h: usize,
    (x_re, x_im): PlanesMut<'_, T>,
    (r_re, r_im): PlanesMut<'_, T>,
    (tw_re, tw_im): Planes<'_, T>,
    z: &mut [Complex<T>],
) {
    x_im[0] = T::zero();
    x_im[h] = T::zero();
    // r[k] = x[h − k] for k < h
    reverse_into(&mut r_re[..h], &x_re[1..=h]);
    reverse_into(&mut r_im[..h], &x_im[1..=h]);
    let (x_re, x_im, r_re, r_im) = (&x_re[..h], &x_im[..h], &r_re[..h], &r_im[..h]);
    let (tw_re, tw_im) = (&tw_re[..h], &tw_im[..h]);
    let z = &mut z[..h];
    for k in 0..h {
        let (xr, xi, rr, ri) = (x_re[k], x_im[k], r_re[k], r_im[k]);
        // A = X[k] + conj X[h−k], B = X[k] − conj X[h−k]
        let (ar, ai) = (xr + rr, xi - ri);
        let (br, bi) = (xr - rr, xi + ri);
        // O = B·conj(W^k) (the twiddles hold ½W^k: doubled back)
        let (wr, wi) = (tw_re[k] + tw_re[k], tw_im[k] + tw_im[k]);
        let (or, oi) = (br * wr + bi * wi, bi * wr - br * wi);
        // Z = A + i·O
        z[k] = Complex::new(ar - oi, ai + or);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testutil::signal;

    /// The DFT by its definition, in f64.
    fn dft(x: &[f64]) -> Vec<(f64, f64)> {
        let p = x.len();
        (0..=p / 2)
            .map(|k| {
                x.iter().enumerate().fold((0.0, 0.0), |(re, im), (n, &v)| {
                    let a = -2.0 * std::f64::consts::PI * ((k * n) % p) as f64 / p as f64;
                    (re + v * a.cos(), im + v * a.sin())
                })
            })
            .collect()
    }

    fn check<T: Float>(p: usize, tol: f64) {
        let fft = RealFft::<T>::new(p);
        let mut ws = fft.scratch().unwrap();
        for (len, seed) in [(p, 1u64), (p.div_ceil(2), 2), (1, 3)] {
            let x64 = signal(len, seed + p as u64);
            let x: Vec<T> = x64.iter().map(|&v| T::from(v).unwrap()).collect();
            let mut full = x64.clone();
            full.resize(p, 0.0);
            let want = dft(&full);
            let f_n = p / 2 + 1;
            let (mut re, mut im) = (vec![T::zero(); fft.f_pad()], vec![T::zero(); fft.f_pad()]);
            let finite = fft
                .forward(&x, &mut ws, |t, r, i| {
                    re[t * LANES..(t + 1) * LANES].copy_from_slice(r);
                    im[t * LANES..(t + 1) * LANES].copy_from_slice(i);
                })
                .unwrap();
            assert!(finite);
            let scale = (p as f64).sqrt();
            for k in 0..f_n {
                let (gr, gi) = (re[k].to_f64().unwrap(), im[k].to_f64().unwrap());
                let err = ((gr - want[k].0).powi(2) + (gi - want[k].1).powi(2)).sqrt();
                assert!(err <= tol * scale, "p={p} len={len} k={k}: {err:e}");
            }
            for k in f_n..fft.f_pad() {
                assert_eq!(re[k], T::zero(), "padding lane {k}");
                assert_eq!(im[k], T::zero(), "padding lane {k}");
            }
            // inverse: p·x back; junk in the ignored imaginary DC/Nyquist bins
            im[0] = T::from(3.0).unwrap();
            if p.is_multiple_of(2) {
                im[p / 2] = T::from(-2.0).unwrap();
            }
            let mut back = vec![T::zero(); p];
            fft.inverse(
                |t| {
                    (
                        &re[t * LANES..(t + 1) * LANES],
                        &im[t * LANES..(t + 1) * LANES],
                    )
                },
                &mut back,
                &mut ws,
            )
            .unwrap();
            for n in 0..p {
                let got = back[n].to_f64().unwrap() / p as f64;
                assert!(
                    (got - full[n]).abs() <= tol * 4.0,
                    "p={p} n={n}: {got} vs {}",
                    full[n]
                );
            }
            // a short destination gets the first samples
            let mut short = vec![T::zero(); len];
            fft.inverse(
                |t| {
                    (
                        &re[t * LANES..(t + 1) * LANES],
                        &im[t * LANES..(t + 1) * LANES],
                    )
                },
                &mut short,
                &mut ws,
            )
            .unwrap();
            assert_eq!(short[..], back[..len]);
        }
    }

    /// The AVX2 float32 split steps (rfft_avx2.rs) give the generic bodies' bits, for
    /// every h up to 520 (vector tiles, the wrap-around tile, the tail and the padding).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_split_steps_equal_the_generic_ones_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        for h in 1..=520usize {
            let f_pad = padded_freqs(h + 1);
            let v = signal(4 * f_pad + 2 * h, h as u64);
            let f = |i: usize| v[i] as f32;
            let z: Vec<Complex<f32>> = (0..h)
                .map(|k| Complex::new(f(2 * k), f(2 * k + 1)))
                .collect();
            let p = 2 * h;
            let (mut tw_re, mut tw_im) = (vec![0f32; f_pad], vec![0f32; f_pad]);
            for k in 0..=h {
                let angle = -2.0 * std::f64::consts::PI * k as f64 / p as f64;
                tw_re[k] = (0.5 * angle.cos()) as f32;
                tw_im[k] = (0.5 * angle.sin()) as f32;
            }
            let tw = (&tw_re[..], &tw_im[..]);
            let planes = || (vec![7f32; f_pad], vec![7f32; f_pad]);
            let (mut a_re, mut a_im) = planes();
            let (mut b_re, mut b_im) = planes();
            let (mut r_re, mut r_im) = planes();
            split_forward_body(h, &z, (&mut a_re, &mut a_im), (&mut r_re, &mut r_im), tw);
            // SAFETY: AVX2 checked above; sizes as split_forward passes them.
            unsafe { crate::rfft_avx2::split_forward(h, &z, (&mut b_re, &mut b_im), tw) };
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a_re), bits(&b_re), "forward re, h = {h}");
            assert_eq!(bits(&a_im), bits(&b_im), "forward im, h = {h}");
            // with the periodic copy Z[h] = Z[0]: the first tile vectorised, same bits
            let mut zw = z.clone();
            zw.push(z[0]);
            let (mut c_re, mut c_im) = planes();
            // SAFETY: as above, z with h + 1 values.
            unsafe { crate::rfft_avx2::split_forward(h, &zw, (&mut c_re, &mut c_im), tw) };
            assert_eq!(bits(&a_re), bits(&c_re), "forward re, wrapped, h = {h}");
            assert_eq!(bits(&a_im), bits(&c_im), "forward im, wrapped, h = {h}");
            let avx512 = crate::rfft_avx2::avx512_available();
            if avx512 {
                // the AVX-512 build, on both inputs: 16-bin tiles, then 8-bin ones
                for zz in [&z, &zw] {
                    let (mut d_re, mut d_im) = planes();
                    // SAFETY: AVX-512F and AVX2 (checked); sizes as above.
                    unsafe {
                        crate::rfft_avx2::split_forward_avx512(h, zz, (&mut d_re, &mut d_im), tw)
                    };
                    let wrapped = zz.len() > h;
                    assert_eq!(bits(&a_re), bits(&d_re), "avx512 fwd re, h = {h} {wrapped}");
                    assert_eq!(bits(&a_im), bits(&d_im), "avx512 fwd im, h = {h} {wrapped}");
                }
            }
            // inverse of a spectrum with every bin (imaginary DC/Nyquist parts nonzero)
            let (mut x_re, mut x_im): (Vec<f32>, Vec<f32>) = (
                (0..f_pad).map(|k| f(2 * h + k)).collect(),
                (0..f_pad).map(|k| f(2 * h + f_pad + k)).collect(),
            );
            let (mut y_re, mut y_im) = (x_re.clone(), x_im.clone());
            let mut za = vec![Complex::new(9f32, 9f32); h];
            let mut zb = za.clone();
            split_inverse_body(
                h,
                (&mut x_re, &mut x_im),
                (&mut r_re, &mut r_im),
                tw,
                &mut za,
            );
            // SAFETY: as above.
            unsafe { crate::rfft_avx2::split_inverse(h, (&mut y_re, &mut y_im), tw, &mut zb) };
            let cbits = |v: &[Complex<f32>]| {
                v.iter()
                    .map(|c| (c.re.to_bits(), c.im.to_bits()))
                    .collect::<Vec<_>>()
            };
            assert_eq!(cbits(&za), cbits(&zb), "inverse, h = {h}");
            if avx512 {
                let (mut w_re, mut w_im): (Vec<f32>, Vec<f32>) = (
                    (0..f_pad).map(|k| f(2 * h + k)).collect(),
                    (0..f_pad).map(|k| f(2 * h + f_pad + k)).collect(),
                );
                let mut zc = vec![Complex::new(9f32, 9f32); h];
                // SAFETY: AVX-512F and AVX2 (checked); sizes as above.
                unsafe {
                    crate::rfft_avx2::split_inverse_avx512(h, (&mut w_re, &mut w_im), tw, &mut zc)
                };
                assert_eq!(cbits(&za), cbits(&zc), "avx512 inverse, h = {h}");
            }
        }
    }

    /// `convolve_block` (one pass between the complex FFTs) gives the three-pass path's
    /// bits — forward, `simd::single_product`, inverse — for every even p up to 1100.
    #[test]
    fn convolve_block_equals_forward_product_inverse_bit_for_bit() {
        for p in (2..=1100usize).step_by(2) {
            let fft = RealFft::<f32>::new(p);
            if !fft.can_convolve() {
                return; // not an AVX2+FMA CPU
            }
            let mut ws = fft.scratch().unwrap();
            let f_pad = fft.f_pad();
            let v = signal(p + 2 * f_pad, p as u64);
            let x: Vec<f32> = v[..p].iter().map(|&a| a as f32).collect();
            let s_re: Vec<f32> = v[p..p + f_pad].iter().map(|&a| a as f32).collect();
            let s_im: Vec<f32> = v[p + f_pad..].iter().map(|&a| a as f32).collect();
            let (mut x_re, mut x_im) = (vec![0f32; f_pad], vec![0f32; f_pad]);
            assert!(fft
                .forward(&x, &mut ws, |t, r, i| {
                    x_re[t * LANES..(t + 1) * LANES].copy_from_slice(r);
                    x_im[t * LANES..(t + 1) * LANES].copy_from_slice(i);
                })
                .unwrap());
            let (mut y_re, mut y_im) = (vec![0f32; f_pad], vec![0f32; f_pad]);
            crate::simd::single_product((&x_re, &x_im), (&s_re, &s_im), (&mut y_re, &mut y_im));
            let mut want = vec![0f32; p];
            let src = |t: usize| {
                (
                    &y_re[t * LANES..(t + 1) * LANES],
                    &y_im[t * LANES..(t + 1) * LANES],
                )
            };
            fft.inverse(src, &mut want, &mut ws).unwrap();
            let mut got = vec![f32::NAN; p];
            assert!(fft
                .convolve_block(&x, (&s_re, &s_im), &mut got, &mut ws)
                .unwrap());
            let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "p = {p}");
        }
        // NaN/Inf are refused, and a block of the wrong length is an error
        let fft = RealFft::<f32>::new(64);
        if fft.can_convolve() {
            let mut ws = fft.scratch().unwrap();
            let s = vec![1f32; fft.f_pad()];
            let mut x = vec![1f32; 64];
            x[17] = f32::INFINITY;
            let mut out = vec![0f32; 64];
            assert!(!fft.convolve_block(&x, (&s, &s), &mut out, &mut ws).unwrap());
            assert!(fft
                .convolve_block(&x[..63], (&s, &s), &mut out[..63], &mut ws)
                .is_err());
        }
    }

    #[test]
    fn refuses_non_finite_blocks() {
        for p in [6, 7, 64] {
            let fft = RealFft::<f32>::new(p);
            let mut ws = fft.scratch().unwrap();
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let mut x = vec![1.0f32; p];
                x[p - 1] = bad;
                let mut called = false;
                let ok = fft.forward(&x, &mut ws, |_, _, _| called = true).unwrap();
                assert!(!ok && !called, "p={p} {bad}");
            }
            let ok = fft
                .forward(&vec![f32::MAX; p], &mut ws, |_, _, _| ())
                .unwrap();
            assert!(ok);
        }
    }

    #[test]
    fn matches_the_dft_for_even_and_odd_lengths() {
        for p in [
            1, 2, 3, 4, 6, 7, 8, 10, 16, 30, 64, 96, 100, 127, 128, 256, 768, 1024,
        ] {
            check::<f64>(p, 1e-12);
            check::<f32>(p, 1e-5);
        }
    }
}

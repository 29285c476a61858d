//! The split steps of rfft.rs for float32 with AVX2 intrinsics, in one pass each.
//!
//! The generic split steps make three passes (de-interleave Z into planes, reverse a
//! copy, combine); written with intrinsics, each tile of 8 frequencies loads Z[k..k+8]
//! and the mirrored Z[h−k−7..=h−k], de-interleaves and reverses them in registers and
//! writes the result once. The arithmetic is the generic body's, operation for operation
//! (multiplies and adds, no fused multiply-add, no sums across lanes), so the results are
//! the same bit for bit; tiles that touch the wrap-around (k = 0) or the end of the
//! spectrum take the scalar formula, which is the same arithmetic again.

use std::arch::x86_64::*;

use rustfft::num_complex::Complex;

/// Lanes of a 256-bit float32 register.
const W: usize = 8;

/// De-interleave 8 complex values at `p` into (re, im) registers, in order.
#[inline(always)]
unsafe fn load_split(p: *const f32) -> (__m256, __m256) {
    // SAFETY (caller): 16 readable floats at p.
    unsafe {
        let a = _mm256_loadu_ps(p);
        let b = _mm256_loadu_ps(p.add(W));
        // per 128-bit lane [a0 a2 b0 b2]: re of 0,1,4,5 | 2,3,6,7; fixed by a 64-bit permute
        let re = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
        let im = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
        (
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(re))),
            _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(im))),
        )
    }
}

/// Interleave (re, im) registers into 8 complex values at `p`.
#[inline(always)]
unsafe fn store_joined(p: *mut f32, re: __m256, im: __m256) {
    // SAFETY (caller): 16 writable floats at p.
    unsafe {
        let lo = _mm256_unpacklo_ps(re, im); // r0 i0 r1 i1 | r4 i4 r5 i5
        let hi = _mm256_unpackhi_ps(re, im); // r2 i2 r3 i3 | r6 i6 r7 i7
        _mm256_storeu_ps(p, _mm256_permute2f128_ps::<0x20>(lo, hi));
        _mm256_storeu_ps(p.add(W), _mm256_permute2f128_ps::<0x31>(lo, hi));
    }
}

#[inline(always)]
unsafe fn reverse(v: __m256) -> __m256 {
    unsafe { _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)) }
}

/// Forward split step (see rfft.rs `split_forward_body`): `z` (h values) → `x` (f_pad
/// values, zero past h). When `z` holds h + 1 values, the last a copy of the first (Z is
/// periodic), the first tile runs vectorised too: its mirror Z[h − 7..=h] is in `z`.
/// Safety: AVX2 available; `z.len() ≥ h`, `x` and `tw` planes `≥ f_pad = x_re.len()`
/// with f_pad ≥ h + 1 and a multiple of 8.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn split_forward(
    h: usize,
    z: &[Complex<f32>],
    x: (&mut [f32], &mut [f32]),
    tw: (&[f32], &[f32]),
) {
    check_forward(h, z, (&*x.0, &*x.1), tw);
    let f_pad = x.0.len();
    // SAFETY: AVX2 (this function's contract); sizes checked just above.
    unsafe { split_forward_tiles(h, z, x, tw, 0, f_pad) }
}

/// The size checks of the forward split steps (panics on a violation).
fn check_forward(h: usize, z: &[Complex<f32>], x: (&[f32], &[f32]), tw: (&[f32], &[f32])) {
    let f_pad = x.0.len();
    assert!(z.len() >= h && h >= 1 && f_pad > h && f_pad.is_multiple_of(W));
    assert!(x.1.len() >= f_pad && tw.0.len() >= f_pad && tw.1.len() >= f_pad);
    debug_assert!(
        z.len() == h
            || (z[h].re.to_bits(), z[h].im.to_bits()) == (z[0].re.to_bits(), z[0].im.to_bits())
    );
}

/// The forward split's 8-frequency tiles in `[k_start, k_end)` (multiples of 8, k_end ≤
/// f_pad). Safety: AVX2 available; the sizes of [`check_forward`].
#[target_feature(enable = "avx2")]
unsafe fn split_forward_tiles(
    h: usize,
    z: &[Complex<f32>],
    (x_re, x_im): (&mut [f32], &mut [f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
    k_start: usize,
    k_end: usize,
) {
    let f_pad = x_re.len();
    assert!(k_start.is_multiple_of(W) && k_end <= f_pad);
    let wrap = z.len() > h;
    let scalar = |k: usize, x_re: &mut [f32], x_im: &mut [f32]| {
        if k > h {
            // zero past h: what the formula gives for zero inputs (+0.0, whatever the
            // twiddles' signs: 0.5·0 + (±0 + ±0) is +0)
            x_re[k] = 0.0;
            x_im[k] = 0.0;
            return;
        }
        // x[k] = Z[k mod h] and r[k] = Z[(h − k) mod h]
        let (a, b) = (z[k % h], z[(h - k) % h]);
        let (zr, zi, rr, ri) = (a.re, a.im, b.re, b.im);
        let (er, ei) = (zr + rr, zi - ri);
        let (dr, di) = (zr - rr, zi + ri);
        x_re[k] = 0.5 * er + (tw_re[k] * di + tw_im[k] * dr);
        x_im[k] = 0.5 * ei + (tw_im[k] * di - tw_re[k] * dr);
    };
    let zp = z.as_ptr().cast::<f32>();
    let mut k0 = k_start;
    while k0 < k_end {
        if (k0 >= 1 || wrap) && k0 + W <= h {
            // SAFETY: k0 + 8 ≤ h ≤ z.len(), so Z[k0..k0+8] is in bounds; the mirror
            // Z[h−k0−7..=h−k0] too (k0 + 7 ≤ h, and h − k0 < z.len(): k0 ≥ 1, or
            // z.len() > h); planes and twiddles hold f_pad ≥ k0 + 8 values (asserted
            // above).
            unsafe {
                let (zr, zi) = load_split(zp.add(2 * k0));
                let (rr, ri) = load_split(zp.add(2 * (h - k0 - (W - 1))));
                let (rr, ri) = (reverse(rr), reverse(ri));
                let twr = _mm256_loadu_ps(tw_re.as_ptr().add(k0));
                let twi = _mm256_loadu_ps(tw_im.as_ptr().add(k0));
                let (xr, xi) = split_fwd_tile((zr, zi), (rr, ri), (twr, twi));
                _mm256_storeu_ps(x_re.as_mut_ptr().add(k0), xr);
                _mm256_storeu_ps(x_im.as_mut_ptr().add(k0), xi);
            }
        } else {
            for k in k0..k0 + W {
                scalar(k, x_re, x_im);
            }
        }
        k0 += W;
    }
}

/// Inverse split step (see rfft.rs `split_inverse_body`): `x` (f_pad values; the
/// imaginary parts of bins 0 and h are set to zero, i.e. ignored) → `z` (h values).
/// Safety: AVX2 available; `z.len() ≥ h`, planes and twiddles hold ≥ h + 1 values.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn split_inverse(
    h: usize,
    (x_re, x_im): (&mut [f32], &mut [f32]),
    tw: (&[f32], &[f32]),
    z: &mut [Complex<f32>],
) {
    check_inverse(h, (&*x_re, &*x_im), tw, z);
    x_im[0] = 0.0;
    x_im[h] = 0.0;
    // SAFETY: AVX2 (this function's contract); sizes checked just above.
    unsafe { split_inverse_tiles(h, (&*x_re, &*x_im), tw, z, 0) }
}

/// The size checks of the inverse split steps (panics on a violation).
fn check_inverse(h: usize, x: (&[f32], &[f32]), tw: (&[f32], &[f32]), z: &[Complex<f32>]) {
    assert!(h >= 1 && z.len() >= h && x.0.len() > h && x.1.len() > h);
    assert!(tw.0.len() > h && tw.1.len() > h);
}

/// The inverse split from bin `k_start` (a multiple of 8) on: 8-bin tiles, then the
/// tail one bin at a time. Safety: AVX2 available; the sizes of [`check_inverse`]; the
/// imaginary parts of bins 0 and h already zero.
#[target_feature(enable = "avx2")]
unsafe fn split_inverse_tiles(
    h: usize,
    (x_re, x_im): (&[f32], &[f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
    z: &mut [Complex<f32>],
    k_start: usize,
) {
    assert!(k_start.is_multiple_of(W));
    let zp = z.as_mut_ptr().cast::<f32>();
    let mut k0 = k_start;
    while k0 + W <= h {
        // SAFETY: k0 + 8 ≤ h: x[k0..k0+8] and the mirror x[h−k0−7..=h−k0] (indices
        // 1..=h) are in bounds, as are twiddles k0..k0+8 and z[k0..k0+8].
        unsafe {
            let xr = _mm256_loadu_ps(x_re.as_ptr().add(k0));
            let xi = _mm256_loadu_ps(x_im.as_ptr().add(k0));
            let m = h - k0 - (W - 1);
            let rr = reverse(_mm256_loadu_ps(x_re.as_ptr().add(m)));
            let ri = reverse(_mm256_loadu_ps(x_im.as_ptr().add(m)));
            let twr = _mm256_loadu_ps(tw_re.as_ptr().add(k0));
            let twi = _mm256_loadu_ps(tw_im.as_ptr().add(k0));
            let (zr, zi) = split_inv_tile((xr, xi), (rr, ri), (twr, twi));
            store_joined(zp.add(2 * k0), zr, zi);
        }
        k0 += W;
    }
    for k in k0..h {
        let (xr, xi, rr, ri) = (x_re[k], x_im[k], x_re[h - k], x_im[h - k]);
        let (ar, ai) = (xr + rr, xi - ri);
        let (br, bi) = (xr - rr, xi + ri);
        let (wr, wi) = (tw_re[k] + tw_re[k], tw_im[k] + tw_im[k]);
        let (or, oi) = (br * wr + bi * wi, bi * wr - br * wi);
        z[k] = Complex::new(ar - oi, ai + or);
    }
}

/// Lanes of a 512-bit float32 register.
const W16: usize = 16;

/// De-interleave 16 complex values at `p` into (re, im) registers, in order.
#[inline(always)]
unsafe fn load_split16(p: *const f32) -> (__m512, __m512) {
    // SAFETY (caller): 32 readable floats at p; AVX-512F.
    unsafe {
        let a = _mm512_loadu_ps(p);
        let b = _mm512_loadu_ps(p.add(W16));
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        (
            _mm512_permutex2var_ps(a, even, b),
            _mm512_permutex2var_ps(a, odd, b),
        )
    }
}

/// Interleave (re, im) registers into 16 complex values at `p`.
#[inline(always)]
unsafe fn store_joined16(p: *mut f32, re: __m512, im: __m512) {
    // SAFETY (caller): 32 writable floats at p; AVX-512F.
    unsafe {
        let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        _mm512_storeu_ps(p, _mm512_permutex2var_ps(re, lo, im));
        _mm512_storeu_ps(p.add(W16), _mm512_permutex2var_ps(re, hi, im));
    }
}

#[inline(always)]
unsafe fn reverse16(v: __m512) -> __m512 {
    unsafe {
        let idx = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        _mm512_permutexvar_ps(idx, v)
    }
}

/// Whether the AVX-512 split steps run on this CPU (AVX-512F).
pub(crate) fn avx512_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx2")
}

/// [`split_forward`] with 16-frequency tiles on 512-bit registers where they fit, then
/// the 8-frequency tiles for the rest: the same operations per lane (multiplies and adds,
/// no fusion), so the same bits. Safety: AVX-512F and AVX2 available; the sizes of
/// [`split_forward`].
#[target_feature(enable = "avx512f,avx2")]
pub(crate) unsafe fn split_forward_avx512(
    h: usize,
    z: &[Complex<f32>],
    (x_re, x_im): (&mut [f32], &mut [f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
) {
    check_forward(h, z, (&*x_re, &*x_im), (tw_re, tw_im));
    let f_pad = x_re.len();
    let wrap = z.len() > h;
    let zp = z.as_ptr().cast::<f32>();
    // Without the periodic copy the first tile needs the scalar wrap-around: 8 bins.
    let mut k0 = 0;
    if !wrap {
        // SAFETY: AVX2; sizes checked above.
        unsafe { split_forward_tiles(h, z, (&mut *x_re, &mut *x_im), (tw_re, tw_im), 0, W) };
        k0 = W;
    }
    while k0 + W16 <= h {
        // SAFETY: k0 + 16 ≤ h ≤ z.len(): Z[k0..k0+16] is in bounds; its mirror
        // Z[h−k0−15..=h−k0] too (h − k0 < z.len(): k0 ≥ 8, or z.len() > h); planes and
        // twiddles hold f_pad > h ≥ k0 + 16 values.
        unsafe {
            let (zr, zi) = load_split16(zp.add(2 * k0));
            let (rr, ri) = load_split16(zp.add(2 * (h - k0 - (W16 - 1))));
            let (rr, ri) = (reverse16(rr), reverse16(ri));
            let twr = _mm512_loadu_ps(tw_re.as_ptr().add(k0));
            let twi = _mm512_loadu_ps(tw_im.as_ptr().add(k0));
            let (xr, xi) = split_fwd_tile((zr, zi), (rr, ri), (twr, twi));
            _mm512_storeu_ps(x_re.as_mut_ptr().add(k0), xr);
            _mm512_storeu_ps(x_im.as_mut_ptr().add(k0), xi);
        }
        k0 += W16;
    }
    // SAFETY: AVX2; sizes checked above; k0 is a multiple of 8.
    unsafe { split_forward_tiles(h, z, (x_re, x_im), (tw_re, tw_im), k0, f_pad) }
}

/// [`split_inverse`] with 16-bin tiles on 512-bit registers where they fit, then the
/// 8-bin tiles and the tail: the same operations per lane, so the same bits. Safety:
/// AVX-512F and AVX2 available; the sizes of [`split_inverse`].
#[target_feature(enable = "avx512f,avx2")]
pub(crate) unsafe fn split_inverse_avx512(
    h: usize,
    (x_re, x_im): (&mut [f32], &mut [f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
    z: &mut [Complex<f32>],
) {
    check_inverse(h, (&*x_re, &*x_im), (tw_re, tw_im), z);
    x_im[0] = 0.0;
    x_im[h] = 0.0;
    let (x_re, x_im) = (&*x_re, &*x_im);
    let zp = z.as_mut_ptr().cast::<f32>();
    let mut k0 = 0;
    while k0 + W16 <= h {
        // SAFETY: k0 + 16 ≤ h: x[k0..k0+16] and the mirror x[h−k0−15..=h−k0] (indices
        // 1..=h) are in bounds, as are twiddles k0..k0+16 and z[k0..k0+16].
        unsafe {
            let xr = _mm512_loadu_ps(x_re.as_ptr().add(k0));
            let xi = _mm512_loadu_ps(x_im.as_ptr().add(k0));
            let m = h - k0 - (W16 - 1);
            let rr = reverse16(_mm512_loadu_ps(x_re.as_ptr().add(m)));
            let ri = reverse16(_mm512_loadu_ps(x_im.as_ptr().add(m)));
            let twr = _mm512_loadu_ps(tw_re.as_ptr().add(k0));
            let twi = _mm512_loadu_ps(tw_im.as_ptr().add(k0));
            let (zr, zi) = split_inv_tile((xr, xi), (rr, ri), (twr, twi));
            store_joined16(zp.add(2 * k0), zr, zi);
        }
        k0 += W16;
    }
    // SAFETY: AVX2; sizes checked above; k0 is a multiple of 8; bins 0 and h zeroed.
    unsafe { split_inverse_tiles(h, (x_re, x_im), (tw_re, tw_im), z, k0) }
}

/// `v` with its sign flipped (exact).
#[inline(always)]
unsafe fn neg(v: __m256) -> __m256 {
    unsafe { _mm256_xor_ps(v, _mm256_set1_ps(-0.0)) }
}

/// The float32 operations of the split tiles, on 8 lanes (AVX2) or 16 (AVX-512): the
/// tiles below are written once for both widths, so the two builds run the same
/// operations per lane by construction.
trait Lanes: Copy {
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn splat(v: f32) -> Self;
}

impl Lanes for __m256 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { _mm256_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { _mm256_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { _mm256_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { _mm256_set1_ps(v) }
    }
}

impl Lanes for __m512 {
    #[inline(always)]
    unsafe fn add(self, b: Self) -> Self {
        unsafe { _mm512_add_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn sub(self, b: Self) -> Self {
        unsafe { _mm512_sub_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn mul(self, b: Self) -> Self {
        unsafe { _mm512_mul_ps(self, b) }
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        unsafe { _mm512_set1_ps(v) }
    }
}

/// The forward split at a tile of frequencies from Z there (`a`) and Z at the mirrored
/// ones (`b`, lanes in matching order), with the twiddles there: the generic body's
/// operations.
#[inline(always)]
unsafe fn split_fwd_tile<V: Lanes>(
    (ar, ai): (V, V),
    (br, bi): (V, V),
    (twr, twi): (V, V),
) -> (V, V) {
    unsafe {
        let half = V::splat(0.5);
        let (er, ei) = (ar.add(br), ai.sub(bi));
        let (dr, di) = (ar.sub(br), ai.add(bi));
        (
            half.mul(er).add(twr.mul(di).add(twi.mul(dr))),
            half.mul(ei).add(twi.mul(di).sub(twr.mul(dr))),
        )
    }
}

/// x · s with the fused operations of simd.rs `single_product_body::<_, true>`.
#[inline(always)]
unsafe fn product_tile((xr, xi): (__m256, __m256), (sr, si): (__m256, __m256)) -> (__m256, __m256) {
    unsafe {
        let zero = _mm256_setzero_ps();
        let re = _mm256_fmadd_ps(neg(xi), si, _mm256_fmadd_ps(xr, sr, zero));
        let im = _mm256_fmadd_ps(xi, sr, _mm256_fmadd_ps(xr, si, zero));
        (re, im)
    }
}

/// The inverse split at a tile of bins from Y there (`a`) and Y at the mirrored ones
/// (`b`): the generic body's operations; returns (re, im) of Z there.
#[inline(always)]
unsafe fn split_inv_tile<V: Lanes>(
    (xr, xi): (V, V),
    (rr, ri): (V, V),
    (twr, twi): (V, V),
) -> (V, V) {
    unsafe {
        let (ar, ai) = (xr.add(rr), xi.sub(ri));
        let (br, bi) = (xr.sub(rr), xi.add(ri));
        let (wr, wi) = (twr.add(twr), twi.add(twi));
        let or = br.mul(wr).add(bi.mul(wi));
        let oi = bi.mul(wr).sub(br.mul(wi));
        (ar.sub(oi), ai.add(or))
    }
}

/// Z_out[k] for up to 8 bins `ks` (each < h) at once: their inputs gathered into lanes,
/// then the vector tiles' operations (so the same bits as a vector pair would give).
#[target_feature(enable = "avx2,fma")]
fn spsplit_gathered(
    h: usize,
    ks: &[usize],
    z: &[Complex<f32>],
    (s_re, s_im): (&[f32], &[f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
    out: &mut [Complex<f32>],
) {
    let mut lanes = [[0f32; W]; 12];
    let mut zero_im = [0f32; W]; // -0.0 bits as a mask where the bin's Y has no imaginary part
    for (l, &k) in ks.iter().take(W).enumerate() {
        let m = h - k; // the mirror, ≤ h; Z is periodic (Z[h] = Z[0])
        let (zk, zm) = (z[k], z[m % h]);
        let v = [
            zk.re, zk.im, zm.re, zm.im, tw_re[k], tw_im[k], tw_re[m], tw_im[m], s_re[k], s_im[k],
            s_re[m], s_im[m],
        ];
        for (lane, x) in lanes.iter_mut().zip(v) {
            lane[l] = x;
        }
        zero_im[l] = if k == 0 {
            f32::from_bits(u32::MAX)
        } else {
            0.0
        };
    }
    // SAFETY: every load and store is of a local 8-float array.
    unsafe {
        let v = |i: usize| _mm256_loadu_ps(lanes[i].as_ptr());
        let (zk, zm) = ((v(0), v(1)), (v(2), v(3)));
        let (twk, twm) = ((v(4), v(5)), (v(6), v(7)));
        let (sk, sm) = ((v(8), v(9)), (v(10), v(11)));
        let mask = _mm256_loadu_ps(zero_im.as_ptr());
        // bin 0 pairs with bin h: the inverse split ignores both imaginary parts
        let (ykr, yki) = product_tile(split_fwd_tile(zk, zm, twk), sk);
        let (ymr, ymi) = product_tile(split_fwd_tile(zm, zk, twm), sm);
        let (yki, ymi) = (_mm256_andnot_ps(mask, yki), _mm256_andnot_ps(mask, ymi));
        let (re, im) = split_inv_tile((ykr, yki), (ymr, ymi), twk);
        let (mut o_re, mut o_im) = ([0f32; W], [0f32; W]);
        _mm256_storeu_ps(o_re.as_mut_ptr(), re);
        _mm256_storeu_ps(o_im.as_mut_ptr(), im);
        for (l, &k) in ks.iter().take(W).enumerate() {
            out[k] = Complex::new(o_re[l], o_im[l]);
        }
    }
}

/// Forward split, product with one spectrum and inverse split in one pass, for a single
/// block (q = 1): `z` (h values, the forward complex FFT of the packed signal) → `out`
/// (h values, ready for the inverse complex FFT). Frequencies k and h − k are handled
/// together, so every value stays in registers; the operations are those of
/// `split_forward_body`, `single_product_body::<_, true>` and `split_inverse_body`, so
/// the result equals that three-pass path on an AVX2+FMA CPU bit for bit.
/// Safety: AVX2 and FMA available; `z`, `out` ≥ h values; `s` and `tw` planes ≥ h + 1.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn split_product_split(
    h: usize,
    z: &[Complex<f32>],
    s: (&[f32], &[f32]),
    tw: (&[f32], &[f32]),
    out: &mut [Complex<f32>],
) {
    assert!(h >= 1 && z.len() >= h && out.len() >= h);
    assert!(s.0.len() > h && s.1.len() > h && tw.0.len() > h && tw.1.len() > h);
    let zp = z.as_ptr().cast::<f32>();
    let op = out.as_mut_ptr().cast::<f32>();
    let load = |v: &[f32], at: usize| unsafe { _mm256_loadu_ps(v.as_ptr().add(at)) };
    // Vector pairs: k in [k0, k0 + 8) with 8 ≤ k0, and its mirror h − k in
    // [h − k0 − 7, h − k0], disjoint from it (2·k0 + 15 ≤ h).
    let mut k0 = W;
    while 2 * k0 + 2 * W - 1 <= h {
        let m0 = h - k0 - (W - 1);
        // SAFETY: k0 + 8 ≤ h − k0 − 7 < h and m0 ≥ k0 + 8 ≥ 1, so the 8 values at k0 and
        // at m0 of z, out (h values) and of s, tw (> h values) are in bounds.
        unsafe {
            let zk = load_split(zp.add(2 * k0));
            let zm = load_split(zp.add(2 * m0));
            let zm = (reverse(zm.0), reverse(zm.1));
            let twk = (load(tw.0, k0), load(tw.1, k0));
            let twm = (reverse(load(tw.0, m0)), reverse(load(tw.1, m0)));
            let sk = (load(s.0, k0), load(s.1, k0));
            let sm = (reverse(load(s.0, m0)), reverse(load(s.1, m0)));
            let yk = product_tile(split_fwd_tile(zk, zm, twk), sk);
            let ym = product_tile(split_fwd_tile(zm, zk, twm), sm);
            let (ok_re, ok_im) = split_inv_tile(yk, ym, twk);
            let (om_re, om_im) = split_inv_tile(ym, yk, twm);
            store_joined(op.add(2 * k0), ok_re, ok_im);
            store_joined(op.add(2 * m0), reverse(om_re), reverse(om_im));
        }
        k0 += W;
    }
    // The rest, one bin at a time: k < 8, the middle band [k0, h − k0] and k > h − 8.
    // The rest, gathered 8 bins at a time: k < 8, the middle band [k0, h − k0] and
    // k > h − 8 (all of 0..h when no vector pair fits).
    let mut rest = [0usize; 4 * W];
    let n_rest = if 2 * W - 1 > h {
        (0..h).for_each(|k| rest[k] = k);
        h
    } else {
        let mut n = 0;
        for k in (0..W).chain(k0..=h - k0).chain(h - W + 1..h) {
            rest[n] = k;
            n += 1;
        }
        n
    };
    for ks in rest[..n_rest].chunks(W) {
        spsplit_gathered(h, ks, z, s, tw, out);
    }
}

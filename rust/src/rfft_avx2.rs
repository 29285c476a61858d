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
/// values, zero past h). Safety: AVX2 available; `z.len() ≥ h`, `x` and `tw` planes
/// `≥ f_pad = x_re.len()` with f_pad ≥ h + 1 and a multiple of 8.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn split_forward(
    h: usize,
    z: &[Complex<f32>],
    (x_re, x_im): (&mut [f32], &mut [f32]),
    (tw_re, tw_im): (&[f32], &[f32]),
) {
    let f_pad = x_re.len();
    assert!(z.len() >= h && h >= 1 && f_pad > h && f_pad.is_multiple_of(W));
    assert!(x_im.len() >= f_pad && tw_re.len() >= f_pad && tw_im.len() >= f_pad);
    let scalar = |k: usize, x_re: &mut [f32], x_im: &mut [f32]| {
        // x[k] = Z[k mod h] and r[k] = Z[(h − k) mod h] for k ≤ h, zero past h
        let (zr, zi, rr, ri) = if k <= h {
            let (a, b) = (z[k % h], z[(h - k) % h]);
            (a.re, a.im, b.re, b.im)
        } else {
            (0.0, 0.0, 0.0, 0.0)
        };
        let (er, ei) = (zr + rr, zi - ri);
        let (dr, di) = (zr - rr, zi + ri);
        x_re[k] = 0.5 * er + (tw_re[k] * di + tw_im[k] * dr);
        x_im[k] = 0.5 * ei + (tw_im[k] * di - tw_re[k] * dr);
    };
    let zp = z.as_ptr().cast::<f32>();
    let mut k0 = 0;
    while k0 < f_pad {
        if k0 >= 1 && k0 + W <= h {
            // SAFETY: k0 + 8 ≤ h ≤ z.len(), so Z[k0..k0+8] is in bounds; the mirror
            // Z[h−k0−7..=h−k0] too (k0 ≥ 1, k0 + 7 ≤ h); planes and twiddles hold
            // f_pad ≥ k0 + 8 values (asserted above).
            unsafe {
                let (zr, zi) = load_split(zp.add(2 * k0));
                let (rr, ri) = load_split(zp.add(2 * (h - k0 - (W - 1))));
                let (rr, ri) = (reverse(rr), reverse(ri));
                let (er, ei) = (_mm256_add_ps(zr, rr), _mm256_sub_ps(zi, ri));
                let (dr, di) = (_mm256_sub_ps(zr, rr), _mm256_add_ps(zi, ri));
                let twr = _mm256_loadu_ps(tw_re.as_ptr().add(k0));
                let twi = _mm256_loadu_ps(tw_im.as_ptr().add(k0));
                let half = _mm256_set1_ps(0.5);
                let xr = _mm256_add_ps(
                    _mm256_mul_ps(half, er),
                    _mm256_add_ps(_mm256_mul_ps(twr, di), _mm256_mul_ps(twi, dr)),
                );
                let xi = _mm256_add_ps(
                    _mm256_mul_ps(half, ei),
                    _mm256_sub_ps(_mm256_mul_ps(twi, di), _mm256_mul_ps(twr, dr)),
                );
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
    (tw_re, tw_im): (&[f32], &[f32]),
    z: &mut [Complex<f32>],
) {
    assert!(h >= 1 && z.len() >= h && x_re.len() > h && x_im.len() > h);
    assert!(tw_re.len() > h && tw_im.len() > h);
    x_im[0] = 0.0;
    x_im[h] = 0.0;
    let (x_re, x_im) = (&*x_re, &*x_im);
    let zp = z.as_mut_ptr().cast::<f32>();
    let mut k0 = 0;
    while k0 + W <= h {
        // SAFETY: k0 + 8 ≤ h: x[k0..k0+8] and the mirror x[h−k0−7..=h−k0] (indices
        // 1..=h) are in bounds, as are twiddles k0..k0+8 and z[k0..k0+8].
        unsafe {
            let xr = _mm256_loadu_ps(x_re.as_ptr().add(k0));
            let xi = _mm256_loadu_ps(x_im.as_ptr().add(k0));
            let m = h - k0 - (W - 1);
            let rr = reverse(_mm256_loadu_ps(x_re.as_ptr().add(m)));
            let ri = reverse(_mm256_loadu_ps(x_im.as_ptr().add(m)));
            let (ar, ai) = (_mm256_add_ps(xr, rr), _mm256_sub_ps(xi, ri));
            let (br, bi) = (_mm256_sub_ps(xr, rr), _mm256_add_ps(xi, ri));
            let twr = _mm256_loadu_ps(tw_re.as_ptr().add(k0));
            let twi = _mm256_loadu_ps(tw_im.as_ptr().add(k0));
            let (wr, wi) = (_mm256_add_ps(twr, twr), _mm256_add_ps(twi, twi));
            let or = _mm256_add_ps(_mm256_mul_ps(br, wr), _mm256_mul_ps(bi, wi));
            let oi = _mm256_sub_ps(_mm256_mul_ps(bi, wr), _mm256_mul_ps(br, wi));
            store_joined(zp.add(2 * k0), _mm256_sub_ps(ar, oi), _mm256_add_ps(ai, or));
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

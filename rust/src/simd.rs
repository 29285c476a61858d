//! The two inner loops of the core, written so the compiler vectorises them, and compiled
//! a second time for AVX2 with a run-time check (wheels target baseline x86-64).
//!
//! Both are sequences of complex "axpy" updates over contiguous split-plane rows: no
//! horizontal reductions, so the result is the same, bit for bit, on either path.

use crate::Float;

/// Complex planes (real part, imaginary part).
pub(crate) type Planes<'a, T> = (&'a [T], &'a [T]);
/// Mutable complex planes.
pub(crate) type PlanesMut<'a, T> = (&'a mut [T], &'a mut [T]);

/// y[f, r, :] += Σ_j x[f, r, j] · s[f, j, :] for every frequency f and row r.
///
/// Layouts: x (F, rows, q_a), s (F, q_a, q_b), y (F, rows, q_b).
pub(crate) fn spectral_product<T: Float>(
    f_n: usize,
    rows: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { spectral_product_avx2(f_n, rows, q_a, q_b, x, s, y) };
            return;
        }
    }
    spectral_product_body(f_n, rows, q_a, q_b, x, s, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn spectral_product_avx2<T: Float>(
    f_n: usize,
    rows: usize,
    q_a: usize,
    q_b: usize,
    x: Planes<'_, T>,
    s: Planes<'_, T>,
    y: PlanesMut<'_, T>,
) {
    spectral_product_body(f_n, rows, q_a, q_b, x, s, y)
}

#[inline(always)]
fn spectral_product_body<T: Float>(
    f_n: usize,
    rows: usize,
    q_a: usize,
    q_b: usize,
    (x_re, x_im): Planes<'_, T>,
    (s_re, s_im): Planes<'_, T>,
    (y_re, y_im): PlanesMut<'_, T>,
) {
    let plane = q_a * q_b;
    for f in 0..f_n {
        let sr_f = &s_re[f * plane..(f + 1) * plane];
        let si_f = &s_im[f * plane..(f + 1) * plane];
        for r in 0..rows {
            let xa = (f * rows + r) * q_a;
            let yb = (f * rows + r) * q_b;
            let xr_row = &x_re[xa..xa + q_a];
            let xi_row = &x_im[xa..xa + q_a];
            let yr = &mut y_re[yb..yb + q_b];
            let yi = &mut y_im[yb..yb + q_b];
            for ((&xr, &xi), (sr, si)) in xr_row
                .iter()
                .zip(xi_row)
                .zip(sr_f.chunks_exact(q_b).zip(si_f.chunks_exact(q_b)))
            {
                axpy(xr, xi, sr, si, yr, yi);
            }
        }
    }
}

/// (yr + i·yi) += (xr + i·xi) · (sr + i·si), elementwise over the slices.
#[inline(always)]
fn axpy<T: Float>(xr: T, xi: T, sr: &[T], si: &[T], yr: &mut [T], yi: &mut [T]) {
    for (((yr, yi), &sr), &si) in yr.iter_mut().zip(yi.iter_mut()).zip(sr).zip(si) {
        *yr = *yr + (xr * sr - xi * si);
        *yi = *yi + (xr * si + xi * sr);
    }
}

/// k[i, :] += g[r, i] · conj(x[r, :]) for every row r and output block i.
///
/// Layouts: g (rows, q_out), x (rows, q_in), k (q_out, q_in).
pub(crate) fn accumulate_outer_conj<T: Float>(
    rows: usize,
    q_out: usize,
    q_in: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            unsafe { accumulate_outer_conj_avx2(rows, q_out, q_in, g, x, k) };
            return;
        }
    }
    accumulate_outer_conj_body(rows, q_out, q_in, g, x, k)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_outer_conj_avx2<T: Float>(
    rows: usize,
    q_out: usize,
    q_in: usize,
    g: Planes<'_, T>,
    x: Planes<'_, T>,
    k: PlanesMut<'_, T>,
) {
    accumulate_outer_conj_body(rows, q_out, q_in, g, x, k)
}

#[inline(always)]
fn accumulate_outer_conj_body<T: Float>(
    rows: usize,
    q_out: usize,
    q_in: usize,
    (g_re, g_im): Planes<'_, T>,
    (x_re, x_im): Planes<'_, T>,
    (k_re, k_im): PlanesMut<'_, T>,
) {
    for r in 0..rows {
        let xr_row = &x_re[r * q_in..(r + 1) * q_in];
        let xi_row = &x_im[r * q_in..(r + 1) * q_in];
        for i in 0..q_out {
            let (gr, gi) = (g_re[r * q_out + i], g_im[r * q_out + i]);
            let kr = &mut k_re[i * q_in..(i + 1) * q_in];
            let ki = &mut k_im[i * q_in..(i + 1) * q_in];
            for (((kr, ki), &xr), &xi) in kr.iter_mut().zip(ki.iter_mut()).zip(xr_row).zip(xi_row) {
                *kr = *kr + (gr * xr + gi * xi);
                *ki = *ki + (gi * xr - gr * xi);
            }
        }
    }
}

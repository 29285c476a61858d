//! The block circulant operator: cached kernel spectra, FFT plans and workspaces.
//!
//! Data layout. For a chunk of R rows, spectra are stored as split real/imaginary planes
//! in (F, R, q) order, F = p / 2 + 1, so that for each frequency the rows' block spectra
//! are contiguous. Kernel spectra are stored per frequency too: (F, q_in, q_out) for the
//! forward product and (F, q_out, q_in), conjugated, for the gradient with respect to the
//! input. The per-frequency product is then a sequence of complex "axpy" updates over
//! contiguous rows of the kernel spectrum, which the compiler vectorises, and the sum over
//! blocks happens in the frequency domain: one inverse FFT per output block and row.

use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;

use crate::simd;
use crate::threads;
use crate::{BcaError, Float, Shape};

/// Most rows processed together: each kernel spectrum row is reused across them.
const MAX_ROWS_PER_CHUNK: usize = 32;
/// Below this many (rows × kernel elements) a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn fft_err(e: impl std::fmt::Display) -> BcaError {
    BcaError::Fft(e.to_string())
}

/// Returns an error naming `arg` when `data` holds NaN or ±Inf.
pub(crate) fn check_finite<T: Float>(arg: &'static str, data: &[T]) -> Result<(), BcaError> {
    // Summing |v| * 0 stays 0 for finite values and becomes NaN for NaN/Inf; chunked so
    // that the loop vectorises and the check can stop early.
    for chunk in data.chunks(4096) {
        let mut acc = T::zero();
        for &v in chunk {
            acc = acc + v * T::zero();
        }
        if acc != T::zero() || acc.is_nan() {
            return Err(BcaError::NonFinite { arg });
        }
    }
    Ok(())
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Per-thread scratch memory, reused across calls.
struct Workspace<T> {
    time: Vec<T>,
    freq: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
    a_re: Vec<T>,
    a_im: Vec<T>,
    b_re: Vec<T>,
    b_im: Vec<T>,
}

/// Buffers for the kernel gradient, which needs the spectra of every row.
#[derive(Default)]
struct GradBuffers<T> {
    x_re: Vec<T>,
    x_im: Vec<T>,
    g_re: Vec<T>,
    g_im: Vec<T>,
    k_re: Vec<T>,
    k_im: Vec<T>,
}

/// Kernel spectra in one orientation: (F, q_a, q_b), split planes.
struct Spectra<T> {
    re: Vec<T>,
    im: Vec<T>,
    q_a: usize,
    q_b: usize,
}

/// A block circulant operator ΔW with cached kernel spectra and FFT plans.
///
/// `forward` computes ΔW x for a batch of rows, `backward` the gradients with respect to
/// the input and the kernel, `to_dense` materialises ΔW. The operator is `Sync`: several
/// threads may call it at once.
pub struct BlockCirculant<T: Float> {
    shape: Shape,
    kernel: Vec<T>,
    fwd: Spectra<T>,
    bwd: Spectra<T>,
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
    scratch_len: usize,
    num_threads: usize,
    workspaces: Mutex<Vec<Workspace<T>>>,
    grad_buffers: Mutex<GradBuffers<T>>,
}

impl<T: Float> std::fmt::Debug for BlockCirculant<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCirculant")
            .field("dtype", &T::NAME)
            .field("shape", &self.shape)
            .field("num_threads", &self.num_threads)
            .finish()
    }
}

impl<T: Float> BlockCirculant<T> {
    /// Build an operator from a kernel of shape (q_out, q_in, p) stored row-major.
    ///
    /// `in_features` / `out_features` default to q_in · p / q_out · p; smaller values mean
    /// zero padding (see the crate docs).
    pub fn new(
        kernel: &[T],
        q_out: usize,
        q_in: usize,
        p: usize,
        in_features: Option<usize>,
        out_features: Option<usize>,
    ) -> Result<Self, BcaError> {
        let shape = Shape::new(q_out, q_in, p, in_features, out_features)?;
        let mut planner = RealFftPlanner::<T>::new();
        let r2c = planner.plan_fft_forward(p);
        let c2r = planner.plan_fft_inverse(p);
        let scratch_len = r2c.get_scratch_len().max(c2r.get_scratch_len());
        let f_n = shape.n_freq();
        let spectra_len = f_n * q_in * q_out;
        let mut op = BlockCirculant {
            shape,
            kernel: Vec::new(),
            fwd: Spectra {
                re: vec![T::zero(); spectra_len],
                im: vec![T::zero(); spectra_len],
                q_a: q_in,
                q_b: q_out,
            },
            bwd: Spectra {
                re: vec![T::zero(); spectra_len],
                im: vec![T::zero(); spectra_len],
                q_a: q_out,
                q_b: q_in,
            },
            r2c,
            c2r,
            scratch_len,
            num_threads: 0,
            workspaces: Mutex::new(Vec::new()),
            grad_buffers: Mutex::new(GradBuffers::default()),
        };
        op.set_kernel(kernel)?;
        Ok(op)
    }

    /// The layer geometry.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The kernel, shape (q_out, q_in, p), row-major.
    pub fn kernel(&self) -> &[T] {
        &self.kernel
    }

    /// Thread bound for this operator; 0 means the process default.
    pub fn num_threads(&self) -> usize {
        self.num_threads
    }

    /// Set the thread bound for this operator; 0 means the process default.
    pub fn set_num_threads(&mut self, n: usize) {
        self.num_threads = n;
    }

    fn effective_threads(&self) -> usize {
        match self.num_threads {
            0 => threads::default_num_threads(),
            n => n,
        }
        .max(1)
    }

    /// Replace the kernel values (same shape) and recompute the cached spectra.
    pub fn set_kernel(&mut self, kernel: &[T]) -> Result<(), BcaError> {
        let s = self.shape;
        if kernel.len() != s.kernel_len() {
            return Err(BcaError::invalid(
                "kernel",
                format!(
                    "expected {} values for shape ({}, {}, {}), got {}",
                    s.kernel_len(),
                    s.q_out,
                    s.q_in,
                    s.p,
                    kernel.len()
                ),
            ));
        }
        check_finite("kernel", kernel)?;
        let p = s.p;
        let f_n = s.n_freq();
        let mut time = vec![T::zero(); p];
        let mut freq = vec![Complex::<T>::default(); f_n];
        let mut scratch = vec![Complex::<T>::default(); self.scratch_len];
        for i in 0..s.q_out {
            for j in 0..s.q_in {
                let block = &kernel[(i * s.q_in + j) * p..(i * s.q_in + j + 1) * p];
                time.copy_from_slice(block);
                self.r2c
                    .process_with_scratch(&mut time, &mut freq, &mut scratch)
                    .map_err(fft_err)?;
                for (f, c) in freq.iter().enumerate() {
                    let fwd = (f * s.q_in + j) * s.q_out + i;
                    self.fwd.re[fwd] = c.re;
                    self.fwd.im[fwd] = c.im;
                    let bwd = (f * s.q_out + i) * s.q_in + j;
                    self.bwd.re[bwd] = c.re;
                    self.bwd.im[bwd] = -c.im;
                }
            }
        }
        self.kernel.clear();
        self.kernel.extend_from_slice(kernel);
        Ok(())
    }

    /// ΔW as a dense row-major (out_features × in_features) matrix.
    pub fn to_dense(&self) -> Vec<T> {
        let s = self.shape;
        let (d_in, d_out, p) = (s.in_features, s.out_features, s.p);
        let mut dense = vec![T::zero(); d_out * d_in];
        for (r, row) in dense.chunks_exact_mut(d_in.max(1)).enumerate().take(d_out) {
            let (i, a) = (r / p, r % p);
            for (c, v) in row.iter_mut().enumerate() {
                let (j, b) = (c / p, c % p);
                *v = self.kernel[(i * s.q_in + j) * p + (a + p - b) % p];
            }
        }
        dense
    }

    fn take_workspace(&self, rows: usize) -> Workspace<T> {
        let s = self.shape;
        let mut ws = lock(&self.workspaces).pop().unwrap_or_else(|| Workspace {
            time: vec![T::zero(); s.p],
            freq: vec![Complex::default(); s.n_freq()],
            scratch: vec![Complex::default(); self.scratch_len],
            a_re: Vec::new(),
            a_im: Vec::new(),
            b_re: Vec::new(),
            b_im: Vec::new(),
        });
        let len = s.n_freq() * rows * s.q_in.max(s.q_out);
        for v in [&mut ws.a_re, &mut ws.a_im, &mut ws.b_re, &mut ws.b_im] {
            grow(v, len);
        }
        ws
    }

    fn give_back_workspace(&self, ws: Workspace<T>) {
        lock(&self.workspaces).push(ws);
    }

    fn rows_per_chunk(&self, n_rows: usize, threads: usize) -> usize {
        n_rows.div_ceil(threads).clamp(1, MAX_ROWS_PER_CHUNK)
    }

    fn parallel_pool(&self, n_rows: usize) -> Option<Arc<rayon::ThreadPool>> {
        let threads = self.effective_threads();
        let work = n_rows.saturating_mul(self.kernel.len());
        if threads <= 1 || n_rows <= 1 || work < PARALLEL_MIN_WORK {
            return None;
        }
        threads::pool(threads)
    }

    /// Spectra of `rows` rows of `src` (row width `d`, `q` blocks) into (F, rows, q) planes.
    fn rows_to_spectra(
        &self,
        src: &[T],
        d: usize,
        q: usize,
        (re, im): (&mut [T], &mut [T]),
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let p = self.shape.p;
        let rows = src.len() / d;
        for (r, row) in src.chunks_exact(d).enumerate() {
            for j in 0..q {
                let lo = j * p;
                let hi = (lo + p).min(d);
                ws.time[..hi - lo].copy_from_slice(&row[lo..hi]);
                ws.time[hi - lo..].fill(T::zero());
                self.r2c
                    .process_with_scratch(&mut ws.time, &mut ws.freq, &mut ws.scratch)
                    .map_err(fft_err)?;
                for (f, c) in ws.freq.iter().enumerate() {
                    let idx = (f * rows + r) * q + j;
                    re[idx] = c.re;
                    im[idx] = c.im;
                }
            }
        }
        Ok(())
    }

    /// Inverse transform of (F, rows, q) planes into `rows` rows of `dst` (width `d`),
    /// scaled by `scale`.
    #[allow(clippy::too_many_arguments)]
    fn spectra_to_rows(
        &self,
        re: &[T],
        im: &[T],
        rows: usize,
        q: usize,
        dst: &mut [T],
        d: usize,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let p = self.shape.p;
        let scale = T::one() / T::from(p).unwrap_or_else(T::one);
        for (r, row) in dst.chunks_exact_mut(d).enumerate().take(rows) {
            for i in 0..q {
                for (f, c) in ws.freq.iter_mut().enumerate() {
                    let idx = (f * rows + r) * q + i;
                    *c = Complex::new(re[idx], im[idx]);
                }
                self.inverse(ws)?;
                let lo = i * p;
                let hi = (lo + p).min(d);
                for (o, &t) in row[lo..hi].iter_mut().zip(ws.time.iter()) {
                    *o = t * scale;
                }
            }
        }
        Ok(())
    }

    /// Complex-to-real transform of `ws.freq` into `ws.time` (unnormalised).
    fn inverse(&self, ws: &mut Workspace<T>) -> Result<(), BcaError> {
        // The spectrum of a real signal has real DC and Nyquist bins; rounding (or an
        // overflow to Inf) must not make realfft refuse it.
        let f_n = ws.freq.len();
        ws.freq[0].im = T::zero();
        if self.shape.p % 2 == 0 {
            ws.freq[f_n - 1].im = T::zero();
        }
        self.c2r
            .process_with_scratch(&mut ws.freq, &mut ws.time, &mut ws.scratch)
            .map_err(fft_err)
    }

    /// One chunk of rows: `src` (rows × d_a) → `dst` (rows × d_b) through `spectra`.
    /// `src_spectra`, when given, already holds the chunk's spectra.
    fn apply_chunk(
        &self,
        src: Option<(&[T], usize)>,
        src_spectra: Option<(&[T], &[T])>,
        rows: usize,
        spectra: &Spectra<T>,
        dst: &mut [T],
        d_b: usize,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let f_n = self.shape.n_freq();
        let (q_a, q_b) = (spectra.q_a, spectra.q_b);
        let mut a_re = std::mem::take(&mut ws.a_re);
        let mut a_im = std::mem::take(&mut ws.a_im);
        let result = (|| {
            let (x_re, x_im): (&[T], &[T]) = match (src_spectra, src) {
                (Some(s), _) => s,
                (None, Some((x, d_a))) => {
                    let n = f_n * rows * q_a;
                    self.rows_to_spectra(x, d_a, q_a, (&mut a_re[..n], &mut a_im[..n]), ws)?;
                    (&a_re[..n], &a_im[..n])
                }
                (None, None) => return Err(BcaError::invalid("src", "no input")),
            };
            let n_b = f_n * rows * q_b;
            let (y_re, y_im) = (&mut ws.b_re[..n_b], &mut ws.b_im[..n_b]);
            y_re.fill(T::zero());
            y_im.fill(T::zero());
            simd::spectral_product(
                f_n,
                rows,
                q_a,
                q_b,
                (x_re, x_im),
                (&spectra.re, &spectra.im),
                (y_re, y_im),
            );
            let (b_re, b_im) = (std::mem::take(&mut ws.b_re), std::mem::take(&mut ws.b_im));
            let r = self.spectra_to_rows(&b_re, &b_im, rows, q_b, dst, d_b, ws);
            ws.b_re = b_re;
            ws.b_im = b_im;
            r
        })();
        ws.a_re = a_re;
        ws.a_im = a_im;
        result
    }

    /// Map `src` (n × d_a) to `dst` (n × d_b) through one orientation of the spectra,
    /// chunk by chunk, in parallel when it pays.
    fn apply(
        &self,
        src: &[T],
        d_a: usize,
        spectra: &Spectra<T>,
        dst: &mut [T],
        d_b: usize,
        n_rows: usize,
    ) -> Result<(), BcaError> {
        if n_rows == 0 {
            return Ok(());
        }
        let pool = self.parallel_pool(n_rows);
        let threads = pool.as_ref().map_or(1, |p| p.current_num_threads());
        let rows_per = self.rows_per_chunk(n_rows, threads);
        let work = |(s, d): (&[T], &mut [T])| -> Result<(), BcaError> {
            let rows = s.len() / d_a;
            let mut ws = self.take_workspace(rows);
            let r = self.apply_chunk(Some((s, d_a)), None, rows, spectra, d, d_b, &mut ws);
            self.give_back_workspace(ws);
            r
        };
        match pool {
            Some(pool) => pool.install(|| {
                src.par_chunks(rows_per * d_a)
                    .zip(dst.par_chunks_mut(rows_per * d_b))
                    .try_for_each(work)
            }),
            None => src
                .chunks(rows_per * d_a)
                .zip(dst.chunks_mut(rows_per * d_b))
                .try_for_each(work),
        }
    }

    fn check_len(arg: &'static str, data: &[T], n_rows: usize, d: usize) -> Result<(), BcaError> {
        let want = n_rows
            .checked_mul(d)
            .ok_or_else(|| BcaError::invalid(arg, "size overflows"))?;
        if data.len() != want {
            return Err(BcaError::invalid(
                arg,
                format!(
                    "expected {n_rows} rows of {d} values ({want}), got {}",
                    data.len()
                ),
            ));
        }
        Ok(())
    }

    /// ΔW x for `n_rows` rows: `x` is (n_rows × in_features), `out` (n_rows × out_features).
    pub fn forward(&self, x: &[T], n_rows: usize, out: &mut [T]) -> Result<(), BcaError> {
        let s = self.shape;
        Self::check_len("x", x, n_rows, s.in_features)?;
        Self::check_len("out", out, n_rows, s.out_features)?;
        check_finite("x", x)?;
        self.apply(x, s.in_features, &self.fwd, out, s.out_features, n_rows)
    }

    /// Gradient with respect to the input: ΔWᵀ g for `n_rows` rows of `grad_output`.
    pub fn backward_input(
        &self,
        grad_output: &[T],
        n_rows: usize,
        grad_x: &mut [T],
    ) -> Result<(), BcaError> {
        let s = self.shape;
        Self::check_len("grad_output", grad_output, n_rows, s.out_features)?;
        Self::check_len("grad_x", grad_x, n_rows, s.in_features)?;
        check_finite("grad_output", grad_output)?;
        self.apply(
            grad_output,
            s.out_features,
            &self.bwd,
            grad_x,
            s.in_features,
            n_rows,
        )
    }

    /// Gradients of `sum(grad_output * (ΔW x))`: with respect to the input (into `grad_x`,
    /// when given) and to the kernel (into `grad_kernel`, shape (q_out, q_in, p), when given;
    /// summed over rows). `x` is needed only for the kernel gradient.
    pub fn backward(
        &self,
        x: Option<&[T]>,
        grad_output: &[T],
        n_rows: usize,
        grad_x: Option<&mut [T]>,
        grad_kernel: Option<&mut [T]>,
    ) -> Result<(), BcaError> {
        let Some(grad_kernel) = grad_kernel else {
            return match grad_x {
                Some(gx) => self.backward_input(grad_output, n_rows, gx),
                None => Ok(()),
            };
        };
        let s = self.shape;
        let x = x.ok_or_else(|| BcaError::invalid("x", "needed for the kernel gradient"))?;
        Self::check_len("x", x, n_rows, s.in_features)?;
        Self::check_len("grad_output", grad_output, n_rows, s.out_features)?;
        if grad_kernel.len() != s.kernel_len() {
            return Err(BcaError::invalid(
                "grad_kernel",
                format!(
                    "expected {} values, got {}",
                    s.kernel_len(),
                    grad_kernel.len()
                ),
            ));
        }
        if let Some(gx) = grad_x.as_deref() {
            Self::check_len("grad_x", gx, n_rows, s.in_features)?;
        }
        check_finite("x", x)?;
        check_finite("grad_output", grad_output)?;
        grad_kernel.fill(T::zero());
        if n_rows == 0 {
            return Ok(());
        }

        let (d_in, d_out, q_in, q_out) = (s.in_features, s.out_features, s.q_in, s.q_out);
        let f_n = s.n_freq();
        let pool = self.parallel_pool(n_rows);
        let threads = pool.as_ref().map_or(1, |p| p.current_num_threads());
        let rows_per = self.rows_per_chunk(n_rows, threads);

        let mut guard = lock(&self.grad_buffers);
        let bufs = &mut *guard;
        for (v, q) in [
            (&mut bufs.x_re, q_in),
            (&mut bufs.x_im, q_in),
            (&mut bufs.g_re, q_out),
            (&mut bufs.g_im, q_out),
        ] {
            grow(v, n_rows * f_n * q);
        }
        let k_len = f_n * q_out * q_in;
        grow(&mut bufs.k_re, k_len);
        grow(&mut bufs.k_im, k_len);

        // Pass 1, per chunk of rows: spectra of x and of grad_output, kept for pass 2;
        // the input gradient from grad_output's spectra.
        {
            let xs = bufs.x_re[..n_rows * f_n * q_in]
                .chunks_mut(rows_per * f_n * q_in)
                .zip(bufs.x_im.chunks_mut(rows_per * f_n * q_in));
            let gs = bufs.g_re[..n_rows * f_n * q_out]
                .chunks_mut(rows_per * f_n * q_out)
                .zip(bufs.g_im.chunks_mut(rows_per * f_n * q_out));
            let mut gx_chunks: Vec<Option<&mut [T]>> = match grad_x {
                Some(gx) => gx.chunks_mut(rows_per * d_in).map(Some).collect(),
                None => (0..n_rows.div_ceil(rows_per)).map(|_| None).collect(),
            };
            let items: Vec<_> = x
                .chunks(rows_per * d_in)
                .zip(grad_output.chunks(rows_per * d_out))
                .zip(xs.zip(gs))
                .zip(gx_chunks.iter_mut())
                .collect();
            let work = |(((xc, gc), ((xr, xi), (gr, gi))), gx): (
                ((&[T], &[T]), ((&mut [T], &mut [T]), (&mut [T], &mut [T]))),
                &mut Option<&mut [T]>,
            )|
             -> Result<(), BcaError> {
                let rows = xc.len() / d_in;
                let nx = f_n * rows * q_in;
                let ng = f_n * rows * q_out;
                let mut ws = self.take_workspace(rows);
                let r = (|| {
                    self.rows_to_spectra(xc, d_in, q_in, (&mut xr[..nx], &mut xi[..nx]), &mut ws)?;
                    self.rows_to_spectra(
                        gc,
                        d_out,
                        q_out,
                        (&mut gr[..ng], &mut gi[..ng]),
                        &mut ws,
                    )?;
                    if let Some(gx) = gx.as_deref_mut() {
                        self.apply_chunk(
                            None,
                            Some((&gr[..ng], &gi[..ng])),
                            rows,
                            &self.bwd,
                            gx,
                            d_in,
                            &mut ws,
                        )?;
                    }
                    Ok(())
                })();
                self.give_back_workspace(ws);
                r
            };
            match &pool {
                Some(pool) => pool.install(|| items.into_par_iter().try_for_each(work))?,
                None => items.into_iter().try_for_each(work)?,
            }
        }

        // Pass 2, per frequency: K[f] = Σ_rows G[f]ᵀ conj(X[f]), rows in a fixed order so
        // the result does not depend on the thread count.
        let x_re = &bufs.x_re[..];
        let x_im = &bufs.x_im[..];
        let g_re = &bufs.g_re[..];
        let g_im = &bufs.g_im[..];
        let per_freq = |(f, (kr, ki)): (usize, (&mut [T], &mut [T]))| {
            kr.fill(T::zero());
            ki.fill(T::zero());
            let mut row0 = 0;
            while row0 < n_rows {
                let rows = rows_per.min(n_rows - row0);
                let xo = row0 * f_n * q_in + f * rows * q_in;
                let go = row0 * f_n * q_out + f * rows * q_out;
                simd::accumulate_outer_conj(
                    rows,
                    q_out,
                    q_in,
                    (&g_re[go..go + rows * q_out], &g_im[go..go + rows * q_out]),
                    (&x_re[xo..xo + rows * q_in], &x_im[xo..xo + rows * q_in]),
                    (kr, ki),
                );
                row0 += rows;
            }
        };
        let (k_re, k_im) = (&mut bufs.k_re[..k_len], &mut bufs.k_im[..k_len]);
        let plane = q_out * q_in;
        match &pool {
            Some(pool) => pool.install(|| {
                k_re.par_chunks_mut(plane)
                    .zip(k_im.par_chunks_mut(plane))
                    .enumerate()
                    .for_each(per_freq)
            }),
            None => k_re
                .chunks_mut(plane)
                .zip(k_im.chunks_mut(plane))
                .enumerate()
                .for_each(per_freq),
        }

        // Pass 3: one inverse transform per kernel block.
        let (k_re, k_im) = (&bufs.k_re[..k_len], &bufs.k_im[..k_len]);
        let p = s.p;
        let scale = T::one() / T::from(p).unwrap_or_else(T::one);
        let per_block_row = |(i, out): (usize, &mut [T])| -> Result<(), BcaError> {
            let mut ws = self.take_workspace(0);
            let r = (|| {
                for j in 0..q_in {
                    for (f, c) in ws.freq.iter_mut().enumerate() {
                        let idx = (f * q_out + i) * q_in + j;
                        *c = Complex::new(k_re[idx], k_im[idx]);
                    }
                    self.inverse(&mut ws)?;
                    for (o, &t) in out[j * p..(j + 1) * p].iter_mut().zip(ws.time.iter()) {
                        *o = t * scale;
                    }
                }
                Ok(())
            })();
            self.give_back_workspace(ws);
            r
        };
        match &pool {
            Some(pool) if q_out > 1 => pool.install(|| {
                grad_kernel
                    .par_chunks_mut(q_in * p)
                    .enumerate()
                    .try_for_each(per_block_row)
            }),
            _ => grad_kernel
                .chunks_mut(q_in * p)
                .enumerate()
                .try_for_each(per_block_row),
        }
    }
}

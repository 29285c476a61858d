//! The block circulant operator: cached kernel spectra, FFT plans and workspaces.
//!
//! Data layout. Every spectrum is stored with the frequency innermost, as split
//! real/imaginary planes: row spectra as (rows, q, F), F = p / 2 + 1, exactly as the
//! real FFTs produce them, and kernel spectra as (q_out, q_in, F) for the forward product
//! and (q_in, q_out, F), conjugated, for the gradient with respect to the input. The sum
//! over blocks is then a run of elementwise complex multiply-accumulates over contiguous
//! frequencies (see `simd.rs`), done in the frequency domain, followed by one inverse FFT
//! per output block and row. No transposes, no horizontal sums.

use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex;

use crate::simd;
use crate::threads;
use crate::{BcaError, Float, Shape};

/// Most rows processed together by one task.
const MAX_ROWS_PER_CHUNK: usize = 16;
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
    if simd::all_finite(data) {
        Ok(())
    } else {
        Err(BcaError::NonFinite { arg })
    }
}

fn grow<T: Clone + Default>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

/// Per-task scratch memory, reused across calls.
struct Workspace<T> {
    time: Vec<T>,
    freq: Vec<Complex<T>>,
    scratch: Vec<Complex<T>>,
    a_re: Vec<T>,
    a_im: Vec<T>,
    b_re: Vec<T>,
    b_im: Vec<T>,
}

/// Row spectra of a whole batch and the kernel-gradient spectra.
struct GradBuffers<T: Float> {
    x_re: Vec<T>,
    x_im: Vec<T>,
    g_re: Vec<T>,
    g_im: Vec<T>,
    /// Kernel-gradient spectra, one (q_out, q_in, LANES) slab per tile of frequencies.
    k_re: Vec<T::Acc>,
    k_im: Vec<T::Acc>,
}

impl<T: Float> Default for GradBuffers<T> {
    fn default() -> Self {
        Self {
            x_re: Vec::new(),
            x_im: Vec::new(),
            g_re: Vec::new(),
            g_im: Vec::new(),
            k_re: Vec::new(),
            k_im: Vec::new(),
        }
    }
}

/// Kernel spectra in one orientation: (q_b, q_a, F), split planes.
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
/// threads may call it at once. Results do not depend on the thread count.
pub struct BlockCirculant<T: Float> {
    shape: Shape,
    kernel: Vec<T>,
    fwd: Spectra<T>,
    bwd: Spectra<T>,
    r2c: Arc<dyn RealToComplex<T>>,
    c2r: Arc<dyn ComplexToReal<T>>,
    scratch_len: usize,
    /// Frequency stride of every spectrum buffer (F rounded up to the SIMD tile).
    f_pad: usize,
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
        let f_pad = simd::padded_freqs(shape.n_freq());
        let spectra_len = f_pad * q_in * q_out;
        let empty = |q_a, q_b| Spectra {
            re: vec![T::zero(); spectra_len],
            im: vec![T::zero(); spectra_len],
            q_a,
            q_b,
        };
        let mut op = BlockCirculant {
            shape,
            kernel: Vec::new(),
            fwd: empty(q_in, q_out),
            bwd: empty(q_out, q_in),
            r2c,
            c2r,
            scratch_len,
            f_pad,
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

    /// Replace the kernel values (same shape) and recompute the cached spectra. On error
    /// the operator is unchanged.
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
        let (p, f_pad) = (s.p, self.f_pad);
        let mut ws = self.new_workspace();
        for (b, block) in kernel.chunks_exact(p).enumerate() {
            let (i, j) = (b / s.q_in, b % s.q_in);
            ws.time.copy_from_slice(block);
            self.r2c
                .process_with_scratch(&mut ws.time, &mut ws.freq, &mut ws.scratch)
                .map_err(fft_err)?;
            for (f, c) in ws.freq.iter().enumerate() {
                let fwd = i * s.q_in * f_pad + simd::packed(s.q_in, j, f);
                let bwd = j * s.q_out * f_pad + simd::packed(s.q_out, i, f);
                self.fwd.re[fwd] = c.re;
                self.fwd.im[fwd] = c.im;
                self.bwd.re[bwd] = c.re;
                self.bwd.im[bwd] = -c.im;
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
        for (r, row) in dense.chunks_exact_mut(d_in).enumerate() {
            let (i, a) = (r / p, r % p);
            for (c, v) in row.iter_mut().enumerate() {
                let (j, b) = (c / p, c % p);
                *v = self.kernel[(i * s.q_in + j) * p + (a + p - b) % p];
            }
        }
        dense
    }

    fn new_workspace(&self) -> Workspace<T> {
        Workspace {
            time: vec![T::zero(); self.shape.p],
            freq: vec![Complex::default(); self.shape.n_freq()],
            scratch: vec![Complex::default(); self.scratch_len],
            a_re: Vec::new(),
            a_im: Vec::new(),
            b_re: Vec::new(),
            b_im: Vec::new(),
        }
    }

    /// A workspace whose spectra planes hold `rows` rows of the widest side.
    fn take_workspace(&self, rows: usize) -> Workspace<T> {
        let s = self.shape;
        let mut ws = lock(&self.workspaces)
            .pop()
            .unwrap_or_else(|| self.new_workspace());
        let len = rows * s.q_in.max(s.q_out) * self.f_pad;
        for v in [&mut ws.a_re, &mut ws.a_im, &mut ws.b_re, &mut ws.b_im] {
            grow(v, len);
        }
        ws
    }

    fn give_back_workspace(&self, ws: Workspace<T>) {
        lock(&self.workspaces).push(ws);
    }

    /// A pool when the work is worth splitting, else `None` (run on the caller's thread).
    fn parallel_pool(&self, n_rows: usize) -> Option<Arc<rayon::ThreadPool>> {
        let threads = match self.num_threads {
            0 => threads::default_num_threads(),
            n => n,
        };
        let work = n_rows.saturating_mul(self.kernel.len());
        if threads <= 1 || n_rows <= 1 || work < PARALLEL_MIN_WORK {
            return None;
        }
        threads::pool(threads)
    }

    fn rows_per_chunk(n_rows: usize, pool: &Option<Arc<rayon::ThreadPool>>) -> usize {
        let threads = pool.as_ref().map_or(1, |p| p.current_num_threads());
        n_rows.div_ceil(threads).clamp(1, MAX_ROWS_PER_CHUNK)
    }

    /// Spectra of the rows of `src` (row width `d`, `q` blocks) into planes: one packed
    /// group per row (`by_row` false) or the chunk's row-transposed layout (`by_row` true).
    fn rows_to_spectra(
        &self,
        src: &[T],
        d: usize,
        q: usize,
        (re, im): (&mut [T], &mut [T]),
        by_row: bool,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let (p, f_pad) = (self.shape.p, self.f_pad);
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
                let group = r * q * f_pad;
                for (f, c) in ws.freq.iter().enumerate() {
                    let at = if by_row {
                        simd::packed_by_row(q, rows, r, j, f)
                    } else {
                        group + simd::packed(q, j, f)
                    };
                    re[at] = c.re;
                    im[at] = c.im;
                }
            }
        }
        Ok(())
    }

    /// Complex-to-real transform of `ws.freq` into `ws.time` (unnormalised).
    fn inverse(&self, ws: &mut Workspace<T>) -> Result<(), BcaError> {
        // The spectrum of a real signal has real DC and Nyquist bins; rounding, or an
        // overflow to Inf, must not make realfft refuse it.
        let f_n = ws.freq.len();
        ws.freq[0].im = T::zero();
        if self.shape.p % 2 == 0 {
            ws.freq[f_n - 1].im = T::zero();
        }
        self.c2r
            .process_with_scratch(&mut ws.freq, &mut ws.time, &mut ws.scratch)
            .map_err(fft_err)
    }

    /// Inverse transform of `q` spectra (F each) into one row of `dst` (width `d`), / p.
    fn spectra_to_row(
        &self,
        (re, im): (&[T], &[T]),
        q: usize,
        dst: &mut [T],
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let p = self.shape.p;
        let d = dst.len();
        let scale = T::one() / T::from(p).unwrap_or_else(T::one);
        for i in 0..q {
            for (f, c) in ws.freq.iter_mut().enumerate() {
                let at = simd::packed(q, i, f);
                *c = Complex::new(re[at], im[at]);
            }
            self.inverse(ws)?;
            let lo = i * p;
            let hi = (lo + p).min(d);
            for (o, &t) in dst[lo..hi].iter_mut().zip(ws.time.iter()) {
                *o = t * scale;
            }
        }
        Ok(())
    }

    /// Rows whose spectra are `src` (rows, q_a, F) → rows of `dst` (width `d_b`) through
    /// one orientation of the kernel spectra.
    fn product_to_rows(
        &self,
        src: (&[T], &[T]),
        spectra: &Spectra<T>,
        dst: &mut [T],
        d_b: usize,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let f_pad = self.f_pad;
        let rows = dst.len() / d_b;
        let n_b = rows * spectra.q_b * f_pad;
        let mut y_re = std::mem::take(&mut ws.b_re);
        let mut y_im = std::mem::take(&mut ws.b_im);
        simd::block_product(
            f_pad,
            spectra.q_a,
            spectra.q_b,
            src,
            (&spectra.re, &spectra.im),
            (&mut y_re[..n_b], &mut y_im[..n_b]),
        );
        let row_b = spectra.q_b * f_pad;
        let result = dst
            .chunks_exact_mut(d_b)
            .enumerate()
            .try_for_each(|(r, row)| {
                let o = r * row_b;
                self.spectra_to_row(
                    (&y_re[o..o + row_b], &y_im[o..o + row_b]),
                    spectra.q_b,
                    row,
                    ws,
                )
            });
        ws.b_re = y_re;
        ws.b_im = y_im;
        result
    }

    /// One chunk of rows: `src` (rows × d_a) → `dst` (rows × d_b).
    fn apply_chunk(
        &self,
        src: &[T],
        d_a: usize,
        spectra: &Spectra<T>,
        dst: &mut [T],
        d_b: usize,
    ) -> Result<(), BcaError> {
        let rows = src.len() / d_a;
        let n_a = rows * spectra.q_a * self.f_pad;
        let mut ws = self.take_workspace(rows);
        let mut a_re = std::mem::take(&mut ws.a_re);
        let mut a_im = std::mem::take(&mut ws.a_im);
        let result = self
            .rows_to_spectra(
                src,
                d_a,
                spectra.q_a,
                (&mut a_re[..n_a], &mut a_im[..n_a]),
                false,
                &mut ws,
            )
            .and_then(|()| {
                self.product_to_rows((&a_re[..n_a], &a_im[..n_a]), spectra, dst, d_b, &mut ws)
            });
        ws.a_re = a_re;
        ws.a_im = a_im;
        self.give_back_workspace(ws);
        result
    }

    /// Map `src` (n × d_a) to `dst` (n × d_b) through one orientation of the spectra,
    /// chunk by chunk, in parallel when it pays.
    /// `arg` names `src` in the error raised when it holds NaN or Inf; each chunk checks
    /// its own rows, in parallel.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &self,
        arg: &'static str,
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
        let rows = Self::rows_per_chunk(n_rows, &pool);
        let work = |(s, d): (&[T], &mut [T])| {
            check_finite(arg, s)?;
            self.apply_chunk(s, d_a, spectra, d, d_b)
        };
        match pool {
            Some(pool) => pool.install(|| {
                src.par_chunks(rows * d_a)
                    .zip(dst.par_chunks_mut(rows * d_b))
                    .try_for_each(work)
            }),
            None => src
                .chunks(rows * d_a)
                .zip(dst.chunks_mut(rows * d_b))
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
        self.apply(
            "x",
            x,
            s.in_features,
            &self.fwd,
            out,
            s.out_features,
            n_rows,
        )
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
        self.apply(
            "grad_output",
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

        let (d_in, d_out, q_in, q_out, p) = (s.in_features, s.out_features, s.q_in, s.q_out, s.p);
        let f_pad = self.f_pad;
        let (row_x, row_g) = (q_in * f_pad, q_out * f_pad);
        let pool = self.parallel_pool(n_rows);
        let rows = Self::rows_per_chunk(n_rows, &pool);

        let mut guard = lock(&self.grad_buffers);
        let bufs = &mut *guard;
        grow(&mut bufs.x_re, n_rows * row_x);
        grow(&mut bufs.x_im, n_rows * row_x);
        grow(&mut bufs.g_re, n_rows * row_g);
        grow(&mut bufs.g_im, n_rows * row_g);
        let (x_re, x_im) = (
            &mut bufs.x_re[..n_rows * row_x],
            &mut bufs.x_im[..n_rows * row_x],
        );
        let (g_re, g_im) = (
            &mut bufs.g_re[..n_rows * row_g],
            &mut bufs.g_im[..n_rows * row_g],
        );

        // Pass 1, per chunk of rows: spectra of x and of grad_output, kept for pass 2, and
        // the input gradient from grad_output's spectra.
        {
            let mut gx_chunks: Vec<Option<&mut [T]>> = match grad_x {
                Some(gx) => gx.chunks_mut(rows * d_in).map(Some).collect(),
                None => (0..n_rows.div_ceil(rows)).map(|_| None).collect(),
            };
            type Item<'a, T> = (
                (&'a [T], &'a [T]),
                (PlanesMutPair<'a, T>, PlanesMutPair<'a, T>),
                &'a mut Option<&'a mut [T]>,
            );
            type PlanesMutPair<'a, T> = (&'a mut [T], &'a mut [T]);
            let items: Vec<Item<'_, T>> = x
                .chunks(rows * d_in)
                .zip(grad_output.chunks(rows * d_out))
                .zip(
                    x_re.chunks_mut(rows * row_x)
                        .zip(x_im.chunks_mut(rows * row_x))
                        .zip(
                            g_re.chunks_mut(rows * row_g)
                                .zip(g_im.chunks_mut(rows * row_g)),
                        ),
                )
                .zip(gx_chunks.iter_mut())
                .map(|((a, b), c)| (a, b, c))
                .collect();
            let work = |((xc, gc), ((xr, xi), (gr, gi)), gx): Item<'_, T>| -> Result<(), BcaError> {
                let chunk_rows = gc.len() / d_out;
                let mut ws = self.take_workspace(chunk_rows);
                let mut a_re = std::mem::take(&mut ws.a_re);
                let mut a_im = std::mem::take(&mut ws.a_im);
                let n_g = chunk_rows * row_g;
                let r = self
                    .rows_to_spectra(xc, d_in, q_in, (xr, xi), true, &mut ws)
                    .and_then(|()| {
                        let g_planes = (&mut a_re[..n_g], &mut a_im[..n_g]);
                        self.rows_to_spectra(gc, d_out, q_out, g_planes, false, &mut ws)
                    })
                    .and_then(|()| {
                        // The kernel gradient wants grad_output's spectra row-transposed.
                        for r in 0..chunk_rows {
                            for i in 0..q_out {
                                for f in 0..f_pad {
                                    let from = r * row_g + simd::packed(q_out, i, f);
                                    let to = simd::packed_by_row(q_out, chunk_rows, r, i, f);
                                    gr[to] = a_re[from];
                                    gi[to] = a_im[from];
                                }
                            }
                        }
                        match gx.as_deref_mut() {
                            Some(gx) => self.product_to_rows(
                                (&a_re[..n_g], &a_im[..n_g]),
                                &self.bwd,
                                gx,
                                d_in,
                                &mut ws,
                            ),
                            None => Ok(()),
                        }
                    });
                ws.a_re = a_re;
                ws.a_im = a_im;
                self.give_back_workspace(ws);
                r
            };
            match &pool {
                Some(pool) => pool.install(|| items.into_par_iter().try_for_each(work))?,
                None => items.into_iter().try_for_each(work)?,
            }
        }

        // Pass 2, per tile of frequencies (in parallel): K[:, :, tile] = Σ_rows
        // G[r, :, tile]ᵀ ⊙ conj(X[r, :, tile]), chunks and rows in order. Each task keeps its
        // slab of K in cache and reads every row's spectra once.
        let (x_re, x_im, g_re, g_im) = (&*x_re, &*x_im, &*g_re, &*g_im);
        let slab = q_out * q_in * simd::LANES;
        grow(&mut bufs.k_re, f_pad * q_out * q_in);
        grow(&mut bufs.k_im, f_pad * q_out * q_in);
        let (k_re, k_im) = (
            &mut bufs.k_re[..f_pad * q_out * q_in],
            &mut bufs.k_im[..f_pad * q_out * q_in],
        );
        let per_tile = |(t, (kr, ki)): (usize, simd::PlanesMut<'_, T::Acc>)| {
            kr.fill(<T::Acc as num_traits::Zero>::zero());
            ki.fill(<T::Acc as num_traits::Zero>::zero());
            let mut row0 = 0;
            while row0 < n_rows {
                let chunk = rows.min(n_rows - row0);
                let (xo, go) = (row0 * row_x, row0 * row_g);
                let (nx, ng) = (chunk * row_x, chunk * row_g);
                simd::accumulate_kernel_grad(
                    q_out,
                    q_in,
                    chunk,
                    t * simd::LANES,
                    (&g_re[go..go + ng], &g_im[go..go + ng]),
                    (&x_re[xo..xo + nx], &x_im[xo..xo + nx]),
                    (&mut *kr, &mut *ki),
                );
                row0 += chunk;
            }
        };
        match &pool {
            Some(pool) if f_pad > simd::LANES => pool.install(|| {
                k_re.par_chunks_mut(slab)
                    .zip(k_im.par_chunks_mut(slab))
                    .enumerate()
                    .for_each(per_tile)
            }),
            _ => k_re
                .chunks_mut(slab)
                .zip(k_im.chunks_mut(slab))
                .enumerate()
                .for_each(per_tile),
        }

        // Pass 3, per output block (in parallel): one inverse FFT per kernel block.
        let (k_re, k_im) = (&*k_re, &*k_im);
        let scale = T::one() / T::from(p).unwrap_or_else(T::one);
        let per_block_row = |(i, out): (usize, &mut [T])| -> Result<(), BcaError> {
            let mut ws = self.take_workspace(0);
            let r = out
                .chunks_exact_mut(p)
                .enumerate()
                .try_for_each(|(j, block)| {
                    for (f, c) in ws.freq.iter_mut().enumerate() {
                        let at = (f / simd::LANES) * slab
                            + (i * q_in + j) * simd::LANES
                            + f % simd::LANES;
                        *c = Complex::new(T::narrow(k_re[at]), T::narrow(k_im[at]));
                    }
                    self.inverse(&mut ws)?;
                    for (o, &t) in block.iter_mut().zip(ws.time.iter()) {
                        *o = t * scale;
                    }
                    Ok(())
                });
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

//! The block circulant operator: cached kernel spectra, FFT plans and workspaces.
//!
//! Data layout. Every spectrum is stored with the frequency innermost, as split
//! real/imaginary planes: row spectra as (rows, q, F), F = p / 2 + 1, exactly as the
//! real FFTs produce them, and kernel spectra as (q_out, q_in, F) for the forward product
//! and (q_in, q_out, F), conjugated, for the gradient with respect to the input. The sum
//! over blocks is then a run of elementwise complex multiply-accumulates over contiguous
//! frequencies (see `simd.rs`), done in the frequency domain, followed by one inverse FFT
//! per output block and row. No transposes, no horizontal sums.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::alloc::{bytes_of, colour, give_scratch, mul, probe, take_scratch, try_vec, AVec};
use crate::rfft::{FftScratch, RealFft};
use crate::simd;
use crate::threads;
use crate::{BcaError, Float, Shape};

/// Most rows processed together by one task.
const MAX_ROWS_PER_CHUNK: usize = 16;
/// Below this many (rows × kernel elements) a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;
/// Bytes of batch spectra (x and grad_output) that `backward` works through at a time.
const BACKWARD_BLOCK_BYTES: usize = 4 << 20;
/// `backward` fuses the kernel-gradient sums into the pass that takes the spectra (see
/// [`BlockCirculant::backward_fused`]) when one group's partial sums take at most this
/// many bytes, so that they stay in a core's L2 cache beside a chunk's spectra.
const FUSED_MAX_K_BYTES: usize = 1 << 20;
/// Fewest groups of rows for which `backward` takes the fused path.
const FUSED_MIN_GROUPS: usize = 4;
/// Rows per chunk in a group of the fused backward: its spectra, the group's partial sums
/// and the chunk's input gradient stay in L2 together (16 rows were 2-7% slower at
/// d = 4096, p = 256).
const FUSED_CHUNK_ROWS: usize = 8;
/// Most bytes of partial kernel-gradient sums that one wave of `backward_fused` holds.
const FUSED_WAVE_BYTES: usize = 4 << 20;
/// Most idle workspaces an operator keeps for reuse (fewer on small machines, see
/// [`max_pooled_workspaces`]).
const MAX_POOLED_WORKSPACES: usize = 64;
/// Attempts at the workspace cache's lock before a call makes (or drops) a workspace.
const LOCK_SPINS: usize = 256;

/// Idle workspaces kept per operator: two per core (at most one task per thread uses a
/// workspace at a time), within [2, MAX_POOLED_WORKSPACES].
fn max_pooled_workspaces() -> usize {
    static KEPT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *KEPT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.saturating_mul(2).clamp(2, MAX_POOLED_WORKSPACES)
    })
}

/// Returns an error naming `arg` when `data` holds NaN or ±Inf.
pub(crate) fn check_finite<T: Float>(arg: &'static str, data: &[T]) -> Result<(), BcaError> {
    if simd::all_finite(data) {
        Ok(())
    } else {
        Err(BcaError::NonFinite { arg })
    }
}

/// Per-task scratch memory, reused across calls.
struct Workspace<T> {
    fft: FftScratch<T>,
    a_re: AVec<T>,
    a_im: AVec<T>,
    b_re: AVec<T>,
    b_im: AVec<T>,
    /// Used by the fused backward only (empty otherwise): a chunk's x spectra and
    /// grad_output spectra in the row-transposed layout of the kernel-gradient sums.
    c_re: AVec<T>,
    c_im: AVec<T>,
    d_re: AVec<T>,
    d_im: AVec<T>,
}

impl<T> Workspace<T> {
    fn bytes(&self) -> usize {
        let planes = [
            &self.a_re, &self.a_im, &self.b_re, &self.b_im, &self.c_re, &self.c_im, &self.d_re,
            &self.d_im,
        ];
        planes.iter().map(|v| v.bytes()).sum::<usize>() + self.fft.bytes()
    }
}

/// Idle workspaces, shared by every version of an operator (same shape).
///
/// The lock is only ever *tried*, never waited for: a caller that finds it taken makes a
/// fresh workspace, and one that cannot give a workspace back drops it. So no call waits
/// on another, and a child forked while a parent thread held the lock does not deadlock.
/// Workspaces hold at most [`MAX_ROWS_PER_CHUNK`] rows, so what stays cached is bounded by
/// `MAX_POOLED_WORKSPACES` small buffers, whatever the batch size.
struct WorkspacePool<T> {
    idle: Mutex<Vec<Workspace<T>>>,
}

impl<T> WorkspacePool<T> {
    fn new() -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
        }
    }

    /// `f` on the idle list, or `None` when the lock stays taken through a short bounded
    /// spin (a few microseconds: the lock is only held to push or pop). Tasks of one
    /// call start together and contend for a moment; without the spin each loser made a
    /// fresh workspace that the pool then kept, and the pool crept up to its bound.
    fn with_idle<R>(&self, f: impl FnOnce(&mut Vec<Workspace<T>>) -> R) -> Option<R> {
        crate::alloc::try_locked(&self.idle, LOCK_SPINS, f)
    }

    /// Bytes held by idle workspaces (0 when the cache is busy right now).
    fn idle_bytes(&self) -> usize {
        self.with_idle(|v| v.iter().map(Workspace::bytes).sum())
            .unwrap_or(0)
    }

    fn take(&self) -> Option<Workspace<T>> {
        self.with_idle(|v| v.pop()).flatten()
    }

    fn give_back(&self, ws: Workspace<T>) {
        let kept = max_pooled_workspaces();
        self.with_idle(|v| {
            if v.len() < kept {
                v.push(ws);
            }
        });
    }
}

/// One group's task in the fused backward: its rows of x and of grad_output, its partial
/// kernel-gradient sums, and its rows of the input gradient (when asked for).
type FusedGroup<'a, T> = (
    &'a [T],
    &'a [T],
    simd::PlanesMut<'a, <T as Float>::Acc>,
    Option<&'a mut [T]>,
);

/// Kernel spectra in one orientation: (q_b, q_a, F), split planes.
struct Spectra<T> {
    re: AVec<T>,
    im: AVec<T>,
    q_a: usize,
    q_b: usize,
    /// The last frequency alone, compact (q_a, `simd::last_stride(q_b)`), when the last
    /// tile of `re`/`im` holds one frequency (F ≡ 1 mod LANES, e.g. p = 64, 256, 4096):
    /// the block product then runs that frequency with its lanes over output blocks
    /// rather than over seven padding lanes (`simd::block_product`). Empty otherwise.
    last_re: AVec<T>,
    last_im: AVec<T>,
}

impl<T> Spectra<T> {
    /// The compact last frequency, where there is one.
    fn last(&self) -> Option<simd::Planes<'_, T>> {
        match self.last_re.is_empty() {
            true => None,
            false => Some((&self.last_re, &self.last_im)),
        }
    }

    fn bytes(&self) -> usize {
        self.re.bytes() + self.im.bytes() + self.last_re.bytes() + self.last_im.bytes()
    }
}

/// Whether spectra of `n_freq` frequencies keep their last one compact (see `Spectra`).
fn compact_last(n_freq: usize) -> bool {
    n_freq % simd::LANES == 1
}

/// A block circulant operator ΔW with cached kernel spectra and FFT plans.
///
/// `forward` computes ΔW x for a batch of rows, `backward` the gradients with respect to
/// the input and the kernel, `to_dense` materialises ΔW. The operator is `Sync`: several
/// threads may call it at once, and no call waits for another (the only shared mutable
/// state, the workspace cache, is never waited on). Results do not depend on the thread
/// count. Memory kept between calls is bounded by a few row-chunk workspaces; the batch
/// buffers of `backward` are allocated per call and freed when it returns.
pub struct BlockCirculant<T: Float> {
    shape: Shape,
    kernel: Vec<T>,
    fwd: Spectra<T>,
    bwd: Spectra<T>,
    fft: Arc<RealFft<T>>,
    /// Frequency stride of every spectrum buffer (F rounded up to the SIMD tile).
    f_pad: usize,
    num_threads: AtomicUsize,
    workspaces: Arc<WorkspacePool<T>>,
}

impl<T: Float> std::fmt::Debug for BlockCirculant<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockCirculant")
            .field("dtype", &T::NAME)
            .field("shape", &self.shape)
            .field("num_threads", &self.num_threads())
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
        if kernel.len() != shape.kernel_len() {
            Self::check_kernel(shape, kernel)?; // the error, before anything is allocated
        }
        let f_pad = simd::padded_freqs(shape.n_freq());
        // Four spectra planes of f_pad · q_in · q_out values each: checked before planning.
        let spectra_len = mul(mul(f_pad, q_in, "kernel")?, q_out, "kernel")?;
        bytes_of::<T>(mul(spectra_len, 4, "kernel")?, "the kernel spectra")?;
        // Planning allocates (twiddles, scratch) infallibly, a few times p complex values:
        // make sure that much memory can be had first.
        probe(
            mul(p, 8 * std::mem::size_of::<T>(), "kernel")?,
            "the FFT plans",
        )?;
        let fft = Arc::new(RealFft::new(p));
        debug_assert_eq!(fft.f_pad(), f_pad);
        let empty = |q_a, q_b| Spectra {
            re: AVec::default(),
            im: AVec::default(),
            q_a,
            q_b,
            last_re: AVec::default(),
            last_im: AVec::default(),
        };
        let op = BlockCirculant {
            shape,
            kernel: Vec::new(),
            fwd: empty(q_in, q_out),
            bwd: empty(q_out, q_in),
            fft,
            f_pad,
            num_threads: AtomicUsize::new(0),
            workspaces: Arc::new(WorkspacePool::new()),
        };
        op.with_kernel(kernel)
    }

    fn check_kernel(s: Shape, kernel: &[T]) -> Result<(), BcaError> {
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
        check_finite("kernel", kernel)
    }

    /// A new operator of the same shape with another kernel: new spectra, the same plans,
    /// thread bound and workspace cache. `self` is unchanged, so callers that share an
    /// operator can swap versions without waiting for calls in flight.
    pub fn with_kernel(&self, kernel: &[T]) -> Result<Self, BcaError> {
        let s = self.shape;
        Self::check_kernel(s, kernel)?;
        let (p, f_pad) = (s.p, self.f_pad);
        let len = f_pad * s.q_in * s.q_out; // checked in `new`
        let planes = |[c_re, c_im]: [usize; 2], what| -> Result<(AVec<T>, AVec<T>), BcaError> {
            Ok((
                AVec::try_new(len, T::zero(), c_re, what)?,
                AVec::try_new(len, T::zero(), c_im, what)?,
            ))
        };
        let (f_re, f_im) = planes(colour::SPECTRA_FWD, "the kernel spectra")?;
        let (b_re, b_im) = planes(colour::SPECTRA_BWD, "the kernel spectra")?;
        let compact = compact_last(s.n_freq());
        let last_planes = |q_a: usize, q_b: usize, [c_re, c_im]: [usize; 2]| {
            let len = match compact {
                true => q_a * simd::last_stride(q_b), // ≤ len
                false => 0,
            };
            let what = "the kernel spectra";
            Ok::<_, BcaError>((
                AVec::try_new(len, T::zero(), c_re, what)?,
                AVec::try_new(len, T::zero(), c_im, what)?,
            ))
        };
        let (fl_re, fl_im) = last_planes(s.q_in, s.q_out, colour::SPECTRA_FWD)?;
        let (bl_re, bl_im) = last_planes(s.q_out, s.q_in, colour::SPECTRA_BWD)?;
        let mut fwd = Spectra {
            re: f_re,
            im: f_im,
            q_a: s.q_in,
            q_b: s.q_out,
            last_re: fl_re,
            last_im: fl_im,
        };
        let mut bwd = Spectra {
            re: b_re,
            im: b_im,
            q_a: s.q_out,
            q_b: s.q_in,
            last_re: bl_re,
            last_im: bl_im,
        };
        let last_tile = f_pad / simd::LANES - 1;
        let (stride_f, stride_b) = (simd::last_stride(s.q_out), simd::last_stride(s.q_in));
        // The spectra are stored times 1/p, the inverse transform's normalisation, so the
        // products come out of the unnormalised inverse FFT ready (exact for p a power
        // of two).
        let inv_p = T::one() / T::from(p).unwrap_or_else(T::one);
        let mut ws = self.take_workspace(0)?;
        for (b, block) in kernel.chunks_exact(p).enumerate() {
            let (i, j) = (b / s.q_in, b % s.q_in);
            self.fft.forward(block, &mut ws.fft, |t, re, im| {
                let at_f = i * s.q_in * f_pad + simd::packed(s.q_in, j, t * simd::LANES);
                let at_b = j * s.q_out * f_pad + simd::packed(s.q_out, i, t * simd::LANES);
                for l in 0..simd::LANES {
                    let (c_re, c_im) = (re[l] * inv_p, im[l] * inv_p);
                    fwd.re[at_f + l] = c_re;
                    fwd.im[at_f + l] = c_im;
                    bwd.re[at_b + l] = c_re;
                    bwd.im[at_b + l] = -c_im;
                }
                if compact && t == last_tile {
                    let (c_re, c_im) = (fwd.re[at_f], fwd.im[at_f]);
                    fwd.last_re[j * stride_f + i] = c_re;
                    fwd.last_im[j * stride_f + i] = c_im;
                    bwd.last_re[i * stride_b + j] = c_re;
                    bwd.last_im[i * stride_b + j] = -c_im;
                }
            })?; // finite: checked above
        }
        self.give_back_workspace(ws);
        let mut kernel_copy = Vec::new();
        kernel_copy
            .try_reserve_exact(kernel.len())
            .map_err(|_| BcaError::OutOfMemory {
                what: "the kernel",
                bytes: std::mem::size_of_val(kernel),
            })?;
        kernel_copy.extend_from_slice(kernel);
        Ok(BlockCirculant {
            shape: s,
            kernel: kernel_copy,
            fwd,
            bwd,
            fft: self.fft.clone(),
            f_pad,
            num_threads: AtomicUsize::new(self.num_threads()),
            workspaces: self.workspaces.clone(),
        })
    }

    /// The layer geometry.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The kernel, shape (q_out, q_in, p), row-major.
    pub fn kernel(&self) -> &[T] {
        &self.kernel
    }

    /// Whether `kernel` holds exactly this operator's kernel: the same length and the same
    /// bits in every element (so -0.0 and 0.0 differ; a kernel is never NaN).
    pub fn same_kernel(&self, kernel: &[T]) -> bool {
        crate::float::same_bits(&self.kernel, kernel)
    }

    /// Bytes this operator keeps between calls: the kernel, its spectra in both
    /// orientations and the idle workspaces (bounded; nothing grows with the batch).
    pub fn retained_bytes(&self) -> usize {
        self.kernel.capacity() * std::mem::size_of::<T>()
            + self.fwd.bytes()
            + self.bwd.bytes()
            + self.workspaces.idle_bytes()
    }

    /// Thread bound for this operator; 0 means the process default.
    pub fn num_threads(&self) -> usize {
        self.num_threads.load(Ordering::Relaxed)
    }

    /// Set the thread bound for this operator (clamped to 4096); 0 means the process
    /// default. Calls already running keep the bound they started with.
    pub fn set_num_threads(&self, n: usize) {
        self.num_threads
            .store(n.min(threads::MAX_THREADS), Ordering::Relaxed);
    }

    /// Replace the kernel values (same shape) and recompute the cached spectra. On error
    /// the operator is unchanged.
    pub fn set_kernel(&mut self, kernel: &[T]) -> Result<(), BcaError> {
        *self = self.with_kernel(kernel)?;
        Ok(())
    }

    /// ΔW as a dense row-major (out_features × in_features) matrix.
    pub fn to_dense(&self) -> Result<Vec<T>, BcaError> {
        let s = self.shape;
        let len = mul(s.out_features, s.in_features, "dense")?;
        let mut dense = try_vec(len, T::zero(), "the dense matrix")?;
        self.to_dense_into(&mut dense)?;
        Ok(dense)
    }

    /// Write ΔW into `out`, a row-major (out_features × in_features) buffer.
    pub fn to_dense_into(&self, out: &mut [T]) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out, p) = (s.in_features, s.out_features, s.p);
        Self::check_len("out", out, d_out, d_in)?;
        for (r, row) in out.chunks_exact_mut(d_in).enumerate() {
            let (i, a) = (r / p, r % p);
            for (c, v) in row.iter_mut().enumerate() {
                let (j, b) = (c / p, c % p);
                *v = self.kernel[(i * s.q_in + j) * p + (a + p - b) % p];
            }
        }
        Ok(())
    }

    fn new_workspace(&self) -> Result<Workspace<T>, BcaError> {
        Ok(Workspace {
            fft: self.fft.scratch()?,
            a_re: AVec::coloured(colour::WORKSPACE[0]),
            a_im: AVec::coloured(colour::WORKSPACE[1]),
            b_re: AVec::coloured(colour::WORKSPACE[2]),
            b_im: AVec::coloured(colour::WORKSPACE[3]),
            c_re: AVec::coloured(colour::BACKWARD_X[0]),
            c_im: AVec::coloured(colour::BACKWARD_X[1]),
            d_re: AVec::coloured(colour::BACKWARD_G[0]),
            d_im: AVec::coloured(colour::BACKWARD_G[1]),
        })
    }

    /// A workspace whose spectra planes hold `rows` rows (at most a chunk) of the widest
    /// side.
    fn take_workspace(&self, rows: usize) -> Result<Workspace<T>, BcaError> {
        let s = self.shape;
        let mut ws = match self.workspaces.take() {
            Some(ws) => ws,
            None => self.new_workspace()?,
        };
        let len = mul(mul(rows, s.q_in.max(s.q_out), "x")?, self.f_pad, "x")?;
        for v in [&mut ws.a_re, &mut ws.a_im, &mut ws.b_re, &mut ws.b_im] {
            v.try_grow(len, T::zero(), "an FFT workspace")?;
        }
        Ok(ws)
    }

    /// [`Self::take_workspace`] with the fused backward's planes (c, d) grown as well.
    fn take_workspace_fused(&self, rows: usize) -> Result<Workspace<T>, BcaError> {
        let s = self.shape;
        let mut ws = self.take_workspace(rows)?;
        let len = mul(mul(rows, s.q_in.max(s.q_out), "x")?, self.f_pad, "x")?;
        let grown = [&mut ws.c_re, &mut ws.c_im, &mut ws.d_re, &mut ws.d_im]
            .into_iter()
            .try_for_each(|v| v.try_grow(len, T::zero(), "an FFT workspace"));
        match grown {
            Ok(()) => Ok(ws),
            Err(e) => {
                self.give_back_workspace(ws);
                Err(e)
            }
        }
    }

    fn give_back_workspace(&self, ws: Workspace<T>) {
        self.workspaces.give_back(ws);
    }

    /// A pool when the work is worth splitting, else `None` (run on the caller's thread).
    fn parallel_pool(&self, n_rows: usize) -> Option<threads::Parallel> {
        let threads = match self.num_threads() {
            0 => threads::default_num_threads(),
            n => n,
        };
        let work = n_rows.saturating_mul(self.kernel.len());
        if threads <= 1 || n_rows <= 1 || work < PARALLEL_MIN_WORK {
            return None;
        }
        threads::parallel(threads)
    }

    fn rows_per_chunk(n_rows: usize, pool: &Option<threads::Parallel>) -> usize {
        let threads = pool.as_ref().map_or(1, threads::Parallel::threads);
        n_rows.div_ceil(threads).clamp(1, MAX_ROWS_PER_CHUNK)
    }

    /// Spectra of the rows of `src` (row width `d`, `q` blocks) into planes: one packed
    /// group per row (`by_row` false) or the chunk's row-transposed layout (`by_row` true).
    /// `also`, when given, gets the same spectra in the row-transposed layout, written from
    /// the same tiles while they are in L1 (the packed planes for the input gradient and
    /// the transposed ones for the kernel gradient, without a second pass).
    #[allow(clippy::too_many_arguments)]
    fn rows_to_spectra<'r>(
        &self,
        src: impl ExactSizeIterator<Item = &'r [T]>,
        q: usize,
        (re, im): (&mut [T], &mut [T]),
        by_row: bool,
        arg: &'static str,
        ws: &mut Workspace<T>,
        mut also: Option<(&mut [T], &mut [T])>,
    ) -> Result<(), BcaError> {
        let (p, f_pad) = (self.shape.p, self.f_pad);
        let rows = src.len();
        // Consecutive tiles of LANES frequencies of one spectrum are `tile_stride` apart.
        let tile_stride = if by_row { q * rows } else { q } * simd::LANES;
        let by_row_stride = q * rows * simd::LANES;
        for (r, row) in src.enumerate() {
            let d = row.len();
            for j in 0..q {
                let lo = j * p;
                let hi = (lo + p).min(d);
                let block = &row[lo..hi];
                let first = if by_row {
                    simd::packed_by_row(q, rows, r, j, 0)
                } else {
                    r * q * f_pad + simd::packed(q, j, 0)
                };
                let first_by_row = simd::packed_by_row(q, rows, r, j, 0);
                // NaN/Inf are found while the block is copied, not in a separate pass.
                let finite = self.fft.forward(block, &mut ws.fft, |t, tr, ti| {
                    let at = first + t * tile_stride;
                    re[at..at + simd::LANES].copy_from_slice(tr);
                    im[at..at + simd::LANES].copy_from_slice(ti);
                    if let Some((are, aim)) = also.as_mut() {
                        let at = first_by_row + t * by_row_stride;
                        are[at..at + simd::LANES].copy_from_slice(tr);
                        aim[at..at + simd::LANES].copy_from_slice(ti);
                    }
                })?;
                if !finite {
                    return Err(BcaError::NonFinite { arg });
                }
            }
        }
        Ok(())
    }

    /// Inverse transform of `q` spectra (F each) into one row of `dst` (width `d`), / p.
    fn spectra_to_row(
        &self,
        (re, im): (&[T], &[T]),
        q: usize,
        dst: &mut [T],
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        // The kernel spectra carry the inverse transform's 1/p (see `with_kernel`).
        let p = self.shape.p;
        let d = dst.len();
        const L: usize = simd::LANES;
        for i in 0..q {
            let first = simd::packed(q, i, 0);
            let lo = i * p;
            let hi = (lo + p).min(d);
            self.fft.inverse(
                |t| {
                    let at = first + t * q * L;
                    (&re[at..at + L], &im[at..at + L])
                },
                &mut dst[lo..hi],
                &mut ws.fft,
            )?;
        }
        Ok(())
    }

    /// Rows whose spectra are `src` (rows, q_a, F) → rows of `dst` (width `d_b`) through
    /// one orientation of the kernel spectra.
    fn product_to_rows<'r>(
        &self,
        src: (&[T], &[T]),
        spectra: &Spectra<T>,
        dst: impl ExactSizeIterator<Item = &'r mut [T]>,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError>
    where
        T: 'r,
    {
        let f_pad = self.f_pad;
        let rows = dst.len();
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
            spectra.last(),
        );
        let row_b = spectra.q_b * f_pad;
        let result = dst.enumerate().try_for_each(|(r, row)| {
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

    /// One chunk of rows (at most a workspace's worth): each row of `src` (width d_a) →
    /// the matching row of `dst` (width d_b). The rows need not be contiguous.
    fn apply_chunk<'r>(
        &self,
        arg: &'static str,
        src: impl ExactSizeIterator<Item = &'r [T]>,
        spectra: &Spectra<T>,
        dst: impl ExactSizeIterator<Item = &'r mut [T]>,
    ) -> Result<(), BcaError>
    where
        T: 'r,
    {
        let rows = src.len();
        debug_assert_eq!(rows, dst.len());
        if spectra.q_a == 1 && spectra.q_b == 1 {
            return self.apply_chunk_single(arg, src, spectra, dst);
        }
        let n_a = rows * spectra.q_a * self.f_pad;
        let mut ws = self.take_workspace(rows)?;
        let mut a_re = std::mem::take(&mut ws.a_re);
        let mut a_im = std::mem::take(&mut ws.a_im);
        let result = self
            .rows_to_spectra(
                src,
                spectra.q_a,
                (&mut a_re[..n_a], &mut a_im[..n_a]),
                false,
                arg,
                &mut ws,
                None,
            )
            .and_then(|()| {
                self.product_to_rows((&a_re[..n_a], &a_im[..n_a]), spectra, dst, &mut ws)
            });
        ws.a_re = a_re;
        ws.a_im = a_im;
        self.give_back_workspace(ws);
        result
    }

    /// `apply_chunk` for a single block (q_in = q_out = 1, e.g. p = d): row by row, the
    /// FFT, the product with the kernel spectrum (`single_product`: the operations of
    /// `block_product`, so the same results bit for bit) and the inverse FFT into the
    /// output row, all on one row's spectrum while it is in L1: no batch planes.
    fn apply_chunk_single<'r>(
        &self,
        arg: &'static str,
        src: impl ExactSizeIterator<Item = &'r [T]>,
        spectra: &Spectra<T>,
        dst: impl ExactSizeIterator<Item = &'r mut [T]>,
    ) -> Result<(), BcaError>
    where
        T: 'r,
    {
        const L: usize = simd::LANES;
        let f_pad = self.f_pad;
        let mut ws = self.take_workspace(1)?;
        let mut x_re = std::mem::take(&mut ws.a_re);
        let mut x_im = std::mem::take(&mut ws.a_im);
        let mut y_re = std::mem::take(&mut ws.b_re);
        let mut y_im = std::mem::take(&mut ws.b_im);
        let (p, fused) = (self.shape.p, self.fft.can_convolve());
        let result = src.zip(dst).try_for_each(|(row, out)| {
            if fused && row.len() == p && out.len() == p {
                // the same operations in one pass between the complex FFTs
                let s = (&spectra.re[..f_pad], &spectra.im[..f_pad]);
                return match self.fft.convolve_block(row, s, out, &mut ws.fft)? {
                    true => Ok(()),
                    false => Err(BcaError::NonFinite { arg }),
                };
            }
            let (xr, xi) = (&mut x_re[..f_pad], &mut x_im[..f_pad]);
            let finite = self.fft.forward(row, &mut ws.fft, |t, tr, ti| {
                xr[t * L..(t + 1) * L].copy_from_slice(tr);
                xi[t * L..(t + 1) * L].copy_from_slice(ti);
            })?;
            if !finite {
                return Err(BcaError::NonFinite { arg });
            }
            let (yr, yi) = (&mut y_re[..f_pad], &mut y_im[..f_pad]);
            simd::single_product(
                (&*xr, &*xi),
                (&spectra.re[..f_pad], &spectra.im[..f_pad]),
                (&mut *yr, &mut *yi),
            );
            self.fft.inverse(
                |t| (&yr[t * L..(t + 1) * L], &yi[t * L..(t + 1) * L]),
                out,
                &mut ws.fft,
            )
        });
        ws.a_re = x_re;
        ws.a_im = x_im;
        ws.b_re = y_re;
        ws.b_im = y_im;
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
            self.apply_chunk(arg, s.chunks_exact(d_a), spectra, d.chunks_exact_mut(d_b))
        };
        match pool {
            Some(pool) => pool.try_for_each(
                src.chunks(rows * d_a)
                    .zip(dst.chunks_mut(rows * d_b))
                    .collect(),
                work,
            ),
            None => src
                .chunks(rows * d_a)
                .zip(dst.chunks_mut(rows * d_b))
                .try_for_each(work),
        }
    }

    /// ΔW x (`transposed` false: rows of width in_features → out_features) or ΔWᵀ g
    /// (`transposed` true: out_features → in_features) for the rows `rows` of `src`
    /// (n × d_a, row-major) into `dst[k]` for the k-th of them, on the calling thread,
    /// through this operator's spectra and workspaces: rows are read and written where
    /// they are, never gathered. NaN/Inf are refused per block (naming x or
    /// grad_output). For `mixed.rs`, which runs row groups of several operators in
    /// parallel itself.
    pub(crate) fn apply_indexed(
        &self,
        transposed: bool,
        src: &[T],
        rows: &[usize],
        dst: &mut [&mut [T]],
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (spectra, d_a, d_b, arg) = match transposed {
            false => (&self.fwd, s.in_features, s.out_features, "x"),
            true => (&self.bwd, s.out_features, s.in_features, "grad_output"),
        };
        if rows.len() != dst.len() {
            return Err(BcaError::invalid(
                "dst",
                "one output row per input row is needed",
            ));
        }
        let n_src = src.len() / d_a;
        Self::check_len("src", src, n_src, d_a)?;
        if let Some(&r) = rows.iter().find(|&&r| r >= n_src) {
            return Err(BcaError::invalid(
                "rows",
                format!("row {r} is out of range"),
            ));
        }
        if dst.iter().any(|row| row.len() != d_b) {
            return Err(BcaError::invalid(
                "dst",
                format!("rows of {d_b} values expected"),
            ));
        }
        rows.chunks(MAX_ROWS_PER_CHUNK)
            .zip(dst.chunks_mut(MAX_ROWS_PER_CHUNK))
            .try_for_each(|(rs, ds)| {
                self.apply_chunk(
                    arg,
                    rs.iter().map(|&r| &src[r * d_a..(r + 1) * d_a]),
                    spectra,
                    ds.iter_mut().map(|row| &mut **row),
                )
            })
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
        // NaN/Inf in x or grad_output: found per block while the spectra are taken.
        grad_kernel.fill(T::zero());
        if n_rows == 0 {
            return Ok(());
        }
        match self.fused_backward(n_rows) {
            true => self.backward_fused(x, grad_output, n_rows, grad_x, grad_kernel),
            false => self.backward_two_pass(x, grad_output, n_rows, grad_x, grad_kernel),
        }
    }

    /// `backward` in two passes over blocks of rows, for kernels whose partial sums would
    /// not fit a core's cache (see [`Self::backward_fused`] for the others): pass 1 takes
    /// the spectra of the block's rows into batch planes (and the input gradient), pass 2
    /// sums them per tile of frequencies, each task keeping its slab of the sums in cache.
    /// `grad_kernel` is zero and `n_rows` positive.
    fn backward_two_pass(
        &self,
        x: &[T],
        grad_output: &[T],
        n_rows: usize,
        grad_x: Option<&mut [T]>,
        grad_kernel: &mut [T],
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out, q_in, q_out) = (s.in_features, s.out_features, s.q_in, s.q_out);
        let f_pad = self.f_pad;
        let (row_x, row_g) = (q_in * f_pad, q_out * f_pad);
        let pool = self.parallel_pool(n_rows);
        let rows = Self::rows_per_chunk(n_rows, &pool);
        // Rows go through passes 1 and 2 in blocks whose spectra fit BACKWARD_BLOCK_BYTES,
        // so the batch buffers are bounded (and reused from the shared scratch pool),
        // whatever the batch size. Sums over rows still run in row order.
        let per_row = (row_x + row_g) * 2 * std::mem::size_of::<T>();
        // A block holds whole rounds of chunks (one per thread) where it can: with a
        // partial round, threads idle through pass 1 while the others do the last chunks.
        let fit = BACKWARD_BLOCK_BYTES / per_row.max(1);
        let round = rows * pool.as_ref().map_or(1, threads::Parallel::threads);
        let block_rows = match fit >= round {
            true => fit / round * round,
            false => (fit / rows).max(1) * rows,
        };
        let block_rows = block_rows.min(n_rows);
        let what = "the batch spectra of backward";
        let (len_x, len_g) = (mul(block_rows, row_x, "x")?, mul(block_rows, row_g, "x")?);
        let mut planes = [
            take_scratch(len_x, T::zero(), colour::BACKWARD_X[0], what)?,
            take_scratch(len_x, T::zero(), colour::BACKWARD_X[1], what)?,
            take_scratch(len_g, T::zero(), colour::BACKWARD_G[0], what)?,
            take_scratch(len_g, T::zero(), colour::BACKWARD_G[1], what)?,
        ];
        let zero = <T::Acc as num_traits::Zero>::zero();
        let len_k = f_pad * q_out * q_in; // checked in `new`
        let what = "the kernel-gradient spectra";
        let mut k_planes = [
            take_scratch(len_k, zero, colour::KERNEL_GRAD[0], what)?,
            take_scratch(len_k, zero, colour::KERNEL_GRAD[1], what)?,
        ];
        let result = (|| {
            let [x_re, x_im, g_re, g_im] = &mut planes;
            let [k_re, k_im] = &mut k_planes;
            let (k_re, k_im) = (&mut k_re[..len_k], &mut k_im[..len_k]);
            k_re.fill(zero);
            k_im.fill(zero);
            let mut gx_rest = grad_x;
            let mut b0 = 0;
            while b0 < n_rows {
                let nb = block_rows.min(n_rows - b0);
                let gx_block = match gx_rest.take() {
                    Some(gx) => {
                        let (head, tail) = gx.split_at_mut(nb * d_in);
                        gx_rest = Some(tail);
                        Some(head)
                    }
                    None => None,
                };
                let block_planes = (
                    (&mut x_re[..nb * row_x], &mut x_im[..nb * row_x]),
                    (&mut g_re[..nb * row_g], &mut g_im[..nb * row_g]),
                );
                self.backward_block(
                    &x[b0 * d_in..(b0 + nb) * d_in],
                    &grad_output[b0 * d_out..(b0 + nb) * d_out],
                    gx_block,
                    block_planes,
                    (&mut *k_re, &mut *k_im),
                    rows,
                    &pool,
                )?;
                b0 += nb;
            }
            self.kernel_grad_from_spectra((k_re, k_im), grad_kernel, &pool)
        })();
        for v in planes {
            give_scratch(v);
        }
        for v in k_planes {
            give_scratch(v);
        }
        result
    }

    /// Pass 1 of `backward` for one chunk of rows (`x`, `grad_output`), on the calling
    /// thread: x's spectra in the row-transposed layout (`xs`), grad_output's packed (`ga`,
    /// for the input gradient) and row-transposed (`gs`, for the kernel gradient) from the
    /// same tiles, and, when asked for, the chunk's input gradient (`grad_x`) from `ga`.
    fn chunk_spectra(
        &self,
        (x, grad_output): (&[T], &[T]),
        xs: simd::PlanesMut<'_, T>,
        gs: simd::PlanesMut<'_, T>,
        (ga_re, ga_im): simd::PlanesMut<'_, T>,
        grad_x: Option<&mut [T]>,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out) = (s.in_features, s.out_features);
        self.rows_to_spectra(x.chunks_exact(d_in), s.q_in, xs, true, "x", ws, None)?;
        let ga = (&mut *ga_re, &mut *ga_im);
        let g_rows = grad_output.chunks_exact(d_out);
        self.rows_to_spectra(g_rows, s.q_out, ga, false, "grad_output", ws, Some(gs))?;
        match grad_x {
            Some(gx) => {
                let rows = gx.chunks_exact_mut(d_in);
                self.product_to_rows((&*ga_re, &*ga_im), &self.bwd, rows, ws)
            }
            None => Ok(()),
        }
    }

    /// Bytes of one copy of the kernel-gradient sums (float64 planes, re and im).
    fn kernel_sum_bytes(&self) -> usize {
        let s = self.shape;
        self.f_pad * s.q_out * s.q_in * 2 * std::mem::size_of::<T::Acc>() // checked in `new`
    }

    /// Rows per group of the fused backward: a multiple of [`MAX_ROWS_PER_CHUNK`] whose
    /// spectra outweigh the group's partial sums about eight times, so that clearing and
    /// adding up the partials costs little (four times ran backward 5-7% slower at
    /// d = 768 and 4096, p = 256). It depends on the shape only (never on the
    /// thread count), and so do the sums.
    fn fused_group_rows(&self) -> usize {
        let s = self.shape;
        let k_bytes = self.kernel_sum_bytes();
        let row_bytes = (s.q_in + s.q_out) * self.f_pad * 2 * std::mem::size_of::<T>();
        let c = MAX_ROWS_PER_CHUNK;
        ((8 * k_bytes).div_ceil(row_bytes.max(1)).div_ceil(c) * c).max(c)
    }

    /// Whether `backward` takes the fused path for `n_rows` rows: when the partial sums
    /// fit a core's cache and the batch makes at least [`FUSED_MIN_GROUPS`] groups to
    /// share among threads (fewer, and the two-pass path, which splits the sums by
    /// frequency, kept more threads busy: at d = 4096, p = 256, 32 and 128 rows ran 3-13%
    /// slower fused). Shape and batch size decide, never the thread count.
    fn fused_backward(&self, n_rows: usize) -> bool {
        self.kernel_sum_bytes() <= FUSED_MAX_K_BYTES
            && n_rows >= FUSED_MIN_GROUPS * self.fused_group_rows()
    }

    /// `backward` with the kernel-gradient sums fused into the pass that takes the
    /// spectra, for kernels whose partial sums fit a core's cache. `grad_kernel` is zero
    /// and `n_rows` positive.
    ///
    /// Rows go in groups of [`Self::fused_group_rows`]; one task per group takes, chunk by
    /// chunk, the spectra of x and grad_output, the input gradient, and the group's
    /// partial kernel-gradient sums (rows in order, float64 for float32), all while the
    /// chunk's spectra are in its core's cache. The partial sums are then added up in
    /// group order. The two-pass path instead wrote every row's spectra to batch planes
    /// and read them back per frequency tile on another core: at d = 768 that pass was
    /// bound by moving the planes between caches (1 and 2 threads took as long).
    fn backward_fused(
        &self,
        x: &[T],
        grad_output: &[T],
        n_rows: usize,
        grad_x: Option<&mut [T]>,
        grad_kernel: &mut [T],
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out) = (s.in_features, s.out_features);
        let len_k = self.f_pad * s.q_out * s.q_in;
        let group = self.fused_group_rows();
        let n_groups = n_rows.div_ceil(group);
        let pool = self.parallel_pool(n_rows);
        let threads = pool.as_ref().map_or(1, threads::Parallel::threads);
        let partial_bytes = self.kernel_sum_bytes();
        // Groups per wave: whole rounds of threads within the byte budget, spread evenly
        // over the waves (a last wave of one group would leave the other threads idle).
        let most = (FUSED_WAVE_BYTES / partial_bytes.max(1) / threads * threads).max(threads);
        let per_wave = n_groups.div_ceil(n_groups.div_ceil(most));
        let wave = per_wave.div_ceil(threads) * threads;
        let wave = wave.min(most).min(n_groups).max(1);
        let zero = <T::Acc as num_traits::Zero>::zero();
        let what = "the kernel-gradient spectra";
        let len_p = mul(wave, len_k, "x")?;
        let mut planes = [
            take_scratch(len_k, zero, colour::KERNEL_GRAD[0], what)?,
            take_scratch(len_k, zero, colour::KERNEL_GRAD[1], what)?,
            take_scratch(len_p, zero, colour::BACKWARD_X[0], what)?,
            take_scratch(len_p, zero, colour::BACKWARD_G[0], what)?,
        ];
        let result = (|| {
            let [k_re, k_im, p_re, p_im] = &mut planes;
            let (k_re, k_im) = (&mut k_re[..len_k], &mut k_im[..len_k]);
            k_re.fill(zero);
            k_im.fill(zero);
            let mut gx_rest = grad_x;
            let mut g0 = 0;
            while g0 < n_groups {
                let ng = wave.min(n_groups - g0);
                let (r0, r1) = (g0 * group, ((g0 + ng) * group).min(n_rows));
                let gx_groups: Vec<Option<&mut [T]>> = match gx_rest.take() {
                    Some(gx) => {
                        let (head, tail) = gx.split_at_mut((r1 - r0) * d_in);
                        gx_rest = Some(tail);
                        head.chunks_mut(group * d_in).map(Some).collect()
                    }
                    None => (0..ng).map(|_| None).collect(),
                };
                let items: Vec<_> = x[r0 * d_in..r1 * d_in]
                    .chunks(group * d_in)
                    .zip(grad_output[r0 * d_out..r1 * d_out].chunks(group * d_out))
                    .zip(
                        p_re[..ng * len_k]
                            .chunks_mut(len_k)
                            .zip(p_im[..ng * len_k].chunks_mut(len_k)),
                    )
                    .zip(gx_groups)
                    .map(|(((xg, gg), p), gx)| (xg, gg, p, gx))
                    .collect();
                let work = |(xg, gg, (pr, pi), gx): FusedGroup<'_, T>| -> Result<(), BcaError> {
                    pr.fill(zero);
                    pi.fill(zero);
                    let rows = (gg.len() / d_out).min(FUSED_CHUNK_ROWS);
                    let mut ws = self.take_workspace_fused(rows)?;
                    let r = self.fused_group(xg, gg, (pr, pi), gx, &mut ws);
                    self.give_back_workspace(ws);
                    r
                };
                match &pool {
                    Some(pool) if ng > 1 => pool.try_for_each(items, work)?,
                    _ => items.into_iter().try_for_each(work)?,
                }
                // Σ over groups, in group order: the same sums whatever the thread count.
                let (p_re, p_im) = (&p_re[..ng * len_k], &p_im[..ng * len_k]);
                let add = |(at, (kr, ki)): (usize, simd::PlanesMut<'_, T::Acc>)| {
                    let n = kr.len();
                    for g in 0..ng {
                        let o = g * len_k + at;
                        for (k, p) in kr.iter_mut().zip(&p_re[o..o + n]) {
                            *k = *k + *p;
                        }
                        for (k, p) in ki.iter_mut().zip(&p_im[o..o + n]) {
                            *k = *k + *p;
                        }
                    }
                };
                // Slices of the sums, as many as there are threads (whole cache lines).
                let piece = len_k.div_ceil(threads).div_ceil(simd::LANES) * simd::LANES;
                let pieces = k_re
                    .chunks_mut(piece)
                    .zip(k_im.chunks_mut(piece))
                    .enumerate()
                    .map(|(i, p)| (i * piece, p));
                match &pool {
                    Some(pool) if ng * partial_bytes >= FUSED_MAX_K_BYTES => {
                        pool.for_each(pieces.collect(), add)
                    }
                    _ => pieces.for_each(add),
                }
                g0 += ng;
            }
            self.kernel_grad_from_spectra((k_re, k_im), grad_kernel, &pool)
        })();
        for v in planes {
            give_scratch(v);
        }
        result
    }

    /// One group of the fused backward, chunk by chunk on the calling thread: spectra of
    /// x (row-transposed) and grad_output (packed and row-transposed), the group's partial
    /// kernel-gradient sums `k` (rows in order) and, when asked for, the input gradient.
    fn fused_group(
        &self,
        x: &[T],
        grad_output: &[T],
        (k_re, k_im): simd::PlanesMut<'_, T::Acc>,
        mut grad_x: Option<&mut [T]>,
        ws: &mut Workspace<T>,
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out, q_in, q_out) = (s.in_features, s.out_features, s.q_in, s.q_out);
        let f_pad = self.f_pad;
        let slab = q_out * q_in * simd::LANES;
        let c = FUSED_CHUNK_ROWS;
        let mut a_re = std::mem::take(&mut ws.a_re);
        let mut a_im = std::mem::take(&mut ws.a_im);
        let mut c_re = std::mem::take(&mut ws.c_re);
        let mut c_im = std::mem::take(&mut ws.c_im);
        let mut d_re = std::mem::take(&mut ws.d_re);
        let mut d_im = std::mem::take(&mut ws.d_im);
        let result = x
            .chunks(c * d_in)
            .zip(grad_output.chunks(c * d_out))
            .enumerate()
            .try_for_each(|(i, (xc, gc))| -> Result<(), BcaError> {
                let rows = gc.len() / d_out;
                let (n_x, n_g) = (rows * q_in * f_pad, rows * q_out * f_pad);
                let (xr, xi) = (&mut c_re[..n_x], &mut c_im[..n_x]);
                let (gr, gi) = (&mut d_re[..n_g], &mut d_im[..n_g]);
                let (ar, ai) = (&mut a_re[..n_g], &mut a_im[..n_g]);
                let gx = grad_x
                    .as_deref_mut()
                    .map(|gx| &mut gx[i * c * d_in..i * c * d_in + rows * d_in]);
                self.chunk_spectra(
                    (xc, gc),
                    (&mut *xr, &mut *xi),
                    (&mut *gr, &mut *gi),
                    (ar, ai),
                    gx,
                    ws,
                )?;
                for (t, (kr, ki)) in k_re.chunks_mut(slab).zip(k_im.chunks_mut(slab)).enumerate() {
                    simd::accumulate_kernel_grad(
                        q_out,
                        q_in,
                        rows,
                        t * simd::LANES,
                        (&*gr, &*gi),
                        (&*xr, &*xi),
                        (kr, ki),
                        self.compact_tile(t),
                    );
                }
                Ok(())
            });
        ws.a_re = a_re;
        ws.a_im = a_im;
        ws.c_re = c_re;
        ws.c_im = c_im;
        ws.d_re = d_re;
        ws.d_im = d_im;
        result
    }

    /// Passes 1 and 2 of `backward` for one block of rows: the spectra of x and
    /// grad_output, the input gradient, and the kernel-gradient spectra accumulated into
    /// `k` (rows in order).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn backward_block(
        &self,
        x: &[T],
        grad_output: &[T],
        grad_x: Option<&mut [T]>,
        ((x_re, x_im), (g_re, g_im)): ((&mut [T], &mut [T]), (&mut [T], &mut [T])),
        (k_re, k_im): (&mut [T::Acc], &mut [T::Acc]),
        rows: usize,
        pool: &Option<threads::Parallel>,
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (d_in, d_out, q_in, q_out) = (s.in_features, s.out_features, s.q_in, s.q_out);
        let f_pad = self.f_pad;
        let (row_x, row_g) = (q_in * f_pad, q_out * f_pad);
        let n_rows = grad_output.len() / d_out;
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
                let mut ws = self.take_workspace(chunk_rows)?;
                let mut a_re = std::mem::take(&mut ws.a_re);
                let mut a_im = std::mem::take(&mut ws.a_im);
                let n_g = chunk_rows * row_g;
                let r = self.chunk_spectra(
                    (xc, gc),
                    (xr, xi),
                    (gr, gi),
                    (&mut a_re[..n_g], &mut a_im[..n_g]),
                    gx.as_deref_mut(),
                    &mut ws,
                );
                ws.a_re = a_re;
                ws.a_im = a_im;
                self.give_back_workspace(ws);
                r
            };
            match pool {
                Some(pool) => pool.try_for_each(items, work)?,
                None => items.into_iter().try_for_each(work)?,
            }
        }

        // Pass 2, per tile of frequencies (in parallel): K[:, :, tile] = Σ_rows
        // G[r, :, tile]ᵀ ⊙ conj(X[r, :, tile]), chunks and rows in order. Each task keeps its
        // slab of K in cache and reads every row's spectra once.
        let (x_re, x_im, g_re, g_im) = (&*x_re, &*x_im, &*g_re, &*g_im);
        let slab = q_out * q_in * simd::LANES;
        let per_tile = |(t, (kr, ki)): (usize, simd::PlanesMut<'_, T::Acc>)| {
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
                    self.compact_tile(t),
                );
                row0 += chunk;
            }
        };
        match pool {
            Some(pool) if f_pad > simd::LANES => pool.for_each(
                k_re.chunks_mut(slab)
                    .zip(k_im.chunks_mut(slab))
                    .enumerate()
                    .collect(),
                per_tile,
            ),
            _ => k_re
                .chunks_mut(slab)
                .zip(k_im.chunks_mut(slab))
                .enumerate()
                .for_each(per_tile),
        }

        Ok(())
    }

    /// Whether frequency tile `t` is a last tile that holds one frequency, whose
    /// kernel-gradient sums run compact (same bits; see `Spectra`).
    fn compact_tile(&self, t: usize) -> bool {
        compact_last(self.shape.n_freq()) && t + 1 == self.f_pad / simd::LANES
    }

    /// Pass 3 of `backward`: one inverse FFT per kernel block of the accumulated spectra.
    fn kernel_grad_from_spectra(
        &self,
        (k_re, k_im): (&[T::Acc], &[T::Acc]),
        grad_kernel: &mut [T],
        pool: &Option<threads::Parallel>,
    ) -> Result<(), BcaError> {
        let s = self.shape;
        let (q_in, q_out, p) = (s.q_in, s.q_out, s.p);
        let slab = q_out * q_in * simd::LANES;
        // Pass 3, per output block (in parallel): one inverse FFT per kernel block.
        let scale = T::one() / T::from(p).unwrap_or_else(T::one);
        let per_block_row = |(i, out): (usize, &mut [T])| -> Result<(), BcaError> {
            let mut ws = self.take_workspace(0)?;
            let r = out
                .chunks_exact_mut(p)
                .enumerate()
                .try_for_each(|(j, block)| {
                    let (pr, pi) = ws.fft.planes_mut();
                    for (f, (a, b)) in pr.iter_mut().zip(pi.iter_mut()).enumerate() {
                        let at = (f / simd::LANES) * slab
                            + (i * q_in + j) * simd::LANES
                            + f % simd::LANES;
                        *a = T::narrow(k_re[at]);
                        *b = T::narrow(k_im[at]);
                    }
                    self.fft.inverse_contiguous(block, &mut ws.fft)?;
                    for o in block.iter_mut() {
                        *o = *o * scale;
                    }
                    Ok(())
                });
            self.give_back_workspace(ws);
            r
        };
        match &pool {
            Some(pool) if q_out > 1 => pool.try_for_each(
                grad_kernel.chunks_mut(q_in * p).enumerate().collect(),
                per_block_row,
            ),
            _ => grad_kernel
                .chunks_mut(q_in * p)
                .enumerate()
                .try_for_each(per_block_row),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::float::same_bits;
    use crate::testutil::rel_err;

    /// Deterministic values in [-1, 1).
    fn values<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let v = crate::testutil::signal(n, seed);
        v.into_iter().map(|v| T::from(v).unwrap()).collect()
    }

    /// (grad_x, grad_kernel) by the fused or the two-pass path.
    fn grads<T: Float>(
        op: &BlockCirculant<T>,
        fused: bool,
        x: &[T],
        g: &[T],
        n: usize,
    ) -> (Vec<T>, Vec<T>) {
        let s = op.shape();
        let mut gx = vec![T::zero(); n * s.in_features];
        let mut gk = vec![T::zero(); s.kernel_len()];
        match fused {
            true => op.backward_fused(x, g, n, Some(&mut gx), &mut gk),
            false => op.backward_two_pass(x, g, n, Some(&mut gx), &mut gk),
        }
        .unwrap();
        (gx, gk)
    }

    /// The fused backward gives the two-pass path's input gradient bit for bit and its
    /// kernel gradient to rounding, and neither depends on the thread count, including
    /// batches that take several waves of groups and the parallel sum of the partials.
    fn fused_case<T: Float>(tol: f64) {
        // (q_out, q_in, p, in_features, out_features, rows)
        let shapes = [
            (3, 3, 256, 768, 768, 200),    // 13 groups of 16 rows, chunks of 8
            (2, 3, 7, 20, 13, 37),         // odd p, padded on both sides
            (1, 1, 64, 64, 64, 50),        // p = d
            (4, 2, 16, 32, 64, 1),         // one row
            (8, 8, 256, 2048, 2048, 2000), // 32 groups in 2 waves, summed in parallel
        ];
        for (k, &(q_out, q_in, p, d_in, d_out, n)) in shapes.iter().enumerate() {
            let kernel = values::<T>(q_out * q_in * p, 1 + k as u64);
            let op = BlockCirculant::new(&kernel, q_out, q_in, p, Some(d_in), Some(d_out)).unwrap();
            let x = values::<T>(n * d_in, 100 + k as u64);
            let g = values::<T>(n * d_out, 200 + k as u64);
            type Grads<T> = (Vec<T>, Vec<T>);
            let mut seen: Vec<(Grads<T>, Grads<T>)> = Vec::new();
            for threads in [1, 2, 3, 4] {
                op.set_num_threads(threads);
                let fused = grads(&op, true, &x, &g, n);
                let two = grads(&op, false, &x, &g, n);
                assert!(same_bits(&fused.0, &two.0), "grad_x, shape {k}");
                let err = rel_err(&fused.1, &two.1);
                assert!(err <= tol, "grad_kernel differs by {err:e}, shape {k}");
                if let Some((f0, t0)) = seen.first() {
                    let same = |a: &(Vec<T>, Vec<T>), b: &(Vec<T>, Vec<T>)| {
                        same_bits(&a.0, &b.0) && same_bits(&a.1, &b.1)
                    };
                    assert!(same(f0, &fused), "fused, {threads} threads, shape {k}");
                    assert!(same(t0, &two), "two-pass, {threads} threads, shape {k}");
                }
                seen.push((fused, two));
            }
        }
    }

    #[test]
    fn fused_backward_matches_the_two_pass_one_whatever_the_thread_count() {
        fused_case::<f32>(1e-6);
        fused_case::<f64>(1e-13);
    }

    #[test]
    fn fused_groups_and_waves_do_not_depend_on_threads() {
        let kernel = values::<f32>(8 * 8 * 256, 3);
        let op = BlockCirculant::new(&kernel, 8, 8, 256, None, None).unwrap();
        // 8 · partial sums / a row's spectra = 64 rows; fused from 4 groups on
        assert_eq!(op.fused_group_rows(), 64);
        assert!(!op.fused_backward(255) && op.fused_backward(256));
        // p = d: tiny partial sums, groups of one chunk round
        let op = BlockCirculant::new(&values::<f32>(64, 4), 1, 1, 64, None, None).unwrap();
        assert_eq!(op.fused_group_rows(), 16);
        assert!(!op.fused_backward(63) && op.fused_backward(64));
        // partial sums over 1 MiB (d = 4096, p = 64): always two passes
        let op =
            BlockCirculant::new(&values::<f32>(64 * 64 * 64, 5), 64, 64, 64, None, None).unwrap();
        assert!(!op.fused_backward(1 << 20));
    }
}

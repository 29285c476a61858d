//! Mixed-adapter batches: one call in which every row uses its own operator.
//!
//! Given operators ΔW_0, …, ΔW_{K-1} of one geometry (in_features, out_features, p) and
//! an adapter index per row, [`mixed_forward`] computes `y[r] = ΔW_{idx[r]} x[r]`; an
//! index of [`NO_ADAPTER`] (−1) means "no adapter": that row's output (and input
//! gradient) is zero and the row is not read. Any other value outside `0..K` is an error
//! naming `adapter_index`.
//!
//! Cost: the same as one operator on the same rows. Rows are grouped by operator (a
//! stable counting sort, O(rows)), each group is cut into tasks of at most
//! [`MAX_ROWS_PER_TASK`] rows, and each task runs the operator's own chunk kernel on its
//! rows where they lie (one real FFT per input block, the product against that
//! operator's cached spectra, one inverse FFT per output block, written straight into
//! the output rows: `apply_indexed` in operator.rs). Tasks run in parallel; every row's result
//! depends only on its row and its operator, so results are the same bit for bit for
//! any thread count, and equal to that operator's own `forward` of the row.
//!
//! Backward: the input gradient is the same mixed product with each operator's
//! conjugate (transposed) spectra. Kernel gradients are each operator's own `backward`
//! on the gathered rows of that operator (float64 accumulation, as there), zero for an
//! operator without rows; when the input gradient is also asked for, it comes from the
//! same calls (grad_output's spectra are shared).
//!
//! Threads: the thread bound of the first operator (0: the process default); the kernel
//! gradients run each operator's backward with that operator's own bound. Every buffer
//! is allocated fallibly; no input panics.

use crate::alloc::{mul, try_grow, try_vec};
use crate::threads;
use crate::{BcaError, BlockCirculant, Float, Shape};

/// The adapter index that means "no adapter" (the row's output is zero).
pub const NO_ADAPTER: i64 = -1;

/// Most rows in one task (one gather, one run of the operator's chunk kernel).
const MAX_ROWS_PER_TASK: usize = 16;
/// Below this many (rows × kernel elements) a call stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

fn oom(what: &'static str, bytes: usize) -> BcaError {
    BcaError::OutOfMemory { what, bytes }
}

fn describe(s: Shape) -> String {
    format!(
        "in_features={}, out_features={}, block_size={}",
        s.in_features, s.out_features, s.p
    )
}

/// The common geometry of `ops`, or an error naming the first operator that differs.
pub fn mixed_geometry<T: Float>(ops: &[&BlockCirculant<T>]) -> Result<Shape, BcaError> {
    check_operators(ops)
}

fn check_operators<T: Float>(ops: &[&BlockCirculant<T>]) -> Result<Shape, BcaError> {
    let first = ops
        .first()
        .ok_or_else(|| BcaError::invalid("operators", "at least one operator is needed"))?;
    let s = first.shape();
    for (a, op) in ops.iter().enumerate().skip(1) {
        let t = op.shape();
        if t != s {
            return Err(BcaError::invalid(
                "operators",
                format!(
                    "operator {a} has {} but operator 0 has {} (a mixed batch needs one geometry)",
                    describe(t),
                    describe(s)
                ),
            ));
        }
    }
    Ok(s)
}

fn check_len<T>(arg: &'static str, data: &[T], n_rows: usize, d: usize) -> Result<(), BcaError> {
    let want = mul(n_rows, d, arg)?;
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

/// Rows grouped by operator: `order[start[a]..start[a + 1]]` are the rows of operator
/// `a`, ascending.
struct Groups {
    order: Vec<usize>,
    start: Vec<usize>,
}

impl Groups {
    fn new(adapter_index: &[i64], n_ops: usize, n_rows: usize) -> Result<Self, BcaError> {
        if adapter_index.len() != n_rows {
            return Err(BcaError::invalid(
                "adapter_index",
                format!(
                    "expected one index per row ({n_rows}), got {}",
                    adapter_index.len()
                ),
            ));
        }
        let what = "the row groups of a mixed batch";
        let mut start = try_vec(n_ops.saturating_add(1), 0usize, what)?;
        for (r, &a) in adapter_index.iter().enumerate() {
            if a == NO_ADAPTER {
                continue;
            }
            let a = usize::try_from(a)
                .ok()
                .filter(|&a| a < n_ops)
                .ok_or_else(|| {
                    BcaError::invalid(
                        "adapter_index",
                        format!(
                            "adapter_index[{r}] = {a} is out of range: expected {NO_ADAPTER} \
                             (no adapter) or an operator index in 0..{n_ops}"
                        ),
                    )
                })?;
            start[a + 1] += 1;
        }
        for a in 0..n_ops {
            start[a + 1] += start[a];
        }
        let mut order = try_vec(start[n_ops], 0usize, what)?;
        let mut next = try_vec(n_ops, 0usize, what)?;
        next.copy_from_slice(&start[..n_ops]);
        for (r, &a) in adapter_index.iter().enumerate() {
            if let Ok(a) = usize::try_from(a) {
                order[next[a]] = r; // a < n_ops: checked above
                next[a] += 1;
            }
        }
        Ok(Groups { order, start })
    }

    fn rows_of(&self, a: usize) -> &[usize] {
        &self.order[self.start[a]..self.start[a + 1]]
    }

    fn n_active(&self) -> usize {
        self.order.len()
    }
}

/// The pool for a call over `n_active` rows, or `None` (run on the caller's thread).
fn pool_for<T: Float>(
    op: &BlockCirculant<T>,
    n_active: usize,
) -> (Option<threads::Parallel>, usize) {
    let threads = match op.num_threads() {
        0 => threads::default_num_threads(),
        n => n,
    };
    let work = n_active.saturating_mul(op.shape().kernel_len());
    let pool = if threads <= 1 || n_active <= 1 || work < PARALLEL_MIN_WORK {
        None
    } else {
        threads::parallel(threads)
    };
    let used = pool.as_ref().map_or(1, threads::Parallel::threads);
    (pool, n_active.div_ceil(used).clamp(1, MAX_ROWS_PER_TASK))
}

/// Elements per task when [`same_kernels`] compares in parallel.
const COMPARE_CHUNK: usize = 1 << 13;
/// Below this many elements in all, [`same_kernels`] stays on the calling thread.
const PARALLEL_MIN_COMPARE: usize = 1 << 14;

/// For each operator, whether `kernels[a]` holds exactly its kernel (bitwise, as
/// [`BlockCirculant::same_kernel`]). Large comparisons run in chunks on the threads of
/// the first operator's bound (the comparison is read-only: any split gives the same
/// answer). `ops` and `kernels` have one entry each per operator.
pub fn same_kernels<T: Float>(ops: &[&BlockCirculant<T>], kernels: &[&[T]]) -> Vec<bool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let total: usize = kernels.iter().map(|k| k.len()).sum();
    let threads = match ops.first().map_or(0, |op| op.num_threads()) {
        0 => threads::default_num_threads(),
        n => n,
    };
    let pool = match threads > 1 && total >= PARALLEL_MIN_COMPARE {
        true => threads::parallel(threads),
        false => None,
    };
    let Some(pool) = pool else {
        return ops
            .iter()
            .zip(kernels)
            .map(|(op, k)| op.same_kernel(k))
            .collect();
    };
    let differs: Vec<AtomicBool> = ops
        .iter()
        .zip(kernels)
        .map(|(op, k)| AtomicBool::new(op.kernel().len() != k.len()))
        .collect();
    let mut items = Vec::new();
    for (a, k) in kernels.iter().enumerate() {
        if !differs[a].load(Ordering::Relaxed) {
            items.extend((0..k.len()).step_by(COMPARE_CHUNK).map(|start| (a, start)));
        }
    }
    let compare = |(a, start): (usize, usize)| -> Result<(), ()> {
        if differs[a].load(Ordering::Relaxed) {
            return Ok(()); // another chunk already differs
        }
        let end = (start + COMPARE_CHUNK).min(kernels[a].len());
        let ours = &ops[a].kernel()[start..end];
        let theirs = &kernels[a][start..end];
        if !crate::float::same_bits(ours, theirs) {
            differs[a].store(true, Ordering::Relaxed);
        }
        Ok(())
    };
    let _ = pool.try_for_each(items, compare);
    differs.iter().map(|d| !d.load(Ordering::Relaxed)).collect()
}

/// One task: operator `op`, its rows, and the output rows they go to.
type Task<'a, T> = (usize, &'a [usize], Vec<&'a mut [T]>);

/// `dst[r] = op_{idx[r]} src[r]` (forward spectra, or the transposed ones) for every row
/// with an operator, zero for the others. Rows are read and written in place (no gather
/// or scatter copies); NaN/Inf are refused per block by `apply_indexed`, naming x or
/// grad_output.
fn apply_mixed<T: Float>(
    ops: &[&BlockCirculant<T>],
    groups: &Groups,
    transposed: bool,
    src: &[T],
    dst: &mut [T],
    d_b: usize,
    finish: Option<&RowFinish<'_, T>>,
) -> Result<(), BcaError> {
    let n_rows = dst.len() / d_b;
    let n_active = groups.n_active();
    let (pool, chunk) = pool_for(ops[0], n_active);

    // Hand each task the output rows it writes: disjoint `&mut` rows, no unsafe.
    let mut slots: Vec<Option<&mut [T]>> = Vec::new();
    slots.try_reserve_exact(n_rows).map_err(|_| {
        oom(
            "the row table of a mixed batch",
            n_rows.saturating_mul(std::mem::size_of::<Option<&mut [T]>>()),
        )
    })?;
    slots.extend(dst.chunks_exact_mut(d_b).map(Some));
    let n_tasks = n_active.div_ceil(chunk).saturating_add(ops.len());
    let mut tasks: Vec<Task<'_, T>> = Vec::new();
    tasks
        .try_reserve_exact(n_tasks)
        .map_err(|_| oom("the task list of a mixed batch", n_tasks))?;
    for a in 0..ops.len() {
        for rows in groups.rows_of(a).chunks(chunk) {
            let mut outs = Vec::new();
            outs.try_reserve_exact(rows.len())
                .map_err(|_| oom("the task list of a mixed batch", rows.len()))?;
            for &r in rows {
                // Each row is in exactly one group (Groups::new), so its slot is there.
                let row = slots[r].take().ok_or_else(|| {
                    BcaError::invalid("adapter_index", format!("row {r} grouped twice"))
                })?;
                outs.push(row);
            }
            tasks.push((a, rows, outs));
        }
    }
    for (r, slot) in slots.into_iter().enumerate() {
        if let Some(row) = slot {
            row.fill(T::zero()); // rows without an adapter
            if let Some(f) = finish {
                f(r, None, row);
            }
        }
    }

    // Each task reads its rows of `src` and writes its output rows where they are (then
    // finishes them while they are in cache).
    let work = |(a, rows, mut outs): Task<'_, T>| -> Result<(), BcaError> {
        ops[a].apply_indexed(transposed, src, rows, &mut outs)?;
        if let Some(f) = finish {
            for (&r, out) in rows.iter().zip(outs) {
                f(r, Some(a), out);
            }
        }
        Ok(())
    };
    match pool {
        Some(pool) => pool.try_for_each(tasks, work),
        None => tasks.into_iter().try_for_each(work),
    }
}

/// `out[r] = ops[adapter_index[r]] · x[r]` for `n_rows` rows (`x` is n_rows × in_features,
/// `out` n_rows × out_features); rows whose index is [`NO_ADAPTER`] get zeros and are not
/// read. Every operator must have the same geometry.
pub fn mixed_forward<T: Float>(
    ops: &[&BlockCirculant<T>],
    adapter_index: &[i64],
    x: &[T],
    n_rows: usize,
    out: &mut [T],
) -> Result<(), BcaError> {
    mixed_forward_with(ops, adapter_index, x, n_rows, out, None)
}

/// A step applied to each output row of a mixed product once it is written:
/// `finish(r, operator, row)` (`None`: a row without an adapter, zero). It runs on the
/// thread that computed the row, right after it, so the row is still in cache.
pub type RowFinish<'a, T> = dyn Fn(usize, Option<usize>, &mut [T]) + Sync + 'a;

/// [`mixed_forward`], then `finish` on every output row (see [`RowFinish`]); a row's
/// result must depend only on that row, so that results stay the same for any thread
/// count.
pub fn mixed_forward_with<T: Float>(
    ops: &[&BlockCirculant<T>],
    adapter_index: &[i64],
    x: &[T],
    n_rows: usize,
    out: &mut [T],
    finish: Option<&RowFinish<'_, T>>,
) -> Result<(), BcaError> {
    let s = check_operators(ops)?;
    check_len("x", x, n_rows, s.in_features)?;
    check_len("out", out, n_rows, s.out_features)?;
    let groups = Groups::new(adapter_index, ops.len(), n_rows)?;
    if n_rows == 0 {
        return Ok(());
    }
    apply_mixed(ops, &groups, false, x, out, s.out_features, finish)
}

/// Gradients of `sum(grad_output * mixed_forward(x))`: with respect to the input (into
/// `grad_x`, when given: `ΔW_{idx[r]}ᵀ g[r]`, zero for rows without an adapter) and to
/// each operator's kernel (into `grad_kernels[a]`, shape (q_out, q_in, p), when given:
/// summed over the rows of operator `a`, zero when it has none). `x` is needed only for
/// the kernel gradients.
pub fn mixed_backward<T: Float>(
    ops: &[&BlockCirculant<T>],
    adapter_index: &[i64],
    x: Option<&[T]>,
    grad_output: &[T],
    n_rows: usize,
    mut grad_x: Option<&mut [T]>,
    grad_kernels: Option<&mut [&mut [T]]>,
) -> Result<(), BcaError> {
    let s = check_operators(ops)?;
    let (d_in, d_out) = (s.in_features, s.out_features);
    check_len("grad_output", grad_output, n_rows, d_out)?;
    if let Some(gx) = grad_x.as_deref() {
        check_len("grad_x", gx, n_rows, d_in)?;
    }
    let groups = Groups::new(adapter_index, ops.len(), n_rows)?;
    let Some(grad_kernels) = grad_kernels else {
        return match grad_x {
            Some(gx) if n_rows > 0 => apply_mixed(ops, &groups, true, grad_output, gx, d_in, None),
            _ => Ok(()),
        };
    };
    if grad_kernels.len() != ops.len() {
        return Err(BcaError::invalid(
            "grad_kernels",
            format!(
                "expected one per operator ({}), got {}",
                ops.len(),
                grad_kernels.len()
            ),
        ));
    }
    if let Some(a) = grad_kernels
        .iter()
        .position(|gk| gk.len() != s.kernel_len())
    {
        return Err(BcaError::invalid(
            "grad_kernels",
            format!(
                "grad_kernels[{a}]: expected {} values, got {}",
                s.kernel_len(),
                grad_kernels[a].len()
            ),
        ));
    }
    let x = x.ok_or_else(|| BcaError::invalid("x", "needed for the kernel gradients"))?;
    check_len("x", x, n_rows, d_in)?;
    if let Some(gx) = grad_x.as_deref_mut() {
        for (row, &a) in gx.chunks_exact_mut(d_in).zip(adapter_index) {
            if a == NO_ADAPTER {
                row.fill(T::zero());
            }
        }
    }

    // Per operator: its own backward on its gathered rows (buffers reused across
    // operators, sized for the largest group).
    let what = "the gathered rows of a mixed batch";
    let (mut xb, mut gb, mut gxb) = (Vec::new(), Vec::new(), Vec::new());
    for (a, gk) in grad_kernels.iter_mut().enumerate() {
        let rows = groups.rows_of(a);
        let n = rows.len();
        if n == 0 {
            gk.fill(T::zero());
            continue;
        }
        let (len_x, len_g) = (mul(n, d_in, "x")?, mul(n, d_out, "grad_output")?);
        try_grow(&mut xb, len_x, T::zero(), what)?;
        try_grow(&mut gb, len_g, T::zero(), what)?;
        for ((xt, gt), &r) in xb[..len_x]
            .chunks_exact_mut(d_in)
            .zip(gb[..len_g].chunks_exact_mut(d_out))
            .zip(rows)
        {
            xt.copy_from_slice(&x[r * d_in..(r + 1) * d_in]);
            gt.copy_from_slice(&grad_output[r * d_out..(r + 1) * d_out]);
        }
        let gx_rows = match grad_x.is_some() {
            true => {
                try_grow(&mut gxb, len_x, T::zero(), what)?;
                Some(&mut gxb[..len_x])
            }
            false => None,
        };
        ops[a].backward(Some(&xb[..len_x]), &gb[..len_g], n, gx_rows, Some(gk))?;
        if let Some(gx) = grad_x.as_deref_mut() {
            for (from, &r) in gxb[..len_x].chunks_exact(d_in).zip(rows) {
                gx[r * d_in..(r + 1) * d_in].copy_from_slice(from);
            }
        }
    }
    Ok(())
}

//! Fallible allocation. Every buffer whose size depends on the caller's input is
//! allocated here: a size that overflows or memory that cannot be had is an error
//! ([`BcaError::OutOfMemory`]), never an abort of the process.

use crate::BcaError;

/// Bytes of `len` values of `T`, or an error when the size overflows `isize`.
pub(crate) fn bytes_of<T>(len: usize, what: &'static str) -> Result<usize, BcaError> {
    len.checked_mul(std::mem::size_of::<T>().max(1))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or(BcaError::OutOfMemory {
            what,
            bytes: usize::MAX,
        })
}

/// A vector of `len` copies of `value`, allocated fallibly.
pub(crate) fn try_vec<T: Clone>(
    len: usize,
    value: T,
    what: &'static str,
) -> Result<Vec<T>, BcaError> {
    let mut v = Vec::new();
    try_grow(&mut v, len, value, what)?;
    Ok(v)
}

/// Grow `v` to at least `len` elements (new ones are `value`), allocating fallibly.
pub(crate) fn try_grow<T: Clone>(
    v: &mut Vec<T>,
    len: usize,
    value: T,
    what: &'static str,
) -> Result<(), BcaError> {
    if v.len() >= len {
        return Ok(());
    }
    let bytes = bytes_of::<T>(len, what)?;
    v.try_reserve_exact(len - v.len())
        .map_err(|_| BcaError::OutOfMemory { what, bytes })?;
    v.resize(len, value);
    Ok(())
}

/// Check that about `bytes` more bytes can be allocated now, before a call that allocates
/// infallibly (FFT planning): reserve them and give them back. This makes an abort
/// unlikely, not impossible; the sizes involved are a few times the block size.
pub(crate) fn probe(bytes: usize, what: &'static str) -> Result<(), BcaError> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(bytes)
        .map_err(|_| BcaError::OutOfMemory { what, bytes })
}

/// `a · b`, or an error naming `arg` when it overflows.
pub(crate) fn mul(a: usize, b: usize, arg: &'static str) -> Result<usize, BcaError> {
    a.checked_mul(b)
        .ok_or_else(|| BcaError::invalid(arg, format!("size {a} × {b} overflows")))
}

/// Most idle scratch buffers kept process-wide, and the largest one kept.
const MAX_IDLE_SCRATCH: usize = 8;
const MAX_KEPT_SCRATCH_BYTES: usize = 8 << 20;

/// Idle scratch buffers of any element type, shared by every operator: layers run one
/// after another, so one set serves a whole model and memory kept between calls stays
/// bounded (at most `MAX_IDLE_SCRATCH` buffers of at most 8 MiB each) instead of growing
/// with the number of layers. The lock is only ever tried (see operator.rs).
/// Each entry: the buffer's bytes and the buffer (a `Vec<T>`).
type Idle = Vec<(usize, Box<dyn std::any::Any + Send>)>;
static SCRATCH: std::sync::Mutex<Idle> = std::sync::Mutex::new(Vec::new());

fn with_scratch<R>(f: impl FnOnce(&mut Idle) -> R) -> Option<R> {
    try_locked(&SCRATCH, 1, f)
}

/// `f` on what `m` guards, or `None` when the lock stays taken through `tries` attempts
/// (a spin hint between them): the caches' locks are only ever tried, never waited for,
/// so no call waits on another and a child forked while the lock was held goes on. A
/// poisoned lock is used anyway: its holders only push or pop whole entries.
pub(crate) fn try_locked<T, R>(
    m: &std::sync::Mutex<T>,
    tries: usize,
    f: impl FnOnce(&mut T) -> R,
) -> Option<R> {
    for _ in 0..tries {
        match m.try_lock() {
            Ok(mut g) => return Some(f(&mut g)),
            Err(std::sync::TryLockError::Poisoned(p)) => return Some(f(&mut p.into_inner())),
            Err(std::sync::TryLockError::WouldBlock) => std::hint::spin_loop(),
        }
    }
    None
}

/// A scratch vector of at least `len` elements (contents unspecified: old values or
/// `value`), reused from the shared pool when one is idle.
pub(crate) fn take_scratch<T: Clone + Send + 'static>(
    len: usize,
    value: T,
    what: &'static str,
) -> Result<Vec<T>, BcaError> {
    let reused = with_scratch(|idle| {
        let at = idle.iter().position(|(_, b)| b.is::<Vec<T>>())?;
        idle.swap_remove(at).1.downcast::<Vec<T>>().ok()
    })
    .flatten();
    let mut v = reused.map(|b| *b).unwrap_or_default();
    try_grow(&mut v, len, value, what)?;
    Ok(v)
}

/// Return a scratch vector to the shared pool (dropped if the pool is full or busy, or
/// the vector is large).
pub(crate) fn give_scratch<T: Send + 'static>(v: Vec<T>) {
    let bytes = v.capacity().saturating_mul(std::mem::size_of::<T>());
    if bytes > MAX_KEPT_SCRATCH_BYTES {
        return;
    }
    with_scratch(|idle| {
        if idle.len() < MAX_IDLE_SCRATCH {
            idle.push((bytes, Box::new(v)));
        }
    });
}

/// Free every idle shared scratch buffer; the bytes freed (0 when the pool is busy).
#[cfg_attr(not(feature = "python"), allow(dead_code))]
pub(crate) fn release_scratch() -> usize {
    with_scratch(|idle| {
        let n = idle.iter().map(|(bytes, _)| bytes).sum();
        idle.clear();
        n
    })
    .unwrap_or(0)
}

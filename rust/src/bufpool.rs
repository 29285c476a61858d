//! Reusable memory for the arrays the Python binding returns (outputs and gradients).
//!
//! A training step allocates its output and its input gradient afresh on every call,
//! megabytes each. glibc serves such sizes from fresh `mmap`s or from a heap top it trims
//! again after each free, so every call paid one page fault per 4 KiB of result: at
//! d = 768, N = 512 a forward and backward took 736 faults, a quarter of the step. The
//! binding therefore backs large results with buffers from this pool; when the last
//! Python reference to such an array goes, its buffer comes back here (see python.rs),
//! and the next call of the same size reuses its pages.
//!
//! What the pool keeps while no array uses it is bounded: at most [`MAX_IDLE`] buffers
//! and [`MAX_IDLE_BYTES`] in all, each between [`MIN_POOLED_BYTES`] and
//! [`MAX_POOLED_BYTES`]; the oldest go first. `bca.release_memory()` empties it. Like the
//! other caches the lock is only ever tried: a busy pool means a fresh allocation (or a
//! buffer freed instead of kept), never a wait, and a child forked while another thread
//! held the lock simply allocates afresh.
#![cfg_attr(not(feature = "python"), allow(dead_code))]

use std::alloc::{alloc_zeroed, Layout};
use std::sync::Mutex;

use crate::BcaError;

/// Results smaller than this come from numpy's own allocator (malloc reuses them well).
pub(crate) const MIN_POOLED_BYTES: usize = 256 << 10;
/// Results larger than this are never kept.
pub(crate) const MAX_POOLED_BYTES: usize = 64 << 20;
/// Most buffers kept idle.
pub(crate) const MAX_IDLE: usize = 8;
/// Most bytes kept idle in all.
pub(crate) const MAX_IDLE_BYTES: usize = 128 << 20;

/// Storage of a pooled buffer: 8-byte words, so any float type is aligned in it.
pub(crate) type Words = Vec<u64>;

/// Idle buffers, oldest first.
pub(crate) struct BufferPool {
    idle: Mutex<Vec<Words>>,
}

/// The process-wide pool of the binding.
pub(crate) static OUTPUT_BUFFERS: BufferPool = BufferPool::new();

/// Words needed for `bytes` bytes.
pub(crate) fn words_for(bytes: usize) -> usize {
    bytes.div_ceil(std::mem::size_of::<u64>())
}

/// Whether a result of `bytes` bytes is served by the pool.
pub(crate) fn pooled_size(bytes: usize) -> bool {
    (MIN_POOLED_BYTES..=MAX_POOLED_BYTES).contains(&bytes)
}

fn bytes_of(v: &Words) -> usize {
    v.len() * std::mem::size_of::<u64>()
}

impl BufferPool {
    pub(crate) const fn new() -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
        }
    }

    fn with_idle<R>(&self, f: impl FnOnce(&mut Vec<Words>) -> R) -> Option<R> {
        crate::alloc::try_locked(&self.idle, 1, f)
    }

    /// A buffer of `words` words (at least one): the smallest idle one that holds them and
    /// wastes at most a quarter, else a fresh zeroed one (its pages are mapped when first
    /// written). Contents of a reused buffer are whatever its last array held.
    pub(crate) fn take(&self, words: usize, what: &'static str) -> Result<Words, BcaError> {
        let words = words.max(1);
        let reused = self
            .with_idle(|idle| {
                let slack = words / 4;
                let best = idle
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.len() >= words && v.len() - words <= slack)
                    .min_by_key(|(_, v)| v.len())
                    .map(|(i, _)| i)?;
                Some(idle.remove(best))
            })
            .flatten();
        if let Some(v) = reused {
            return Ok(v);
        }
        let oom = || BcaError::OutOfMemory {
            what,
            bytes: words.saturating_mul(std::mem::size_of::<u64>()),
        };
        let layout = Layout::array::<u64>(words).map_err(|_| oom())?;
        // SAFETY: `layout` has a non-zero size (words ≥ 1); a null result is an
        // allocation failure, reported as an error; otherwise the block holds `words`
        // zeroed (so initialised) u64 values allocated with the global allocator and
        // u64's layout, which is what `Vec::from_raw_parts` requires.
        unsafe {
            let ptr = alloc_zeroed(layout).cast::<u64>();
            if ptr.is_null() {
                return Err(oom());
            }
            Ok(Vec::from_raw_parts(ptr, words, words))
        }
    }

    /// Keep `v` for reuse if its size is pooled and the pool can hold it (the oldest
    /// idle buffers make room), else free it.
    pub(crate) fn give(&self, v: Words) {
        let bytes = bytes_of(&v);
        if !pooled_size(bytes) {
            return;
        }
        let evicted = self.with_idle(|idle| {
            idle.push(v);
            let mut total: usize = idle.iter().map(bytes_of).sum();
            let mut evicted = Vec::new();
            while idle.len() > MAX_IDLE || total > MAX_IDLE_BYTES {
                let old = idle.remove(0);
                total -= bytes_of(&old);
                evicted.push(old);
            }
            evicted
        });
        drop(evicted); // freed outside the lock
    }

    /// Bytes kept idle now (0 when the pool is busy).
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.with_idle(|idle| idle.iter().map(bytes_of).sum())
            .unwrap_or(0)
    }

    /// Free every idle buffer; the bytes freed (0 when the pool is busy).
    pub(crate) fn clear(&self) -> usize {
        let taken = self.with_idle(std::mem::take).unwrap_or_default();
        taken.iter().map(bytes_of).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: usize = MIN_POOLED_BYTES / 8;

    #[test]
    fn a_returned_buffer_is_reused_for_the_same_size() {
        let pool = BufferPool::new();
        let a = pool.take(W, "t").unwrap();
        assert_eq!(a.len(), W);
        assert!(a.iter().all(|&w| w == 0));
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.idle_bytes(), W * 8);
        let b = pool.take(W, "t").unwrap();
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(pool.idle_bytes(), 0);
    }

    #[test]
    fn reuse_wastes_at_most_a_quarter_and_prefers_the_smallest_fit() {
        let pool = BufferPool::new();
        let big = pool.take(2 * W, "t").unwrap();
        let fit = pool.take(W + W / 8, "t").unwrap();
        let (big_ptr, fit_ptr) = (big.as_ptr(), fit.as_ptr());
        pool.give(big);
        pool.give(fit);
        let got = pool.take(W, "t").unwrap();
        assert_eq!(got.as_ptr(), fit_ptr);
        // 2W for W: too wasteful, a fresh buffer
        let fresh = pool.take(W, "t").unwrap();
        assert_ne!(fresh.as_ptr(), big_ptr);
        assert_eq!(fresh.len(), W);
        // too small for 3W
        let other = pool.take(3 * W, "t").unwrap();
        assert_ne!(other.as_ptr(), big_ptr);
        let again = pool.take(2 * W, "t").unwrap();
        assert_eq!(again.as_ptr(), big_ptr);
    }

    #[test]
    fn sizes_outside_the_pooled_range_are_not_kept() {
        let pool = BufferPool::new();
        pool.give(vec![0; W - 1]);
        pool.give(vec![0; MAX_POOLED_BYTES / 8 + 1]);
        assert_eq!(pool.idle_bytes(), 0);
        assert!(!pooled_size(MIN_POOLED_BYTES - 1));
        assert!(pooled_size(MIN_POOLED_BYTES));
        assert!(pooled_size(MAX_POOLED_BYTES));
        assert!(!pooled_size(MAX_POOLED_BYTES + 1));
    }

    #[test]
    fn idle_memory_is_bounded_and_the_oldest_go_first() {
        let pool = BufferPool::new();
        let first = pool.take(W, "t").unwrap();
        let first_ptr = first.as_ptr();
        pool.give(first);
        for _ in 0..MAX_IDLE {
            pool.give(vec![0; W]);
        }
        assert_eq!(pool.idle_bytes(), MAX_IDLE * W * 8);
        // the eight left are the later ones (held here, so no address is reused)
        let left: Vec<Words> = (0..MAX_IDLE).map(|_| pool.take(W, "t").unwrap()).collect();
        assert!(left.iter().all(|v| v.as_ptr() != first_ptr));
        drop(left);
        let big = MAX_POOLED_BYTES / 8;
        for _ in 0..3 {
            pool.give(vec![0; big]);
        }
        assert!(pool.idle_bytes() <= MAX_IDLE_BYTES);
        assert_eq!(pool.clear(), 2 * big * 8);
        assert_eq!(pool.idle_bytes(), 0);
        assert_eq!(pool.clear(), 0);
    }

    #[test]
    fn an_impossible_size_is_an_error_not_an_abort() {
        let pool = BufferPool::new();
        let err = pool.take(usize::MAX / 8, "the output").unwrap_err();
        assert!(matches!(err, BcaError::OutOfMemory { .. }), "{err:?}");
    }

    #[test]
    fn a_busy_pool_allocates_afresh_and_frees() {
        let pool = BufferPool::new();
        pool.give(vec![0; W]);
        let guard = pool.idle.lock().unwrap();
        let fresh = pool.take(W, "t").unwrap();
        pool.give(fresh); // dropped: the pool is busy
        assert_eq!(pool.idle_bytes(), 0); // busy reads as 0
        assert_eq!(pool.clear(), 0);
        drop(guard);
        assert_eq!(pool.idle_bytes(), W * 8);
    }
}

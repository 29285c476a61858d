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

/// Bytes to which [`AVec`] aligns its data: one cache line.
pub(crate) const ALIGN: usize = 64;
/// Colours of [`AVec`]: data offsets of 0, 64, …, 960 bytes past a cache-line boundary.
pub(crate) const COLOURS: usize = 16;

/// A fallibly allocated vector whose data starts on a cache line, `colour` lines past
/// an aligned address. Aligned, SIMD loads of its tiles never straddle two lines; and
/// buffers that a loop reads and writes at the same index get different colours, so
/// that their addresses differ modulo 4096 where the allocator places them alike (large
/// buffers are each a mapping of their own, all at the same page offset); otherwise the
/// loads would seem to depend on the stores at the same page offset ("4K aliasing").
/// With plain `Vec`s the alignment and the page offset of the planes changed from one
/// allocation to the next, and with them the speed of the same operator by up to 10%;
/// aligned without colours, the forward product ran 20% slower at d = 4096 (measured).
pub(crate) struct AVec<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
    colour: usize,
}

/// The colours of the core's buffers by role, in one place so that buffers one loop
/// reads and writes together visibly get different ones (the small FFT scratch buffers
/// reuse some: they live on the heap, not each in a mapping of its own).
pub(crate) mod colour {
    /// A workspace's spectra planes: a_re, a_im, b_re, b_im.
    pub(crate) const WORKSPACE: [usize; 4] = [0, 1, 2, 3];
    /// The kernel spectra (re, im) in the forward and the transposed orientation.
    pub(crate) const SPECTRA_FWD: [usize; 2] = [4, 5];
    pub(crate) const SPECTRA_BWD: [usize; 2] = [6, 7];
    /// backward: x's and grad_output's spectra planes, the kernel-gradient sums.
    pub(crate) const BACKWARD_X: [usize; 2] = [8, 9];
    pub(crate) const BACKWARD_G: [usize; 2] = [10, 11];
    pub(crate) const KERNEL_GRAD: [usize; 2] = [12, 13];
    /// FFT scratch: complex buffer, rustfft scratch, time samples, four split planes.
    pub(crate) const FFT_BUF: usize = 14;
    pub(crate) const FFT_SCRATCH: usize = 15;
    pub(crate) const FFT_TIME: usize = 5;
    pub(crate) const FFT_PLANES: [usize; 4] = [8, 10, 12, 13];
}

impl<T> Default for AVec<T> {
    fn default() -> Self {
        AVec::coloured(0)
    }
}

impl<T> AVec<T> {
    /// An empty vector of colour `colour` (modulo [`COLOURS`]).
    pub(crate) fn coloured(colour: usize) -> Self {
        AVec {
            buf: Vec::new(),
            off: 0,
            len: 0,
            colour: colour % COLOURS,
        }
    }

    /// Offset (in values) of the data of colour `colour` in `buf`.
    fn offset_in(buf: &[T], colour: usize) -> usize {
        let size = std::mem::size_of::<T>().max(1);
        let addr = buf.as_ptr() as usize;
        (((ALIGN - addr % ALIGN) % ALIGN) + colour * ALIGN).div_ceil(size)
    }

    /// Values allocated beyond the data: room for the alignment and any colour.
    fn slack() -> usize {
        (ALIGN * (COLOURS + 1)).div_ceil(std::mem::size_of::<T>().max(1))
    }

    /// Give the vector colour `colour`; its values become unspecified.
    pub(crate) fn recolour(&mut self, colour: usize) {
        let colour = colour % COLOURS;
        if colour != self.colour && !self.buf.is_empty() {
            self.off = Self::offset_in(&self.buf, colour);
        }
        self.colour = colour;
    }
}

impl<T: Clone> AVec<T> {
    /// `len` copies of `value`, of colour `colour`.
    pub(crate) fn try_new(
        len: usize,
        value: T,
        colour: usize,
        what: &'static str,
    ) -> Result<Self, BcaError> {
        let mut v = AVec::coloured(colour);
        v.try_grow(len, value, what)?;
        Ok(v)
    }

    /// Grow to at least `len` values: the old ones are kept, new ones are `value`.
    pub(crate) fn try_grow(
        &mut self,
        len: usize,
        value: T,
        what: &'static str,
    ) -> Result<(), BcaError> {
        if self.len >= len {
            return Ok(());
        }
        let total = len
            .checked_add(Self::slack())
            .ok_or(BcaError::OutOfMemory {
                what,
                bytes: usize::MAX,
            })?;
        let bytes = bytes_of::<T>(total, what)?;
        let mut buf = Vec::new();
        buf.try_reserve_exact(total)
            .map_err(|_| BcaError::OutOfMemory { what, bytes })?;
        let off = Self::offset_in(&buf, self.colour);
        buf.extend_from_slice(&self.buf[self.off..self.off + self.len]);
        buf.resize(total, value);
        // The kept values move to the data's start: rotate them past the padding.
        buf[..off + self.len].rotate_right(off);
        self.buf = buf;
        self.off = off;
        self.len = len;
        Ok(())
    }
}

impl<T> AVec<T> {
    /// Bytes allocated.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.capacity().saturating_mul(std::mem::size_of::<T>())
    }
}

impl<T> std::ops::Deref for AVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for AVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
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
/// Each entry: the buffer's bytes and the buffer (an `AVec<T>`).
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

/// A scratch vector of at least `len` elements and colour `colour` (see [`AVec`];
/// contents unspecified: old values or `value`), reused from the shared pool when one
/// is idle.
pub(crate) fn take_scratch<T: Clone + Send + 'static>(
    len: usize,
    value: T,
    colour: usize,
    what: &'static str,
) -> Result<AVec<T>, BcaError> {
    let reused = with_scratch(|idle| {
        let at = idle.iter().position(|(_, b)| b.is::<AVec<T>>())?;
        idle.swap_remove(at).1.downcast::<AVec<T>>().ok()
    })
    .flatten();
    let mut v = reused.map(|b| *b).unwrap_or_default();
    v.recolour(colour);
    v.try_grow(len, value, what)?;
    Ok(v)
}

/// Return a scratch vector to the shared pool (dropped if the pool is full or busy, or
/// the vector is large).
pub(crate) fn give_scratch<T: Send + 'static>(v: AVec<T>) {
    let bytes = v.bytes();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn page_offset<T>(v: &AVec<T>) -> usize {
        v.as_ptr() as usize % 4096
    }

    #[test]
    fn aligned_vectors_start_on_a_line_at_their_colour_and_keep_values_when_grown() {
        for colour in 0..COLOURS {
            let mut v = AVec::try_new(37, 1.5f32, colour, "a test").unwrap();
            assert_eq!(v.len(), 37);
            assert_eq!(v.as_ptr() as usize % ALIGN, 0);
            assert!(v.iter().all(|&x| x == 1.5));
            for (i, x) in v.iter_mut().enumerate() {
                *x = i as f32;
            }
            v.try_grow(100_000, -1.0, "a test").unwrap();
            assert_eq!(v.as_ptr() as usize % ALIGN, 0);
            assert_eq!(v.len(), 100_000);
            assert!(v[..37].iter().enumerate().all(|(i, &x)| x == i as f32));
            assert!(v[37..].iter().all(|&x| x == -1.0));
            assert!(v.bytes() >= 100_000 * 4);
            // growing to a smaller size changes nothing
            let at = v.as_ptr();
            v.try_grow(10, 0.0, "a test").unwrap();
            assert_eq!((v.as_ptr(), v.len()), (at, 100_000));
        }
        let c = AVec::try_new(3, num_complex(), 3, "a test").unwrap();
        assert_eq!(c.as_ptr() as usize % ALIGN, 0);
    }

    fn num_complex() -> rustfft::num_complex::Complex<f64> {
        rustfft::num_complex::Complex::new(1.0, 2.0)
    }

    #[test]
    fn large_vectors_of_different_colours_differ_modulo_a_page() {
        // Large buffers are mappings of their own at one page offset: the colours are
        // what tells them apart modulo 4096.
        let len = 1 << 20;
        let vs: Vec<AVec<f32>> = (0..COLOURS)
            .map(|c| AVec::try_new(len, 0.0, c, "a test").unwrap())
            .collect();
        let mut offsets: Vec<usize> = vs.iter().map(page_offset).collect();
        offsets.sort_unstable();
        offsets.dedup();
        assert_eq!(offsets.len(), COLOURS, "{offsets:?}");
    }

    #[test]
    fn recolouring_moves_the_data_start_and_keeps_the_length() {
        let mut v = AVec::try_new(1 << 20, 0u8, 0, "a test").unwrap();
        let o0 = page_offset(&v);
        v.recolour(5);
        assert_eq!(v.len(), 1 << 20);
        assert_eq!(v.as_ptr() as usize % ALIGN, 0);
        assert_eq!((page_offset(&v) + 4096 - o0) % 4096, 5 * ALIGN);
        v[(1 << 20) - 1] = 7; // the whole length is still inside the allocation
        let e: AVec<u8> = AVec::default();
        assert!(e.is_empty());
    }

    #[test]
    fn impossible_sizes_are_errors() {
        assert!(AVec::try_new(usize::MAX, 0u64, 0, "a test").is_err());
        assert!(AVec::try_new(usize::MAX / 8 - 4, 0u64, 0, "a test").is_err());
    }
}

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

//! bca core: blockwise circulant products and their gradients with real FFTs.
//!
//! A block circulant matrix ΔW (d_out × d_in) is a grid of q_out × q_in blocks of size
//! p × p, block (i, j) being `circulant(C[i, j])` (first column `C[i, j]`). The kernel
//! `C` has shape (q_out, q_in, p). When p does not divide d_in or d_out, the input is
//! zero-padded and the output cut: ΔW is the top-left d_out × d_in corner of the padded
//! block circulant matrix.
//!
//! This crate holds the math in plain Rust; `python.rs` (feature `python`) is the only
//! place that knows about Python.

mod alloc;
mod bufpool;
mod error;
mod float;
mod mixed;
#[cfg(target_os = "linux")]
mod openmp;
mod operator;
mod rfft;
#[cfg(target_arch = "x86_64")]
mod rfft_avx2;
mod shape;
mod simd;
mod threads;

pub use error::BcaError;
pub use float::Float;
pub use mixed::{
    mixed_backward, mixed_forward, mixed_forward_with, mixed_geometry, same_kernels, RowFinish,
    NO_ADAPTER,
};
pub use operator::BlockCirculant;
pub use shape::Shape;
pub use threads::{default_num_threads, refresh_env_default, set_default_num_threads};

#[cfg(feature = "python")]
mod python;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testutil {
    use crate::Float;

    /// A deterministic xorshift64 stream.
    pub(crate) fn xorshift(seed: u64) -> impl FnMut() -> u64 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        }
    }

    /// Deterministic values in [-1, 1).
    pub(crate) fn signal(n: usize, seed: u64) -> Vec<f64> {
        let mut next = xorshift(seed);
        (0..n)
            .map(|_| (next() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
            .collect()
    }

    /// ||a - b|| / ||b||, in float64.
    pub(crate) fn rel_err<T: Float>(a: &[T], b: &[T]) -> f64 {
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.to_f64().unwrap_or(0.0), y.to_f64().unwrap_or(0.0));
            num += (x - y) * (x - y);
            den += y * y;
        }
        (num / den.max(1e-300)).sqrt()
    }
}

//! Helpers shared by the integration tests: a seedable generator, the definition of ΔW
//! and the norm-relative comparison.
#![allow(dead_code)] // each test crate uses its own subset

use bca::Float;

/// Small deterministic generator (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in [-1, 1).
    pub fn next(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    pub fn vec<T: Float>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from(self.next()).unwrap()).collect()
    }
}

/// ΔW[r, c] = C[r / p, c / p, (r - c) mod p], straight from the definition.
pub fn dense_entry(k: &[f64], q_in: usize, p: usize, r: usize, c: usize) -> f64 {
    let (i, a, j, b) = (r / p, r % p, c / p, c % p);
    k[(i * q_in + j) * p + (a + p - b) % p]
}

pub fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64().unwrap()).collect()
}

/// ||a - b|| / ||b|| (the plain norm of a - b when b is zero).
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if den == 0.0 {
        num
    } else {
        num / den
    }
}

/// The element types the core computes in: `f32` and `f64`.
pub trait Float: realfft::FftNum + num_traits::Float + Default + Send + Sync + 'static {
    /// Name used in messages ("float32" / "float64").
    const NAME: &'static str;
    /// Wide type for sums over many rows (the kernel gradient): `f64` for both, so that a
    /// float32 product `g · x` is exact and the sum rounds far less than in float32.
    type Acc: Float;
    /// `self` in the wide type (exact).
    fn widen(self) -> Self::Acc;
    /// Round a wide value to `Self` (once).
    fn narrow(a: Self::Acc) -> Self;
    /// The bit pattern, widened to 64 bits (for exact comparisons: -0.0 ≠ 0.0).
    fn bits64(self) -> u64;
}

impl Float for f32 {
    const NAME: &'static str = "float32";
    type Acc = f64;
    #[inline(always)]
    fn widen(self) -> f64 {
        f64::from(self)
    }
    #[inline(always)]
    fn narrow(a: f64) -> f32 {
        a as f32
    }
    #[inline(always)]
    fn bits64(self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Float for f64 {
    const NAME: &'static str = "float64";
    type Acc = f64;
    #[inline(always)]
    fn widen(self) -> f64 {
        self
    }
    #[inline(always)]
    fn narrow(a: f64) -> f64 {
        a
    }
    #[inline(always)]
    fn bits64(self) -> u64 {
        self.to_bits()
    }
}

/// Whether `a` and `b` hold the same bits in every element (so -0.0 and 0.0 differ, and
/// a NaN equals itself); `false` for different lengths. Reads both in chunks without a
/// branch per element, at about memory speed.
pub(crate) fn same_bits<T: Float>(a: &[T], b: &[T]) -> bool {
    const CHUNK: usize = 64;
    a.len() == b.len()
        && a.chunks(CHUNK).zip(b.chunks(CHUNK)).all(|(a, b)| {
            let diff = a
                .iter()
                .zip(b)
                .fold(0u64, |acc, (x, y)| acc | (x.bits64() ^ y.bits64()));
            diff == 0
        })
}

/// The element types the core computes in: `f32` and `f64`.
pub trait Float: realfft::FftNum + num_traits::Float + Default + Send + Sync + 'static {
    /// Name used in messages ("float32" / "float64").
    const NAME: &'static str;
}

impl Float for f32 {
    const NAME: &'static str = "float32";
}

impl Float for f64 {
    const NAME: &'static str = "float64";
}

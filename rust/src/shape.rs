use crate::BcaError;

/// Geometry of a block circulant layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Logical input width d_in (≤ q_in · p).
    pub in_features: usize,
    /// Logical output width d_out (≤ q_out · p).
    pub out_features: usize,
    /// Number of input blocks.
    pub q_in: usize,
    /// Number of output blocks.
    pub q_out: usize,
    /// Block size p.
    pub p: usize,
}

impl Shape {
    /// Build and validate a shape from the kernel's dimensions and the logical widths.
    ///
    /// Each width must satisfy `(q - 1) · p < d ≤ q · p`: padding never fills a whole block.
    pub fn new(
        q_out: usize,
        q_in: usize,
        p: usize,
        in_features: Option<usize>,
        out_features: Option<usize>,
    ) -> Result<Self, BcaError> {
        if p == 0 || q_in == 0 || q_out == 0 {
            return Err(BcaError::invalid(
                "kernel",
                format!(
                    "shape (q_out, q_in, p) = ({q_out}, {q_in}, {p}) must have no zero dimension"
                ),
            ));
        }
        let padded_in = q_in
            .checked_mul(p)
            .ok_or_else(|| BcaError::invalid("kernel", "q_in * p overflows"))?;
        let padded_out = q_out
            .checked_mul(p)
            .ok_or_else(|| BcaError::invalid("kernel", "q_out * p overflows"))?;
        // The kernel must be addressable: q_out · q_in · p values of the widest element.
        q_out
            .checked_mul(padded_in)
            .and_then(|n| n.checked_mul(std::mem::size_of::<f64>()))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| {
                BcaError::invalid(
                    "kernel",
                    format!("shape ({q_out}, {q_in}, {p}) is too large to address"),
                )
            })?;
        let in_features = in_features.unwrap_or(padded_in);
        let out_features = out_features.unwrap_or(padded_out);
        check_width(
            "in_features",
            in_features,
            q_in,
            p,
            "q_in = kernel.shape[1]",
        )?;
        check_width(
            "out_features",
            out_features,
            q_out,
            p,
            "q_out = kernel.shape[0]",
        )?;
        Ok(Shape {
            in_features,
            out_features,
            q_in,
            q_out,
            p,
        })
    }

    /// Number of one-sided frequencies, p / 2 + 1.
    pub fn n_freq(&self) -> usize {
        self.p / 2 + 1
    }

    /// Number of kernel elements, q_out · q_in · p (saturating: a shape built by
    /// [`Shape::new`] never overflows; one built by hand gets `usize::MAX`, which no
    /// slice matches).
    pub fn kernel_len(&self) -> usize {
        self.q_out.saturating_mul(self.q_in).saturating_mul(self.p)
    }
}

fn check_width(
    arg: &'static str,
    d: usize,
    q: usize,
    p: usize,
    what: &str,
) -> Result<(), BcaError> {
    // q · p does not overflow: Shape::new checked it.
    if d == 0 || d > q * p || d <= (q - 1) * p {
        return Err(BcaError::invalid(
            arg,
            format!(
                "{d} does not fit {what} = {q} blocks of size p = {p}: need {} < {arg} <= {}",
                (q - 1) * p,
                q * p
            ),
        ));
    }
    Ok(())
}

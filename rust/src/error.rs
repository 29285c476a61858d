use std::fmt;

/// Every failure of the core. No function of this crate panics or aborts on user input:
/// sizes are computed with checked arithmetic and buffers whose size the caller controls
/// are allocated fallibly (an allocation failure is [`BcaError::OutOfMemory`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BcaError {
    /// An argument has the wrong shape or value; `arg` names it.
    InvalidArgument { arg: &'static str, message: String },
    /// An argument holds NaN or ±Inf.
    NonFinite { arg: &'static str },
    /// A buffer could not be allocated; `what` names it, `bytes` is its size.
    OutOfMemory { what: &'static str, bytes: usize },
    /// The FFT library reported an error (should not happen for finite input).
    Fft(String),
}

impl BcaError {
    pub(crate) fn invalid(arg: &'static str, message: impl Into<String>) -> Self {
        BcaError::InvalidArgument {
            arg,
            message: message.into(),
        }
    }
}

impl fmt::Display for BcaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BcaError::InvalidArgument { arg, message } => write!(f, "{arg}: {message}"),
            BcaError::NonFinite { arg } => write!(f, "{arg}: contains NaN or Inf"),
            BcaError::OutOfMemory { what, bytes } => write!(
                f,
                "cannot allocate {bytes} bytes ({:.3} GiB) for {what}",
                *bytes as f64 / (1u64 << 30) as f64
            ),
            BcaError::Fft(m) => write!(f, "FFT failed: {m}"),
        }
    }
}

impl std::error::Error for BcaError {}

//! A fuzz target for the core's shape handling, on stable Rust: random (often hostile)
//! shapes, widths, row counts, slice lengths, thread counts and values go through
//! `BlockCirculant::new`, `forward`, `backward`, `to_dense` and `set_kernel`. Every call
//! must either return an error or a result equal to a direct (no FFT) float64 evaluation;
//! a panic is a failure (caught and counted, then the test fails).
//!
//! Short run (in `cargo test`): 20 000 cases. Long run, e.g. 10⁷ cases:
//!
//!     BCA_FUZZ_ITERATIONS=10000000 BCA_FUZZ_SEED=1 \
//!         cargo test --release --test fuzz_core -- --ignored --nocapture

use std::panic::{catch_unwind, AssertUnwindSafe};

use bca::{BcaError, BlockCirculant};

mod common;
use common::{rel_err, Rng};

/// Draws for the fuzz cases, on the shared generator.
trait Draws {
    fn below(&mut self, n: usize) -> usize;
    fn chance(&mut self, percent: usize) -> bool;
    fn dim(&mut self) -> usize;
}

impl Draws for Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    /// A dimension: mostly small, sometimes 0, sometimes enormous.
    fn dim(&mut self) -> usize {
        match self.below(20) {
            0 => 0,
            1 => usize::MAX - self.below(3),
            2 => 1 << (20 + self.below(44)),
            3 => 1,
            _ => 1 + self.below(9),
        }
    }
}

#[derive(Default, Debug)]
struct Counts {
    cases: u64,
    ok: u64,
    errors: u64,
    panics: u64,
    wrong: u64,
}

fn direct_forward(
    k: &[f64],
    q_in: usize,
    p: usize,
    d_in: usize,
    d_out: usize,
    x: &[f64],
) -> Vec<f64> {
    let rows = x.len().checked_div(d_in).unwrap_or(0);
    let mut y = vec![0.0; rows * d_out];
    for n in 0..rows {
        for r in 0..d_out {
            let mut acc = 0.0;
            for c in 0..d_in {
                let (i, a, j, b) = (r / p, r % p, c / p, c % p);
                acc += k[(i * q_in + j) * p + (a + p - b) % p] * x[n * d_in + c];
            }
            y[n * d_out + r] = acc;
        }
    }
    y
}

/// One case: returns Err(description) for a wrong answer.
fn one_case(rng: &mut Rng) -> Result<bool, String> {
    let (q_out, q_in, p) = (rng.dim(), rng.dim(), rng.dim());
    // Logical widths: none, a valid padding, or anything.
    let width = |rng: &mut Rng, q: usize| -> Option<usize> {
        match rng.below(4) {
            0 => None,
            1 => q
                .checked_mul(p)
                .map(|full| full.saturating_sub(rng.below(p.max(1)))),
            2 => Some(rng.dim()),
            _ => Some(rng.below(64)),
        }
    };
    let (w_in, w_out) = (width(rng, q_in), width(rng, q_out));
    let kernel_len = q_out.checked_mul(q_in).and_then(|v| v.checked_mul(p));
    let small = kernel_len.is_some_and(|n| n <= 4096);
    // A kernel slice: the right length when that is small, else something short.
    let len = match kernel_len {
        Some(n) if small && !rng.chance(5) => n,
        _ => rng.below(64),
    };
    let mut kernel: Vec<f64> = (0..len).map(|_| rng.next()).collect();
    if !kernel.is_empty() && rng.chance(3) {
        let at = rng.below(kernel.len());
        kernel[at] = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY][rng.below(3)];
    }
    let op = match BlockCirculant::new(&kernel, q_out, q_in, p, w_in, w_out) {
        Ok(op) => op,
        Err(_) => return Ok(false),
    };
    op.set_num_threads(rng.below(5));
    let s = op.shape();
    let (d_in, d_out) = (s.in_features, s.out_features);
    if d_in * d_out > 1 << 16 {
        return Ok(true); // accepted, too big for the direct evaluation: errors only
    }
    let n = match rng.below(6) {
        0 => 0,
        1 => 1,
        2 => usize::MAX / d_in.max(1) + 1, // the size overflows
        _ => 1 + rng.below(40),
    };
    let n_real = if n > 64 { rng.below(3) } else { n };
    let x_len = if rng.chance(10) {
        rng.below(200)
    } else {
        n_real * d_in
    };
    let mut x: Vec<f64> = (0..x_len).map(|_| rng.next()).collect();
    if !x.is_empty() && rng.chance(3) {
        let at = rng.below(x.len());
        x[at] = f64::NAN;
    }
    let mut y = vec![0.0; n_real * d_out + usize::from(rng.chance(5))];
    let fwd = op.forward(&x, n, &mut y);
    let finite = x.iter().all(|v| v.is_finite());
    match fwd {
        Ok(()) => {
            if n != n_real || x.len() != n * d_in || y.len() != n * d_out || !finite {
                return Err(format!(
                    "forward accepted bad input: n={n} x={} y={}",
                    x.len(),
                    y.len()
                ));
            }
            // Norm-relative 1e-12, with the floor an FFT-based product's rounding error
            // can reach when the output cancels far below its inputs: ~log2(p) · ε ·
            // ||kernel|| · ||x|| (an output of one element that sums to almost zero).
            let want = direct_forward(&kernel, q_in, p, d_in, d_out, &x);
            let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
            let floor = 8.0 * (2.0 * p as f64).log2() * f64::EPSILON * norm(&kernel) * norm(&x);
            let err: Vec<f64> = y.iter().zip(&want).map(|(a, b)| a - b).collect();
            if norm(&err) > 1e-12 * norm(&want) + floor {
                let e = rel_err(&y, &want);
                return Err(format!("forward wrong: rel err {e:e}, shape {s:?}, n {n}"));
            }
        }
        Err(BcaError::InvalidArgument { .. } | BcaError::NonFinite { .. }) => {}
        Err(e) => return Err(format!("forward: unexpected error {e}")),
    }
    // backward with every flag combination; the kernel gradient checked by the identity
    // <gk, k'> = <g, ΔW(k') x> for a random direction k'.
    if n == n_real && x.len() == n * d_in && finite {
        let g: Vec<f64> = (0..n * d_out).map(|_| rng.next()).collect();
        let mut gx = vec![0.0; n * d_in];
        let mut gk = vec![0.0; kernel.len()];
        let (want_x, want_k) = (rng.chance(70), rng.chance(70));
        let xs = if rng.chance(90) { Some(&x[..]) } else { None };
        let r = op.backward(
            xs,
            &g,
            n,
            want_x.then_some(&mut gx[..]),
            want_k.then_some(&mut gk[..]),
        );
        match r {
            Ok(()) => {
                if want_k && xs.is_none() {
                    return Err("backward computed a kernel gradient without x".into());
                }
                if want_x {
                    // <gx, v> = <g, ΔW v>
                    let v: Vec<f64> = (0..n * d_in).map(|_| rng.next()).collect();
                    let wv = direct_forward(&kernel, q_in, p, d_in, d_out, &v);
                    let lhs: f64 = gx.iter().zip(&v).map(|(a, b)| a * b).sum();
                    let rhs: f64 = g.iter().zip(&wv).map(|(a, b)| a * b).sum();
                    if (lhs - rhs).abs() > 1e-9 * (1.0 + rhs.abs()) {
                        return Err(format!("input gradient wrong: {lhs} vs {rhs}, {s:?}"));
                    }
                }
                if want_k {
                    let dk: Vec<f64> = (0..kernel.len()).map(|_| rng.next()).collect();
                    let wx = direct_forward(&dk, q_in, p, d_in, d_out, &x);
                    let lhs: f64 = gk.iter().zip(&dk).map(|(a, b)| a * b).sum();
                    let rhs: f64 = g.iter().zip(&wx).map(|(a, b)| a * b).sum();
                    if (lhs - rhs).abs() > 1e-9 * (1.0 + rhs.abs()) {
                        return Err(format!("kernel gradient wrong: {lhs} vs {rhs}, {s:?}"));
                    }
                }
            }
            Err(BcaError::InvalidArgument { .. }) => {
                if !(want_k && xs.is_none()) {
                    return Err(format!("backward refused valid input: {r:?}"));
                }
            }
            Err(e) => return Err(format!("backward: unexpected error {e}")),
        }
    }
    // to_dense against the definition; set_kernel with a wrong length must leave the
    // operator unchanged.
    let dense = op.to_dense().map_err(|e| format!("to_dense failed: {e}"))?;
    for (r, row) in dense.chunks(d_in.max(1)).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            let (i, a, j, b) = (r / p, r % p, c / p, c % p);
            if v != kernel[(i * q_in + j) * p + (a + p - b) % p] {
                return Err(format!("to_dense wrong at ({r}, {c}), {s:?}"));
            }
        }
    }
    let mut op = op;
    if op.set_kernel(&kernel[..kernel.len() - 1]).is_ok() {
        return Err("set_kernel accepted a short kernel".into());
    }
    if op.kernel() != &kernel[..] {
        return Err("a failed set_kernel changed the operator".into());
    }
    Ok(true)
}

fn run(iterations: u64, seed: u64) -> Counts {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut counts = Counts::default();
    let mut first_failure: Option<String> = None;
    for _ in 0..iterations {
        counts.cases += 1;
        match catch_unwind(AssertUnwindSafe(|| one_case(&mut rng))) {
            Ok(Ok(true)) => counts.ok += 1,
            Ok(Ok(false)) => counts.errors += 1,
            Ok(Err(msg)) => {
                counts.wrong += 1;
                first_failure.get_or_insert(msg);
            }
            Err(_) => {
                counts.panics += 1;
                first_failure.get_or_insert_with(|| "panic".into());
            }
        }
    }
    if let Some(f) = first_failure {
        eprintln!("first failure: {f}");
    }
    counts
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

#[test]
fn fuzz_core_short() {
    let c = run(20_000, env_u64("BCA_FUZZ_SEED", 0));
    eprintln!("{c:?}");
    assert_eq!((c.panics, c.wrong), (0, 0), "{c:?}");
    assert!(
        c.ok > 1_000 && c.errors > 1_000,
        "too few cases of each kind: {c:?}"
    );
}

#[test]
#[ignore = "long run: BCA_FUZZ_ITERATIONS=N cargo test --release --test fuzz_core -- --ignored"]
fn fuzz_core_long() {
    let n = env_u64("BCA_FUZZ_ITERATIONS", 1_000_000);
    let t = std::time::Instant::now();
    let c = run(n, env_u64("BCA_FUZZ_SEED", 1));
    eprintln!("{c:?} in {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!((c.panics, c.wrong), (0, 0), "{c:?}");
}

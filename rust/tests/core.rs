//! Tests of the pure Rust core against a direct (no FFT) evaluation of the block
//! circulant product, in f64.

use bca::{BcaError, BlockCirculant, Float};

mod common;
use common::{dense_entry, rel_err, to_f64, Rng};

struct Case {
    q_out: usize,
    q_in: usize,
    p: usize,
    d_in: usize,
    d_out: usize,
    n: usize,
}

const CASES: &[Case] = &[
    Case {
        q_out: 2,
        q_in: 3,
        p: 4,
        d_in: 12,
        d_out: 8,
        n: 5,
    },
    Case {
        q_out: 3,
        q_in: 2,
        p: 7,
        d_in: 14,
        d_out: 21,
        n: 3,
    },
    Case {
        q_out: 1,
        q_in: 1,
        p: 16,
        d_in: 16,
        d_out: 16,
        n: 1,
    },
    Case {
        q_out: 5,
        q_in: 4,
        p: 1,
        d_in: 4,
        d_out: 5,
        n: 2,
    },
    Case {
        q_out: 2,
        q_in: 3,
        p: 5,
        d_in: 13,
        d_out: 7,
        n: 4,
    },
    Case {
        q_out: 3,
        q_in: 3,
        p: 9,
        d_in: 25,
        d_out: 19,
        n: 70,
    },
    Case {
        q_out: 4,
        q_in: 2,
        p: 8,
        d_in: 16,
        d_out: 32,
        n: 0,
    },
    Case {
        q_out: 1,
        q_in: 1,
        p: 13,
        d_in: 13,
        d_out: 13,
        n: 33,
    },
    Case {
        q_out: 6,
        q_in: 5,
        p: 32,
        d_in: 150,
        d_out: 190,
        n: 65,
    },
];

fn check_case<T: Float>(c: &Case, tol: f64, seed: u64) {
    let mut rng = Rng(seed);
    let kernel: Vec<T> = rng.vec(c.q_out * c.q_in * c.p);
    let x: Vec<T> = rng.vec(c.n * c.d_in);
    let g: Vec<T> = rng.vec(c.n * c.d_out);
    let op = BlockCirculant::new(&kernel, c.q_out, c.q_in, c.p, Some(c.d_in), Some(c.d_out))
        .expect("valid operator");
    let k64 = to_f64(&kernel);
    let (x64, g64) = (to_f64(&x), to_f64(&g));

    // dense ΔW
    let dense = to_f64(&op.to_dense().unwrap());
    let mut want_dense = vec![0.0; c.d_out * c.d_in];
    for r in 0..c.d_out {
        for col in 0..c.d_in {
            want_dense[r * c.d_in + col] = dense_entry(&k64, c.q_in, c.p, r, col);
        }
    }
    assert_eq!(dense, want_dense);

    // forward
    let mut y = vec![T::zero(); c.n * c.d_out];
    op.forward(&x, c.n, &mut y).unwrap();
    let mut want_y = vec![0.0; c.n * c.d_out];
    for n in 0..c.n {
        for r in 0..c.d_out {
            want_y[n * c.d_out + r] = (0..c.d_in)
                .map(|col| want_dense[r * c.d_in + col] * x64[n * c.d_in + col])
                .sum();
        }
    }
    assert!(rel_err(&to_f64(&y), &want_y) < tol, "forward");

    // backward: grad_x = ΔWᵀ g; grad_kernel[i, j, t] = Σ_n Σ_{a,b: (a-b) mod p = t} g[n, ip+a] x[n, jp+b]
    let mut gx = vec![T::zero(); c.n * c.d_in];
    let mut gk = vec![T::zero(); kernel.len()];
    op.backward(Some(&x), &g, c.n, Some(&mut gx), Some(&mut gk))
        .unwrap();
    let mut want_gx = vec![0.0; c.n * c.d_in];
    let mut want_gk = vec![0.0; kernel.len()];
    for n in 0..c.n {
        for r in 0..c.d_out {
            for col in 0..c.d_in {
                let gv = g64[n * c.d_out + r];
                want_gx[n * c.d_in + col] += want_dense[r * c.d_in + col] * gv;
                let (i, a, j, b) = (r / c.p, r % c.p, col / c.p, col % c.p);
                want_gk[(i * c.q_in + j) * c.p + (a + c.p - b) % c.p] += gv * x64[n * c.d_in + col];
            }
        }
    }
    assert!(rel_err(&to_f64(&gx), &want_gx) < tol, "grad_x");
    assert!(rel_err(&to_f64(&gk), &want_gk) < tol, "grad_kernel");

    // input gradient alone, and kernel gradient alone, agree with the combined call
    let mut gx2 = vec![T::zero(); c.n * c.d_in];
    op.backward(None, &g, c.n, Some(&mut gx2), None).unwrap();
    assert_eq!(to_f64(&gx2), to_f64(&gx));
    let mut gk2 = vec![T::zero(); kernel.len()];
    op.backward(Some(&x), &g, c.n, None, Some(&mut gk2))
        .unwrap();
    assert_eq!(to_f64(&gk2), to_f64(&gk));
}

#[test]
fn matches_direct_evaluation_f64() {
    for (s, c) in CASES.iter().enumerate() {
        check_case::<f64>(c, 1e-13, 1 + s as u64);
    }
}

#[test]
fn matches_direct_evaluation_f32() {
    for (s, c) in CASES.iter().enumerate() {
        check_case::<f32>(c, 2e-6, 100 + s as u64);
    }
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (q_out, q_in, p, n) = (8, 8, 16, 300);
    let mut rng = Rng(7);
    let kernel: Vec<f32> = rng.vec(q_out * q_in * p);
    let x: Vec<f32> = rng.vec(n * q_in * p);
    let g: Vec<f32> = rng.vec(n * q_out * p);
    let mut outs = Vec::new();
    for threads in [1, 2, 3] {
        let op = BlockCirculant::new(&kernel, q_out, q_in, p, None, None).unwrap();
        op.set_num_threads(threads);
        let mut y = vec![0.0; n * q_out * p];
        op.forward(&x, n, &mut y).unwrap();
        let mut gx = vec![0.0; n * q_in * p];
        let mut gk = vec![0.0; kernel.len()];
        op.backward(Some(&x), &g, n, Some(&mut gx), Some(&mut gk))
            .unwrap();
        outs.push((y, gx, gk));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

#[test]
fn set_kernel_recomputes_spectra() {
    let mut rng = Rng(3);
    let (k1, k2): (Vec<f64>, Vec<f64>) = (rng.vec(2 * 2 * 6), rng.vec(2 * 2 * 6));
    let x: Vec<f64> = rng.vec(12);
    let mut op = BlockCirculant::new(&k1, 2, 2, 6, None, None).unwrap();
    op.set_kernel(&k2).unwrap();
    let fresh = BlockCirculant::new(&k2, 2, 2, 6, None, None).unwrap();
    let (mut a, mut b) = (vec![0.0; 12], vec![0.0; 12]);
    op.forward(&x, 1, &mut a).unwrap();
    fresh.forward(&x, 1, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(op.kernel(), &k2[..]);
}

#[test]
fn bad_shapes_are_errors() {
    let k = vec![0.0f32; 2 * 3 * 4];
    let arg = |e: BcaError| match e {
        BcaError::InvalidArgument { arg, .. } => arg,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        arg(BlockCirculant::new(&k, 2, 3, 5, None, None).unwrap_err()),
        "kernel"
    );
    assert_eq!(
        arg(BlockCirculant::new(&k, 0, 3, 4, None, None).unwrap_err()),
        "kernel"
    );
    // padding may not fill a whole block, nor exceed the blocks
    assert_eq!(
        arg(BlockCirculant::new(&k, 2, 3, 4, Some(8), None).unwrap_err()),
        "in_features"
    );
    assert_eq!(
        arg(BlockCirculant::new(&k, 2, 3, 4, Some(13), None).unwrap_err()),
        "in_features"
    );
    assert_eq!(
        arg(BlockCirculant::new(&k, 2, 3, 4, None, Some(4)).unwrap_err()),
        "out_features"
    );
    let op = BlockCirculant::new(&k, 2, 3, 4, Some(10), Some(7)).unwrap();
    let mut y = vec![0.0f32; 7];
    assert_eq!(arg(op.forward(&[0.0; 9], 1, &mut y).unwrap_err()), "x");
    assert_eq!(
        arg(op.forward(&[0.0; 10], 1, &mut [0.0; 8]).unwrap_err()),
        "out"
    );
    let mut gk = vec![0.0f32; 3];
    assert_eq!(
        arg(op
            .backward(Some(&[0.0; 10]), &[0.0; 7], 1, None, Some(&mut gk))
            .unwrap_err()),
        "grad_kernel"
    );
    assert_eq!(
        arg(op
            .backward(None, &[0.0; 7], 1, None, Some(&mut [0.0; 24]))
            .unwrap_err()),
        "x"
    );
}

#[test]
fn non_finite_values_are_errors() {
    let mut k = vec![0.5f64; 2 * 2 * 4];
    let op = BlockCirculant::new(&k, 2, 2, 4, None, None).unwrap();
    let mut x = vec![1.0; 8];
    x[3] = f64::NAN;
    let mut y = vec![0.0; 8];
    assert_eq!(
        op.forward(&x, 1, &mut y),
        Err(BcaError::NonFinite { arg: "x" })
    );
    x[3] = f64::INFINITY;
    assert_eq!(
        op.forward(&x, 1, &mut y),
        Err(BcaError::NonFinite { arg: "x" })
    );
    let g = vec![f64::NEG_INFINITY; 8];
    let mut gx = vec![0.0; 8];
    assert_eq!(
        op.backward(None, &g, 1, Some(&mut gx), None),
        Err(BcaError::NonFinite { arg: "grad_output" })
    );
    k[0] = f64::NAN;
    assert_eq!(
        BlockCirculant::new(&k, 2, 2, 4, None, None).unwrap_err(),
        BcaError::NonFinite { arg: "kernel" }
    );
}

#[test]
fn huge_finite_values_do_not_panic() {
    // Finite input whose transform overflows: the result may be Inf/NaN but never a panic.
    let k = vec![f32::MAX; 2 * 2 * 8];
    let op = BlockCirculant::new(&k, 2, 2, 8, None, None).unwrap();
    let x = vec![f32::MAX; 16];
    let mut y = vec![0.0; 16];
    assert!(op.forward(&x, 1, &mut y).is_ok());
    let mut gk = vec![0.0; k.len()];
    let mut gx = vec![0.0; 16];
    assert!(op
        .backward(Some(&x), &x, 1, Some(&mut gx), Some(&mut gk))
        .is_ok());
}

#[test]
fn backward_over_several_row_blocks_matches_direct_evaluation() {
    // 1000 rows at q = 16, p = 64 make backward work through its batch in several blocks
    // (it bounds its batch buffers); sums over rows must still be exact and in order, the
    // same on 1, 2 and 3 threads.
    let (q_out, q_in, p, n) = (16, 16, 64, 1000);
    let (d_in, d_out) = (q_in * p - 5, q_out * p - 3);
    let mut rng = Rng(11);
    let kernel: Vec<f64> = rng.vec(q_out * q_in * p);
    let x: Vec<f64> = rng.vec(n * d_in);
    let g: Vec<f64> = rng.vec(n * d_out);
    let mut outs = Vec::new();
    for threads in [1, 2, 3] {
        let op = BlockCirculant::new(&kernel, q_out, q_in, p, Some(d_in), Some(d_out)).unwrap();
        op.set_num_threads(threads);
        let mut gx = vec![0.0; n * d_in];
        let mut gk = vec![0.0; kernel.len()];
        op.backward(Some(&x), &g, n, Some(&mut gx), Some(&mut gk))
            .unwrap();
        outs.push((gx, gk));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
    // Direct kernel gradient: gk[i, j, t] = Σ_rows Σ_a g[r, i·p + a] · x[r, j·p + (a - t) mod p].
    let (gx, gk) = &outs[0];
    let mut want_k = vec![0.0; kernel.len()];
    for r in 0..n {
        for i in 0..q_out {
            for a in 0..p {
                let row = i * p + a;
                if row >= d_out {
                    continue;
                }
                let gv = g[r * d_out + row];
                for j in 0..q_in {
                    for t in 0..p {
                        let col = j * p + (a + p - t) % p;
                        if col < d_in {
                            want_k[(i * q_in + j) * p + t] += gv * x[r * d_in + col];
                        }
                    }
                }
            }
        }
    }
    assert!(rel_err(gk, &want_k) < 1e-12, "{}", rel_err(gk, &want_k));
    // Input gradient of a few rows: ΔWᵀ g.
    for r in [0, 409, 999] {
        let want: Vec<f64> = (0..d_in)
            .map(|c| {
                (0..d_out)
                    .map(|row| dense_entry(&kernel, q_in, p, row, c) * g[r * d_out + row])
                    .sum()
            })
            .collect();
        assert!(rel_err(&gx[r * d_in..(r + 1) * d_in], &want) < 1e-12);
    }
}

#[test]
fn shapes_whose_sizes_overflow_are_errors() {
    // In a release build q_out · q_in · p wrapped to 0 here, and an empty kernel was
    // accepted for a 2³¹ × 2³¹ grid of blocks.
    let arg = |e: BcaError| match e {
        BcaError::InvalidArgument { arg, .. } => arg,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        arg(BlockCirculant::<f32>::new(&[], 1 << 31, 1 << 31, 4, None, None).unwrap_err()),
        "kernel"
    );
    assert_eq!(
        arg(BlockCirculant::<f64>::new(&[], usize::MAX, 1, 1, None, None).unwrap_err()),
        "kernel"
    );
    assert_eq!(
        arg(BlockCirculant::<f32>::new(&[], 1, 2, usize::MAX / 2 + 1, None, None).unwrap_err()),
        "kernel"
    );
    // A valid operator refuses row counts whose sizes overflow.
    let op = BlockCirculant::new(&[1.0f32; 4], 1, 1, 4, None, None).unwrap();
    let mut y = vec![0.0f32; 4];
    assert_eq!(
        arg(op.forward(&[0.0; 4], usize::MAX, &mut y).unwrap_err()),
        "x"
    );
}

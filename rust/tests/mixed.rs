//! Mixed-adapter batches (each row its own operator) against a direct (no FFT)
//! evaluation of each row's block circulant product, in f64.

use bca::{
    mixed_backward, mixed_forward, mixed_forward_with, same_kernels, BcaError, BlockCirculant,
    Float, NO_ADAPTER,
};

mod common;
use common::{rel_err, to_f64, Rng};

/// An index in -1..n_ops (−1: no adapter, about one row in five).
fn index(rng: &mut Rng, n_ops: usize) -> i64 {
    let u = (rng.next() + 1.0) / 2.0;
    if u < 0.2 {
        NO_ADAPTER
    } else {
        (((u - 0.2) / 0.8 * n_ops as f64) as i64).min(n_ops as i64 - 1)
    }
}

/// (q_out, q_in, p, d_in, d_out, rows, operators)
const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
    (2, 3, 4, 12, 8, 9, 3),
    (3, 2, 7, 14, 21, 5, 2),
    (1, 1, 16, 16, 16, 1, 4),
    (5, 4, 1, 4, 5, 7, 3),
    (2, 3, 5, 13, 7, 40, 5),
    (1, 1, 13, 13, 13, 33, 1),
    (6, 5, 32, 150, 190, 70, 8),
    (4, 2, 8, 16, 32, 0, 2),
];

struct Direct {
    y: Vec<f64>,
    gx: Vec<f64>,
    gk: Vec<Vec<f64>>,
}

/// Row by row from the definition ΔW[r, c] = C[r / p, c / p, (r - c) mod p].
#[allow(clippy::too_many_arguments)]
fn direct(
    kernels: &[Vec<f64>],
    idx: &[i64],
    x: &[f64],
    g: &[f64],
    q_in: usize,
    p: usize,
    d_in: usize,
    d_out: usize,
) -> Direct {
    let n = idx.len();
    let mut out = Direct {
        y: vec![0.0; n * d_out],
        gx: vec![0.0; n * d_in],
        gk: kernels.iter().map(|k| vec![0.0; k.len()]).collect(),
    };
    for (row, &a) in idx.iter().enumerate() {
        if a == NO_ADAPTER {
            continue;
        }
        let (k, gk) = (&kernels[a as usize], &mut out.gk[a as usize]);
        for r in 0..d_out {
            for c in 0..d_in {
                let (i, ra, j, cb) = (r / p, r % p, c / p, c % p);
                let at = (i * q_in + j) * p + (ra + p - cb) % p;
                out.y[row * d_out + r] += k[at] * x[row * d_in + c];
                out.gx[row * d_in + c] += k[at] * g[row * d_out + r];
                gk[at] += g[row * d_out + r] * x[row * d_in + c];
            }
        }
    }
    out
}

fn check<T: Float>(tol: f64, seed: u64) {
    for (s, &(q_out, q_in, p, d_in, d_out, n, k)) in CASES.iter().enumerate() {
        let mut rng = Rng(seed + s as u64);
        let kernels: Vec<Vec<T>> = (0..k).map(|_| rng.vec(q_out * q_in * p)).collect();
        let ops: Vec<BlockCirculant<T>> = kernels
            .iter()
            .map(|kv| BlockCirculant::new(kv, q_out, q_in, p, Some(d_in), Some(d_out)).unwrap())
            .collect();
        let refs: Vec<&BlockCirculant<T>> = ops.iter().collect();
        let idx: Vec<i64> = (0..n).map(|_| index(&mut rng, k)).collect();
        let x: Vec<T> = rng.vec(n * d_in);
        let g: Vec<T> = rng.vec(n * d_out);
        let k64: Vec<Vec<f64>> = kernels.iter().map(|kv| to_f64(kv)).collect();
        let want = direct(&k64, &idx, &to_f64(&x), &to_f64(&g), q_in, p, d_in, d_out);

        let mut y = vec![T::one(); n * d_out]; // overwritten, also the rows without adapter
        mixed_forward(&refs, &idx, &x, n, &mut y).unwrap();
        assert!(rel_err(&to_f64(&y), &want.y) < tol, "forward, case {s}");

        // Each row equals its operator's own forward, bit for bit.
        for (r, &a) in idx.iter().enumerate() {
            let row = &y[r * d_out..(r + 1) * d_out];
            if a == NO_ADAPTER {
                assert!(row.iter().all(|v| *v == T::zero()), "case {s} row {r}");
                continue;
            }
            let mut alone = vec![T::zero(); d_out];
            ops[a as usize]
                .forward(&x[r * d_in..(r + 1) * d_in], 1, &mut alone)
                .unwrap();
            assert_eq!(to_f64(row), to_f64(&alone), "case {s} row {r}");
        }

        // Both gradients together, then each alone.
        let mut gx = vec![T::one(); n * d_in];
        let mut gks: Vec<Vec<T>> = (0..k).map(|_| vec![T::one(); q_out * q_in * p]).collect();
        {
            let mut gk_refs: Vec<&mut [T]> = gks.iter_mut().map(|v| &mut v[..]).collect();
            mixed_backward(
                &refs,
                &idx,
                Some(&x),
                &g,
                n,
                Some(&mut gx),
                Some(&mut gk_refs),
            )
            .unwrap();
        }
        assert!(rel_err(&to_f64(&gx), &want.gx) < tol, "grad_x, case {s}");
        for (a, (got, want)) in gks.iter().zip(&want.gk).enumerate() {
            let err = rel_err(&to_f64(got), want);
            assert!(err < tol, "grad_kernels[{a}], case {s}: {err}");
        }
        let mut gx2 = vec![T::one(); n * d_in];
        mixed_backward(&refs, &idx, None, &g, n, Some(&mut gx2), None).unwrap();
        assert_eq!(to_f64(&gx2), to_f64(&gx), "grad_x alone, case {s}");
        let mut gks2: Vec<Vec<T>> = (0..k).map(|_| vec![T::one(); q_out * q_in * p]).collect();
        {
            let mut gk_refs: Vec<&mut [T]> = gks2.iter_mut().map(|v| &mut v[..]).collect();
            mixed_backward(&refs, &idx, Some(&x), &g, n, None, Some(&mut gk_refs)).unwrap();
        }
        assert_eq!(gks2, gks, "grad_kernels alone, case {s}");
    }
}

#[test]
fn matches_direct_evaluation_f64() {
    check::<f64>(1e-13, 1);
}

#[test]
fn matches_direct_evaluation_f32() {
    check::<f32>(2e-6, 100);
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let (q_out, q_in, p, n, k) = (8, 8, 16, 300, 5);
    let mut rng = Rng(7);
    let kernels: Vec<Vec<f32>> = (0..k).map(|_| rng.vec(q_out * q_in * p)).collect();
    let idx: Vec<i64> = (0..n).map(|_| index(&mut rng, k)).collect();
    let x: Vec<f32> = rng.vec(n * q_in * p);
    let g: Vec<f32> = rng.vec(n * q_out * p);
    let mut outs = Vec::new();
    for threads in [1, 2, 3] {
        let ops: Vec<BlockCirculant<f32>> = kernels
            .iter()
            .map(|kv| {
                let op = BlockCirculant::new(kv, q_out, q_in, p, None, None).unwrap();
                op.set_num_threads(threads);
                op
            })
            .collect();
        let refs: Vec<&BlockCirculant<f32>> = ops.iter().collect();
        let mut y = vec![0.0; n * q_out * p];
        mixed_forward(&refs, &idx, &x, n, &mut y).unwrap();
        let mut gx = vec![0.0; n * q_in * p];
        let mut gx_only = vec![0.0; n * q_in * p];
        let mut gks: Vec<Vec<f32>> = (0..k).map(|_| vec![0.0; kernels[0].len()]).collect();
        {
            let mut gk_refs: Vec<&mut [f32]> = gks.iter_mut().map(|v| &mut v[..]).collect();
            mixed_backward(
                &refs,
                &idx,
                Some(&x),
                &g,
                n,
                Some(&mut gx),
                Some(&mut gk_refs),
            )
            .unwrap();
        }
        mixed_backward(&refs, &idx, None, &g, n, Some(&mut gx_only), None).unwrap();
        assert_eq!(gx, gx_only);
        outs.push((y, gx, gks));
    }
    assert_eq!(outs[0], outs[1]);
    assert_eq!(outs[0], outs[2]);
}

fn invalid(e: BcaError) -> (&'static str, String) {
    match e {
        BcaError::InvalidArgument { arg, message } => (arg, message),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_arguments_are_errors() {
    let k = vec![0.25f64; 2 * 3 * 4];
    let a = BlockCirculant::new(&k, 2, 3, 4, Some(10), Some(7)).unwrap();
    let b = BlockCirculant::new(&k, 2, 3, 4, Some(10), Some(7)).unwrap();
    let other = BlockCirculant::new(&k, 2, 3, 4, Some(11), Some(7)).unwrap();
    let x = vec![1.0; 2 * 10];
    let mut y = vec![0.0; 2 * 7];

    let (arg, msg) = invalid(mixed_forward(&[&a, &b, &other], &[0, 1], &x, 2, &mut y).unwrap_err());
    assert_eq!(arg, "operators");
    assert!(
        msg.contains("operator 2") && msg.contains("in_features=11"),
        "{msg}"
    );
    let (arg, _) = invalid(mixed_forward::<f64>(&[], &[], &[], 0, &mut []).unwrap_err());
    assert_eq!(arg, "operators");

    for bad in [2, -2, i64::MIN, i64::MAX] {
        let (arg, msg) = invalid(mixed_forward(&[&a, &b], &[0, bad], &x, 2, &mut y).unwrap_err());
        assert_eq!(arg, "adapter_index");
        assert!(msg.contains("adapter_index[1]"), "{msg}");
    }
    let (arg, _) = invalid(mixed_forward(&[&a, &b], &[0], &x, 2, &mut y).unwrap_err());
    assert_eq!(arg, "adapter_index");
    let (arg, _) = invalid(mixed_forward(&[&a], &[0, 0], &x[..19], 2, &mut y).unwrap_err());
    assert_eq!(arg, "x");
    let (arg, _) = invalid(mixed_forward(&[&a], &[0, 0], &x, 2, &mut y[..13]).unwrap_err());
    assert_eq!(arg, "out");

    let g = vec![1.0; 2 * 7];
    let mut gk = [0.0; 24];
    let mut short = [0.0; 23];
    let (arg, _) = invalid(
        mixed_backward(
            &[&a, &b],
            &[0, 1],
            Some(&x),
            &g,
            2,
            None,
            Some(&mut [&mut gk[..]]),
        )
        .unwrap_err(),
    );
    assert_eq!(arg, "grad_kernels");
    let (arg, msg) = invalid(
        mixed_backward(
            &[&a, &b],
            &[0, 1],
            Some(&x),
            &g,
            2,
            None,
            Some(&mut [&mut gk[..], &mut short[..]]),
        )
        .unwrap_err(),
    );
    assert_eq!(arg, "grad_kernels");
    assert!(msg.contains("grad_kernels[1]"), "{msg}");
    let (arg, _) = invalid(
        mixed_backward(&[&a], &[0, 1], None, &g, 2, None, Some(&mut [&mut gk[..]])).unwrap_err(),
    );
    assert_eq!(arg, "adapter_index");
    let (arg, _) = invalid(
        mixed_backward(&[&a], &[0, 0], None, &g, 2, None, Some(&mut [&mut gk[..]])).unwrap_err(),
    );
    assert_eq!(arg, "x");
    let (arg, _) = invalid(
        mixed_backward(
            &[&a],
            &[0, 0],
            None,
            &g[..13],
            2,
            Some(&mut [0.0; 20]),
            None,
        )
        .unwrap_err(),
    );
    assert_eq!(arg, "grad_output");
}

#[test]
fn non_finite_values_are_errors_in_rows_that_are_read() {
    let k = vec![0.5f32; 2 * 2 * 4];
    let op = BlockCirculant::new(&k, 2, 2, 4, None, None).unwrap();
    let mut x = vec![1.0f32; 3 * 8];
    x[9] = f32::NAN; // row 1
    let mut y = vec![0.0; 3 * 8];
    assert_eq!(
        mixed_forward(&[&op], &[0, 0, 0], &x, 3, &mut y),
        Err(BcaError::NonFinite { arg: "x" })
    );
    // A row without an adapter is not read.
    mixed_forward(&[&op], &[0, NO_ADAPTER, 0], &x, 3, &mut y).unwrap();
    assert!(y[8..16].iter().all(|v| *v == 0.0));
    let g = x.clone();
    let mut gx = vec![0.0; 3 * 8];
    assert_eq!(
        mixed_backward(&[&op], &[0, 0, 0], None, &g, 3, Some(&mut gx), None),
        Err(BcaError::NonFinite { arg: "grad_output" })
    );
    let mut gk = [0.0; 16];
    assert_eq!(
        mixed_backward(
            &[&op],
            &[0, 0, 0],
            Some(&x),
            &g,
            3,
            None,
            Some(&mut [&mut gk[..]])
        ),
        Err(BcaError::NonFinite { arg: "x" })
    );
    mixed_backward(
        &[&op],
        &[0, NO_ADAPTER, 0],
        Some(&x),
        &g,
        3,
        Some(&mut gx),
        Some(&mut [&mut gk[..]]),
    )
    .unwrap();
    assert!(gx[8..16].iter().all(|v| *v == 0.0));
}

#[test]
fn no_rows_or_no_adapter_give_zeros() {
    let k = vec![0.5f64; 3 * 2 * 5];
    let op = BlockCirculant::new(&k, 3, 2, 5, Some(9), Some(14)).unwrap();
    mixed_forward(&[&op], &[], &[], 0, &mut []).unwrap();
    let x = vec![1.0; 4 * 9];
    let g = vec![1.0; 4 * 14];
    let mut y = vec![7.0; 4 * 14];
    mixed_forward(&[&op, &op], &[NO_ADAPTER; 4], &x, 4, &mut y).unwrap();
    assert!(y.iter().all(|v| *v == 0.0));
    let (mut gx, mut gk0, mut gk1) = (vec![7.0; 4 * 9], vec![7.0; 30], vec![7.0; 30]);
    mixed_backward(
        &[&op, &op],
        &[NO_ADAPTER, 1, NO_ADAPTER, 1],
        Some(&x),
        &g,
        4,
        Some(&mut gx),
        Some(&mut [&mut gk0[..], &mut gk1[..]]),
    )
    .unwrap();
    assert!(gk0.iter().all(|v| *v == 0.0), "an operator without rows");
    assert!(gk1.iter().any(|v| *v != 0.0));
    assert!(gx[..9].iter().all(|v| *v == 0.0) && gx[9..18].iter().any(|v| *v != 0.0));
}

/// `same_kernel` / `same_kernels` answer "the same bits", whatever the size (one chunk
/// or many, on one thread or several): a change anywhere, of one ulp or of a zero's
/// sign, is seen; equal values in another buffer are the same.
#[test]
fn kernel_comparisons_see_every_change_of_bits() {
    for &(q_out, q_in, p) in &[(1, 1, 1), (2, 3, 4), (8, 8, 64), (24, 24, 128)] {
        let len = q_out * q_in * p;
        let mut k: Vec<f32> = Rng(len as u64 + 1).vec(len);
        k[len / 2] = 0.0;
        let op = BlockCirculant::new(&k, q_out, q_in, p, None, None).unwrap();
        let ops = [&op, &op, &op];
        assert!(op.same_kernel(&k.clone()));
        assert!(same_kernels(&ops, &[&k, &k, &k]).iter().all(|&s| s));
        let mut changed = Vec::new();
        for at in [0, len / 2, len - 1] {
            let mut c = k.clone();
            c[at] = if at == len / 2 {
                -0.0
            } else {
                f32::from_bits(c[at].to_bits() + 1)
            };
            changed.push(c);
        }
        for c in &changed {
            assert!(!op.same_kernel(c));
            assert_eq!(same_kernels(&ops, &[&k, c, &k]), vec![true, false, true]);
        }
        assert!(!op.same_kernel(&k[..len - 1]));
        assert_eq!(
            same_kernels(&ops, &[&k, &k[..len - 1], &k]),
            vec![true, false, true]
        );
    }
}

/// `mixed_forward_with` finishes every output row exactly once, after it is written,
/// with that row's operator (None for a row without one), on any thread count.
#[test]
fn row_finish_sees_every_row_once_with_its_operator() {
    use std::sync::Mutex;
    let (q_out, q_in, p, n, k) = (4, 4, 8, 200, 3);
    let mut rng = Rng(11);
    let kernels: Vec<Vec<f64>> = (0..k).map(|_| rng.vec(q_out * q_in * p)).collect();
    let idx: Vec<i64> = (0..n).map(|_| index(&mut rng, k)).collect();
    let x: Vec<f64> = rng.vec(n * q_in * p);
    let d = q_out * p;
    for threads in [1, 2, 3] {
        let ops: Vec<BlockCirculant<f64>> = kernels
            .iter()
            .map(|kv| {
                let op = BlockCirculant::new(kv, q_out, q_in, p, None, None).unwrap();
                op.set_num_threads(threads);
                op
            })
            .collect();
        let refs: Vec<&BlockCirculant<f64>> = ops.iter().collect();
        let mut plain = vec![0.0; n * d];
        mixed_forward(&refs, &idx, &x, n, &mut plain).unwrap();
        let seen = Mutex::new(vec![0usize; n]);
        let finish = |r: usize, a: Option<usize>, row: &mut [f64]| {
            assert_eq!(a.map(|a| a as i64).unwrap_or(NO_ADAPTER), idx[r]);
            assert_eq!(row, &plain[r * d..(r + 1) * d]); // written before it is finished
            row.iter_mut().for_each(|v| *v = 2.0 * *v + r as f64);
            seen.lock().unwrap()[r] += 1;
        };
        let mut y = vec![f64::NAN; n * d];
        mixed_forward_with(&refs, &idx, &x, n, &mut y, Some(&finish)).unwrap();
        assert!(seen.into_inner().unwrap().iter().all(|&c| c == 1));
        for r in 0..n {
            for c in 0..d {
                assert_eq!(y[r * d + c], 2.0 * plain[r * d + c] + r as f64);
            }
        }
    }
}

//! The Python binding `bca._bca`: argument checks, GIL release, error mapping.
//!
//! Every argument is checked here before the core sees it (type, dtype, contiguity,
//! shape; finiteness is checked by the core without the GIL). Every failure becomes a
//! `TypeError` or `ValueError` that names the argument; a panic, which the core should
//! never raise, is caught and becomes a `RuntimeError` rather than crossing into Python.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use numpy::{
    Element, PyArray2, PyArray3, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::{BcaError, BlockCirculant, Float};

fn to_py_err(e: BcaError) -> PyErr {
    match e {
        BcaError::InvalidArgument { .. } | BcaError::NonFinite { .. } => {
            PyValueError::new_err(e.to_string())
        }
        BcaError::Fft(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// Run `f` without the GIL, turning a panic into a RuntimeError.
fn run_detached<R: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> Result<R, BcaError> + Send,
) -> PyResult<R> {
    py.detach(|| catch_unwind(AssertUnwindSafe(f)))
        .map_err(|_| {
            PyRuntimeError::new_err("internal error in the bca core (a bug: please report it)")
        })?
        .map_err(to_py_err)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// `obj` as a C-contiguous ndarray of `T`, or a TypeError/ValueError naming `arg`.
fn typed_array<'py, T: Float + Element>(
    obj: &Bound<'py, PyAny>,
    arg: &str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{arg} must be a numpy.ndarray, got {ty}"))
    })?;
    let typed = obj.cast::<PyArrayDyn<T>>().map_err(|_| {
        let dt = untyped.dtype().to_string();
        PyTypeError::new_err(format!(
            "{arg} must have dtype {} (the kernel's dtype), got {dt}",
            T::NAME
        ))
    })?;
    if !untyped.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{arg} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    Ok(typed.clone())
}

/// Check that `arr`'s last dimension is `d`; return the number of rows (product of the
/// leading dimensions).
fn rows_of(arr: &Bound<'_, PyUntypedArray>, arg: &str, d: usize, what: &str) -> PyResult<usize> {
    let shape = arr.shape();
    match shape.last() {
        Some(&last) if last == d => Ok(shape[..shape.len() - 1].iter().product()),
        _ => Err(PyValueError::new_err(format!(
            "{arg}: last dimension must be {what} = {d}, got shape {}",
            shape_str(shape)
        ))),
    }
}

fn out_shape(leading: &[usize], d: usize) -> Vec<usize> {
    let mut s = leading.to_vec();
    s.push(d);
    s
}

enum Inner {
    F32(RwLock<BlockCirculant<f32>>),
    F64(RwLock<BlockCirculant<f64>>),
}

/// Block circulant operator with cached kernel spectra (see bca._bca.pyi).
#[pyclass(name = "BlockCirculantOperator", module = "bca._bca", frozen)]
struct PyBlockCirculant {
    inner: Inner,
}

fn parse_threads(num_threads: Option<i64>) -> PyResult<usize> {
    match num_threads {
        None => Ok(0),
        Some(n) if (1..=4096).contains(&n) => Ok(n as usize),
        Some(n) => Err(PyValueError::new_err(format!(
            "num_threads must be a positive integer (at most 4096) or None, got {n}"
        ))),
    }
}

fn kernel_dims(kernel: &Bound<'_, PyUntypedArray>) -> PyResult<(usize, usize, usize)> {
    match kernel.shape() {
        &[q_out, q_in, p] => Ok((q_out, q_in, p)),
        s => Err(PyValueError::new_err(format!(
            "kernel must have 3 dimensions (q_out, q_in, p), got shape {}",
            shape_str(s)
        ))),
    }
}

fn build<T: Float + Element>(
    py: Python<'_>,
    kernel: &Bound<'_, PyAny>,
    in_features: Option<usize>,
    out_features: Option<usize>,
    threads: usize,
) -> PyResult<BlockCirculant<T>> {
    let arr = typed_array::<T>(kernel, "kernel")?;
    let (q_out, q_in, p) = kernel_dims(arr.as_untyped())?;
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("kernel: {e}")))?;
    let data = ro
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("kernel: {e}")))?;
    let mut op = run_detached(py, || {
        BlockCirculant::new(data, q_out, q_in, p, in_features, out_features)
    })?;
    op.set_num_threads(threads);
    Ok(op)
}

fn forward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    lock: &RwLock<BlockCirculant<T>>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let shape = read(lock).shape();
    let arr = typed_array::<T>(x, "x")?;
    let n = rows_of(arr.as_untyped(), "x", shape.in_features, "in_features")?;
    let dims = arr.shape().to_vec();
    let out_dims = out_shape(&dims[..dims.len() - 1], shape.out_features);
    // SAFETY: forward writes every element of `out` before it is returned; on error the
    // array is dropped unread.
    let out = unsafe { PyArrayDyn::<T>::new(py, out_dims, false) };
    {
        let ro = arr
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        let xs = ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("x: {e}")))?;
        let mut rw = out.readwrite();
        let ys = rw
            .as_slice_mut()
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        run_detached(py, || read(lock).forward(xs, n, ys))?;
    }
    Ok(out.into_any())
}

type Grads<'py> = (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

fn backward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    lock: &RwLock<BlockCirculant<T>>,
    x: Option<&Bound<'py, PyAny>>,
    grad_output: &Bound<'py, PyAny>,
    input_grad: bool,
    kernel_grad: bool,
) -> PyResult<Grads<'py>> {
    let s = read(lock).shape();
    let g = typed_array::<T>(grad_output, "grad_output")?;
    let n = rows_of(
        g.as_untyped(),
        "grad_output",
        s.out_features,
        "out_features",
    )?;
    let g_dims = g.shape().to_vec();
    let leading = &g_dims[..g_dims.len() - 1];
    let x_arr = match (x, kernel_grad) {
        (Some(x), true) => {
            let a = typed_array::<T>(x, "x")?;
            rows_of(a.as_untyped(), "x", s.in_features, "in_features")?;
            if &a.shape()[..a.ndim() - 1] != leading {
                return Err(PyValueError::new_err(format!(
                    "x and grad_output must have the same leading dimensions, got {} and {}",
                    shape_str(a.shape()),
                    shape_str(&g_dims)
                )));
            }
            Some(a)
        }
        (None, true) => {
            return Err(PyValueError::new_err(
                "x: needed for the kernel gradient (pass x, or kernel_grad=False)",
            ))
        }
        (_, false) => None,
    };
    let gx =
        // SAFETY: backward writes every element of grad_x before it is returned; on error
        // the array is dropped unread. The kernel gradient is zero-filled by the core.
        input_grad.then(|| unsafe { PyArrayDyn::<T>::new(py, out_shape(leading, s.in_features), false) });
    let gk = kernel_grad.then(|| PyArray3::<T>::zeros(py, [s.q_out, s.q_in, s.p], false));
    {
        let g_ro = g
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("grad_output: {e}")))?;
        let gs = g_ro
            .as_slice()
            .map_err(|e| PyValueError::new_err(format!("grad_output: {e}")))?;
        let x_ro = match &x_arr {
            Some(a) => Some(
                a.try_readonly()
                    .map_err(|e| PyValueError::new_err(format!("x: {e}")))?,
            ),
            None => None,
        };
        let xs = match &x_ro {
            Some(r) => Some(
                r.as_slice()
                    .map_err(|e| PyValueError::new_err(format!("x: {e}")))?,
            ),
            None => None,
        };
        let mut gx_rw = gx.as_ref().map(|a| a.readwrite());
        let mut gk_rw = gk.as_ref().map(|a| a.readwrite());
        let gx_s = match gx_rw.as_mut() {
            Some(rw) => Some(
                rw.as_slice_mut()
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
            ),
            None => None,
        };
        let gk_s = match gk_rw.as_mut() {
            Some(rw) => Some(
                rw.as_slice_mut()
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
            ),
            None => None,
        };
        run_detached(py, || read(lock).backward(xs, gs, n, gx_s, gk_s))?;
    }
    Ok((gx.map(|a| a.into_any()), gk.map(|a| a.into_any())))
}

fn set_kernel_impl<T: Float + Element>(
    py: Python<'_>,
    lock: &RwLock<BlockCirculant<T>>,
    kernel: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let s = read(lock).shape();
    let arr = typed_array::<T>(kernel, "kernel")?;
    let dims = kernel_dims(arr.as_untyped())?;
    if dims != (s.q_out, s.q_in, s.p) {
        return Err(PyValueError::new_err(format!(
            "kernel must keep its shape ({}, {}, {}), got {}",
            s.q_out,
            s.q_in,
            s.p,
            shape_str(arr.shape())
        )));
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("kernel: {e}")))?;
    let data = ro
        .as_slice()
        .map_err(|e| PyValueError::new_err(format!("kernel: {e}")))?;
    run_detached(py, || write(lock).set_kernel(data))
}

fn kernel_impl<'py, T: Float + Element>(
    py: Python<'py>,
    lock: &RwLock<BlockCirculant<T>>,
) -> PyResult<Bound<'py, PyAny>> {
    let op = read(lock);
    let s = op.shape();
    let flat = numpy::PyArray1::<T>::from_slice(py, op.kernel());
    Ok(flat.reshape([s.q_out, s.q_in, s.p])?.into_any())
}

fn dense_impl<'py, T: Float + Element>(
    py: Python<'py>,
    lock: &RwLock<BlockCirculant<T>>,
) -> PyResult<Bound<'py, PyAny>> {
    let s = read(lock).shape();
    let dense = run_detached(py, || Ok(read(lock).to_dense()))?;
    let flat = numpy::PyArray1::<T>::from_vec(py, dense);
    let arr: Bound<'py, PyArray2<T>> = flat.reshape([s.out_features, s.in_features])?;
    Ok(arr.into_any())
}

macro_rules! dispatch {
    ($self:expr, $lock:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($lock) => $body,
            Inner::F64($lock) => $body,
        }
    };
}

impl PyBlockCirculant {
    /// The operator's geometry, whatever its dtype.
    fn shape(&self) -> crate::Shape {
        dispatch!(self, l => read(l).shape())
    }
}

#[pymethods]
impl PyBlockCirculant {
    #[new]
    #[pyo3(signature = (kernel, in_features=None, out_features=None, *, num_threads=None))]
    fn new(
        py: Python<'_>,
        kernel: &Bound<'_, PyAny>,
        in_features: Option<usize>,
        out_features: Option<usize>,
        num_threads: Option<i64>,
    ) -> PyResult<Self> {
        let threads = parse_threads(num_threads)?;
        let untyped = kernel.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err("kernel must be a numpy.ndarray of float32 or float64")
        })?;
        let dtype = untyped.dtype();
        let inner = if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
            Inner::F32(RwLock::new(build::<f32>(
                py,
                kernel,
                in_features,
                out_features,
                threads,
            )?))
        } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
            Inner::F64(RwLock::new(build::<f64>(
                py,
                kernel,
                in_features,
                out_features,
                threads,
            )?))
        } else {
            return Err(PyTypeError::new_err(format!(
                "kernel must have dtype float32 or float64, got {dtype}"
            )));
        };
        Ok(PyBlockCirculant { inner })
    }

    /// ΔW x over the last axis of `x`.
    fn forward<'py>(&self, py: Python<'py>, x: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        dispatch!(self, l => forward_impl(py, l, x))
    }

    /// Gradients with respect to x and to the kernel.
    #[pyo3(signature = (x, grad_output, *, input_grad=true, kernel_grad=true))]
    fn backward<'py>(
        &self,
        py: Python<'py>,
        x: Option<&Bound<'py, PyAny>>,
        grad_output: &Bound<'py, PyAny>,
        input_grad: bool,
        kernel_grad: bool,
    ) -> PyResult<Grads<'py>> {
        dispatch!(self, l => backward_impl(py, l, x, grad_output, input_grad, kernel_grad))
    }

    /// Dense ΔW, shape (out_features, in_features).
    fn to_dense<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        dispatch!(self, l => dense_impl(py, l))
    }

    /// Replace the kernel (same shape and dtype); spectra are recomputed.
    fn set_kernel(&self, py: Python<'_>, kernel: &Bound<'_, PyAny>) -> PyResult<()> {
        dispatch!(self, l => set_kernel_impl(py, l, kernel))
    }

    /// Set this operator's thread bound; None means the process default.
    #[pyo3(signature = (num_threads))]
    fn set_num_threads(&self, num_threads: Option<i64>) -> PyResult<()> {
        let n = parse_threads(num_threads)?;
        dispatch!(self, l => write(l).set_num_threads(n));
        Ok(())
    }

    #[getter]
    fn num_threads(&self) -> Option<usize> {
        let n = dispatch!(self, l => read(l).num_threads());
        (n != 0).then_some(n)
    }

    #[getter]
    fn kernel<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        dispatch!(self, l => kernel_impl(py, l))
    }

    #[getter]
    fn in_features(&self) -> usize {
        self.shape().in_features
    }

    #[getter]
    fn out_features(&self) -> usize {
        self.shape().out_features
    }

    #[getter]
    fn block_size(&self) -> usize {
        self.shape().p
    }

    #[getter]
    fn q_in(&self) -> usize {
        self.shape().q_in
    }

    #[getter]
    fn q_out(&self) -> usize {
        self.shape().q_out
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        match &self.inner {
            Inner::F32(_) => f32::NAME,
            Inner::F64(_) => f64::NAME,
        }
    }

    fn __repr__(&self) -> String {
        format!(
            "BlockCirculantOperator(in_features={}, out_features={}, block_size={}, dtype={})",
            self.in_features(),
            self.out_features(),
            self.block_size(),
            self.dtype()
        )
    }
}

/// Set the process-wide default thread count of the core; None restores the default
/// (BCA_NUM_THREADS, else RAYON_NUM_THREADS, else the number of cores).
#[pyfunction]
#[pyo3(signature = (num_threads))]
fn set_num_threads(num_threads: Option<i64>) -> PyResult<()> {
    crate::set_default_num_threads(parse_threads(num_threads)?);
    Ok(())
}

/// The process-wide default thread count of the core.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::default_num_threads()
}

#[pymodule]
fn _bca(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyBlockCirculant>()?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

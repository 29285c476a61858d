//! The Python binding `bca._bca`: argument checks, GIL release, error mapping.
//!
//! Every argument is checked here before the core sees it (type, dtype, contiguity,
//! shape; finiteness is checked by the core without the GIL). Every failure becomes a
//! `TypeError`, a `bca.BcaError` (a `ValueError`; `bca.ShapeError` for shapes, sizes and
//! layouts, `bca.NonFiniteError` for NaN/Inf) or a `MemoryError` that names the argument
//! or the buffer; a panic, which the core should never raise, is caught and becomes a
//! `RuntimeError` rather than crossing into Python. Output arrays are allocated through numpy's C API
//! with the failure checked (numpy's own `MemoryError`), never with a helper that panics.
//!
//! Sharing and fork. An operator holds its current core operator in an `Arc`, swapped by
//! `set_kernel`. The slot's mutex is taken only with the GIL held and only to clone or
//! replace the `Arc` (no work, no allocation, no waiting under it), so no call waits for
//! another while holding the GIL, several threads run one operator at once, and a child
//! forked while other threads were inside the core finds nothing locked. The core itself
//! never waits on a lock (see operator.rs and threads.rs).
//!
//! Free-threaded CPython (3.13t/3.14t) is not supported: the extension is built for the
//! stable ABI (abi3), which free-threaded builds cannot load; the module declares that it
//! relies on the GIL.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};

use numpy::npyffi::{self, npy_intp, NpyTypes, PY_ARRAY_API};
use numpy::{
    Element, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn,
    PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyMemoryError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyType};

use crate::{bufpool, BcaError, BlockCirculant, Float};

// bca's exception hierarchy is defined once, in Python (python/bca/_errors.py: BcaError
// subclasses ValueError; ShapeError and NonFiniteError subclass BcaError), so that it
// exists without the extension too; the binding imports each class once.
static BCA_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SHAPE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static NON_FINITE_ERROR: PyOnceLock<Py<PyType>> = PyOnceLock::new();

fn bca_exception(cell: &'static PyOnceLock<Py<PyType>>, name: &str, message: String) -> PyErr {
    Python::attach(|py| match cell.import(py, "bca._errors", name) {
        Ok(ty) => PyErr::from_type(ty.clone(), message),
        Err(_) => PyValueError::new_err(message), // bca._errors missing: a plain ValueError
    })
}

/// `bca.BcaError` (a ValueError): a bad argument value.
fn bca_error(message: impl Into<String>) -> PyErr {
    bca_exception(&BCA_ERROR, "BcaError", message.into())
}

/// `bca.ShapeError` (a BcaError): a shape, size, width or memory layout that does not fit.
fn shape_error(message: impl Into<String>) -> PyErr {
    bca_exception(&SHAPE_ERROR, "ShapeError", message.into())
}

fn to_py_err(e: BcaError) -> PyErr {
    match e {
        // an adapter index out of range is a value; the binding checks the index array's
        // shape before the core sees it
        BcaError::InvalidArgument {
            arg: "adapter_index",
            ..
        } => bca_error(e.to_string()),
        // the core's other invalid arguments are shapes, sizes and geometries (shape.rs,
        // operator.rs, mixed.rs)
        BcaError::InvalidArgument { .. } => shape_error(e.to_string()),
        BcaError::NonFinite { .. } => {
            bca_exception(&NON_FINITE_ERROR, "NonFiniteError", e.to_string())
        }
        BcaError::OutOfMemory { .. } => PyMemoryError::new_err(e.to_string()),
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

/// The current core operator of a Python operator; see the module docs.
struct Slot<T: Float> {
    current: Mutex<Arc<BlockCirculant<T>>>,
}

impl<T: Float> Slot<T> {
    fn new(op: BlockCirculant<T>) -> Self {
        Slot {
            current: Mutex::new(Arc::new(op)),
        }
    }

    /// The current version (called with the GIL held: never contended).
    fn get(&self) -> Arc<BlockCirculant<T>> {
        match self.current.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the current version (called with the GIL held).
    fn set(&self, op: Arc<BlockCirculant<T>>) {
        let old = match self.current.lock() {
            Ok(mut g) => std::mem::replace(&mut *g, op),
            Err(p) => std::mem::replace(&mut *p.into_inner(), op),
        };
        drop(old); // freed outside the lock
    }
}

fn shape_str(shape: &[usize]) -> String {
    let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    if parts.len() == 1 {
        format!("({},)", parts[0])
    } else {
        format!("({})", parts.join(", "))
    }
}

/// A new C-contiguous array of `T` with shape `dims` (zero-filled when `zeroed`), or a
/// MemoryError naming `what` (numpy's message says the size) — never a panic.
fn new_array<'py, T: Float + Element>(
    py: Python<'py>,
    dims: &[usize],
    zeroed: bool,
    what: &'static str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let too_large = || {
        PyMemoryError::new_err(format!(
            "cannot allocate {what}: shape {} of {} is too large",
            shape_str(dims),
            T::NAME
        ))
    };
    let mut c_dims = dims
        .iter()
        .map(|&d| npy_intp::try_from(d).map_err(|_| too_large()))
        .collect::<PyResult<Vec<npy_intp>>>()?;
    // Total size in bytes must fit isize (a zero dimension makes the array empty).
    if !dims.contains(&0) {
        dims.iter()
            .try_fold(std::mem::size_of::<T>(), |acc, &d| acc.checked_mul(d))
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(too_large)?;
    }
    let nd = std::os::raw::c_int::try_from(c_dims.len()).map_err(|_| too_large())?;
    let bytes = dims.iter().product::<usize>() * std::mem::size_of::<T>(); // checked above
    if !zeroed && bufpool::pooled_size(bytes) {
        return pooled_array::<T>(py, &mut c_dims, nd, bytes, what);
    }
    // SAFETY: the numpy C API is called with the GIL held (`py`), a descriptor reference
    // that it steals, and `nd` dimensions; a null result leaves a Python error set, which
    // `from_owned_ptr_or_err` turns into `Err`.
    let ptr = unsafe {
        let descr = T::get_dtype(py).into_dtype_ptr();
        if zeroed {
            PY_ARRAY_API.PyArray_Zeros(py, nd, c_dims.as_mut_ptr(), descr, 0)
        } else {
            new_from_descr(py, descr, nd, &mut c_dims, std::ptr::null_mut(), 0)
        }
    };
    // SAFETY: a non-null result is a new reference to an ndarray of T's dtype.
    let obj = unsafe { Bound::from_owned_ptr_or_err(py, ptr) }.map_err(|e| {
        if e.is_instance_of::<PyMemoryError>(py) {
            PyMemoryError::new_err(format!("cannot allocate {what}: {}", e.value(py)))
        } else {
            e
        }
    })?;
    // SAFETY: see above; the dtype is T's.
    Ok(unsafe { obj.cast_into_unchecked() })
}

/// `PyArray_NewFromDescr` for a C-contiguous ndarray of `c_dims`: numpy allocates the
/// memory (`data` null, `flags` 0) or the array uses `data` with `flags`.
///
/// # Safety
/// GIL held (`py`); `descr` is a new descriptor reference (stolen); `nd` is the length of
/// `c_dims`; a non-null `data` holds the array's bytes for as long as the array lives.
unsafe fn new_from_descr(
    py: Python<'_>,
    descr: *mut npyffi::PyArray_Descr,
    nd: std::os::raw::c_int,
    c_dims: &mut [npy_intp],
    data: *mut std::ffi::c_void,
    flags: std::os::raw::c_int,
) -> *mut pyo3::ffi::PyObject {
    // SAFETY: the caller's contract.
    unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, NpyTypes::PyArray_Type),
            descr,
            nd,
            c_dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data,
            flags,
            std::ptr::null_mut(),
        )
    }
}

/// The owner of a pooled result's memory: the base object of the numpy array, which
/// gives the buffer back to the pool when the array (and every view of it) is gone.
#[pyclass(frozen, name = "_PooledBuffer", module = "bca._bca")]
struct PooledBuffer {
    words: bufpool::Words,
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        bufpool::OUTPUT_BUFFERS.give(std::mem::take(&mut self.words));
    }
}

/// A C-contiguous, writable array of `c_dims` (`bytes` bytes) whose memory comes from the
/// output pool (see bufpool.rs): uninitialised as far as the caller is concerned.
fn pooled_array<'py, T: Float + Element>(
    py: Python<'py>,
    c_dims: &mut [npy_intp],
    nd: std::os::raw::c_int,
    bytes: usize,
    what: &'static str,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let mut words = bufpool::OUTPUT_BUFFERS
        .take(bufpool::words_for(bytes), what)
        .map_err(|e| PyMemoryError::new_err(format!("cannot allocate {what}: {e}")))?;
    // The heap block does not move when the vector moves into its owner.
    let data = words.as_mut_ptr().cast::<std::ffi::c_void>();
    let owner = Bound::new(py, PooledBuffer { words })?;
    // SAFETY: GIL held; the descriptor reference is stolen; `data` points to at least
    // `bytes` bytes, 8-byte aligned, which stay valid while `owner` lives: the array
    // takes `owner` as its base (PyArray_SetBaseObject steals the reference, also on
    // failure), so the memory outlives the array and every view of it. A null array or a
    // failed SetBaseObject leaves a Python error set.
    unsafe {
        let descr = T::get_dtype(py).into_dtype_ptr();
        let arr = new_from_descr(py, descr, nd, c_dims, data, npyffi::NPY_ARRAY_CARRAY);
        let arr = Bound::from_owned_ptr_or_err(py, arr)?;
        let rc = PY_ARRAY_API.PyArray_SetBaseObject(
            py,
            arr.as_ptr().cast::<npyffi::PyArrayObject>(),
            owner.into_ptr(),
        );
        if rc != 0 {
            return Err(PyErr::fetch(py));
        }
        Ok(arr.cast_into_unchecked())
    }
}

/// Run the core's parallel loops on the OpenMP team of the already loaded runtime at
/// `path` (torch's libgomp; see openmp.rs). Returns whether it is in use.
#[pyfunction]
fn _attach_openmp(path: &str) -> bool {
    #[cfg(target_os = "linux")]
    {
        crate::openmp::attach(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = path;
        false
    }
}

/// Stop using the OpenMP team: rayon pools again.
#[pyfunction]
fn _detach_openmp() {
    #[cfg(target_os = "linux")]
    crate::openmp::detach();
}

/// Whether the core's parallel loops run on an OpenMP team now.
#[pyfunction]
fn _openmp_in_use() -> bool {
    #[cfg(target_os = "linux")]
    {
        crate::openmp::in_use()
    }
    #[cfg(not(target_os = "linux"))]
    false
}

/// Free the memory bca keeps for reuse between calls: idle result buffers and shared
/// scratch buffers. Returns the bytes freed.
#[pyfunction]
fn release_memory() -> usize {
    bufpool::OUTPUT_BUFFERS.clear() + crate::alloc::release_scratch()
}

/// A read-only borrow of an input array, or a BcaError naming `arg`.
fn read_view<'py, T: Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
    arg: &str,
) -> PyResult<PyReadonlyArrayDyn<'py, T>> {
    arr.try_readonly()
        .map_err(|e| bca_error(format!("{arg}: {e}")))
}

/// The data of a borrowed input array (C-contiguous), or a ShapeError naming `arg`.
fn as_slice<'a, T: Element>(ro: &'a PyReadonlyArrayDyn<'_, T>, arg: &str) -> PyResult<&'a [T]> {
    ro.as_slice()
        .map_err(|e| shape_error(format!("{arg}: {e}")))
}

/// A writable borrow of an output array this binding allocated.
fn write_view<'py, T: Element>(
    arr: &Bound<'py, PyArrayDyn<T>>,
) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    arr.try_readwrite()
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The data of a borrowed output array.
fn as_slice_mut<'a, T: Element>(rw: &'a mut PyReadwriteArrayDyn<'_, T>) -> PyResult<&'a mut [T]> {
    rw.as_slice_mut()
        .map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// `obj` as a C-contiguous ndarray of `T`, or a TypeError/ShapeError naming `arg`.
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
        return Err(shape_error(format!(
            "{arg} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    Ok(typed.clone())
}

/// Check that `arr`'s last dimension is `d`; return the number of rows (product of the
/// leading dimensions).
fn rows_of(arr: &Bound<'_, PyUntypedArray>, arg: &str, d: usize, what: &str) -> PyResult<usize> {
    let shape = arr.shape();
    match shape.split_last() {
        Some((&last, leading)) if last == d => {
            if leading.contains(&0) {
                return Ok(0);
            }
            leading
                .iter()
                .try_fold(1usize, |acc, &n| acc.checked_mul(n))
                .ok_or_else(|| {
                    shape_error(format!("{arg}: shape {} is too large", shape_str(shape)))
                })
        }
        _ => Err(shape_error(format!(
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

/// An optional non-negative integer argument (Python int or anything with `__index__`):
/// None stays None; a bool, a float or another type is a TypeError, a negative value or
/// one above `max` a BcaError — each naming `arg` (never an OverflowError).
fn count_arg(obj: Option<&Bound<'_, PyAny>>, arg: &str, max: u64) -> PyResult<Option<usize>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let type_err = || {
        let ty = obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into());
        PyTypeError::new_err(format!("{arg} must be an int or None, got {ty}"))
    };
    if obj.is_instance_of::<PyBool>() {
        return Err(type_err());
    }
    let range_err = || bca_error(format!("{arg} must be between 1 and {max}, got {obj}"));
    match obj.extract::<i64>() {
        Ok(v) if v >= 1 && (v as u64) <= max => Ok(Some(v as usize)),
        Ok(_) => Err(range_err()),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(range_err()),
        Err(_) => Err(type_err()),
    }
}

enum Inner {
    F32(Slot<f32>),
    F64(Slot<f64>),
}

/// Block circulant operator with cached kernel spectra (see bca._bca.pyi).
#[pyclass(name = "BlockCirculantOperator", module = "bca._bca", frozen)]
struct PyBlockCirculant {
    inner: Inner,
}

const MAX_THREADS: u64 = crate::threads::MAX_THREADS as u64;
const MAX_FEATURES: u64 = isize::MAX as u64;

fn parse_threads(num_threads: Option<&Bound<'_, PyAny>>) -> PyResult<usize> {
    Ok(count_arg(num_threads, "num_threads", MAX_THREADS)?.unwrap_or(0))
}

fn kernel_dims(kernel: &Bound<'_, PyUntypedArray>) -> PyResult<(usize, usize, usize)> {
    match kernel.shape() {
        &[q_out, q_in, p] => Ok((q_out, q_in, p)),
        s => Err(shape_error(format!(
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
) -> PyResult<Slot<T>> {
    let arr = typed_array::<T>(kernel, "kernel")?;
    let (q_out, q_in, p) = kernel_dims(arr.as_untyped())?;
    let ro = read_view(&arr, "kernel")?;
    let data = as_slice(&ro, "kernel")?;
    let op = run_detached(py, || {
        BlockCirculant::new(data, q_out, q_in, p, in_features, out_features)
    })?;
    op.set_num_threads(threads);
    Ok(Slot::new(op))
}

fn forward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    slot: &Slot<T>,
    x: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let op = slot.get();
    let shape = op.shape();
    let arr = typed_array::<T>(x, "x")?;
    let n = rows_of(arr.as_untyped(), "x", shape.in_features, "in_features")?;
    let dims = arr.shape().to_vec();
    let out_dims = out_shape(&dims[..dims.len() - 1], shape.out_features);
    // forward writes every element of `out` before it is returned; on error the array is
    // dropped unread.
    let out = new_array::<T>(py, &out_dims, false, "the output of forward")?;
    {
        let ro = read_view(&arr, "x")?;
        let xs = as_slice(&ro, "x")?;
        let mut rw = write_view(&out)?;
        let ys = as_slice_mut(&mut rw)?;
        run_detached(py, || op.forward(xs, n, ys))?;
    }
    Ok(out.into_any())
}

type Grads<'py> = (Option<Bound<'py, PyAny>>, Option<Bound<'py, PyAny>>);

fn backward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    slot: &Slot<T>,
    x: Option<&Bound<'py, PyAny>>,
    grad_output: &Bound<'py, PyAny>,
    input_grad: bool,
    kernel_grad: bool,
) -> PyResult<Grads<'py>> {
    let op = slot.get();
    let s = op.shape();
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
                return Err(shape_error(format!(
                    "x and grad_output must have the same leading dimensions, got {} and {}",
                    shape_str(a.shape()),
                    shape_str(&g_dims)
                )));
            }
            Some(a)
        }
        (None, true) => {
            return Err(bca_error(
                "x: needed for the kernel gradient (pass x, or kernel_grad=False)",
            ))
        }
        (_, false) => None,
    };
    // backward writes every element of grad_x before it is returned; on error the array
    // is dropped unread. The kernel gradient is zero-filled.
    let gx = match input_grad {
        true => Some(new_array::<T>(
            py,
            &out_shape(leading, s.in_features),
            false,
            "the input gradient",
        )?),
        false => None,
    };
    let gk = match kernel_grad {
        true => Some(new_array::<T>(
            py,
            &[s.q_out, s.q_in, s.p],
            true,
            "the kernel gradient",
        )?),
        false => None,
    };
    {
        let g_ro = read_view(&g, "grad_output")?;
        let gs = as_slice(&g_ro, "grad_output")?;
        let x_ro = x_arr.as_ref().map(|a| read_view(a, "x")).transpose()?;
        let xs = x_ro.as_ref().map(|r| as_slice(r, "x")).transpose()?;
        let mut gx_rw = gx.as_ref().map(write_view).transpose()?;
        let mut gk_rw = gk.as_ref().map(write_view).transpose()?;
        let gx_s = gx_rw.as_mut().map(as_slice_mut).transpose()?;
        let gk_s = gk_rw.as_mut().map(as_slice_mut).transpose()?;
        run_detached(py, || op.backward(xs, gs, n, gx_s, gk_s))?;
    }
    Ok((gx.map(|a| a.into_any()), gk.map(|a| a.into_any())))
}

/// `kernel` as an array of `op`'s dtype and kernel shape, or the error naming it.
fn kernel_like<'py, T: Float + Element>(
    op: &BlockCirculant<T>,
    kernel: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArrayDyn<T>>> {
    let s = op.shape();
    let arr = typed_array::<T>(kernel, "kernel")?;
    let dims = kernel_dims(arr.as_untyped())?;
    if dims != (s.q_out, s.q_in, s.p) {
        return Err(shape_error(format!(
            "kernel must keep its shape ({}, {}, {}), got {}",
            s.q_out,
            s.q_in,
            s.p,
            shape_str(arr.shape())
        )));
    }
    Ok(arr)
}

/// Kernels of at least this many elements are compared with the GIL released.
const DETACHED_COMPARE: usize = 1 << 15;

/// Set a new kernel (same shape and dtype) and recompute the spectra; with `only_if_changed`,
/// keep the operator when the kernel holds exactly (bitwise) its current values. Returns
/// whether the kernel was set.
fn set_kernel_impl<T: Float + Element>(
    py: Python<'_>,
    slot: &Slot<T>,
    kernel: &Bound<'_, PyAny>,
    only_if_changed: bool,
) -> PyResult<bool> {
    let op = slot.get();
    let arr = kernel_like::<T>(&op, kernel)?;
    let ro = read_view(&arr, "kernel")?;
    let data = as_slice(&ro, "kernel")?;
    if only_if_changed {
        let same = if data.len() >= DETACHED_COMPARE {
            run_detached(py, || Ok(op.same_kernel(data)))?
        } else {
            op.same_kernel(data)
        };
        if same {
            return Ok(false);
        }
    }
    let new = run_detached(py, || op.with_kernel(data))?;
    // A thread bound set while the spectra were computed (with the GIL held, as now).
    new.set_num_threads(slot.get().num_threads());
    slot.set(Arc::new(new));
    Ok(true)
}

fn kernel_impl<'py, T: Float + Element>(
    py: Python<'py>,
    slot: &Slot<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let op = slot.get();
    let s = op.shape();
    let out = new_array::<T>(py, &[s.q_out, s.q_in, s.p], false, "the kernel copy")?;
    {
        let mut rw = write_view(&out)?;
        as_slice_mut(&mut rw)?.copy_from_slice(op.kernel());
    }
    Ok(out.into_any())
}

fn dense_impl<'py, T: Float + Element>(
    py: Python<'py>,
    slot: &Slot<T>,
) -> PyResult<Bound<'py, PyAny>> {
    let op = slot.get();
    let s = op.shape();
    let out = new_array::<T>(
        py,
        &[s.out_features, s.in_features],
        false,
        "the dense matrix",
    )?;
    {
        let mut rw = write_view(&out)?;
        let dense = as_slice_mut(&mut rw)?;
        run_detached(py, || op.to_dense_into(dense))?;
    }
    Ok(out.into_any())
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
        dispatch!(self, l => l.get().shape())
    }
}

#[pymethods]
impl PyBlockCirculant {
    #[new]
    #[pyo3(signature = (kernel, in_features=None, out_features=None, *, num_threads=None))]
    fn new(
        py: Python<'_>,
        kernel: &Bound<'_, PyAny>,
        in_features: Option<&Bound<'_, PyAny>>,
        out_features: Option<&Bound<'_, PyAny>>,
        num_threads: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let threads = parse_threads(num_threads)?;
        let in_features = count_arg(in_features, "in_features", MAX_FEATURES)?;
        let out_features = count_arg(out_features, "out_features", MAX_FEATURES)?;
        let untyped = kernel.cast::<PyUntypedArray>().map_err(|_| {
            PyTypeError::new_err("kernel must be a numpy.ndarray of float32 or float64")
        })?;
        let dtype = untyped.dtype();
        let inner = if dtype.is_equiv_to(&numpy::dtype::<f32>(py)) {
            Inner::F32(build::<f32>(
                py,
                kernel,
                in_features,
                out_features,
                threads,
            )?)
        } else if dtype.is_equiv_to(&numpy::dtype::<f64>(py)) {
            Inner::F64(build::<f64>(
                py,
                kernel,
                in_features,
                out_features,
                threads,
            )?)
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
        dispatch!(self, l => set_kernel_impl(py, l, kernel, false)).map(|_| ())
    }

    /// Replace the kernel (same shape and dtype) unless it holds exactly (bitwise) the
    /// current values; returns whether it was replaced (and the spectra recomputed).
    fn sync_kernel(&self, py: Python<'_>, kernel: &Bound<'_, PyAny>) -> PyResult<bool> {
        dispatch!(self, l => set_kernel_impl(py, l, kernel, true))
    }

    /// Set this operator's thread bound; None means the process default.
    #[pyo3(signature = (num_threads))]
    fn set_num_threads(&self, num_threads: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
        let n = parse_threads(num_threads)?;
        dispatch!(self, l => l.get().set_num_threads(n));
        Ok(())
    }

    #[getter]
    fn num_threads(&self) -> Option<usize> {
        let n = dispatch!(self, l => l.get().num_threads());
        (n != 0).then_some(n)
    }

    /// Bytes the operator keeps between calls (kernel, spectra, idle workspaces).
    #[getter]
    fn retained_bytes(&self) -> usize {
        dispatch!(self, l => l.get().retained_bytes())
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
/// (BCA_NUM_THREADS, else RAYON_NUM_THREADS, else the number of cores), re-reading the
/// environment now, with the GIL held.
#[pyfunction]
#[pyo3(signature = (num_threads))]
fn set_num_threads(num_threads: Option<&Bound<'_, PyAny>>) -> PyResult<()> {
    let n = parse_threads(num_threads)?;
    if n == 0 {
        crate::threads::refresh_env_default();
    }
    crate::set_default_num_threads(n);
    Ok(())
}

/// The process-wide default thread count of the core.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::default_num_threads()
}

#[pymodule(gil_used = true)]
fn _bca(m: &Bound<'_, PyModule>) -> PyResult<()> {
    // Read the thread-count environment once, now, with the GIL held; calls without the
    // GIL use the cached value (see threads.rs).
    crate::threads::refresh_env_default();
    m.add_class::<PyBlockCirculant>()?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(release_memory, m)?)?;
    m.add_function(wrap_pyfunction!(_attach_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(_detach_openmp, m)?)?;
    m.add_function(wrap_pyfunction!(_openmp_in_use, m)?)?;
    m.add_function(wrap_pyfunction!(py_mixed_forward, m)?)?;
    m.add_function(wrap_pyfunction!(py_mixed_backward, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

// -------------------------------------------------------------------------------------
// Mixed-adapter batches (mixed.rs): one call, an operator per row.
// -------------------------------------------------------------------------------------

/// The core operators of a mixed call, all of one dtype.
enum MixedOps {
    F32(Vec<Arc<BlockCirculant<f32>>>),
    F64(Vec<Arc<BlockCirculant<f64>>>),
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "?".into())
}

/// `operators` (a list or tuple of BlockCirculantOperator of one dtype) as core operators
/// (their current versions), or a TypeError/BcaError naming the argument.
fn mixed_ops(operators: &Bound<'_, PyAny>) -> PyResult<MixedOps> {
    let seq_err = || {
        PyTypeError::new_err(format!(
            "operators must be a list of bca._bca.BlockCirculantOperator, got {}",
            type_name(operators)
        ))
    };
    if !(operators.is_instance_of::<pyo3::types::PyList>()
        || operators.is_instance_of::<pyo3::types::PyTuple>())
    {
        return Err(seq_err());
    }
    let items: Vec<Bound<'_, PyAny>> = operators.extract().map_err(|_| seq_err())?;
    let mut ops = None;
    for (a, item) in items.iter().enumerate() {
        let op = item.cast::<PyBlockCirculant>().map_err(|_| {
            PyTypeError::new_err(format!(
                "operators[{a}] must be a bca._bca.BlockCirculantOperator, got {}",
                type_name(item)
            ))
        })?;
        let op = op.get();
        let ops = ops.get_or_insert_with(|| match op.inner {
            Inner::F32(_) => MixedOps::F32(Vec::new()),
            Inner::F64(_) => MixedOps::F64(Vec::new()),
        });
        match (ops, &op.inner) {
            (MixedOps::F32(v), Inner::F32(slot)) => v.push(slot.get()),
            (MixedOps::F64(v), Inner::F64(slot)) => v.push(slot.get()),
            (ops, _) => {
                let first = match ops {
                    MixedOps::F32(_) => f32::NAME,
                    MixedOps::F64(_) => f64::NAME,
                };
                return Err(PyTypeError::new_err(format!(
                    "operators[{a}] has dtype {}, operators[0] {first}: a mixed batch needs \
                     one dtype",
                    op.dtype()
                )));
            }
        }
    }
    ops.ok_or_else(|| bca_error("operators: at least one operator is needed"))
}

fn as_refs<T: Float>(ops: &[Arc<BlockCirculant<T>>]) -> Vec<&BlockCirculant<T>> {
    ops.iter().map(|a| &**a).collect()
}

/// `adapter_index` as a C-contiguous int64 array of shape `leading` (x's leading axes).
fn index_array<'py>(
    obj: &Bound<'py, PyAny>,
    leading: &[usize],
) -> PyResult<Bound<'py, PyArrayDyn<i64>>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "adapter_index must be a numpy.ndarray of int64, got {}",
            type_name(obj)
        ))
    })?;
    let typed = obj.cast::<PyArrayDyn<i64>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "adapter_index must have dtype int64, got {}",
            untyped.dtype()
        ))
    })?;
    if !untyped.is_c_contiguous() {
        return Err(shape_error(
            "adapter_index must be C-contiguous (use numpy.ascontiguousarray)",
        ));
    }
    if untyped.shape() != leading {
        return Err(shape_error(format!(
            "adapter_index: shape must be the leading dimensions of the rows {}, got {}",
            shape_str(leading),
            shape_str(untyped.shape())
        )));
    }
    Ok(typed.clone())
}

/// `scales` (one finite float per operator) in the operators' dtype, or None.
fn mixed_scales<T: Float>(
    scales: Option<&Bound<'_, PyAny>>,
    n_ops: usize,
) -> PyResult<Option<Vec<T>>> {
    let Some(obj) = scales.filter(|o| !o.is_none()) else {
        return Ok(None);
    };
    let values: Vec<f64> = obj.extract().map_err(|_| {
        PyTypeError::new_err(format!(
            "scales must be a list of floats, one per operator, got {}",
            type_name(obj)
        ))
    })?;
    if values.len() != n_ops {
        return Err(bca_error(format!(
            "scales: expected one per operator ({n_ops}), got {}",
            values.len()
        )));
    }
    // Rounded to the operators' dtype once, as numpy's astype would; finite there too.
    let mut out = Vec::with_capacity(values.len());
    for (a, &v) in values.iter().enumerate() {
        match <T as num_traits::NumCast>::from(v).filter(|t| t.is_finite() && v.is_finite()) {
            Some(t) => out.push(t),
            None => {
                return Err(bca_error(format!(
                    "scales[{a}] must be a finite {} value, got {v:?}",
                    T::NAME
                )))
            }
        }
    }
    Ok(Some(out))
}

/// Row `r` of a mixed product finished in place: `add[r] + scale · y[r]` (`add` absent:
/// no sum; `scale` absent, or a row without an operator, whose `y` is zero: no
/// product). Each value is `y · s` rounded and then the sum rounded (no FMA), as numpy's
/// `y *= s; add + y` gives.
fn finish_row<T: Float>(row: &mut [T], add: Option<&[T]>, scale: Option<T>) {
    match (add, scale) {
        (Some(b), Some(f)) => row.iter_mut().zip(b).for_each(|(v, &b)| *v = b + *v * f),
        (Some(b), None) => row.iter_mut().zip(b).for_each(|(v, &b)| *v = b + *v),
        (None, Some(f)) => row.iter_mut().for_each(|v| *v = *v * f),
        (None, None) => {}
    }
}

fn mixed_forward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    ops: &[Arc<BlockCirculant<T>>],
    adapter_index: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    scales: Option<&Bound<'py, PyAny>>,
    add: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let s = crate::mixed_geometry(&as_refs(ops)).map_err(to_py_err)?;
    let arr = typed_array::<T>(x, "x")?;
    let n = rows_of(arr.as_untyped(), "x", s.in_features, "in_features")?;
    let dims = arr.shape().to_vec();
    let leading = &dims[..dims.len() - 1];
    let idx = index_array(adapter_index, leading)?;
    let scales = mixed_scales::<T>(scales, ops.len())?;
    let shape = out_shape(leading, s.out_features);
    let add = match add.filter(|o| !o.is_none()) {
        Some(obj) => {
            let a = typed_array::<T>(obj, "add")?;
            if a.shape() != &shape[..] {
                return Err(shape_error(format!(
                    "add: shape must be the output's {}, got {}",
                    shape_str(&shape),
                    shape_str(a.shape())
                )));
            }
            Some(a)
        }
        None => None,
    };
    let out = new_array::<T>(py, &shape, false, "the output")?;
    {
        let ro = read_view(&arr, "x")?;
        let xs = as_slice(&ro, "x")?;
        let idx_ro = read_view(&idx, "adapter_index")?;
        let is = as_slice(&idx_ro, "adapter_index")?;
        let add_ro = add.as_ref().map(|a| read_view(a, "add")).transpose()?;
        let add_s = add_ro.as_ref().map(|r| as_slice(r, "add")).transpose()?;
        let mut rw = write_view(&out)?;
        let ys = as_slice_mut(&mut rw)?;
        let sc = scales.as_deref();
        let d = s.out_features;
        // scale and add each row on its thread right after it is computed
        let finish = |r: usize, a: Option<usize>, row: &mut [T]| {
            let scale = sc.zip(a).and_then(|(sc, a)| sc.get(a).copied());
            finish_row(row, add_s.map(|b| &b[r * d..(r + 1) * d]), scale);
        };
        let finish: Option<&crate::RowFinish<'_, T>> = match add_s.is_some() || sc.is_some() {
            true => Some(&finish),
            false => None,
        };
        run_detached(py, || {
            crate::mixed_forward_with(&as_refs(ops), is, xs, n, ys, finish)
        })?;
    }
    Ok(out.into_any())
}

type MixedGrads<'py> = (Option<Bound<'py, PyAny>>, Vec<Option<Bound<'py, PyAny>>>);

fn mixed_backward_impl<'py, T: Float + Element>(
    py: Python<'py>,
    ops: &[Arc<BlockCirculant<T>>],
    adapter_index: &Bound<'py, PyAny>,
    x: Option<&Bound<'py, PyAny>>,
    grad_output: &Bound<'py, PyAny>,
    input_grad: bool,
    kernel_grad: bool,
) -> PyResult<MixedGrads<'py>> {
    let s = crate::mixed_geometry(&as_refs(ops)).map_err(to_py_err)?;
    let g = typed_array::<T>(grad_output, "grad_output")?;
    let n = rows_of(
        g.as_untyped(),
        "grad_output",
        s.out_features,
        "out_features",
    )?;
    let g_dims = g.shape().to_vec();
    let leading = &g_dims[..g_dims.len() - 1];
    let idx = index_array(adapter_index, leading)?;
    let x_arr = match (x, kernel_grad) {
        (Some(x), true) => {
            let a = typed_array::<T>(x, "x")?;
            rows_of(a.as_untyped(), "x", s.in_features, "in_features")?;
            if &a.shape()[..a.ndim() - 1] != leading {
                return Err(shape_error(format!(
                    "x and grad_output must have the same leading dimensions, got {} and {}",
                    shape_str(a.shape()),
                    shape_str(&g_dims)
                )));
            }
            Some(a)
        }
        (None, true) => {
            return Err(bca_error(
                "x: needed for the kernel gradients (pass x, or kernel_grad=False)",
            ))
        }
        (_, false) => None,
    };
    // The input gradient is written everywhere before it is returned; the kernel
    // gradients are zero-filled.
    let gx = match input_grad {
        true => Some(new_array::<T>(
            py,
            &out_shape(leading, s.in_features),
            false,
            "the input gradient",
        )?),
        false => None,
    };
    let mut gks = Vec::new();
    if kernel_grad {
        for _ in ops {
            gks.push(new_array::<T>(
                py,
                &[s.q_out, s.q_in, s.p],
                true,
                "a kernel gradient",
            )?);
        }
    }
    {
        let g_ro = read_view(&g, "grad_output")?;
        let gs = as_slice(&g_ro, "grad_output")?;
        let idx_ro = read_view(&idx, "adapter_index")?;
        let is = as_slice(&idx_ro, "adapter_index")?;
        let x_ro = x_arr.as_ref().map(|a| read_view(a, "x")).transpose()?;
        let xs = x_ro.as_ref().map(|r| as_slice(r, "x")).transpose()?;
        let mut gx_rw = gx.as_ref().map(write_view).transpose()?;
        let gx_s = gx_rw.as_mut().map(as_slice_mut).transpose()?;
        let mut gk_rw = gks.iter().map(write_view).collect::<PyResult<Vec<_>>>()?;
        let mut gk_s = gk_rw
            .iter_mut()
            .map(as_slice_mut)
            .collect::<PyResult<Vec<&mut [T]>>>()?;
        let gk_arg = match kernel_grad {
            true => Some(&mut gk_s[..]),
            false => None,
        };
        run_detached(py, || {
            crate::mixed_backward(&as_refs(ops), is, xs, gs, n, gx_s, gk_arg)
        })?;
    }
    let gk_out = match kernel_grad {
        true => gks.into_iter().map(|a| Some(a.into_any())).collect(),
        false => ops.iter().map(|_| None).collect(),
    };
    Ok((gx.map(|a| a.into_any()), gk_out))
}

/// The typed slot of an operator of dtype `Self`.
trait SlotOf: Float + Element {
    fn slot(inner: &Inner) -> Option<&Slot<Self>>;
}

impl SlotOf for f32 {
    fn slot(inner: &Inner) -> Option<&Slot<f32>> {
        match inner {
            Inner::F32(l) => Some(l),
            Inner::F64(_) => None,
        }
    }
}

impl SlotOf for f64 {
    fn slot(inner: &Inner) -> Option<&Slot<f64>> {
        match inner {
            Inner::F64(l) => Some(l),
            Inner::F32(_) => None,
        }
    }
}

/// For `kernels` (one array per operator, `kernels=` of `mixed_forward`), the operators
/// whose kernel differs (bitwise) from the given one, rebuilt with it (new spectra, the
/// same thread bound), by position; nothing is installed yet. The comparisons run in
/// one parallel pass without the GIL (`same_kernels`). Errors name `kernels[a]`.
fn changed_operators<T: SlotOf>(
    py: Python<'_>,
    ops: &[Arc<BlockCirculant<T>>],
    kernels: &Bound<'_, PyAny>,
) -> PyResult<Vec<(usize, Arc<BlockCirculant<T>>)>> {
    let list_err = || {
        PyTypeError::new_err(format!(
            "kernels must be a list of arrays, one per operator, got {}",
            type_name(kernels)
        ))
    };
    let ks: Vec<Bound<'_, PyAny>> = match kernels.is_instance_of::<pyo3::types::PyList>()
        || kernels.is_instance_of::<pyo3::types::PyTuple>()
    {
        true => kernels.extract().map_err(|_| list_err())?,
        false => return Err(list_err()),
    };
    if ks.len() != ops.len() {
        return Err(bca_error(format!(
            "kernels: expected one per operator ({}), got {}",
            ops.len(),
            ks.len()
        )));
    }
    let named = |a: usize, e: PyErr| {
        PyErr::from_type(e.get_type(py), format!("kernels[{a}]: {}", e.value(py)))
    };
    let arrays = ops
        .iter()
        .zip(&ks)
        .enumerate()
        .map(|(a, (op, k))| kernel_like::<T>(op, k).map_err(|e| named(a, e)))
        .collect::<PyResult<Vec<_>>>()?;
    let views = arrays
        .iter()
        .enumerate()
        .map(|(a, arr)| read_view(arr, "kernel").map_err(|e| named(a, e)))
        .collect::<PyResult<Vec<_>>>()?;
    let data = views
        .iter()
        .enumerate()
        .map(|(a, v)| as_slice(v, "kernel").map_err(|e| named(a, e)))
        .collect::<PyResult<Vec<&[T]>>>()?;
    let refs: Vec<&BlockCirculant<T>> = ops.iter().map(|o| o.as_ref()).collect();
    let same = run_detached(py, || Ok(crate::same_kernels(&refs, &data)))?;
    let mut changed = Vec::new();
    for (a, op) in ops.iter().enumerate() {
        if !same[a] {
            let new = run_detached(py, || op.with_kernel(data[a])).map_err(|e| named(a, e))?;
            new.set_num_threads(op.num_threads());
            changed.push((a, Arc::new(new)));
        }
    }
    Ok(changed)
}

/// A mixed forward; with `kernels`, each operator first takes its kernel where it differs,
/// and the new operators are installed only once the whole call has succeeded (an error
/// anywhere leaves every operator as it was).
#[allow(clippy::too_many_arguments)]
fn mixed_forward_synced<'py, T: SlotOf>(
    py: Python<'py>,
    operators: &Bound<'py, PyAny>,
    mut ops: Vec<Arc<BlockCirculant<T>>>,
    adapter_index: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    scales: Option<&Bound<'py, PyAny>>,
    add: Option<&Bound<'py, PyAny>>,
    kernels: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    let changed = match kernels.filter(|k| !k.is_none()) {
        Some(k) => changed_operators(py, &ops, k)?,
        None => Vec::new(),
    };
    for (a, new) in &changed {
        ops[*a] = new.clone();
    }
    let out = mixed_forward_impl(py, &ops, adapter_index, x, scales, add)?;
    if !changed.is_empty() {
        let items: Vec<Bound<'py, PyAny>> = operators.extract()?;
        for (a, new) in changed {
            let op = items[a].cast::<PyBlockCirculant>()?.get();
            if let Some(slot) = T::slot(&op.inner) {
                slot.set(new);
            }
        }
    }
    Ok(out)
}

/// `y[r] = ΔW_{adapter_index[r]} x[r]` over the last axis of `x`, each row with its own
/// operator (-1: no adapter, a zero row); see bca._bca.pyi.
#[pyfunction]
#[pyo3(
    name = "mixed_forward",
    signature = (operators, adapter_index, x, *, scales=None, add=None, kernels=None)
)]
#[allow(clippy::too_many_arguments)]
fn py_mixed_forward<'py>(
    py: Python<'py>,
    operators: &Bound<'py, PyAny>,
    adapter_index: &Bound<'py, PyAny>,
    x: &Bound<'py, PyAny>,
    scales: Option<&Bound<'py, PyAny>>,
    add: Option<&Bound<'py, PyAny>>,
    kernels: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyAny>> {
    match mixed_ops(operators)? {
        MixedOps::F32(ops) => {
            mixed_forward_synced(py, operators, ops, adapter_index, x, scales, add, kernels)
        }
        MixedOps::F64(ops) => {
            mixed_forward_synced(py, operators, ops, adapter_index, x, scales, add, kernels)
        }
    }
}

/// Gradients of `sum(grad_output * mixed_forward(operators, adapter_index, x))`.
#[pyfunction]
#[pyo3(
    name = "mixed_backward",
    signature = (operators, adapter_index, x, grad_output, *, input_grad=true, kernel_grad=true)
)]
fn py_mixed_backward<'py>(
    py: Python<'py>,
    operators: &Bound<'py, PyAny>,
    adapter_index: &Bound<'py, PyAny>,
    x: Option<&Bound<'py, PyAny>>,
    grad_output: &Bound<'py, PyAny>,
    input_grad: bool,
    kernel_grad: bool,
) -> PyResult<MixedGrads<'py>> {
    match mixed_ops(operators)? {
        MixedOps::F32(ops) => mixed_backward_impl(
            py,
            &ops,
            adapter_index,
            x,
            grad_output,
            input_grad,
            kernel_grad,
        ),
        MixedOps::F64(ops) => mixed_backward_impl(
            py,
            &ops,
            adapter_index,
            x,
            grad_output,
            input_grad,
            kernel_grad,
        ),
    }
}

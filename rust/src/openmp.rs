//! Running the core's parallel loops on an OpenMP team that the process already has.
//!
//! torch runs its CPU kernels on an OpenMP (libgomp) team whose worker threads spin for
//! a while after every parallel region (libgomp's default spin lasts milliseconds). When
//! the core ran its own rayon workers right after a torch operation, those spinning
//! threads took the cores: a training step of the rust backend at d = 768, N = 512 took
//! 1.8 ms on two threads after itself, 2.7 ms after a LoRA step and 4.2 ms after PEFT
//! C3A's. Running the same tasks on torch's team instead uses the very threads that are
//! spinning, ready for work.
//!
//! `bca.nn` attaches the team's library after importing torch ([`attach`], given the path
//! of the already loaded libgomp; `BCA_OPENMP=0` turns it off). Only `GOMP_parallel` is
//! used, from the library that is loaded already (`RTLD_NOLOAD`: nothing is loaded here).
//! Tasks are claimed in index order from a shared counter by every thread of the team,
//! the caller included; which thread runs a task never changes its result. A panic in a
//! task is caught on its thread (it never unwinds through C) and resumed on the caller.
//! After `fork` the team's threads are gone: a child process never uses it (the pid is
//! checked) and runs on rayon as before.
#![cfg_attr(not(feature = "python"), allow(dead_code))]

use std::ffi::{c_char, c_int, c_uint, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

type GompFn = extern "C" fn(*mut c_void);
type GompParallel = unsafe extern "C" fn(GompFn, *mut c_void, c_uint, c_uint);

#[link(name = "dl")]
extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
}
const RTLD_LAZY: c_int = 0x1;
const RTLD_NOLOAD: c_int = 0x4;

struct Team {
    parallel: GompParallel,
    pid: u32,
}

static TEAM: OnceLock<Team> = OnceLock::new();
/// Off after `detach`; on again after a successful `attach`.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Use the OpenMP runtime of the already loaded library at `path` (libgomp, or a runtime
/// with its GOMP_ entry points). Returns whether it is in use now. Nothing is loaded:
/// a library that is not in the process already is refused.
pub(crate) fn attach(path: &str) -> bool {
    if let Some(team) = TEAM.get() {
        let ok = team.pid == std::process::id();
        ENABLED.store(ok, Ordering::Relaxed);
        return ok;
    }
    let Ok(c_path) = CString::new(path) else {
        return false;
    };
    // SAFETY: dlopen with RTLD_NOLOAD only returns a handle to a library already loaded
    // (no initialisers run); dlsym reads its symbol table. The symbol, when found, is
    // libgomp's `void GOMP_parallel(void (*)(void *), void *, unsigned, unsigned)`.
    let parallel = unsafe {
        let handle = dlopen(c_path.as_ptr(), RTLD_LAZY | RTLD_NOLOAD);
        if handle.is_null() {
            return false;
        }
        let sym = dlsym(handle, c"GOMP_parallel".as_ptr());
        if sym.is_null() {
            return false;
        }
        std::mem::transmute::<*mut c_void, GompParallel>(sym)
    };
    let team = TEAM.get_or_init(|| Team {
        parallel,
        pid: std::process::id(),
    });
    let ok = team.pid == std::process::id();
    ENABLED.store(ok, Ordering::Relaxed);
    ok
}

/// Stop using the OpenMP team (rayon again).
pub(crate) fn detach() {
    ENABLED.store(false, Ordering::Relaxed);
}

/// The team's entry point when it may be used now: attached, enabled, same process.
fn team() -> Option<&'static Team> {
    if !ENABLED.load(Ordering::Relaxed) {
        return None;
    }
    TEAM.get().filter(|t| t.pid == std::process::id())
}

/// Whether calls run on the OpenMP team now.
pub(crate) fn in_use() -> bool {
    team().is_some()
}

extern "C" fn run_work(data: *mut c_void) {
    // SAFETY: `data` is the `&&(dyn Fn() + Sync)` that `try_for_each` passed to
    // GOMP_parallel, alive until GOMP_parallel returns (after every thread has left here).
    let work = unsafe { &*data.cast::<&(dyn Fn() + Sync)>() };
    // Nothing may unwind into C: `work` catches every task's panic.
    let _ = catch_unwind(AssertUnwindSafe(work));
}

/// Run `f` on every item on `threads` threads of the team (the caller is one of them);
/// the first error by item index is returned, a panic is resumed here. `None` when the
/// team is not in use (the caller then runs the items another way).
pub(crate) fn try_for_each<I: Send, E: Send>(
    threads: usize,
    items: Vec<I>,
    f: &(dyn Fn(I) -> Result<(), E> + Sync),
) -> Result<Result<(), E>, Vec<I>> {
    let Some(team) = team() else {
        return Err(items);
    };
    let n = c_uint::try_from(threads.min(items.len()).max(1)).unwrap_or(c_uint::MAX);
    Ok(crate::threads::run_claimed(items, f, |work| {
        // SAFETY: GOMP_parallel runs `run_work(&work)` on n threads and returns when all
        // have finished; `work` outlives the call and is only shared (`Sync`).
        unsafe {
            (team.parallel)(run_work, std::ptr::from_ref(&work).cast_mut().cast(), n, 0);
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Load the system's libgomp (the test process has none); false when there is none.
    fn load_libgomp() -> bool {
        const RTLD_NOW: c_int = 0x2;
        // SAFETY: loading a shared library by its soname; null when it is not installed.
        let handle = unsafe { dlopen(c"libgomp.so.1".as_ptr(), RTLD_NOW) };
        !handle.is_null()
    }

    // One test: the attachment is process-wide state.
    #[test]
    fn tasks_run_once_each_errors_and_panics_come_back() {
        assert!(!attach("/nonexistent/libgomp.so.1"));
        assert!(!in_use());
        if !load_libgomp() {
            eprintln!("no libgomp.so.1 on this machine: skipped");
            return;
        }
        assert!(attach("libgomp.so.1"));
        assert!(in_use());
        crate::threads::tests::check_runner(&|items, f| {
            try_for_each(4, items, f).unwrap_or_else(|_| panic!("the team is attached"))
        });
        // still usable; detached, the caller gets its items back
        assert_eq!(
            try_for_each(2, vec![1, 2], &|_: i32| -> Result<(), ()> { Ok(()) }),
            Ok(Ok(()))
        );
        detach();
        assert!(!in_use());
        assert_eq!(
            try_for_each(2, vec![1, 2], &|_: i32| -> Result<(), ()> { Ok(()) }),
            Err(vec![1, 2])
        );
        assert!(attach("libgomp.so.1"));
        detach();
    }
}

//! Thread pools with a caller-settable bound.
//!
//! rayon's global pool would take every core and oversubscribe a process that also runs
//! torch's threads, so bca keeps its own pools, one per thread count, created lazily.
//!
//! Environment. `BCA_NUM_THREADS` / `RAYON_NUM_THREADS` are read once (on first use, or
//! when [`refresh_env_default`] is called) and cached: a call that runs without the GIL
//! must never read the environment, which a Python thread may be writing at that moment
//! (`os.environ[...] = ...` calls `setenv`, and `getenv` racing it can crash).
//!
//! Fork. Pools do not survive `fork`: the registry remembers the pid that made them and
//! makes new ones in a child process. The registry's lock is only ever *tried*: a child
//! forked while another thread held it (building a pool) finds it taken forever, and then
//! runs its calls on the calling thread instead of waiting. Results do not depend on the
//! thread count, so this costs speed, never correctness.

use std::collections::HashMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, TryLockError};

use rayon::{ThreadPool, ThreadPoolBuilder};

#[cfg(target_os = "linux")]
use crate::openmp;

/// No OpenMP team outside Linux: every call runs on rayon.
#[cfg(not(target_os = "linux"))]
mod openmp {
    pub(crate) fn in_use() -> bool {
        false
    }

    pub(crate) fn try_for_each<I, E>(
        _threads: usize,
        items: Vec<I>,
        _f: &(dyn Fn(I) -> Result<(), E> + Sync),
    ) -> Result<Result<(), E>, Vec<I>> {
        Err(items)
    }
}

/// Most threads a pool may have (a bound on what callers can ask for).
pub const MAX_THREADS: usize = 4096;

/// Set by [`set_default_num_threads`]; 0 = not set.
static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);
/// The environment/core default, cached; 0 = not read yet.
static ENV_DEFAULT: AtomicUsize = AtomicUsize::new(0);

struct Registry {
    pid: u32,
    pools: HashMap<usize, Arc<ThreadPool>>,
}

static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();

/// Parse a thread-count environment value: a positive integer, at most [`MAX_THREADS`].
fn parse_env(value: &str) -> Option<usize> {
    value
        .trim()
        .parse::<usize>()
        .ok()
        .filter(|&n| (1..=MAX_THREADS).contains(&n))
}

fn read_env_default() -> usize {
    ["BCA_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .find_map(|v| parse_env(&v))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(MAX_THREADS)
        })
}

/// Re-read `BCA_NUM_THREADS`, `RAYON_NUM_THREADS` and the core count, and cache the
/// result. The Python binding calls this at import and from `set_num_threads(None)`, with
/// the GIL held, so no Python thread writes the environment meanwhile.
pub fn refresh_env_default() -> usize {
    let n = read_env_default();
    ENV_DEFAULT.store(n, Ordering::Relaxed);
    n
}

/// The thread count used when an operator does not set its own: the value given to
/// [`set_default_num_threads`], else `BCA_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the
/// number of available cores. The environment part is read once and cached (see
/// [`refresh_env_default`]).
pub fn default_num_threads() -> usize {
    match DEFAULT_THREADS.load(Ordering::Relaxed) {
        0 => match ENV_DEFAULT.load(Ordering::Relaxed) {
            0 => refresh_env_default(),
            n => n,
        },
        n => n,
    }
}

/// Set the process-wide default thread count (clamped to [`MAX_THREADS`]); 0 restores
/// the environment/core default.
pub fn set_default_num_threads(n: usize) {
    DEFAULT_THREADS.store(n.min(MAX_THREADS), Ordering::Relaxed);
}

/// How one call's tasks run in parallel: on the process's OpenMP team when one is
/// attached (see openmp.rs), else on bca's rayon pool for the thread count.
pub(crate) struct Parallel {
    threads: usize,
    pool: Option<Arc<ThreadPool>>,
}

impl Parallel {
    /// The thread count the tasks are spread over.
    pub(crate) fn threads(&self) -> usize {
        self.threads
    }

    /// `f` on every item, in parallel (tasks that cannot fail).
    pub(crate) fn for_each<I: Send>(&self, items: Vec<I>, f: impl Fn(I) + Sync + Send) {
        let done = self.try_for_each(items, |item| -> Result<(), std::convert::Infallible> {
            f(item);
            Ok(())
        });
        match done {
            Ok(()) => {}
            Err(never) => match never {},
        }
    }

    /// `f` on every item, in parallel; the first error (by item order on the OpenMP
    /// team) is returned. Which thread runs an item never changes its result.
    pub(crate) fn try_for_each<I: Send, E: Send>(
        &self,
        items: Vec<I>,
        f: impl Fn(I) -> Result<(), E> + Sync + Send,
    ) -> Result<(), E> {
        let items = match openmp::try_for_each(self.threads, items, &f) {
            Ok(result) => return result,
            Err(items) => items,
        };
        match &self.pool {
            // The caller takes tasks too, beside the pool's threads - 1 workers: it starts
            // at once instead of sleeping until a worker has run the call (`install`),
            // and it never waits for a worker to wake (see `help`). On 2 threads the
            // handover cost 20-70 µs a call (a backward at d = 768, 32 rows: 2 threads
            // 0.097 ms, 1 thread 0.076 ms).
            Some(pool) => {
                let helpers = self.threads.min(items.len()).saturating_sub(1);
                run_claimed(items, &f, |work| help(pool, helpers, work))
            }
            None => items.into_iter().try_for_each(f),
        }
    }
}

/// The tasks of one parallel call, claimed in index order from a shared counter by every
/// thread that takes part (the caller included), so a thread that starts late (one
/// being woken) just takes fewer. Which thread runs a task never changes its result.
struct Claimed<'a, I, E> {
    items: Vec<Mutex<Option<I>>>,
    next: AtomicUsize,
    stop: AtomicBool,
    f: &'a (dyn Fn(I) -> Result<(), E> + Sync),
    /// The first failure by task index: an error or a panic payload.
    failure: Mutex<Option<(usize, Failure<E>)>>,
}

enum Failure<E> {
    Error(E),
    Panic(Box<dyn std::any::Any + Send>),
}

impl<I, E> Claimed<'_, I, E> {
    fn fail(&self, i: usize, f: Failure<E>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut slot = match self.failure.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if slot.as_ref().is_none_or(|(j, _)| i < *j) {
            *slot = Some((i, f));
        }
    }

    /// Claim and run tasks until none is left (or one failed). Never unwinds: a task's
    /// panic is kept as its failure.
    fn work(&self) {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(cell) = self.items.get(i) else {
                return;
            };
            let item = match cell.lock() {
                Ok(mut g) => g.take(),
                Err(p) => p.into_inner().take(),
            };
            let Some(item) = item else { continue };
            match catch_unwind(AssertUnwindSafe(|| (self.f)(item))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.fail(i, Failure::Error(e)),
                Err(payload) => self.fail(i, Failure::Panic(payload)),
            }
        }
    }
}

/// Run `f` on every item: `launch(work)` must call `work` on each thread that takes part
/// (the caller among them) and return once every call has returned. The first error by
/// item index is returned; a task's panic is resumed here, on the caller.
pub(crate) fn run_claimed<I: Send, E: Send>(
    items: Vec<I>,
    f: &(dyn Fn(I) -> Result<(), E> + Sync),
    launch: impl FnOnce(&(dyn Fn() + Sync)),
) -> Result<(), E> {
    let job = Claimed {
        items: items.into_iter().map(|i| Mutex::new(Some(i))).collect(),
        next: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        f,
        failure: Mutex::new(None),
    };
    launch(&|| job.work());
    let failure = match job.failure.into_inner() {
        Ok(f) => f,
        Err(p) => p.into_inner(),
    };
    match failure {
        None => Ok(()),
        Some((_, Failure::Error(e))) => Err(e),
        Some((_, Failure::Panic(payload))) => resume_unwind(payload),
    }
}

/// Set in [`help`]'s shared state once the caller is done: helpers that start later leave.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// A pointer to the caller's `work`, sent to helper threads (see [`help`]).
#[derive(Clone, Copy)]
struct WorkPtr(*const (dyn Fn() + Sync + 'static));
// SAFETY: it points to a `Sync` closure, and is only dereferenced under `help`'s protocol.
unsafe impl Send for WorkPtr {}

/// Run `work` on the calling thread and on up to `helpers` threads of `pool`, returning
/// when every run of `work` has returned. Helpers that have not started by the time the
/// caller's own `work` returns (all tasks are claimed then) are not waited for: they find
/// the state closed and leave without touching `work`. So a call never waits for a
/// sleeping worker to wake, only for the tasks that workers are running.
fn help(pool: &ThreadPool, helpers: usize, work: &(dyn Fn() + Sync)) {
    if helpers == 0 {
        return work();
    }
    // Low bits: helpers inside `work`; CLOSED: the caller has finished.
    let state = Arc::new(AtomicUsize::new(0));
    // SAFETY: the lifetime is erased only to hand the pointer to `spawn`; it is
    // dereferenced by a helper that registered (count + 1) before CLOSED was set, and the
    // caller does not return (so `work` stays alive) until that count is back to zero.
    let ptr = WorkPtr(unsafe {
        std::mem::transmute::<*const (dyn Fn() + Sync + '_), *const (dyn Fn() + Sync + 'static)>(
            work,
        )
    });
    for _ in 0..helpers {
        let state = state.clone();
        pool.spawn(move || {
            let ptr = ptr;
            if state.fetch_add(1, Ordering::AcqRel) & CLOSED == 0 {
                // SAFETY: registered before CLOSED (see above); `work` never unwinds
                // (`Claimed::work` catches the tasks' panics).
                unsafe { (*ptr.0)() };
            }
            state.fetch_sub(1, Ordering::AcqRel);
        });
    }
    work();
    state.fetch_or(CLOSED, Ordering::AcqRel);
    // Helpers still inside `work` are finishing their last task.
    let mut spins = 0u32;
    while state.load(Ordering::Acquire) & !CLOSED != 0 {
        spins += 1;
        if spins < 1 << 12 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// How to run a call's tasks on `n` threads (n ≥ 2): the OpenMP team when attached, else
/// the rayon pool for `n`; `None` (run on the caller's thread) when neither is there.
pub(crate) fn parallel(n: usize) -> Option<Parallel> {
    if openmp::in_use() {
        return Some(Parallel {
            threads: n,
            pool: None,
        });
    }
    pool(n).map(|p| Parallel {
        threads: n,
        pool: Some(p),
    })
}

/// The pool for `n` threads (n ≥ 2), or `None`: it cannot be built, or the registry is
/// busy (another thread is building a pool, or it was held at `fork`). `None` means "run
/// on the caller's thread", which gives the same results.
pub(crate) fn pool(n: usize) -> Option<Arc<ThreadPool>> {
    let registry = REGISTRY.get_or_init(|| {
        Mutex::new(Registry {
            pid: std::process::id(),
            pools: HashMap::new(),
        })
    });
    let mut reg = match registry.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => return None,
    };
    let pid = std::process::id();
    if reg.pid != pid {
        // Forked child: the parent's worker threads do not exist here. Leak the old
        // pools rather than run their destructors.
        let old = std::mem::take(&mut reg.pools);
        std::mem::forget(old);
        reg.pid = pid;
    }
    if let Some(p) = reg.pools.get(&n) {
        return Some(p.clone());
    }
    // n - 1 workers: the calling thread takes tasks too (see `Parallel::try_for_each`).
    let built = ThreadPoolBuilder::new()
        .num_threads((n - 1).clamp(1, MAX_THREADS))
        .thread_name(|i| format!("bca-worker-{i}"))
        .build()
        .ok()?;
    let built = Arc::new(built);
    reg.pools.insert(n, built.clone());
    Some(built)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn env_values_are_parsed_strictly() {
        assert_eq!(parse_env(" 3 "), Some(3));
        assert_eq!(parse_env("0"), None);
        assert_eq!(parse_env("-2"), None);
        assert_eq!(parse_env("4097"), None);
        assert_eq!(parse_env("99999999999999999999999"), None);
        assert_eq!(parse_env("two"), None);
    }

    /// A test task: fails with its index, or not.
    pub(crate) type Task<'a> = dyn Fn(usize) -> Result<(), usize> + Sync + 'a;
    /// A way of running a call's tasks: `run(items, task)`.
    pub(crate) type Runner<'a> = dyn Fn(Vec<usize>, &Task<'_>) -> Result<(), usize> + 'a;

    /// Checks any way of running a call's tasks (`run(items, f)`: the rayon pool, the
    /// OpenMP team): every item runs exactly once, on more than one thread; the first
    /// error by index comes back whichever thread met it first; a task's panic is resumed
    /// on the caller; and the call returns only once every task has finished, including
    /// those that other threads run (slow tasks, so one is still running when the
    /// caller's share is done).
    pub(crate) fn check_runner(run: &Runner<'_>) {
        let hits: Vec<AtomicUsize> = (0..2000).map(|_| AtomicUsize::new(0)).collect();
        let threads = Mutex::new(std::collections::HashSet::new());
        let r = run((0..2000).collect(), &|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
            threads.lock().unwrap().insert(std::thread::current().id());
            if i == 0 {
                // wait (bounded) for another thread to take a task
                let t0 = std::time::Instant::now();
                while threads.lock().unwrap().len() < 2 && t0.elapsed().as_secs() < 5 {
                    std::thread::yield_now();
                }
            }
            Ok(())
        });
        assert_eq!(r, Ok(()));
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        assert!(threads.lock().unwrap().len() >= 2, "ran on one thread only");
        for _ in 0..20 {
            let r = run((0..1000).collect(), &|i| match i {
                500 | 700 => Err(i),
                _ => Ok(()),
            });
            assert_eq!(r, Err(500));
        }
        let caught = catch_unwind(AssertUnwindSafe(|| {
            run((0..100).collect(), &|i| {
                assert!(i != 42, "task 42 failed");
                Ok(())
            })
        }));
        let msg = caught.unwrap_err();
        let msg = (msg.downcast_ref::<&str>().map(|s| s.to_string()))
            .or_else(|| msg.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(msg.contains("task 42"), "{msg}");
        for _ in 0..20 {
            let done = AtomicUsize::new(0);
            let r = run((0..6).collect(), &|_| {
                std::thread::sleep(std::time::Duration::from_micros(300));
                done.fetch_add(1, Ordering::SeqCst);
                Ok(())
            });
            assert_eq!(r, Ok(()));
            let done = done.load(Ordering::SeqCst);
            assert_eq!(done, 6, "returned before its tasks ended");
        }
    }

    /// The rayon path (caller and pool workers claiming tasks) passes [`check_runner`],
    /// and calls from several threads at once on one pool (whose workers are then busy,
    /// so many helpers start after their call has returned) lose no item.
    #[test]
    fn rayon_calls_run_every_task_once_and_return_errors_and_panics() {
        let par = Parallel {
            threads: 3,
            pool: Some(pool(3).expect("a pool")),
        };
        check_runner(&|items, f| par.try_for_each(items, f));
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..500 {
                        let local = AtomicUsize::new(0);
                        par.for_each((0..7).collect(), |i: usize| {
                            local.fetch_add(i, Ordering::Relaxed);
                        });
                        assert_eq!(local.load(Ordering::Relaxed), 21);
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 2000);
    }
}

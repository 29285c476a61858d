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
use std::sync::atomic::{AtomicUsize, Ordering};
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
            Some(pool) => {
                use rayon::prelude::*;
                pool.install(|| items.into_par_iter().try_for_each(f))
            }
            None => items.into_iter().try_for_each(f),
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
    let built = ThreadPoolBuilder::new()
        .num_threads(n.min(MAX_THREADS))
        .thread_name(|i| format!("bca-worker-{i}"))
        .build()
        .ok()?;
    let built = Arc::new(built);
    reg.pools.insert(n, built.clone());
    Some(built)
}

#[cfg(test)]
mod tests {
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
}

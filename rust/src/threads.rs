//! Thread pools with a caller-settable bound.
//!
//! rayon's global pool would take every core and oversubscribe a process that also runs
//! torch's threads, so bca keeps its own pools, one per thread count, created lazily.
//! Pools do not survive `fork`: the registry remembers the pid that made them and makes
//! new ones in a child process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rayon::{ThreadPool, ThreadPoolBuilder};

static DEFAULT_THREADS: AtomicUsize = AtomicUsize::new(0);

struct Registry {
    pid: u32,
    pools: HashMap<usize, Arc<ThreadPool>>,
}

static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();

fn env_threads() -> Option<usize> {
    ["BCA_NUM_THREADS", "RAYON_NUM_THREADS"]
        .iter()
        .filter_map(|k| std::env::var(k).ok())
        .filter_map(|v| v.trim().parse::<usize>().ok())
        .find(|&n| n > 0)
}

/// The thread count used when an operator does not set its own: the value given to
/// [`set_default_num_threads`], else `BCA_NUM_THREADS`, else `RAYON_NUM_THREADS`, else the
/// number of available cores.
pub fn default_num_threads() -> usize {
    match DEFAULT_THREADS.load(Ordering::Relaxed) {
        0 => env_threads().unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        }),
        n => n,
    }
}

/// Set the process-wide default thread count; 0 restores the environment/core default.
pub fn set_default_num_threads(n: usize) {
    DEFAULT_THREADS.store(n, Ordering::Relaxed);
}

/// The pool for `n` threads (n ≥ 2), or `None` if it cannot be built.
pub(crate) fn pool(n: usize) -> Option<Arc<ThreadPool>> {
    let registry = REGISTRY.get_or_init(|| {
        Mutex::new(Registry {
            pid: std::process::id(),
            pools: HashMap::new(),
        })
    });
    let mut reg = match registry.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
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
        .num_threads(n)
        .thread_name(|i| format!("bca-worker-{i}"))
        .build()
        .ok()?;
    let built = Arc::new(built);
    reg.pools.insert(n, built.clone());
    Some(built)
}

//! Crash-test hooks: named points around every side effect (each CPI call
//! through [`crate::logged::LoggedCpi`], each agent action of the
//! director's agent client) where a test can make the process die on the
//! spot, as a director killed there would.
//!
//! - `BOSUN_FAILPOINT=NAME` aborts at the first hit of `NAME`;
//!   `NAME#N` at its N-th hit.
//! - `BOSUN_FAILPOINT_TRACE=FILE` appends the name of every point hit to
//!   `FILE`, one per line (a test learns which points an operation passes).
//!
//! With neither variable set a hit does nothing but look at a loaded setting. This module must
//! not change behaviour in any other way, and it never runs in a process
//! the operator did not start with these variables.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

struct Config {
    /// The point to abort at, and at which hit (1-based).
    abort_at: Option<(String, usize)>,
    trace: Option<Mutex<std::fs::File>>,
    hits: AtomicUsize,
}

fn config() -> &'static Config {
    static CONFIG: OnceLock<Config> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let abort_at = std::env::var("BOSUN_FAILPOINT")
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| match v.rsplit_once('#') {
                Some((name, n)) => match n.parse::<usize>() {
                    Ok(n) => (name.to_string(), n.max(1)),
                    Err(_) => (v.clone(), 1),
                },
                None => (v, 1),
            });
        let trace = std::env::var_os("BOSUN_FAILPOINT_TRACE").and_then(|path| {
            match std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                Ok(f) => Some(Mutex::new(f)),
                Err(e) => {
                    eprintln!("BOSUN_FAILPOINT_TRACE {}: {e}", path.to_string_lossy());
                    None
                }
            }
        });
        Config {
            abort_at,
            trace,
            hits: AtomicUsize::new(0),
        }
    })
}

/// The point `name` is reached.
pub fn hit(name: &str) {
    let c = config();
    if c.trace.is_none() && c.abort_at.is_none() {
        return;
    }
    reached(c, name);
}

/// The point `name()` is reached (the name is made only when a test asked
/// for failpoints).
pub fn hit_with(name: impl FnOnce() -> String) {
    let c = config();
    if c.trace.is_none() && c.abort_at.is_none() {
        return;
    }
    reached(c, &name());
}

fn reached(c: &Config, name: &str) {
    if let Some(trace) = &c.trace {
        let mut f = trace.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = writeln!(f, "{name}") {
            eprintln!("BOSUN_FAILPOINT_TRACE: {e}");
        }
    }
    if let Some((point, at)) = &c.abort_at {
        if point == name && c.hits.fetch_add(1, Ordering::Relaxed) + 1 == *at {
            eprintln!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

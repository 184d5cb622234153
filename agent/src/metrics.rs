//! Counters and rate-limited warnings.
//!
//! Bad input must be visible without flooding an SD card with logs: each
//! kind of trouble (per flow, step and cause) logs its first few
//! occurrences, then a line saying how many more were suppressed.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Named counters of one flow, shared by its sources and engine.
#[derive(Clone, Default)]
pub(crate) struct Counters {
    inner: Arc<Mutex<BTreeMap<String, u64>>>,
}

impl Counters {
    pub(crate) fn add(&self, name: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry(name.to_string()).or_insert(0) += n;
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, u64> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// How many lines of one kind may be logged per period.
const BURST: u32 = 5;
const PERIOD: Duration = Duration::from_secs(60);

struct Window {
    start: Instant,
    logged: u32,
    suppressed: u64,
}

/// Rate limiter for warnings, keyed by what went wrong where.
#[derive(Clone, Default)]
pub(crate) struct Warnings {
    inner: Arc<Mutex<BTreeMap<String, Window>>>,
}

impl Warnings {
    /// Log `message` as a warning unless this `key` already logged its burst
    /// in the current period.
    pub(crate) fn warn(&self, key: &str, message: impl FnOnce() -> String) {
        let now = Instant::now();
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let w = m.entry(key.to_string()).or_insert(Window {
            start: now,
            logged: 0,
            suppressed: 0,
        });
        if now.duration_since(w.start) >= PERIOD {
            if w.suppressed > 0 {
                tracing::warn!(
                    "{key}: {} more like this were not logged in the last {}s",
                    w.suppressed,
                    PERIOD.as_secs()
                );
            }
            *w = Window {
                start: now,
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < BURST {
            w.logged += 1;
            let text = message();
            if w.logged == BURST {
                tracing::warn!("{text}\n(further '{key}' warnings are counted, and summarised once a minute)");
            } else {
                tracing::warn!("{text}");
            }
        } else {
            w.suppressed += 1;
        }
    }

    /// Log what is still suppressed (at the end of a run).
    pub(crate) fn flush(&self) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for (key, w) in m.iter_mut() {
            if w.suppressed > 0 {
                tracing::warn!("{key}: {} more like this were not logged", w.suppressed);
                w.suppressed = 0;
            }
        }
    }
}

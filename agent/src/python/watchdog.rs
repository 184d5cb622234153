//! Deadlines for Python jobs. All Python runs on one thread, so one flow
//! file whose top level never returns, or one step that blocks, would stall
//! every flow. Each job may carry a deadline; a watchdog thread interrupts
//! a job that overruns it, and says so when a job cannot be interrupted.
//!
//! Interrupting: the watchdog sends SIGUSR2 to the Python thread (which is
//! the interpreter's main thread, so Python runs signal handlers there).
//! The signal makes a blocking system call return (`time.sleep`, a socket
//! read), and the handler, a Rust function, raises `runnel.Interrupted`, a
//! `BaseException` that a user's `except Exception` does not swallow. The
//! handler raises only while a job is armed, so a late signal never hits
//! the next, innocent job. Code that never returns to Python (a long loop
//! inside a C extension) cannot be interrupted: the watchdog logs that once
//! and the agent reports itself unhealthy until the job ends.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::{PyCFunction, PyDict, PyTuple};

pyo3::create_exception!(
    runnel,
    Interrupted,
    pyo3::exceptions::PyBaseException,
    "Raised by runnel in Python code that ran past its deadline (flow_load_timeout, python_step_timeout) or was running when the agent stopped."
);

/// A job is running and may be interrupted.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The running job has been interrupted: batch loops skip their remaining items.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// What the exception says.
static REASON: Mutex<String> = Mutex::new(String::new());

/// Whether the job running now was interrupted (for loops over a batch:
/// the rest of the batch takes the interrupted item's fate).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// Install the SIGUSR2 handler; on the Python thread, at start.
pub(super) fn install(py: Python<'_>) -> PyResult<()> {
    let handler = PyCFunction::new_closure(
        py,
        Some(c"_runnel_interrupt"),
        None,
        |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            if ARMED.load(Ordering::Relaxed) {
                let reason = REASON.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let _ = args;
                return Err(Interrupted::new_err(reason));
            }
            Ok(())
        },
    )?;
    let signal = py.import("signal")?;
    signal.call_method1("signal", (signal.getattr("SIGUSR2")?, handler))?;
    py.import("runnel")?
        .setattr("Interrupted", py.get_type::<Interrupted>())?;
    Ok(())
}

struct Running {
    label: String,
    deadline: Option<(Instant, Duration, &'static str)>,
    interrupted_at: Option<Instant>,
    last_signal: Option<Instant>,
    stuck_logged: bool,
}

/// The job on the Python thread, watched.
pub(crate) struct Watch {
    running: Mutex<Option<Running>>,
    /// false while a job could not be interrupted.
    healthy: AtomicBool,
    /// The Python thread, for `pthread_kill`.
    thread: Mutex<Option<libc::pthread_t>>,
}

/// How long an interrupted job may take to give way before it counts as stuck.
const GIVE_WAY: Duration = Duration::from_secs(5);

impl Watch {
    pub(super) fn new() -> Arc<Watch> {
        let w = Arc::new(Watch {
            running: Mutex::new(None),
            healthy: AtomicBool::new(true),
            thread: Mutex::new(None),
        });
        let watcher = w.clone();
        let _ = std::thread::Builder::new()
            .name("runnel-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(100));
                watcher.check(Instant::now());
            });
        w
    }

    /// On the Python thread, once: remember it for signals.
    pub(super) fn set_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(unsafe { libc::pthread_self() });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job starts (on the Python thread). `deadline`: (how long, the
    /// config key that sets it).
    pub(super) fn begin(&self, label: String, deadline: Option<(Duration, &'static str)>) {
        INTERRUPTED.store(false, Ordering::Relaxed);
        *self.lock() = Some(Running {
            label,
            deadline: deadline.map(|(d, key)| (Instant::now() + d, d, key)),
            interrupted_at: None,
            last_signal: None,
            stuck_logged: false,
        });
        ARMED.store(true, Ordering::Relaxed);
    }

    /// The job ended (on the Python thread): disarm, and let a signal that
    /// is still pending run its (now harmless) handler here.
    pub(super) fn end(&self, py: Python<'_>) {
        ARMED.store(false, Ordering::Relaxed);
        let _ = py.check_signals();
        INTERRUPTED.store(false, Ordering::Relaxed);
        if let Some(r) = self.lock().take() {
            if r.stuck_logged {
                self.healthy.store(true, Ordering::Relaxed);
                tracing::warn!("{} has ended after all; Python steps run again", r.label);
            }
        }
    }

    /// Interrupt the running job, if any, saying `why`.
    pub(crate) fn interrupt(&self, why: &str) {
        let mut running = self.lock();
        let Some(r) = running.as_mut() else { return };
        if r.interrupted_at.is_none() {
            r.interrupted_at = Some(Instant::now());
        }
        r.last_signal = Some(Instant::now());
        self.signal(why);
    }

    fn signal(&self, why: &str) {
        *REASON.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        INTERRUPTED.store(true, Ordering::Relaxed);
        if let Some(t) = *self.thread.lock().unwrap_or_else(|p| p.into_inner()) {
            // SAFETY: `t` is the live Python thread (it runs until exit).
            unsafe {
                libc::pthread_kill(t, libc::SIGUSR2);
            }
        }
    }

    fn check(&self, now: Instant) {
        let mut running = self.lock();
        let Some(r) = running.as_mut() else { return };
        match (r.deadline, r.interrupted_at) {
            (Some((at, d, key)), None) if now >= at => {
                r.interrupted_at = Some(now);
                r.last_signal = Some(now);
                let why = format!("{} ran longer than {key} ({}s)", r.label, d.as_secs_f64());
                self.signal(&why);
            }
            (_, Some(since)) if !r.stuck_logged && now.duration_since(since) >= GIVE_WAY => {
                r.stuck_logged = true;
                self.healthy.store(false, Ordering::Relaxed);
                tracing::error!(
                    "{} did not give way {}s after being interrupted: it is inside code Python cannot interrupt (a C extension call?). Every flow's Python steps wait for it; runnel reports itself unhealthy until it ends",
                    r.label,
                    GIVE_WAY.as_secs()
                );
            }
            (_, Some(_))
                if r.last_signal
                    .is_some_and(|l| now.duration_since(l) >= Duration::from_secs(1)) =>
            {
                r.last_signal = Some(now);
                // A handler can be missed while Python is between bytecodes
                // in C code; ask again once a second.
                let why = REASON.lock().unwrap_or_else(|p| p.into_inner()).clone();
                self.signal(&why);
            }
            _ => {}
        }
    }

    /// What runs now, if anything (for "abandoned" log lines).
    pub(crate) fn current(&self) -> Option<String> {
        self.lock().as_ref().map(|r| r.label.clone())
    }

    pub(crate) fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

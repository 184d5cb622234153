//! Deadlines for Python jobs. All Python runs on one thread, so one flow
//! file whose top level never returns, or one step that blocks, would stall
//! every flow. Each job may carry a deadline; a watchdog thread interrupts
//! a job that overruns it, and says so when a job cannot be interrupted.
//!
//! Interrupting: the watchdog sends SIGUSR2 to the Python thread (which is
//! the interpreter's main thread, so Python runs signal handlers there).
//! The signal makes a blocking system call return (`time.sleep`, a socket
//! read), and the handler, a Rust function, raises `runnel.Interrupted`, a
//! `BaseException` that a user's `except Exception` does not swallow.
//! Every job has a generation number and every signal names the job it is
//! for, so a signal that arrives late never hits the next, innocent job.
//!
//! A job still running a second after the first strike (it caught the
//! exception, say with a bare `except:` in a retry loop) gets a second: the
//! handler also installs a trace function that raises on every line of
//! every frame of the job. Code that never returns to the interpreter (a
//! long loop inside a C extension) cannot be interrupted: the watchdog logs
//! that once and the agent reports itself unhealthy until the job ends.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// The generation of the job running now; 0 between jobs.
static ARMED: AtomicU64 = AtomicU64::new(0);
/// The job the last signal was sent for, and how many strikes it has had.
static TARGET: AtomicU64 = AtomicU64::new(0);
static STRIKES: AtomicU64 = AtomicU64::new(0);
/// The running job has been interrupted: batch loops skip their remaining items.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// What the exception says.
static REASON: Mutex<String> = Mutex::new(String::new());
/// The trace function of the later strikes (it returns itself).
static TRACER: std::sync::OnceLock<Py<PyAny>> = std::sync::OnceLock::new();
/// The trace function the job had before a strike replaced it (restored
/// at the job's end), if a strike did.
static REPLACED_TRACE: Mutex<Option<Py<PyAny>>> = Mutex::new(None);

/// Whether the job running now was interrupted (for loops over a batch:
/// the rest of the batch takes the interrupted item's fate).
pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

fn reason() -> String {
    REASON.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Whether a signal now is meant for the job running now.
fn aimed_here() -> bool {
    let armed = ARMED.load(Ordering::SeqCst);
    armed != 0 && TARGET.load(Ordering::SeqCst) == armed
}

/// Install the SIGUSR2 handler; on the Python thread, at start.
pub(super) fn install(py: Python<'_>) -> PyResult<()> {
    // The later strikes' trace function: raise at the next line of a frame
    // while the job it was set for still runs. (Raising on an "exception"
    // event would only replace the exception being handled.) Python turns
    // tracing off after a trace function raised, so each strike unwinds one
    // `except:` that swallows it; strikes come once a second.
    let tracer = PyCFunction::new_closure(
        py,
        Some(c"_runnel_trace"),
        None,
        |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<Py<PyAny>> {
            let py = args.py();
            let event: String = args.get_item(1).and_then(|e| e.extract()).unwrap_or_default();
            if event == "line" && aimed_here() {
                return Err(Interrupted::new_err(reason()));
            }
            Ok(TRACER.get().map(|t| t.clone_ref(py)).unwrap_or_else(|| py.None()))
        },
    )?
    .unbind();
    let _ = TRACER.set(tracer.clone_ref(py).into_any());
    let handler = PyCFunction::new_closure(
        py,
        Some(c"_runnel_interrupt"),
        None,
        move |args: &Bound<'_, PyTuple>, _kw: Option<&Bound<'_, PyDict>>| -> PyResult<()> {
            if !aimed_here() {
                return Ok(());
            }
            if STRIKES.load(Ordering::SeqCst) >= 2 {
                let py = args.py();
                let tracer = tracer.bind(py);
                let sys = py.import("sys")?;
                let mut replaced = REPLACED_TRACE.lock().unwrap_or_else(|p| p.into_inner());
                if replaced.is_none() {
                    *replaced = Some(sys.call_method0("gettrace")?.unbind());
                }
                drop(replaced);
                sys.call_method1("settrace", (tracer,))?;
                // settrace reaches new frames; the job's frames get it directly.
                let mut frame = args.get_item(1).ok().filter(|f| !f.is_none());
                while let Some(f) = frame {
                    if f.setattr("f_trace", tracer).is_err() {
                        break;
                    }
                    frame = f.getattr("f_back").ok().filter(|b| !b.is_none());
                }
            }
            Err(Interrupted::new_err(reason()))
        },
    )?;
    let signal = py.import("signal")?;
    signal.call_method1("signal", (signal.getattr("SIGUSR2")?, handler))?;
    py.import("runnel")?
        .setattr("Interrupted", py.get_type::<Interrupted>())?;
    Ok(())
}

struct Running {
    generation: u64,
    label: String,
    deadline: Option<(Instant, Duration, &'static str)>,
    interrupted_at: Option<Instant>,
    stuck_logged: bool,
}

/// The job on the Python thread, watched.
pub(crate) struct Watch {
    running: Mutex<Option<Running>>,
    next_generation: AtomicU64,
    /// false while a job could not be interrupted.
    healthy: AtomicBool,
    /// The agent is stopping: every job from now on is interrupted at once.
    stopping: AtomicBool,
    /// The Python thread, for `pthread_kill`.
    thread: Mutex<Option<libc::pthread_t>>,
    /// What was interrupted or abandoned while stopping (for the exit code).
    abandoned: Mutex<Vec<String>>,
}

/// How long an interrupted job may take to give way before it counts as stuck.
pub(crate) const GIVE_WAY: Duration = Duration::from_secs(5);
/// The most a Python job that starts while the agent stops may take.
const STOPPING_JOB: Duration = Duration::from_secs(1);
/// How often a job that goes on after being interrupted is struck again.
const SECOND_STRIKE: Duration = Duration::from_secs(1);

impl Watch {
    pub(super) fn new() -> Arc<Watch> {
        let w = Arc::new(Watch {
            running: Mutex::new(None),
            next_generation: AtomicU64::new(1),
            healthy: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            thread: Mutex::new(None),
            abandoned: Mutex::new(Vec::new()),
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
        let generation = self.next_generation.fetch_add(1, Ordering::SeqCst);
        INTERRUPTED.store(false, Ordering::SeqCst);
        STRIKES.store(0, Ordering::SeqCst);
        // While stopping, no job may take longer than a second.
        let deadline = if self.stopping.load(Ordering::SeqCst) {
            Some((STOPPING_JOB, "stopping"))
        } else {
            deadline
        };
        *self.lock() = Some(Running {
            generation,
            label,
            deadline: deadline.map(|(d, key)| (Instant::now() + d, d, key)),
            interrupted_at: None,
            stuck_logged: false,
        });
        ARMED.store(generation, Ordering::SeqCst);
    }

    /// The job ended (on the Python thread): disarm, remove a trace function
    /// the second strike may have set, and let a signal that is still
    /// pending run its (now harmless) handler here.
    pub(super) fn end(&self, py: Python<'_>) {
        let r = self.lock().take();
        ARMED.store(0, Ordering::SeqCst);
        let replaced = REPLACED_TRACE.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(previous) = replaced {
            let _ = py.import("sys").and_then(|s| s.call_method1("settrace", (previous,)));
        }
        let _ = py.check_signals();
        INTERRUPTED.store(false, Ordering::SeqCst);
        if let Some(r) = r {
            if r.stuck_logged {
                self.healthy.store(true, Ordering::Relaxed);
                tracing::warn!("{} has ended after all; Python steps run again", r.label);
            }
        }
    }

    /// Interrupt the running job, if any, saying `why`; returns its label.
    pub(crate) fn interrupt(&self, why: &str) -> Option<String> {
        let mut running = self.lock();
        let r = running.as_mut()?;
        if r.interrupted_at.is_none() {
            r.interrupted_at = Some(Instant::now());
            self.strike(r.generation, &r.label, why);
        }
        Some(r.label.clone())
    }

    /// The agent stops: from now on a Python job gets a second at most, and
    /// what is interrupted counts as abandoned.
    pub(crate) fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Note something given up while stopping (named in the last log line).
    pub(crate) fn abandoned(&self, what: String) {
        self.abandoned.lock().unwrap_or_else(|p| p.into_inner()).push(what);
    }

    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub(crate) fn take_abandoned(&self) -> Vec<String> {
        std::mem::take(&mut *self.abandoned.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn strike(&self, generation: u64, label: &str, why: &str) {
        *REASON.lock().unwrap_or_else(|p| p.into_inner()) = why.to_string();
        if TARGET.swap(generation, Ordering::SeqCst) == generation {
            STRIKES.fetch_add(1, Ordering::SeqCst);
        } else {
            STRIKES.store(1, Ordering::SeqCst);
        }
        INTERRUPTED.store(true, Ordering::SeqCst);
        if self.stopping.load(Ordering::SeqCst) && STRIKES.load(Ordering::SeqCst) == 1 {
            self.abandoned(format!("{label} (interrupted)"));
        }
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
                let why = if key == "stopping" {
                    format!("{} was stopped (runnel is stopping)", r.label)
                } else {
                    format!("{} ran longer than {key} ({}s)", r.label, d.as_secs_f64())
                };
                self.strike(r.generation, &r.label, &why);
            }
            (_, Some(since)) => {
                let waited = now.duration_since(since);
                // One strike a second while the job goes on, each with a
                // trace function that unwinds one more swallowing `except:`.
                let strikes = STRIKES.load(Ordering::SeqCst);
                if waited >= SECOND_STRIKE * strikes as u32 && waited < GIVE_WAY {
                    self.strike(r.generation, &r.label, &reason());
                }
                if waited >= GIVE_WAY && !r.stuck_logged {
                    r.stuck_logged = true;
                    self.healthy.store(false, Ordering::Relaxed);
                    tracing::error!(
                        "{} did not give way {}s after being interrupted: it is inside code Python cannot interrupt (a C extension call?). Every flow's Python steps wait for it; runnel reports itself unhealthy until it ends",
                        r.label,
                        GIVE_WAY.as_secs()
                    );
                }
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

/// Ends the job when dropped, also when the job panicked.
pub(super) struct JobGuard<'a, 'py> {
    pub watch: &'a Watch,
    pub py: Python<'py>,
}

impl Drop for JobGuard<'_, '_> {
    fn drop(&mut self) {
        self.watch.end(self.py);
    }
}

//! The Python thread: one dedicated OS thread owns the embedded interpreter.
//!
//! Everything that touches Python is sent here as a job and runs attached
//! to the interpreter; the caller blocks on the answer. tokio worker threads
//! never attach (a task waiting for the GIL would stall unrelated I/O), and
//! engine threads hand over whole batches so a batch costs one hand-over,
//! not one per item. A panic inside a job is caught and reported as an
//! error; it does not take the interpreter down.

pub(crate) mod convert;
pub(crate) mod error;
mod module;
pub(crate) mod watchdog;

use std::panic::AssertUnwindSafe;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use pyo3::Python;

type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// A handle to the Python thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct PyRunner {
    jobs: mpsc::Sender<Job>,
    watch: Arc<watchdog::Watch>,
    /// Deadline of a Python step's batch job (`python_step_timeout`).
    step_timeout: Duration,
}

/// Defaults of `python_step_timeout` and `flow_load_timeout`.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const LOAD_TIMEOUT: Duration = Duration::from_secs(10);

impl PyRunner {
    /// Start the interpreter on its own thread, with `runnel` importable.
    pub(crate) fn start() -> anyhow::Result<PyRunner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        let watch = watchdog::Watch::new();
        let thread_watch = watch.clone();
        thread::Builder::new().name("runnel-python".into()).spawn(move || {
            module::register();
            let full_site = module::full_site();
            if !full_site {
                // Python's `site` is replaced by `module::lean_site` (same
                // paths, no .pth imports); the flag must be set before start.
                #[allow(deprecated)]
                // SAFETY: written before the interpreter starts, on the only
                // thread that touches it.
                unsafe {
                    pyo3::ffi::Py_NoSiteFlag = 1;
                }
            }
            Python::initialize();
            thread_watch.set_thread();
            let setup = Python::attach(|py| {
                if !full_site {
                    module::lean_site(py)?;
                }
                module::after_start(py)?;
                watchdog::install(py)
            });
            let _ = ready_tx.send(setup.map_err(|e| e.to_string()));
            while let Ok(job) = rx.recv() {
                let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| Python::attach(job)));
                if outcome.is_err() {
                    tracing::error!("a job on the Python thread panicked; the interpreter goes on");
                }
            }
        })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(PyRunner {
                jobs: tx,
                watch,
                step_timeout: STEP_TIMEOUT,
            }),
            Ok(Err(e)) => anyhow::bail!("embedded Python failed to start: {e}"),
            Err(_) => anyhow::bail!("embedded Python failed to start (its thread ended)"),
        }
    }

    /// The same runner with another `python_step_timeout`.
    pub(crate) fn with_step_timeout(mut self, t: Duration) -> PyRunner {
        self.step_timeout = t;
        self
    }

    /// Interrupt whatever Python code the Python thread is running, with
    /// `runnel.Interrupted`, so a busy, sleeping or blocked user function
    /// gives way. Never blocks the caller. Returns what was interrupted.
    pub(crate) fn interrupt(&self, why: &str) -> Option<String> {
        self.watch.interrupt(why)
    }

    /// The agent is stopping: a Python job from now on gets a second at
    /// most, and what is interrupted counts as abandoned.
    pub(crate) fn stop_all(&self) {
        self.watch.stop_all();
    }

    /// Note work given up while stopping; `abandoned()` lists it.
    pub(crate) fn note_abandoned(&self, what: String) {
        self.watch.abandoned(what);
    }

    /// Whether runnel is stopping (jobs get a second at most).
    pub(crate) fn is_stopping(&self) -> bool {
        self.watch.is_stopping()
    }

    pub(crate) fn abandoned(&self) -> Vec<String> {
        self.watch.take_abandoned()
    }

    /// The job running on the Python thread now, if any.
    pub(crate) fn current_job(&self) -> Option<String> {
        self.watch.current()
    }

    /// false while a job could not be interrupted.
    pub(crate) fn healthy(&self) -> bool {
        self.watch.healthy()
    }

    /// `run` a Python step's job, interrupted past `python_step_timeout`.
    pub(crate) fn run_step<R, F>(&self, label: String, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Python<'_>) -> R + Send + 'static,
    {
        self.run_watched(label, Some((self.step_timeout, "python_step_timeout")), f)
    }

    /// `run`, interrupted once `deadline` (how long, and the config key
    /// that sets it) has passed; `label` names the job in log lines.
    pub(crate) fn run_watched<R, F>(
        &self,
        label: String,
        deadline: Option<(Duration, &'static str)>,
        f: F,
    ) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Python<'_>) -> R + Send + 'static,
    {
        let watch = self.watch.clone();
        self.run(move |py| {
            watch.begin(label, deadline);
            let _end = watchdog::JobGuard { watch: &watch, py };
            f(py)
        })
    }

    /// `run_watched`, but the caller waits no longer than the deadline, the
    /// time an interrupted job gets to give way, and a second, counted from
    /// when the job starts: a job stuck in code Python cannot interrupt
    /// keeps the Python thread, but not the caller (a flow file's load:
    /// `check` must end, `run` go on). While the thread is busy with an
    /// earlier job, the caller waits for it, unless that job is stuck.
    pub(crate) fn run_bounded<R, F>(&self, label: String, deadline: (Duration, &'static str), f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Python<'_>) -> R + Send + 'static,
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Mutex;
        let (tx, rx) = mpsc::sync_channel(1);
        let watch = self.watch.clone();
        let shown = label.clone();
        let started: Arc<Mutex<Option<std::time::Instant>>> = Arc::default();
        let cancelled = Arc::new(AtomicBool::new(false));
        let (job_started, job_cancelled) = (started.clone(), cancelled.clone());
        self.jobs
            .send(Box::new(move |py| {
                if job_cancelled.load(Ordering::SeqCst) {
                    return; // its caller gave up before it began
                }
                *job_started.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
                watch.begin(label, Some(deadline));
                let _end = watchdog::JobGuard { watch: &watch, py };
                let _ = tx.send(f(py));
            }))
            .map_err(|_| anyhow::anyhow!("the Python thread has stopped"))?;
        let limit = deadline.0 + watchdog::GIVE_WAY + Duration::from_secs(1);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(r) => return Ok(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("a job on the Python thread failed (see the log above)")
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let began = *started.lock().unwrap_or_else(|p| p.into_inner());
            match began {
                Some(t) if t.elapsed() >= limit => anyhow::bail!(
                    "{shown} did not end within {}s, and could not be interrupted (code Python cannot interrupt, such as a C extension call); the Python thread stays busy with it",
                    limit.as_secs()
                ),
                None if !self.watch.healthy() => {
                    cancelled.store(true, Ordering::SeqCst);
                    anyhow::bail!(
                        "{shown} cannot start: the Python thread is stuck in {} (code Python cannot interrupt)",
                        self.watch.current().unwrap_or_else(|| "an earlier job".into())
                    )
                }
                _ => {}
            }
        }
    }

    /// Run `f` on the Python thread and wait for its result.
    ///
    /// Returns an error only if the job panicked or the thread is gone.
    pub(crate) fn run<R, F>(&self, f: F) -> anyhow::Result<R>
    where
        R: Send + 'static,
        F: FnOnce(Python<'_>) -> R + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.jobs
            .send(Box::new(move |py| {
                let _ = tx.send(f(py));
            }))
            .map_err(|_| anyhow::anyhow!("the Python thread has stopped"))?;
        rx.recv()
            .map_err(|_| anyhow::anyhow!("a job on the Python thread failed (see the log above)"))
    }
}

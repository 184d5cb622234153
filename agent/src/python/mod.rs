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

use std::panic::AssertUnwindSafe;
use std::sync::mpsc;
use std::thread;

use pyo3::Python;

type Job = Box<dyn FnOnce(Python<'_>) + Send>;

/// A handle to the Python thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct PyRunner {
    jobs: mpsc::Sender<Job>,
    /// The Python thread's `threading.get_ident()`, to interrupt it.
    ident: u64,
}

impl PyRunner {
    /// Start the interpreter on its own thread, with `runnel` importable.
    pub(crate) fn start() -> anyhow::Result<PyRunner> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<u64, String>>();
        thread::Builder::new().name("runnel-python".into()).spawn(move || {
            module::register();
            Python::initialize();
            let setup = Python::attach(|py| {
                use pyo3::types::PyAnyMethods;
                module::after_start(py)?;
                py.import("threading")?.getattr("get_ident")?.call0()?.extract::<u64>()
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
            Ok(Ok(ident)) => Ok(PyRunner { jobs: tx, ident }),
            Ok(Err(e)) => anyhow::bail!("embedded Python failed to start: {e}"),
            Err(_) => anyhow::bail!("embedded Python failed to start (its thread ended)"),
        }
    }

    /// Raise `KeyboardInterrupt` in whatever Python code the Python thread
    /// is running (at its next bytecode), so a busy or sleeping user
    /// function gives way at shutdown. Attaching waits for the GIL, so this
    /// runs on a short-lived thread of its own and never blocks the caller.
    pub(crate) fn interrupt(&self) {
        let ident = self.ident;
        let _ = thread::Builder::new().name("runnel-interrupt".into()).spawn(move || {
            Python::attach(|_py| {
                // SAFETY: called attached to the interpreter, with a valid
                // thread id and a borrowed exception type.
                unsafe {
                    pyo3::ffi::PyThreadState_SetAsyncExc(ident as _, pyo3::ffi::PyExc_KeyboardInterrupt);
                }
            })
        });
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

//! The embedded `runnel` package, registered before the interpreter starts.
//!
//! Its Python source is compiled into the binary (`src/python/runnel/*.py`),
//! so a flow file imports the exact API this binary understands, with no
//! files to install next to it. The package is plain Python that records
//! steps; the planner (`crate::flow`) reads them.

use pyo3::prelude::*;
use pyo3::types::PyModule;

/// (module name, file name shown in tracebacks, source).
const SUBMODULES: [(&str, &str, &str); 4] = [
    (
        "sources",
        "<runnel>/runnel/sources.py",
        include_str!("runnel/sources.py"),
    ),
    ("sinks", "<runnel>/runnel/sinks.py", include_str!("runnel/sinks.py")),
    ("op", "<runnel>/runnel/op.py", include_str!("runnel/op.py")),
    ("win", "<runnel>/runnel/win.py", include_str!("runnel/win.py")),
];
const INIT: &str = include_str!("runnel/__init__.py");

#[pymodule]
fn runnel(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    let sys_modules = py.import("sys")?.getattr("modules")?;
    // Submodules import from `runnel` while it is still initialising.
    sys_modules.set_item("runnel", m)?;
    m.setattr("__path__", pyo3::types::PyList::empty(py))?;
    exec_into(py, m, INIT, "<runnel>/runnel/__init__.py")?;
    for (name, file, source) in SUBMODULES {
        let full = format!("runnel.{name}");
        let sub = PyModule::new(py, &full)?;
        sub.setattr("__package__", "runnel")?;
        sys_modules.set_item(&full, &sub)?;
        exec_into(py, &sub, source, file)?;
        m.setattr(name, &sub)?;
    }
    Ok(())
}

fn exec_into(py: Python<'_>, m: &Bound<'_, PyModule>, source: &str, file: &str) -> PyResult<()> {
    let builtins = py.import("builtins")?;
    let code = builtins.getattr("compile")?.call1((source, file, "exec"))?;
    let globals = m.dict();
    if !globals.contains("__builtins__")? {
        globals.set_item("__builtins__", &builtins)?;
    }
    builtins.getattr("exec")?.call1((code, &globals))?;
    Ok(())
}

/// Add `runnel` to the interpreter's built-in module table. Must run
/// before `Python::initialize`.
pub(super) fn register() {
    pyo3::append_to_inittab!(runnel);
}

/// One-time setup once the interpreter runs.
pub(super) fn after_start(py: Python<'_>) -> PyResult<()> {
    let sys = py.import("sys")?;
    sys.setattr("argv", vec!["runnel"])?;
    // Flow folders are often read-only (/etc/runnel/flows): no __pycache__.
    sys.setattr("dont_write_bytecode", true)?;
    py.import("runnel")?;
    Ok(())
}

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

/// Whether Python's own `site` runs at start (`RUNNEL_PYTHON_SITE=full`):
/// it also runs the `import` lines of site-packages' .pth files, which on
/// some installs import certifi and half the standard library (4 MiB more
/// for every agent, measured on the CI machine).
pub(super) fn full_site() -> bool {
    std::env::var("RUNNEL_PYTHON_SITE").is_ok_and(|v| v.trim().eq_ignore_ascii_case("full"))
}

/// What Python's `site` does for imports, without running .pth `import`
/// lines: the site-packages folders (and the user's, if Python allows it)
/// and the folders the .pth files name go on `sys.path`.
pub(super) fn lean_site(py: Python<'_>) -> PyResult<()> {
    let code = c"
import os, site, sys
def _runnel_site():
    # A virtualenv, as site.venv() finds it: pyvenv.cfg next to or above
    # the interpreter.
    exe_dir = os.path.dirname(os.path.abspath(sys.executable or ''))
    venv_dir = os.path.dirname(exe_dir)
    conf = next((c for c in (os.path.join(exe_dir, 'pyvenv.cfg'), os.path.join(venv_dir, 'pyvenv.cfg'))
                 if os.path.isfile(c)), None)
    system_site, user_site = True, site.check_enableusersite()
    dirs = []
    if conf:
        try:
            with open(conf, encoding='utf-8', errors='replace') as f:
                for line in f:
                    key, eq, value = line.partition('=')
                    if eq and key.strip().lower() == 'include-system-site-packages':
                        system_site = value.strip().lower() == 'true'
        except OSError:
            pass
        sys.prefix = sys.exec_prefix = venv_dir
        dirs += site.getsitepackages([venv_dir])
        if not system_site:
            user_site = False
    # Python's order: the venv's, the user's, then the system's.
    if user_site:
        dirs.append(site.getusersitepackages())
    if system_site:
        dirs += site.getsitepackages()
    skipped = []
    for d in dirs:
        if not os.path.isdir(d):
            continue
        if d not in sys.path:
            sys.path.append(d)
        try:
            names = sorted(n for n in os.listdir(d) if n.endswith('.pth') and not n.startswith('.'))
        except OSError:
            continue
        for n in names:
            try:
                with open(os.path.join(d, n), encoding='utf-8', errors='replace') as f:
                    lines = f.read().splitlines()
                for line in lines:
                    line = line.rstrip()
                    if not line or line.startswith('#'):
                        continue
                    if line.startswith(('import ', 'import\t')):
                        skipped.append(n)
                        continue
                    p = os.path.abspath(os.path.join(d, line))
                    if os.path.exists(p) and p not in sys.path:
                        sys.path.append(p)
            except Exception:
                continue  # as site does: a broken .pth file is passed over
    # What else site.main() gives: exit(), quit(), help(), sitecustomize.
    site.setquit()
    site.setcopyright()
    site.sethelper()
    site.execsitecustomize()
    if user_site:
        site.execusercustomize()
    return sorted(set(skipped))
_runnel_skipped_pth = _runnel_site()
del _runnel_site
";
    let globals = pyo3::types::PyDict::new(py);
    py.run(code, Some(&globals), None)?;
    let skipped: Vec<String> = globals
        .get_item("_runnel_skipped_pth")?
        .map(|v| v.extract())
        .transpose()?
        .unwrap_or_default();
    if !skipped.is_empty() {
        tracing::debug!(
            "python: the import lines of {} in site-packages were not run (to save memory; RUNNEL_PYTHON_SITE=full runs them, as python does)",
            skipped.join(", ")
        );
    }
    Ok(())
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

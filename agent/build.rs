//! Link-time setup for embedding CPython.
//!
//! pyo3 links `libpythonX.Y.so` but adds no run-time search path. On a Pi
//! the library lives in `/usr/lib/...` and is found anyway; with a pyenv or
//! other non-system Python (developers, CI) the binary would fail to start.
//! We record the interpreter's library folder as an rpath so `runnel` runs
//! from a clean clone without `LD_LIBRARY_PATH`.

fn main() {
    pyo3_build_config::use_pyo3_cfgs();
    let config = pyo3_build_config::get();
    if let Some(dir) = config.lib_dir() {
        if !dir.starts_with("/usr/lib") && !dir.starts_with("/lib") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        }
    }
    println!("cargo:rerun-if-env-changed=PYO3_PYTHON");
    for f in ["__init__", "op", "win", "sources", "sinks"] {
        println!("cargo:rerun-if-changed=src/python/runnel/{f}.py");
    }
}

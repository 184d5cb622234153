//! Python exceptions as values: a user function that raises becomes a
//! `PyFailure` carrying the message, the traceback text and the flow
//! file's file:line, never a panic.

use pyo3::prelude::*;

/// A Python exception, captured on the Python thread.
#[derive(Debug, Clone)]
pub(crate) struct PyFailure {
    /// `ZeroDivisionError: division by zero`
    pub message: String,
    /// `flows/greenhouse.py:12`: the innermost frame in the flow file, else the innermost frame.
    pub location: String,
    /// The formatted traceback.
    pub traceback: String,
}

impl std::fmt::Display for PyFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (at {})", self.message, self.location)
    }
}

impl PyFailure {
    /// When no frame names a line (the call itself failed, e.g. a lambda
    /// with the wrong number of parameters), point at the step's definition.
    pub(crate) fn or_at(mut self, flow_file: &str, step_location: &str) -> PyFailure {
        if self.location == flow_file {
            self.location = format!("{step_location} (where the step is defined)");
        }
        self
    }

    /// Capture `err`; `flow_file` picks which frame counts as the user's line.
    pub(crate) fn capture(py: Python<'_>, err: &PyErr, flow_file: &str) -> PyFailure {
        let value = err.value(py);
        let message = format!(
            "{}: {}",
            value
                .get_type()
                .name()
                .map(|n| n.to_string())
                .unwrap_or_else(|_| "Exception".into()),
            value.str().map(|s| s.to_string()).unwrap_or_default()
        );
        let mut innermost = None;
        let mut in_flow = None;
        let mut tb = err.traceback(py).map(|t| t.into_any());
        while let Some(t) = tb {
            let file: Option<String> = t
                .getattr("tb_frame")
                .and_then(|f| f.getattr("f_code"))
                .and_then(|c| c.getattr("co_filename"))
                .and_then(|n| n.extract())
                .ok();
            let line: Option<i64> = t.getattr("tb_lineno").and_then(|l| l.extract()).ok();
            if let (Some(file), Some(line)) = (file, line) {
                let here = format!("{file}:{line}");
                if file == flow_file {
                    in_flow = Some(here.clone());
                }
                innermost = Some(here);
            }
            tb = t.getattr("tb_next").ok().filter(|n| !n.is_none());
        }
        // Syntax errors carry their place in the exception, not the traceback.
        if let (Ok(file), Ok(line)) = (value.getattr("filename"), value.getattr("lineno")) {
            if let (Ok(file), Ok(line)) = (file.extract::<String>(), line.extract::<i64>()) {
                in_flow = Some(format!("{file}:{line}"));
            }
        }
        let location = in_flow.or(innermost).unwrap_or_else(|| flow_file.to_string());
        let tb_obj = err.traceback(py);
        let traceback = py
            .import("traceback")
            .and_then(|m| m.getattr("format_exception")?.call1((value.get_type(), value, tb_obj)))
            .and_then(|lines| lines.extract::<Vec<String>>())
            .map(|l| l.concat())
            .unwrap_or_else(|_| message.clone());
        PyFailure {
            message,
            location,
            traceback,
        }
    }
}

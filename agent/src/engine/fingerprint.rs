//! What a stateful step is, as a short text: saved state is restored into
//! a step only if its fingerprint is unchanged. Windows: windower, clock
//! and logic, with Python functions identified by their code (bytecode,
//! names and constants, not line numbers: editing another part of the file
//! keeps the state); `stateful_map`: its function; `collect`; file inputs
//! and outputs: their path; MQTT inputs: broker and filters. Stateless steps
//! have none.

use pyo3::prelude::*;

use crate::flow::{ClockSpec, FlowPlan, LogicSpec, PyFn, PyOpKind, SinkSpec, SourceSpec, StepKind, TsGetter};
use crate::python::PyRunner;

/// Each step's fingerprint (`None` for stateless steps), in plan order.
pub(crate) fn of_plan(plan: &FlowPlan, py: &PyRunner) -> Vec<(std::sync::Arc<str>, Option<String>)> {
    let mut texts: Vec<Option<String>> = Vec::new();
    let mut fns: Vec<(usize, PyFn)> = Vec::new();
    for (i, s) in plan.steps.iter().enumerate() {
        let text = match &s.kind {
            StepKind::Input(SourceSpec::File { path, decode }) => {
                Some(format!("input file {} {decode:?}", path.display()))
            }
            StepKind::Input(SourceSpec::Mqtt(m)) => Some(format!(
                "input mqtt {} {}",
                m.broker,
                m.filters
                    .iter()
                    .map(|f| f.subscribe.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            )),
            // A serial port has no position to keep.
            StepKind::Input(SourceSpec::Serial(_)) => None,
            StepKind::Output(SinkSpec::File(path)) => Some(format!("output file {}", path.display())),
            StepKind::Output(_) => None,
            StepKind::Py(PyOpKind::StatefulMap, f) => {
                fns.push((i, f.clone()));
                Some("stateful_map".into())
            }
            StepKind::Py(..) | StepKind::KeyOnField(_) | StepKind::KeyRm | StepKind::Merge => None,
            StepKind::Collect { .. } => Some("collect".into()),
            StepKind::Window(w) => {
                let clock = match &w.clock {
                    ClockSpec::System => "system".to_string(),
                    ClockSpec::Event { getter, wait } => match getter {
                        TsGetter::Field { name, unit } => format!("event field {name:?} {unit:?} wait {wait}"),
                        TsGetter::Py(f) => {
                            fns.push((i, f.clone()));
                            format!("event python wait {wait}")
                        }
                    },
                };
                let logic = match &w.logic {
                    LogicSpec::Count => "count".to_string(),
                    LogicSpec::Aggregate(a) => format!("aggregate {:?}", a.fields),
                    LogicSpec::Fold {
                        builder,
                        folder,
                        merger,
                    } => {
                        for f in [builder, folder, merger] {
                            fns.push((i, f.clone()));
                        }
                        "fold".to_string()
                    }
                };
                Some(format!(
                    "window {:?} clock {clock} logic {logic} ordered {}",
                    w.windower, w.ordered
                ))
            }
        };
        texts.push(text);
    }
    if !fns.is_empty() {
        let hashed = py.run(move |py| {
            fns.into_iter()
                .map(|(i, f)| (i, code_digest(py, f.bind(py))))
                .collect::<Vec<_>>()
        });
        match hashed {
            Ok(list) => {
                for (i, digest) in list {
                    if let Some(Some(t)) = texts.get_mut(i) {
                        t.push(' ');
                        t.push_str(&digest);
                    }
                }
            }
            Err(e) => tracing::error!("flow {}: cannot fingerprint its Python functions: {e}", plan.flow_id),
        }
    }
    plan.steps
        .iter()
        .zip(texts)
        .map(|(s, t)| {
            (
                std::sync::Arc::from(s.step_id.as_str()),
                t.map(|t| format!("{:016x}", fnv(t.as_bytes()))),
            )
        })
        .collect()
}

const DIGEST: &std::ffi::CStr = c"
def digest(f):
    import hashlib
    h = hashlib.sha256()
    def walk(c):
        h.update(c.co_code)
        h.update(repr(c.co_names).encode())
        h.update(repr(c.co_varnames).encode())
        for k in c.co_consts:
            const(k)
    def const(k):
        # Sets print in hash order, which changes from run to run.
        if hasattr(k, 'co_code'):
            walk(k)
        elif isinstance(k, (frozenset, set)):
            h.update(b'{')
            for r in sorted(repr(x) for x in k):
                h.update(r.encode() + b',')
            h.update(b'}')
        elif isinstance(k, tuple):
            h.update(b'(')
            for x in k:
                const(x)
            h.update(b')')
        else:
            h.update(repr(k).encode())
    code = getattr(f, '__code__', None)
    if code is None:
        h.update((type(f).__qualname__ + ':' + getattr(f, '__qualname__', '')).encode())
    else:
        walk(code)
    return h.hexdigest()[:16]
";

/// A digest of a function's code, stable across runs and line moves.
fn code_digest(py: Python<'_>, f: &Bound<'_, PyAny>) -> String {
    let r = (|| -> PyResult<String> {
        let m = PyModule::from_code(py, DIGEST, c"<runnel fingerprint>", c"_runnel_fingerprint")?;
        m.getattr("digest")?.call1((f,))?.extract()
    })();
    r.unwrap_or_else(|e| format!("unhashable:{e}"))
}

/// FNV-1a, 64 bits: fingerprints are compared, not trusted.
fn fnv(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for x in b {
        h ^= *x as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// `runnel check`: window steps whose builder makes an accumulator pickle
/// cannot save (their open windows would not survive a restart of `run`).
pub(crate) fn unpicklable_accumulators(plan: &FlowPlan, py: &PyRunner) -> Vec<String> {
    let builders: Vec<(String, String, PyFn)> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.kind {
            StepKind::Window(w) => match &w.logic {
                LogicSpec::Fold { builder, .. } => Some((s.step_id.clone(), s.location.clone(), builder.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    if builders.is_empty() {
        return Vec::new();
    }
    let flow = plan.flow_id.clone();
    py.run(move |py| {
        let dumps = match py.import("pickle").and_then(|m| m.getattr("dumps")) {
            Ok(d) => d,
            Err(e) => return vec![format!("cannot import pickle: {e}")],
        };
        builders
            .into_iter()
            .filter_map(|(step, location, builder)| {
                let r = builder.bind(py).call0().and_then(|acc| dumps.call1((acc,)));
                r.err().map(|e| {
                    format!(
                        "flow {flow:?} step {step:?} ({location}): the accumulator its builder returns cannot be pickled ({e}); `runnel run` cannot save its open windows, which start empty after a restart"
                    )
                })
            })
            .collect()
    })
    .unwrap_or_default()
}

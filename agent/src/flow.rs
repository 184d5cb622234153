//! Flow files: executing a user's `*.py` in the embedded interpreter and
//! turning the steps it recorded into a Rust execution plan.
//!
//! Loading never panics: a syntax error, a failed import, a wrong argument
//! to an operator or a file without a flow all become a `LoadError` that
//! names the file and line and says what to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::python::convert::delta_micros;
use crate::python::error::PyFailure;
use crate::python::PyRunner;
use crate::value::Micros;

/// A Python callable held by the plan.
pub(crate) type PyFn = Arc<Py<PyAny>>;

/// Why a flow file could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error("cannot read flow file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{location}: {message}\n{traceback}")]
    Python {
        location: String,
        message: String,
        traceback: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// Everything one flow file defines.
pub(crate) struct FlowFile {
    pub flows: Vec<FlowPlan>,
    /// The file's module (`_runnel_flow_<stem>`), not yet in `sys.modules`
    /// when loaded with `load_staged`.
    module: Option<(String, Arc<Py<pyo3::types::PyModule>>)>,
}

impl FlowFile {
    /// Put the file's module into `sys.modules` (where pickle finds the
    /// classes a flow defines), in place of an older version's.
    pub(crate) fn activate(&self, py: &PyRunner) -> anyhow::Result<()> {
        let Some((name, module)) = &self.module else {
            return Ok(());
        };
        let (name, module) = (name.clone(), module.clone());
        py.run(move |py| -> PyResult<()> { py.import("sys")?.getattr("modules")?.set_item(name, module.bind(py)) })?
            .map_err(|e| anyhow::anyhow!("{e}"))
    }
}

/// One `Dataflow`, ready to run.
pub(crate) struct FlowPlan {
    pub flow_id: String,
    /// The flow file's path as given (tracebacks use it).
    pub file: String,
    /// Where `Dataflow(...)` was called.
    pub location: String,
    pub steps: Vec<StepPlan>,
}

pub(crate) struct StepPlan {
    pub step_id: String,
    pub kind: StepKind,
    /// Stream numbers this step reads.
    pub ups: Vec<usize>,
    /// Stream numbers this step writes, by output port.
    pub downs: Vec<usize>,
    /// Where the step was defined (file:line), for errors without a better place.
    pub location: String,
}

/// Python-function operators that work item by item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PyOpKind {
    Map,
    Filter,
    FilterMap,
    FlatMap,
    FlatMapBatch,
    KeyOn,
    MapValue,
    FilterValue,
    FlatMapValue,
    Branch,
    Inspect,
    StatefulMap,
}

pub(crate) enum StepKind {
    Input(SourceSpec),
    Output(SinkSpec),
    Py(PyOpKind, PyFn),
    KeyOnField(Arc<str>),
    KeyRm,
    Merge,
    Collect { timeout: Micros, max_size: usize },
    Window(WindowPlan),
}

impl StepKind {
    pub(crate) fn name(&self) -> String {
        match self {
            StepKind::Input(s) => format!("input {s}"),
            StepKind::Output(s) => format!("output {s}"),
            StepKind::Py(k, _) => format!("{} (python)", py_op_name(*k)),
            StepKind::KeyOnField(f) => format!("key_on field {f:?} (native)"),
            StepKind::KeyRm => "key_rm (native)".into(),
            StepKind::Merge => "merge (native)".into(),
            StepKind::Collect { max_size, .. } => format!("collect max_size={max_size} (native)"),
            StepKind::Window(w) => w.describe(),
        }
    }
}

pub(crate) fn py_op_name(k: PyOpKind) -> &'static str {
    match k {
        PyOpKind::Map => "map",
        PyOpKind::Filter => "filter",
        PyOpKind::FilterMap => "filter_map",
        PyOpKind::FlatMap => "flat_map",
        PyOpKind::FlatMapBatch => "flat_map_batch",
        PyOpKind::KeyOn => "key_on",
        PyOpKind::MapValue => "map_value",
        PyOpKind::FilterValue => "filter_value",
        PyOpKind::FlatMapValue => "flat_map_value",
        PyOpKind::Branch => "branch",
        PyOpKind::Inspect => "inspect",
        PyOpKind::StatefulMap => "stateful_map",
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Decode {
    JsonLines,
    Csv,
}

impl Decode {
    pub(crate) fn for_path(path: &Path) -> Decode {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("csv") => Decode::Csv,
            _ => Decode::JsonLines,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum SourceSpec {
    File { path: PathBuf, decode: Decode },
    Mqtt(MqttSourceSpec),
    Serial(SerialSourceSpec),
}

/// `sources.serial(...)` as the flow file gave it.
#[derive(Clone, Debug)]
pub(crate) struct SerialSourceSpec {
    pub port: PathBuf,
    pub baud: u32,
    pub data_bits: u8,
    /// `'N'`, `'O'` or `'E'`.
    pub parity: char,
    pub stop_bits: u8,
    /// `"none"`, `"software"` or `"hardware"`.
    pub flow_control: String,
    pub framing: crate::decode::Framing,
    pub max_frame: usize,
    pub format: crate::decode::Format,
    /// Put the time each frame was read into this field.
    pub timestamp_field: Option<Arc<str>>,
}

/// `sources.mqtt(...)` as the flow file gave it.
#[derive(Clone, Debug)]
pub(crate) struct MqttSourceSpec {
    pub broker: String,
    pub filters: Vec<crate::mqtt::topic::Filter>,
    pub qos: u8,
    pub format: crate::decode::Format,
    pub topic_field: Option<Arc<str>>,
    pub max_payload: usize,
    /// `ack="after-commit"`: acknowledge only once the checkpoint is committed.
    pub after_commit: bool,
}

impl std::fmt::Display for SourceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSpec::File { path, decode } => {
                write!(f, "file {} ({:?})", path.display(), decode)
            }
            SourceSpec::Mqtt(m) => write!(
                f,
                "mqtt {} on broker {} qos {} ({}){}",
                m.filters
                    .iter()
                    .map(|x| x.subscribe.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                m.broker,
                m.qos,
                m.format.name(),
                if m.after_commit {
                    ", acknowledged after commit"
                } else {
                    ""
                }
            ),
            SourceSpec::Serial(p) => write!(
                f,
                "serial {} {} {}{}{} flow control {} ({} framing, {}){}",
                p.port.display(),
                p.baud,
                p.data_bits,
                p.parity,
                p.stop_bits,
                p.flow_control,
                p.framing.name(),
                p.format.name(),
                p.timestamp_field
                    .as_ref()
                    .map(|t| format!(", receive time in {t:?}"))
                    .unwrap_or_default()
            ),
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) enum SinkSpec {
    Stdout,
    File(PathBuf),
    Mqtt(MqttSinkSpec),
}

/// `sinks.mqtt(...)` as the flow file gave it.
#[derive(Clone, Debug)]
pub(crate) struct MqttSinkSpec {
    pub topic: String,
    pub broker: String,
    pub qos: u8,
    pub cbor: bool,
    pub retain: bool,
}

impl std::fmt::Display for SinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SinkSpec::Stdout => write!(f, "stdout"),
            SinkSpec::File(p) => write!(f, "file {}", p.display()),
            SinkSpec::Mqtt(m) => write!(
                f,
                "mqtt {} on broker {} qos {} ({}{})",
                m.topic,
                m.broker,
                m.qos,
                if m.cbor { "cbor" } else { "json" },
                if m.retain { ", retained" } else { "" }
            ),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TsUnit {
    Seconds,
    Millis,
    Micros,
    Nanos,
    Iso8601,
}

pub(crate) enum TsGetter {
    Field { name: Arc<str>, unit: TsUnit },
    Py(PyFn),
}

pub(crate) enum ClockSpec {
    Event { getter: TsGetter, wait: Micros },
    System,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum WindowerSpec {
    Sliding {
        length: Micros,
        offset: Micros,
        align: Micros,
    },
    Session {
        gap: Micros,
    },
}

/// One statistic of `win.aggregate`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stat {
    Count,
    Sum,
    Mean,
    Min,
    Max,
    Stddev,
    First,
    Last,
    P50,
    P90,
    P99,
}

impl Stat {
    pub(crate) fn parse(s: &str) -> Option<Stat> {
        Some(match s {
            "count" => Stat::Count,
            "sum" => Stat::Sum,
            "mean" => Stat::Mean,
            "min" => Stat::Min,
            "max" => Stat::Max,
            "stddev" => Stat::Stddev,
            "first" => Stat::First,
            "last" => Stat::Last,
            "p50" => Stat::P50,
            "p90" => Stat::P90,
            "p99" => Stat::P99,
            _ => return None,
        })
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Stat::Count => "count",
            Stat::Sum => "sum",
            Stat::Mean => "mean",
            Stat::Min => "min",
            Stat::Max => "max",
            Stat::Stddev => "stddev",
            Stat::First => "first",
            Stat::Last => "last",
            Stat::P50 => "p50",
            Stat::P90 => "p90",
            Stat::P99 => "p99",
        }
    }
}

/// Fields and statistics of one `win.aggregate` step.
#[derive(Clone, Debug)]
pub(crate) struct AggSpec {
    pub fields: Vec<(Arc<str>, Vec<Stat>)>,
}

pub(crate) enum LogicSpec {
    Fold { builder: PyFn, folder: PyFn, merger: PyFn },
    Count,
    Aggregate(AggSpec),
}

pub(crate) struct WindowPlan {
    pub clock: ClockSpec,
    pub windower: WindowerSpec,
    pub logic: LogicSpec,
    pub ordered: bool,
}

impl WindowPlan {
    fn describe(&self) -> String {
        let logic = match &self.logic {
            LogicSpec::Fold { .. } => "fold (python)".to_string(),
            LogicSpec::Count => "count (native)".to_string(),
            LogicSpec::Aggregate(a) => {
                let fields: Vec<String> = a
                    .fields
                    .iter()
                    .map(|(f, s)| format!("{f}: {}", s.iter().map(|s| s.name()).collect::<Vec<_>>().join(",")))
                    .collect();
                format!("aggregate {{{}}} (native)", fields.join("; "))
            }
        };
        let clock = match &self.clock {
            ClockSpec::System => "system clock".to_string(),
            ClockSpec::Event {
                getter: TsGetter::Field { name, unit },
                wait,
            } => {
                format!("event clock field {name:?} unit {unit:?} wait {}", fmt_micros(*wait))
            }
            ClockSpec::Event {
                getter: TsGetter::Py(_),
                wait,
            } => format!("event clock (python) wait {}", fmt_micros(*wait)),
        };
        let windower = match self.windower {
            WindowerSpec::Sliding { length, offset, .. } if length == offset => {
                format!("tumbling {}", fmt_micros(length))
            }
            WindowerSpec::Sliding { length, offset, .. } => {
                format!("sliding {} every {}", fmt_micros(length), fmt_micros(offset))
            }
            WindowerSpec::Session { gap } => format!("session gap {}", fmt_micros(gap)),
        };
        format!("window {logic}, {windower}, {clock}")
    }
}

fn fmt_micros(us: Micros) -> String {
    if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else {
        format!("{}ms", us as f64 / 1000.0)
    }
}

/// Execute `path` on the Python thread and read the flows it defined. A
/// top level still running after `timeout` is interrupted; the error then
/// shows where it was (the traceback of the interrupted frame).
pub(crate) fn load(py: &PyRunner, path: &Path, timeout: std::time::Duration) -> Result<FlowFile, LoadError> {
    let file = load_staged(py, path, timeout)?;
    file.activate(py)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", path.display())))?;
    Ok(file)
}

/// `load`, leaving `sys.modules` as it was: a running older version of the
/// file keeps its module (its state pickles with its own classes) until the
/// new one is `activate`d, and a version that fails to load never replaces it.
pub(crate) fn load_staged(py: &PyRunner, path: &Path, timeout: std::time::Duration) -> Result<FlowFile, LoadError> {
    let source = std::fs::read_to_string(path).map_err(|e| LoadError::Read {
        path: path.display().to_string(),
        source: e,
    })?;
    let path_buf = path.to_path_buf();
    let label = format!("loading {}", path.display());
    py.run_bounded(label, (timeout, "flow_load_timeout"), move |py| {
        load_on_python_thread(py, &path_buf, &source)
    })
    .map_err(|e| LoadError::Invalid(format!("{}: {e}", path.display())))?
}

fn load_on_python_thread(py: Python<'_>, path: &Path, source: &str) -> Result<FlowFile, LoadError> {
    let file = path.display().to_string();
    let dir = path
        .parent()
        .map(|p| if p.as_os_str().is_empty() { Path::new(".") } else { p })
        .unwrap_or(Path::new("."));
    let fail = |err: PyErr| {
        let f = PyFailure::capture(py, &err, &file);
        LoadError::Python {
            location: f.location,
            message: f.message,
            traceback: f.traceback,
        }
    };
    let runnel = py.import("runnel").map_err(fail)?;
    let created = runnel.getattr("_created").map_err(fail)?;
    created.call_method0("clear").map_err(fail)?;

    // The flow file's folder is importable, as with `python flow.py`.
    let sys_path = py.import("sys").and_then(|s| s.getattr("path")).map_err(fail)?;
    let dir_text = dir.display().to_string();
    if !sys_path.contains(&dir_text).unwrap_or(false) {
        sys_path.call_method1("insert", (0, &dir_text)).map_err(fail)?;
    }

    let builtins = py.import("builtins").map_err(fail)?;
    // A module of its own in sys.modules, so that instances of classes the
    // flow file defines can be pickled into the state file (and unpickled).
    let stem: String = Path::new(&file)
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect()
        })
        .unwrap_or_default();
    let name = format!("_runnel_flow_{stem}");
    let module = pyo3::types::PyModule::new(py, &name).map_err(fail)?;
    // In sys.modules while its top level runs (as an imported module is),
    // then the previous entry is put back until `activate`.
    let modules = py.import("sys").and_then(|s| s.getattr("modules")).map_err(fail)?;
    let previous = modules.get_item(&name).ok();
    modules.set_item(&name, &module).map_err(fail)?;
    let result = run_module(&file, dir, source, &module, &builtins, &created, &fail);
    let restored = match previous {
        Some(p) => modules.set_item(&name, p),
        None => modules.del_item(&name),
    };
    restored.map_err(fail)?;
    let plans = result?;
    Ok(FlowFile {
        flows: plans,
        module: Some((name, Arc::new(module.unbind()))),
    })
}

/// Run a flow file's code in `module` and read the flow it defines.
#[allow(clippy::too_many_arguments)]
fn run_module(
    file: &str,
    dir: &Path,
    source: &str,
    module: &Bound<'_, pyo3::types::PyModule>,
    builtins: &Bound<'_, PyModule>,
    created: &Bound<'_, PyAny>,
    fail: &dyn Fn(PyErr) -> LoadError,
) -> Result<Vec<FlowPlan>, LoadError> {
    let fail = |e: PyErr| fail(e);
    let code = builtins
        .getattr("compile")
        .and_then(|c| c.call1((source, file, "exec")))
        .map_err(fail)?;
    let globals = module.dict();
    globals.set_item("__file__", file).map_err(fail)?;
    globals.set_item("__builtins__", builtins).map_err(fail)?;
    builtins
        .getattr("exec")
        .and_then(|e| e.call1((code, &globals)))
        .map_err(fail)?;

    let flows = created
        .cast::<PyList>()
        .map_err(|e| fail(e.into()))?
        .iter()
        .collect::<Vec<_>>();
    created.call_method0("clear").map_err(fail)?;
    if flows.is_empty() {
        return Err(LoadError::Invalid(format!(
            "{file}: defines no flow; create one at module level, e.g.\n    flow = Dataflow(\"my_flow\")"
        )));
    }
    if flows.len() > 1 {
        // One flow per file keeps `--input STEP=FILE`, replay output and
        // the Bytewax adapter unambiguous.
        let described: Vec<String> = flows
            .iter()
            .map(|f| {
                let id: String = attr(f, "flow_id").unwrap_or_default();
                let at: String = attr(f, "_where").unwrap_or_default();
                (id, at)
            })
            .map(|(id, at)| format!("{id:?} ({at})"))
            .collect();
        let ids: Vec<String> = flows
            .iter()
            .map(|f| attr::<String>(f, "flow_id").unwrap_or_default())
            .collect();
        let same = ids.iter().any(|id| ids.iter().filter(|x| *x == id).count() > 1);
        return Err(LoadError::Invalid(format!(
            "{file}: defines {} flows: {}{}; a flow file defines exactly one Dataflow, so put each in its own file",
            flows.len(),
            described.join(", "),
            if same { " (with the same id, too)" } else { "" }
        )));
    }
    let mut plans: Vec<FlowPlan> = Vec::new();
    for flow in flows {
        let plan = read_flow(&flow, file, dir).map_err(|e| match e {
            ReadErr::Py(err) => fail(err),
            ReadErr::Msg(m) => LoadError::Invalid(m),
        })?;
        plans.push(plan);
    }
    Ok(plans)
}

enum ReadErr {
    Py(PyErr),
    Msg(String),
}

impl From<PyErr> for ReadErr {
    fn from(e: PyErr) -> Self {
        ReadErr::Py(e)
    }
}

fn attr<'py, T: for<'a> FromPyObjectOwned<'py>>(o: &Bound<'py, PyAny>, name: &str) -> PyResult<T> {
    o.getattr(name)?.extract::<T>().map_err(Into::into)
}

use pyo3::conversion::FromPyObjectOwned;

fn read_flow(flow: &Bound<'_, PyAny>, file: &str, dir: &Path) -> Result<FlowPlan, ReadErr> {
    let flow_id: String = attr(flow, "flow_id")?;
    let location: String = attr(flow, "_where")?;
    let mut steps = Vec::new();
    for step in flow.getattr("_steps")?.try_iter()? {
        let step = step?;
        let kind: String = attr(&step, "kind")?;
        let step_id: String = attr(&step, "step_id")?;
        let ups: Vec<usize> = attr(&step, "ups")?;
        let downs: Vec<usize> = attr(&step, "downs")?;
        let where_: String = attr(&step, "where")?;
        let params = step.getattr("params")?;
        let p = |name: &str| -> PyResult<Bound<'_, PyAny>> { params.get_item(name) };
        let func = |name: &str| -> PyResult<PyFn> { Ok(Arc::new(p(name)?.unbind())) };
        let step_kind = match kind.as_str() {
            "input" => StepKind::Input(read_source(&p("source")?, dir)?),
            "output" => StepKind::Output(read_sink(&p("sink")?, dir)?),
            "key_on_field" => StepKind::KeyOnField(Arc::from(p("field")?.extract::<String>()?.as_str())),
            "key_rm" => StepKind::KeyRm,
            "merge" => StepKind::Merge,
            "collect" => StepKind::Collect {
                timeout: delta_micros(&p("timeout")?)?,
                max_size: p("max_size")?.extract()?,
            },
            "window" => StepKind::Window(read_window(&params, &step_id, &where_)?),
            other => {
                let op = match other {
                    "map" => PyOpKind::Map,
                    "filter" => PyOpKind::Filter,
                    "filter_map" => PyOpKind::FilterMap,
                    "flat_map" => PyOpKind::FlatMap,
                    "flat_map_batch" => PyOpKind::FlatMapBatch,
                    "key_on" => PyOpKind::KeyOn,
                    "map_value" => PyOpKind::MapValue,
                    "filter_value" => PyOpKind::FilterValue,
                    "flat_map_value" => PyOpKind::FlatMapValue,
                    "branch" => PyOpKind::Branch,
                    "inspect" => PyOpKind::Inspect,
                    "stateful_map" => PyOpKind::StatefulMap,
                    _ => {
                        return Err(ReadErr::Msg(format!(
                            "{where_}: step {step_id:?} has unknown kind {other:?}"
                        )))
                    }
                };
                StepKind::Py(op, func("fn")?)
            }
        };
        steps.push(StepPlan {
            step_id,
            kind: step_kind,
            ups,
            downs,
            location: where_,
        });
    }
    if !steps.iter().any(|s| matches!(s.kind, StepKind::Input(_))) {
        return Err(ReadErr::Msg(format!(
            "{location}: flow {flow_id:?} has no input step; add one with op.input(\"in\", flow, sources.file(...))"
        )));
    }
    Ok(FlowPlan {
        flow_id,
        file: file.to_string(),
        location,
        steps,
    })
}

fn resolve(dir: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn read_source(src: &Bound<'_, PyAny>, dir: &Path) -> Result<SourceSpec, ReadErr> {
    let kind: String = attr(src, "kind")?;
    match kind.as_str() {
        "file" => {
            let path: String = attr(src, "path")?;
            let decode: String = attr(src, "decode")?;
            let decode = if decode == "csv" {
                Decode::Csv
            } else {
                Decode::JsonLines
            };
            Ok(SourceSpec::File {
                path: resolve(dir, &path),
                decode,
            })
        }
        "mqtt" => {
            let topics: Vec<String> = attr(src, "topics")?;
            let mut filters = Vec::new();
            for t in &topics {
                filters.push(crate::mqtt::topic::Filter::parse(t).map_err(ReadErr::Msg)?);
            }
            let format = read_format(src)?;
            let topic_field: Option<String> = attr(src, "topic_field")?;
            Ok(SourceSpec::Mqtt(MqttSourceSpec {
                broker: attr(src, "broker")?,
                filters,
                qos: attr(src, "qos")?,
                format,
                topic_field: topic_field.map(|t| Arc::from(t.as_str())),
                max_payload: attr(src, "max_payload")?,
                after_commit: attr::<String>(src, "ack")? == "after-commit",
            }))
        }
        "serial" => {
            let port: String = attr(src, "port")?;
            let framing: String = attr(src, "framing")?;
            let parity: String = attr(src, "parity")?;
            let timestamp_field: Option<String> = attr(src, "timestamp_field")?;
            Ok(SourceSpec::Serial(SerialSourceSpec {
                port: resolve(dir, &port),
                baud: attr(src, "baud")?,
                data_bits: attr(src, "data_bits")?,
                parity: match parity.as_str() {
                    "odd" => 'O',
                    "even" => 'E',
                    _ => 'N',
                },
                stop_bits: attr(src, "stop_bits")?,
                flow_control: attr(src, "flow_control")?,
                framing: if framing == "cobs" {
                    crate::decode::Framing::Cobs
                } else {
                    crate::decode::Framing::Lines
                },
                max_frame: attr(src, "max_frame")?,
                format: read_format(src)?,
                timestamp_field: timestamp_field.map(|t| Arc::from(t.as_str())),
            }))
        }
        other => Err(ReadErr::Msg(format!("unknown source kind {other:?}"))),
    }
}

/// A source's `decode` (and `columns`), already validated in Python.
fn read_format(src: &Bound<'_, PyAny>) -> Result<crate::decode::Format, ReadErr> {
    use crate::decode::Format;
    let decode: String = attr(src, "decode")?;
    let columns: Option<Vec<String>> = attr(src, "columns")?;
    Ok(match decode.as_str() {
        "cbor" => Format::Cbor,
        "csv" => Format::Csv {
            columns: columns.map(|c| c.iter().map(|s| Arc::from(s.as_str())).collect()),
        },
        "kv" => Format::Kv,
        "raw" => Format::Raw,
        "nmea" => Format::Nmea,
        _ => Format::Json,
    })
}

fn read_sink(sink: &Bound<'_, PyAny>, dir: &Path) -> Result<SinkSpec, ReadErr> {
    let kind: String = attr(sink, "kind")?;
    match kind.as_str() {
        "stdout" => Ok(SinkSpec::Stdout),
        "file" => Ok(SinkSpec::File(resolve(dir, &attr::<String>(sink, "path")?))),
        "mqtt" => Ok(SinkSpec::Mqtt(MqttSinkSpec {
            topic: attr(sink, "topic")?,
            broker: attr(sink, "broker")?,
            qos: attr(sink, "qos")?,
            cbor: attr::<String>(sink, "encode")? == "cbor",
            retain: attr(sink, "retain")?,
        })),
        other => Err(ReadErr::Msg(format!("unknown sink kind {other:?}"))),
    }
}

fn read_window(params: &Bound<'_, PyAny>, step_id: &str, where_: &str) -> Result<WindowPlan, ReadErr> {
    let clock = params.get_item("clock")?;
    let clock_cls: String = clock.get_type().name()?.to_string();
    let clock = if clock_cls == "SystemClock" {
        ClockSpec::System
    } else {
        let getter = clock.getattr("ts_getter")?;
        let wait = delta_micros(&clock.getattr("wait_for_system_duration")?)?;
        let getter = if let Ok(name) = getter.extract::<String>() {
            let unit: String = attr(&clock, "unit")?;
            let unit = match unit.as_str() {
                "s" => TsUnit::Seconds,
                "ms" => TsUnit::Millis,
                "us" => TsUnit::Micros,
                "ns" => TsUnit::Nanos,
                _ => TsUnit::Iso8601,
            };
            TsGetter::Field {
                name: Arc::from(name.as_str()),
                unit,
            }
        } else {
            TsGetter::Py(Arc::new(getter.unbind()))
        };
        ClockSpec::Event { getter, wait }
    };
    let w = params.get_item("windower")?;
    let w_cls: String = w.get_type().name()?.to_string();
    let aware = |name: &str| -> Result<Micros, ReadErr> {
        crate::python::convert::micros(&w.getattr(name)?)
            .map_err(|e| ReadErr::Msg(format!("{where_}: step {step_id:?}: {e}")))
    };
    let windower = match w_cls.as_str() {
        "TumblingWindower" => {
            let length = delta_micros(&w.getattr("length")?)?;
            WindowerSpec::Sliding {
                length,
                offset: length,
                align: aware("align_to")?,
            }
        }
        "SlidingWindower" => WindowerSpec::Sliding {
            length: delta_micros(&w.getattr("length")?)?,
            offset: delta_micros(&w.getattr("offset")?)?,
            align: aware("align_to")?,
        },
        _ => WindowerSpec::Session {
            gap: delta_micros(&w.getattr("gap")?)?,
        },
    };
    let logic: String = params.get_item("logic")?.extract()?;
    let logic = match logic.as_str() {
        "count" => LogicSpec::Count,
        "aggregate" => {
            let spec = params.get_item("spec")?;
            let mut fields = Vec::new();
            for (name, stats) in spec.cast::<PyDict>().map_err(|e| ReadErr::Py(e.into()))?.iter() {
                let name: String = name.extract()?;
                let stats: Vec<String> = stats.extract()?;
                let stats = stats.iter().filter_map(|s| Stat::parse(s)).collect();
                fields.push((Arc::from(name.as_str()), stats));
            }
            LogicSpec::Aggregate(AggSpec { fields })
        }
        _ => LogicSpec::Fold {
            builder: Arc::new(params.get_item("builder")?.unbind()),
            folder: Arc::new(params.get_item("folder")?.unbind()),
            merger: Arc::new(params.get_item("merger")?.unbind()),
        },
    };
    let ordered: bool = params.get_item("ordered")?.extract()?;
    Ok(WindowPlan {
        clock,
        windower,
        logic,
        ordered,
    })
}

/// A human-readable step graph, as `runnel check` prints it.
pub(crate) fn describe(plan: &FlowPlan) -> String {
    let mut producer: HashMap<usize, (&str, usize)> = HashMap::new();
    for s in &plan.steps {
        for (port, d) in s.downs.iter().enumerate() {
            producer.insert(*d, (&s.step_id, port));
        }
    }
    let port_name = |kind: &StepKind, port: usize| -> &'static str {
        match (kind, port) {
            (StepKind::Window(_), 0) => ".down",
            (StepKind::Window(_), 1) => ".late",
            (StepKind::Window(_), _) => ".meta",
            (StepKind::Py(PyOpKind::Branch, _), 0) => ".trues",
            (StepKind::Py(PyOpKind::Branch, _), _) => ".falses",
            _ => "",
        }
    };
    let kinds: HashMap<&str, &StepKind> = plan.steps.iter().map(|s| (s.step_id.as_str(), &s.kind)).collect();
    let n = plan.steps.len();
    let plural = if n == 1 { "" } else { "s" };
    let mut out = format!("flow {:?} ({}) — {n} step{plural}\n", plan.flow_id, plan.location);
    for s in &plan.steps {
        let ups: Vec<String> = s
            .ups
            .iter()
            .map(|u| match producer.get(u) {
                Some((id, port)) => format!("{id}{}", port_name(kinds[id], *port)),
                None => "?".into(),
            })
            .collect();
        let from = if ups.is_empty() {
            String::new()
        } else {
            format!(" <- {}", ups.join(", "))
        };
        out.push_str(&format!("  {}: {}{}\n", s.step_id, s.kind.name(), from));
    }
    out
}

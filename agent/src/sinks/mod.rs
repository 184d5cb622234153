//! Sinks: where output steps write. Each writes JSON lines (tuples as
//! arrays, datetimes as RFC 3339 text). Items holding Python objects are
//! resolved to JSON form on the Python thread first, one job per batch.
//! MQTT (`mqtt.rs`) commits to the agent's outbox instead; the engine does
//! not know the difference.

mod mqtt;

pub(crate) use mqtt::SinkEnv;

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::engine::{Cx, Operator, Out};
use crate::flow::SinkSpec;
use crate::json;
use crate::python::convert::resolve_for_json;
use crate::value::{Item, Value};

/// Where replay output goes: one shared writer for every output step.
pub(crate) type SharedOut = Arc<Mutex<Box<dyn Write + Send>>>;

enum Target {
    /// `runnel replay`: `{"step": ..., "item": ...}` lines.
    Replay(SharedOut),
    Stdout,
    File {
        path: PathBuf,
        w: Option<BufWriter<File>>,
        /// Written to since the last checkpoint.
        changed: bool,
    },
    Mqtt(Box<mqtt::MqttSink>),
    /// A sink that cannot run here (MQTT outside `runnel run`).
    Unavailable(String),
}

/// An output step.
pub(crate) struct OutputOp {
    step_id: String,
    target: Target,
}

impl OutputOp {
    pub(crate) fn replay(step_id: String, out: SharedOut) -> OutputOp {
        OutputOp {
            step_id,
            target: Target::Replay(out),
        }
    }

    pub(crate) fn sink(flow_id: &str, step_id: String, spec: &SinkSpec, env: Option<&Arc<SinkEnv>>) -> OutputOp {
        let target = match spec {
            SinkSpec::Stdout => Target::Stdout,
            SinkSpec::File(path) => Target::File {
                path: path.clone(),
                w: None,
                changed: false,
            },
            SinkSpec::Mqtt(m) => match env {
                Some(env) => Target::Mqtt(Box::new(mqtt::MqttSink::new(flow_id, &step_id, m, env.clone()))),
                None => Target::Unavailable(format!(
                    "an MQTT sink (broker {}) needs the agent's outbox (runnel run)",
                    m.broker
                )),
            },
        };
        OutputOp { step_id, target }
    }

    fn render<V: std::borrow::Borrow<Value>>(&self, items: &[V]) -> String {
        let mut text = String::with_capacity(items.len() * 64);
        for v in items {
            let v = v.borrow();
            match &self.target {
                Target::Replay(_) => json::replay_line(&self.step_id, v, &mut text),
                _ => {
                    json::write(v, &mut text);
                    text.push('\n');
                }
            }
        }
        text
    }

    fn write<V: std::borrow::Borrow<Value>>(&mut self, cx: &Cx, values: &[V]) {
        match &mut self.target {
            Target::Mqtt(m) => return m.write(cx, &self.step_id, values),
            Target::Unavailable(why) => {
                cx.counters
                    .add(&format!("{}.write_errors", self.step_id), values.len() as u64);
                let step = &self.step_id;
                cx.warnings
                    .warn(&format!("flow {} output {step}: unavailable", cx.flow_id), || {
                        format!(
                            "flow {} output {step:?}: {why}; {} items not written",
                            cx.flow_id,
                            values.len()
                        )
                    });
                return;
            }
            _ => {}
        }
        let text = self.render(values);
        let step = &self.step_id;
        let result = match &mut self.target {
            Target::Replay(w) => w.lock().unwrap_or_else(|p| p.into_inner()).write_all(text.as_bytes()),
            Target::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
            Target::Mqtt(_) | Target::Unavailable(_) => unreachable!("not rendered as text"),
            Target::File { path, w, changed } => {
                *changed = true;
                if w.is_none() {
                    if let Some(dir) = path.parent() {
                        let _ = std::fs::create_dir_all(dir);
                    }
                    match OpenOptions::new().create(true).append(true).open(&*path) {
                        Ok(f) => *w = Some(BufWriter::with_capacity(64 * 1024, f)),
                        Err(e) => {
                            cx.counters.add(&format!("{step}.write_errors"), values.len() as u64);
                            cx.warnings
                                .warn(&format!("flow {} output {step}: open", cx.flow_id), || {
                                    format!(
                                        "flow {} output {step:?}: cannot open {}: {e}; {} items not written",
                                        cx.flow_id,
                                        path.display(),
                                        values.len()
                                    )
                                });
                            return;
                        }
                    }
                }
                w.as_mut().expect("opened").write_all(text.as_bytes())
            }
        };
        if let Err(e) = result {
            cx.counters.add(&format!("{step}.write_errors"), values.len() as u64);
            cx.warnings
                .warn(&format!("flow {} output {step}: write", cx.flow_id), || {
                    format!("flow {} output {step:?}: write failed: {e}", cx.flow_id)
                });
        }
    }
}

impl Operator for OutputOp {
    fn has_pending(&self) -> bool {
        matches!(&self.target, Target::Mqtt(m) if m.has_pending())
    }

    /// MQTT: the messages of this checkpoint. A file: its length, so that a
    /// restart after a crash cuts what was written after the last checkpoint
    /// (it is computed again), and the file ends up as an uninterrupted run
    /// would have written it.
    fn snapshot(&mut self, cx: &Cx, snap: &mut crate::engine::Snap) {
        match &mut self.target {
            Target::Mqtt(m) => m.snapshot(cx, &self.step_id, snap),
            Target::File { w, changed, .. } if *changed => {
                let len = match w.as_mut() {
                    // On disk before the state says so: a power cut must not
                    // leave the file shorter than the length committed.
                    Some(w) => w
                        .flush()
                        .and_then(|_| w.get_ref().sync_data())
                        .and_then(|_| w.get_ref().metadata())
                        .map(|m| m.len()),
                    None => return,
                };
                match len {
                    Ok(len) => {
                        *changed = false;
                        let mut e = crate::engine::snapshot::Enc::default();
                        e.u(len);
                        snap.put(&Arc::from(self.step_id.as_str()), "len".into(), e);
                    }
                    // The state must not move past output that may not be on disk.
                    Err(e) => {
                        snap.abort = Some(format!("output {:?}: cannot write its file to disk: {e}", self.step_id))
                    }
                }
            }
            _ => {}
        }
    }

    fn baseline(&mut self) -> Option<(String, Vec<u8>)> {
        let Target::File { path, .. } = &self.target else {
            return None;
        };
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let mut e = crate::engine::snapshot::Enc::default();
        e.u(len);
        Some(("len".into(), crate::engine::snapshot::plain(&e)))
    }

    fn restore(&mut self, cx: &Cx, rows: Vec<(String, Vec<u8>)>) -> crate::engine::Restored {
        let Target::File { path, .. } = &self.target else {
            return Default::default();
        };
        let Some((_, bytes)) = rows.iter().find(|(r, _)| r == "len") else {
            return Default::default();
        };
        let len = crate::engine::snapshot::split(bytes).and_then(|r| r.decoder(None)?.u());
        let Ok(len) = len else {
            cx.state_error(&self.step_id, || {
                "the saved length of the output file cannot be read".into()
            });
            return Default::default();
        };
        let step = &self.step_id;
        let now = std::fs::metadata(path).map(|m| m.len());
        match now {
            Ok(n) if n > len => {
                match OpenOptions::new().write(true).open(path).and_then(|f| f.set_len(len)) {
                    Ok(()) => tracing::info!(
                        "flow {} output {step:?}: cut {} back from {n} to {len} bytes, as of the last checkpoint (what followed is written again)",
                        cx.flow_id,
                        path.display()
                    ),
                    Err(e) => cx.state_error(step, || {
                        format!("cannot cut {} back to its checkpointed length {len}: {e}", path.display())
                    }),
                }
            }
            Ok(n) if n < len => tracing::warn!(
                "flow {} output {step:?}: {} is shorter ({n} bytes) than at the last checkpoint ({len}); was it rotated? appending",
                cx.flow_id,
                path.display()
            ),
            _ => {}
        }
        Default::default()
    }

    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, _out: &mut Out) {
        cx.counters.add(&format!("{}.items", self.step_id), batch.len() as u64);
        if batch.iter().any(|i| i.v.has_py()) {
            let values: Vec<Value> = batch.into_iter().map(|i| i.v).collect();
            match cx.python(&self.step_id, move |py| {
                values.into_iter().map(|v| resolve_for_json(py, v)).collect::<Vec<_>>()
            }) {
                Ok(values) => self.write(cx, &values),
                Err(e) => tracing::error!(
                    "flow {} output {:?}: could not render items: {e}",
                    cx.flow_id,
                    self.step_id
                ),
            }
        } else {
            let values: Vec<&Value> = batch.iter().map(|i| &i.v).collect();
            self.write(cx, &values);
            cx.bury(batch);
        }
    }
    fn flush(&mut self, _cx: &Cx) {
        let _ = match &mut self.target {
            Target::Replay(w) => w.lock().unwrap_or_else(|p| p.into_inner()).flush(),
            Target::Stdout => std::io::stdout().lock().flush(),
            Target::File { w: Some(w), .. } => w.flush(),
            Target::File { w: None, .. } | Target::Mqtt(_) | Target::Unavailable(_) => Ok(()),
        };
    }
}

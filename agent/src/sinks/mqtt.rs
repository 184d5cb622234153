//! The MQTT sink: renders each item as a message (an envelope with a
//! stable `id` and a per-sink `seq`) and holds it for the flow's next
//! checkpoint, which commits it to the broker's outbox together with the
//! state that produced it (the engine checkpoints at once when a sink holds
//! messages). Delivery from there is the broker connection's job
//! (`mqtt/conn.rs`), which only ever sees committed entries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::engine::Cx;
use crate::flow::MqttSinkSpec;
use crate::json;
use crate::store::{Entry, Op, Store};
use crate::value::Value;

/// What MQTT sinks need from the agent.
pub(crate) struct SinkEnv {
    pub device_id: Arc<str>,
    pub store: Store,
    /// Set when the agent stops: a sink blocked on a full outbox gives up.
    pub stopping: Arc<AtomicBool>,
    /// When a blocked sink first saw the agent stopping (one deadline for all).
    pub stopped_at: std::sync::OnceLock<std::time::Instant>,
}

/// How long a `block` sink waits for room once the agent stops (the flows
/// get 3 s in all).
const GIVE_UP_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// MQTT topics are at most 65535 bytes.
const MAX_TOPIC: usize = 65_535;
/// Messages beyond what runnel's connections write would fail the
/// connection on every resend and hold up the outbox behind them.
const MAX_MESSAGE: usize = crate::mqtt::link::MAX_PACKET - 1024;

enum Part {
    Text(String),
    Key,
    Flow,
    Step,
    Device,
}

pub(crate) struct MqttSink {
    spec: MqttSinkSpec,
    broker: Arc<str>,
    topic: Vec<Part>,
    env: Arc<SinkEnv>,
    /// `flow/step`: the name of this sink's seq in the store.
    name: Arc<str>,
    seq: u64,
    /// Messages waiting for the next checkpoint.
    pending: Vec<Entry>,
}

fn parse_template(t: &str) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut rest = t;
    while let Some(i) = rest.find(['{', '}']) {
        text.push_str(&rest[..i]);
        let r = &rest[i..];
        if r.starts_with("{{") || r.starts_with("}}") {
            text.push(r.as_bytes()[0] as char);
            rest = &r[2..];
            continue;
        }
        let Some(end) = r.find('}') else {
            text.push_str(r);
            rest = "";
            break;
        };
        let part = match &r[1..end] {
            "key" => Part::Key,
            "flow" => Part::Flow,
            "step" => Part::Step,
            "device_id" => Part::Device,
            other => Part::Text(format!("{{{other}}}")),
        };
        if !text.is_empty() {
            parts.push(Part::Text(std::mem::take(&mut text)));
        }
        parts.push(part);
        rest = &r[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    parts
}

/// A key as one topic level: no `/`, `+` or `#`, never empty.
fn level(s: &str) -> String {
    if s.is_empty() {
        return "_".into();
    }
    s.chars()
        .map(|c| if matches!(c, '/' | '+' | '#') { '_' } else { c })
        .collect()
}

impl MqttSink {
    pub(crate) fn new(flow_id: &str, step_id: &str, spec: &MqttSinkSpec, env: Arc<SinkEnv>) -> MqttSink {
        let name: Arc<str> = Arc::from(format!("{flow_id}/{step_id}"));
        let seq = env.store.sink_seq(&name);
        MqttSink {
            broker: Arc::from(spec.broker.as_str()),
            topic: parse_template(&spec.topic),
            spec: spec.clone(),
            env,
            name,
            seq,
            pending: Vec::new(),
        }
    }

    fn uses_key(&self) -> bool {
        self.topic.iter().any(|p| matches!(p, Part::Key))
    }

    fn topic_for(&self, cx: &Cx, step: &str, key: Option<&str>) -> String {
        let mut t = String::new();
        for p in &self.topic {
            match p {
                Part::Text(s) => t.push_str(s),
                Part::Key => t.push_str(&level(key.unwrap_or(""))),
                Part::Flow => t.push_str(&level(&cx.flow_id)),
                Part::Step => t.push_str(&level(step)),
                Part::Device => t.push_str(&level(&self.env.device_id)),
            }
        }
        t
    }

    /// The message for one item.
    fn envelope(&self, cx: &Cx, step: &str, seq: u64, v: &Value) -> (Option<String>, Value) {
        let (key, window, value) = match v {
            Value::Tuple(parts) if parts.len() == 2 => match (&parts[0], &parts[1]) {
                (Value::Str(k), Value::Tuple(inner)) if inner.len() == 2 && matches!(inner[0], Value::Int(_)) => {
                    let Value::Int(w) = inner[0] else {
                        unreachable!("matched")
                    };
                    (Some(k.clone()), Some(w), inner[1].clone())
                }
                (Value::Str(k), other) => (Some(k.clone()), None, other.clone()),
                _ => (None, None, v.clone()),
            },
            other => (None, None, other.clone()),
        };
        let dev = &*self.env.device_id;
        let flow = &*cx.flow_id;
        let id = match (&key, window) {
            (Some(k), Some(w)) => format!("{dev}/{flow}/{step}/{k}/{w}"),
            (Some(k), None) => format!("{dev}/{flow}/{step}/{k}/#{seq}"),
            _ => format!("{dev}/{flow}/{step}/#{seq}"),
        };
        let mut fields: Vec<(Arc<str>, Value)> = vec![
            (Arc::from("id"), Value::str(&id)),
            (Arc::from("seq"), Value::Int(seq as i64)),
            (Arc::from("device_id"), Value::Str(self.env.device_id.clone())),
            (Arc::from("flow"), Value::Str(cx.flow_id.clone())),
            (Arc::from("step"), Value::str(step)),
        ];
        if let Some(k) = &key {
            fields.push((Arc::from("key"), Value::Str(k.clone())));
        }
        if let Some(w) = window {
            fields.push((Arc::from("window"), Value::Int(w)));
        }
        fields.push((Arc::from("value"), value));
        (key.map(|k| k.to_string()), Value::Map(fields))
    }

    /// Render `values` as messages for the next checkpoint.
    pub(crate) fn write<V: std::borrow::Borrow<Value>>(&mut self, cx: &Cx, step: &str, values: &[V]) {
        let mut entries = Vec::with_capacity(values.len());
        let mut seq = self.seq;
        for v in values {
            let v = v.borrow();
            let (key, msg) = self.envelope(cx, step, seq + 1, v);
            if key.is_none() && self.uses_key() {
                cx.skip(step, "no_key", Default::default(), || {
                    format!(
                        "topic {:?} needs a key, but the item is not (key, value): {}",
                        self.spec.topic,
                        v.type_name()
                    )
                });
                continue;
            }
            seq += 1;
            let payload = if self.spec.cbor {
                crate::decode::to_cbor(&msg)
            } else {
                let mut s = String::new();
                json::write(&msg, &mut s);
                s.into_bytes()
            };
            let topic = self.topic_for(cx, step, key.as_deref());
            if topic.len() > MAX_TOPIC || topic.len() + payload.len() > MAX_MESSAGE {
                cx.skip(step, "too_large", Default::default(), || {
                    format!(
                        "message of {} bytes on a topic of {} bytes is more than MQTT can carry here (topic up to {MAX_TOPIC}, message up to {MAX_MESSAGE})",
                        payload.len(),
                        topic.len()
                    )
                });
                continue;
            }
            entries.push((
                seq,
                Entry {
                    topic,
                    payload,
                    qos: self.spec.qos,
                    retain: self.spec.retain,
                },
            ));
        }
        self.seq = seq;
        self.pending.extend(entries.into_iter().map(|(_, e)| e));
    }

    /// Whether messages wait for the next checkpoint.
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hand the messages written since the last checkpoint to it: they are
    /// committed to the outbox together with the state that produced them.
    /// With `block`, wait for room first (so the outbox stays within its
    /// bound, give or take one checkpoint of another sink); if runnel stops
    /// while the outbox stays full, the checkpoint is called off (`abort`):
    /// the next start computes these messages again from the last one.
    pub(crate) fn snapshot(&mut self, cx: &Cx, step: &str, snap: &mut crate::engine::Snap) {
        if self.pending.is_empty() {
            return;
        }
        let bytes: u64 = self.pending.iter().map(|e| e.charge_in(&self.broker)).sum();
        let env = self.env.clone();
        let give_up = || {
            // Waiting for room is not a wedge (the broker may be away for hours).
            if let Some(h) = &cx.heartbeat {
                h.store(crate::engine::heartbeat_now(), Ordering::Relaxed);
            }
            if !env.stopping.load(Ordering::Relaxed) {
                return false;
            }
            env.stopped_at.get_or_init(std::time::Instant::now).elapsed() >= GIVE_UP_AFTER
        };
        if !self.env.store.outboxes().wait_for_room(&self.broker, bytes, &give_up) {
            let n = self.pending.len();
            tracing::error!(
                "flow {} output {step:?}: stopping while the outbox of broker {} is full; the {n} message(s) of the last checkpoint are computed again after the next start",
                cx.flow_id,
                self.broker
            );
            snap.abort = Some(format!("the outbox of broker {} is full", self.broker));
            return;
        }
        let entries = std::mem::take(&mut self.pending);
        let n = entries.len() as u64;
        snap.ops.push(Op::Append {
            broker: self.broker.clone(),
            sink: self.name.clone(),
            last_seq: self.seq,
            entries,
        });
        let counters = cx.counters.clone();
        let name = format!("{step}.queued");
        let errors = format!("{step}.write_errors");
        snap.after
            .push(Box::new(move |ok| counters.add(if ok { &name } else { &errors }, n)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_levels() {
        let p = parse_template("fleet/{device_id}/{{x}}/{key}");
        assert_eq!(p.len(), 4, "text, device, text, key");
        assert!(matches!(&p[2], Part::Text(t) if t == "/{x}/"));
        assert_eq!(level("a/b+c#"), "a_b_c_");
        assert_eq!(level(""), "_");
    }
}

//! The MQTT sink: renders each item as a message (an envelope with a
//! stable `id` and a per-sink `seq`) and hands it to the store's writer for
//! the broker's outbox (with `outbox_full = "block"` it waits for the
//! commit). Delivery from there is the broker connection's job
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
    /// Commits handed to the writer and not yet answered: (entries, answer).
    in_flight: std::collections::VecDeque<(u64, std::sync::mpsc::Receiver<Result<(), String>>)>,
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
            in_flight: Default::default(),
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

    /// Commit `values` to the outbox (waiting for room with `block`).
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
        if entries.is_empty() {
            return;
        }
        // With `block`, commit as much as fits and wait for room for the
        // rest, so the outbox stays within its bound (a lone entry larger
        // than the bound still goes in when the outbox is empty).
        let mut entries = entries.into_iter().peekable();
        let mut next_seq = self.seq;
        while entries.peek().is_some() {
            let first = entries.peek().map(|(_, e)| e.charge_in(&self.broker)).unwrap_or(0);
            let stopping = self.env.stopping.clone();
            let boxes = self.env.store.outboxes();
            // While the agent stops, the forwarder may still make room: give
            // up only after GIVE_UP_AFTER of stopping.
            let since: std::cell::Cell<Option<std::time::Instant>> = Default::default();
            let give_up = || {
                if !stopping.load(Ordering::Relaxed) {
                    return false;
                }
                let t = since.get().unwrap_or_else(std::time::Instant::now);
                since.set(Some(t));
                t.elapsed() >= GIVE_UP_AFTER
            };
            if !boxes.wait_for_room(&self.broker, first, &give_up) {
                let n = entries.count() as u64;
                cx.counters.add(&format!("{step}.write_errors"), n);
                cx.py.note_abandoned(format!(
                    "{n} message(s) of flow {} output {step:?} that did not fit in the full outbox",
                    cx.flow_id
                ));
                tracing::error!(
                    "flow {} output {step:?}: stopping while the outbox of broker {} is full; {n} message(s) not written",
                    cx.flow_id,
                    self.broker
                );
                return;
            }
            // `block` waits for each commit, so that the bound holds exactly.
            let room_left = boxes.room(&self.broker);
            let blocking = room_left.is_some();
            let mut room = room_left.unwrap_or(u64::MAX);
            let mut chunk = Vec::new();
            while let Some((seq, e)) = entries.next_if(|(_, e)| chunk.is_empty() || e.charge_in(&self.broker) <= room) {
                room = room.saturating_sub(e.charge_in(&self.broker));
                next_seq = seq;
                chunk.push(e);
            }
            let n = chunk.len() as u64;
            let append = vec![Op::Append {
                broker: self.broker.clone(),
                sink: self.name.clone(),
                last_seq: next_seq,
                entries: chunk,
            }];
            if !blocking {
                // Hand the entries to the writer and go on: appends queued
                // while it syncs share the next commit, so a burst of results
                // (every key's window closing at one boundary) costs a few
                // fsyncs, not one per engine batch. Nothing is less durable
                // than waiting would make it: the results exist nowhere else
                // until the commit either way (window state is not kept yet).
                // At most IN_FLIGHT commits are waited for, so a slow disk
                // holds the flow back instead of filling memory.
                self.settle(cx, step, IN_FLIGHT - 1);
                self.in_flight.push_back((n, self.env.store.submit_tracked(append)));
                self.seq = next_seq;
                cx.counters.add(&format!("{step}.queued"), n);
                continue;
            }
            match self.env.store.commit(append) {
                Ok(()) => {
                    self.seq = next_seq;
                    cx.counters.add(&format!("{step}.queued"), n);
                }
                Err(e) => {
                    cx.counters.add(&format!("{step}.write_errors"), n);
                    cx.warnings
                        .warn(&format!("flow {} output {step}: outbox", cx.flow_id), || {
                            format!(
                                "flow {} output {step:?}: cannot commit {n} message(s) to the outbox: {e}",
                                cx.flow_id
                            )
                        });
                }
            }
        }
    }
}

impl MqttSink {
    /// Wait until at most `keep` commits of this sink are in flight,
    /// counting the ones that failed.
    fn settle(&mut self, cx: &Cx, step: &str, keep: usize) {
        loop {
            let finished = match self.in_flight.front() {
                None => return,
                Some((_, rx)) if self.in_flight.len() > keep => Some(rx.recv()),
                Some((_, rx)) => match rx.try_recv() {
                    Ok(r) => Some(Ok(r)),
                    Err(std::sync::mpsc::TryRecvError::Empty) => None,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => Some(Err(std::sync::mpsc::RecvError)),
                },
            };
            let Some(result) = finished else { return };
            let (n, _) = self.in_flight.pop_front().expect("front exists");
            let error = match result {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => e,
                Err(_) => "the store writer has stopped".into(),
            };
            cx.counters.add(&format!("{step}.write_errors"), n);
            cx.warnings
                .warn(&format!("flow {} output {step}: outbox", cx.flow_id), || {
                    format!(
                        "flow {} output {step:?}: cannot commit {n} message(s) to the outbox: {error}",
                        cx.flow_id
                    )
                });
        }
    }
}

/// Commits a sink may have in flight before it waits for the oldest.
const IN_FLIGHT: usize = 8;

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

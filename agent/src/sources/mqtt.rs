//! The MQTT source: messages the broker connection routed to this input
//! step, decoded into items (`decode.rs`), with topic fields added, sent to
//! the engine in batches. A message is acknowledged to the broker (QoS 1)
//! once its items are in the engine's queue, never before.
//!
//! A payload that does not decode, or is over `max_payload`, is counted,
//! logged (rate-limited, with its topic) and skipped; the rest go on.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::{SourceCtx, SourceMsg};
use crate::decode::PayloadDecoder;
use crate::flow::MqttSourceSpec;
use crate::mqtt::Inbox;
use crate::value::{set_field, Item, Origin, Value};

/// Messages taken into one batch at most.
const MESSAGES_PER_BATCH: usize = 256;

/// The source as the engine starts it: the spec, and the inbox the agent
/// registered with the broker's connection before it connected.
#[derive(Clone)]
pub(crate) struct MqttInput {
    pub spec: MqttSourceSpec,
    pub inbox: Arc<Mutex<Option<Inbox>>>,
}

pub(super) async fn read(input: MqttInput, cx: SourceCtx) {
    let inbox = input.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
    let Some(mut inbox) = inbox else {
        tracing::error!(
            "flow {} input {:?}: no broker connection for this MQTT source; it reads nothing",
            cx.flow_id,
            cx.step_id
        );
        let _ = cx.tx.send(SourceMsg::Eof(cx.input)).await;
        return;
    };
    let spec = input.spec;
    let mut decoder = PayloadDecoder::new(spec.format.clone());
    let wants_fields = spec.topic_field.is_some() || spec.filters.iter().any(|f| f.has_fields());
    let mut number = 0u64;
    let mut values = Vec::new();
    loop {
        let Some(first) = inbox.rx.recv().await else { break };
        let mut messages = vec![first];
        while messages.len() < MESSAGES_PER_BATCH {
            match inbox.rx.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        inbox.queued.fetch_sub(bytes, Ordering::Relaxed);
        let mut batch = Vec::with_capacity(messages.len());
        for m in &messages {
            number += 1;
            let at = Origin {
                src: cx.origin,
                line: number,
            };
            if m.payload.len() > spec.max_payload {
                bad(
                    &cx,
                    &m.topic,
                    format!(
                        "payload of {} bytes is over max_payload ({})",
                        m.payload.len(),
                        spec.max_payload
                    ),
                );
                continue;
            }
            values.clear();
            decoder.decode(&m.payload, &mut values, &mut |why| bad(&cx, &m.topic, why));
            // One message's lines (CSV, kv) share its topic fields.
            let fields = if wants_fields && !values.is_empty() {
                topic_fields(&spec, &m.topic)
            } else {
                Vec::new()
            };
            for v in values.drain(..) {
                let v = if wants_fields { with_fields(v, &fields) } else { v };
                batch.push(Item::new(v, at));
            }
        }
        cx.reap();
        if !batch.is_empty() && cx.tx.send(SourceMsg::Batch(cx.input, batch)).await.is_err() {
            break;
        }
        // The items are in the engine's queue: let the broker forget them.
        drop(messages);
    }
    let _ = cx.tx.send(SourceMsg::Eof(cx.input)).await;
}

fn bad(cx: &SourceCtx, topic: &str, why: String) {
    cx.counters.add(&format!("{}.malformed", cx.step_id), 1);
    cx.warnings.warn(
        &format!("flow {} input {}: malformed messages", cx.flow_id, cx.step_id),
        || {
            format!(
                "flow {} input {:?}: message on {topic}: {why}; message skipped",
                cx.flow_id, cx.step_id
            )
        },
    );
}

/// The fields a message's topic gives its items: the `{name}` levels of the
/// first filter it matches, and `topic_field`.
fn topic_fields(spec: &MqttSourceSpec, topic: &Arc<str>) -> Vec<(Arc<str>, Value)> {
    let mut fields = Vec::new();
    if let Some(f) = spec.filters.iter().find(|f| f.matches(topic)) {
        for (name, level) in f.fields(topic) {
            set_field(&mut fields, name, Value::str(level));
        }
    }
    if let Some(name) = &spec.topic_field {
        set_field(&mut fields, name.clone(), Value::Str(topic.clone()));
    }
    fields
}

/// Add topic fields to an item (they overwrite payload fields of the same
/// name); a payload that is not a dict becomes `{"value": payload}` first,
/// so every item of the source is a dict.
fn with_fields(v: Value, topic: &[(Arc<str>, Value)]) -> Value {
    let mut fields = match v {
        Value::Map(f) => f,
        other => vec![(Arc::from("value"), other)],
    };
    for (name, value) in topic {
        set_field(&mut fields, name.clone(), value.clone());
    }
    Value::Map(fields)
}

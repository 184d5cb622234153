//! The MQTT source: messages the broker connection routed to this input
//! step, decoded into items (`decode.rs`), with topic fields added, sent to
//! the engine in batches. A message is acknowledged to the broker (QoS 1)
//! once its items are in the engine's queue, never before; with
//! `ack="after-commit"` only once the checkpoint that includes its effects
//! is committed (`Held`).
//!
//! After-commit remembers the messages it committed until their
//! acknowledgement has surely reached the broker (`Seen`, saved with each
//! checkpoint). A message the broker sends again (DUP flag) that is one of
//! them, by packet id and a hash of topic and payload, was counted already:
//! it is acknowledged and skipped. That covers a crash or a dropped
//! connection between a commit and the broker's receipt of its acks.
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
    /// The `seen` row of the last checkpoint (after-commit).
    pub restored: Option<Vec<u8>>,
    /// After-commit: how long a message may wait for its checkpoint when the
    /// broker's window is not filling (the snapshot interval).
    pub hold_for: std::time::Duration,
}

pub(super) async fn read(input: MqttInput, cx: SourceCtx) {
    // A reloaded flow's inbox comes back from the old version's source as
    // that one ends (within moments of its engine stopping).
    let mut inbox = None;
    for _ in 0..100 {
        inbox = input.inbox.lock().unwrap_or_else(|p| p.into_inner()).take();
        if inbox.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
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
    let step: Arc<str> = Arc::from(cx.step_id.as_str());
    let seen = Arc::new(Mutex::new(Seen::restore(input.restored.as_deref(), &cx)));
    // Commit before the broker's in-flight window fills, or it stops sending.
    let threshold = (inbox.max_inflight as u64 * 3 / 4).max(1);
    let mut decoder = PayloadDecoder::reading(spec.format.clone(), cx.fields.clone());
    let wants_fields = spec.topic_field.is_some() || spec.filters.iter().any(|f| f.has_fields());
    let mut number = 0u64;
    let mut values = Vec::new();
    loop {
        // Messages an earlier version of the flow took but did not hand on.
        let mut messages = std::mem::take(&mut inbox.pending);
        if messages.is_empty() {
            let first = tokio::select! {
                m = inbox.rx.recv() => m,
                _ = cx.tx.closed() => None,
            };
            let Some(first) = first else { break };
            messages.push(first);
        }
        while messages.len() < MESSAGES_PER_BATCH {
            match inbox.rx.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        inbox.queued.fetch_sub(bytes, Ordering::Relaxed);
        let mut held: Option<Held> = None;
        if spec.after_commit {
            let mut h = Held {
                tokens: Vec::new(),
                entries: Vec::new(),
                due: std::time::Instant::now() + input.hold_for,
                seen: seen.clone(),
                step: step.clone(),
                stats: inbox.stats.clone(),
                threshold,
                released: false,
            };
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.prune(messages.iter().map(|m| m.generation).max().unwrap_or(0));
            let mut dups = 0u64;
            messages.retain_mut(|m| {
                let Some(token) = m.ack.take() else { return true };
                h.tokens.push(token);
                let key = (m.pkid, hash(&m.topic, &m.payload));
                if !m.dup {
                    // A first delivery with this packet id: the broker had
                    // our acknowledgement of any earlier message with it.
                    seen.map.retain(|(pkid, _), _| *pkid != m.pkid);
                } else if seen.map.contains_key(&key) {
                    // Counted before: acknowledged after the next commit
                    // (which follows the one that counted it), not again.
                    dups += 1;
                    return false;
                }
                seen.map.insert(key, SeenState::Held);
                h.entries.push((key, m.generation));
                true
            });
            if dups > 0 {
                cx.counters.add(&format!("{}.redelivered", cx.step_id), dups);
            }
            held = Some(h);
        }
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
        let mark = match held {
            Some(h) if !h.tokens.is_empty() => super::Mark::Mqtt(h),
            _ => super::Mark::None,
        };
        let nothing = batch.is_empty() && matches!(mark, super::Mark::None);
        if !nothing && cx.tx.send(SourceMsg::Batch(cx.input, batch, mark)).await.is_err() {
            // The flow stopped before it took them: a reloaded version
            // takes them from the inbox (on-receive: their acks are still
            // with them; after-commit: not acknowledged, the broker sends
            // them again).
            if !spec.after_commit {
                let bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
                inbox.queued.fetch_add(bytes, Ordering::Relaxed);
                inbox.pending = messages;
            }
            break;
        }
        // The items are in the engine's queue: let the broker forget them
        // (after-commit: the engine holds them until its checkpoint).
        drop(messages);
    }
    let _ = cx.tx.send(SourceMsg::Eof(cx.input)).await;
    // Hand the inbox back for a reloaded version of the flow (dropped with
    // the flow otherwise, which ends the broker's route to it).
    *input.inbox.lock().unwrap_or_else(|p| p.into_inner()) = Some(inbox);
}

/// A 64-bit FNV-1a hash of a message's topic and payload.
fn hash(topic: &str, payload: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in topic.as_bytes().iter().chain(&[0xff]).chain(payload) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// How long a committed message is remembered after its acknowledgement
/// went out on a connection that stayed up: by then the broker has it.
const ACKED_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
/// How long messages committed before a restart or reconnect are
/// remembered once the new connection delivers: the broker sends what it
/// holds again first thing.
const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(30);

enum SeenState {
    /// Taken; not yet in a checkpoint.
    Held,
    /// In a checkpoint being committed.
    Committing,
    /// Committed; acknowledged then on connection `gen`.
    Acked(std::time::Instant, u64),
    /// Committed before this process started.
    Restored,
}

/// Messages counted whose acknowledgement may not have reached the broker,
/// by (packet id, hash of topic and payload).
pub(crate) struct Seen {
    map: rustc_hash::FxHashMap<(u16, u64), SeenState>,
    /// The newest connection a message came on, and since when.
    generation: u64,
    since: std::time::Instant,
}

impl Seen {
    fn restore(row: Option<&[u8]>, cx: &SourceCtx) -> Seen {
        let mut seen = Seen {
            map: Default::default(),
            generation: 0,
            since: std::time::Instant::now(),
        };
        let Some(row) = row else { return seen };
        let decoded = (|| {
            let raw = crate::engine::snapshot::split(row)?;
            let mut d = raw.decoder(None)?;
            let n = d.n()?;
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                keys.push((d.u()? as u16, d.u()?));
            }
            d.done()?;
            Ok::<_, String>(keys)
        })();
        match decoded {
            Ok(keys) => {
                for k in keys {
                    seen.map.insert(k, SeenState::Restored);
                }
            }
            Err(why) => tracing::error!(
                "flow {} input {:?}: the saved list of committed messages cannot be read ({why}); messages the broker sends again may be counted twice",
                cx.flow_id,
                cx.step_id
            ),
        }
        seen
    }

    /// Forget what the broker surely has; `generation` is the newest
    /// connection messages came on.
    fn prune(&mut self, generation: u64) {
        let now = std::time::Instant::now();
        if generation > self.generation {
            self.generation = generation;
            self.since = now;
        }
        let (current, since) = (self.generation, self.since);
        let settled = current != 0 && now.saturating_duration_since(since) >= RECONNECT_GRACE;
        self.map.retain(|_, s| match s {
            SeenState::Held | SeenState::Committing => true,
            SeenState::Acked(at, g) if *g == current => now.saturating_duration_since(*at) < ACKED_GRACE,
            SeenState::Acked(..) | SeenState::Restored => !settled,
        });
    }

    /// What a checkpoint saves: the messages it commits and those
    /// committed before, not those taken since (a crash before their own
    /// checkpoint must let the broker's resend count them).
    pub(crate) fn encode(&self) -> crate::engine::snapshot::Enc {
        let mut e = crate::engine::snapshot::Enc::default();
        let keys: Vec<&(u16, u64)> = self
            .map
            .iter()
            .filter(|(_, s)| !matches!(s, SeenState::Held))
            .map(|(k, _)| k)
            .collect();
        e.u(keys.len() as u64);
        for (pkid, h) in keys {
            e.u(*pkid as u64);
            e.u(*h);
        }
        e
    }
}

/// Messages a batch came from, held until the checkpoint that includes
/// their effects is committed (`ack="after-commit"`).
pub(crate) struct Held {
    tokens: Vec<Arc<crate::mqtt::AckToken>>,
    /// The messages counted: (packet id, hash), connection.
    entries: Vec<((u16, u64), u64)>,
    /// When the checkpoint is due at the latest.
    due: std::time::Instant,
    seen: Arc<Mutex<Seen>>,
    step: Arc<str>,
    stats: Arc<crate::mqtt::BrokerStats>,
    /// Commit at once when the broker has this many messages unacknowledged.
    threshold: u64,
    /// Set by `release`: dropped without it (the engine stopped or
    /// panicked before the checkpoint), the messages stay unacknowledged.
    released: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        if !self.released {
            for t in &self.tokens {
                t.disarm();
            }
        }
    }
}

impl Held {
    /// When the checkpoint is due: at once when the broker's in-flight
    /// window is nearly full.
    pub(crate) fn due(&self, now: std::time::Instant) -> std::time::Instant {
        if self.stats.unacked.load(Ordering::Relaxed) >= self.threshold {
            now
        } else {
            self.due
        }
    }

    /// Acknowledge (commit succeeded) or leave to the broker (it did not).
    pub(crate) fn release(mut self, ok: bool) {
        self.released = ok;
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        for (key, generation) in &self.entries {
            if ok {
                seen.map.insert(*key, SeenState::Acked(now, *generation));
            } else {
                seen.map.remove(key);
            }
        }
        drop(seen);
        for t in &self.tokens {
            if ok {
                // Committed: acknowledged even while runnel stops.
                t.committed();
            } else {
                t.disarm();
            }
        }
    }

    /// Acknowledge once the checkpoint commits. Returns the source's step
    /// and list of committed messages, which the checkpoint saves (once per
    /// source, after every batch of it is marked).
    pub(crate) fn checkpoint(self, snap: &mut crate::engine::Snap) -> (Arc<str>, Arc<Mutex<Seen>>) {
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            for (key, _) in &self.entries {
                if let Some(s) = seen.map.get_mut(key) {
                    *s = SeenState::Committing;
                }
            }
        }
        let out = (self.step.clone(), self.seen.clone());
        snap.after.push(Box::new(move |ok| self.release(ok)));
        out
    }
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

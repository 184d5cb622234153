//! The outbox: messages a sink has handed over for upstream delivery,
//! per broker, in order. An entry is deleted only after the broker
//! acknowledged it (the forwarder asks for that), so a disconnect, a
//! restart or a `kill -9` loses nothing that was committed.
//!
//! Each broker's outbox is bounded by bytes. `drop-oldest` deletes the
//! oldest entries in the same commit that would go over the bound (counted
//! and logged); `block` makes the sink wait for room (backpressure to the
//! flow, then to its sources).

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};

use redb::{Database, ReadableDatabase, ReadableTable, Table};

use super::OUTBOX;

/// One message waiting for delivery.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Entry {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: u8,
    pub retain: bool,
}

const ENTRY_VERSION: u8 = 1;

impl Entry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let mut out = Vec::with_capacity(5 + topic.len() + self.payload.len());
        out.push(ENTRY_VERSION);
        out.push(self.qos);
        out.push(self.retain as u8);
        out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        out.extend_from_slice(topic);
        out.extend_from_slice(&self.payload);
        out
    }

    /// What the entry will be charged against `broker`'s bound.
    pub(crate) fn charge_in(&self, broker: &str) -> u64 {
        charge(5 + self.topic.len() + self.payload.len(), broker)
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Entry> {
        if b.len() < 5 || b[0] != ENTRY_VERSION {
            return None;
        }
        let n = u16::from_le_bytes([b[3], b[4]]) as usize;
        let topic = std::str::from_utf8(b.get(5..5 + n)?).ok()?.to_string();
        Some(Entry {
            topic,
            payload: b[5 + n..].to_vec(),
            qos: b[1],
            retain: b[2] != 0,
        })
    }
}

/// What the store charges an entry against its broker's bound: the
/// encoded bytes and the key.
fn charge(encoded_len: usize, broker: &str) -> u64 {
    (encoded_len + broker.len() + 8) as u64
}

/// What a broker's full outbox does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Full {
    DropOldest,
    Block,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct OutboxPolicy {
    pub max_bytes: u64,
    pub full: Full,
}

impl Default for OutboxPolicy {
    fn default() -> Self {
        OutboxPolicy {
            max_bytes: 64 << 20,
            full: Full::DropOldest,
        }
    }
}

/// Depth and size of one broker's outbox, as the status shows them.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Depth {
    pub entries: u64,
    pub bytes: u64,
    /// Entries deleted unsent by `drop-oldest` since the agent started.
    pub dropped: u64,
}

struct BoxState {
    next_seq: u64,
    depth: Depth,
    policy: OutboxPolicy,
    /// Woken after a commit that appended (the forwarder waits on it).
    appended: Arc<tokio::sync::Notify>,
}

/// Every broker's outbox state (the entries themselves live in redb).
pub(crate) struct Outboxes {
    state: Mutex<HashMap<String, BoxState>>,
    warnings: crate::metrics::Warnings,
    /// Signalled after each commit that freed room (blocked sinks wait).
    room: Condvar,
}

/// What one transaction changes, applied to `Outboxes` once it committed.
#[derive(Default)]
pub(crate) struct Changes {
    per_broker: HashMap<String, Change>,
}

#[derive(Default)]
struct Change {
    next_seq: Option<u64>,
    entries: i64,
    bytes: i64,
    dropped: u64,
    appended: bool,
    freed: bool,
}

impl Outboxes {
    pub(crate) fn load(db: &Database, policies: HashMap<String, OutboxPolicy>) -> Result<Outboxes, redb::Error> {
        let mut state: HashMap<String, BoxState> = HashMap::new();
        let txn = db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        for row in table.iter()? {
            let (k, v) = row?;
            let (broker, seq) = k.value();
            let s = state
                .entry(broker.to_string())
                .or_insert_with(|| BoxState::new(OutboxPolicy::default()));
            s.next_seq = s.next_seq.max(seq + 1);
            s.depth.entries += 1;
            s.depth.bytes += charge(v.value().len(), broker);
        }
        for (broker, policy) in policies {
            state.entry(broker).or_insert_with(|| BoxState::new(policy)).policy = policy;
        }
        Ok(Outboxes {
            state: Mutex::new(state),
            warnings: Default::default(),
            room: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BoxState>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn depth(&self, broker: &str) -> Depth {
        self.lock().get(broker).map(|s| s.depth).unwrap_or_default()
    }

    /// Brokers with entries or a policy, and their depth.
    pub(crate) fn depths(&self) -> Vec<(String, Depth)> {
        let mut v: Vec<_> = self.lock().iter().map(|(k, s)| (k.clone(), s.depth)).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The notification a broker's forwarder waits on for new entries.
    pub(crate) fn appended(&self, broker: &str) -> Arc<tokio::sync::Notify> {
        self.lock()
            .entry(broker.to_string())
            .or_insert_with(|| BoxState::new(OutboxPolicy::default()))
            .appended
            .clone()
    }

    /// For `block`: wait until `bytes` more fit in `broker`'s outbox (or it
    /// is empty: one batch larger than the bound still goes in alone), or
    /// until `give_up()` says to stop waiting. Returns whether it fits.
    pub(crate) fn wait_for_room(&self, broker: &str, bytes: u64, give_up: &dyn Fn() -> bool) -> bool {
        let mut state = self.lock();
        loop {
            let Some(s) = state.get(broker) else { return true };
            if s.policy.full != Full::Block || s.depth.entries == 0 || s.depth.bytes + bytes <= s.policy.max_bytes {
                return true;
            }
            if give_up() {
                return false;
            }
            state = self
                .room
                .wait_timeout(state, std::time::Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub(crate) fn append(
        &self,
        table: &mut Table<(&'static str, u64), &'static [u8]>,
        broker: &str,
        entries: Vec<Entry>,
        changes: &mut Changes,
    ) -> Result<(), redb::Error> {
        let (mut next, policy, depth) = {
            let mut state = self.lock();
            let s = state
                .entry(broker.to_string())
                .or_insert_with(|| BoxState::new(OutboxPolicy::default()));
            (s.next_seq, s.policy, s.depth)
        };
        let c = changes.per_broker.entry(broker.to_string()).or_default();
        if let Some(n) = c.next_seq {
            next = n;
        }
        for e in entries {
            let bytes = e.encode();
            table.insert((broker, next), bytes.as_slice())?;
            c.entries += 1;
            c.bytes += charge(bytes.len(), broker) as i64;
            next += 1;
        }
        c.next_seq = Some(next);
        c.appended = true;
        if policy.full == Full::DropOldest {
            let mut over = depth.bytes as i64 + c.bytes - policy.max_bytes as i64;
            let mut remaining = depth.entries as i64 + c.entries;
            if over > 0 {
                let mut victims = Vec::new();
                for row in table.range((broker, 0)..=(broker, u64::MAX))? {
                    if over <= 0 || remaining <= 1 {
                        break;
                    }
                    let (k, v) = row?;
                    let size = charge(v.value().len(), broker) as i64;
                    victims.push((k.value().1, size));
                    over -= size;
                    remaining -= 1;
                }
                for (seq, size) in victims {
                    table.remove((broker, seq))?;
                    c.entries -= 1;
                    c.bytes -= size;
                    c.dropped += 1;
                }
            }
        }
        Ok(())
    }

    pub(crate) fn delete(
        &self,
        table: &mut Table<(&'static str, u64), &'static [u8]>,
        broker: &str,
        seqs: &[u64],
        changes: &mut Changes,
    ) -> Result<(), redb::Error> {
        let c = changes.per_broker.entry(broker.to_string()).or_default();
        for seq in seqs {
            if let Some(v) = table.remove((broker, *seq))? {
                c.entries -= 1;
                c.bytes -= charge(v.value().len(), broker) as i64;
                c.freed = true;
            }
        }
        Ok(())
    }

    /// A transaction committed: make its changes visible.
    pub(crate) fn committed(&self, changes: Changes) {
        let mut freed = false;
        let mut state = self.lock();
        for (broker, c) in changes.per_broker {
            let s = state
                .entry(broker.clone())
                .or_insert_with(|| BoxState::new(OutboxPolicy::default()));
            if let Some(n) = c.next_seq {
                s.next_seq = n;
            }
            s.depth.entries = (s.depth.entries as i64 + c.entries).max(0) as u64;
            s.depth.bytes = (s.depth.bytes as i64 + c.bytes).max(0) as u64;
            s.depth.dropped += c.dropped;
            if c.dropped > 0 {
                let (bytes, max, total) = (s.depth.bytes, s.policy.max_bytes, s.depth.dropped);
                self.warnings.warn(&format!("outbox of broker {broker}: full"), || {
                    format!(
                        "outbox of broker {broker} is full ({bytes} bytes, max_outbox_bytes {max}): dropped the {} oldest undelivered entries ({total} dropped since start; set outbox_full = \"block\" to keep them)",
                        c.dropped
                    )
                });
            }
            if c.appended {
                s.appended.notify_one();
            }
            freed |= c.freed || c.dropped > 0;
        }
        drop(state);
        if freed {
            self.room.notify_all();
        }
    }
}

impl BoxState {
    fn new(policy: OutboxPolicy) -> BoxState {
        BoxState {
            next_seq: 1,
            depth: Depth::default(),
            policy,
            appended: Arc::new(tokio::sync::Notify::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let e = Entry {
            topic: "up/a/b".into(),
            payload: b"{\"x\": 1}".to_vec(),
            qos: 1,
            retain: true,
        };
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        assert_eq!(Entry::decode(&e.encode()[..4]), None);
        let mut bad = e.encode();
        bad[0] = 9;
        assert_eq!(Entry::decode(&bad), None);
    }
}

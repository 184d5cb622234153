//! `op.collect`: per-key lists of up to `max_size` values, emitted when
//! full, when `timeout` of system time passes without a new value for the
//! key (live only: replays are deterministic; Bytewax restarts the timeout
//! with every value too), or at end of input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Cx, Operator, Out};
use crate::value::{Item, Micros, Origin, Value};

pub(crate) struct CollectOp {
    pub step_id: String,
    pub timeout: Micros,
    pub max_size: usize,
    lists: HashMap<Arc<str>, (Instant, Vec<Value>)>,
}

impl CollectOp {
    pub(crate) fn new(step_id: String, timeout: Micros, max_size: usize) -> CollectOp {
        CollectOp {
            step_id,
            timeout,
            max_size,
            lists: HashMap::new(),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_micros(self.timeout.max(0) as u64)
    }
}

fn emit(key: Arc<str>, values: Vec<Value>) -> Item {
    Item::new(Value::keyed(key, Value::List(values)), Origin::default())
}

impl Operator for CollectOp {
    fn on_batch(&mut self, cx: &Cx, _port: usize, batch: Vec<Item>, out: &mut Out) {
        let now = Instant::now();
        for item in batch {
            match item.v.into_keyed() {
                Ok((k, v)) => {
                    let entry = self.lists.entry(k.clone()).or_insert_with(|| (now, Vec::new()));
                    entry.0 = now;
                    entry.1.push(v);
                    if entry.1.len() >= self.max_size {
                        let (_, values) = self.lists.remove(&k).expect("list");
                        out.ports[0].push(emit(k, values));
                    }
                }
                Err(v) => cx.skip(&self.step_id, "not_keyed", item.at, || super::stateless::not_keyed(&v)),
            }
        }
    }

    fn on_eof(&mut self, _cx: &Cx, out: &mut Out) {
        let mut keys: Vec<Arc<str>> = self.lists.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let (_, values) = self.lists.remove(&k).expect("list");
            out.ports[0].push(emit(k, values));
        }
    }

    fn on_tick(&mut self, cx: &Cx, now: Instant, out: &mut Out) {
        if !cx.live {
            return;
        }
        let timeout = self.timeout();
        let due: Vec<Arc<str>> = self
            .lists
            .iter()
            .filter(|(_, (t, _))| *t + timeout <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in due {
            let (_, values) = self.lists.remove(&k).expect("list");
            out.ports[0].push(emit(k, values));
        }
    }

    fn deadline(&self) -> Option<Instant> {
        // (Deadlines are only asked for in live mode.)
        let timeout = self.timeout();
        self.lists.values().map(|(t, _)| *t + timeout).min()
    }
}

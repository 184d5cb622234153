//! `op.collect`: per-key lists of up to `max_size` values, emitted when
//! full, when `timeout` of system time passes without a new value for the
//! key (live only: replays are deterministic; Bytewax restarts the timeout
//! with every value too), or at end of input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::snapshot::{self, Enc};
use super::{Cx, Operator, Out, Restored, Snap};
use crate::value::{Item, Micros, Origin, Value};

pub(crate) struct CollectOp {
    pub step_id: String,
    pub timeout: Micros,
    pub max_size: usize,
    lists: HashMap<Arc<str>, (Instant, Vec<Value>)>,
    /// Keys changed since the last checkpoint (only when state is kept).
    dirty: std::collections::HashSet<Arc<str>>,
}

impl CollectOp {
    pub(crate) fn new(step_id: String, timeout: Micros, max_size: usize) -> CollectOp {
        CollectOp {
            step_id,
            timeout,
            max_size,
            lists: HashMap::new(),
            dirty: Default::default(),
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
                    if cx.durable {
                        self.dirty.insert(k.clone());
                    }
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

    fn on_eof(&mut self, cx: &Cx, out: &mut Out) -> bool {
        let mut keys: Vec<Arc<str>> = self.lists.keys().cloned().collect();
        keys.sort();
        for k in keys {
            if cx.durable {
                self.dirty.insert(k.clone());
            }
            let (_, values) = self.lists.remove(&k).expect("list");
            out.ports[0].push(emit(k, values));
        }
        false
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
            self.dirty.insert(k.clone());
            let (_, values) = self.lists.remove(&k).expect("list");
            out.ports[0].push(emit(k, values));
        }
    }

    fn snapshot(&mut self, cx: &Cx, snap: &mut Snap) {
        let step: Arc<str> = Arc::from(self.step_id.as_str());
        let clock = cx.clock.get();
        for k in self.dirty.drain() {
            let row = format!("k:{k}");
            match self.lists.get(&k) {
                None => snap.delete(&step, row),
                Some((last, values)) => {
                    let mut e = Enc::default();
                    e.i(clock.at(*last));
                    e.u(values.len() as u64);
                    for v in values {
                        e.value(v);
                    }
                    snap.put(&step, row, e);
                }
            }
        }
    }

    fn restore(&mut self, cx: &Cx, rows: Vec<(String, Vec<u8>)>) -> Restored {
        let now = Instant::now();
        let clock = cx.clock.get();
        let mut done = Restored::default();
        let decode = |py: Option<pyo3::Python<'_>>, rows: Vec<(String, Vec<u8>)>| {
            snapshot::key_rows(rows, py, |d| {
                let last = d.i()?;
                let n = d.n()?;
                let values = (0..n).map(|_| d.value()).collect::<Result<Vec<_>, _>>()?;
                Ok((last, values))
            })
        };
        let needs_py = snapshot::any_objects(&rows);
        let decoded = if needs_py {
            match cx.python(&self.step_id, move |py| decode(Some(py), rows)) {
                Ok(d) => d,
                Err(e) => {
                    cx.state_error(&self.step_id, || format!("cannot restore the collected lists: {e}"));
                    return done;
                }
            }
        } else {
            decode(None, rows)
        };
        for (row, r) in decoded {
            match r {
                Ok((key, (last, values))) => {
                    done.keys += 1;
                    done.queued += values.len() as u64;
                    self.lists.insert(key, (clock.instant(last, now), values));
                }
                Err(why) => {
                    done.bad_rows += 1;
                    cx.state_error(&self.step_id, || {
                        format!("saved state row {row:?} cannot be read ({why}); that key starts empty")
                    });
                }
            }
        }
        done
    }

    fn deadline(&self) -> Option<Instant> {
        // (Deadlines are only asked for in live mode.)
        let timeout = self.timeout();
        self.lists.values().map(|(t, _)| *t + timeout).min()
    }
}

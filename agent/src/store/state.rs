//! Flow state in the store: each stateful step's rows (one per key, plus
//! step-level rows such as a source's position), keyed by flow id, step id
//! and row name, and each step's fingerprint (what the step was when its
//! rows were written). A flow writes its changed rows together with the
//! outbox entries they produced in one commit (the engine's checkpoint).
//!
//! Rows of a step whose fingerprint no longer matches (the flow file
//! changed the step's windower or logic) or that the flow no longer has are
//! moved to the `state_aside` table, never read again by runnel, and
//! replaced there the next time the same step is set aside.

use std::collections::BTreeMap;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

/// `(flow, step, row)` → encoded row.
const STATE: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("state");
/// `(flow, step)` → fingerprint.
const STEPS: TableDefinition<(&str, &str), &str> = TableDefinition::new("state_steps");
/// Rows set aside: `(flow, step, row)` → encoded row.
const ASIDE: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("state_aside");

/// Rows of one step to put (`Some`) or delete (`None`), by row name.
pub(crate) type Rows = Vec<(String, Option<Vec<u8>>)>;

/// A change to a flow's state.
pub(crate) enum StateOp {
    /// Put (`Some`) or delete (`None`) rows of one step.
    Rows { flow: Arc<str>, step: Arc<str>, rows: Rows },
    /// Record what the step is now.
    Fingerprint { flow: Arc<str>, step: Arc<str>, fp: String },
    /// Move the step's rows to `state_aside` and forget its fingerprint.
    SetAside { flow: Arc<str>, step: Arc<str> },
}

pub(super) fn create_tables(txn: &WriteTransaction) -> Result<(), redb::TableError> {
    txn.open_table(STATE)?;
    txn.open_table(STEPS)?;
    txn.open_table(ASIDE)?;
    Ok(())
}

pub(super) struct Tables<'t> {
    state: redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
    steps: redb::Table<'t, (&'static str, &'static str), &'static str>,
    aside: redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
}

impl<'t> Tables<'t> {
    pub(super) fn open(txn: &'t WriteTransaction) -> Result<Tables<'t>, redb::TableError> {
        Ok(Tables {
            state: txn.open_table(STATE)?,
            steps: txn.open_table(STEPS)?,
            aside: txn.open_table(ASIDE)?,
        })
    }

    pub(super) fn apply(&mut self, op: StateOp) -> Result<(), redb::Error> {
        match op {
            StateOp::Rows { flow, step, rows } => {
                for (row, value) in rows {
                    match value {
                        Some(v) => {
                            self.state.insert((&*flow, &*step, row.as_str()), v.as_slice())?;
                        }
                        None => {
                            self.state.remove((&*flow, &*step, row.as_str()))?;
                        }
                    }
                }
            }
            StateOp::Fingerprint { flow, step, fp } => {
                self.steps.insert((&*flow, &*step), fp.as_str())?;
            }
            StateOp::SetAside { flow, step } => {
                let old: Vec<String> = self
                    .aside
                    .range(step_range(&flow, &step))?
                    .map(|r| r.map(|(k, _)| k.value().2.to_string()))
                    .collect::<Result<_, _>>()?;
                for row in old {
                    self.aside.remove((&*flow, &*step, row.as_str()))?;
                }
                let rows: Vec<(String, Vec<u8>)> = self
                    .state
                    .range(step_range(&flow, &step))?
                    .map(|r| r.map(|(k, v)| (k.value().2.to_string(), v.value().to_vec())))
                    .collect::<Result<_, _>>()?;
                for (row, v) in rows {
                    self.state.remove((&*flow, &*step, row.as_str()))?;
                    self.aside.insert((&*flow, &*step, row.as_str()), v.as_slice())?;
                }
                self.steps.remove((&*flow, &*step))?;
            }
        }
        Ok(())
    }
}

/// Every row of one step (row names are any text; "\u{10FFFF}" sorts last).
fn step_range<'a>(flow: &'a str, step: &'a str) -> std::ops::RangeInclusive<(&'a str, &'a str, &'a str)> {
    (flow, step, "")..=(flow, step, "\u{10FFFF}\u{10FFFF}")
}

/// What the store holds of one step.
#[derive(Default)]
pub(crate) struct StepState {
    pub fingerprint: Option<String>,
    pub rows: Vec<(String, Vec<u8>)>,
}

/// Every step of `flow` that has rows or a fingerprint.
pub(super) fn load(db: &Database, flow: &str) -> Result<BTreeMap<String, StepState>, redb::Error> {
    let txn = db.begin_read()?;
    let mut out: BTreeMap<String, StepState> = BTreeMap::new();
    let steps = txn.open_table(STEPS)?;
    for r in steps.range((flow, "")..=(flow, "\u{10FFFF}\u{10FFFF}"))? {
        let (k, v) = r?;
        out.entry(k.value().1.to_string()).or_default().fingerprint = Some(v.value().to_string());
    }
    let state = txn.open_table(STATE)?;
    for r in state.range((flow, "", "")..=(flow, "\u{10FFFF}\u{10FFFF}", ""))? {
        let (k, v) = r?;
        let (_, step, row) = k.value();
        out.entry(step.to_string())
            .or_default()
            .rows
            .push((row.to_string(), v.value().to_vec()));
    }
    Ok(out)
}

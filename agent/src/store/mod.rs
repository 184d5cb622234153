//! The agent's one redb file (`state_dir/runnel.redb`) and its one writer.
//!
//! Every change goes through the writer thread: callers hand it a list of
//! operations and (if they need durability) wait for the reply. The writer
//! takes everything queued, applies it in one transaction and commits
//! once (group commit: an fsync costs milliseconds on an SD card, so many
//! small writes must share one). Tenants: the MQTT outbox and the flows'
//! snapshots (`state.rs`); an operation is one enum arm, so a snapshot and
//! the outbox entries it produced share a transaction.
//!
//! Readers (the forwarders) open read transactions of their own; redb
//! lets them run while the writer commits.

pub(crate) mod outbox;
pub(crate) mod state;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use anyhow::Context;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

pub(crate) use outbox::{Entry, OutboxPolicy};

/// `(broker, outbox seq)` → encoded entry.
pub(crate) const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
/// Per-sink message counters (`flow/step` → last seq).
const SINK_SEQ: TableDefinition<&str, u64> = TableDefinition::new("sink_seq");
/// Schema version and other small facts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Bumped when the layout of a table changes. Version 1 (outbox only) is
/// read and upgraded in place: version 2 only adds the state tables.
const SCHEMA_VERSION: u64 = 2;

/// One change to the store.
pub(crate) enum Op {
    /// Append to `broker`'s outbox and record the sink's last seq.
    Append {
        broker: Arc<str>,
        sink: Arc<str>,
        last_seq: u64,
        entries: Vec<Entry>,
    },
    /// The broker acknowledged these entries.
    Delete { broker: Arc<str>, seqs: Vec<u64> },
    /// A flow's snapshot rows, its step fingerprints, steps set aside.
    State(state::StateOp),
}

/// Told the outcome of the commit its request went into.
pub(crate) type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

struct Request {
    ops: Vec<Op>,
    done: Option<Done>,
    /// Make this commit durable even if it only deletes.
    durable: bool,
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub(crate) struct Store {
    db: Arc<Database>,
    tx: mpsc::Sender<Request>,
    outboxes: Arc<outbox::Outboxes>,
    /// Set when a commit failed on I/O: redb refuses every later write, so
    /// the agent exits and systemd restarts it on a reopened file.
    failed: Arc<Mutex<Option<String>>>,
    path: PathBuf,
}

/// redb's page cache; the outbox is read once, front to back, so a small
/// cache is enough and saves RAM on a Pi.
const CACHE_BYTES: usize = 2 << 20;

impl Store {
    /// Open (or create) `dir/runnel.redb` and start the writer. A file that
    /// cannot be read as a store is moved aside (`runnel.redb.damaged-<time>`)
    /// with a loud error, and a fresh one is started: crash-looping on a
    /// damaged SD card helps nobody.
    pub(crate) fn open(dir: &Path, policies: HashMap<String, OutboxPolicy>) -> anyhow::Result<Store> {
        let path = dir.join("runnel.redb");
        let db = match open_db(&path) {
            Ok(db) => db,
            Err(OpenError::InUse) => anyhow::bail!(
                "{} is in use by another runnel process; stop it first (systemctl stop runnel)",
                path.display()
            ),
            Err(OpenError::Damaged(why)) => {
                let aside = PathBuf::from(format!(
                    "{}.damaged-{}",
                    path.display(),
                    chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
                ));
                tracing::error!(
                    "state file {} cannot be read ({why}); moved it to {} and starting with an empty store (undelivered outbox entries in it are not sent)",
                    path.display(),
                    aside.display()
                );
                std::fs::rename(&path, &aside)
                    .with_context(|| format!("cannot move the damaged state file {} aside", path.display()))?;
                match open_db(&path) {
                    Ok(db) => db,
                    Err(OpenError::InUse) => anyhow::bail!("{} is in use by another runnel process", path.display()),
                    Err(OpenError::Damaged(why)) => anyhow::bail!("cannot create {}: {why}", path.display()),
                }
            }
        };
        let db = Arc::new(db);
        let outboxes = Arc::new(outbox::Outboxes::load(&db, policies).context("cannot read the outbox")?);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let writer_boxes = outboxes.clone();
        let failed = Arc::new(Mutex::new(None));
        let writer_failed = failed.clone();
        std::thread::Builder::new()
            .name("runnel-store".into())
            .spawn(move || writer(writer_db, writer_boxes, rx, writer_failed))
            .context("cannot start the store writer thread")?;
        Ok(Store {
            db,
            tx,
            outboxes,
            failed,
            path,
        })
    }

    /// Apply `ops` in the next commit and wait until it is on disk.
    pub(crate) fn commit(&self, ops: Vec<Op>) -> Result<(), String> {
        self.submit_tracked(ops)
            .recv()
            .unwrap_or_else(|_| Err("the store writer has stopped".into()))
    }

    /// Apply `ops` in the next commit; the answer comes on the receiver
    /// (for callers that keep a bounded number of commits in flight).
    pub(crate) fn submit_tracked(&self, ops: Vec<Op>) -> mpsc::Receiver<Result<(), String>> {
        let (done, wait) = mpsc::channel();
        self.submit_then(
            ops,
            Box::new(move |r| {
                let _ = done.send(r);
            }),
        );
        wait
    }

    /// Apply `ops` in the next durable commit, then call `done` with the
    /// outcome (on the writer thread: keep it short).
    pub(crate) fn submit_then(&self, ops: Vec<Op>, done: Done) {
        if let Err(mpsc::SendError(req)) = self.tx.send(Request {
            ops,
            done: Some(done),
            durable: true,
        }) {
            if let Some(done) = req.done {
                done(Err("the store writer has stopped".into()));
            }
        }
    }

    /// Apply `ops` in the next commit without waiting (a failed commit is
    /// logged by the writer, and stops the agent).
    pub(crate) fn submit(&self, ops: Vec<Op>) {
        let _ = self.tx.send(Request {
            ops,
            done: None,
            durable: false,
        });
    }

    /// Make everything committed so far durable (at shutdown: the deletes
    /// of acknowledged entries are committed without an fsync).
    pub(crate) fn flush(&self) {
        let _ = self.commit(Vec::new());
    }

    /// Mark the store as failed (the agent exits and systemd restarts it).
    pub(crate) fn fail(&self, why: String) {
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
    }

    /// Why the state file can no longer be written, if it cannot.
    pub(crate) fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn outboxes(&self) -> &Arc<outbox::Outboxes> {
        &self.outboxes
    }

    /// The last seq a sink wrote (0 if none).
    pub(crate) fn sink_seq(&self, sink: &str) -> u64 {
        let read = || -> Result<u64, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = match txn.open_table(SINK_SEQ) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(e) => return Err(e.into()),
            };
            Ok(table.get(sink)?.map(|g| g.value()).unwrap_or(0))
        };
        read().unwrap_or_else(|e| {
            tracing::error!("cannot read the seq of sink {sink} from the state file: {e}; starting at 0");
            0
        })
    }

    /// What the store holds of `flow`'s steps (rows and fingerprints).
    pub(crate) fn flow_state(
        &self,
        flow: &str,
    ) -> Result<std::collections::BTreeMap<String, state::StepState>, String> {
        state::load(&self.db, flow).map_err(|e| e.to_string())
    }

    /// Up to `n` outbox entries of `broker` from seq `from` on, in order.
    pub(crate) fn outbox_from(&self, broker: &str, from: u64, n: usize) -> Vec<(u64, Entry)> {
        let read = || -> Result<Vec<(u64, Entry)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = match txn.open_table(OUTBOX) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            };
            let mut out = Vec::new();
            for row in table.range((broker, from)..=(broker, u64::MAX))?.take(n) {
                let (k, v) = row?;
                let seq = k.value().1;
                match Entry::decode(v.value()) {
                    Some(e) => out.push((seq, e)),
                    None => tracing::error!("outbox entry {broker}/{seq} is damaged; skipping it"),
                }
            }
            Ok(out)
        };
        read().unwrap_or_else(|e| {
            tracing::error!("cannot read the outbox of {broker}: {e}");
            Vec::new()
        })
    }
}

enum OpenError {
    InUse,
    Damaged(String),
}

fn open_db(path: &Path) -> Result<Database, OpenError> {
    let db = Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => OpenError::InUse,
            other => OpenError::Damaged(other.to_string()),
        })?;
    // A file of a newer or unknown layout is not ours to guess at.
    let check = || -> Result<(), String> {
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            let version = meta
                .get("schema_version")
                .map_err(|e| e.to_string())?
                .map(|g| g.value());
            match version {
                None => {
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| e.to_string())?;
                }
                Some(SCHEMA_VERSION) => {}
                Some(1) => {
                    tracing::info!(
                        "state file {}: upgrading schema version 1 to {SCHEMA_VERSION}",
                        path.display()
                    );
                    meta.insert("schema_version", SCHEMA_VERSION)
                        .map_err(|e| e.to_string())?;
                }
                Some(v) => return Err(format!("schema version {v}, this runnel reads {SCHEMA_VERSION}")),
            }
            txn.open_table(OUTBOX).map_err(|e| e.to_string())?;
            txn.open_table(SINK_SEQ).map_err(|e| e.to_string())?;
            state::create_tables(&txn).map_err(|e| e.to_string())?;
        }
        txn.commit().map_err(|e| e.to_string())
    };
    check().map_err(OpenError::Damaged)?;
    Ok(db)
}

/// The queue is unbounded: callers of `commit` wait for their own, MQTT
/// sinks keep at most a few commits in flight, and the forwarders' deletes
/// follow acknowledgements, which follow commits.
fn writer(
    db: Arc<Database>,
    boxes: Arc<outbox::Outboxes>,
    rx: mpsc::Receiver<Request>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let warnings = crate::metrics::Warnings::default();
    // Since when commits without an fsync wait for a durable one.
    let mut lazy_since: Option<std::time::Instant> = None;
    loop {
        let first = if let Some(since) = lazy_since {
            match rx.recv_timeout(LAZY_FOR.saturating_sub(since.elapsed())) {
                Ok(r) => r,
                Err(mpsc::RecvTimeoutError::Timeout) => Request {
                    ops: Vec::new(),
                    done: None,
                    durable: true,
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match rx.recv() {
                Ok(r) => r,
                Err(_) => break,
            }
        };
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        // Deletes alone wait for an fsync at most LAZY_FOR, however busy.
        let overdue = lazy_since.is_some_and(|t| t.elapsed() >= LAZY_FOR);
        let durable = overdue
            || batch
                .iter()
                .any(|r| r.durable || r.ops.iter().any(|op| !matches!(op, Op::Delete { .. })));
        let result = apply(&db, &boxes, &mut batch, durable);
        if durable && result.is_ok() {
            lazy_since = None;
        } else if lazy_since.is_none() {
            lazy_since = Some(std::time::Instant::now());
        }
        if let Err(e) = &result {
            warnings.warn("state file: commit failed", || format!("state file commit failed: {e}"));
            // redb refuses every write after a failed commit until the file
            // is opened again: the agent exits and systemd restarts it.
            *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
        }
        for req in batch {
            if let Some(done) = req.done {
                done(result.clone());
            }
        }
    }
}

/// How long commits without an fsync may wait before an empty durable one.
const LAZY_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// Apply a batch in one transaction. Deleting acknowledged entries need not
/// reach the disk at once (`durable` false): lost in a crash, they are only
/// sent again (same id and seq); the next durable commit (within `LAZY_FOR`,
/// or at shutdown) persists them. That saves an fsync per acknowledgement.
fn apply(db: &Database, boxes: &outbox::Outboxes, batch: &mut [Request], durable: bool) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    if !durable {
        txn.set_durability(redb::Durability::None).map_err(|e| e.to_string())?;
    }
    let mut changes = outbox::Changes::default();
    {
        let mut table = txn.open_table(OUTBOX).map_err(|e| e.to_string())?;
        let mut seqs = txn.open_table(SINK_SEQ).map_err(|e| e.to_string())?;
        let mut tables = state::Tables::open(&txn).map_err(|e| e.to_string())?;
        for req in batch.iter_mut() {
            for op in std::mem::take(&mut req.ops) {
                match op {
                    Op::Append {
                        broker,
                        sink,
                        last_seq,
                        entries,
                    } => {
                        seqs.insert(&*sink, last_seq).map_err(|e| e.to_string())?;
                        boxes
                            .append(&mut table, &broker, entries, &mut changes)
                            .map_err(|e| e.to_string())?;
                    }
                    Op::Delete { broker, seqs } => {
                        boxes
                            .delete(&mut table, &broker, &seqs, &mut changes)
                            .map_err(|e| e.to_string())?;
                    }
                    Op::State(op) => tables.apply(op).map_err(|e| e.to_string())?,
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())?;
    boxes.committed(changes);
    Ok(())
}

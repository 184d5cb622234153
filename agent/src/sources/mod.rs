//! Sources: where items come from. Each kind of source is a config the
//! planner built from the flow file and a task that decodes records into
//! items and sends them in batches to the flow's engine. Adding a source
//! adds a file here and a match arm in `start`; the engine does not change.

mod file;
mod mqtt;
mod serial;

pub(crate) use mqtt::{Held as MqttHeld, MqttInput, Seen as MqttSeen};

use std::path::PathBuf;

use tokio::sync::mpsc;

use crate::flow::{Decode, SourceSpec};
use crate::metrics::{Counters, Warnings};
use crate::value::Item;

/// How many items a source puts in one batch at most.
pub(crate) const BATCH: usize = 1024;

/// What sources tell the engine.
pub(crate) enum SourceMsg {
    /// Items for input `usize`, and where the source will be once the
    /// engine has taken them (what a checkpoint records).
    Batch(usize, Vec<Item>, Mark),
    /// The source of input `usize` has ended.
    Eof(usize),
}

/// A source's position after a batch.
pub(crate) enum Mark {
    None,
    /// A file: the byte offset and line number after the batch's last record.
    File(FilePos),
    /// MQTT with `ack="after-commit"`: the batch's messages, acknowledged
    /// once the checkpoint that includes them is committed.
    Mqtt(mqtt::Held),
}

/// Where a file source resumes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FilePos {
    pub offset: u64,
    pub line: u64,
}

impl FilePos {
    pub(crate) fn encode(&self) -> crate::engine::snapshot::Enc {
        let mut e = crate::engine::snapshot::Enc::default();
        e.u(self.offset);
        e.u(self.line);
        e
    }
    pub(crate) fn decode(row: &[u8]) -> Result<FilePos, String> {
        let raw = crate::engine::snapshot::split(row)?;
        let mut d = raw.decoder(None)?;
        let pos = FilePos {
            offset: d.u()?,
            line: d.u()?,
        };
        d.done()?;
        Ok(pos)
    }
}

/// Everything a running source needs.
pub(crate) struct SourceCtx {
    /// Index of the input step this source feeds.
    pub input: usize,
    pub step_id: String,
    pub flow_id: String,
    /// Origin index for items (names live in the engine's origin table).
    pub origin: u32,
    pub tx: mpsc::Sender<SourceMsg>,
    pub counters: Counters,
    pub warnings: Warnings,
    /// Items the engine is done with, handed back to be freed here: memory
    /// freed on the thread that allocated it avoids glibc's cross-thread
    /// arena locking (measured: most of a replay's kernel time).
    pub returns: std::sync::mpsc::Receiver<Vec<Item>>,
    /// The only fields of an item the flow reads, when it reads only some
    /// by name (`engine::read_fields`): the decoder builds just those.
    pub fields: Option<std::sync::Arc<[std::sync::Arc<str>]>>,
}

impl SourceCtx {
    /// Free what the engine handed back.
    pub(crate) fn reap(&self) {
        while let Ok(husks) = self.returns.try_recv() {
            drop(husks);
        }
    }
}

/// A source as the engine will run it: the spec, possibly overridden by
/// `runnel replay --input`.
#[derive(Clone)]
pub(crate) enum SourceConfig {
    File {
        path: PathBuf,
        decode: Decode,
        /// Resume here (a checkpoint's position) instead of the start.
        start: Option<FilePos>,
    },
    Mqtt(MqttInput),
    Serial(crate::flow::SerialSourceSpec),
    /// A source that cannot run here (an MQTT input outside `runnel run`):
    /// it reads nothing and says why.
    Unavailable(String),
}

impl SourceConfig {
    pub(crate) fn from_spec(spec: &SourceSpec) -> SourceConfig {
        match spec {
            SourceSpec::File { path, decode } => SourceConfig::File {
                path: path.clone(),
                decode: *decode,
                start: None,
            },
            SourceSpec::Mqtt(m) => SourceConfig::Unavailable(format!(
                "an MQTT source (broker {}) needs the agent (runnel run)",
                m.broker
            )),
            SourceSpec::Serial(p) => SourceConfig::Serial(p.clone()),
        }
    }

    /// The name items' origins show in log lines ("<name> line N").
    pub(crate) fn origin_name(&self) -> String {
        match self {
            SourceConfig::File { path, .. } => path.display().to_string(),
            SourceConfig::Mqtt(m) => format!("mqtt broker {} message", m.spec.broker),
            SourceConfig::Serial(p) => format!("serial {} frame", p.port.display()),
            SourceConfig::Unavailable(_) => "nothing".into(),
        }
    }

    /// Start reading; the source sends `Eof` when done (also after errors).
    pub(crate) fn start(self, cx: SourceCtx, rt: &tokio::runtime::Handle) {
        match self {
            SourceConfig::File { path, decode, start } => {
                rt.spawn_blocking(move || file::read(path, decode, start, cx));
            }
            SourceConfig::Mqtt(m) => {
                rt.spawn(mqtt::read(m, cx));
            }
            SourceConfig::Serial(p) => {
                rt.spawn(serial::read(p, cx));
            }
            SourceConfig::Unavailable(why) => {
                cx.counters.add(&format!("{}.source_errors", cx.step_id), 1);
                tracing::error!("flow {} input {:?}: {why}; this input is empty", cx.flow_id, cx.step_id);
                rt.spawn(async move {
                    let _ = cx.tx.send(SourceMsg::Eof(cx.input)).await;
                });
            }
        }
    }
}

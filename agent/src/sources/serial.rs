//! The serial source: a UART or USB-serial device read with tokio-serial,
//! cut into frames (lines or COBS, `decode.rs`), each frame decoded into
//! items and sent to the engine after every read.
//!
//! The port is opened exclusively (TIOCEXCL and an exclusive flock: a later
//! opener is refused; one that opened it before runnel is not seen). When it
//! goes away (end of file, an I/O error, the path gone or naming another
//! device) the source drops the partial frame at the cut (counted), closes
//! the port and opens the same path again, backing off up to
//! `MAX_BACKOFF`, until it is back. The log says "waiting for PATH" once per
//! absence (and again only if the reason changes, say from "does not exist"
//! to "busy") and "reading PATH again" once bytes come or the port has
//! stayed open for `STEADY`. Frames already read were handed to the engine
//! and are never lost; the flow's windows go on closing meanwhile (the
//! engine's timers do not depend on its sources).
//!
//! A frame that does not decode, is over `max_frame` or is not valid COBS is
//! counted (`<step>.malformed`), logged (rate-limited) and skipped. The first
//! frame after opening the port may be the tail of one the device was in
//! the middle of sending: if it does not decode it is counted as a partial
//! frame (`<step>.partial_frames`), not as malformed.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio_serial::{DataBits, FlowControl, Parity, SerialPortBuilderExt, SerialStream, StopBits};

use super::{Mark, SourceCtx, SourceMsg};
use crate::decode::{Format, Framer, Framing, PayloadDecoder};
use crate::flow::SerialSourceSpec;
use crate::value::{set_field, Item, Origin, Value};

/// The first wait before opening an absent port again, and the longest.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// While no bytes arrive, how often the path is checked to still name the
/// open device (a symlink re-created to point elsewhere).
const CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long a port must stay open (without bytes) to count as back.
const STEADY: Duration = Duration::from_secs(2);

pub(super) async fn read(spec: SerialSourceSpec, cx: SourceCtx) {
    let mut src = Serial::new(spec, cx);
    let mut backoff = MIN_BACKOFF;
    loop {
        match open(&src.spec) {
            Err(why) => {
                src.absent(why);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = src.cx.tx.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Ok((port, device)) => {
                let cut = src.read_port(port, device).await;
                let Some((why, back)) = cut else { return };
                src.drop_partial();
                if back {
                    backoff = MIN_BACKOFF;
                    src.cx.counters.add(&format!("{}.disconnects", src.cx.step_id), 1);
                    let text = format!(
                        "flow {} input {:?}: {} went away ({why}); waiting for {} to come back",
                        src.cx.flow_id, src.cx.step_id, src.shown, src.shown
                    );
                    src.notices.say(false, text);
                    src.away = Some(Away::new(true));
                } else {
                    // Opened and lost again before it counted as back (a
                    // device node that lingers after a hangup, a flapping
                    // cable): still away; retried with growing waits, and
                    // said if it is a new reason.
                    src.absent(format!("it opened, then {why}"));
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = src.cx.tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Open the port with the spec's settings; also returns the device number
/// the path named then.
fn open(spec: &SerialSourceSpec) -> Result<(SerialStream, u64), String> {
    let path = spec.port.to_string_lossy();
    let meta = std::fs::metadata(&spec.port).map_err(|e| describe(&spec.port, &e))?;
    if !meta.file_type().is_char_device() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "a regular file or a pipe"
        };
        return Err(format!("{} is not a serial device (it is {what})", spec.port.display()));
    }
    let device = meta.rdev();
    let builder = tokio_serial::new(path, spec.baud)
        .data_bits(match spec.data_bits {
            5 => DataBits::Five,
            6 => DataBits::Six,
            7 => DataBits::Seven,
            _ => DataBits::Eight,
        })
        .parity(match spec.parity {
            'O' => Parity::Odd,
            'E' => Parity::Even,
            _ => Parity::None,
        })
        .stop_bits(if spec.stop_bits == 2 {
            StopBits::Two
        } else {
            StopBits::One
        })
        .flow_control(match spec.flow_control.as_str() {
            "software" => FlowControl::Software,
            "hardware" => FlowControl::Hardware,
            _ => FlowControl::None,
        });
    let port = builder.open_native_async().map_err(|e| {
        let shown = spec.port.display();
        match e.kind {
            tokio_serial::ErrorKind::Io(kind) => describe(&spec.port, &std::io::Error::new(kind, e.description)),
            // EBUSY from TIOCEXCL, or another program's lock.
            tokio_serial::ErrorKind::NoDevice => busy(&spec.port),
            _ if e.description.contains("typewriter") => format!("{shown} is not a serial device"),
            _ => format!("{shown}: {}", e.description),
        }
    })?;
    Ok((port, device))
}

fn busy(path: &Path) -> String {
    let shown = path.display();
    format!("{shown} is busy: another program has it open (`fuser -v {shown}` names it)")
}

/// An open error as a person at the device would want it said.
fn describe(path: &Path, e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    let shown = path.display();
    match e.kind() {
        K::NotFound => format!("{shown} does not exist (unplugged?)"),
        K::PermissionDenied => format!(
            "permission denied on {shown} (the service user needs to be in the device's group, usually dialout)"
        ),
        K::ResourceBusy | K::WouldBlock => busy(path),
        _ => format!("{shown}: {e}"),
    }
}

/// The state of one serial input across openings of its port.
struct Serial {
    spec: SerialSourceSpec,
    cx: SourceCtx,
    shown: String,
    frames: Framer,
    /// The decoder; `None` while a CSV header line is awaited.
    decoder: Option<PayloadDecoder>,
    /// A CSV source without `columns`: the header read first, kept across
    /// openings of the port.
    header: Option<Vec<Arc<str>>>,
    /// A line that looks like a header, taken once the next line has as
    /// many cells: (its cells, frame number, whether it came first after an
    /// opening).
    candidate: Option<(Vec<Arc<str>>, u64, bool)>,
    /// Frames read since the source started (items' origin "line").
    number: u64,
    values: Vec<Value>,
    batch: Vec<Item>,
    /// Since when, and why, the port is away (`None`: it is being read).
    away: Option<Away>,
    /// Whether the port has been read before (the next reading is "again").
    read_before: bool,
    notices: Notices,
    started: Instant,
}

struct Away {
    since: Instant,
    /// Why the last open failed (`None`: none has failed yet).
    reason: Option<String>,
    /// The absence was logged.
    said: bool,
    /// Counted in `<step>.port_absent` (once per absence).
    counted: bool,
}

impl Away {
    fn new(said: bool) -> Away {
        Away {
            since: Instant::now(),
            reason: None,
            said,
            counted: false,
        }
    }
}

/// Why a port was let go, and whether it had counted as back; `None`: the
/// flow is stopping.
type Cut = Option<(String, bool)>;

impl Serial {
    fn new(spec: SerialSourceSpec, cx: SourceCtx) -> Serial {
        Serial {
            shown: spec.port.display().to_string(),
            frames: Framer::new(spec.framing, spec.max_frame),
            decoder: None,
            header: None,
            candidate: None,
            number: 0,
            values: Vec::new(),
            batch: Vec::with_capacity(64),
            away: Some(Away::new(false)),
            read_before: false,
            notices: Notices::default(),
            started: Instant::now(),
            spec,
            cx,
        }
    }

    fn settings(&self) -> String {
        let s = &self.spec;
        format!(
            "{} baud {}{}{}, flow control {}, {} framing, decode {}",
            s.baud,
            s.data_bits,
            s.parity,
            s.stop_bits,
            s.flow_control,
            s.framing.name(),
            s.format.name()
        )
    }

    /// The port could not be opened: said once per absence, and again when
    /// the reason changes.
    fn absent(&mut self, why: String) {
        // Just started, and busy: most likely the previous version of this
        // flow (a reload) closing the port this moment. Not news yet.
        if self.started.elapsed() < STEADY && why.contains("is busy") {
            return;
        }
        let away = self.away.get_or_insert_with(|| Away::new(false));
        if !away.counted {
            away.counted = true;
            self.cx.counters.add(&format!("{}.port_absent", self.cx.step_id), 1);
        }
        self.notices.tick();
        let say = match &away.reason {
            _ if !away.said => true,
            // Gone after a cut (already said): the first reason is news only
            // if it changes later.
            None => false,
            Some(r) => *r != why,
        };
        if say {
            let text = format!(
                "flow {} input {:?}: waiting for {}: {why}; trying again until it is there",
                self.cx.flow_id, self.cx.step_id, self.shown
            );
            self.notices.say(false, text);
        }
        away.said = true;
        away.reason = Some(why);
    }

    /// The port is open and works: say so (once per absence).
    fn back(&mut self) {
        let Some(away) = self.away.take() else { return };
        if self.read_before {
            let text = format!(
                "flow {} input {:?}: reading {} again (it was away {:.1} s)",
                self.cx.flow_id,
                self.cx.step_id,
                self.shown,
                away.since.elapsed().as_secs_f64()
            );
            self.notices.say(true, text);
        } else {
            tracing::info!(
                "flow {} input {:?}: reading {} ({})",
                self.cx.flow_id,
                self.cx.step_id,
                self.shown,
                self.settings()
            );
        }
        self.read_before = true;
    }

    /// A line-framed CSV source without `columns` takes its header from the
    /// first line it reads.
    fn header_first(&self) -> bool {
        self.spec.framing == Framing::Lines && matches!(self.spec.format, Format::Csv { columns: None })
    }

    /// Read until the port goes away or the flow stops.
    async fn read_port(&mut self, mut port: SerialStream, device: u64) -> Cut {
        let opened = Instant::now();
        if !self.read_before {
            self.back();
        }
        if self.decoder.is_none() && !self.header_first() {
            self.decoder = Some(PayloadDecoder::reading(
                self.spec.format.clone(),
                self.cx.fields.clone(),
            ));
        }
        let mut first = true;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::select! {
                r = port.read(&mut buf) => match r {
                    Ok(0) => return Some(("end of file".into(), self.away.is_none())),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Some((format!("read error: {e}"), self.away.is_none())),
                },
                _ = self.cx.tx.closed() => return None,
                _ = tokio::time::sleep(CHECK_EVERY) => {
                    if opened.elapsed() >= STEADY {
                        self.back();
                    }
                    self.notices.tick();
                    match std::fs::metadata(&self.spec.port) {
                        Ok(m) if m.rdev() == device => continue,
                        Ok(_) => return Some(("the path now names another device".into(), self.away.is_none())),
                        Err(_) => return Some(("the path is gone".into(), self.away.is_none())),
                    }
                }
            };
            self.back();
            self.notices.tick();
            let received = Value::DateTime(chrono::Utc::now().timestamp_micros());
            let mut frames = std::mem::replace(&mut self.frames, Framer::new(Framing::Lines, 0));
            frames.push(&buf[..n], &mut |frame| {
                self.frame(frame, first, &received);
                first = false;
            });
            self.frames = frames;
            if !self.batch.is_empty() {
                self.cx.reap();
                let full = std::mem::replace(&mut self.batch, Vec::with_capacity(64));
                if self
                    .cx
                    .tx
                    .send(SourceMsg::Batch(self.cx.input, full, Mark::None))
                    .await
                    .is_err()
                {
                    return None;
                }
            }
        }
    }

    /// A frame cut off when the port closed is dropped and counted.
    fn drop_partial(&mut self) {
        let n = self.frames.cut();
        if n > 0 {
            self.count_and_warn("partial_frames", "partial frames", || {
                format!(": the frame being read when the port closed ({n} bytes so far) was dropped")
            });
        }
    }

    /// Count `counter` of this input, and log (rate-limited per `kind`)
    /// the flow, input and port followed by `what`.
    fn count_and_warn(&self, counter: &str, kind: &str, what: impl FnOnce() -> String) {
        let cx = &self.cx;
        cx.counters.add(&format!("{}.{counter}", cx.step_id), 1);
        cx.warnings
            .warn(&format!("flow {} input {}: {kind}", cx.flow_id, cx.step_id), || {
                format!("flow {} input {:?}: {}{}", cx.flow_id, cx.step_id, self.shown, what())
            });
    }

    /// One frame (or why the framer dropped it): decoded into the batch.
    fn frame(&mut self, frame: crate::decode::Frame<'_>, first: bool, received: &Value) {
        self.number += 1;
        let number = self.number;
        let payload = match frame {
            Ok(p) => p,
            Err(why) => return self.bad(number, why, first),
        };
        if self.header_first() && !self.csv_line(payload, number, first) {
            return;
        }
        let mut reasons = Vec::new();
        let decoder = self.decoder.as_mut().expect("checked");
        decoder.decode(payload, &mut self.values, &mut |why| reasons.push(why));
        for why in reasons {
            self.bad(number, why, first);
        }
        let at = Origin {
            src: self.cx.origin,
            line: number,
        };
        for v in self.values.drain(..) {
            let v = match &self.spec.timestamp_field {
                Some(name) => {
                    let mut fields = match v {
                        Value::Map(f) => f,
                        other => vec![(Arc::from("value"), other)],
                    };
                    set_field(&mut fields, name.clone(), received.clone());
                    Value::Map(fields)
                }
                None => v,
            };
            self.batch.push(Item::new(v, at));
        }
    }

    /// A line of a CSV source without `columns`. The header comes first:
    /// a line of two or more cells, none of them a number, taken once the
    /// next line has as many cells (the first line read may be the cut tail
    /// of a row, or a boot message). It is kept for as long as the flow
    /// runs; the device printing it again (after a reset) is passed over
    /// and counted (`<step>.repeated_headers`). Returns whether `line` is a
    /// row to decode.
    fn csv_line(&mut self, line: &[u8], number: u64, first: bool) -> bool {
        let cells = match crate::decode::csv_header(line) {
            Ok(c) => c,
            Err(why) => {
                self.bad(number, why, first);
                return false;
            }
        };
        if self.header.as_ref() == Some(&cells) {
            self.cx
                .counters
                .add(&format!("{}.repeated_headers", self.cx.step_id), 1);
            return false;
        }
        if self.header.is_some() {
            return true;
        }
        if let Some((columns, at, was_first)) = self.candidate.take() {
            if cells.len() == columns.len() {
                tracing::info!(
                    "flow {} input {:?}: {}: CSV columns from line {at}: {}",
                    self.cx.flow_id,
                    self.cx.step_id,
                    self.shown,
                    columns.iter().map(|c| &**c).collect::<Vec<_>>().join(", ")
                );
                self.decoder = Some(PayloadDecoder::new(Format::Csv {
                    columns: Some(columns.clone()),
                }));
                self.header = Some(columns);
                return true;
            }
            self.bad(
                at,
                format!(
                    "taken for the CSV header, but the next line has {} cells, not {}",
                    cells.len(),
                    columns.len()
                ),
                was_first,
            );
        }
        let numbers = cells
            .iter()
            .any(|c| matches!(crate::decode::cell(c), Value::Int(_) | Value::Float(_)));
        if cells.len() >= 2 && !numbers {
            self.candidate = Some((cells, number, first));
        } else {
            self.bad(
                number,
                "a row before any CSV header line (a header has two or more cells and no numbers; give columns=[...] if the device never sends one)".into(),
                first,
            );
        }
        false
    }

    fn bad(&self, number: u64, why: String, first: bool) {
        if first {
            self.count_and_warn("partial_frames", "partial frames", || {
                format!(" frame {number}, the first since the port opened: {why}; taken for the tail of a frame the device was sending, skipped")
            });
        } else {
            self.count_and_warn("malformed", "malformed frames", || {
                format!(" frame {number}: {why}; frame skipped")
            });
        }
    }
}

/// The coming and going of a port, logged up to `NOTICES` times a minute;
/// a device that flaps all night does not fill the SD card. What was held
/// back is summed up once the minute is over, with where the port is now.
#[derive(Default)]
struct Notices {
    since: Option<Instant>,
    said: u32,
    held_back: u64,
    /// The last notice held back (logged with the summary).
    last: Option<String>,
}

const NOTICES: u32 = 10;

impl Notices {
    /// `good`: the port is back (logged at info).
    fn say(&mut self, good: bool, text: String) {
        self.tick();
        let now = Instant::now();
        if self.since.is_none() {
            self.since = Some(now);
        }
        if self.said < NOTICES {
            self.said += 1;
            if good {
                tracing::info!("{text}");
            } else {
                tracing::warn!("{text}");
            }
        } else {
            self.held_back += 1;
            self.last = Some(text);
        }
    }

    /// Start a new minute when the last one is over, summing it up.
    fn tick(&mut self) {
        let Some(since) = self.since else { return };
        if since.elapsed() < Duration::from_secs(60) {
            return;
        }
        if self.held_back > 0 {
            tracing::warn!(
                "{} more comings and goings of the port were not logged in the last minute; the last: {}",
                self.held_back,
                self.last.take().unwrap_or_default()
            );
        }
        *self = Notices::default();
    }
}

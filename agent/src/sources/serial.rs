//! The serial source: a UART or USB-serial device read with tokio-serial,
//! cut into frames (lines or COBS, `decode.rs`), each frame decoded into
//! items and sent to the engine after every read.
//!
//! The port is opened exclusively (TIOCEXCL and a lock). When it goes away
//! (end of file, an I/O error, the path gone or naming another device) the
//! source drops the partial frame at the cut (counted), closes the port and
//! opens the same path again, backing off up to `MAX_BACKOFF`, until it is
//! back. The log says "waiting for PATH" once per absence and "reading PATH
//! again" when it returns. Frames already read were handed to the engine
//! and are never lost; the flow's windows go on closing meanwhile (the
//! engine's timers do not depend on its sources).
//!
//! A frame that does not decode, is over `max_frame` or is not valid COBS is
//! counted (`<step>.malformed`), logged (rate-limited) and skipped. The first
//! frame after opening the port may be the tail of one the device was in
//! the middle of sending: if it does not decode it is counted as a partial
//! frame (`<step>.partial_frames`), not as malformed.

use std::os::unix::fs::MetadataExt;
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

pub(super) async fn read(spec: SerialSourceSpec, cx: SourceCtx) {
    let mut src = Serial::new(spec, cx);
    let mut away: Option<Instant> = None;
    let mut opened_before = false;
    let mut backoff = MIN_BACKOFF;
    let mut notices = Notices::default();
    loop {
        match open(&src.spec) {
            Err(why) => {
                if away.is_none() {
                    notices.say(false, || {
                        format!(
                            "flow {} input {:?}: waiting for {}: {why}; trying again until it is there",
                            src.cx.flow_id, src.cx.step_id, src.shown
                        )
                    });
                    src.cx.counters.add(&format!("{}.port_absent", src.cx.step_id), 1);
                    away = Some(Instant::now());
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = src.cx.tx.closed() => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Ok((port, device)) => {
                match away.take() {
                    Some(since) if opened_before => notices.say(true, || {
                        format!(
                            "flow {} input {:?}: reading {} again (it was away {:.1} s)",
                            src.cx.flow_id,
                            src.cx.step_id,
                            src.shown,
                            since.elapsed().as_secs_f64()
                        )
                    }),
                    _ => tracing::info!(
                        "flow {} input {:?}: reading {} ({})",
                        src.cx.flow_id,
                        src.cx.step_id,
                        src.shown,
                        src.settings()
                    ),
                }
                opened_before = true;
                let opened = Instant::now();
                let frames_before = src.number;
                let why = src.read_port(port, device).await;
                drop_partial(&mut src);
                let Some(why) = why else { return };
                // A port that opens and fails at once (a flapping cable, a
                // device in reset) is retried with growing waits too.
                if src.number > frames_before || opened.elapsed() >= STEADY {
                    backoff = MIN_BACKOFF;
                } else {
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = src.cx.tx.closed() => return,
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                src.cx.counters.add(&format!("{}.disconnects", src.cx.step_id), 1);
                notices.say(false, || {
                    format!(
                        "flow {} input {:?}: {} went away ({why}); waiting for {} to come back",
                        src.cx.flow_id, src.cx.step_id, src.shown, src.shown
                    )
                });
                away = Some(Instant::now());
            }
        }
    }
}

/// How long a port must stay open to count as back for good.
const STEADY: Duration = Duration::from_secs(2);

/// The coming and going of a port, logged up to `NOTICES` times a
/// minute; a device that flaps all night does not fill the SD card.
#[derive(Default)]
struct Notices {
    since: Option<Instant>,
    said: u32,
    held_back: u64,
}

const NOTICES: u32 = 10;

impl Notices {
    /// `good`: the port is back (logged at info).
    fn say(&mut self, good: bool, text: impl FnOnce() -> String) {
        let now = Instant::now();
        if self
            .since
            .is_none_or(|s| now.duration_since(s) >= Duration::from_secs(60))
        {
            if self.held_back > 0 {
                tracing::warn!(
                    "{} more comings and goings of the port were not logged in the last minute",
                    self.held_back
                );
            }
            *self = Notices {
                since: Some(now),
                said: 0,
                held_back: 0,
            };
        }
        if self.said < NOTICES {
            self.said += 1;
            if good {
                tracing::info!("{}", text());
            } else {
                tracing::warn!("{}", text());
            }
        } else {
            self.held_back += 1;
        }
    }
}

/// A frame cut off when the port closed is dropped and counted.
fn drop_partial(src: &mut Serial) {
    let n = src.frames.cut();
    if n > 0 {
        let cx = &src.cx;
        cx.counters.add(&format!("{}.partial_frames", cx.step_id), 1);
        cx.warnings.warn(
            &format!("flow {} input {}: partial frames", cx.flow_id, cx.step_id),
            || {
                format!(
                    "flow {} input {:?}: {}: the frame being read when the port closed ({n} bytes so far) was dropped",
                    cx.flow_id, cx.step_id, src.shown
                )
            },
        );
    }
}

/// Open the port with the spec's settings; also returns the device number
/// the path named then.
fn open(spec: &SerialSourceSpec) -> Result<(SerialStream, u64), String> {
    let path = spec.port.to_string_lossy();
    let device = std::fs::metadata(&spec.port)
        .map_err(|e| describe(&spec.port, &e))?
        .rdev();
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
    /// Frames read since the source started (items' origin "line").
    number: u64,
    values: Vec<Value>,
    batch: Vec<Item>,
    step: Arc<str>,
}

/// Why a port was let go: `Some(reason)` it went away, `None` the flow is
/// stopping.
type Cut = Option<String>;

impl Serial {
    fn new(spec: SerialSourceSpec, cx: SourceCtx) -> Serial {
        Serial {
            shown: spec.port.display().to_string(),
            frames: Framer::new(spec.framing, spec.max_frame),
            decoder: None,
            number: 0,
            values: Vec::new(),
            batch: Vec::with_capacity(64),
            step: Arc::from(cx.step_id.as_str()),
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

    /// A line-framed CSV source without `columns` takes its header from the
    /// first line after each opening (boards that reset when the port opens
    /// print it again).
    fn header_first(&self) -> bool {
        self.spec.framing == Framing::Lines && matches!(self.spec.format, Format::Csv { columns: None })
    }

    /// Read until the port goes away or the flow stops.
    async fn read_port(&mut self, mut port: SerialStream, device: u64) -> Cut {
        self.decoder = (!self.header_first()).then(|| PayloadDecoder::new(self.spec.format.clone()));
        let mut first = true;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::select! {
                r = port.read(&mut buf) => match r {
                    Ok(0) => return Some("end of file".into()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Some(format!("read error: {e}")),
                },
                _ = self.cx.tx.closed() => return None,
                _ = tokio::time::sleep(CHECK_EVERY) => {
                    match std::fs::metadata(&self.spec.port) {
                        Ok(m) if m.rdev() == device => continue,
                        Ok(_) => return Some("the path now names another device".into()),
                        Err(_) => return Some("the path is gone".into()),
                    }
                }
            };
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

    /// One frame (or why the framer dropped it): decoded into the batch.
    fn frame(&mut self, frame: crate::decode::Frame<'_>, first: bool, received: &Value) {
        self.number += 1;
        let number = self.number;
        let payload = match frame {
            Ok(p) => p,
            Err(why) => return self.bad(number, why, first),
        };
        let Some(decoder) = self.decoder.as_mut() else {
            match crate::decode::csv_header(payload) {
                Ok(columns) => {
                    self.decoder = Some(PayloadDecoder::new(Format::Csv { columns: Some(columns) }));
                }
                Err(why) => self.bad(number, why, first),
            }
            return;
        };
        let mut reasons = Vec::new();
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

    fn bad(&self, number: u64, why: String, first: bool) {
        let cx = &self.cx;
        if first {
            cx.counters.add(&format!("{}.partial_frames", self.step), 1);
            cx.warnings.warn(
                &format!("flow {} input {}: partial frames", cx.flow_id, cx.step_id),
                || {
                    format!(
                        "flow {} input {:?}: {} frame {number}, the first since the port opened: {why}; taken for the tail of a frame the device was sending, skipped",
                        cx.flow_id, cx.step_id, self.shown
                    )
                },
            );
            return;
        }
        cx.counters.add(&format!("{}.malformed", self.step), 1);
        cx.warnings.warn(
            &format!("flow {} input {}: malformed frames", cx.flow_id, cx.step_id),
            || {
                format!(
                    "flow {} input {:?}: {} frame {number}: {why}; frame skipped",
                    cx.flow_id, cx.step_id, self.shown
                )
            },
        );
    }
}

//! The file source: JSON lines or CSV, read once from start to end (or
//! from a checkpoint's position: every batch tells the engine the byte
//! offset and line number after it).
//!
//! A line that is not UTF-8, not JSON, or a CSV row with the wrong number
//! of cells is counted, logged with file and line (rate-limited) and
//! skipped; reading goes on.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use super::{FilePos, Mark, SourceCtx, SourceMsg, BATCH};
use crate::decode::row;
use crate::flow::Decode;
use crate::json::Decoder;
use crate::value::{Item, Origin};

pub(super) fn read(path: PathBuf, decode: Decode, start: Option<FilePos>, cx: SourceCtx) {
    let shown = path.display().to_string();
    match File::open(&path) {
        Ok(mut f) => {
            let meta = f.metadata().ok();
            let len = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            // A named pipe has no position to resume at: what was in it is gone.
            let regular = meta.as_ref().is_some_and(|m| m.is_file());
            let start = match start {
                _ if !regular => FilePos::default(),
                Some(p) if p.offset > len => {
                    tracing::warn!(
                        "flow {} input {:?}: {shown} is shorter ({len} bytes) than where the last checkpoint left it ({} bytes); was it replaced? reading it from the start",
                        cx.flow_id,
                        cx.step_id,
                        p.offset
                    );
                    FilePos::default()
                }
                Some(p) => p,
                None => FilePos::default(),
            };
            if start.offset > 0 {
                tracing::info!(
                    "flow {} input {:?}: resuming {shown} after line {} (byte {})",
                    cx.flow_id,
                    cx.step_id,
                    start.line,
                    start.offset
                );
            }
            match decode {
                Decode::JsonLines => {
                    if let Err(e) = seek(&mut f, start) {
                        tracing::error!(
                            "flow {} input {:?}: cannot seek in {shown}: {e}",
                            cx.flow_id,
                            cx.step_id
                        );
                    } else {
                        let input = Input::new(f, regular, &cx);
                        read_jsonl(BufReader::with_capacity(256 * 1024, input), &shown, start, &cx);
                    }
                }
                Decode::Csv => read_csv(f, regular, &shown, start, &cx),
            }
        }
        Err(e) => {
            cx.counters.add(&format!("{}.source_errors", cx.step_id), 1);
            tracing::error!(
                "flow {} input {:?}: cannot open {shown}: {e}; this input is empty",
                cx.flow_id,
                cx.step_id
            );
        }
    }
    let _ = cx.tx.blocking_send(SourceMsg::Eof(cx.input));
}

/// What a file source reads. A named pipe is read only once `poll` says it
/// has bytes, checking meanwhile that the flow still runs: a flow stopped
/// for a reload must not leave a reader blocked in `read` that would take
/// (and lose) what is written for the new version.
struct Input {
    f: File,
    fifo: bool,
    tx: tokio::sync::mpsc::Sender<SourceMsg>,
}

impl Input {
    fn new(f: File, regular: bool, cx: &SourceCtx) -> Input {
        Input {
            f,
            fifo: !regular,
            tx: cx.tx.clone(),
        }
    }
}

impl std::io::Read for Input {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        if !self.fifo {
            return self.f.read(buf);
        }
        loop {
            let mut fds = libc::pollfd {
                fd: self.f.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for a descriptor this struct owns.
            let n = unsafe { libc::poll(&mut fds, 1, 200) };
            // Stopped meanwhile: the bytes are for the next version.
            if self.tx.is_closed() {
                return Ok(0);
            }
            if n > 0 {
                break;
            }
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error());
            }
        }
        self.f.read(buf)
    }
}

/// Go to `start` (a named pipe cannot seek, and never resumes).
fn seek(f: &mut File, start: FilePos) -> std::io::Result<()> {
    if f.metadata().is_ok_and(|m| m.is_file()) {
        f.seek(SeekFrom::Start(start.offset))?;
    }
    Ok(())
}

fn bad(cx: &SourceCtx, file: &str, line: u64, why: String) {
    cx.counters.add(&format!("{}.malformed", cx.step_id), 1);
    cx.warnings.warn(
        &format!("flow {} input {}: malformed records", cx.flow_id, cx.step_id),
        || {
            format!(
                "flow {} input {:?}: {file} line {line}: {why}; record skipped",
                cx.flow_id, cx.step_id
            )
        },
    );
}

/// At the end of the input: the last batch, or with none, the position
/// alone (so that skipped lines at the end are not read and counted again
/// after a restart).
fn send_last(cx: &SourceCtx, batch: &mut Vec<Item>, pos: FilePos) {
    if batch.is_empty() {
        let _ = cx
            .tx
            .blocking_send(SourceMsg::Batch(cx.input, Vec::new(), Mark::File(pos)));
    } else {
        send(cx, batch, pos);
    }
}

fn send(cx: &SourceCtx, batch: &mut Vec<Item>, pos: FilePos) -> bool {
    if batch.is_empty() {
        return true;
    }
    cx.reap();
    let full = std::mem::replace(batch, Vec::with_capacity(BATCH));
    cx.tx
        .blocking_send(SourceMsg::Batch(cx.input, full, Mark::File(pos)))
        .is_ok()
}

fn read_jsonl(mut reader: BufReader<Input>, file: &str, start: FilePos, cx: &SourceCtx) {
    let mut decoder = Decoder::reading(cx.fields.clone());
    let mut buf = Vec::with_capacity(4096);
    let mut batch = Vec::with_capacity(BATCH);
    let mut line = start.line;
    let mut offset = start.offset;
    loop {
        let pos = FilePos { offset, line };
        // About to wait for more bytes (a FIFO or a growing file): hand over
        // what has been read, so live readings are not held back.
        if !batch.is_empty() && memchr::memchr(b'\n', reader.buffer()).is_none() && !send(cx, &mut batch, pos) {
            return;
        }
        buf.clear();
        let too_long = match read_record(&mut reader, &mut buf, &mut offset) {
            Ok(None) => break,
            Ok(Some(too_long)) => too_long,
            Err(e) => {
                cx.counters.add(&format!("{}.source_errors", cx.step_id), 1);
                tracing::error!(
                    "flow {} input {:?}: reading {file} failed after line {line}: {e}",
                    cx.flow_id,
                    cx.step_id
                );
                break;
            }
        };
        line += 1;
        if too_long {
            bad(cx, file, line, format!("longer than {} bytes", MAX_RECORD));
            continue;
        }
        let text = buf.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match decoder.decode(text) {
            Ok(v) => batch.push(Item::new(v, Origin { src: cx.origin, line })),
            Err(e) => match std::str::from_utf8(text) {
                Err(u) => bad(cx, file, line, format!("not UTF-8 ({u})")),
                Ok(_) => bad(cx, file, line, format!("not JSON ({e})")),
            },
        }
        if batch.len() >= BATCH && !send(cx, &mut batch, FilePos { offset, line }) {
            return;
        }
    }
    send_last(cx, &mut batch, FilePos { offset, line });
}

/// The longest record a source accepts; longer ones are skipped (a stuck
/// serial line or a corrupt file must not exhaust a small device's memory).
pub(crate) const MAX_RECORD: usize = 1 << 20;

/// Read one line into `buf` (without keeping more than `MAX_RECORD` bytes).
/// `None` at end of input; `Some(true)` if the line was too long (its bytes
/// are consumed and dropped).
fn read_record(reader: &mut BufReader<Input>, buf: &mut Vec<u8>, offset: &mut u64) -> std::io::Result<Option<bool>> {
    // Room for the record and its line ending ("\r\n").
    const KEEP: usize = MAX_RECORD + 2;
    let mut too_long = false;
    let mut read_any = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            break;
        }
        read_any = true;
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let n = chunk.len();
        if !too_long {
            if buf.len() + n > KEEP {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        reader.consume(n);
        *offset += n as u64;
        if done {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    // The limit is on the record, not its line ending.
    let content = buf.strip_suffix(b"\n").unwrap_or(buf);
    let content = content.strip_suffix(b"\r").unwrap_or(content);
    Ok(Some(too_long || content.len() > MAX_RECORD))
}

/// Reads for the CSV parser, handing over the rows parsed so far whenever
/// the next read may have to wait (a FIFO, a growing file).
struct HandOver<'a> {
    inner: BufReader<Input>,
    cx: &'a SourceCtx,
    pending: std::rc::Rc<std::cell::RefCell<Vec<Item>>>,
    closed: std::rc::Rc<std::cell::Cell<bool>>,
    /// Where the records handled so far end.
    pos: std::rc::Rc<std::cell::Cell<FilePos>>,
}

impl std::io::Read for HandOver<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.inner.buffer().is_empty() {
            let mut pending = self.pending.borrow_mut();
            if !pending.is_empty() && !send(self.cx, &mut pending, self.pos.get()) {
                self.closed.set(true);
                return Ok(0);
            }
        }
        self.inner.read(out)
    }
}

/// The header of a CSV file: its first record.
fn csv_header(f: &File) -> Option<Vec<Arc<str>>> {
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(BufReader::new(f));
    let mut record = csv::ByteRecord::new();
    match rdr.read_byte_record(&mut record) {
        Ok(true) => {
            let cells: Result<Vec<&str>, _> = record.iter().map(std::str::from_utf8).collect();
            cells.ok().map(|c| c.iter().map(|c| Arc::from(c.trim())).collect())
        }
        _ => None,
    }
}

fn read_csv(mut f: File, regular: bool, file: &str, start: FilePos, cx: &SourceCtx) {
    // Resuming: the header comes from the file's start, the rows from the
    // checkpoint's position on.
    let mut header: Option<Vec<Arc<str>>> = None;
    if start.offset > 0 {
        header = csv_header(&f);
        if header.is_none() {
            tracing::error!(
                "flow {} input {:?}: cannot read the header of {file} again; reading it from the start",
                cx.flow_id,
                cx.step_id
            );
        }
    }
    let start = if header.is_some() { start } else { FilePos::default() };
    if let Err(e) = seek(&mut f, start) {
        tracing::error!("flow {} input {:?}: cannot seek in {file}: {e}", cx.flow_id, cx.step_id);
        return;
    }
    let pending = std::rc::Rc::new(std::cell::RefCell::new(Vec::with_capacity(BATCH)));
    let closed = std::rc::Rc::new(std::cell::Cell::new(false));
    let pos = std::rc::Rc::new(std::cell::Cell::new(start));
    let hand_over = HandOver {
        inner: BufReader::with_capacity(256 * 1024, Input::new(f, regular, cx)),
        cx,
        pending: pending.clone(),
        closed: closed.clone(),
        pos: pos.clone(),
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(hand_over);
    let mut record = csv::ByteRecord::new();
    // The csv reader counts from where it began; lines are 1-based.
    let at = |p: &csv::Position| FilePos {
        offset: start.offset + p.byte(),
        line: start.line + p.line() - 1,
    };
    loop {
        let line = at(rdr.position()).line + 1;
        let result = rdr.read_byte_record(&mut record);
        pos.set(at(rdr.position()));
        match result {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                bad(cx, file, line, format!("not CSV ({e})"));
                continue;
            }
        }
        let line = record.position().map(|p| at(p).line + 1).unwrap_or(line);
        let cells: Result<Vec<&str>, _> = record.iter().map(std::str::from_utf8).collect();
        let Ok(cells) = cells else {
            bad(cx, file, line, "not UTF-8".into());
            continue;
        };
        let Some(names) = &header else {
            header = Some(cells.iter().map(|c| Arc::from(c.trim())).collect());
            continue;
        };
        if cells.len() != names.len() {
            bad(
                cx,
                file,
                line,
                format!("{} cells, but the header has {}", cells.len(), names.len()),
            );
            continue;
        }
        let mut batch = pending.borrow_mut();
        batch.push(Item::new(
            row(names, &cells, cx.fields.as_deref()),
            Origin { src: cx.origin, line },
        ));
        if closed.get() || (batch.len() >= BATCH && !send(cx, &mut batch, pos.get())) {
            return;
        }
    }
    send_last(cx, &mut pending.borrow_mut(), pos.get());
}

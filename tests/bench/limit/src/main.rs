//! Benchmark contender "limit" (see tests/bench/bench.py): the job written
//! by hand in Rust, as the practical limit for any engine on the same file.
//!
//! Read lines, `serde_json` each into a struct that borrows the sensor id,
//! keep a hash map of (sum, count) per sensor and 10 s window, and write
//! every window's mean at the end. No watermarks and no late data: every
//! reading counts (bench.py checks it against all readings), and nothing
//! is emitted before the end of input.
//!
//! Usage: bench-limit DATA.jsonl OUT.jsonl [s|iso]
//! ("iso": the "ts" field is ISO 8601 text with an offset, else epoch seconds).
//! Each output line is `[sensor, [window_id, mean]]`.

use std::borrow::Cow;
use std::io::{BufRead, BufReader, BufWriter, Write};

use rustc_hash::FxHashMap;
use serde::Deserialize;

const WINDOW_S: f64 = 10.0;
const ALIGN_TO: f64 = 1_704_067_200.0; // 2024-01-01T00:00:00Z
const ALIGN_TO_MS: i64 = 1_704_067_200_000;

/// A reading whose "ts" is epoch seconds.
#[derive(Deserialize)]
struct Reading<'a> {
    #[serde(borrow)]
    sensor: Cow<'a, str>,
    ts: f64,
    temp: f64,
}

/// A reading whose "ts" is ISO 8601 text.
#[derive(Deserialize)]
struct IsoReading<'a> {
    #[serde(borrow)]
    sensor: Cow<'a, str>,
    #[serde(borrow)]
    ts: Cow<'a, str>,
    temp: f64,
}

/// (sensor, window id, temp) of one line.
fn parse(line: &[u8], iso: bool) -> Option<(Cow<'_, str>, i64, f64)> {
    if iso {
        let r: IsoReading<'_> = serde_json::from_slice(line).ok()?;
        let ms = chrono::DateTime::parse_from_rfc3339(&r.ts).ok()?.timestamp_millis();
        Some((r.sensor, (ms - ALIGN_TO_MS).div_euclid(10_000), r.temp))
    } else {
        let r: Reading<'_> = serde_json::from_slice(line).ok()?;
        Some((r.sensor, ((r.ts - ALIGN_TO) / WINDOW_S).floor() as i64, r.temp))
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: bench-limit DATA.jsonl OUT.jsonl [s|iso]");
        std::process::exit(2);
    }
    let iso = args.get(3).is_some_and(|a| a == "iso");
    let mut input = BufReader::with_capacity(1 << 16, std::fs::File::open(&args[1])?);
    let mut sums: FxHashMap<String, FxHashMap<i64, (f64, u64)>> = FxHashMap::default();
    let (mut line, mut bad) = (Vec::new(), 0u64);
    while input.read_until(b'\n', &mut line)? > 0 {
        match parse(&line, iso) {
            Some((sensor, wid, temp)) => {
                let windows = match sums.get_mut(&*sensor) {
                    Some(w) => w,
                    None => sums.entry(sensor.into_owned()).or_default(),
                };
                let acc = windows.entry(wid).or_insert((0.0, 0));
                acc.0 += temp;
                acc.1 += 1;
            }
            None => bad += 1,
        }
        line.clear();
    }
    let mut out = BufWriter::with_capacity(1 << 16, std::fs::File::create(&args[2])?);
    for (sensor, windows) in &sums {
        let key = serde_json::to_string(sensor)?;
        for (wid, (sum, count)) in windows {
            writeln!(out, "[{key}, [{wid}, {}]]", sum / *count as f64)?;
        }
    }
    out.flush()?;
    if bad > 0 {
        eprintln!("bench-limit: {bad} lines skipped");
    }
    Ok(())
}

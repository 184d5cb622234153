//! Running under systemd: the notify protocol (through the `sd-notify`
//! crate) and the journal.
//!
//! - `READY=1` once the flows are loaded and every broker had its first
//!   connection attempt.
//! - `STATUS=` one line of health, sent when it changes.
//! - `WATCHDOG=1` from the agent's main loop, only while it is healthy: every
//!   flow's engine made progress recently, the Python thread is not stuck in
//!   code it cannot interrupt, and the state file can be written. A wedged
//!   engine stops the pings, and systemd restarts the service.
//! - `STOPPING=1` when a stop begins.
//!
//! Without `NOTIFY_SOCKET` (not under systemd, or `Type=simple`) every call
//! does nothing.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub(crate) struct Notifier {
    enabled: bool,
    /// The watchdog's period, if systemd asked for one (`WatchdogSec=`).
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    status: String,
}

impl Notifier {
    pub(crate) fn from_env() -> Notifier {
        let enabled = std::env::var_os("NOTIFY_SOCKET").is_some_and(|s| !s.is_empty());
        let watchdog = if enabled { sd_notify::watchdog_enabled() } else { None };
        Notifier {
            enabled,
            watchdog,
            last_ping: None,
            status: String::new(),
        }
    }

    pub(crate) fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if self.enabled {
            if let Err(e) = sd_notify::notify(states) {
                tracing::debug!("sd_notify: {e}");
            }
        }
    }

    pub(crate) fn ready(&mut self, status: &str) {
        self.status = status.to_string();
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `STATUS=` when `line` differs from the last one.
    pub(crate) fn status(&mut self, line: &str) {
        if line != self.status {
            self.status = line.to_string();
            self.send(&[NotifyState::Status(line)]);
        }
    }

    /// `WATCHDOG=1`, at most four times per watchdog period (call it often).
    pub(crate) fn ping(&mut self) {
        let Some(period) = self.watchdog else { return };
        if self.last_ping.is_none_or(|t| t.elapsed() >= period / 4) {
            self.last_ping = Some(Instant::now());
            self.send(&[NotifyState::Watchdog]);
        }
    }

    pub(crate) fn stopping(&self) {
        self.send(&[NotifyState::Stopping]);
    }
}

/// Whether stderr is connected to the journal (systemd sets
/// `JOURNAL_STREAM=dev:inode` of the stream it gave the service): then logs
/// go to journald with structured fields instead of as text.
pub(crate) fn stderr_is_journal() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: fstat on fd 2 with a zeroed, correctly sized buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

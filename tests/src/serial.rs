//! Serial devices for the tests: a real pseudo-terminal made by `socat`
//! (Debian's package), reached through a symlink the way udev's
//! `/dev/serial/by-id/...` links reach a USB adapter. Bytes the test sends go
//! through socat into the pty's master; the agent opens the slave end.
//! Unplugging kills socat: the master closes (the agent's reads fail) and
//! the symlink is removed; plugging in again makes a new pty behind the
//! same path.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Where Debian puts socat.
pub fn socat_bin() -> &'static str {
    "/usr/bin/socat"
}

/// A device behind `link`: a pty pair from socat, fed by `send`.
pub struct SerialDevice {
    pub link: PathBuf,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    wait_slave: bool,
}

impl SerialDevice {
    /// Plug a device in at `link` and wait until the link exists. Nothing
    /// sent reaches the pty before the agent opens it.
    pub fn plug(link: &Path) -> SerialDevice {
        SerialDevice::plug_with(link, true)
    }

    /// `plug`; with `wait_slave` false, bytes go into the pty at once.
    pub fn plug_with(link: &Path, wait_slave: bool) -> SerialDevice {
        let mut d = SerialDevice {
            link: link.to_path_buf(),
            child: None,
            stdin: None,
            wait_slave,
        };
        d.replug();
        d
    }

    /// The pty behind the link (`/dev/pts/N`).
    pub fn pts(&self) -> PathBuf {
        std::fs::read_link(&self.link).unwrap_or_else(|e| panic!("read link {}: {e}", self.link.display()))
    }

    /// Plug the device in again (a new pty at the same path).
    pub fn replug(&mut self) {
        assert!(self.child.is_none(), "the device is already plugged in");
        // -u: from stdin to the pty only. raw,echo=0: bytes pass unchanged.
        // wait-slave: nothing is written until the agent opens the port.
        let wait = if self.wait_slave { "wait-slave," } else { "" };
        let mut child = Command::new(socat_bin())
            .arg("-u")
            .arg("STDIN")
            .arg(format!("PTY,raw,echo=0,{wait}link={}", self.link.display()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (apt-get install socat): {e}", socat_bin()));
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::symlink_metadata(&self.link).is_err() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("socat exited at once ({status}) making {}", self.link.display());
            }
            assert!(
                Instant::now() < deadline,
                "socat made no {} within 10 s",
                self.link.display()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Write bytes to the device's side of the line.
    pub fn send(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("the device is plugged in");
        stdin.write_all(bytes).expect("write to socat");
        stdin.flush().expect("flush to socat");
    }

    /// Pull the plug: the link goes, then socat is killed and the pty
    /// closes. (In that order: a dangling link to `/dev/pts/N` could reach
    /// another test's new pty with the same number.)
    pub fn unplug(&mut self) {
        if self.child.is_some() {
            let _ = std::fs::remove_file(&self.link);
        }
        self.stdin = None;
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for SerialDevice {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// An NMEA 0183 sentence with its checksum and line ending.
pub fn nmea(body: &str) -> String {
    let sum = body.bytes().fold(0u8, |a, b| a ^ b);
    format!("${body}*{sum:02X}\r\n")
}

/// `data` COBS-encoded, without the zero that ends a frame.
pub fn cobs(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8];
    let (mut code_at, mut code) = (0usize, 1u8);
    for &b in data {
        if b != 0 {
            out.push(b);
            code += 1;
        }
        if b == 0 || code == 0xFF {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        }
    }
    out[code_at] = code;
    out
}

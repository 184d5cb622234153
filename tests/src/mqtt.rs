//! Real MQTT for the tests: a `mosquitto` broker per test on a free
//! loopback port (killed, restarted, given TLS or passwords as a test
//! needs), `mosquitto_pub` to publish and `mosquitto_sub` to receive what
//! reaches a broker, payloads in hex so CBOR arrives intact.

use std::fs;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// A port nobody listens on right now (the OS picks it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a loopback port")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Where Debian puts mosquitto.
pub fn mosquitto_bin() -> &'static str {
    "/usr/sbin/mosquitto"
}

/// One mosquitto process on `127.0.0.1:port`, its files in `dir`.
pub struct Broker {
    pub port: u16,
    pub dir: PathBuf,
    /// Extra lines of mosquitto.conf (TLS, passwords, ...).
    extra: String,
    child: Option<Child>,
    starts: u32,
}

impl Broker {
    /// Start a broker in `dir` (created) with `extra` config lines, such as
    /// `persistence true`. Anonymous clients are allowed unless `extra` says otherwise.
    pub fn start(dir: &Path, extra: &str) -> Broker {
        fs::create_dir_all(dir).expect("broker dir");
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_path_buf(),
            extra: extra.to_string(),
            child: None,
            starts: 0,
        };
        b.restart();
        b
    }

    /// A broker whose `conf` has its own `listener {port} ...` line (TLS).
    pub fn start_tls(dir: &Path, conf: &str) -> Broker {
        Broker::start(dir, conf)
    }

    /// (Re)start on the same port and persistence folder.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "broker already running");
        let conf = self.dir.join("mosquitto.conf");
        let allow = if self.extra.contains("allow_anonymous") {
            ""
        } else {
            "allow_anonymous true\n"
        };
        let listener = if self.extra.contains("listener {port}") {
            String::new()
        } else {
            format!("listener {} 127.0.0.1\n", self.port)
        };
        // Started as root, mosquitto drops to the `mosquitto` user, which
        // cannot read a test's private folder (keys, persistence): stay root.
        let user = if is_root() { "user root\n" } else { "" };
        let text = format!(
            "{listener}{allow}{user}persistence_location {}/\nlog_dest file {}/mosquitto.log\nlog_type all\n{}\n",
            self.dir.display(),
            self.dir.display(),
            self.extra.replace("{port}", &self.port.to_string())
        );
        fs::write(&conf, text).expect("write mosquitto.conf");
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {} within 10 s",
                self.port
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9` the broker (it saves nothing on the way out).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM: mosquitto saves its persistent sessions and queues, then exits.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").arg("-TERM").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The broker's own log (connections, refusals).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Publish one message with `mosquitto_pub` (QoS `qos`), waiting for it to be sent.
    pub fn publish(&self, topic: &str, payload: &[u8], qos: u8) {
        publish_on(self.port, topic, payload, qos, &[]);
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `mosquitto_pub` to `127.0.0.1:port`, payload from stdin; `extra` are
/// further arguments (TLS files, user names).
pub fn publish_on(port: u16, topic: &str, payload: &[u8], qos: u8, extra: &[&str]) {
    // `-s` reads the payload from stdin, which may not be empty: `-n` sends an empty one.
    let from = if payload.is_empty() { "-n" } else { "-s" };
    let mut child = Command::new("mosquitto_pub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            topic,
            "-q",
            &qos.to_string(),
            from,
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mosquitto_pub (apt-get install mosquitto-clients)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload)
        .expect("write payload");
    // (stdin is closed here, so `-s` sees the end of the payload)
    let out = child.wait_with_output().expect("wait for mosquitto_pub");
    assert!(
        out.status.success(),
        "mosquitto_pub -t {topic} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `mosquitto_sub` writing `topic hex-payload` lines to a file.
pub struct Receiver {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

/// One received message.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

impl Message {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload)
            .unwrap_or_else(|e| panic!("payload on {} is not JSON ({e}): {:?}", self.topic, self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex from mosquitto_sub"))
        .collect()
}

impl Receiver {
    /// Subscribe to `filter` at QoS 1. With `session = Some(id)` the
    /// session is persistent (`-c -i id`), so the broker keeps messages for
    /// it while it is away. Returns once the broker acknowledged the subscription.
    pub fn start(port: u16, filter: &str, dir: &Path, session: Option<&str>) -> Receiver {
        Self::start_with(port, filter, dir, session, &[])
    }

    pub fn start_with(port: u16, filter: &str, dir: &Path, session: Option<&str>, extra: &[&str]) -> Receiver {
        let n = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        let out = dir.join(format!("received-{n}.txt"));
        let err = dir.join(format!("received-{n}.err"));
        // stdbuf: mosquitto_sub's stdout is a file, which libc would buffer.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "mosquitto_sub"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-t",
                filter,
                "-q",
                "1",
                "-d",
            ])
            .args(["-F", "%t %x"]);
        if let Some(id) = session {
            cmd.args(["-c", "-i", id]);
        }
        let child = cmd
            .args(extra)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).expect("receiver file"))
            .stderr(fs::File::create(&err).expect("receiver err file"))
            .spawn()
            .expect("start mosquitto_sub");
        let r = Receiver { child, out, err };
        let deadline = Instant::now() + Duration::from_secs(10);
        // With -d, mosquitto_sub's debug lines go to stdout too; SUBACK means subscribed.
        while !fs::read_to_string(&r.out).unwrap_or_default().contains("SUBACK")
            && !fs::read_to_string(&r.err).unwrap_or_default().contains("SUBACK")
        {
            assert!(Instant::now() < deadline, "mosquitto_sub did not subscribe within 10 s");
            thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<Message> {
        let text = fs::read_to_string(&self.out).unwrap_or_default();
        let complete = match text.rfind('\n') {
            Some(end) => &text[..end],
            None => "",
        };
        complete
            .lines()
            .filter(|l| !l.starts_with("Client ") && !l.trim().is_empty())
            .filter_map(|l| {
                let (topic, hex) = l.rsplit_once(' ')?;
                if hex.len() % 2 != 0 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                Some(Message {
                    topic: topic.to_string(),
                    payload: unhex(hex),
                })
            })
            .collect()
    }

    /// Wait until `enough` holds for the messages received, or panic with them.
    pub fn wait_until(&self, within: Duration, what: &str, enough: impl Fn(&[Message]) -> bool) -> Vec<Message> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.messages();
            if enough(&got) {
                return got;
            }
            if Instant::now() >= deadline {
                panic!(
                    "waited {within:?} for {what}; received {} message(s):\n{}",
                    got.len(),
                    got.iter()
                        .map(|m| format!("{} {}", m.topic, m.text()))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

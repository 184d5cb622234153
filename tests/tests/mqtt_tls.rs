//! TLS and authentication against a real mosquitto, with certificates
//! made here by `openssl`: mutual TLS works end to end, and each way of
//! being refused (wrong CA, expired certificate, wrong password, refused
//! client id) gives one clear log line, retries with backoff, and costs
//! no CPU while waiting.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use runnel_tests::mqtt::{publish_on, Broker, Receiver};
use runnel_tests::{cpu_seconds, toml_path, write_file, Agent};

const T0: i64 = 1_704_067_200;

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 (and an expired one), a client
/// certificate, and a second CA that signed none of them.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        fs::create_dir_all(dir).unwrap();
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN={ca}"));
            let mut a = vec!["req", "-x509"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &pem, "-days", "30", "-subj", &subj]);
            openssl(dir, &a);
        }
        fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
        fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (name, cn) in [("server", "127.0.0.1"), ("client", "runnel-test")] {
            let (key, csr, pem, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("/CN={cn}"),
            );
            let mut a = vec!["req"];
            a.extend(ec);
            a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(dir, &a);
            let ext = format!("{name}.ext");
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "30",
                    "-extfile",
                    &ext,
                ],
            );
        }
        // An expired server certificate: `openssl ca` takes explicit dates.
        fs::write(dir.join("index.txt"), "").unwrap();
        fs::write(dir.join("serial"), "1000\n").unwrap();
        fs::write(
            dir.join("ca.cnf"),
            format!(
                "[ca]\ndefault_ca = d\n[d]\ndatabase = {0}/index.txt\nnew_certs_dir = {0}\nserial = {0}/serial\n\
                 default_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n",
                dir.display()
            ),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "ca",
                "-batch",
                "-config",
                "ca.cnf",
                "-cert",
                "ca.pem",
                "-keyfile",
                "ca.key",
                "-in",
                "server.csr",
                "-out",
                "expired.pem",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20200201000000Z",
                "-extfile",
                "server.ext",
                "-notext",
            ],
        );
        // Keys must not be readable by others (runnel refuses them otherwise).
        let _ = Command::new("chmod").arg("600").arg(dir.join("client.key")).status();
        Pki { dir: dir.to_path_buf() }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }
}

/// A mosquitto TLS listener using `server_cert`, requiring client certificates.
fn tls_broker(dir: &Path, pki: &Pki, server_cert: &str, extra: &str) -> Broker {
    let conf = format!(
        "listener {{port}} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n{extra}",
        pki.path("ca.pem"),
        pki.path(server_cert),
        pki.path("server.key")
    );
    Broker::start_tls(&dir.join("broker"), &conf)
}

fn config(dir: &Path, port: u16, broker_keys: &str) -> PathBuf {
    write_file(
        dir,
        "flows/flow.py",
        r#"
from datetime import datetime, timedelta, timezone
from runnel import Dataflow, op, win, sources, sinks

flow = Dataflow("tls")
readings = op.input("in", flow, sources.mqtt("sensors/{device}/temp"))
keyed = op.key_on("by_device", readings, "device")
clock = win.EventClock("ts", wait_for_system_duration=timedelta(seconds=0), unit="s")
tens = win.TumblingWindower(length=timedelta(seconds=10), align_to=datetime(2024, 1, 1, tzinfo=timezone.utc))
stats = win.aggregate("per10s", keyed, clock, tens, {"temp": ["count", "mean"]})
op.output("up", stats.down, sinks.mqtt("up/{key}", broker="default"))
"#,
    );
    write_file(
        dir,
        "runnel.toml",
        &format!(
            "device_id = \"tls-device\"\nflows_dir = {}\nstate_dir = {}\nstatus_interval = 0\n\n\
             [brokers.default]\nhost = \"127.0.0.1\"\nport = {port}\nreconnect_max = 1\n{broker_keys}\n",
            toml_path(&dir.join("flows")),
            toml_path(&dir.join("state")),
        ),
    )
}

fn tls_keys(pki: &Pki, ca: &str) -> String {
    format!(
        "[brokers.default.tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        pki.path(ca),
        pki.path("client.pem"),
        pki.path("client.key")
    )
}

#[test]
fn mutual_tls_with_the_right_ca_and_a_client_certificate_carries_readings_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let broker = tls_broker(dir.path(), &pki, "server.pem", "");
    let cfg = config(dir.path(), broker.port, &tls_keys(&pki, "ca.pem"));
    let client = [
        "--cafile",
        &pki.path("ca.pem"),
        "--cert",
        &pki.path("client.pem"),
        "--key",
        &pki.path("client.key"),
    ]
    .map(String::from);
    let client: Vec<&str> = client.iter().map(String::as_str).collect();
    let rdir = dir.path().join("receivers");
    fs::create_dir_all(&rdir).unwrap();
    let r = Receiver::start_with(broker.port, "up/#", &rdir, None, &client);
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_for_log(Duration::from_secs(20), "connected to broker default");
    for (ts, temp) in [(1, 20.0), (2, 22.0), (30, 0.0)] {
        let body = format!("{{\"ts\": {}, \"temp\": {temp}}}", T0 + ts);
        publish_on(broker.port, "sensors/a1/temp", body.as_bytes(), 1, &client);
    }
    let got = r.wait_until(Duration::from_secs(20), "the summary over TLS", |m| !m.is_empty());
    let v = got[0].json();
    assert_eq!(v["id"], serde_json::json!("tls-device/tls/up/a1/0"), "{v}");
    assert_eq!(v["value"]["temp"]["mean"], serde_json::json!(21.0), "{v}");
    assert!(agent.terminate(Duration::from_secs(5)).success());
}

/// Start the agent against a broker that will refuse it; within a few
/// seconds it must have logged `needle` exactly once, tried again several
/// times (the broker's log shows the attempts), kept running, and used
/// almost no CPU.
fn refused_once_with_backoff(dir: &Path, broker: &Broker, cfg: &Path, needle: &str) {
    let mut agent = Agent::start(dir, cfg);
    agent.wait_for_log(Duration::from_secs(20), needle);
    let before = cpu_seconds(agent.pid());
    let from = Instant::now();
    thread::sleep(Duration::from_secs(5));
    agent.assert_running();
    let used = cpu_seconds(agent.pid()) - before;
    let log = agent.stderr();
    assert_eq!(
        log.matches(needle).count(),
        1,
        "one line for the problem, not one per retry:\n{log}"
    );
    assert!(log.contains("retrying with backoff"), "{log}");
    assert!(
        used < 0.25,
        "{used:.2} s CPU in {:?} while refused: a busy loop?\n{log}",
        from.elapsed()
    );
    // "New connection from 127.0.0.1" or, for a failed TLS handshake,
    // "Client connection from 127.0.0.1 failed".
    let attempts = broker.log().matches("onnection from 127.0.0.1").count();
    assert!(
        (3..=40).contains(&attempts),
        "{attempts} connection attempts: it must retry, with backoff\n{}",
        broker.log()
    );
    assert!(agent.terminate(Duration::from_secs(5)).success(), "{}", agent.stderr());
}

#[test]
fn a_broker_certificate_from_an_unknown_ca_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let broker = tls_broker(dir.path(), &pki, "server.pem", "");
    let cfg = config(dir.path(), broker.port, &tls_keys(&pki, "other-ca.pem"));
    refused_once_with_backoff(dir.path(), &broker, &cfg, "invalid peer certificate: UnknownIssuer");
}

#[test]
fn an_expired_broker_certificate_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let broker = tls_broker(dir.path(), &pki, "expired.pem", "");
    let cfg = config(dir.path(), broker.port, &tls_keys(&pki, "ca.pem"));
    refused_once_with_backoff(
        dir.path(),
        &broker,
        &cfg,
        "invalid peer certificate: certificate expired",
    );
}

#[test]
fn a_wrong_password_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("passwords");
    let made = Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&pw)
        .args(["sensor-gw", "right-password"])
        .status()
        .expect("run mosquitto_passwd");
    assert!(made.success());
    let broker = Broker::start(
        &dir.path().join("broker"),
        &format!("allow_anonymous false\npassword_file {}\n", pw.display()),
    );
    let secret = write_file(dir.path(), "secret", "wrong-password\n");
    let _ = Command::new("chmod").arg("600").arg(&secret).status();
    let cfg = config(
        dir.path(),
        broker.port,
        &format!("username = \"sensor-gw\"\npassword_file = {}\n", toml_path(&secret)),
    );
    // MQTT 3.1.1: mosquitto only says "not authorized".
    refused_once_with_backoff(
        dir.path(),
        &broker,
        &cfg,
        "the broker says this client is not authorized",
    );
    // The same over MQTT 5 (mosquitto 2.0 still says "not authorized").
    let dir5 = dir.path().join("v5");
    let broker5 = Broker::start(
        &dir5.join("broker"),
        &format!("allow_anonymous false\npassword_file {}\n", pw.display()),
    );
    let cfg = config(
        &dir5,
        broker5.port,
        &format!(
            "protocol = \"5\"\nusername = \"sensor-gw\"\npassword_file = {}\n",
            toml_path(&secret)
        ),
    );
    refused_once_with_backoff(&dir5, &broker5, &cfg, "the broker says this client is not authorized");
}

#[test]
fn a_refused_client_id_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    // An empty client id asks the broker to assign one; this broker will not.
    // (mosquitto's `clientid_prefixes` answers "not authorized" instead, and
    // over MQTT 5 it gives no reason for either: "UnspecifiedError".)
    {
        let protocol = "3.1.1";
        let d = dir.path().join(protocol);
        let broker = Broker::start(&d.join("broker"), "allow_zero_length_clientid false\n");
        let cfg = config(&d, broker.port, &format!("client_id = \"\"\nprotocol = \"{protocol}\""));
        refused_once_with_backoff(&d, &broker, &cfg, "the broker refused the client id");
    }
}

#[test]
fn a_password_file_readable_by_everyone_stops_that_flow_with_the_chmod_to_run() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&dir.path().join("broker"), "");
    let secret = write_file(dir.path(), "secret", "pw\n");
    let _ = Command::new("chmod").arg("644").arg(&secret).status();
    let cfg = config(
        dir.path(),
        broker.port,
        &format!("username = \"u\"\npassword_file = {}\n", toml_path(&secret)),
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    agent.wait_for_log(Duration::from_secs(20), "is readable by every user; run: chmod o-rwx");
    agent.wait_for_log(Duration::from_secs(5), "flow \"tls\"");
    assert!(agent.terminate(Duration::from_secs(5)).success());
}

//! The agent's configuration file (`/etc/runnel/runnel.toml`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

/// `runnel run --config FILE`. Every key is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Names this device in logs and (later) in summary ids. Default: the host name.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Where the agent keeps its state. Default `/var/lib/runnel`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where flow files (`*.py`) are read from. Default `/etc/runnel/flows`.
    #[serde(default = "default_flows_dir")]
    pub flows_dir: PathBuf,
    /// `error`, `warn`, `info`, `debug` or `trace` (or a tracing filter). Default `info`.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    /// Seconds between the stats messages. 0: none. (The stats log line is once a minute.)
    #[serde(default = "default_status_interval")]
    pub status_interval: u64,
    /// Seconds a flow file may take to load (its top level) before it is
    /// interrupted and skipped. Default 10.
    #[serde(default = "default_flow_load_timeout")]
    pub flow_load_timeout: f64,
    /// Seconds one Python job (one batch at one step) may run before it is
    /// interrupted and its items skipped. Default 30.
    #[serde(default = "default_python_step_timeout")]
    pub python_step_timeout: f64,
    /// Seconds a change to a flow's state may wait before it is committed
    /// to the state file (results going upstream are committed at once).
    /// Default 20 (about 35 MB written per hour at 100 readings/s, see
    /// tests/bench/sd_budget.py).
    #[serde(default = "default_snapshot_interval")]
    pub snapshot_interval: f64,
    /// Results for MQTT sinks are committed at once, but at most once per
    /// this many seconds per flow, so that the results of many keys closing
    /// around one boundary share a commit. 0: each at once (lowest latency,
    /// most SD-card writes). Default 1.
    #[serde(default = "default_commit_gap")]
    pub commit_gap: f64,
    /// MQTT brokers by name (`[brokers.NAME]`).
    #[serde(default)]
    pub brokers: BTreeMap<String, BrokerConfig>,
    /// `RUNNEL_<KEY>` environment variables that overrode the file, as
    /// `KEY from RUNNEL_KEY` (logged at start).
    #[serde(skip)]
    pub overrides: Vec<String>,
}

/// The top-level keys `RUNNEL_<KEY>` can set, and whether each is text.
pub(crate) const ENV_KEYS: [(&str, bool); 9] = [
    ("device_id", true),
    ("state_dir", true),
    ("flows_dir", true),
    ("log_level", true),
    ("status_interval", false),
    ("flow_load_timeout", false),
    ("python_step_timeout", false),
    ("snapshot_interval", false),
    ("commit_gap", false),
];

/// Apply `RUNNEL_<KEY>` variables (read by `var`) to the file's table.
/// Returns what was overridden.
fn apply_env(table: &mut toml::Table, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Vec<String>> {
    let mut applied = Vec::new();
    for (key, text) in ENV_KEYS {
        let name = format!("RUNNEL_{}", key.to_ascii_uppercase());
        let Some(raw) = var(&name) else { continue };
        let value = if text {
            toml::Value::String(raw)
        } else {
            let parsed: Result<toml::Table, _> = toml::from_str(&format!("v = {}", raw.trim()));
            match parsed.ok().and_then(|mut t| t.remove("v")) {
                Some(v @ (toml::Value::Integer(_) | toml::Value::Float(_))) => v,
                _ => anyhow::bail!("environment variable {name}={raw:?}: {key} must be a number"),
            }
        };
        table.insert(key.to_string(), value);
        applied.push(format!("{key} from {name}"));
    }
    Ok(applied)
}

/// `[brokers.NAME]`: one MQTT connection, shared by every flow that names it.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BrokerConfig {
    #[serde(default = "default_host")]
    pub host: String,
    /// Default 1883, or 8883 with `[brokers.NAME.tls]`.
    pub port: Option<u16>,
    /// Default `runnel-<device_id>-<NAME>`.
    pub client_id: Option<String>,
    pub username: Option<String>,
    /// A file holding the password (trailing newline ignored); must not be
    /// readable by others.
    pub password_file: Option<PathBuf>,
    /// Seconds between keepalive pings. Default 30.
    #[serde(default = "default_keepalive")]
    pub keepalive: u64,
    /// Clean session off: the broker queues QoS 1 messages while runnel is down.
    #[serde(default)]
    pub persistent_session: bool,
    /// `"3.1.1"` (default) or `"5"`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Upper bound of this broker's outbox in the state file, in bytes.
    #[serde(default = "default_max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    /// What a full outbox does: `"drop-oldest"` (default) or `"block"`.
    #[serde(default = "default_outbox_full")]
    pub outbox_full: String,
    /// Publish `runnel/<device_id>/status` (and stats) on this broker. Default true.
    #[serde(default = "default_true")]
    pub status: bool,
    /// QoS 1 messages the broker sends before it waits for acknowledgements
    /// (mosquitto's `max_inflight_messages`, 20 by default; with MQTT 5
    /// runnel announces it as its Receive Maximum). Sources with
    /// `ack="after-commit"` commit before this many are held. Default 20.
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Longest wait between reconnect attempts, in seconds. Default 30.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: u64,
    pub tls: Option<TlsConfig>,
}

/// `[brokers.NAME.tls]`: TLS with rustls. Without `ca` the system's roots
/// are trusted; `cert` and `key` together turn on mutual TLS.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsConfig {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A Python deadline (config key or CLI flag `name`) must be a sane number of seconds.
pub(crate) fn check_timeout(name: &str, seconds: f64) -> Result<(), String> {
    if seconds.is_finite() && (0.1..=86_400.0).contains(&seconds) {
        Ok(())
    } else {
        Err(format!("{name} must be between 0.1 and 86400 seconds; got {seconds}"))
    }
}

fn default_commit_gap() -> f64 {
    1.0
}

fn default_max_inflight() -> u16 {
    20
}

fn default_snapshot_interval() -> f64 {
    20.0
}

fn default_flow_load_timeout() -> f64 {
    crate::python::LOAD_TIMEOUT.as_secs_f64()
}
fn default_python_step_timeout() -> f64 {
    crate::python::STEP_TIMEOUT.as_secs_f64()
}
fn default_host() -> String {
    "localhost".into()
}
fn default_keepalive() -> u64 {
    30
}
fn default_protocol() -> String {
    "3.1.1".into()
}
/// 64 MiB: days of summaries, a sliver of an SD card.
fn default_max_outbox_bytes() -> u64 {
    64 << 20
}
fn default_outbox_full() -> String {
    "drop-oldest".into()
}
fn default_true() -> bool {
    true
}
fn default_reconnect_max() -> u64 {
    30
}
fn default_status_interval() -> u64 {
    60
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/runnel")
}
fn default_flows_dir() -> PathBuf {
    PathBuf::from("/etc/runnel/flows")
}
fn default_log_level() -> String {
    "info".into()
}

impl Config {
    pub(crate) fn load(path: &Path) -> anyhow::Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Config::from_text(path, &text, |name| std::env::var(name).ok())
    }

    /// The config in `text` (read from `path`), with `RUNNEL_<KEY>`
    /// variables from `var` applied over its top-level keys.
    pub(crate) fn from_text(path: &Path, text: &str, var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let mut table: toml::Table =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        let overrides = apply_env(&mut table, var)?;
        let mut config: Config = Config::deserialize(toml::Value::Table(table)).map_err(|e| {
            let from_env = if overrides.is_empty() {
                String::new()
            } else {
                format!(" (with {})", overrides.join(", "))
            };
            anyhow::anyhow!("config file {}{from_env}: {e}", path.display())
        })?;
        config.overrides = overrides;
        // Relative folders are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in [&mut config.state_dir, &mut config.flows_dir] {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        for (key, v) in [
            ("flow_load_timeout", config.flow_load_timeout),
            ("python_step_timeout", config.python_step_timeout),
        ] {
            check_timeout(key, v).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        }
        if !(config.commit_gap.is_finite() && (0.0..=60.0).contains(&config.commit_gap)) {
            anyhow::bail!(
                "config file {}: commit_gap must be between 0 and 60 seconds; got {}",
                path.display(),
                config.commit_gap
            );
        }
        if !(config.snapshot_interval.is_finite() && (0.1..=3600.0).contains(&config.snapshot_interval)) {
            anyhow::bail!(
                "config file {}: snapshot_interval must be between 0.1 and 3600 seconds; got {}",
                path.display(),
                config.snapshot_interval
            );
        }
        for (name, b) in config.brokers.iter_mut() {
            let at = |what: String| anyhow::anyhow!("config file {}: [brokers.{name}]: {what}", path.display());
            if !matches!(b.protocol.as_str(), "3.1.1" | "5") {
                return Err(at(format!("protocol must be \"3.1.1\" or \"5\"; got {:?}", b.protocol)));
            }
            if !matches!(b.outbox_full.as_str(), "drop-oldest" | "block") {
                return Err(at(format!(
                    "outbox_full must be \"drop-oldest\" or \"block\"; got {:?}",
                    b.outbox_full
                )));
            }
            if b.max_inflight == 0 {
                return Err(at("max_inflight must be at least 1".into()));
            }
            if b.host.trim().is_empty() {
                return Err(at("host is empty".into()));
            }
            if b.persistent_session && b.client_id.as_deref().is_some_and(|c| c.is_empty()) {
                return Err(at("persistent_session needs a client_id (an empty one asks the broker to make one up, for this connection only)".into()));
            }
            if b.protocol == "5" && b.keepalive == 0 {
                return Err(at(
                    "keepalive = 0 (off) is not available with protocol = \"5\"; use 5 or more seconds".into(),
                ));
            }
            if b.keepalive > 0 && b.keepalive < 5 {
                return Err(at(format!(
                    "keepalive must be 0 (off) or at least 5 seconds; got {}",
                    b.keepalive
                )));
            }
            let mut files: Vec<&mut PathBuf> = b.password_file.iter_mut().collect();
            if let Some(tls) = &mut b.tls {
                if tls.cert.is_some() != tls.key.is_some() {
                    return Err(at("tls: give both cert and key (mutual TLS) or neither".into()));
                }
                files.extend(tls.ca.iter_mut().chain(tls.cert.iter_mut()).chain(tls.key.iter_mut()));
            }
            for f in files {
                if f.is_relative() {
                    *f = base.join(&*f);
                }
            }
        }
        if config.device_id.as_deref().is_some_and(|d| d.trim().is_empty()) {
            config.device_id = None;
        }
        if config.device_id.is_none() {
            config.device_id = std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty());
        }
        Ok(config)
    }

    pub(crate) fn device_id(&self) -> &str {
        self.device_id.as_deref().unwrap_or("unnamed-device")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_the_file_name() {
        let dir = std::env::temp_dir().join(format!("runnel-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runnel.toml");
        std::fs::write(&path, "flows_dri = \"flows\"\n").unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("runnel.toml") && err.contains("flows_dri"), "{err}");
        std::fs::write(&path, "device_id = \"pi-7\"\nflows_dir = \"flows\"\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.device_id(), "pi-7");
        assert_eq!(c.flows_dir, dir.join("flows"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/runnel"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn runnel_variables_override_the_top_level_keys() {
        let path = Path::new("/etc/runnel/runnel.toml");
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let c = Config::from_text(
            path,
            "log_level = \"warn\"\ncommit_gap = 0.5\n[brokers.up]\nhost = \"h\"\n",
            env(&[
                ("RUNNEL_LOG_LEVEL", "debug"),
                ("RUNNEL_COMMIT_GAP", "0"),
                ("RUNNEL_STATUS_INTERVAL", "15"),
                ("RUNNEL_FLOWS_DIR", "/srv/flows"),
                ("RUNNEL_SNAPSHOT_INTERVAL", "2.5"),
                ("RUNNEL_HOST", "ignored: not a top-level key"),
            ]),
        )
        .unwrap();
        assert_eq!(c.log_level, "debug");
        assert_eq!((c.commit_gap, c.status_interval, c.snapshot_interval), (0.0, 15, 2.5));
        assert_eq!(c.flows_dir, PathBuf::from("/srv/flows"));
        assert_eq!(c.brokers["up"].host, "h");
        assert_eq!(c.overrides.len(), 5, "{:?}", c.overrides);
        assert!(c.overrides.contains(&"commit_gap from RUNNEL_COMMIT_GAP".to_string()));
        for (pairs, needle) in [
            (
                &[("RUNNEL_COMMIT_GAP", "soon")][..],
                "RUNNEL_COMMIT_GAP=\"soon\": commit_gap must be a number",
            ),
            (
                &[("RUNNEL_COMMIT_GAP", "90")][..],
                "commit_gap must be between 0 and 60",
            ),
            (
                &[("RUNNEL_STATUS_INTERVAL", "1.5")][..],
                "with status_interval from RUNNEL_STATUS_INTERVAL",
            ),
        ] {
            let pairs: &'static [(&'static str, &'static str)] = Box::leak(pairs.to_vec().into_boxed_slice());
            let err = format!("{:#}", Config::from_text(path, "", env(pairs)).unwrap_err());
            assert!(err.contains(needle), "{pairs:?}: {err}");
        }
    }

    /// The commented example the package installs as /etc/runnel/runnel.toml
    /// names every key, and its values are the defaults.
    #[test]
    fn the_shipped_example_config_names_every_key_with_its_default() {
        let example = include_str!("../../cross/debian/runnel.toml");
        // Uncommented, the example's `#key = value` lines are a valid config.
        let lines: Vec<&str> = example
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| {
                let l = l.trim_start();
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .collect();
        let text = lines.join("\n");
        let c = Config::from_text(Path::new("/etc/runnel/runnel.toml"), &text, |_| None).unwrap();
        let d = Config::from_text(Path::new("/etc/runnel/runnel.toml"), "[brokers.upstream]\n", |_| None).unwrap();
        assert_eq!(
            (&c.flows_dir, &c.state_dir, &c.log_level, c.status_interval),
            (&d.flows_dir, &d.state_dir, &d.log_level, d.status_interval)
        );
        assert_eq!(
            (
                c.flow_load_timeout,
                c.python_step_timeout,
                c.snapshot_interval,
                c.commit_gap
            ),
            (
                d.flow_load_timeout,
                d.python_step_timeout,
                d.snapshot_interval,
                d.commit_gap
            )
        );
        let (b, db) = (&c.brokers["upstream"], &d.brokers["upstream"]);
        assert_eq!(
            (
                &b.host,
                b.keepalive,
                b.persistent_session,
                &b.protocol,
                b.max_outbox_bytes
            ),
            (
                &db.host,
                db.keepalive,
                db.persistent_session,
                &db.protocol,
                db.max_outbox_bytes
            )
        );
        assert_eq!(
            (&b.outbox_full, b.status, b.max_inflight, b.reconnect_max),
            (&db.outbox_full, db.status, db.max_inflight, db.reconnect_max)
        );
        // Every field of the three structs appears: a key added later must be
        // documented there too.
        let keys: Vec<&str> = lines
            .iter()
            .filter_map(|l| l.trim_start().split_once(" = ").map(|(k, _)| k))
            .collect();
        let source = include_str!("config.rs");
        let mut fields = Vec::new();
        for name in ["Config", "BrokerConfig", "TlsConfig"] {
            let start = source
                .find(&format!("pub(crate) struct {name} {{"))
                .expect("the struct");
            let body = &source[start..start + source[start..].find("\n}").expect("its end")];
            for line in body.lines() {
                if let Some(f) = line.trim().strip_prefix("pub ").and_then(|r| r.split_once(':')) {
                    if !["brokers", "tls", "overrides"].contains(&f.0) {
                        fields.push(f.0);
                    }
                }
            }
        }
        assert!(fields.len() > 20, "{fields:?}");
        for key in fields {
            assert!(keys.contains(&key), "the example config lacks {key}");
        }
    }

    #[test]
    fn broker_tables_reject_unknown_keys_and_bad_values_naming_the_broker() {
        let dir = std::env::temp_dir().join(format!("runnel-config-brokers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("runnel.toml");
        let cases = [
            ("[brokers.up]\nhots = \"a\"\n", "hots"),
            ("[brokers.up]\nprotocol = \"4\"\n", "[brokers.up]: protocol"),
            ("[brokers.up]\noutbox_full = \"spill\"\n", "[brokers.up]: outbox_full"),
            ("[brokers.up]\nkeepalive = 2\n", "[brokers.up]: keepalive"),
            (
                "[brokers.up]\nprotocol = \"5\"\nkeepalive = 0\n",
                "[brokers.up]: keepalive = 0",
            ),
            (
                "[brokers.up]\npersistent_session = true\nclient_id = \"\"\n",
                "[brokers.up]: persistent_session needs a client_id",
            ),
            (
                "[brokers.up.tls]\ncert = \"c.pem\"\n",
                "[brokers.up]: tls: give both cert and key",
            ),
            ("[brokers.up.tls]\ncafile = \"c.pem\"\n", "cafile"),
            ("flow_load_timeout = 0\n", "flow_load_timeout must be between"),
        ];
        for (text, needle) in cases {
            std::fs::write(&path, text).unwrap();
            let err = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(err.contains("runnel.toml") && err.contains(needle), "{text:?}: {err}");
        }
        std::fs::write(
            &path,
            "[brokers.up]\nhost = \"mqtt.example\"\npassword_file = \"pw\"\nusername = \"u\"\n[brokers.up.tls]\nca = \"ca.pem\"\n",
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        let b = &c.brokers["up"];
        assert_eq!((b.port, b.keepalive, b.max_outbox_bytes), (None, 30, 64 << 20));
        assert_eq!(b.password_file.as_deref(), Some(dir.join("pw").as_path()));
        assert_eq!(
            b.tls.as_ref().unwrap().ca.as_deref(),
            Some(dir.join("ca.pem").as_path())
        );
        assert_eq!(
            (c.flow_load_timeout, c.python_step_timeout, c.status_interval),
            (10.0, 30.0, 60)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

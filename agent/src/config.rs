//! The agent's configuration file (`/etc/runnel/runnel.toml`).

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
        let mut config: Config =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
        // Relative folders are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for dir in [&mut config.state_dir, &mut config.flows_dir] {
            if dir.is_relative() {
                *dir = base.join(&*dir);
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
}

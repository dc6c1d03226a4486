//! keeld's configuration: built-in defaults, overridden by an optional TOML file
//! (`--config`), overridden by `KEEL_*` environment variables and flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/keel";
pub const DEFAULT_STATE: &str = "/run/keel";
pub const DEFAULT_ADDRESS: &str = "/run/keel/keel.sock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Settings read from the TOML file; every field is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub root: Option<PathBuf>,
    pub state: Option<PathBuf>,
    pub address: Option<PathBuf>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    /// uids besides 0 that may use the API.
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    #[serde(default)]
    pub content: ContentSection,
    #[serde(default)]
    pub events: EventsSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// Events kept for replay (`Subscribe` with `since`), in memory and on disk.
    pub retain: Option<usize>,
    /// Events a live subscriber may fall behind before it is disconnected.
    pub subscriber_buffer: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContentSection {
    /// Partial ingests untouched this long are removed at startup (seconds).
    pub ingest_max_age_secs: Option<u64>,
}

/// Command-line flags of keeld; each also reads a `KEEL_*` variable.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "keeld", version = crate::VERSION, about = "keel container node agent daemon")]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, env = "KEEL_CONFIG")]
    pub config: Option<PathBuf>,
    /// Persistent root (content store, metadata).
    #[arg(long, env = "KEEL_ROOT")]
    pub root: Option<PathBuf>,
    /// Runtime state directory (bundles, locks).
    #[arg(long, env = "KEEL_STATE")]
    pub state: Option<PathBuf>,
    /// ttrpc socket path.
    #[arg(long, env = "KEEL_ADDRESS")]
    pub address: Option<PathBuf>,
    /// Log filter, e.g. `info` or `keel=debug` (RUST_LOG syntax).
    #[arg(long, env = "KEEL_LOG_LEVEL")]
    pub log_level: Option<String>,
    #[arg(long, env = "KEEL_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The configuration in force.
#[derive(Debug, Clone)]
pub struct Config {
    pub root: PathBuf,
    pub state: PathBuf,
    pub address: PathBuf,
    pub log_level: String,
    pub log_format: LogFormat,
    pub allowed_uids: Vec<u32>,
    pub ingest_max_age: Duration,
    pub events: keel_actors::events::EventOptions,
}

impl Config {
    /// Merges flags (and their environment variables) over the file over defaults.
    pub fn load(flags: &Flags) -> anyhow::Result<Self> {
        let file = match &flags.config {
            Some(p) => Self::read_file(p)?,
            None => FileConfig::default(),
        };
        let cfg = Config {
            root: flags
                .root
                .clone()
                .or(file.root)
                .unwrap_or_else(|| DEFAULT_ROOT.into()),
            state: flags
                .state
                .clone()
                .or(file.state)
                .unwrap_or_else(|| DEFAULT_STATE.into()),
            address: flags
                .address
                .clone()
                .or(file.address)
                .unwrap_or_else(|| DEFAULT_ADDRESS.into()),
            log_level: flags
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            log_format: flags.log_format.or(file.log_format).unwrap_or_default(),
            allowed_uids: file.allowed_uids,
            ingest_max_age: Duration::from_secs(
                file.content.ingest_max_age_secs.unwrap_or(7 * 24 * 3600),
            ),
            events: {
                let d = keel_actors::events::EventOptions::default();
                keel_actors::events::EventOptions {
                    retain: file.events.retain.unwrap_or(d.retain),
                    subscriber_buffer: file.events.subscriber_buffer.unwrap_or(d.subscriber_buffer),
                }
            },
        };
        anyhow::ensure!(cfg.events.retain > 0, "events.retain must be at least 1");
        anyhow::ensure!(
            cfg.events.subscriber_buffer > 0,
            "events.subscriber_buffer must be at least 1"
        );
        for (name, p) in [
            ("root", &cfg.root),
            ("state", &cfg.state),
            ("address", &cfg.address),
        ] {
            anyhow::ensure!(
                p.is_absolute(),
                "{name} must be an absolute path, got {}",
                p.display()
            );
        }
        Ok(cfg)
    }

    fn read_file(p: &Path) -> anyhow::Result<FileConfig> {
        let text =
            std::fs::read_to_string(p).with_context(|| format!("read config {}", p.display()))?;
        toml::from_str(&text).with_context(|| format!("parse config {}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_file_and_flags_layer() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keel.toml");
        std::fs::write(&f, "root = \"/srv/keel\"\nstate = \"/run/k2\"\nallowed_uids = [1000]\nlog_format = \"json\"\n[content]\ningest_max_age_secs = 60\n[events]\nretain = 500\n").unwrap();
        let flags = Flags::parse_from([
            "keeld",
            "--config",
            f.to_str().unwrap(),
            "--state",
            "/run/flag",
        ]);
        let c = Config::load(&flags).unwrap();
        assert_eq!(c.root, PathBuf::from("/srv/keel"), "file beats default");
        assert_eq!(c.state, PathBuf::from("/run/flag"), "flag beats file");
        assert_eq!(c.address, PathBuf::from(DEFAULT_ADDRESS));
        assert_eq!(c.allowed_uids, vec![1000]);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.ingest_max_age, Duration::from_secs(60));
        assert_eq!(c.events.retain, 500);
        assert_eq!(
            c.events.subscriber_buffer, 16_384,
            "default where the file is silent"
        );
    }

    #[test]
    fn unknown_keys_and_relative_paths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keel.toml");
        std::fs::write(&f, "roots = \"/x\"\n").unwrap();
        let flags = Flags::parse_from(["keeld", "--config", f.to_str().unwrap()]);
        assert!(Config::load(&flags)
            .unwrap_err()
            .to_string()
            .contains("parse config"));
        let flags = Flags::parse_from(["keeld", "--root", "relative"]);
        assert!(Config::load(&flags)
            .unwrap_err()
            .to_string()
            .contains("absolute"));
    }
}

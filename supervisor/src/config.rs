//! keeld's configuration: built-in defaults, overridden by an optional TOML file
//! (`--config`), overridden by `KEEL_*` environment variables and flags.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_ROOT: &str = "/var/lib/keel";
pub const DEFAULT_STATE: &str = "/run/keel";
pub const DEFAULT_ADDRESS: &str = keel_protocol::DEFAULT_ADDRESS;
pub const DEFAULT_RUNTIME: &str = "io.containerd.keel.v1";

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
    /// The runtime of a container that names none: keel's own shim,
    /// `io.containerd.keel.v1`, by default; `io.containerd.runc.v2` is
    /// containerd's runc shim.
    pub default_runtime: Option<String>,
    /// uids besides 0 that may use the API as admins (the older form of
    /// `[[access]]` with `role = "admin"`).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Who besides root may use the API, and how.
    #[serde(default)]
    pub access: Vec<AccessEntry>,
    #[serde(default)]
    pub content: ContentSection,
    #[serde(default)]
    pub events: EventsSection,
    /// Bounds on what one client may send or hold.
    #[serde(default)]
    pub limits: keel_protocol::limits::Limits,
}

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every call. Root-equivalent on the host: an admin can run a container with
    /// host mounts, OCI hooks or full privileges, and write checkpoint images
    /// anywhere.
    Admin,
    /// Reads only: list and get containers and tasks, wait, metrics, subscribe to
    /// events, read content.
    Reader,
}

/// One `[[access]]` entry: a uid, its role and, optionally, the only namespaces it
/// may use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessEntry {
    pub uid: u32,
    pub role: Role,
    /// Namespaces the uid may use; every namespace when absent.
    pub namespaces: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// Events kept for replay (`Subscribe` with `since`), in memory and on disk.
    pub retain: Option<usize>,
    /// Bytes of events kept for replay, in memory and on disk.
    pub retain_bytes: Option<u64>,
    /// Events a live subscriber may fall behind before it is disconnected.
    pub subscriber_buffer: Option<usize>,
    /// Bytes of events a live subscriber may fall behind before it is disconnected.
    pub subscriber_buffer_bytes: Option<u64>,
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
    /// The runtime of a container that names none.
    pub default_runtime: String,
    /// Who besides root may call keeld (the `allowed_uids` as admins, then
    /// `[[access]]`).
    pub access: Vec<AccessEntry>,
    pub ingest_max_age: Duration,
    pub events: keel_actors::events::EventOptions,
    pub limits: keel_protocol::limits::Limits,
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
            default_runtime: file
                .default_runtime
                .unwrap_or_else(|| DEFAULT_RUNTIME.into()),
            access: file
                .allowed_uids
                .iter()
                // Root is always an admin; listing it here was always harmless.
                .filter(|&&uid| uid != 0)
                .map(|&uid| AccessEntry {
                    uid,
                    role: Role::Admin,
                    namespaces: None,
                })
                .chain(file.access)
                .collect(),
            ingest_max_age: Duration::from_secs(
                file.content.ingest_max_age_secs.unwrap_or(7 * 24 * 3600),
            ),
            events: {
                let d = keel_actors::events::EventOptions::default();
                keel_actors::events::EventOptions {
                    retain: file.events.retain.unwrap_or(d.retain),
                    retain_bytes: file.events.retain_bytes.unwrap_or(d.retain_bytes),
                    subscriber_buffer: file.events.subscriber_buffer.unwrap_or(d.subscriber_buffer),
                    subscriber_buffer_bytes: file
                        .events
                        .subscriber_buffer_bytes
                        .unwrap_or(d.subscriber_buffer_bytes),
                }
            },
            limits: file.limits,
        };
        cfg.limits.check().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            cfg.events.retain_bytes >= keel_protocol::limits::FRAME_BYTES as u64,
            "events.retain_bytes must hold one event of the largest size ({} bytes)",
            keel_protocol::limits::FRAME_BYTES
        );
        anyhow::ensure!(
            cfg.events.subscriber_buffer_bytes > 0,
            "events.subscriber_buffer_bytes must be at least 1"
        );
        let mut seen = std::collections::HashSet::new();
        for a in &cfg.access {
            anyhow::ensure!(
                a.uid != 0,
                "access: uid 0 is always an admin; remove its entry"
            );
            anyhow::ensure!(
                seen.insert(a.uid),
                "access: uid {} is listed twice (allowed_uids counts as an admin entry)",
                a.uid
            );
            for ns in a.namespaces.iter().flatten() {
                keel_protocol::identifiers::validate("access.namespaces", ns)
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
            }
        }
        anyhow::ensure!(cfg.events.retain > 0, "events.retain must be at least 1");
        anyhow::ensure!(
            cfg.events.subscriber_buffer > 0,
            "events.subscriber_buffer must be at least 1"
        );
        // Its binary is looked for when a container is created, as containerd does.
        keel_actors::shim::resolve_runtime(&cfg.default_runtime)
            .or_else(|e| match e {
                keel_actors::Error::NotFound(_) => Ok(Default::default()),
                e => Err(e),
            })
            .map_err(|e| anyhow::anyhow!("default_runtime: {e}"))?;
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
        assert_eq!(
            c.access,
            vec![AccessEntry {
                uid: 1000,
                role: Role::Admin,
                namespaces: None
            }]
        );
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.ingest_max_age, Duration::from_secs(60));
        assert_eq!(c.events.retain, 500);
        assert_eq!(
            c.events.subscriber_buffer, 16_384,
            "default where the file is silent"
        );
    }

    #[test]
    fn access_entries_and_limits_are_read_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("keel.toml");
        let load = |text: &str| {
            std::fs::write(&f, text).unwrap();
            Config::load(&Flags::parse_from([
                "keeld",
                "--config",
                f.to_str().unwrap(),
            ]))
        };
        let c = load(
            "allowed_uids = [1000]\n[[access]]\nuid = 1001\nrole = \"reader\"\nnamespaces = [\"prod\"]\n[limits]\nwriters = 4\n",
        )
        .unwrap();
        assert_eq!(c.access.len(), 2);
        assert_eq!(c.access[1].role, Role::Reader);
        assert_eq!(
            c.access[1].namespaces.as_deref(),
            Some(&["prod".to_string()][..])
        );
        assert_eq!(c.limits.writers, 4);
        assert_eq!(
            c.limits.connections,
            keel_protocol::limits::Limits::default().connections
        );
        for (text, want) in [
            ("[[access]]\nuid = 0\nrole = \"admin\"\n", "uid 0"),
            (
                "allowed_uids = [7]\n[[access]]\nuid = 7\nrole = \"reader\"\n",
                "twice",
            ),
            ("[[access]]\nuid = 7\nrole = \"root\"\n", "parse config"),
            (
                "[[access]]\nuid = 7\nrole = \"reader\"\nnamespaces = [\"../x\"]\n",
                "namespaces",
            ),
            ("[limits]\nwriters = 0\n", "limits.writers"),
            ("[limits]\nwriterz = 1\n", "parse config"),
            ("[events]\nretain_bytes = 10\n", "retain_bytes"),
        ] {
            let e = format!("{:#}", load(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn the_documented_config_is_the_defaults() {
        let f = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keel.toml");
        let c = Config::load(&Flags::parse_from([
            "keeld",
            "--config",
            f.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(c.limits, keel_protocol::limits::Limits::default());
        let d = keel_actors::events::EventOptions::default();
        assert_eq!(
            (
                c.events.retain,
                c.events.retain_bytes,
                c.events.subscriber_buffer,
                c.events.subscriber_buffer_bytes
            ),
            (
                d.retain,
                d.retain_bytes,
                d.subscriber_buffer,
                d.subscriber_buffer_bytes
            )
        );
        assert!(c.access.is_empty());
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

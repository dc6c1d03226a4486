//! Fault injection, for tests only: compiled in with the `faults` feature, which no
//! release build enables (`deploy/run.sh` and the benchmarks build without it).
//!
//! `KEEL_FAULTS`, read once, is a comma-separated list of `SITE=ACTION`. Sites are
//! named where they are checked: `task:<id>:<Message>` (a task actor's message),
//! `monitor:<Message>`, `storage:<Message>` (the storage actor), `exchange:flusher`
//! (the event flusher's loop) and `log:flush` (the event log's flush). Actions:
//!
//! - `panic`: panic there, once;
//! - `panic-always`: panic every time;
//! - `stall:MS`: hold the actor (not the thread) for MS milliseconds, once;
//! - `fail`, `fail-always`: make the operation return an error.
//!
//! `@N` after a once-only action fires it at the site's Nth hit instead of its first
//! (`storage:Write=panic@20`: the twentieth write).

use std::time::Duration;

/// What a site is told to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Panic,
    Stall(Duration),
    Fail,
}

#[cfg(feature = "faults")]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::OnceLock;

    use super::Fault;

    struct Rule {
        site: String,
        fault: Fault,
        always: bool,
        /// Fires at this hit (1-based).
        at: u64,
        hits: AtomicU64,
        spent: AtomicBool,
    }

    fn rules() -> &'static [Rule] {
        static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
        RULES.get_or_init(|| {
            let spec = std::env::var("KEEL_FAULTS").unwrap_or_default();
            spec.split(',')
                .filter(|r| !r.trim().is_empty())
                .filter_map(|r| {
                    let (site, action) = r.trim().split_once('=')?;
                    let (action, at) = match action.split_once('@') {
                        Some((a, n)) => (a, n.parse().ok()?),
                        None => (action, 1),
                    };
                    let (fault, always) = match action {
                        "panic" => (Fault::Panic, false),
                        "panic-always" => (Fault::Panic, true),
                        "fail" => (Fault::Fail, false),
                        "fail-always" => (Fault::Fail, true),
                        a => {
                            let ms = a.strip_prefix("stall:")?.parse().ok()?;
                            (Fault::Stall(std::time::Duration::from_millis(ms)), false)
                        }
                    };
                    Some(Rule {
                        site: site.to_string(),
                        fault,
                        always,
                        at,
                        hits: AtomicU64::new(0),
                        spent: AtomicBool::new(false),
                    })
                })
                .collect()
        })
    }

    pub fn check(site: &str) -> Option<Fault> {
        let rule = rules().iter().find(|r| r.site == site)?;
        let hit = rule.hits.fetch_add(1, Ordering::Relaxed) + 1;
        if !rule.always && (hit < rule.at || rule.spent.swap(true, Ordering::Relaxed)) {
            return None;
        }
        if rule.fault == Fault::Panic {
            panic!("fault injected at {site}");
        }
        tracing::warn!(site, fault = ?rule.fault, "fault injected");
        Some(rule.fault)
    }
}

/// Checks site `site`: panics there if told to, else returns what the caller must
/// do (stall, or fail). Always `None` without the `faults` feature.
#[cfg(feature = "faults")]
pub fn check(site: &str) -> Option<Fault> {
    imp::check(site)
}

/// Checks site `site`: panics there if told to, else returns what the caller must
/// do (stall, or fail). Always `None` without the `faults` feature.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub fn check(_site: &str) -> Option<Fault> {
    None
}

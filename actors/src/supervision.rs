//! Supervision: what happens when a part of keeld fails.
//!
//! keeld is built with unwinding: a panic unwinds the task (or thread) it happened
//! on, not the process. Every actor carries a [`Lifeline`], which reports the
//! actor's end, with the cause the panic hook recorded on its thread, when the
//! actor is dropped. (actix runs an actor's `stopped()` even when a panic ended it,
//! so only the end itself tells.) Whoever reads the report knows which ends are
//! ordinary (a deleted task, a daemon shutting down) and ignores those; any other
//! is a failure, for the actor's [`Supervisor`], which applies its strategy:
//!
//! - **one-for-one**: the failed child alone is restarted (task actors, each on
//!   its own; the monitor);
//! - **escalate**: the failure goes up to the root supervisor, which restarts the
//!   part as a whole or, past its own limits, exits so that systemd restarts keeld
//!   and the restore path brings every task back (the storage actor, the event
//!   exchange's flusher).
//!
//! Each supervisor restarts at most `max` times in `within`; one more failure in
//! that window escalates. Restarts are logged with their cause and counted in
//! [`SupervisionStats`], which the API shows (`keelctl debug supervision`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

thread_local! {
    /// The last panic on this thread, as the panic hook saw it.
    static LAST_PANIC: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Installs keeld's panic hook: every panic is logged (with its location) and
/// remembered on its thread, so that the lifeline of the actor it unwinds can name
/// the cause.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string());
        let cause = match info.location() {
            Some(l) => format!("{message} at {}:{}", l.file(), l.line()),
            None => message,
        };
        tracing::error!(cause = %cause, thread = ?std::thread::current().name(), "panic");
        LAST_PANIC.with(|p| *p.borrow_mut() = Some(cause));
    }));
}

/// The cause of the last panic on this thread, taken.
pub fn take_panic_cause() -> Option<String> {
    LAST_PANIC.with(|p| p.borrow_mut().take())
}

/// Turns a caught panic's payload into its cause, preferring what the hook recorded.
pub fn panic_cause(payload: &(dyn std::any::Any + Send)) -> String {
    take_panic_cause().unwrap_or_else(|| {
        payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".to_string())
    })
}

/// A death report: which child, and why.
#[derive(Debug, Clone)]
pub struct Death<K> {
    pub child: K,
    pub cause: String,
}

/// Carried by an actor; reports its end when dropped. See the module doc.
#[derive(Debug)]
pub struct Lifeline<K: Send + 'static> {
    /// `Option` only so that Drop can move it out.
    child: Option<K>,
    tx: mpsc::UnboundedSender<Death<K>>,
}

impl<K: Send + 'static> Lifeline<K> {
    pub fn new(child: K, tx: mpsc::UnboundedSender<Death<K>>) -> Self {
        Self {
            child: Some(child),
            tx,
        }
    }
}

impl<K: Send + 'static> Drop for Lifeline<K> {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            let cause = take_panic_cause().unwrap_or_else(|| "it stopped".into());
            let _ = self.tx.send(Death { child, cause });
        }
    }
}

/// How a supervisor treats a child that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Restart the failed child alone.
    OneForOne,
    /// Hand the failure to the root supervisor.
    Escalate,
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Strategy::OneForOne => "one-for-one",
            Strategy::Escalate => "escalate",
        })
    }
}

/// At most `max` restarts within `within`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub max: u32,
    pub within: Duration,
}

/// What a supervisor decided about a failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Restart the child (the `n`th restart within the window).
    Restart,
    /// Past the intensity: escalate to the supervisor's parent.
    Escalate,
}

/// One supervisor's record, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildStats {
    pub strategy: Strategy,
    pub intensity: Intensity,
    pub restarts: u64,
    pub escalations: u64,
    pub last_cause: String,
    pub last_failure: Option<SystemTime>,
}

/// Every supervisor's record, by name. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct SupervisionStats(Arc<Mutex<BTreeMap<String, ChildStats>>>);

impl SupervisionStats {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<String, ChildStats>) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A copy of every record.
    pub fn snapshot(&self) -> BTreeMap<String, ChildStats> {
        self.with(|m| m.clone())
    }
}

/// A supervisor: a strategy, an intensity and a record. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    recent: Arc<Mutex<VecDeque<Instant>>>,
    stats: SupervisionStats,
}

impl Supervisor {
    pub fn new(
        name: &str,
        strategy: Strategy,
        intensity: Intensity,
        stats: &SupervisionStats,
    ) -> Self {
        stats.with(|m| {
            m.entry(name.to_string()).or_insert(ChildStats {
                strategy,
                intensity,
                restarts: 0,
                escalations: 0,
                last_cause: String::new(),
                last_failure: None,
            });
        });
        Self {
            name: name.to_string(),
            strategy,
            intensity,
            recent: Arc::default(),
            stats: stats.clone(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The same supervisor (name, strategy, intensity, record) with a restart
    /// window of its own: for one child of many supervised one-for-one.
    pub fn for_child(&self) -> Self {
        Self {
            recent: Arc::default(),
            ..self.clone()
        }
    }

    /// Child `child` failed with `cause`: logs it, counts it, and decides.
    pub fn failed(&self, child: &str, cause: &str) -> Decision {
        let now = Instant::now();
        let decision = if self.strategy == Strategy::Escalate {
            Decision::Escalate
        } else {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            while recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > self.intensity.within)
            {
                recent.pop_front();
            }
            if recent.len() >= self.intensity.max as usize {
                Decision::Escalate
            } else {
                recent.push_back(now);
                Decision::Restart
            }
        };
        self.stats.with(|m| {
            if let Some(s) = m.get_mut(&self.name) {
                match decision {
                    Decision::Restart => s.restarts += 1,
                    Decision::Escalate => s.escalations += 1,
                }
                s.last_cause = format!("{child}: {cause}");
                s.last_failure = Some(SystemTime::now());
            }
        });
        match decision {
            Decision::Restart => tracing::error!(
                supervisor = %self.name,
                child,
                cause,
                "restarting a failed child"
            ),
            Decision::Escalate => tracing::error!(
                supervisor = %self.name,
                child,
                cause,
                max = self.intensity.max,
                within = ?self.intensity.within,
                "escalating a failure"
            ),
        }
        decision
    }
}

/// The address of a supervised actor, which its supervisor replaces with the
/// address of the actor it brings back after a failure. Callers that find the
/// actor gone wait (a while) for the next one.
#[derive(Debug)]
pub struct Revivable<A: actix::Actor> {
    /// `None` only until the first actor is started.
    addr: Mutex<Option<actix::Addr<A>>>,
    generation: tokio::sync::watch::Sender<u64>,
}

impl<A: actix::Actor> Default for Revivable<A> {
    fn default() -> Self {
        Self {
            addr: Mutex::new(None),
            generation: tokio::sync::watch::Sender::new(0),
        }
    }
}

impl<A: actix::Actor> Revivable<A> {
    /// An actor was started at `addr` (the first, or one brought back): whoever
    /// waits for one is woken.
    pub fn started(&self, addr: actix::Addr<A>) {
        *self.addr.lock().unwrap_or_else(|p| p.into_inner()) = Some(addr);
        self.generation.send_modify(|g| *g += 1);
    }

    /// The current actor's address.
    pub fn addr(&self) -> Option<actix::Addr<A>> {
        self.addr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// How many actors were started.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Waits at most `wait` for an actor newer than generation `seen`.
    pub async fn next_life(&self, seen: u64, wait: Duration) -> bool {
        let mut rx = self.generation.subscribe();
        tokio::time::timeout(wait, rx.wait_for(|g| *g > seen))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// The current actor's address if it is running; if not, the next one's, once
    /// it is back (within `wait`).
    pub async fn live(&self, wait: Duration) -> Option<actix::Addr<A>> {
        let seen = self.generation();
        match self.addr() {
            Some(a) if a.connected() => Some(a),
            _ if self.next_life(seen, wait).await => self.addr(),
            _ => None,
        }
    }
}

/// A failure handed to the root supervisor.
#[derive(Debug, Clone)]
pub struct Escalation {
    /// The supervisor that escalated (`storage`, `exchange`, `tasks`…).
    pub from: String,
    pub cause: String,
}

/// Where escalations go: the root supervisor's inbox.
pub type Escalations = mpsc::UnboundedSender<Escalation>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intensity_allows_max_restarts_within_the_window_then_escalates() {
        let stats = SupervisionStats::default();
        let s = Supervisor::new(
            "t",
            Strategy::OneForOne,
            Intensity {
                max: 2,
                within: Duration::from_secs(60),
            },
            &stats,
        );
        assert_eq!(s.failed("a", "x"), Decision::Restart);
        assert_eq!(s.failed("a", "y"), Decision::Restart);
        assert_eq!(s.failed("a", "z"), Decision::Escalate);
        let r = &stats.snapshot()["t"];
        assert_eq!((r.restarts, r.escalations), (2, 1));
        assert_eq!(r.last_cause, "a: z");
        let e = Supervisor::new(
            "e",
            Strategy::Escalate,
            Intensity {
                max: 9,
                within: Duration::from_secs(1),
            },
            &stats,
        );
        assert_eq!(e.failed("b", "c"), Decision::Escalate);
    }

    #[tokio::test]
    async fn a_lifeline_reports_the_panic_that_ended_its_holder() {
        install_panic_hook();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let line = Lifeline::new("doomed", tx);
        let died = tokio::spawn(async move {
            let _line = line;
            panic!("on purpose");
        })
        .await;
        assert!(died.unwrap_err().is_panic());
        let d = rx.recv().await.unwrap();
        assert_eq!(d.child, "doomed");
        assert!(d.cause.contains("on purpose"), "{}", d.cause);
        let _ = std::panic::take_hook();
    }
}

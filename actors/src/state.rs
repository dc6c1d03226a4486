//! The task lifecycle as an explicit state machine. Every request a task can get is
//! checked here first; an illegal one is FailedPrecondition naming the current state.
//!
//! ```text
//! Created ──start──▶ Running ──pause──▶ Pausing ──▶ Paused ──resume──▶ Running
//!    │                  │                                 │
//!    └──── exit / kill ─┴──────────────▶ Stopped ◀────────┘
//! Unknown: not reconciled with its shim yet (after a restart); only delete --force.
//! ```

use std::fmt;

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskState {
    Created,
    Running,
    Pausing,
    Paused,
    Stopped,
    Unknown,
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Pausing => "pausing",
            TaskState::Paused => "paused",
            TaskState::Stopped => "stopped",
            TaskState::Unknown => "unknown",
        })
    }
}

impl TaskState {
    fn refuse(self, id: &str, what: &str) -> Error {
        Error::FailedPrecondition(format!("cannot {what} task {id}: it is {self}"))
    }

    pub fn can_start(self, id: &str) -> Result<()> {
        match self {
            TaskState::Created => Ok(()),
            s => Err(s.refuse(id, "start")),
        }
    }

    /// Signals go to live processes only.
    pub fn can_kill(self, id: &str) -> Result<()> {
        match self {
            TaskState::Created | TaskState::Running | TaskState::Pausing | TaskState::Paused => {
                Ok(())
            }
            s => Err(s.refuse(id, "kill")),
        }
    }

    /// Without force only a task that is not running may be deleted.
    pub fn can_delete(self, id: &str, force: bool) -> Result<()> {
        match self {
            TaskState::Created | TaskState::Stopped => Ok(()),
            _ if force => Ok(()),
            s => Err(Error::FailedPrecondition(format!(
                "cannot delete task {id}: it is {s}; stop it first or delete with force"
            ))),
        }
    }

    pub fn can_pause(self, id: &str) -> Result<()> {
        match self {
            TaskState::Running => Ok(()),
            s => Err(s.refuse(id, "pause")),
        }
    }

    pub fn can_resume(self, id: &str) -> Result<()> {
        match self {
            TaskState::Paused => Ok(()),
            s => Err(s.refuse(id, "resume")),
        }
    }

    /// Limits can change, and statistics be read, while the task has processes.
    pub fn can_update(self, id: &str) -> Result<()> {
        match self {
            TaskState::Created | TaskState::Running | TaskState::Pausing | TaskState::Paused => {
                Ok(())
            }
            s => Err(s.refuse(id, "update")),
        }
    }

    pub fn can_exec(self, id: &str) -> Result<()> {
        match self {
            TaskState::Running => Ok(()),
            s => Err(s.refuse(id, "exec in")),
        }
    }

    pub fn can_checkpoint(self, id: &str) -> Result<()> {
        match self {
            TaskState::Running | TaskState::Paused => Ok(()),
            s => Err(s.refuse(id, "checkpoint")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::TaskState::*;
    use super::*;

    #[test]
    fn guards_table() {
        type Guard = fn(TaskState) -> bool;
        let table: &[(&str, Guard, &[TaskState])] = &[
            ("start", |s| s.can_start("t").is_ok(), &[Created]),
            (
                "kill",
                |s| s.can_kill("t").is_ok(),
                &[Created, Running, Pausing, Paused],
            ),
            (
                "delete",
                |s| s.can_delete("t", false).is_ok(),
                &[Created, Stopped],
            ),
            (
                "delete -f",
                |s| s.can_delete("t", true).is_ok(),
                &[Created, Running, Pausing, Paused, Stopped, Unknown],
            ),
            ("pause", |s| s.can_pause("t").is_ok(), &[Running]),
            ("resume", |s| s.can_resume("t").is_ok(), &[Paused]),
            ("exec", |s| s.can_exec("t").is_ok(), &[Running]),
            (
                "update",
                |s| s.can_update("t").is_ok(),
                &[Created, Running, Pausing, Paused],
            ),
            (
                "checkpoint",
                |s| s.can_checkpoint("t").is_ok(),
                &[Running, Paused],
            ),
        ];
        for (name, guard, allowed) in table {
            for s in [Created, Running, Pausing, Paused, Stopped, Unknown] {
                assert_eq!(guard(s), allowed.contains(&s), "{name} in {s}");
            }
        }
    }

    #[test]
    fn refusals_name_the_state() {
        let e = Running.can_start("web").unwrap_err();
        assert!(
            matches!(&e, Error::FailedPrecondition(m) if m.contains("web") && m.contains("running")),
            "{e}"
        );
        let e = Running.can_delete("web", false).unwrap_err();
        assert!(e.to_string().contains("force"), "{e}");
    }
}

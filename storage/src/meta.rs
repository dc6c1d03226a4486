//! Metadata of containers, tasks, exec processes and exits in sled, per namespace.
//!
//! Keys are `namespace NUL id` (plus `NUL exec-id` for exec processes and exits), so
//! a namespace's records, and a task's exec processes, are one prefix scan.
//!
//! Mutations other than [`Meta::put_task`] do not flush: each is followed by a durable
//! event (`/containers/*`, `/tasks/*`) whose flush, in the same database, makes both
//! the change and its event durable before either is acknowledged. A caller that
//! publishes no event calls [`Meta::flush`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Error, Result};

/// A container: what `Containers.Create` stored. The spec is OCI JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerRecord {
    pub id: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub runtime: String,
    /// Runtime options as a protobuf `Any` (type URL, value).
    pub runtime_options: Option<(String, Vec<u8>)>,
    pub spec: Vec<u8>,
    pub rootfs: Vec<MountRecord>,
    pub created_ns: u64,
    pub updated_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRecord {
    pub kind: String,
    pub source: String,
    pub target: String,
    pub options: Vec<String>,
}

/// A task's durable facts: enough to find and reconnect to its shim after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: String,
    pub bundle: String,
    /// `unix:///run/containerd/s/<hash>`, recorded before the task is reported created.
    pub shim_address: String,
    pub shim_pid: u32,
    pub pid: u32,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
    /// Per-task log file of a detached task, if any.
    pub log_path: Option<String>,
    pub created_ns: u64,
    /// Set once the task has been started.
    pub started: bool,
    /// The runtime it runs under: the shim path its Create named
    /// (`runtime_path`), else its container's runtime (so that a restore need not
    /// read the container's record); absent in records from before it was kept here.
    #[serde(default)]
    pub runtime: Option<String>,
    /// The task API version its shim serves (2, or 3 when its `start` said so).
    #[serde(default = "task_api_v2")]
    pub task_api: u32,
    /// Its own rootfs mounts, given at Create instead of its container's.
    #[serde(default)]
    pub rootfs: Option<Vec<MountRecord>>,
    /// The runtime options it was created with (type URL, value), as given: its
    /// own, or its container's. Absent when none were given.
    #[serde(default)]
    pub runtime_options: Option<(String, Vec<u8>)>,
}

fn task_api_v2() -> u32 {
    2
}

/// An exec process's durable facts: enough to watch it again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub exec_id: String,
    /// 0 until it is started.
    pub pid: u32,
    pub started: bool,
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// An exit, recorded before it is published and used to publish it only once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub container_id: String,
    /// Exec id; empty for the init process.
    pub exec_id: String,
    pub pid: u32,
    pub exit_status: u32,
    pub exited_ns: u64,
    /// Sequence number of the `/tasks/exit` event that published it (0 if unknown).
    #[serde(default)]
    pub seq: u64,
}

pub fn nanos(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()).unwrap_or(u64::MAX)
}

pub fn from_nanos(n: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(n)
}

fn key(parts: &[&str]) -> Vec<u8> {
    parts.join("\0").into_bytes()
}

/// The metadata database (containers, tasks, exits).
#[derive(Debug, Clone)]
pub struct Meta {
    db: crate::durable::Db,
    containers: sled::Tree,
    tasks: sled::Tree,
    execs: sled::Tree,
    exits: sled::Tree,
}

impl Meta {
    pub fn open(db: crate::durable::Db) -> Result<Self> {
        Ok(Self {
            containers: db.open_tree("containers")?,
            tasks: db.open_tree("tasks")?,
            execs: db.open_tree("execs")?,
            exits: db.open_tree("exits")?,
            db,
        })
    }

    /// Writes every change so far to disk (fsync).
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    fn get<T: DeserializeOwned>(tree: &sled::Tree, k: &[u8], what: &str) -> Result<Option<T>> {
        match tree.get(k)? {
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| Error::Corrupt(format!("{what}: {e}"))),
            None => Ok(None),
        }
    }

    fn list<T: DeserializeOwned>(tree: &sled::Tree, ns: &str, what: &str) -> Result<Vec<T>> {
        tree.scan_prefix(format!("{ns}\0").as_bytes())
            .map(|item| {
                let (_, v) = item?;
                serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
            })
            .collect()
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, k: Vec<u8>, v: &T) -> Result<()> {
        tree.insert(k, serde_json::to_vec(v).expect("record serialises"))?;
        Ok(())
    }

    /// Namespaces that hold containers or tasks.
    pub fn namespaces(&self) -> Result<Vec<String>> {
        let mut out = std::collections::BTreeSet::new();
        for tree in [&self.containers, &self.tasks] {
            for item in tree.iter().keys() {
                let k = item?;
                if let Some(ns) = k.split(|b| *b == 0).next() {
                    out.insert(String::from_utf8_lossy(ns).to_string());
                }
            }
        }
        Ok(out.into_iter().collect())
    }

    pub fn container(&self, ns: &str, id: &str) -> Result<Option<ContainerRecord>> {
        Self::get(&self.containers, &key(&[ns, id]), "container")
    }

    /// Whether container `id` has a record (without reading it).
    pub fn has_container(&self, ns: &str, id: &str) -> Result<bool> {
        Ok(self.containers.contains_key(key(&[ns, id]))?)
    }

    pub fn containers(&self, ns: &str) -> Result<Vec<ContainerRecord>> {
        Self::list(&self.containers, ns, "container")
    }

    /// Stores a new container; AlreadyExists if the id is taken.
    pub fn create_container(&self, ns: &str, c: &ContainerRecord) -> Result<()> {
        let v = serde_json::to_vec(c).expect("record serialises");
        let k = key(&[ns, &c.id]);
        match self
            .containers
            .compare_and_swap(k, None as Option<&[u8]>, Some(v))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(Error::AlreadyExists(format!(
                "container {} already exists in namespace {ns}",
                c.id
            ))),
        }
    }

    /// Replaces container `old` with `new`, unless it changed or went meanwhile
    /// (NotFound when it is gone, FailedPrecondition when another update won).
    pub fn update_container(
        &self,
        ns: &str,
        old: &ContainerRecord,
        new: &ContainerRecord,
    ) -> Result<()> {
        let was = serde_json::to_vec(old).expect("record serialises");
        let now = serde_json::to_vec(new).expect("record serialises");
        match self
            .containers
            .compare_and_swap(key(&[ns, &new.id]), Some(was), Some(now))?
        {
            Ok(()) => Ok(()),
            Err(e) if e.current.is_none() => Err(Error::NotFound(format!(
                "container {} not found in namespace {ns}",
                new.id
            ))),
            Err(_) => Err(Error::FailedPrecondition(format!(
                "container {} was changed by another request meanwhile; read it again",
                new.id
            ))),
        }
    }

    pub fn delete_container(&self, ns: &str, id: &str) -> Result<bool> {
        Ok(self.containers.remove(key(&[ns, id]))?.is_some())
    }

    pub fn task(&self, ns: &str, id: &str) -> Result<Option<TaskRecord>> {
        Self::get(&self.tasks, &key(&[ns, id]), "task")
    }

    /// Whether task `id` has a record (without reading it).
    pub fn has_task(&self, ns: &str, id: &str) -> Result<bool> {
        Ok(self.tasks.contains_key(key(&[ns, id]))?)
    }

    pub fn tasks(&self, ns: &str) -> Result<Vec<TaskRecord>> {
        Self::list(&self.tasks, ns, "task")
    }

    /// Stores a task record and flushes: the record that makes a task findable after
    /// a crash is on disk before its shim is asked to create anything.
    pub fn put_task(&self, ns: &str, t: &TaskRecord) -> Result<()> {
        self.put(&self.tasks, key(&[ns, &t.id]), t)?;
        self.flush()
    }

    /// Updates a task record without waiting for it to reach the disk (the next flush
    /// takes it). Only for facts that a restore can also read back from the shim (its
    /// pid, whether it started), never for the record that makes a task findable.
    pub fn update_task_lazily(&self, ns: &str, t: &TaskRecord) -> Result<()> {
        self.put(&self.tasks, key(&[ns, &t.id]), t)
    }

    /// Removes a task, its exec processes and its exit records.
    pub fn delete_task(&self, ns: &str, id: &str) -> Result<()> {
        self.tasks.remove(key(&[ns, id]))?;
        let prefix = key(&[ns, id, ""]);
        for tree in [&self.execs, &self.exits] {
            for k in tree.scan_prefix(&prefix).keys() {
                tree.remove(k?)?;
            }
        }
        Ok(())
    }

    /// Stores an exec process of task `id` (added, or started).
    pub fn put_exec(&self, ns: &str, id: &str, e: &ExecRecord) -> Result<()> {
        self.put(&self.execs, key(&[ns, id, &e.exec_id]), e)
    }

    pub fn exec(&self, ns: &str, id: &str, exec_id: &str) -> Result<Option<ExecRecord>> {
        Self::get(&self.execs, &key(&[ns, id, exec_id]), "exec")
    }

    /// Task `id`'s exec processes.
    pub fn execs(&self, ns: &str, id: &str) -> Result<Vec<ExecRecord>> {
        self.execs
            .scan_prefix(key(&[ns, id, ""]))
            .values()
            .map(|v| serde_json::from_slice(&v?).map_err(|e| Error::Corrupt(format!("exec: {e}"))))
            .collect()
    }

    /// Forgets a deleted exec process and its exit, so its exec id can be used again.
    pub fn delete_exec(&self, ns: &str, id: &str, exec_id: &str) -> Result<()> {
        self.execs.remove(key(&[ns, id, exec_id]))?;
        self.exits.remove(key(&[ns, id, exec_id]))?;
        Ok(())
    }

    /// Records an exit unless one is already recorded for that process; returns
    /// whether this call recorded it (and so whether the caller should publish it).
    pub fn record_exit(&self, ns: &str, e: &ExitRecord) -> Result<bool> {
        let v = serde_json::to_vec(e).expect("record serialises");
        let k = key(&[ns, &e.container_id, &e.exec_id]);
        Ok(self
            .exits
            .compare_and_swap(k, None as Option<&[u8]>, Some(v))?
            .is_ok())
    }

    pub fn exit(&self, ns: &str, container_id: &str, exec_id: &str) -> Result<Option<ExitRecord>> {
        Self::get(&self.exits, &key(&[ns, container_id, exec_id]), "exit")
    }

    /// Stores an exit record, replacing any recorded for that process.
    pub fn put_exit(&self, ns: &str, e: &ExitRecord) -> Result<()> {
        self.put(&self.exits, key(&[ns, &e.container_id, &e.exec_id]), e)
    }

    /// Every recorded exit, with its namespace.
    pub fn all_exits(&self) -> Result<Vec<(String, ExitRecord)>> {
        self.exits
            .iter()
            .map(|item| {
                let (k, v) = item?;
                let ns = k.split(|b| *b == 0).next().unwrap_or_default();
                let e =
                    serde_json::from_slice(&v).map_err(|e| Error::Corrupt(format!("exit: {e}")))?;
                Ok((String::from_utf8_lossy(ns).to_string(), e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(crate::open_db(dir.path()).unwrap()).unwrap();
        (dir, m)
    }

    fn container(id: &str) -> ContainerRecord {
        ContainerRecord {
            id: id.into(),
            labels: Default::default(),
            runtime: "io.containerd.runc.v2".into(),
            runtime_options: None,
            spec: b"{}".to_vec(),
            rootfs: vec![],
            created_ns: 1,
            updated_ns: 1,
        }
    }

    #[test]
    fn containers_are_per_namespace_and_unique() {
        let (_d, m) = meta();
        m.create_container("a", &container("x")).unwrap();
        m.create_container("b", &container("x")).unwrap();
        assert!(matches!(
            m.create_container("a", &container("x")),
            Err(Error::AlreadyExists(_))
        ));
        assert_eq!(m.containers("a").unwrap().len(), 1);
        assert_eq!(
            m.namespaces().unwrap(),
            vec!["a".to_string(), "b".to_string()]
        );
        assert!(m.delete_container("a", "x").unwrap());
        assert!(m.container("a", "x").unwrap().is_none());
        assert!(m.container("b", "x").unwrap().is_some());
    }

    #[test]
    fn an_exit_is_recorded_once() {
        let (_d, m) = meta();
        let e = ExitRecord {
            container_id: "t".into(),
            exec_id: String::new(),
            pid: 9,
            exit_status: 137,
            exited_ns: 5,
            seq: 3,
        };
        assert!(m.record_exit("ns", &e).unwrap());
        let again = ExitRecord {
            exit_status: 0,
            ..e.clone()
        };
        assert!(
            !m.record_exit("ns", &again).unwrap(),
            "second report of the same exit is a duplicate"
        );
        assert_eq!(m.exit("ns", "t", "").unwrap().unwrap().exit_status, 137);
        assert_eq!(m.all_exits().unwrap(), vec![("ns".to_string(), e.clone())]);
        m.put_exit(
            "ns",
            &ExitRecord {
                seq: 4,
                ..e.clone()
            },
        )
        .unwrap();
        assert_eq!(m.exit("ns", "t", "").unwrap().unwrap().seq, 4);
        m.delete_task("ns", "t").unwrap();
        assert!(m.exit("ns", "t", "").unwrap().is_none());
    }

    #[test]
    fn exec_records_belong_to_their_task() {
        let (_d, m) = meta();
        let exec = |exec_id: &str| ExecRecord {
            exec_id: exec_id.into(),
            pid: 7,
            started: true,
            stdin: String::new(),
            stdout: "/fifo".into(),
            stderr: String::new(),
            terminal: false,
        };
        m.put_exec("ns", "t", &exec("a")).unwrap();
        m.put_exec("ns", "t", &exec("b")).unwrap();
        m.put_exec("ns", "t2", &exec("a")).unwrap();
        let exit = ExitRecord {
            container_id: "t".into(),
            exec_id: "a".into(),
            pid: 7,
            exit_status: 5,
            exited_ns: 1,
            seq: 2,
        };
        assert!(m.record_exit("ns", &exit).unwrap());
        let ids = |id: &str| -> Vec<String> {
            m.execs("ns", id)
                .unwrap()
                .into_iter()
                .map(|e| e.exec_id)
                .collect()
        };
        assert_eq!(ids("t"), ["a", "b"]);
        assert_eq!(ids("t2"), ["a"]);
        // A deleted exec takes its exit along: the id is free again.
        m.delete_exec("ns", "t", "a").unwrap();
        assert_eq!(ids("t"), ["b"]);
        assert!(m.exit("ns", "t", "a").unwrap().is_none());
        // A deleted task takes its execs along, and only its own.
        m.delete_task("ns", "t").unwrap();
        assert!(ids("t").is_empty());
        assert_eq!(ids("t2"), ["a"]);
    }
}

//! A task's cgroup statistics, decoded from either cgroup version's metrics.

use keel_protocol::types::unpack;
use keel_protocol::{Error, Result};
use protobuf::well_known_types::any::Any;

/// The figures most callers want, from `io.containerd.cgroups.v1.Metrics` or
/// `io.containerd.cgroups.v2.Metrics`; [`Metrics::raw`] keeps the rest.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Metrics {
    /// 1 or 2.
    pub cgroup_version: u8,
    /// Memory in use, bytes.
    pub memory_usage_bytes: u64,
    /// Memory limit, bytes.
    pub memory_limit_bytes: u64,
    /// CPU time used, nanoseconds.
    pub cpu_usage_ns: u64,
    /// Processes now.
    pub pids_current: u64,
    /// Process limit.
    pub pids_limit: u64,
    /// The metrics message as the shim sent it.
    #[serde(skip)]
    pub raw: Any,
}

impl Metrics {
    /// Decodes the shim's cgroup v1 or v2 metrics.
    pub fn decode(any: &Any) -> Result<Self> {
        use keel_protocol::containerd::{cgroups, cgroups_v2};
        if let Ok(m) = unpack::<cgroups::metrics::Metrics>(any) {
            let mem = m.memory.usage.get_or_default();
            return Ok(Self {
                cgroup_version: 1,
                memory_usage_bytes: mem.usage,
                memory_limit_bytes: mem.limit,
                cpu_usage_ns: m.cpu.usage.total,
                pids_current: m.pids.current,
                pids_limit: m.pids.limit,
                raw: any.clone(),
            });
        }
        let m = unpack::<cgroups_v2::metrics::Metrics>(any).map_err(|_| {
            Error::Internal(format!(
                "metrics of type {:?} are not cgroup metrics",
                any.type_url
            ))
        })?;
        Ok(Self {
            cgroup_version: 2,
            memory_usage_bytes: m.memory.usage,
            memory_limit_bytes: m.memory.usage_limit,
            cpu_usage_ns: m.cpu.usage_usec.saturating_mul(1000),
            pids_current: m.pids.current,
            pids_limit: m.pids.limit,
            raw: any.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_protocol::containerd::{cgroups, cgroups_v2};
    use keel_protocol::types::pack;

    #[test]
    fn both_cgroup_versions_decode() {
        let mut v1 = cgroups::metrics::Metrics::new();
        v1.pids.mut_or_insert_default().current = 3;
        v1.memory
            .mut_or_insert_default()
            .usage
            .mut_or_insert_default()
            .usage = 4096;
        let m = Metrics::decode(&pack(&v1).unwrap()).unwrap();
        assert_eq!(
            (m.cgroup_version, m.pids_current, m.memory_usage_bytes),
            (1, 3, 4096)
        );

        let mut v2 = cgroups_v2::metrics::Metrics::new();
        v2.cpu.mut_or_insert_default().usage_usec = 7;
        v2.pids.mut_or_insert_default().limit = 9;
        let m = Metrics::decode(&pack(&v2).unwrap()).unwrap();
        assert_eq!(
            (m.cgroup_version, m.cpu_usage_ns, m.pids_limit),
            (2, 7000, 9)
        );

        let other = Any {
            type_url: "x.Y".into(),
            value: vec![1, 2, 3],
            ..Default::default()
        };
        assert!(Metrics::decode(&other).is_err());
    }
}

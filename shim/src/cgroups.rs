//! A container's cgroup through libcgroups: its processes, its figures as
//! containerd's cgroup metrics (v1, or v2 on a unified host), resource updates,
//! and placing the shim itself (`shim_cgroup`).

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, CgroupSetup,
    ControllerOpt,
};
use libcgroups::stats::Stats;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxResources;
use protobuf::well_known_types::any::Any;
use protobuf::MessageField;

use crate::service::{pack, Error};

fn manager(cgroup_path: &Path) -> Result<AnyCgroupManager, Error> {
    create_cgroup_manager(CgroupConfig {
        cgroup_path: cgroup_path.to_path_buf(),
        systemd_cgroup: false,
        container_name: String::new(),
    })
    .map_err(|e| Error::Internal(format!("cgroup {}: {e}", cgroup_path.display())))
}

/// Moves process `pid` into the cgroup at `path` (created if missing).
pub fn add_process(path: &str, pid: u32) -> Result<(), Error> {
    let pid = i32::try_from(pid).map_err(|_| Error::Internal(format!("pid {pid}")))?;
    manager(Path::new(path))?
        .add_task(Pid::from_raw(pid))
        .map_err(|e| Error::Internal(format!("cgroup {path}: {e}")))
}

/// Where the cgroup hierarchies are mounted.
const ROOT: &str = "/sys/fs/cgroup";

/// Cgroup `path` in each hierarchy of a v1 or hybrid host (every directory
/// under [`ROOT`]: the controllers, named ones such as `name=systemd`, and the
/// unified one); none on a cgroup v2 host, where libcontainer's is the only one.
fn v1_dirs(path: &Path) -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.procs").exists() {
        return Vec::new();
    }
    let rel = path.strip_prefix("/").unwrap_or(path);
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    entries
        .flatten()
        // cpu, cpuacct… are links to their co-mounted hierarchy.
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().join(rel))
        .collect()
}

/// The freezer cgroup of `path`: where Pause freezes it (and CRIU, given it,
/// freezes the tree it dumps).
pub fn freezer(path: &Path) -> PathBuf {
    let rel = path.strip_prefix("/").unwrap_or(path);
    let v1 = Path::new(ROOT).join("freezer");
    if v1.is_dir() {
        v1.join(rel)
    } else {
        Path::new(ROOT).join(rel)
    }
}

/// Puts process `pid` in cgroup `path` of every hierarchy of a v1 or hybrid
/// host, those libcontainer leaves it out of too (named ones such as
/// `name=systemd`, and the unified one), as runc's cgroupfs driver does. The
/// container's processes are then in a cgroup of their own everywhere, and a
/// checkpoint has CRIU walk that cgroup only, not all of a hierarchy the shim
/// sits at the root of. Nothing to do on a cgroup v2 host.
pub fn join_everywhere(path: &Path, pid: u32) -> Result<(), Error> {
    for dir in v1_dirs(path) {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("cgroup.procs"), pid.to_string()))
            .map_err(|e| Error::Internal(format!("cgroup {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Removes the cgroup `path`, with any cgroups under it, from every hierarchy
/// where it is left empty: a restore has CRIU make it in the named and unified
/// hierarchies of a v1 host too (some nested), which libcontainer does not
/// manage.
pub fn remove_everywhere(path: &Path) {
    for dir in v1_dirs(path) {
        remove_tree(&dir, true);
    }
}

/// rmdir(2) of a cgroup and those under it, deepest first. Only empty cgroups
/// go (rmdir refuses any other); processes killed a moment ago may still be
/// leaving the `top` one, so it is retried for a second when busy.
fn remove_tree(dir: &Path, top: bool) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path(), false);
        }
    }
    for _ in 0..if top { 100 } else { 1 } {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                crate::log::log_warn!("cgroup {} left: {e}", dir.display());
                return;
            }
            _ => return,
        }
    }
    crate::log::log_warn!("cgroup {} left: still busy", dir.display());
}

/// Every process in the cgroup.
pub fn pids(cgroup_path: &Path) -> Result<Vec<i32>, Error> {
    let pids = manager(cgroup_path)?
        .get_all_pids()
        .map_err(|e| Error::Internal(format!("cgroup pids: {e}")))?;
    Ok(pids.into_iter().map(Pid::as_raw).collect())
}

/// Applies new resources to the cgroup.
pub fn update(cgroup_path: &Path, resources: &LinuxResources) -> Result<(), Error> {
    manager(cgroup_path)?
        .apply(&ControllerOpt {
            resources,
            disable_oom_killer: resources
                .memory()
                .as_ref()
                .and_then(|m| m.disable_oom_killer())
                .unwrap_or(false),
            oom_score_adj: None,
            freezer_state: None,
        })
        .map_err(|e| Error::InvalidArgument(format!("resources: {e}")))
}

/// OOM kills in the memory cgroup of process `pid`, as they happen (cgroup v1:
/// an eventfd registered on `memory.oom_control`). `None` where there is no v1
/// memory controller.
#[derive(Debug)]
pub struct OomWatch {
    eventfd: tokio::io::unix::AsyncFd<OwnedFd>,
    pub kills: std::sync::Arc<OomKills>,
}

/// The memory cgroup's OOM kill counter, and how many of its kills were told.
#[derive(Debug)]
pub struct OomKills {
    oom_control: PathBuf,
    told: std::sync::atomic::AtomicU64,
}

impl OomKills {
    /// Whether there were kills not told yet (now told); `None` once the cgroup
    /// is gone.
    pub fn new_kills(&self) -> Option<bool> {
        let kills = oom_kills(&self.oom_control)?;
        let told = self.told.swap(kills, std::sync::atomic::Ordering::Relaxed);
        Some(kills > told)
    }
}

impl OomWatch {
    pub fn new(pid: i32) -> Result<Option<Self>, Error> {
        let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .map_err(|e| Error::Internal(format!("cgroup of {pid}: {e}")))?;
        let Some(rel) = own.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        }) else {
            return Ok(None);
        };
        let dir = Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
        let oom_control = dir.join("memory.oom_control");
        let err = |e: &dyn std::fmt::Display| {
            Error::Internal(format!("OOM events of {}: {e}", dir.display()))
        };
        let control = std::fs::File::open(&oom_control).map_err(|e| err(&e))?;
        // SAFETY: eventfd with flags only; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(err(&std::io::Error::last_os_error()));
        }
        // SAFETY: a descriptor the kernel just returned, owned by nothing else.
        let eventfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        std::fs::write(
            dir.join("cgroup.event_control"),
            format!("{} {}", eventfd.as_raw_fd(), control.as_raw_fd()),
        )
        .map_err(|e| err(&e))?;
        let kills = oom_kills(&oom_control).unwrap_or(0);
        // SAFETY: the AsyncFd owns the eventfd, open as long as it.
        let eventfd =
            unsafe { tokio::io::unix::AsyncFd::register(eventfd) }.map_err(|e| err(&e))?;
        Ok(Some(Self {
            eventfd,
            kills: std::sync::Arc::new(OomKills {
                oom_control,
                told: kills.into(),
            }),
        }))
    }

    /// Waits for the next OOM kill; `None` once the cgroup is gone.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            let mut buf = [0u8; 8];
            let r = self
                .eventfd
                .async_io(tokio::io::Interest::READABLE, |fd| {
                    nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from)
                })
                .await;
            r.ok()?;
            // The eventfd also fires when the cgroup is removed: count kills.
            if self.kills.new_kills()? {
                return Some(());
            }
        }
    }
}

fn oom_kills(oom_control: &Path) -> Option<u64> {
    std::fs::read_to_string(oom_control)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
}

/// The cgroup's figures, packed as containerd packs them.
pub fn metrics(cgroup_path: &Path) -> Result<Any, Error> {
    let stats = manager(cgroup_path)?
        .stats()
        .map_err(|e| Error::Internal(format!("cgroup stats: {e}")))?;
    let unified = matches!(
        libcgroups::common::get_cgroup_setup(),
        Ok(CgroupSetup::Unified)
    );
    if unified {
        pack(&to_v2(&stats))
    } else {
        pack(&to_v1(&stats))
    }
}

/// Nanoseconds in one clock tick (USER_HZ).
fn ns_per_tick() -> u64 {
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    1_000_000_000 / u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

fn to_v1(s: &Stats) -> v1::Metrics {
    let entry = |d: &libcgroups::stats::MemoryData| v1::MemoryEntry {
        limit: d.limit,
        usage: d.usage,
        max: d.max_usage,
        failcnt: d.fail_count,
        ..Default::default()
    };
    let stat = |k: &str| s.memory.stats.get(k).copied().unwrap_or(0);
    let memory = v1::MemoryStat {
        cache: s.memory.cache,
        rss: stat("rss"),
        rss_huge: stat("rss_huge"),
        mapped_file: stat("mapped_file"),
        dirty: stat("dirty"),
        writeback: stat("writeback"),
        pg_pg_in: stat("pgpgin"),
        pg_pg_out: stat("pgpgout"),
        pg_fault: stat("pgfault"),
        pg_maj_fault: stat("pgmajfault"),
        inactive_anon: stat("inactive_anon"),
        active_anon: stat("active_anon"),
        inactive_file: stat("inactive_file"),
        active_file: stat("active_file"),
        unevictable: stat("unevictable"),
        hierarchical_memory_limit: stat("hierarchical_memory_limit"),
        hierarchical_swap_limit: stat("hierarchical_memsw_limit"),
        total_cache: stat("total_cache"),
        total_rss: stat("total_rss"),
        total_rss_huge: stat("total_rss_huge"),
        total_mapped_file: stat("total_mapped_file"),
        total_dirty: stat("total_dirty"),
        total_writeback: stat("total_writeback"),
        total_pg_pg_in: stat("total_pgpgin"),
        total_pg_pg_out: stat("total_pgpgout"),
        total_pg_fault: stat("total_pgfault"),
        total_pg_maj_fault: stat("total_pgmajfault"),
        total_inactive_anon: stat("total_inactive_anon"),
        total_active_anon: stat("total_active_anon"),
        total_inactive_file: stat("total_inactive_file"),
        total_active_file: stat("total_active_file"),
        total_unevictable: stat("total_unevictable"),
        usage: MessageField::some(entry(&s.memory.memory)),
        swap: MessageField::some(entry(&s.memory.memswap)),
        kernel: MessageField::some(entry(&s.memory.kernel)),
        kernel_tcp: MessageField::some(entry(&s.memory.kernel_tcp)),
        ..Default::default()
    };
    let u = &s.cpu.usage;
    let cpu = v1::CPUStat {
        usage: MessageField::some(v1::CPUUsage {
            total: u.usage_total,
            // cpuacct.stat counts in clock ticks; containerd's figures are ns.
            kernel: u.usage_kernel.saturating_mul(ns_per_tick()),
            user: u.usage_user.saturating_mul(ns_per_tick()),
            per_cpu: u.per_core_usage_total.clone(),
            ..Default::default()
        }),
        throttling: MessageField::some(v1::Throttle {
            periods: s.cpu.throttling.periods,
            throttled_periods: s.cpu.throttling.throttled_periods,
            throttled_time: s.cpu.throttling.throttled_time,
            ..Default::default()
        }),
        ..Default::default()
    };
    let blk = |list: &[libcgroups::stats::BlkioDeviceStat]| -> Vec<v1::BlkIOEntry> {
        list.iter()
            .map(|d| v1::BlkIOEntry {
                op: d.op_type.clone().unwrap_or_default(),
                major: d.major,
                minor: d.minor,
                value: d.value,
                ..Default::default()
            })
            .collect()
    };
    let b = &s.blkio;
    v1::Metrics {
        hugetlb: s
            .hugetlb
            .iter()
            .map(|(size, h)| v1::HugetlbStat {
                usage: h.usage,
                max: h.max_usage,
                failcnt: h.fail_count,
                pagesize: size.clone(),
                ..Default::default()
            })
            .collect(),
        pids: MessageField::some(v1::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(cpu),
        memory: MessageField::some(memory),
        blkio: MessageField::some(v1::BlkIOStat {
            io_service_bytes_recursive: blk(&b.service_bytes),
            io_serviced_recursive: blk(&b.serviced),
            io_queued_recursive: blk(&b.queued),
            io_service_time_recursive: blk(&b.service_time),
            io_wait_time_recursive: blk(&b.wait_time),
            io_merged_recursive: blk(&b.merged),
            io_time_recursive: blk(&b.time),
            sectors_recursive: blk(&b.sectors),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn to_v2(s: &Stats) -> v2::Metrics {
    let stat = |k: &str| s.memory.stats.get(k).copied().unwrap_or(0);
    let u = &s.cpu.usage;
    v2::Metrics {
        pids: MessageField::some(v2::PidsStat {
            current: s.pids.current,
            limit: s.pids.limit,
            ..Default::default()
        }),
        cpu: MessageField::some(v2::CPUStat {
            // cgroup v2's cpu.stat is in µs, as libcgroups reads it.
            usage_usec: u.usage_total,
            user_usec: u.usage_user,
            system_usec: u.usage_kernel,
            nr_periods: s.cpu.throttling.periods,
            nr_throttled: s.cpu.throttling.throttled_periods,
            throttled_usec: s.cpu.throttling.throttled_time,
            ..Default::default()
        }),
        memory: MessageField::some(v2::MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            usage: s.memory.memory.usage,
            usage_limit: s.memory.memory.limit,
            swap_usage: s.memory.memswap.usage,
            swap_limit: s.memory.memswap.limit,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_land_in_containerds_fields() {
        let mut s = Stats::default();
        s.memory.memory.usage = 4096;
        s.memory.memory.limit = 1 << 20;
        s.memory.stats.insert("total_rss".into(), 77);
        s.cpu.usage.usage_total = 5_000_000;
        s.cpu.usage.usage_user = 3;
        s.pids.current = 3;
        s.pids.limit = 10;
        let m = to_v1(&s);
        assert_eq!(
            (m.memory.usage.usage, m.memory.usage.limit),
            (4096, 1 << 20)
        );
        assert_eq!(m.memory.total_rss, 77);
        assert_eq!(m.cpu.usage.total, 5_000_000);
        assert_eq!(m.cpu.usage.user, 3 * ns_per_tick(), "ticks become ns");
        assert_eq!((m.pids.current, m.pids.limit), (3, 10));
        let m = to_v2(&s);
        assert_eq!((m.memory.usage, m.memory.usage_limit), (4096, 1 << 20));
        assert_eq!(m.cpu.usage_usec, 5_000_000, "v2 figures are µs already");
        let any = pack(&to_v1(&s)).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v1.Metrics");
    }
}

//! The guard against CVE-2019-5736: a container process must not be able to
//! rewrite the shim's binary through `/proc/<pid>/exe`.
//!
//! Every process that enters a container is forked from the shim, so until it
//! executes the container's program its `/proc/<pid>/exe` is the shim's binary;
//! a program whose `#!` line names `/proc/self/exe` even runs that binary inside
//! the container, where it can be opened and, once nothing executes it, written.
//!
//! runc and youki copy their binary into a sealed memfd and re-execute that. A
//! long-running shim per task would then keep its own copy of its binary in
//! memory: megabytes per task. The keel shim instead is executed from a
//! read-only bind mount of its binary over itself, made in a mount namespace of
//! its own: `/proc/<pid>/exe` of the shim and of everything forked from it leads
//! to a read-only mount, and opening it for writing fails with EROFS.
//!
//! That namespace is left again at once: the shim goes back to the mount
//! namespace it was started in ([`return_home`]) before it does anything else.
//! Its binary stays mapped from the read-only mount (detached when the private
//! namespace goes), and no copy of the host's mounts outlives the start; a shim
//! kept in a namespace of its own would pin every mount the host had when it
//! started, so that unmounting one later on the host would not end it. The cost
//! is a namespace and two mounts at start, no memory.
//!
//! The namespace to go back to is passed to the shim as fd [`HOME_FD`], named by
//! the environment variable [`HOME_ENV`].

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What the forked child needs, prepared before the fork (no allocation after).
#[derive(Debug)]
pub struct Guard {
    exe: CString,
}

impl Guard {
    pub fn new(exe: &Path) -> std::io::Result<Self> {
        let exe = CString::new(exe.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        Ok(Self { exe })
    }

    /// In the child, between fork and exec: its mount namespace kept open as
    /// [`HOME_FD`], then a namespace of its own with its binary read-only over
    /// itself.
    ///
    /// # Safety
    /// Only async-signal-safe calls: for `Command::pre_exec`.
    pub unsafe fn apply(&self) -> std::io::Result<()> {
        let none = std::ptr::null::<libc::c_char>();
        let root = c"/".as_ptr();
        // SAFETY: plain syscalls on valid C strings prepared before the fork.
        unsafe {
            let home = libc::open(c"/proc/self/ns/mnt".as_ptr(), libc::O_RDONLY);
            if home < 0 || libc::dup2(home, HOME_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(home);
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    none,
                    root,
                    none,
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    self.exe.as_ptr(),
                    self.exe.as_ptr(),
                    none,
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
                || libc::mount(
                    none,
                    self.exe.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The descriptor of the mount namespace the shim returns to.
pub const HOME_FD: i32 = 4;
/// Set (to [`HOME_FD`]) when the shim was started through the guard.
pub const HOME_ENV: &str = "KEEL_SHIM_HOME_MNT_NS";

/// In the shim, first thing (single-threaded): back to the mount namespace it
/// was started in, and to its working directory there.
pub fn return_home() -> std::io::Result<()> {
    if std::env::var_os(HOME_ENV).is_none() {
        return Ok(());
    }
    // SAFETY: removing a variable before any other thread exists.
    unsafe { std::env::remove_var(HOME_ENV) };
    let cwd = std::env::current_dir()?;
    // SAFETY: HOME_FD was opened for this process by `apply`; setns and close on it.
    unsafe {
        let joined = libc::setns(HOME_FD, libc::CLONE_NEWNS);
        let err = std::io::Error::last_os_error();
        libc::close(HOME_FD);
        if joined != 0 {
            return Err(err);
        }
    }
    std::env::set_current_dir(cwd)
}

/// Whether this process's binary is on a read-only mount (the guard holds).
pub fn holds() -> bool {
    nix::sys::statvfs::statvfs("/proc/self/exe")
        .map(|s| s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY))
        .unwrap_or(false)
}

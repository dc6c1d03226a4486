//! The filesystem: a pass-through to a backing tree that holds back, until an
//! fsync makes them durable, every written byte ([`Overlay`]) and every
//! directory entry change ([`Namespace`]). [`State::power_off`] drops them.
//!
//! A control file, `.powercut` in the root (not listed, not in the backing
//! tree), takes commands: `arm N` cuts the power right after the N-th fsync
//! from now (that fsync is durable; its caller is killed with SIGKILL before it
//! hears back, and every request after it fails with EIO), `cut` cuts it now.
//! Reading it tells the fsync count and whether the power is cut. Every fsync
//! and the cut are written to the log, one line each.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, FUSE_ROOT_ID,
};

use crate::namespace::Namespace;
use crate::overlay::Overlay;

const TTL: Duration = Duration::from_secs(1);
pub const CONTROL_NAME: &str = ".powercut";
const CONTROL_INO: u64 = u64::MAX - 1;
const CONTROL_FH: u64 = u64::MAX - 1;

#[derive(Debug)]
struct Handle {
    file: File,
    append: bool,
}

/// Everything the filesystem holds; shared with `main`, which cuts the power
/// once the session ends.
#[derive(Debug)]
pub struct State {
    data: PathBuf,
    /// Our inode number → the backing path (absolute; in the trash once removed).
    paths: HashMap<u64, PathBuf>,
    inos: HashMap<PathBuf, u64>,
    next_ino: u64,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
    dirty: HashMap<u64, Overlay>,
    namespace: Namespace,
    fsyncs: u64,
    armed: Option<u64>,
    cut: bool,
    log: Option<File>,
}

#[derive(Debug, Clone)]
pub struct PowerCut(pub Arc<Mutex<State>>);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

fn kind(m: &fs::Metadata) -> FileType {
    let t = m.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    }
}

fn time(secs: i64, nanos: i64) -> SystemTime {
    let nanos = u32::try_from(nanos).unwrap_or(0);
    match u64::try_from(secs) {
        Ok(s) => UNIX_EPOCH + Duration::new(s, nanos),
        Err(_) => UNIX_EPOCH,
    }
}

fn attr(ino: u64, m: &fs::Metadata, size: Option<u64>) -> FileAttr {
    FileAttr {
        ino,
        size: size.unwrap_or(m.size()),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: UNIX_EPOCH,
        kind: kind(m),
        perm: u16::try_from(m.mode() & 0o7777).unwrap_or(0o600),
        nlink: u32::try_from(m.nlink()).unwrap_or(1),
        uid: m.uid(),
        gid: m.gid(),
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn control_attr() -> FileAttr {
    FileAttr {
        ino: CONTROL_INO,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0o600,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// What a power cut dropped.
#[derive(Debug, Default)]
pub struct Dropped {
    pub files: usize,
    pub bytes: u64,
    pub entries: usize,
}

impl State {
    /// A filesystem showing `store/data`, removed entries waiting in
    /// `store/trash`, fsyncs and the cut logged to `log`.
    pub fn new(store: &Path, log: Option<File>) -> io::Result<Self> {
        let data = store.join("data");
        fs::create_dir_all(&data)?;
        let namespace = Namespace::new(store.join("trash"))?;
        let mut s = Self {
            data: data.clone(),
            paths: HashMap::new(),
            inos: HashMap::new(),
            next_ino: FUSE_ROOT_ID + 1,
            handles: HashMap::new(),
            next_fh: 1,
            dirty: HashMap::new(),
            namespace,
            fsyncs: 0,
            armed: None,
            cut: false,
            log,
        };
        s.paths.insert(FUSE_ROOT_ID, data.clone());
        s.inos.insert(data, FUSE_ROOT_ID);
        Ok(s)
    }

    fn log(&mut self, line: &str) {
        if let Some(f) = self.log.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }

    fn relative(&self, path: &Path) -> String {
        match path.strip_prefix(&self.data) {
            Ok(p) if p.as_os_str().is_empty() => ".".into(),
            Ok(p) => p.display().to_string(),
            Err(_) => format!("(removed) {}", path.display()),
        }
    }

    fn path(&self, ino: u64) -> Result<PathBuf, i32> {
        self.paths.get(&ino).cloned().ok_or(libc::ESTALE)
    }

    fn child(&self, parent: u64, name: &OsStr) -> Result<PathBuf, i32> {
        Ok(self.path(parent)?.join(name))
    }

    fn ino_for(&mut self, path: &Path) -> u64 {
        if let Some(ino) = self.inos.get(path) {
            return *ino;
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        self.paths.insert(ino, path.to_path_buf());
        self.inos.insert(path.to_path_buf(), ino);
        ino
    }

    /// `path`'s entry moved to `to` (a rename, or a remove into the trash):
    /// the inode keeps its number, and so does everything under it.
    fn moved(&mut self, path: &Path, to: &Path) {
        let under: Vec<(PathBuf, u64)> = self
            .inos
            .iter()
            .filter(|(p, _)| p.starts_with(path))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, ino) in under {
            self.inos.remove(&p);
            let rest = p.strip_prefix(path).expect("filtered above");
            let new = if rest.as_os_str().is_empty() {
                to.to_path_buf()
            } else {
                to.join(rest)
            };
            self.paths.insert(ino, new.clone());
            self.inos.insert(new, ino);
        }
    }

    fn getattr(&mut self, ino: u64) -> Result<FileAttr, i32> {
        if ino == CONTROL_INO {
            return Ok(control_attr());
        }
        let path = self.path(ino)?;
        let m = fs::symlink_metadata(&path).map_err(|e| errno(&e))?;
        Ok(attr(ino, &m, self.dirty.get(&ino).map(Overlay::size)))
    }

    fn entry(&mut self, path: &Path) -> Result<FileAttr, i32> {
        let m = fs::symlink_metadata(path).map_err(|e| errno(&e))?;
        let ino = self.ino_for(path);
        Ok(attr(ino, &m, self.dirty.get(&ino).map(Overlay::size)))
    }

    fn overlay(&mut self, ino: u64, file: &File) -> Result<&mut Overlay, i32> {
        match self.dirty.entry(ino) {
            Entry::Occupied(o) => Ok(o.into_mut()),
            Entry::Vacant(v) => {
                let len = file.metadata().map_err(|e| errno(&e))?.len();
                Ok(v.insert(Overlay::new(len)))
            }
        }
    }

    /// A new handle on `ino`'s backing `file`, opened with `flags`; O_TRUNC
    /// empties the file (in the overlay) when `truncates`.
    fn open_handle(
        &mut self,
        ino: u64,
        file: File,
        flags: i32,
        truncates: bool,
    ) -> Result<u64, i32> {
        if truncates && flags & libc::O_TRUNC != 0 {
            self.overlay(ino, &file)?.truncate(0);
        }
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                file,
                append: flags & libc::O_APPEND != 0,
            },
        );
        Ok(fh)
    }

    /// A file's held bytes made durable (through any handle: fsync on a file
    /// opened read-only flushes what other handles wrote).
    fn sync_file(&mut self, ino: u64) -> Result<(), i32> {
        if let Some(o) = self.dirty.remove(&ino) {
            let path = self.path(ino)?;
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| errno(&e))?;
            o.flush(&file).map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    /// Counts an fsync that has just been made durable; if it is the one the
    /// control file armed, cuts the power and kills its caller.
    fn fsynced(&mut self, what: &str, ino: u64, pid: u32) -> Result<(), i32> {
        self.fsyncs += 1;
        let path = self
            .path(ino)
            .map(|p| self.relative(&p))
            .unwrap_or_default();
        let n = self.fsyncs;
        self.log(&format!("fsync {n} {what} {path}"));
        if let Some(left) = self.armed.as_mut() {
            *left -= 1;
            if *left == 0 {
                self.armed = None;
                self.cut = true;
                self.log(&format!("cut after fsync {n} {what} {path}"));
                if let Ok(pid) = i32::try_from(pid) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(libc::EIO);
            }
        }
        Ok(())
    }

    fn control(&mut self, command: &str) -> Result<(), i32> {
        let mut words = command.split_whitespace();
        match (words.next(), words.next().map(str::parse::<u64>)) {
            (Some("arm"), Some(Ok(n))) if n > 0 => {
                self.armed = Some(n);
                self.log(&format!("armed: cut after {n} more fsyncs"));
            }
            (Some("cut"), None) => {
                self.cut = true;
                self.log(&format!("cut after fsync {} (on command)", self.fsyncs));
            }
            _ => return Err(libc::EINVAL),
        }
        Ok(())
    }

    fn status(&self) -> String {
        format!(
            "fsyncs {}\nheld {} bytes in {} files, {} directory entry changes\narmed {}\ncut {}\n",
            self.fsyncs,
            self.dirty.values().map(Overlay::held).sum::<u64>(),
            self.dirty.len(),
            self.namespace.pending(),
            self.armed.map_or("no".into(), |n| n.to_string()),
            self.cut
        )
    }

    /// The power cut: every byte and directory entry not made durable is lost.
    pub fn power_off(&mut self) -> io::Result<Dropped> {
        let files = self.dirty.len();
        let bytes = self.dirty.values().map(Overlay::held).sum();
        self.dirty.clear();
        self.handles.clear();
        let entries = self.namespace.power_off()?;
        let dropped = Dropped {
            files,
            bytes,
            entries,
        };
        self.log(&format!(
            "power off: dropped {} bytes in {} files and {} directory entry changes",
            dropped.bytes, dropped.files, dropped.entries
        ));
        Ok(dropped)
    }
}

macro_rules! cut_guard {
    ($s:expr, $reply:expr) => {
        if $s.cut {
            $reply.error(libc::EIO);
            return;
        }
    };
}

impl PowerCut {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Filesystem for PowerCut {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut s = self.state();
        if parent == FUSE_ROOT_ID && name == CONTROL_NAME {
            return reply.entry(&TTL, &control_attr(), 0);
        }
        match s.child(parent, name).and_then(|p| s.entry(&p)) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.state().getattr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.state();
        if ino == CONTROL_INO {
            return reply.attr(&TTL, &control_attr());
        }
        cut_guard!(s, reply);
        let r = (|| -> Result<FileAttr, i32> {
            let path = s.path(ino)?;
            let io = |e: io::Error| errno(&e);
            if let Some(mode) = mode {
                fs::set_permissions(&path, fs::Permissions::from_mode(mode & 0o7777))
                    .map_err(io)?;
            }
            if uid.is_some() || gid.is_some() {
                std::os::unix::fs::lchown(&path, uid, gid).map_err(io)?;
            }
            if let Some(len) = size {
                let file = OpenOptions::new().read(true).open(&path).map_err(io)?;
                s.overlay(ino, &file)?.truncate(len);
            }
            if atime.is_some() || mtime.is_some() {
                let t = |t: Option<TimeOrNow>| match t {
                    None => nix::sys::time::TimeSpec::new(0, libc::UTIME_OMIT),
                    Some(TimeOrNow::Now) => nix::sys::time::TimeSpec::new(0, libc::UTIME_NOW),
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        nix::sys::time::TimeSpec::from_duration(d)
                    }
                };
                nix::sys::stat::utimensat(
                    None,
                    &path,
                    &t(atime),
                    &t(mtime),
                    nix::sys::stat::UtimensatFlags::NoFollowSymlink,
                )
                .map_err(|e| e as i32)?;
            }
            s.getattr(ino)
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&mut self, _req: &Request<'_>, ino: u64, reply: ReplyData) {
        let s = self.state();
        match s
            .path(ino)
            .and_then(|p| fs::read_link(p).map_err(|e| errno(&e)))
        {
            Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        cut_guard!(s, reply);
        let r = (|| -> Result<FileAttr, i32> {
            let path = s.child(parent, name)?;
            fs::DirBuilder::new()
                .mode(mode & !umask & 0o7777)
                .create(&path)
                .map_err(|e| errno(&e))?;
            s.namespace.created(parent, &path);
            s.entry(&path)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply)
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply)
    }

    fn symlink(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut s = self.state();
        cut_guard!(s, reply);
        let r = (|| -> Result<FileAttr, i32> {
            let path = s.child(parent, link_name)?;
            std::os::unix::fs::symlink(target, &path).map_err(|e| errno(&e))?;
            s.namespace.created(parent, &path);
            s.entry(&path)
        })();
        match r {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        cut_guard!(s, reply);
        if flags != 0 {
            // RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT: not modelled.
            return reply.error(libc::EINVAL);
        }
        let r = (|| -> Result<(), i32> {
            let from = s.child(parent, name)?;
            let to = s.child(newparent, newname)?;
            let replaced = s
                .namespace
                .rename(newparent, &from, &to)
                .map_err(|e| errno(&e))?;
            if let Some(trash) = replaced {
                s.moved(&to, &trash);
            }
            s.moved(&from, &to);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut s = self.state();
        if ino == CONTROL_INO {
            return reply.opened(CONTROL_FH, fuser::consts::FOPEN_DIRECT_IO);
        }
        let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
        if writes {
            cut_guard!(s, reply);
        }
        let r = (|| -> Result<u64, i32> {
            let path = s.path(ino)?;
            let file = OpenOptions::new()
                .read(true)
                .write(writes)
                .open(&path)
                .map_err(|e| errno(&e))?;
            s.open_handle(ino, file, flags, writes)
        })();
        match r {
            Ok(fh) => reply.opened(fh, 0),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let s = self.state();
        if fh == CONTROL_FH {
            let status = s.status();
            let from = usize::try_from(offset).unwrap_or(0).min(status.len());
            let to = status.len().min(from + size as usize);
            return reply.data(&status.as_bytes()[from..to]);
        }
        let Some(h) = s.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let offset = u64::try_from(offset).unwrap_or(0);
        let r = match s.dirty.get(&ino) {
            Some(o) => o.read(&h.file, offset, u64::from(size)),
            None => {
                let mut buf = vec![0u8; size as usize];
                h.file.read_at(&mut buf, offset).map(|n| {
                    buf.truncate(n);
                    buf
                })
            }
        };
        match r {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.state();
        if fh == CONTROL_FH {
            let r = std::str::from_utf8(data)
                .map_err(|_| libc::EINVAL)
                .and_then(|c| s.control(c.trim()));
            return match r {
                Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
                Err(e) => reply.error(e),
            };
        }
        cut_guard!(s, reply);
        let Some(h) = s.handles.get(&fh) else {
            return reply.error(libc::EBADF);
        };
        let (file, append) = match h.file.try_clone() {
            Ok(f) => (f, h.append),
            Err(e) => return reply.error(errno(&e)),
        };
        let r = s.overlay(ino, &file).map(|o| {
            let at = if append {
                o.size()
            } else {
                u64::try_from(offset).unwrap_or(0)
            };
            o.write(at, data);
        });
        match r {
            Ok(()) => reply.written(u32::try_from(data.len()).unwrap_or(u32::MAX)),
            Err(e) => reply.error(e),
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        // close(2): nothing becomes durable.
        reply.ok();
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().handles.remove(&fh);
        reply.ok();
    }

    fn fsync(&mut self, req: &Request<'_>, ino: u64, fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        cut_guard!(s, reply);
        let r = (|| -> Result<(), i32> {
            if !s.handles.contains_key(&fh) {
                return Err(libc::EBADF);
            }
            s.sync_file(ino)?;
            s.fsynced("file", ino, req.pid())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        reply.opened(0, 0);
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let mut s = self.state();
        let r = (|| -> Result<Vec<(u64, FileType, std::ffi::OsString)>, i32> {
            let path = s.path(ino)?;
            let mut all = vec![
                (ino, FileType::Directory, ".".into()),
                (FUSE_ROOT_ID, FileType::Directory, "..".into()),
            ];
            let mut names: Vec<(std::ffi::OsString, FileType)> = Vec::new();
            for e in fs::read_dir(&path).map_err(|e| errno(&e))? {
                let e = e.map_err(|e| errno(&e))?;
                let m = e.metadata().map_err(|e| errno(&e))?;
                names.push((e.file_name(), kind(&m)));
            }
            names.sort_by(|a, b| a.0.cmp(&b.0));
            for (name, k) in names {
                let child = s.ino_for(&path.join(&name));
                all.push((child, k, name));
            }
            Ok(all)
        })();
        match r {
            Ok(all) => {
                let skip = usize::try_from(offset).unwrap_or(0);
                for (i, (ino, k, name)) in all.into_iter().enumerate().skip(skip) {
                    let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
                    if reply.add(ino, next, k, name) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(
        &mut self,
        req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.state();
        cut_guard!(s, reply);
        s.namespace.durable(ino);
        match s.fsynced("dir", ino, req.pid()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let s = self.state();
        match nix::sys::statvfs::statvfs(&s.data) {
            Ok(v) => reply.statfs(
                v.blocks(),
                v.blocks_free(),
                v.blocks_available(),
                v.files(),
                v.files_free(),
                u32::try_from(v.block_size()).unwrap_or(4096),
                u32::try_from(v.name_max()).unwrap_or(255),
                u32::try_from(v.fragment_size()).unwrap_or(4096),
            ),
            Err(e) => reply.error(e as i32),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut s = self.state();
        cut_guard!(s, reply);
        let r = (|| -> Result<(FileAttr, u64), i32> {
            let path = s.child(parent, name)?;
            let existed = fs::symlink_metadata(&path).is_ok();
            let mut open = OpenOptions::new();
            open.read(true).write(true).mode(mode & !umask & 0o7777);
            if flags & libc::O_EXCL != 0 {
                open.create_new(true);
            } else {
                open.create(true);
            }
            let file = open.open(&path).map_err(|e| errno(&e))?;
            if !existed {
                s.namespace.created(parent, &path);
            }
            let a = s.entry(&path)?;
            let fh = s.open_handle(a.ino, file, flags, existed)?;
            Ok((s.getattr(a.ino)?, fh))
        })();
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, 0, fh, 0),
            Err(e) => reply.error(e),
        }
    }
}

impl PowerCut {
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let mut s = self.state();
        cut_guard!(s, reply);
        let r = (|| -> Result<(), i32> {
            let path = s.child(parent, name)?;
            let trash = s
                .namespace
                .remove(parent, &path, dir)
                .map_err(|e| errno(&e))?;
            s.moved(&path, &trash);
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }
}

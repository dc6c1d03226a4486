//! Directory entries not yet made durable: what a power cut undoes.
//!
//! Every create, mkdir, symlink, unlink, rmdir and rename is applied to the
//! backing tree at once (so lookups and reads see it) and recorded here with
//! the directory whose fsync makes it durable: the parent of a new or removed
//! entry, the destination directory of a rename. An fsync of that directory
//! drops the record. A power cut undoes the records left, newest first: a new
//! entry is removed, a removed one comes back from the trash (removing only
//! moves an entry there), a rename is moved back and what it replaced restored.
//!
//! An undo applies only to the very inode it recorded (compared by inode
//! number), so a later durable change to the same name is never undone by it.
//! Paths are those at the time of the change: an entry inside a directory that
//! a later, durable rename moved keeps its new place (the model is lenient
//! there; keel renames files, not directories).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
enum Change {
    Created {
        path: PathBuf,
        ino: u64,
    },
    Removed {
        path: PathBuf,
        trash: PathBuf,
        ino: u64,
    },
    Renamed {
        from: PathBuf,
        to: PathBuf,
        ino: u64,
        /// Where the entry it replaced went, and that entry's inode.
        replaced: Option<(PathBuf, u64)>,
    },
}

impl Change {
    /// The inode the change made, moved or renamed, if any.
    fn subject(&self) -> Option<u64> {
        match self {
            Change::Created { ino, .. } | Change::Renamed { ino, .. } => Some(*ino),
            Change::Removed { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Pending {
    /// The directory (by the filesystem's inode number) whose fsync makes the
    /// change durable.
    dir: u64,
    change: Change,
}

#[derive(Debug)]
pub struct Namespace {
    trash: PathBuf,
    next_trash: u64,
    pending: Vec<Pending>,
}

fn ino_of(path: &Path) -> Option<u64> {
    fs::symlink_metadata(path).ok().map(|m| m.ino())
}

fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Namespace {
    /// A namespace whose removed entries wait in `trash` (emptied now: what a
    /// trash holds from an earlier mount was removed durably).
    pub fn new(trash: PathBuf) -> io::Result<Self> {
        remove_any(&trash)?;
        fs::create_dir_all(&trash)?;
        Ok(Self {
            trash,
            next_trash: 0,
            pending: Vec::new(),
        })
    }

    /// Changes a power cut would undo.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    fn trash_path(&mut self) -> PathBuf {
        self.next_trash += 1;
        self.trash.join(self.next_trash.to_string())
    }

    /// Records an entry the caller has just created at `path` in directory `dir`.
    pub fn created(&mut self, dir: u64, path: &Path) {
        if let Some(ino) = ino_of(path) {
            self.pending.push(Pending {
                dir,
                change: Change::Created {
                    path: path.to_path_buf(),
                    ino,
                },
            });
        }
    }

    /// Removes the entry at `path` (an unlink, or an rmdir when `dir_expected`),
    /// keeping it in the trash until it is durable. Returns where it went.
    pub fn remove(&mut self, dir: u64, path: &Path, dir_expected: bool) -> io::Result<PathBuf> {
        let meta = fs::symlink_metadata(path)?;
        match (dir_expected, meta.is_dir()) {
            (true, false) => return Err(errno(libc::ENOTDIR)),
            (false, true) => return Err(errno(libc::EISDIR)),
            (true, true) if fs::read_dir(path)?.next().is_some() => {
                return Err(errno(libc::ENOTEMPTY))
            }
            _ => {}
        }
        let trash = self.trash_path();
        fs::rename(path, &trash)?;
        self.pending.push(Pending {
            dir,
            change: Change::Removed {
                path: path.to_path_buf(),
                trash: trash.clone(),
                ino: meta.ino(),
            },
        });
        Ok(trash)
    }

    /// Renames `from` to `to` (durable with an fsync of `dir`, the destination
    /// directory). Returns where the entry it replaced went, if any.
    pub fn rename(&mut self, dir: u64, from: &Path, to: &Path) -> io::Result<Option<PathBuf>> {
        let moving = fs::symlink_metadata(from)?;
        let mut replaced = None;
        match fs::symlink_metadata(to) {
            Ok(old) if old.ino() == moving.ino() && old.dev() == moving.dev() => return Ok(None),
            Ok(old) => {
                match (moving.is_dir(), old.is_dir()) {
                    (true, false) => return Err(errno(libc::ENOTDIR)),
                    (false, true) => return Err(errno(libc::EISDIR)),
                    (true, true) if fs::read_dir(to)?.next().is_some() => {
                        return Err(errno(libc::ENOTEMPTY))
                    }
                    _ => {}
                }
                let trash = self.trash_path();
                fs::rename(to, &trash)?;
                replaced = Some((trash, old.ino()));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Err(e) = fs::rename(from, to) {
            if let Some((trash, _)) = &replaced {
                let _ = fs::rename(trash, to);
            }
            return Err(e);
        }
        self.pending.push(Pending {
            dir,
            change: Change::Renamed {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                ino: moving.ino(),
                replaced: replaced.clone(),
            },
        });
        Ok(replaced.map(|(trash, _)| trash))
    }

    /// An fsync of directory `dir`: its changes are durable. Returns how many.
    ///
    /// An entry whose removal is now durable is deleted from the trash, and
    /// with it every record of its creation or renames: its inode number may
    /// be reused, and an undo must never mistake the new inode for it.
    pub fn durable(&mut self, dir: u64) -> usize {
        let before = self.pending.len();
        let mut gone = Vec::new();
        self.pending.retain(|p| {
            if p.dir != dir {
                return true;
            }
            match &p.change {
                Change::Removed { trash, ino, .. } => gone.push((trash.clone(), *ino)),
                Change::Renamed {
                    replaced: Some((trash, ino)),
                    ..
                } => gone.push((trash.clone(), *ino)),
                _ => {}
            }
            false
        });
        let made_durable = before - self.pending.len();
        for (trash, ino) in gone {
            let _ = remove_any(&trash);
            self.pending.retain(|p| p.change.subject() != Some(ino));
        }
        made_durable
    }

    /// The power cut: every change not made durable is undone, newest first,
    /// and the trash emptied. Returns how many changes were undone.
    pub fn power_off(&mut self) -> io::Result<usize> {
        let undone = self.pending.len();
        while let Some(p) = self.pending.pop() {
            match p.change {
                Change::Created { path, ino } => {
                    if ino_of(&path) == Some(ino) {
                        remove_any(&path)?;
                    }
                }
                Change::Removed { path, trash, .. } => {
                    if !exists(&path) && exists(&trash) {
                        fs::rename(&trash, &path)?;
                    }
                }
                Change::Renamed {
                    from,
                    to,
                    ino,
                    replaced,
                } => {
                    if ino_of(&to) == Some(ino) && !exists(&from) {
                        fs::rename(&to, &from)?;
                    }
                    if let Some((trash, _)) = replaced {
                        if !exists(&to) && exists(&trash) {
                            fs::rename(&trash, &to)?;
                        }
                    }
                }
            }
        }
        remove_any(&self.trash)?;
        fs::create_dir_all(&self.trash)?;
        Ok(undone)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u64 = 1;
    const SUB: u64 = 2;

    fn setup() -> (tempfile::TempDir, PathBuf, Namespace) {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        fs::create_dir(&data).unwrap();
        let ns = Namespace::new(dir.path().join("trash")).unwrap();
        (dir, data, ns)
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = walk(dir, dir);
        names.sort();
        names
    }

    fn walk(root: &Path, dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.push(format!("{rel}/"));
                out.extend(walk(root, &p));
            } else {
                out.push(format!("{rel}={}", fs::read_to_string(&p).unwrap()));
            }
        }
        out
    }

    #[test]
    fn changes_not_made_durable_are_undone_newest_first() {
        let (_d, data, mut ns) = setup();
        fs::write(data.join("old"), "old").unwrap();
        fs::write(data.join("kept"), "kept").unwrap();
        // a file created, written and renamed over another, then one removed
        fs::write(data.join("tmp"), "new").unwrap();
        ns.created(ROOT, &data.join("tmp"));
        ns.rename(ROOT, &data.join("tmp"), &data.join("old"))
            .unwrap();
        ns.remove(ROOT, &data.join("kept"), false).unwrap();
        fs::create_dir(data.join("sub")).unwrap();
        ns.created(ROOT, &data.join("sub"));
        fs::write(data.join("sub/f"), "f").unwrap();
        ns.created(SUB, &data.join("sub/f"));
        assert_eq!(listing(&data), ["old=new", "sub/", "sub/f=f"]);
        assert_eq!(ns.power_off().unwrap(), 5);
        assert_eq!(listing(&data), ["kept=kept", "old=old"]);
    }

    #[test]
    fn an_fsync_of_the_directory_makes_its_changes_durable_and_only_its() {
        let (_d, data, mut ns) = setup();
        fs::create_dir(data.join("sub")).unwrap();
        ns.created(ROOT, &data.join("sub"));
        assert_eq!(ns.durable(ROOT), 1);
        fs::write(data.join("sub/a"), "a").unwrap();
        ns.created(SUB, &data.join("sub/a"));
        fs::write(data.join("b"), "b").unwrap();
        ns.created(ROOT, &data.join("b"));
        ns.rename(SUB, &data.join("b"), &data.join("sub/b"))
            .unwrap();
        assert_eq!(ns.durable(SUB), 2);
        assert_eq!(ns.pending(), 1);
        ns.power_off().unwrap();
        // b's creation in the root was never made durable, but its rename into
        // sub was: it stays, where the durable rename put it.
        assert_eq!(listing(&data), ["sub/", "sub/a=a", "sub/b=b"]);
    }

    #[test]
    fn a_durable_remove_is_final_and_an_undone_create_spares_a_later_durable_one() {
        let (d, data, mut ns) = setup();
        fs::write(data.join("x"), "1").unwrap();
        ns.remove(ROOT, &data.join("x"), false).unwrap();
        ns.durable(ROOT);
        assert_eq!(fs::read_dir(d.path().join("trash")).unwrap().count(), 0);
        fs::write(data.join("y"), "first").unwrap();
        ns.created(SUB, &data.join("y"));
        ns.remove(ROOT, &data.join("y"), false).unwrap();
        fs::write(data.join("y"), "second").unwrap();
        ns.created(ROOT, &data.join("y"));
        ns.durable(ROOT);
        ns.power_off().unwrap();
        assert_eq!(listing(&data), ["y=second"]);
    }

    #[test]
    fn rmdir_refuses_a_directory_with_entries_and_rename_checks_kinds() {
        let (_d, data, mut ns) = setup();
        fs::create_dir(data.join("d")).unwrap();
        fs::write(data.join("d/f"), "f").unwrap();
        fs::write(data.join("g"), "g").unwrap();
        let code = |e: io::Error| e.raw_os_error();
        assert_eq!(
            ns.remove(ROOT, &data.join("d"), true)
                .map_err(code)
                .unwrap_err(),
            Some(libc::ENOTEMPTY)
        );
        assert_eq!(
            ns.remove(ROOT, &data.join("g"), true)
                .map_err(code)
                .unwrap_err(),
            Some(libc::ENOTDIR)
        );
        assert_eq!(
            ns.rename(ROOT, &data.join("g"), &data.join("d"))
                .map_err(code)
                .unwrap_err(),
            Some(libc::EISDIR)
        );
        assert_eq!(ns.pending(), 0);
        assert_eq!(listing(&data), ["d/", "d/f=f", "g=g"]);
    }
}

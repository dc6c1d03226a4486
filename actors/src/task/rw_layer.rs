//! A task's filesystem changes as a checkpoint layer (containerd's
//! `WithCheckpointRW`, keelctl `--rw`): the upper directory of its overlay rootfs,
//! packed as a tar in the OCI layer convention and put back into the upper
//! directory of the restored task's overlay.
//!
//! overlayfs marks a deleted lower file with a whiteout (a character device 0/0)
//! and a directory that hides its lower contents with the `trusted.overlay.opaque`
//! attribute; the layer carries them as an empty `.wh.<name>` file and a
//! `.wh..wh..opq` file in the directory, and [`apply`] turns them back into
//! overlayfs' own. Sockets, which a tar cannot hold, are left out (a process
//! restored by CRIU binds its sockets again).
//!
//! A layer comes from the content store, where any client may write, so [`apply`]
//! takes nothing on trust: plain relative paths only, every parent directory
//! inside the upper directory (a symlink unpacked earlier cannot lead out), only
//! files, directories, symlinks, devices and FIFOs, within the checkpoint bounds
//! (`limits.checkpoint_entries`, `limits.checkpoint_bytes`).

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use keel_storage::meta::MountRecord;

use super::checkpoint::{io_err, TarBudget};
use crate::{Error, Result};

/// overlayfs' attribute of an opaque directory.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// A layer entry marking its directory opaque.
const OPAQUE_MARK: &str = ".wh..wh..opq";
/// Prefix of a layer entry marking a deleted name.
const WHITEOUT_PREFIX: &str = ".wh.";

/// The upper directory of a rootfs that is one overlay mount with an absolute
/// `upperdir` (the last one given, as the kernel takes it).
pub(super) fn upper_dir(rootfs: &[MountRecord]) -> Option<PathBuf> {
    match rootfs {
        [m] if m.kind == "overlay" => m
            .options
            .iter()
            .rev()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from)
            .filter(|p| p.is_absolute()),
        _ => None,
    }
}

/// Packs the upper directory `upper` into the layer tar `out`; FailedPrecondition
/// when it holds more than a restore would take (`limits.checkpoint_entries`,
/// `limits.checkpoint_bytes`).
pub(super) fn pack(upper: &Path, out: &Path, limits: &keel_protocol::limits::Limits) -> Result<()> {
    let file = std::fs::File::create(out).map_err(io_err("create", out))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    let mut budget = TarBudget::default();
    pack_dir(&mut tar, upper, Path::new(""), &mut (&mut budget, limits))?;
    let file = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
        .map_err(io_err("write", out))?;
    file.sync_all().map_err(io_err("sync", out))
}

/// Entries and bytes packed so far, and the bounds they must stay within.
type PackBudget<'a> = (&'a mut TarBudget, &'a keel_protocol::limits::Limits);

fn pack_dir<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    upper: &Path,
    rel: &Path,
    budget: &mut PackBudget<'_>,
) -> Result<()> {
    let dir = upper.join(rel);
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .map_err(io_err("read", &dir))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(io_err("read", &dir))?;
    names.sort();
    for name in names {
        let (path, entry) = (dir.join(&name), rel.join(&name));
        let md = std::fs::symlink_metadata(&path).map_err(io_err("stat", &path))?;
        let kind = md.file_type();
        let bytes = if kind.is_file() { md.len() } else { 0 };
        budget.0.count(bytes, budget.1).map_err(|why| {
            Error::FailedPrecondition(format!(
                "rw: {} holds more than a restore takes: {why}",
                upper.display()
            ))
        })?;
        if kind.is_char_device() && md.rdev() == 0 {
            let mut marker = std::ffi::OsString::from(WHITEOUT_PREFIX);
            marker.push(&name);
            empty_file(tar, &rel.join(marker), &md)?;
        } else if kind.is_socket() {
            continue;
        } else if kind.is_dir() {
            tar.append_path_with_name(&path, &entry)
                .map_err(io_err("archive", &path))?;
            let opaque =
                xattr::get(&path, OPAQUE_XATTR).map_err(io_err("read attributes of", &path))?;
            if opaque.as_deref() == Some(b"y") {
                empty_file(tar, &entry.join(OPAQUE_MARK), &md)?;
            }
            pack_dir(tar, upper, &entry, budget)?;
        } else if kind.is_file() || kind.is_symlink() {
            tar.append_path_with_name(&path, &entry)
                .map_err(io_err("archive", &path))?;
        } else {
            // A device or a FIFO: its header says all.
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&md, tar::HeaderMode::Complete);
            header.set_size(0);
            let rdev = md.rdev();
            header.set_entry_type(if kind.is_fifo() {
                tar::EntryType::Fifo
            } else if kind.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            });
            let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
            let too_big = |_| Error::Io(format!("{}: device number too large", path.display()));
            header
                .set_device_major(u32::try_from(major).map_err(too_big)?)
                .and_then(|()| header.set_device_minor(u32::try_from(minor).unwrap_or(u32::MAX)))
                .map_err(io_err("archive", &path))?;
            tar.append_data(&mut header, &entry, std::io::empty())
                .map_err(io_err("archive", &path))?;
        }
    }
    Ok(())
}

/// An empty regular file `name` in the layer, owned as `like` is.
fn empty_file<W: std::io::Write>(
    tar: &mut tar::Builder<W>,
    name: &Path,
    like: &std::fs::Metadata,
) -> Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(0);
    header.set_mode(0o600);
    header.set_uid(u64::from(like.uid()));
    header.set_gid(u64::from(like.gid()));
    header.set_mtime(u64::try_from(like.mtime()).unwrap_or(0));
    tar.append_data(&mut header, name, std::io::empty())
        .map_err(io_err("archive", name))
}

/// Largest GNU long name, long link or PAX header a layer may carry: the tar
/// crate reads these whole into memory.
const MAX_META_ENTRY: u64 = 64 << 10;

/// Puts the layer `tar` back into the upper directory `upper`: its files over
/// what is there, its markers as whiteouts and opaque directories.
/// FailedPrecondition naming the first entry that is not acceptable.
pub(super) fn apply(
    layer: &Path,
    upper: &Path,
    limits: &keel_protocol::limits::Limits,
) -> Result<()> {
    let bad = |why: String| Error::FailedPrecondition(format!("checkpoint rw layer: {why}"));
    let open = || {
        std::fs::File::open(layer)
            .map(std::io::BufReader::new)
            .map_err(io_err("open", layer))
    };
    let root = upper
        .canonicalize()
        .map_err(|e| Error::FailedPrecondition(format!("upperdir {}: {e}", upper.display())))?;
    check_meta_entries(open()?).map_err(bad)?;
    let mut archive = tar::Archive::new(open()?);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    let mut budget = TarBudget::default();
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("not a tar: {e}")))?;
        let path = budget.admit(&entry, limits).map_err(bad)?;
        use tar::EntryType as T;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            T::Regular | T::Directory | T::Symlink | T::Char | T::Block | T::Fifo
        ) {
            return Err(bad(format!("entry {path:?} is a {kind:?}")));
        }
        // The upper directory's own entry ("./"): it stays as it is.
        let Some(name) = path.file_name() else {
            continue;
        };
        let name = name.to_string_lossy();
        // Its directory must be in the upper directory, whatever symlinks earlier
        // entries made.
        let parent = root.join(path.parent().unwrap_or(Path::new("")));
        let inside = parent
            .canonicalize()
            .map(|p| p.starts_with(&root))
            .unwrap_or(false);
        if !inside {
            return Err(bad(format!(
                "entry {path:?} is not inside the upper directory"
            )));
        }
        if name == OPAQUE_MARK {
            xattr::set(&parent, OPAQUE_XATTR, b"y").map_err(io_err("mark opaque", &parent))?;
            continue;
        }
        if let Some(gone) = name.strip_prefix(WHITEOUT_PREFIX) {
            if matches!(gone, "" | "." | "..") {
                return Err(bad(format!("entry {path:?} whites out no name")));
            }
            whiteout(&parent.join(gone))?;
            continue;
        }
        // What is there goes first unless both are directories: nothing is
        // written through a symlink, and no directory's mode is set through one.
        let target = parent.join(name.as_ref());
        match std::fs::symlink_metadata(&target) {
            Ok(md) if md.is_dir() && kind == T::Directory => {}
            Ok(_) => clear(&target)?,
            Err(_) => {}
        }
        if matches!(kind, T::Char | T::Block | T::Fifo) {
            // The tar crate writes these as plain files.
            special(&target, entry.header()).map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        } else {
            entry
                .unpack(&target)
                .map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        }
    }
    Ok(())
}

/// Refuses a tar whose long names, long links or PAX headers are larger than
/// [`MAX_META_ENTRY`], reading it raw (where the tar crate reads none of them
/// into memory).
fn check_meta_entries(tar: impl Read) -> std::result::Result<(), String> {
    let mut archive = tar::Archive::new(tar);
    let entries = archive.entries().map_err(|e| format!("not a tar: {e}"))?;
    for entry in entries.raw(true) {
        let entry = entry.map_err(|e| format!("not a tar: {e}"))?;
        let kind = entry.header().entry_type();
        let meta = kind.is_gnu_longname()
            || kind.is_gnu_longlink()
            || kind.is_pax_local_extensions()
            || kind.is_pax_global_extensions();
        let size = entry.header().size().unwrap_or(u64::MAX);
        if meta && size > MAX_META_ENTRY {
            return Err(format!(
                "a {kind:?} entry of {size} bytes (at most {MAX_META_ENTRY})"
            ));
        }
    }
    Ok(())
}

/// Removes whatever is at `path`.
fn clear(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => std::fs::remove_dir_all(path).map_err(io_err("remove", path)),
        Ok(_) => std::fs::remove_file(path).map_err(io_err("remove", path)),
        Err(_) => Ok(()),
    }
}

/// Replaces whatever is at `path` with an overlayfs whiteout.
fn whiteout(path: &Path) -> Result<()> {
    clear(path)?;
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0))
        .map_err(|e| Error::Io(format!("whiteout {}: {e}", path.display())))
}

/// Makes the device or FIFO `header` describes at `path`, owned and moded as it
/// says.
fn special(path: &Path, header: &tar::Header) -> Result<()> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let field = |what: &str, v: std::io::Result<Option<u32>>| {
        v.map(Option::unwrap_or_default)
            .map_err(|e| Error::FailedPrecondition(format!("its {what}: {e}")))
    };
    let kind = match header.entry_type() {
        tar::EntryType::Char => SFlag::S_IFCHR,
        tar::EntryType::Block => SFlag::S_IFBLK,
        _ => SFlag::S_IFIFO,
    };
    let dev = match kind {
        SFlag::S_IFIFO => 0,
        _ => makedev(
            u64::from(field("device major", header.device_major())?),
            u64::from(field("device minor", header.device_minor())?),
        ),
    };
    let mode = header
        .mode()
        .map_err(|e| Error::FailedPrecondition(format!("its mode: {e}")))?;
    let owner = |v: std::io::Result<u64>| v.ok().and_then(|v| u32::try_from(v).ok());
    clear(path)?;
    mknod(path, kind, Mode::from_bits_truncate(mode), dev)
        .map_err(|e| Error::Io(format!("make {}: {e}", path.display())))?;
    nix::unistd::fchownat(
        None,
        path,
        owner(header.uid()).map(nix::unistd::Uid::from_raw),
        owner(header.gid()).map(nix::unistd::Gid::from_raw),
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .map_err(|e| Error::Io(format!("chown {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn limits() -> keel_protocol::limits::Limits {
        keel_protocol::limits::Limits::default()
    }

    fn mount(kind: &str, options: &[&str]) -> MountRecord {
        MountRecord {
            kind: kind.into(),
            source: kind.into(),
            target: String::new(),
            options: options.iter().map(|o| o.to_string()).collect(),
        }
    }

    #[test]
    fn only_one_overlay_with_an_upper_dir_has_one() {
        let overlay = mount("overlay", &["lowerdir=/l", "upperdir=/u", "workdir=/w"]);
        assert_eq!(
            upper_dir(std::slice::from_ref(&overlay)),
            Some(PathBuf::from("/u"))
        );
        assert_eq!(upper_dir(&[mount("overlay", &["lowerdir=/a:/b"])]), None);
        assert_eq!(upper_dir(&[mount("bind", &["rbind", "rw"])]), None);
        assert_eq!(upper_dir(&[overlay.clone(), overlay]), None);
        assert_eq!(upper_dir(&[]), None);
    }

    #[test]
    fn an_upper_dir_round_trips_with_its_whiteouts_and_opaque_dirs() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "whiteouts and trusted attributes need root (run the tests as root, as CI does)"
        );
        let from = tempfile::tempdir().unwrap();
        let u = from.path();
        std::fs::create_dir_all(u.join("etc/new")).unwrap();
        std::fs::write(u.join("etc/new/file"), b"written in the container").unwrap();
        std::fs::create_dir(u.join("opaque")).unwrap();
        xattr::set(u.join("opaque"), OPAQUE_XATTR, b"y").unwrap();
        symlink("/etc/new/file", u.join("link")).unwrap();
        whiteout(&u.join("deleted")).unwrap();
        nix::unistd::mkfifo(&u.join("fifo"), Mode::from_bits_truncate(0o640)).unwrap();
        let layer = from
            .path()
            .join("..")
            .join(format!("layer-{}.tar", std::process::id()));
        pack(u, &layer, &limits()).unwrap();

        let to = tempfile::tempdir().unwrap();
        let t = to.path();
        // What the layer replaces: a file where its whiteout goes, a stale file.
        std::fs::write(t.join("deleted"), b"stale").unwrap();
        apply(&layer, t, &limits()).unwrap();
        std::fs::remove_file(&layer).unwrap();
        assert_eq!(
            std::fs::read(t.join("etc/new/file")).unwrap(),
            b"written in the container"
        );
        assert_eq!(
            xattr::get(t.join("opaque"), OPAQUE_XATTR)
                .unwrap()
                .as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            std::fs::read_link(t.join("link")).unwrap(),
            Path::new("/etc/new/file")
        );
        let md = std::fs::symlink_metadata(t.join("deleted")).unwrap();
        assert!(md.file_type().is_char_device() && md.rdev() == 0);
        assert!(std::fs::symlink_metadata(t.join("fifo"))
            .unwrap()
            .file_type()
            .is_fifo());
        // No marker is left as a file.
        assert!(!t.join(".wh.deleted").exists() && !t.join("opaque").join(OPAQUE_MARK).exists());
    }

    use nix::sys::stat::Mode;

    fn tar_of(entries: &[(&str, tar::EntryType, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_size(0);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            // Written raw: the crate's setter refuses the hostile paths tested here.
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(l) = link {
                h.set_link_name(l).unwrap();
            }
            h.set_cksum();
            b.append(&h, std::io::empty()).unwrap();
        }
        b.into_inner().unwrap()
    }

    /// Applies `layer` to an upper directory that has a sibling, beside a
    /// directory outside holding one file; asserts nothing but the upper
    /// directory changed, and returns what apply said.
    fn applied_in_a_sandbox(what: &str, layer: &[u8], limits: &Limits) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let base = tempfile::tempdir().unwrap();
        let (upper, outside) = (base.path().join("upper"), base.path().join("outside"));
        for d in [&upper, &outside] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(outside.join("keep"), b"kept").unwrap();
        std::fs::write(base.path().join("sibling"), b"kept").unwrap();
        let tar = base.path().join("layer.tar");
        std::fs::write(&tar, layer).unwrap();
        let applied = apply(&tar, &upper, limits);
        assert!(upper.is_dir(), "{what}: the upper directory is gone");
        assert_eq!(
            std::fs::read(base.path().join("sibling")).ok().as_deref(),
            Some(&b"kept"[..]),
            "{what}: the upper directory's sibling changed"
        );
        let names: Vec<_> = std::fs::read_dir(&outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["keep"], "{what}: something landed outside");
        assert_eq!(
            std::fs::read(outside.join("keep")).unwrap(),
            b"kept",
            "{what}"
        );
        let mode = std::fs::metadata(&outside).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{what}: the mode outside changed");
        applied
    }

    use keel_protocol::limits::Limits;

    #[test]
    fn a_hostile_layer_cannot_reach_outside_the_upper_dir() {
        use tar::EntryType as T;
        // The sandbox's directory outside, as the upper directory sees it.
        let out = "../outside";
        let refused = [
            ("dot-dot", vec![("../outside/x", T::Regular, None)]),
            ("absolute", vec![("/x", T::Regular, None)]),
            ("hard link", vec![("h", T::Link, Some("../outside/keep"))]),
            (
                "file through a symlink",
                vec![("s", T::Symlink, Some(out)), ("s/x", T::Regular, None)],
            ),
            (
                "whiteout through a symlink",
                vec![
                    ("s", T::Symlink, Some(out)),
                    ("s/.wh.keep", T::Regular, None),
                ],
            ),
            ("whiteout of ..", vec![(".wh...", T::Regular, None)]),
            ("whiteout of .", vec![(".wh..", T::Regular, None)]),
            ("whiteout of nothing", vec![(".wh.", T::Regular, None)]),
        ];
        for (what, entries) in refused {
            let err = applied_in_a_sandbox(what, &tar_of(&entries), &limits()).unwrap_err();
            assert!(
                matches!(err, Error::FailedPrecondition(_)),
                "{what}: {err:?}"
            );
        }
        // Taken, but only ever inside: what an earlier symlink stood for is
        // replaced, never followed.
        let absorbed = [
            (
                "a FIFO at a symlink's path with a trailing /.",
                vec![("s", T::Symlink, Some(out)), ("s/.", T::Fifo, None)],
            ),
            (
                "a directory over a symlink",
                vec![("s", T::Symlink, Some(out)), ("s", T::Directory, None)],
            ),
            (
                "a file over a symlink",
                vec![
                    ("s", T::Symlink, Some("../outside/keep")),
                    ("s", T::Regular, None),
                ],
            ),
        ];
        for (what, entries) in absorbed {
            applied_in_a_sandbox(what, &tar_of(&entries), &limits())
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        // Bounds: entries, and a long name read into memory.
        let many = vec![("f", T::Regular, None); 3];
        let small = Limits {
            checkpoint_entries: 2,
            ..limits()
        };
        let err = applied_in_a_sandbox("entries", &tar_of(&many), &small).unwrap_err();
        assert!(err.to_string().contains("checkpoint_entries"), "{err}");
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(0);
        h.set_mode(0o644);
        b.append_data(&mut h, "n".repeat(100 << 10), std::io::empty())
            .unwrap();
        let err =
            applied_in_a_sandbox("long name", &b.into_inner().unwrap(), &limits()).unwrap_err();
        assert!(err.to_string().contains("GNULongName"), "{err}");
    }
}

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

use crate::{Error, Result};

/// overlayfs' attribute of an opaque directory.
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// A layer entry marking its directory opaque.
const OPAQUE_MARK: &str = ".wh..wh..opq";
/// Prefix of a layer entry marking a deleted name.
const WHITEOUT_PREFIX: &str = ".wh.";

/// The upper directory of a rootfs that is one overlay mount with an `upperdir`.
pub(super) fn upper_dir(rootfs: &[MountRecord]) -> Option<PathBuf> {
    match rootfs {
        [m] if m.kind == "overlay" => m
            .options
            .iter()
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(PathBuf::from),
        _ => None,
    }
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::Io(format!("{what} {}: {e}", path.display()))
}

/// Packs the upper directory `upper` into the layer tar `out`.
pub(super) fn pack(upper: &Path, out: &Path) -> Result<()> {
    let file = std::fs::File::create(out).map_err(io_err("create", out))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    tar.follow_symlinks(false);
    pack_dir(&mut tar, upper, Path::new(""))?;
    let file = tar
        .into_inner()
        .and_then(|w| w.into_inner().map_err(std::io::IntoInnerError::into_error))
        .map_err(io_err("write", out))?;
    file.sync_all().map_err(io_err("sync", out))
}

fn pack_dir<W: std::io::Write>(tar: &mut tar::Builder<W>, upper: &Path, rel: &Path) -> Result<()> {
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
            pack_dir(tar, upper, &entry)?;
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

/// Puts the layer `tar` back into the upper directory `upper`: its files over
/// what is there, its markers as whiteouts and opaque directories.
/// FailedPrecondition naming the first entry that is not acceptable.
pub(super) fn apply(
    tar: impl Read,
    upper: &Path,
    limits: &keel_protocol::limits::Limits,
) -> Result<()> {
    let bad = |why: String| Error::FailedPrecondition(format!("checkpoint rw layer: {why}"));
    let root = upper
        .canonicalize()
        .map_err(|e| Error::FailedPrecondition(format!("upperdir {}: {e}", upper.display())))?;
    let mut archive = tar::Archive::new(tar);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_preserve_mtime(true);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(true);
    let entries = archive
        .entries()
        .map_err(|e| bad(format!("not a tar: {e}")))?;
    let mut budget = super::checkpoint::TarBudget::default();
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
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if name == OPAQUE_MARK {
            xattr::set(&parent, OPAQUE_XATTR, b"y").map_err(io_err("mark opaque", &parent))?;
        } else if let Some(gone) = name.strip_prefix(WHITEOUT_PREFIX) {
            whiteout(&parent.join(gone))?;
        } else if matches!(kind, T::Char | T::Block | T::Fifo) {
            // The tar crate writes these as plain files.
            special(&root.join(&path), entry.header())
                .map_err(|e| bad(format!("entry {path:?}: {e}")))?;
        } else {
            entry
                .unpack_in(&root)
                .map_err(|e| bad(format!("entry {path:?}: {e}")))?;
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
    let dev = makedev(
        u64::from(field("device major", header.device_major())?),
        u64::from(field("device minor", header.device_minor())?),
    );
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
        pack(u, &layer).unwrap();

        let to = tempfile::tempdir().unwrap();
        let t = to.path();
        // What the layer replaces: a file where its whiteout goes, a stale file.
        std::fs::write(t.join("deleted"), b"stale").unwrap();
        apply(std::fs::File::open(&layer).unwrap(), t, &limits()).unwrap();
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

    #[test]
    fn a_hostile_layer_cannot_leave_the_upper_dir() {
        use tar::EntryType as T;
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().display().to_string();
        for (what, entries) in [
            ("dot-dot", vec![("../escaped", T::Regular, None)]),
            ("absolute", vec![("/escaped", T::Regular, None)]),
            ("hard link", vec![("h", T::Link, Some("/etc/passwd"))]),
            (
                "file through a symlink",
                vec![
                    ("s", T::Symlink, Some(target.as_str())),
                    ("s/escaped", T::Regular, None),
                ],
            ),
            (
                "whiteout through a symlink",
                vec![
                    ("s", T::Symlink, Some(target.as_str())),
                    ("s/.wh.escaped", T::Regular, None),
                ],
            ),
        ] {
            let upper = tempfile::tempdir().unwrap();
            let err = apply(&tar_of(&entries)[..], upper.path(), &limits()).unwrap_err();
            assert!(
                matches!(err, Error::FailedPrecondition(_)),
                "{what}: {err:?}"
            );
            assert_eq!(
                std::fs::read_dir(outside.path()).unwrap().count(),
                0,
                "{what}: something landed outside"
            );
        }
        let upper = tempfile::tempdir().unwrap();
        let many = vec![("f", T::Regular, None); 3];
        let small = keel_protocol::limits::Limits {
            checkpoint_entries: 2,
            ..limits()
        };
        let err = apply(&tar_of(&many)[..], upper.path(), &small).unwrap_err();
        assert!(err.to_string().contains("checkpoint_entries"), "{err}");
    }
}

//! keelctl's filesystem flags, as ctr has them: the rootfs writable unless
//! `--read-only`, and `--mount` for more mounts in the container's spec.

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Default, Args)]
pub struct MountFlags {
    /// Make the container's root filesystem read-only (it is writable otherwise).
    #[arg(long)]
    pub read_only: bool,
    /// Another mount: type=T,src=S,dst=D[,options=o1:o2] (repeatable), e.g.
    /// type=bind,src=/srv/data,dst=/data,options=rbind:rw.
    #[arg(long = "mount", value_name = "SPEC")]
    pub mounts: Vec<String>,
}

impl MountFlags {
    /// Writes the flags into an OCI spec (JSON): the root's mode and the mounts.
    pub fn apply(&self, spec: &mut serde_json::Value) -> anyhow::Result<()> {
        spec["root"]["readonly"] = serde_json::json!(self.read_only);
        for m in &self.mounts {
            let mount = parse(m).with_context(|| format!("--mount {m:?}"))?;
            match spec["mounts"].as_array_mut() {
                Some(all) => all.push(mount),
                None => spec["mounts"] = serde_json::json!([mount]),
            }
        }
        Ok(())
    }

    /// The options of the rootfs bind mount.
    pub fn rootfs_options(&self) -> Vec<String> {
        let mode = if self.read_only { "ro" } else { "rw" };
        vec!["rbind".into(), mode.into()]
    }
}

/// One `--mount` as an OCI spec mount.
fn parse(spec: &str) -> anyhow::Result<serde_json::Value> {
    let (mut kind, mut source, mut destination, mut options) = (None, None, None, Vec::new());
    for field in spec.split(',') {
        let Some((k, v)) = field.split_once('=') else {
            bail!("{field:?} is not key=value");
        };
        match k {
            "type" => kind = Some(v.to_string()),
            "src" | "source" => source = Some(v.to_string()),
            "dst" | "destination" | "target" => destination = Some(v.to_string()),
            "options" => options = v.split(':').map(str::to_string).collect(),
            other => bail!("unknown key {other:?} (type, src, dst, options)"),
        }
    }
    let Some(destination) = destination.filter(|d| d.starts_with('/')) else {
        bail!("dst= must give an absolute path in the container");
    };
    Ok(serde_json::json!({
        "type": kind.unwrap_or_else(|| "bind".into()),
        "source": source.unwrap_or_default(),
        "destination": destination,
        "options": options,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mounts_parse_as_ctr_writes_them() {
        let m = parse("type=bind,src=/srv,dst=/data,options=rbind:ro").unwrap();
        assert_eq!(
            m,
            serde_json::json!({"type": "bind", "source": "/srv", "destination": "/data", "options": ["rbind", "ro"]})
        );
        let m = parse("type=tmpfs,source=tmpfs,target=/scratch").unwrap();
        assert_eq!(m["destination"], "/scratch");
        assert_eq!(m["options"], serde_json::json!([]));
        for bad in [
            "type=bind,src=/a",
            "dst=relative",
            "src=/a,dst=/b,mode=x",
            "nonsense",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_rootfs_is_writable_unless_read_only() {
        let mut spec =
            serde_json::json!({"root": {"path": "rootfs", "readonly": true}, "mounts": []});
        let flags = MountFlags {
            mounts: vec!["type=bind,src=/srv,dst=/data".into()],
            ..Default::default()
        };
        flags.apply(&mut spec).unwrap();
        assert_eq!(spec["root"]["readonly"], false);
        assert_eq!(spec["mounts"][0]["destination"], "/data");
        assert_eq!(flags.rootfs_options(), ["rbind", "rw"]);
        let ro = MountFlags {
            read_only: true,
            ..Default::default()
        };
        ro.apply(&mut spec).unwrap();
        assert_eq!(spec["root"]["readonly"], true);
        assert_eq!(ro.rootfs_options(), ["rbind", "ro"]);
    }
}

//! keelctl's filesystem flags, as ctr has them: the rootfs writable unless
//! `--read-only`, and `--mount` for more mounts in the container's spec.

use anyhow::{bail, Context};
use clap::Args;
use keel_client::ContainerSpec;

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
    /// Gives a container the flags: the root's mode and the mounts.
    pub fn apply(&self, mut spec: ContainerSpec) -> anyhow::Result<ContainerSpec> {
        spec = spec.read_only(self.read_only);
        for m in &self.mounts {
            spec = spec.oci_mount(parse(m).with_context(|| format!("--mount {m:?}"))?);
        }
        Ok(spec)
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
        let spec_of = |flags: &MountFlags| -> serde_json::Value {
            let spec = ContainerSpec::new("c", "/").args(["true"]);
            let spec = flags.apply(spec).unwrap();
            let mount = &spec.to_proto().unwrap().rootfs[0];
            assert_eq!(mount.options[1], if flags.read_only { "ro" } else { "rw" });
            serde_json::from_slice(&spec.spec_json().unwrap()).unwrap()
        };
        let flags = MountFlags {
            mounts: vec!["type=bind,src=/srv,dst=/data".into()],
            ..Default::default()
        };
        let spec = spec_of(&flags);
        assert_eq!(spec["root"]["readonly"], false);
        let last = spec["mounts"].as_array().unwrap().last().unwrap().clone();
        assert_eq!(last["destination"], "/data");
        let ro = MountFlags {
            read_only: true,
            ..Default::default()
        };
        assert_eq!(spec_of(&ro)["root"]["readonly"], true);
    }
}

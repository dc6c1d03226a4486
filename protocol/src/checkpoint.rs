//! How a checkpoint lies in the content store: an OCI image index whose manifests
//! are the CRIU image (a tar), the container's spec, the runtime options and, when
//! taken with them, the task's filesystem changes (a layer), with
//! containerd's media types and labels (whether `ctr` can restore one is not
//! tested), and keel's own annotations: the container's rootfs and the CRIU
//! options its restore needs again.
//!
//! Both sides use this module: keeld writes the index and checks it again before a
//! restore; keelctl reads it to recreate the container.

use std::collections::{BTreeMap, HashMap};

use oci_spec::image::{Descriptor, ImageIndex, ImageIndexBuilder, MediaType};
use protobuf::well_known_types::any::Any;
use protobuf::Message;
use serde::{Deserialize, Serialize};

use crate::types::SPEC_TYPE_URL;
use crate::Error;

/// The CRIU image directory, as a tar.
pub const MEDIA_TYPE_CRIU_TAR: &str =
    "application/vnd.containerd.container.criu.checkpoint.criu.tar";
/// The container's spec: a protobuf `Any` holding the OCI spec JSON.
pub const MEDIA_TYPE_CONFIG: &str =
    "application/vnd.containerd.container.checkpoint.config.v1+proto";
/// The runtime options the task ran with: a protobuf `Any`.
pub const MEDIA_TYPE_RUNTIME_OPTIONS: &str =
    "application/vnd.containerd.container.checkpoint.runtime.options+proto";

/// The task's filesystem changes: the upper directory of its overlay rootfs as a
/// tar, whiteouts as `.wh.` files (containerd's `WithCheckpointRW` layer).
pub const MEDIA_TYPE_RW_LAYER: &str = "application/vnd.containerd.container.rw.tar";

/// Index annotation: the runtime name.
pub const ANNOTATION_RUNTIME: &str = "io.containerd.checkpoint.runtime";
/// Index annotation: the container that was checkpointed.
pub const ANNOTATION_CONTAINER: &str = "io.keel.checkpoint.container";
/// Index annotation: the container's rootfs mounts, as JSON.
pub const ANNOTATION_ROOTFS: &str = "io.keel.checkpoint.rootfs";
/// Index annotation: the CRIU options the dump was taken with that its restore
/// needs again (`tcp-established`, `ext-unix-sk`, `file-locks`), comma-separated.
pub const ANNOTATION_CRIU_RESTORE: &str = "io.keel.checkpoint.criu-restore";
/// The CRIU options [`ANNOTATION_CRIU_RESTORE`] may name.
pub const CRIU_RESTORE_OPTIONS: &[&str] = &["tcp-established", "ext-unix-sk", "file-locks"];
/// Index annotation: when the checkpoint was taken (RFC 3339).
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";

/// Content label marking a checkpoint index.
pub const LABEL_CHECKPOINT: &str = "containerd.io/checkpoint";
/// Content label making a blob a root that is never collected.
pub const LABEL_GC_ROOT: &str = "containerd.io/gc.root";
/// Prefix of the content labels by which a blob references another (the value is
/// the referenced digest).
pub const LABEL_GC_REF_CONTENT: &str = "containerd.io/gc.ref.content.";

/// One blob of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

/// A rootfs mount of the checkpointed container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsMount {
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
}

/// A checkpoint index, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub image: Blob,
    pub config: Blob,
    pub options: Option<Blob>,
    /// The task's filesystem changes, when the checkpoint was taken with them.
    pub rw: Option<Blob>,
    pub runtime: String,
    pub container: String,
    pub rootfs: Vec<RootfsMount>,
    pub created: String,
    /// CRIU options the restore needs again (of [`CRIU_RESTORE_OPTIONS`]).
    pub criu_restore: Vec<String>,
}

/// InvalidArgument: the blob `digest` names is not a checkpoint index.
fn invalid(digest: &str, what: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!(
        "checkpoint {digest}: not a checkpoint index: {what}"
    ))
}

impl Checkpoint {
    /// Every blob the index references.
    pub fn blobs(&self) -> Vec<&Blob> {
        let mut v = vec![&self.image, &self.config];
        v.extend(self.options.as_ref());
        v.extend(self.rw.as_ref());
        v
    }

    /// The index as JSON (OCI image index, schema version 2).
    pub fn to_index(&self) -> Result<Vec<u8>, Error> {
        let manifests = self
            .blobs()
            .into_iter()
            .map(|b| {
                let digest: oci_spec::image::Digest = b
                    .digest
                    .parse()
                    .map_err(|e| Error::Internal(format!("digest {}: {e}", b.digest)))?;
                Ok(Descriptor::new(
                    MediaType::Other(b.media_type.clone()),
                    b.size,
                    digest,
                ))
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let rootfs = serde_json::to_string(&self.rootfs).expect("mounts serialise");
        let annotations = HashMap::from([
            (ANNOTATION_RUNTIME.to_string(), self.runtime.clone()),
            (ANNOTATION_CONTAINER.to_string(), self.container.clone()),
            (ANNOTATION_ROOTFS.to_string(), rootfs),
            (ANNOTATION_CREATED.to_string(), self.created.clone()),
            (
                ANNOTATION_CRIU_RESTORE.to_string(),
                self.criu_restore.join(","),
            ),
        ]);
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(manifests)
            .annotations(annotations)
            .build()
            .map_err(|e| Error::Internal(format!("checkpoint index: {e}")))?;
        serde_json::to_vec(&index).map_err(|e| Error::Internal(format!("checkpoint index: {e}")))
    }

    /// Labels for the index blob: a collection root that references every blob.
    pub fn index_labels(&self) -> BTreeMap<String, String> {
        let mut labels = BTreeMap::from([
            (LABEL_CHECKPOINT.to_string(), "true".to_string()),
            (LABEL_GC_ROOT.to_string(), self.created.clone()),
        ]);
        for (i, b) in self.blobs().into_iter().enumerate() {
            labels.insert(format!("{LABEL_GC_REF_CONTENT}m.{i}"), b.digest.clone());
        }
        labels
    }

    /// Parses the index `digest` names; InvalidArgument naming the digest and what is
    /// wrong when `bytes` is not a checkpoint index.
    pub fn parse(digest: &str, bytes: &[u8]) -> Result<Self, Error> {
        let invalid = |what: &dyn std::fmt::Display| invalid(digest, what);
        let index: ImageIndex = serde_json::from_slice(bytes).map_err(|e| invalid(&e))?;
        if index.schema_version() != 2 {
            return Err(invalid(&format!(
                "schema version {}",
                index.schema_version()
            )));
        }
        let find = |media: &str| {
            index
                .manifests()
                .iter()
                .find(|d| d.media_type().to_string() == media)
                .map(|d| Blob {
                    media_type: media.to_string(),
                    digest: d.digest().to_string(),
                    size: d.size(),
                })
        };
        let image =
            find(MEDIA_TYPE_CRIU_TAR).ok_or_else(|| invalid(&"it references no CRIU image"))?;
        let config =
            find(MEDIA_TYPE_CONFIG).ok_or_else(|| invalid(&"it references no container spec"))?;
        let none = HashMap::new();
        let annotations = index.annotations().as_ref().unwrap_or(&none);
        let get = |k: &str| annotations.get(k).cloned().unwrap_or_default();
        let rootfs = match annotations.get(ANNOTATION_ROOTFS) {
            Some(json) => serde_json::from_str(json)
                .map_err(|e| invalid(&format!("annotation {ANNOTATION_ROOTFS}: {e}")))?,
            None => Vec::new(),
        };
        let criu_restore: Vec<String> = get(ANNOTATION_CRIU_RESTORE)
            .split(',')
            .filter(|o| !o.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(o) = criu_restore
            .iter()
            .find(|o| !CRIU_RESTORE_OPTIONS.contains(&o.as_str()))
        {
            return Err(invalid(&format!(
                "annotation {ANNOTATION_CRIU_RESTORE}: {o:?} is not one of {CRIU_RESTORE_OPTIONS:?}"
            )));
        }
        Ok(Self {
            criu_restore,
            image,
            config,
            options: find(MEDIA_TYPE_RUNTIME_OPTIONS),
            rw: find(MEDIA_TYPE_RW_LAYER),
            runtime: get(ANNOTATION_RUNTIME),
            container: get(ANNOTATION_CONTAINER),
            rootfs,
            created: get(ANNOTATION_CREATED),
        })
    }
}

/// The config blob for a container spec (OCI spec JSON).
pub fn config_blob(spec_json: &[u8]) -> Result<Vec<u8>, Error> {
    let mut any = Any::new();
    any.type_url = SPEC_TYPE_URL.to_string();
    any.value = spec_json.to_vec();
    any.write_to_bytes()
        .map_err(|e| Error::Internal(format!("encode spec: {e}")))
}

/// The spec JSON inside the config blob of the checkpoint index `digest` names.
pub fn spec_from_config(digest: &str, blob: &[u8]) -> Result<Vec<u8>, Error> {
    let any = Any::parse_from_bytes(blob).map_err(|e| invalid(digest, format!("its spec: {e}")))?;
    if any.type_url != SPEC_TYPE_URL {
        return Err(invalid(
            digest,
            format!("its spec has type {:?}, not {SPEC_TYPE_URL}", any.type_url),
        ));
    }
    Ok(any.value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(media: &str, c: char) -> Blob {
        Blob {
            media_type: media.into(),
            digest: format!("sha256:{}", c.to_string().repeat(64)),
            size: 10,
        }
    }

    fn sample() -> Checkpoint {
        Checkpoint {
            image: blob(MEDIA_TYPE_CRIU_TAR, 'a'),
            config: blob(MEDIA_TYPE_CONFIG, 'b'),
            options: Some(blob(MEDIA_TYPE_RUNTIME_OPTIONS, 'c')),
            rw: Some(blob(MEDIA_TYPE_RW_LAYER, 'd')),
            runtime: "io.containerd.runc.v2".into(),
            container: "web".into(),
            rootfs: vec![RootfsMount {
                kind: "bind".into(),
                source: "/srv/rootfs".into(),
                options: vec!["rbind".into()],
            }],
            created: "2026-01-01T00:00:00Z".into(),
            criu_restore: vec!["tcp-established".into()],
        }
    }

    #[test]
    fn an_index_round_trips_and_references_every_blob() {
        let c = sample();
        let json = c.to_index().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["schemaVersion"], 2);
        assert_eq!(v["mediaType"], "application/vnd.oci.image.index.v1+json");
        assert_eq!(v["manifests"].as_array().unwrap().len(), 4);
        assert_eq!(Checkpoint::parse("sha256:idx", &json).unwrap(), c);
        let labels = c.index_labels();
        for (i, b) in c.blobs().iter().enumerate() {
            assert_eq!(
                labels[&format!("containerd.io/gc.ref.content.m.{i}")],
                b.digest
            );
        }
        assert!(labels.contains_key(LABEL_GC_ROOT));
    }

    #[test]
    fn what_is_not_a_checkpoint_index_is_refused_with_the_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"hello", "checkpoint sha256:idx: not a checkpoint index"),
            (br#"{"schemaVersion":2,"manifests":[]}"#, "no CRIU image"),
            (br#"{"schemaVersion":1,"manifests":[]}"#, "schema version 1"),
        ];
        for (bytes, want) in cases {
            let e = Checkpoint::parse("sha256:idx", bytes).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
            assert!(e.to_string().contains(want), "{e}");
        }
        let mut c = sample();
        c.config.media_type = "application/octet-stream".into();
        let e = Checkpoint::parse("sha256:idx", &c.to_index().unwrap()).unwrap_err();
        assert!(e.to_string().contains("no container spec"), "{e}");
    }

    #[test]
    fn the_spec_travels_in_an_any() {
        let blob = config_blob(br#"{"ociVersion":"1.0.2"}"#).unwrap();
        assert_eq!(
            spec_from_config("sha256:idx", &blob).unwrap(),
            br#"{"ociVersion":"1.0.2"}"#
        );
        let e = spec_from_config("sha256:idx", b"\xff\xff").unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    }
}

//! Content digests (`sha256:<64 lowercase hex>`) and ingest refs: the two strings from
//! requests that name things on disk, so both are checked before any path is built.

use std::fmt;

use crate::{Error, Result};

/// A validated sha256 digest. Its hex form is safe as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`; the error names `field`.
    pub fn parse(field: &str, s: &str) -> Result<Self> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?} is not a digest: expected sha256:<64 hex characters>"
            )));
        };
        if alg != "sha256" {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?}: unsupported digest algorithm {alg:?}, only sha256 is supported"
            )));
        }
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Error::InvalidArgument(format!(
                "{field} {s:?}: a sha256 digest has 64 lowercase hex characters"
            )));
        }
        Ok(Self {
            hex: hex.to_string(),
        })
    }

    /// Builds a digest from raw sha256 output.
    pub fn from_sha256(bytes: &[u8]) -> Self {
        Self {
            hex: hex::encode(bytes),
        }
    }

    /// The 64 hex characters.
    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Longest ingest ref accepted.
pub const MAX_REF_LEN: usize = 256;

/// Checks an ingest ref. Refs never become paths (the ingest directory is named by a
/// hash of the ref), but a ref that looks like a path escape is refused outright so a
/// caller learns of the mistake: printable ASCII only, no leading `/`, no `.` or `..`
/// path component, at most 256 bytes.
pub fn validate_ref(r: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::InvalidArgument(format!("ref {r:?} {why}")));
    if r.is_empty() {
        return bad("must not be empty");
    }
    if r.len() > MAX_REF_LEN {
        return bad(&format!(
            "is {} bytes long, the limit is {MAX_REF_LEN}",
            r.len()
        ));
    }
    if let Some(c) = r.chars().find(|c| !c.is_ascii_graphic()) {
        return bad(&format!(
            "contains {c:?}: only printable ASCII without spaces is allowed"
        ));
    }
    if r.starts_with('/') {
        return bad("must not be an absolute path");
    }
    if r.split('/').any(|part| part == ".." || part == ".") {
        return bad("must not contain a '.' or '..' path component");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_table() {
        let cases: Vec<(String, bool)> = vec![
            (format!("sha256:{HEX}"), true),
            (format!("sha512:{HEX}"), false),
            (format!("sha256:{}", &HEX[..63]), false),
            (format!("sha256:{HEX}0"), false),
            (format!("sha256:{}", HEX.to_uppercase()), false),
            (HEX.to_string(), false),
            ("sha256:../../etc/passwd".into(), false),
            (format!("sha256:{}\0", &HEX[..63]), false),
            ("".into(), false),
        ];
        for (s, ok) in cases {
            let r = Digest::parse("digest", &s);
            assert_eq!(r.is_ok(), ok, "{s:?}: {r:?}");
            if let Err(Error::InvalidArgument(m)) = r {
                assert!(m.starts_with("digest "), "{m}");
            }
        }
        assert_eq!(
            Digest::parse("d", &format!("sha256:{HEX}"))
                .unwrap()
                .to_string(),
            format!("sha256:{HEX}")
        );
    }

    #[test]
    fn ref_table() {
        let cases: &[(&str, bool)] = &[
            ("my-ref", true),
            ("layer-sha256:abc", true),
            ("default/1/abc", true),
            ("a..b", true),
            ("", false),
            ("../x", false),
            ("a/../b", false),
            ("./a", false),
            ("/etc/passwd", false),
            ("a\0b", false),
            ("a b", false),
            ("ré", false),
        ];
        for (r, ok) in cases {
            assert_eq!(validate_ref(r).is_ok(), *ok, "{r:?}");
        }
        assert!(validate_ref(&"x".repeat(257)).is_err());
    }
}

//! The command line containerd gives a shim: Go `flag` style (`-name value`,
//! `--name=value`, `-debug`), then the action word.

use std::fmt;

/// What the shim was asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `start`: launch the long-running shim, print its address.
    Start,
    /// `delete`: clean up after a shim that is gone.
    Delete,
    /// No action: this is the long-running shim, serving on fd 3.
    Serve,
    /// `-v`: print the version.
    Version,
}

/// Parsed flags.
#[derive(Debug, Clone)]
pub struct Args {
    pub namespace: String,
    pub id: String,
    /// containerd's gRPC address: only hashed into the socket name.
    pub address: String,
    pub bundle: Option<String>,
    pub debug: bool,
    pub action: Action,
}

#[derive(Debug)]
pub struct ArgError(String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest value taken for a flag.
const MAX_VALUE: usize = 4096;

impl Args {
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Self, ArgError> {
        let mut namespace = None;
        let mut id = None;
        let mut address = None;
        let mut bundle = None;
        let mut debug = false;
        let mut action = None;
        let mut version = false;
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
                if action.is_some() {
                    return Err(ArgError(format!("unexpected argument {arg:?}")));
                }
                action = Some(match arg.as_str() {
                    "start" => Action::Start,
                    "delete" => Action::Delete,
                    other => return Err(ArgError(format!("unknown action {other:?}"))),
                });
                continue;
            };
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (flag, None),
            };
            if name == "debug" || name == "v" {
                match inline.as_deref() {
                    None | Some("true") => {}
                    Some("false") => continue,
                    Some(v) => return Err(ArgError(format!("-{name}={v}: not a boolean"))),
                }
                if name == "debug" {
                    debug = true;
                } else {
                    version = true;
                }
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => it
                    .next()
                    .ok_or_else(|| ArgError(format!("-{name} needs a value")))?,
            };
            if value.len() > MAX_VALUE {
                return Err(ArgError(format!("-{name}: longer than {MAX_VALUE} bytes")));
            }
            match name {
                "namespace" => namespace = Some(value),
                "id" => id = Some(value),
                "address" => address = Some(value),
                "bundle" => bundle = Some(value),
                // containerd's binary for `publish`: events go to TTRPC_ADDRESS.
                "publish-binary" => {}
                other => return Err(ArgError(format!("unknown flag -{other}"))),
            }
        }
        if version {
            return Ok(Self {
                namespace: String::new(),
                id: String::new(),
                address: String::new(),
                bundle: None,
                debug,
                action: Action::Version,
            });
        }
        let namespace = namespace.ok_or_else(|| ArgError("-namespace is required".into()))?;
        let id = id.ok_or_else(|| ArgError("-id is required".into()))?;
        for (flag, v) in [("namespace", &namespace), ("id", &id)] {
            if v.is_empty() || v.contains('/') || v == "." || v == ".." {
                return Err(ArgError(format!("-{flag} {v:?} is not a valid name")));
            }
        }
        Ok(Self {
            namespace,
            id,
            address: address.unwrap_or_default(),
            bundle,
            debug,
            action: action.unwrap_or(Action::Serve),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, ArgError> {
        Args::parse(s.split_whitespace().map(String::from))
    }

    #[test]
    fn containerd_command_lines() {
        let a = parse("-namespace k8s -address /run/c.sock -publish-binary /usr/bin/containerd -id t1 -debug start").unwrap();
        assert_eq!(
            (a.namespace.as_str(), a.id.as_str(), a.address.as_str()),
            ("k8s", "t1", "/run/c.sock")
        );
        assert!(a.debug);
        assert_eq!(a.action, Action::Start);
        let a = parse("--namespace=ns -id t1 -bundle /b delete").unwrap();
        assert_eq!(
            (a.action, a.bundle.as_deref()),
            (Action::Delete, Some("/b"))
        );
        let a = parse("-namespace ns -id t1 -address a").unwrap();
        assert_eq!(a.action, Action::Serve);
        assert_eq!(parse("-v").unwrap().action, Action::Version);
    }

    #[test]
    fn bad_command_lines_are_refused() {
        for (line, want) in [
            ("-id t1 start", "-namespace is required"),
            ("-namespace ns start", "-id is required"),
            ("-namespace ns -id ../x start", "not a valid name"),
            ("-namespace ns -id t1 stop", "unknown action"),
            ("-namespace ns -id t1 -frobnicate 1 start", "unknown flag"),
            ("-namespace ns -id", "-id needs a value"),
            ("-namespace ns -id t1 start delete", "unexpected argument"),
        ] {
            let e = parse(line).unwrap_err();
            assert!(e.0.contains(want), "{line}: {e}");
        }
    }
}

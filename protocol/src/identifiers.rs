//! Identifier rules, as containerd's `identifiers` package: one or more ASCII
//! alphanumerics, separated by single `.`, `_` or `-`, at most 76 characters. The rule
//! keeps every id usable as a path component: no `/`, no `..`, no NUL, no leading dot.

use crate::Error;

/// Longest identifier accepted.
pub const MAX_LENGTH: usize = 76;

/// Checks `value` against the identifier rules; the error names `field`.
pub fn validate(field: &str, value: &str) -> Result<(), Error> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} must not be empty")));
    }
    if value.len() > MAX_LENGTH {
        return Err(Error::InvalidArgument(format!(
            "{field} is {} characters long, the limit is {MAX_LENGTH}",
            value.len()
        )));
    }
    let bytes = value.as_bytes();
    let mut prev_sep = true; // the first character must be alphanumeric
    for (i, &b) in bytes.iter().enumerate() {
        if b.is_ascii_alphanumeric() {
            prev_sep = false;
        } else if matches!(b, b'.' | b'_' | b'-') && !prev_sep {
            prev_sep = true;
        } else {
            return Err(Error::InvalidArgument(format!(
                "{field} {value:?} is not a valid identifier: character {} ({:?}) must be an \
                 ASCII letter or digit, or a single '.', '_' or '-' between them",
                i + 1,
                value[i..].chars().next().unwrap_or('?'),
            )));
        }
    }
    if prev_sep {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} is not a valid identifier: it must end with a letter or digit"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_table() {
        let long_ok = "a".repeat(MAX_LENGTH);
        let too_long = "a".repeat(MAX_LENGTH + 1);
        let three_hundred = "x".repeat(300);
        let cases: &[(&str, bool)] = &[
            ("foo", true),
            ("foo.bar", true),
            ("foo-bar_baz.1", true),
            ("0", true),
            ("a.b.c", true),
            (&long_ok, true),
            ("", false),
            ("../x", false),
            ("..", false),
            (".foo", false),
            ("foo.", false),
            ("foo..bar", false),
            ("foo/bar", false),
            ("/abs", false),
            ("foo bar", false),
            ("fo\0o", false),
            ("héllo", false),
            ("日本", false),
            ("-foo", false),
            ("foo_-bar", false),
            (&too_long, false),
            (&three_hundred, false),
        ];
        for (value, ok) in cases {
            let res = validate("container id", value);
            assert_eq!(res.is_ok(), *ok, "{value:?}: {res:?}");
            if let Err(Error::InvalidArgument(msg)) = res {
                assert!(
                    msg.contains("container id"),
                    "message names the field: {msg}"
                );
            } else if !ok {
                panic!("{value:?} gave a non-InvalidArgument error");
            }
        }
    }
}

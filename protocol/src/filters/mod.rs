//! containerd's filter language (as containerd 1.6's `filters` package reads it),
//! shared by content, container and event listings.
//!
//! ```text
//! filters   := filter*                   several filters: any one matching is enough
//! filter    := "" | selector ("," selector)*          a comma means AND
//! selector  := fieldpath [operator value]             no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := [A-Za-z0-9_]+ | "…"
//! operator  := "==" | "!=" | "~="
//! value     := bare | "…"                after ~= also /…/ and |…|
//! bare      := a first character other than " / | , . = ! ~, then any characters but
//!              "," and white space, all graphic (no control, format, private-use or
//!              unassigned code points)
//! ```
//!
//! Quoted literals take Go's escapes: `\a \b \f \n \r \t \v \\`, the literal's own
//! quote character (`\"`, `\/` or `\|`), three octal digits up to `\377` and `\xHH` (a
//! byte each), `\uHHHH` and `\UHHHHHHHH` (a character); nothing else, and no raw new
//! line. Being bytes, a decoded literal need not be UTF-8: no field has such a name,
//! and no field's value equals such a value.
//!
//! White space may come before a field, an operator or a value, never between a field
//! and the `.` after it, nor after a selector's last token: `a == b, c` parses, but
//! `a==b ,c` and `a==b ` do not. So `topic==/tasks/exit` is an error (`/` opens a
//! quoted literal, allowed only after `~=`); write `topic=="/tasks/exit"`, and
//! `topic~=|^/tasks/|` or `topic~=^/tasks/` for an expression. A NUL, or a U+FFFD (what
//! a lossy decoding leaves of bad UTF-8), is illegal anywhere.
//!
//! Matching: a missing field is absent to a bare field path and to `==`; `!=` and `~=`
//! compare the empty string, so `labels.app!=web` and `labels.app~=^$` match an object
//! without that label. An empty filter matches everything, as does no filter at all.
//!
//! Errors read as containerd's do, `parse error: [before >|c|< after]: message` (`c`
//! is one byte: the rest of a longer character shows as U+FFFD; `[filter]: message`
//! at the end), after the filter's name (`filter`, or `filter 2` for the second of
//! several) where containerd writes `filters`.
//!
//! Where keel differs from containerd:
//! - Regular expressions are compiled when the filter is parsed, so one that does not
//!   compile is a parse error (containerd's filter parses, then matches nothing). They
//!   are Go's syntax, read by Go's rules and matched by Rust's `regex` (see
//!   `regexp.rs`: Go's ASCII `\d \w \s \b`, its literal `[` and `&&` in a class, its
//!   limit of 1000 on counts are kept; the nesting depth is the `regex` crate's 250,
//!   where Go allows 1000).
//! - Parsing is bounded ([`FilterLimits`]): the length of each filter, the number of
//!   filters and of selectors, and the compiled size of each regular expression (the
//!   regex crate's size limits, so a pathological pattern fails instead of growing).
//!   Even bounded, compiling many regular expressions takes milliseconds: keeld parses
//!   filters on its blocking pool, never on the thread that serves requests.

mod parser;
mod regexp;
mod scanner;
#[cfg(test)]
mod tests;

use regex::Regex;

use crate::Error;
pub use parser::ParseError;
use parser::{Op, Parsed, Parser};

/// Gives a filter the value of a field path of the object being matched.
pub trait Adaptor {
    /// The field's value, or `None` when the object has no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone)]
struct Selector {
    /// `None` when an element is not UTF-8: no object has such a field.
    path: Option<Vec<String>>,
    op: Op,
    value: Vec<u8>,
    re: Option<Regex>,
}

impl Selector {
    fn matches(&self, a: &dyn Adaptor) -> bool {
        let v = self.path.as_ref().and_then(|p| a.field(p));
        match self.op {
            Op::Present => v.is_some(),
            Op::Equal => v.is_some_and(|v| v.as_bytes() == self.value),
            Op::NotEqual => v.unwrap_or_default().as_bytes() != self.value,
            Op::Matches => self
                .re
                .as_ref()
                .is_some_and(|re| re.is_match(v.as_deref().unwrap_or_default())),
        }
    }
}

/// A parsed set of filters: matches when any filter matches (all of its selectors).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    any: Vec<Vec<Selector>>,
}

/// Bounds on what one request's filters may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilterLimits {
    /// Bytes of one filter string.
    pub filter_bytes: usize,
    /// Filters in one request.
    pub filters: usize,
    /// Selectors in one filter.
    pub selectors: usize,
    /// Compiled size of one regular expression.
    pub regex_bytes: usize,
}

impl Default for FilterLimits {
    fn default() -> Self {
        crate::limits::Limits::default().filters()
    }
}

/// Parses one non-empty filter: its syntax first, then its regular expressions.
fn parse_one(filter: &str, limits: &FilterLimits) -> Result<Vec<Selector>, ParseError> {
    let parsed = Parser::new(filter, limits.selectors).selectors()?;
    parsed
        .into_iter()
        .map(
            |Parsed {
                 path,
                 op,
                 value,
                 value_pos,
             }| {
                let re = if op == Op::Matches {
                    let re = regexp::compile(&value, limits.regex_bytes).map_err(|e| {
                        ParseError::new(
                            filter,
                            value_pos,
                            format!(
                                "invalid regular expression {:?}: {e}",
                                String::from_utf8_lossy(&value)
                            ),
                        )
                    })?;
                    Some(re)
                } else {
                    None
                };
                let path: Result<Vec<String>, _> =
                    path.into_iter().map(String::from_utf8).collect();
                Ok(Selector {
                    path: path.ok(),
                    op,
                    value,
                    re,
                })
            },
        )
        .collect()
}

impl Filter {
    /// Parses several filters (OR-ed) under keel's default bounds; none, or an
    /// empty one, matches everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, Error> {
        Self::parse_all_within(filters, &FilterLimits::default())
    }

    /// Parses several filters (OR-ed) under `limits`; none, or an empty one, matches
    /// everything (the others must still parse). A bound passed or a filter that does
    /// not parse is an InvalidArgument naming the filter.
    pub fn parse_all_within<S: AsRef<str>>(
        filters: &[S],
        limits: &FilterLimits,
    ) -> Result<Self, Error> {
        if filters.len() > limits.filters {
            return Err(Error::InvalidArgument(format!(
                "filters: {} filters given, the limit is {}",
                filters.len(),
                limits.filters
            )));
        }
        let name = |i: usize| {
            if filters.len() > 1 {
                format!("filter {}", i + 1)
            } else {
                "filter".to_string()
            }
        };
        for (i, f) in filters.iter().enumerate() {
            let len = f.as_ref().len();
            if len > limits.filter_bytes {
                return Err(Error::InvalidArgument(format!(
                    "{}: {len} bytes, the limit is {}",
                    name(i),
                    limits.filter_bytes
                )));
            }
        }
        let mut any = Vec::with_capacity(filters.len());
        let mut always = false;
        for (i, f) in filters.iter().enumerate() {
            let f = f.as_ref();
            if f.is_empty() {
                always = true;
                continue;
            }
            let selectors = parse_one(f, limits)
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", name(i))))?;
            any.push(selectors);
        }
        if always {
            any.clear();
        }
        Ok(Filter { any })
    }

    /// Whether any selector looks into an event's payload (`event.<field>`), which
    /// costs a decode of the payload per event matched.
    pub fn reads_payload(&self) -> bool {
        self.any.iter().flatten().any(|s| {
            s.path
                .as_ref()
                .and_then(|p| p.first())
                .is_some_and(|f| f == "event")
        })
    }

    /// Selectors over all filters.
    pub fn selectors(&self) -> usize {
        self.any.iter().map(Vec::len).sum()
    }

    /// Parses one filter.
    pub fn parse(filter: &str) -> Result<Self, Error> {
        Self::parse_all(&[filter])
    }

    /// Whether the filter matches everything.
    pub fn is_always(&self) -> bool {
        self.any.is_empty()
    }

    /// Whether the object behind `a` matches.
    pub fn matches(&self, a: &dyn Adaptor) -> bool {
        self.any.is_empty() || self.any.iter().any(|all| all.iter().all(|s| s.matches(a)))
    }
}

//! containerd's filter language, shared by content, container and event listings.
//!
//! ```text
//! filters   := filter*                      several filters are OR-ed
//! filter    := selector ("," selector)*     a comma means AND
//! selector  := fieldpath [operator value]   no operator: the field is present
//! fieldpath := field ("." field)*
//! field     := quoted | [A-Za-z0-9_-]+
//! operator  := "==" | "!=" | "~="
//! value     := quoted | [^\s,]+
//! quoted    := "…" | /…/ | |…|             Go string escapes inside
//! ```
//!
//! One difference from containerd: a value that starts with `/` but whose closing `/`
//! is not the end of the value is read as a bare value, so `topic~=/tasks/.+` is the
//! regular expression `/tasks/.+` (containerd's scanner rejects it).
//! An empty filter string matches everything. Regular expressions are compiled at parse
//! time, so a bad one is an error before any matching starts.
//!
//! Parsing is bounded ([`FilterLimits`]): the length of each filter, the number of
//! filters and of selectors, and the compiled size of each regular expression (the
//! regex crate's size limits, so a pathological pattern fails instead of growing).
//! Even bounded, compiling many regular expressions takes milliseconds: keeld parses
//! filters on its blocking pool, never on the thread that serves requests.

use std::fmt;

use regex::{Regex, RegexBuilder};

use crate::Error;

/// Gives a filter the value of a field path of the object being matched.
pub trait Adaptor {
    /// The field's value, or `None` when the object has no such field.
    fn field(&self, path: &[String]) -> Option<String>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Present,
    Equal,
    NotEqual,
    Matches,
}

#[derive(Debug, Clone)]
struct Selector {
    path: Vec<String>,
    op: Op,
    value: String,
    re: Option<Regex>,
}

impl Selector {
    fn matches(&self, a: &dyn Adaptor) -> bool {
        let v = a.field(&self.path);
        match self.op {
            Op::Present => v.is_some(),
            Op::Equal => v.as_deref() == Some(self.value.as_str()),
            Op::NotEqual => v.as_deref() != Some(self.value.as_str()),
            Op::Matches => match (&self.re, v) {
                (Some(re), Some(v)) => re.is_match(&v),
                _ => false,
            },
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

impl Filter {
    /// Parses several filters (OR-ed) under keel's default bounds; none, or an
    /// empty one, matches everything.
    pub fn parse_all<S: AsRef<str>>(filters: &[S]) -> Result<Self, Error> {
        Self::parse_all_within(filters, &FilterLimits::default())
    }

    /// Parses several filters (OR-ed) under `limits`; none, or an empty one, matches
    /// everything. A bound passed is an InvalidArgument naming the filter.
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
        for (i, f) in filters.iter().enumerate() {
            let f = f.as_ref();
            if f.trim().is_empty() {
                return Ok(Filter::default());
            }
            let sel = Parser::new(f, limits)
                .selectors()
                .map_err(|e| Error::InvalidArgument(format!("{}: {e}", name(i))))?;
            any.push(sel);
        }
        Ok(Filter { any })
    }

    /// Whether any selector looks into an event's payload (`event.<field>`), which
    /// costs a decode of the payload per event matched.
    pub fn reads_payload(&self) -> bool {
        self.any
            .iter()
            .flatten()
            .any(|s| s.path.first().is_some_and(|f| f == "event"))
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

/// A syntax error, shown as containerd shows it: `[before >|c|< after]: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    input: String,
    pos: usize,
    msg: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.input[self.pos..].chars().next() {
            Some(c) => {
                let end = self.pos + c.len_utf8();
                write!(
                    f,
                    "[{} >|{}|< {}]: {}",
                    &self.input[..self.pos],
                    c,
                    &self.input[end..],
                    self.msg
                )
            }
            None => write!(f, "[{} >||<]: {}", self.input, self.msg),
        }
    }
}

struct Parser<'a> {
    input: &'a str,
    pos: usize,
    limits: &'a FilterLimits,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

impl<'a> Parser<'a> {
    fn new(input: &'a str, limits: &'a FilterLimits) -> Self {
        Self {
            input,
            pos: 0,
            limits,
        }
    }

    fn err(&self, pos: usize, msg: impl Into<String>) -> ParseError {
        ParseError {
            input: self.input.to_string(),
            pos,
            msg: msg.into(),
        }
    }

    fn rest(&self) -> &'a str {
        &self.input[self.pos..]
    }

    fn peek(&self) -> Option<char> {
        self.rest().chars().next()
    }

    fn skip_space(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_whitespace() {
                break;
            }
            self.pos += c.len_utf8();
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, ParseError> {
        let mut out = vec![self.selector()?];
        loop {
            self.skip_space();
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    if out.len() == self.limits.selectors {
                        return Err(self.err(
                            self.pos,
                            format!("more than {} selectors", self.limits.selectors),
                        ));
                    }
                    self.pos += 1;
                    out.push(self.selector()?);
                }
                Some(c) => {
                    return Err(self.err(self.pos, format!("unexpected input {c:?}, expected ','")))
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, ParseError> {
        let path = self.fieldpath()?;
        self.skip_space();
        let op_pos = self.pos;
        let op = match self.peek() {
            None | Some(',') => Op::Present,
            Some('=' | '!' | '~') => {
                let len = self
                    .rest()
                    .chars()
                    .take_while(|c| matches!(c, '=' | '!' | '~'))
                    .count();
                let op = &self.rest()[..len];
                self.pos += len;
                match op {
                    "==" => Op::Equal,
                    "!=" => Op::NotEqual,
                    "~=" => Op::Matches,
                    other => {
                        return Err(self.err(
                            op_pos,
                            format!(
                                "unsupported operator {other:?}, expected \"==\", \"!=\" or \"~=\""
                            ),
                        ))
                    }
                }
            }
            Some(c) => {
                return Err(self.err(
                    op_pos,
                    format!("unexpected {c:?} after field, expected an operator or ','"),
                ))
            }
        };
        if op == Op::Present {
            return Ok(Selector {
                path,
                op,
                value: String::new(),
                re: None,
            });
        }
        self.skip_space();
        let value_pos = self.pos;
        let value = self.value()?;
        let re = if op == Op::Matches {
            Some(
                RegexBuilder::new(&value)
                    .size_limit(self.limits.regex_bytes)
                    .dfa_size_limit(self.limits.regex_bytes)
                    .build()
                    .map_err(|e| {
                        self.err(
                            value_pos,
                            format!("invalid regular expression {value:?}: {e}"),
                        )
                    })?,
            )
        } else {
            None
        };
        Ok(Selector {
            path,
            op,
            value,
            re,
        })
    }

    fn fieldpath(&mut self) -> Result<Vec<String>, ParseError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.pos += 1;
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, ParseError> {
        self.skip_space();
        let start = self.pos;
        match self.peek() {
            Some(q) if is_quote(q) => self.quoted(),
            Some(c) if is_field_char(c) => {
                let len = self
                    .rest()
                    .chars()
                    .take_while(|c| is_field_char(*c))
                    .count();
                self.pos += len;
                Ok(self.input[start..self.pos].to_string())
            }
            Some(c) => Err(self.err(
                start,
                format!("expected a field name or quoted field, found {c:?}"),
            )),
            None => Err(self.err(start, "expected a field name, found the end")),
        }
    }

    fn value(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        let bare_len: usize = self
            .rest()
            .chars()
            .take_while(|c| *c != ',' && !c.is_whitespace())
            .map(char::len_utf8)
            .sum();
        match self.peek() {
            None | Some(',') => Err(self.err(start, "expected a value after the operator")),
            Some(q) if is_quote(q) => {
                let mut probe = Parser {
                    input: self.input,
                    pos: self.pos,
                    limits: self.limits,
                };
                match probe.quoted() {
                    Ok(v) if q != '/' || matches!(probe.after_space(), None | Some(',')) => {
                        self.pos = probe.pos;
                        Ok(v)
                    }
                    // A '/'-led value that goes on after its closing '/' is a bare value.
                    Ok(_) | Err(_) if q == '/' => {
                        self.pos += bare_len;
                        Ok(self.input[start..self.pos].to_string())
                    }
                    Ok(v) => Ok(v),
                    Err(e) => Err(e),
                }
            }
            Some(_) => {
                self.pos += bare_len;
                Ok(self.input[start..self.pos].to_string())
            }
        }
    }

    fn after_space(&mut self) -> Option<char> {
        self.skip_space();
        self.peek()
    }

    /// Reads a quoted string starting at the quote character, with Go escapes.
    fn quoted(&mut self) -> Result<String, ParseError> {
        let start = self.pos;
        let quote = self.peek().expect("caller saw a quote");
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err(start, "quoted literal not terminated"));
            };
            self.pos += c.len_utf8();
            match c {
                c if c == quote => return Ok(out),
                '\n' => return Err(self.err(start, "quoted literal not terminated")),
                '\\' => {
                    let esc_pos = self.pos - 1;
                    let Some(e) = self.peek() else {
                        return Err(self.err(esc_pos, "quoted literal not terminated"));
                    };
                    self.pos += e.len_utf8();
                    let ch = match e {
                        'a' => '\u{7}',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'n' => '\n',
                        'r' => '\r',
                        't' => '\t',
                        'v' => '\u{b}',
                        '\\' => '\\',
                        e if e == quote => e,
                        'x' | 'u' | 'U' => {
                            let n = match e {
                                'x' => 2,
                                'u' => 4,
                                _ => 8,
                            };
                            let digits = self.rest().get(..n).unwrap_or("");
                            let v = (digits.len() == n)
                                .then(|| u32::from_str_radix(digits, 16).ok())
                                .flatten()
                                .and_then(char::from_u32)
                                .ok_or_else(|| {
                                    self.err(esc_pos, "illegal numeric escape sequence")
                                })?;
                            self.pos += n;
                            v
                        }
                        _ => {
                            return Err(self.err(esc_pos, format!("illegal escape sequence \\{e}")))
                        }
                    };
                    out.push(ch);
                }
                c => out.push(c),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// A flat map of dotted paths, e.g. `labels.foo` → value.
    struct Obj(HashMap<String, String>);

    impl Adaptor for Obj {
        fn field(&self, path: &[String]) -> Option<String> {
            self.0.get(&path.join("\u{0}")).cloned()
        }
    }

    fn obj(kv: &[(&[&str], &str)]) -> Obj {
        Obj(kv
            .iter()
            .map(|(p, v)| (p.join("\u{0}"), (*v).to_string()))
            .collect())
    }

    #[test]
    fn matching_table() {
        let ev = obj(&[
            (&["topic"], "/tasks/exit"),
            (&["namespace"], "bb"),
            (&["event", "container_id"], "web-1"),
            (&["labels", "very complex label"], "something"),
            (&["labels", "app"], "web"),
        ]);
        let cases: &[(&[&str], bool)] = &[
            (&["topic~=/tasks/.+,namespace==bb"], true),
            (&["topic~=/tasks/.+,namespace==aa"], false),
            (&["topic==/tasks/exit"], true),
            (&["topic==\"/tasks/exit\""], true),
            (&["topic~=/exit/"], true),
            (&["topic~=|^/tasks/ex|"], true),
            (&["topic~=^/containers/"], false),
            (&["topic!=/tasks/exit"], false),
            (&["topic!=/tasks/start"], true),
            (&["namespace"], true),
            (&["missing"], false),
            (&["missing!=x"], true),
            (&["event.container_id==web-1"], true),
            (&["event.container_id==web-2"], false),
            (&["labels.\"very complex label\"==something"], true),
            (&["labels.app==web, namespace == bb"], true),
            (&["labels.app==db", "namespace==bb"], true),
            (&["labels.app==db", "namespace==cc"], false),
            (&[""], true),
            (&[], true),
        ];
        for (filters, want) in cases {
            let f = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
            assert_eq!(f.matches(&ev), *want, "{filters:?}");
        }
    }

    #[test]
    fn syntax_errors_table() {
        let cases: &[(&str, &str)] = &[
            ("topic==", "expected a value"),
            ("topic=", "unsupported operator"),
            ("topic===x", "unsupported operator"),
            ("topic<x", "expected an operator"),
            ("topic==a b", "unexpected input"),
            ("labels.\"unterminated==x", "not terminated"),
            ("topic~=[", "invalid regular expression"),
            (",topic", "expected a field"),
            ("topic,", "expected a field name, found the end"),
            ("labels.==x", "expected a field"),
            ("x==\"\\q\"", "illegal escape"),
        ];
        for (input, want) in cases {
            let err = Filter::parse(input).expect_err(input);
            let Error::InvalidArgument(msg) = &err else {
                panic!("{input}: {err:?}")
            };
            assert!(msg.contains(want), "{input}: {msg}");
            assert!(
                msg.contains(">|") || msg.contains("[]") || msg.contains(">||<"),
                "{input}: points at the error: {msg}"
            );
        }
    }

    #[test]
    fn bounds_are_invalid_arguments_naming_the_filter() {
        let limits = FilterLimits {
            filter_bytes: 64,
            filters: 2,
            selectors: 3,
            regex_bytes: 4096,
        };
        let cases: &[(&[&str], &str)] = &[
            (&["a", "b", "c"], "filters: 3 filters given, the limit is 2"),
            (&[&"x".repeat(65)], "filter: 65 bytes, the limit is 64"),
            (&["a", &"x".repeat(65)], "filter 2: 65 bytes"),
            (&["a,b,c,d"], "more than 3 selectors"),
            (&["topic~=(a|b|c){200}{200}"], "invalid regular expression"),
        ];
        for (filters, want) in cases {
            let err = Filter::parse_all_within(filters, &limits).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains(want)),
                "{filters:?}: {err:?}"
            );
        }
        let ok = Filter::parse_all_within(&["a,b,c", "topic~=x"], &limits).unwrap();
        assert_eq!(ok.selectors(), 4);
        assert!(!ok.reads_payload());
        assert!(Filter::parse("event.id==x").unwrap().reads_payload());
    }

    #[test]
    fn error_names_which_filter() {
        let err = Filter::parse_all(&["topic==x", "bad=="]).unwrap_err();
        assert!(err.message().starts_with("filter 2:"), "{err}");
    }

    #[test]
    fn quoted_escapes() {
        let f = Filter::parse(r#"name=="a\"b\x41\u00e9""#).unwrap();
        assert!(f.matches(&obj(&[(&["name"], "a\"bAé")])));
    }
}

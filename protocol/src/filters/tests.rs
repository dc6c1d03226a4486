//! The filter language against containerd 1.6's own test tables (re-expressed here:
//! `filters/filter_test.go` TestFilters and `filters/scanner_test.go` TestScanner),
//! then keel's tables for what those leave out.

use std::collections::HashMap;

use super::scanner::{Scanner, Token};
use super::*;

/// An entry of containerd's TestFilters corpus, with the adaptor that test uses: `name`
/// and `other` are present when not empty (whatever follows them in the path), a label
/// is looked up by the rest of the path joined with `.`.
struct Entry {
    name: &'static str,
    other: &'static str,
    labels: &'static [(&'static str, &'static str)],
}

impl Adaptor for Entry {
    fn field(&self, path: &[String]) -> Option<String> {
        let present = |v: &str| (!v.is_empty()).then(|| v.to_string());
        match path[0].as_str() {
            "name" => present(self.name),
            "other" => present(self.other),
            "labels" => {
                let key = path[1..].join(".");
                self.labels
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.to_string())
            }
            _ => None,
        }
    }
}

const fn entry(
    name: &'static str,
    other: &'static str,
    labels: &'static [(&'static str, &'static str)],
) -> Entry {
    Entry {
        name,
        other,
        labels,
    }
}

const CORPUS: [Entry; 9] = [
    entry("foo", "", &[("foo", "true")]),
    entry("bar", "", &[]),
    entry(
        "foo",
        "",
        &[("foo", "present"), ("more complex label", "present")],
    ),
    entry("bar", "", &[("bar", "true")]),
    entry(
        "fooer",
        "",
        &[("more complex label with \\ and \"", "present")],
    ),
    entry(
        "fooer",
        "",
        &[("more complex label with \\ and \".post", "present")],
    ),
    entry("baz", "too complex, yo", &[]),
    entry("bazo", "abc", &[]),
    entry("compound", "", &[("foo", "omg_asdf.asdf-qwer")]),
];

/// What a case expects: the corpus entries matched, or containerd's error text.
enum Want {
    Matches(&'static [usize]),
    Error(&'static str),
}

/// containerd's TestFilters, case for case (26).
#[test]
fn containerd_filter_table() {
    use Want::{Error as E, Matches as M};
    const ALL: &[usize] = &[0, 1, 2, 3, 4, 5, 6, 7, 8];
    let cases: &[(&str, &str, Want)] = &[
        ("Empty", "", M(ALL)),
        ("Present", "name", M(ALL)),
        ("LabelPresent", "labels.foo", M(&[0, 2, 8])),
        ("NameAndLabelPresent", "labels.foo,name", M(&[0, 2, 8])),
        ("LabelValue", "labels.foo==true", M(&[0])),
        ("LabelValuePunctuated", "labels.foo==omg_asdf.asdf-qwer", M(&[8])),
        (
            "LabelValueNoAltQuoting",
            "labels.|foo|==omg_asdf.asdf-qwer",
            E("filters: parse error: [labels. >|||< foo|==omg_asdf.asdf-qwer]: invalid quote encountered"),
        ),
        ("Name", "name==bar", M(&[1, 3])),
        ("NameNotEqual", "name!=bar", M(&[0, 2, 4, 5, 6, 7, 8])),
        ("NameAndLabelPresent", "name==bar,labels.bar", M(&[3])),
        ("QuotedValue", "other==\"too complex, yo\"", M(&[6])),
        ("RegexpValue", "other~=[abc]+,name!=foo", M(&[6, 7])),
        ("RegexpQuotedValue", "other~=/[abc]+/,name!=foo", M(&[6, 7])),
        ("RegexpQuotedValue", "other~=/[abc]{1,2}/,name!=foo", M(&[6, 7])),
        (
            "RegexpQuotedValueGarbage",
            "other~=/[abc]{0,1}\"\\//,name!=foo",
            M(&[]),
        ),
        ("NameAndLabelValue", "name==bar,labels.bar==true", M(&[3])),
        ("NameAndLabelValueNoMatch", "name==bar,labels.bar==wrong", M(&[])),
        (
            "LabelQuotedFieldPathPresent",
            r#"name==foo,labels."more complex label""#,
            M(&[2]),
        ),
        (
            "LabelQuotedFieldPathPresentWithQuoted",
            r#"labels."more complex label with \\ and \""==present"#,
            M(&[4]),
        ),
        (
            "LabelQuotedFieldPathPresentWithQuotedEmbed",
            r#"labels."more complex label with \\ and \"".post==present"#,
            M(&[5]),
        ),
        (
            "LabelQuotedFieldPathPresentWithQuotedEmbedInvalid",
            r#"labels.?"more complex label with \\ and \"".post==present"#,
            E(r#"filters: parse error: [labels. >|?|< "more complex label with \\ and \"".post==present]: expected field or quoted"#),
        ),
        (
            "TrailingComma",
            "name==foo,",
            E("filters: parse error: [name==foo,]: expected field or quoted"),
        ),
        (
            "TrailingFieldSeparator",
            "labels.",
            E("filters: parse error: [labels.]: expected field or quoted"),
        ),
        (
            "MissingValue",
            "image~=,id?=?fbaq",
            E("filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted"),
        ),
        (
            "FieldQuotedLiteralNotTerminated",
            "labels.ns/key==value",
            E("filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated"),
        ),
        (
            "ValueQuotedLiteralNotTerminated",
            "labels.key==/value",
            E("filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated"),
        ),
    ];
    assert_eq!(cases.len(), 26);
    for (name, input, want) in cases {
        let got = Filter::parse(input);
        match want {
            Want::Matches(want) => {
                let f = got.unwrap_or_else(|e| panic!("{name} {input:?}: {e}"));
                let matched: Vec<usize> = (0..CORPUS.len())
                    .filter(|i| f.matches(&CORPUS[*i]))
                    .collect();
                assert_eq!(&matched, want, "{name} {input:?}");
            }
            Want::Error(want) => {
                // containerd's text, from parse_one; keel names the filter where
                // containerd writes "filters".
                let e = parse_one(input, &FilterLimits::default()).unwrap_err();
                assert_eq!(format!("filters: {e}"), *want, "{name}");
                let Err(Error::InvalidArgument(msg)) = got else {
                    panic!("{name} {input:?}: {got:?}")
                };
                assert_eq!(msg, want.replacen("filters: ", "filter: ", 1), "{name}");
            }
        }
    }
}

/// containerd's TestScanner, case for case (22): each token's start, kind and text,
/// and for an illegal one the scanner's message.
#[test]
fn containerd_scanner_table() {
    use Token::{Eof, Field, Illegal, Operator, Quoted, Separator as Sep, Value};
    type Tok = (usize, Token, &'static str, &'static str);
    let cases: &[(&str, &str, &[Tok])] = &[
        ("Field", "name", &[(0, Field, "name", ""), (4, Eof, "", "")]),
        (
            "SelectorsWithOperators",
            "name==value,foo!=bar",
            &[
                (0, Field, "name", ""),
                (4, Operator, "==", ""),
                (6, Value, "value", ""),
                (11, Sep, ",", ""),
                (12, Field, "foo", ""),
                (15, Operator, "!=", ""),
                (17, Value, "bar", ""),
                (20, Eof, "", ""),
            ],
        ),
        (
            "SelectorsWithFieldPaths",
            "name==value,labels.foo=value,other.bar~=match",
            &[
                (0, Field, "name", ""),
                (4, Operator, "==", ""),
                (6, Value, "value", ""),
                (11, Sep, ",", ""),
                (12, Field, "labels", ""),
                (18, Sep, ".", ""),
                (19, Field, "foo", ""),
                (22, Operator, "=", ""),
                (23, Value, "value", ""),
                (28, Sep, ",", ""),
                (29, Field, "other", ""),
                (34, Sep, ".", ""),
                (35, Field, "bar", ""),
                (38, Operator, "~=", ""),
                (40, Value, "match", ""),
                (45, Eof, "", ""),
            ],
        ),
        (
            "RegexpValue",
            "name~=[abc]+,foo=test",
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Value, "[abc]+", ""),
                (12, Sep, ",", ""),
                (13, Field, "foo", ""),
                (16, Operator, "=", ""),
                (17, Value, "test", ""),
                (21, Eof, "", ""),
            ],
        ),
        (
            "RegexpEscapedValue",
            r"name~=[abc]\+,foo=test",
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Value, r"[abc]\+", ""),
                (13, Sep, ",", ""),
                (14, Field, "foo", ""),
                (17, Operator, "=", ""),
                (18, Value, "test", ""),
                (22, Eof, "", ""),
            ],
        ),
        (
            "RegexpQuotedValue",
            "name~=/[abc]{0,2}/,foo=test",
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Quoted, "/[abc]{0,2}/", ""),
                (18, Sep, ",", ""),
                (19, Field, "foo", ""),
                (22, Operator, "=", ""),
                (23, Value, "test", ""),
                (27, Eof, "", ""),
            ],
        ),
        (
            "Cowsay",
            "name~=牛,labels.moo=true",
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Value, "牛", ""),
                (9, Sep, ",", ""),
                (10, Field, "labels", ""),
                (16, Sep, ".", ""),
                (17, Field, "moo", ""),
                (20, Operator, "=", ""),
                (21, Value, "true", ""),
                (25, Eof, "", ""),
            ],
        ),
        (
            "CowsayRegexpQuoted",
            "name~=|牛|,labels.moo=true",
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Quoted, "|牛|", ""),
                (11, Sep, ",", ""),
                (12, Field, "labels", ""),
                (18, Sep, ".", ""),
                (19, Field, "moo", ""),
                (22, Operator, "=", ""),
                (23, Value, "true", ""),
                (27, Eof, "", ""),
            ],
        ),
        (
            "Escapes",
            r#"name~="asdf\n\tfooo""#,
            &[
                (0, Field, "name", ""),
                (4, Operator, "~=", ""),
                (6, Quoted, r#""asdf\n\tfooo""#, ""),
                (20, Eof, "", ""),
            ],
        ),
        (
            "NullInput",
            "foo\x00bar",
            &[
                (0, Field, "foo", ""),
                (3, Illegal, "", "unexpected null"),
                (4, Field, "bar", ""),
                (7, Eof, "", ""),
            ],
        ),
        (
            "SpacesChomped",
            "foo = bar    ",
            &[
                (0, Field, "foo", ""),
                (4, Operator, "=", ""),
                (6, Value, "bar", ""),
                (13, Eof, "", ""),
            ],
        ),
        (
            "ValuesPunctauted",
            "compound.labels==punctuated_value.foo-bar",
            &[
                (0, Field, "compound", ""),
                (8, Sep, ".", ""),
                (9, Field, "labels", ""),
                (15, Operator, "==", ""),
                (17, Value, "punctuated_value.foo-bar", ""),
                (41, Eof, "", ""),
            ],
        ),
        (
            "PartialInput",
            "interrupted=",
            &[
                (0, Field, "interrupted", ""),
                (11, Operator, "=", ""),
                (12, Eof, "", ""),
            ],
        ),
        (
            "DoubleValue",
            "doublevalue=value value",
            &[
                (0, Field, "doublevalue", ""),
                (11, Operator, "=", ""),
                (12, Value, "value", ""),
                (18, Field, "value", ""),
                (23, Eof, "", ""),
            ],
        ),
        (
            "LeadingWithQuoted",
            r#""leading quote".postquote==value"#,
            &[
                (0, Quoted, r#""leading quote""#, ""),
                (15, Sep, ".", ""),
                (16, Field, "postquote", ""),
                (25, Operator, "==", ""),
                (27, Value, "value", ""),
                (32, Eof, "", ""),
            ],
        ),
        (
            "MissingValue",
            "input==,id!=ff",
            &[
                (0, Field, "input", ""),
                (5, Operator, "==", ""),
                (7, Sep, ",", ""),
                (8, Field, "id", ""),
                (10, Operator, "!=", ""),
                (12, Value, "ff", ""),
                (14, Eof, "", ""),
            ],
        ),
        (
            "QuotedRegexp",
            r"input~=/foo\/bar/,id!=ff",
            &[
                (0, Field, "input", ""),
                (5, Operator, "~=", ""),
                (7, Quoted, r"/foo\/bar/", ""),
                (17, Sep, ",", ""),
                (18, Field, "id", ""),
                (20, Operator, "!=", ""),
                (22, Value, "ff", ""),
                (24, Eof, "", ""),
            ],
        ),
        (
            "QuotedRegexpAlt",
            "input~=|foo/bar|,id!=ff",
            &[
                (0, Field, "input", ""),
                (5, Operator, "~=", ""),
                (7, Quoted, "|foo/bar|", ""),
                (16, Sep, ",", ""),
                (17, Field, "id", ""),
                (19, Operator, "!=", ""),
                (21, Value, "ff", ""),
                (23, Eof, "", ""),
            ],
        ),
        (
            "IllegalQuoted",
            "labels.containerd.io/key==value",
            &[
                (0, Field, "labels", ""),
                (6, Sep, ".", ""),
                (7, Field, "containerd", ""),
                (17, Sep, ".", ""),
                (18, Field, "io", ""),
                (20, Illegal, "/key==value", "quoted literal not terminated"),
                (31, Eof, "", ""),
            ],
        ),
        (
            "IllegalQuotedWithNewLine",
            "labels.\"containerd.io\nkey\"==value",
            &[
                (0, Field, "labels", ""),
                (6, Sep, ".", ""),
                (
                    7,
                    Illegal,
                    "\"containerd.io\n",
                    "quoted literal not terminated",
                ),
                (22, Field, "key", ""),
                (25, Illegal, "\"==value", "quoted literal not terminated"),
                (33, Eof, "", ""),
            ],
        ),
        (
            "IllegalEscapeSequence",
            r#"labels."\g""#,
            &[
                (0, Field, "labels", ""),
                (6, Sep, ".", ""),
                (7, Illegal, r#""\g""#, "illegal escape sequence"),
                (11, Eof, "", ""),
            ],
        ),
        (
            "IllegalNumericEscapeSequence",
            r#"labels."\xaz""#,
            &[
                (0, Field, "labels", ""),
                (6, Sep, ".", ""),
                (7, Illegal, r#""\xaz""#, "illegal numeric escape sequence"),
                (13, Eof, "", ""),
            ],
        ),
    ];
    assert_eq!(cases.len(), 22);
    for (name, input, want) in cases {
        let mut scanner = Scanner::new(input);
        let mut got: Vec<Tok> = Vec::new();
        loop {
            let (pos, token, text) = scanner.scan();
            let err = match token {
                Token::Illegal => scanner.err.unwrap_or_default(),
                _ => "",
            };
            got.push((pos, token, text, err));
            if token == Token::Eof || got.len() > want.len() {
                break;
            }
        }
        assert_eq!(&got, want, "{name}");
        assert_eq!(scanner.scan().1, Token::Eof, "{name}: all input read");
    }
}

/// A flat map of field paths (elements joined by NUL) to values.
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

/// Matching, including where keel used to differ from containerd (each checked
/// against containerd 1.6's filters package).
#[test]
fn matching_table() {
    let ev = obj(&[
        (&["topic"], "/tasks/exit"),
        (&["namespace"], "bb"),
        (&["event", "container_id"], "web-1"),
        (&["labels", "very complex label"], "something"),
        (&["labels", "app"], "web"),
        (&["labels", "empty"], ""),
    ]);
    let cases: &[(&[&str], bool)] = &[
        (&["topic~=^/tasks/.+,namespace==bb"], true),
        (&["topic~=|^/tasks/.+|,namespace==aa"], false),
        (&["topic==\"/tasks/exit\""], true),
        (&["topic~=/exit/"], true),
        (&["topic~=|^/tasks/ex|"], true),
        (&["topic~=\"^/tasks/(exit|start)$\""], true),
        (&["topic~=^/containers/"], false),
        (&["topic!=\"/tasks/exit\""], false),
        (&["topic!=\"/tasks/start\""], true),
        (&["namespace"], true),
        (&["event.container_id==web-1"], true),
        (&["event.container_id==web-2"], false),
        (&["labels.\"very complex label\"==something"], true),
        (&["labels.app==web, namespace == bb"], true),
        (&["labels.app==db", "namespace==bb"], true),
        (&["labels.app==db", "namespace==cc"], false),
        (&[""], true),
        (&[], true),
        (&["labels.app==db", ""], true),
        // A missing field: absent to presence and ==; != and ~= see "".
        (&["missing"], false),
        (&["missing==\"\""], false),
        (&["missing!=x"], true),
        (&["missing!=\"\""], false),
        (&["missing~=^$"], true),
        (&["missing~=x*"], true),
        (&["missing~=\".\""], false),
        (&["labels.empty"], true),
        (&["labels.empty==\"\""], true),
        (&["labels.empty!=\"\""], false),
        // Decoded bytes: no field is named, nor holds, what is not UTF-8.
        (&["labels.\"\\xff\""], false),
        (&["labels.\"\\xff\"!=x"], true),
        (&["labels.app==\"\\x77\\145b\""], true),
        (&["labels.app!=\"w\\xffb\""], true),
        (&["labels.app==\"\\u0077eb\""], true),
    ];
    for (filters, want) in cases {
        let f = Filter::parse_all(filters).unwrap_or_else(|e| panic!("{filters:?}: {e}"));
        assert_eq!(f.matches(&ev), *want, "{filters:?}");
    }
}

/// Syntax errors exactly as containerd renders them (keel's prefix aside), each
/// checked against containerd 1.6's filters package. Every one of these was accepted,
/// or refused with another message, before.
#[test]
fn syntax_errors_table() {
    let cases: &[(&str, &str)] = &[
        // `/` opens a quoted literal; `/…/` and `|…|` only after ~=.
        (
            "topic==/tasks/exit",
            "[topic== >|/|< tasks/exit]: invalid quote encountered",
        ),
        (
            "topic~=/tasks/.+",
            "[topic~=/tasks/ >|.|< +]: unexpected input: .",
        ),
        (
            "topic==/a",
            "[topic== >|/|< a]: quoted literal not terminated",
        ),
        (
            "labels.|a|",
            "[labels. >|||< a|]: invalid quote encountered",
        ),
        // White space after a selector, or before a `.` or `,`.
        ("name==x ", "[name==x >| |< ]: unexpected input:  "),
        ("name==x ,y", "[name==x >| |< ,y]: unexpected input:  "),
        ("name ", r#"[name ]: expected an operator ("=="|"!="|"~=")"#),
        (
            "a ,b",
            r#"[a  >|,|< b]: expected an operator ("=="|"!="|"~=")"#,
        ),
        (
            "labels .a",
            r#"[labels  >|.|< a]: expected an operator ("=="|"!="|"~=")"#,
        ),
        ("   ", "[   ]: expected field or quoted"),
        // Field names: [A-Za-z0-9_] only.
        (
            "labels.foo-bar",
            r#"[labels.foo >|-|< bar]: expected an operator ("=="|"!="|"~=")"#,
        ),
        // One byte is marked, even of a longer character.
        (
            "labels.é",
            "[labels. >|\u{FFFD}|< \u{FFFD}]: expected field or quoted",
        ),
        // Operators and values.
        ("topic=", "[topic >|=|< ]: unsupported operator \"=\""),
        ("topic==", "[topic==]: expected value or quoted"),
        (
            "topic===x",
            "[topic >|=|< ==x]: unsupported operator \"===\"",
        ),
        (
            "topic<x",
            r#"[topic >|<|< x]: expected an operator ("=="|"!="|"~=")"#,
        ),
        ("topic==a b", "[topic==a >| |< b]: unexpected input:  "),
        ("x==.5", "[x== >|.|< 5]: expected value or quoted"),
        (
            "x==a\u{200B}",
            "[x==a >|\u{FFFD}|< \u{FFFD}\u{FFFD}]: unexpected input: \u{200B}",
        ),
        (",topic", "[ >|,|< topic]: expected field or quoted"),
        ("topic,", "[topic,]: expected field or quoted"),
        ("labels.==x", "[labels. >|=|< =x]: expected field or quoted"),
        // NUL and U+FFFD (what decoding leaves of bad UTF-8) are illegal.
        ("a==b\0", "[a==b >|\0|< ]: unexpected input: \u{FFFD}"),
        ("ab\0", "[ab >|\0|< ]: unexpected null"),
        (
            "a==\u{FFFD}",
            "[a== >|\u{FFFD}|< \u{FFFD}\u{FFFD}]: rune error",
        ),
        // Quoted literals: the scanner's checks, then Go's decoding.
        (
            "labels.\"unterminated==x",
            "[labels. >|\"|< unterminated==x]: quoted literal not terminated",
        ),
        ("x==\"\\q\"", "[x== >|\"|< \\q\"]: illegal escape sequence"),
        (
            "x==\"\\x4\"",
            "[x== >|\"|< \\x4\"]: illegal numeric escape sequence",
        ),
        ("x==\"\\/\"", "[x== >|\"|< \\/\"]: illegal escape sequence"),
        (
            "x==\"\\400\"",
            "[x== >|\"|< \\400\"]: unquoting failed: quote syntax error",
        ),
        (
            "x==\"\\U00110000\"",
            "[x== >|\"|< \\U00110000\"]: unquoting failed: quote syntax error",
        ),
        ("x==\"a\0\"", "[x== >|\"|< a\0\"]: unexpected null"),
    ];
    for (input, want) in cases {
        let err = Filter::parse(input).expect_err(input);
        assert_eq!(
            err.message(),
            format!("filter: parse error: {want}"),
            "{input:?}"
        );
    }
    // These parse in containerd as in keel.
    for ok in [
        "a,b",
        "a, b",
        " name",
        "a ==b",
        "a== b",
        "labels. a",
        "x==\"\\377\"",
        "x==\"\\uD800\"",
        "x~=|a\\|b|",
        "x~=/a\\/b/",
        "labels.\"\"",
    ] {
        Filter::parse(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
    }
}

/// Go's regular expression syntax and meaning, each case checked against Go's `regexp`
/// (where Rust's `regex` alone reads or matches it otherwise): the pattern, a text, and
/// whether it matches or the error.
#[test]
fn regexp_table() {
    let cases: &[(&str, &str, Result<bool, &str>)] = &[
        // \d \w \s \b and POSIX classes are ASCII.
        (r"^\d$", "\u{663}", Ok(false)),
        (r"^\d$", "7", Ok(true)),
        (r"^\w$", "é", Ok(false)),
        (r"^\w$", "_", Ok(true)),
        (r"^\s$", "\u{A0}", Ok(false)),
        (r"^\s$", "\u{B}", Ok(false)),
        (r"^\S$", "\u{A0}", Ok(true)),
        (r"\bb", "éb", Ok(true)),
        (r"\Bb", "éb", Ok(false)),
        (r"^[\d]$", "\u{663}", Ok(false)),
        (r"^[^\d]$", "\u{663}", Ok(true)),
        (r"^[[:alpha:]]$", "é", Ok(false)),
        (r"^[[:^alpha:]]$", "é", Ok(true)),
        // Literal in Go, syntax in Rust.
        (r"^[[]$", "[", Ok(true)),
        (r"^[a&&b]$", "&", Ok(true)),
        (r"^[a~~b]$", "~", Ok(true)),
        (r"^\<a\>$", "<a>", Ok(true)),
        (r"^a{,3}$", "a{,3}", Ok(true)),
        (r"^x{$", "x{", Ok(true)),
        (r"^a{01}$", "a{01}", Ok(true)),
        (r"^\Qa.b\E$", "a.b", Ok(true)),
        (r"^\Qa.b\E$", "axb", Ok(false)),
        (r"^\Qa.b$", "a.b$", Ok(true)),
        // Escapes, classes, flags.
        (r"(?i)^k$", "\u{212A}", Ok(true)),
        (r"(?i)^\w$", "\u{17F}", Ok(true)),
        (r"(?i)^[^k]$", "\u{212A}", Ok(false)),
        (r"^\x{e9}$", "é", Ok(true)),
        (r"^\101$", "A", Ok(true)),
        (r"^\0$", "\0", Ok(true)),
        (r"^\p{Greek}+$", "Ωω", Ok(true)),
        (r"^\p{^Greek}$", "a", Ok(true)),
        (r"^\pL$", "é", Ok(true)),
        (r"^[^\x{D800}]$", "a", Ok(true)),
        (r"a(?i)b|B", "b", Ok(true)),
        (r"a(?i)*", "aaa", Ok(true)),
        (r"^(?:a{500}){0}b$", "b", Ok(true)),
        (r"^(?P<n>a)(?P<n>b)$", "ab", Ok(true)),
        (r"(?m)^b", "a\nb", Ok(true)),
        (r"^b", "a\nb", Ok(false)),
        (r"a$", "a\n", Ok(false)),
        (r"(?s)a.b", "a\nb", Ok(true)),
        (r"a.b", "a\nb", Ok(false)),
        // What Go refuses.
        (r"^[a--]$", "", Err("invalid character class range: `a--`")),
        (r"\C", "", Err("invalid escape sequence: `\\C`")),
        (r"\u0041", "", Err("invalid escape sequence: `\\u`")),
        (
            r"(?x)a",
            "",
            Err("invalid or unsupported Perl syntax: `(?x`"),
        ),
        (r"a**", "", Err("invalid nested repetition operator: `**`")),
        (r"a{1001}", "", Err("invalid repeat count: `{1001}`")),
        (r"(a{100}){11}", "", Err("invalid repeat count: `{11}`")),
        (
            r"\p{greek}",
            "",
            Err("invalid character class range: `\\p{greek}`"),
        ),
        (r"[\Q]", "", Err("invalid escape sequence: `\\Q`")),
        (r"\1", "", Err("invalid escape sequence: `\\1`")),
        (r"\8", "", Err("invalid escape sequence: `\\8`")),
        (r"[z-a]", "", Err("invalid character class range: `z-a`")),
        (
            r"[[:foo:]]",
            "",
            Err("invalid character class range: `[:foo:]`"),
        ),
        (
            r"\x{110000}",
            "",
            Err("invalid escape sequence: `\\x{110000`"),
        ),
        (
            r"(?i-)",
            "",
            Err("invalid or unsupported Perl syntax: `(?i-)`"),
        ),
        (r"\pé", "", Err("invalid character class range: `\\pé`")),
        (r"\Z", "", Err("invalid escape sequence: `\\Z`")),
        (r"[\b]", "", Err("invalid escape sequence: `\\b`")),
        (r"a)", "", Err("unexpected ): `a)`")),
        (r"(a", "", Err("missing closing ): `(a`")),
        (r"[a", "", Err("missing closing ]: `[a`")),
        (
            r"*",
            "",
            Err("missing argument to repetition operator: `*`"),
        ),
        (r"\", "", Err("trailing backslash at end of expression: ``")),
    ];
    for (pattern, text, want) in cases {
        let got = regexp::compile(pattern.as_bytes(), 1 << 20).map(|re| re.is_match(text));
        match (want, got) {
            (Ok(want), Ok(got)) => assert_eq!(got, *want, "{pattern:?} on {text:?}"),
            (Err(want), Err(got)) => {
                assert_eq!(got, format!("error parsing regexp: {want}"), "{pattern:?}")
            }
            (want, got) => panic!("{pattern:?}: want {want:?}, got {got:?}"),
        }
    }
    assert_eq!(
        regexp::compile(b"\xff", 1 << 20).unwrap_err(),
        "error parsing regexp: invalid UTF-8"
    );
    // Every class name Go knows is one the regex crate knows.
    for name in regexp::CATEGORIES.iter().chain(regexp::SCRIPTS) {
        for class in [format!(r"\p{{{name}}}"), format!(r"[^\P{{^{name}}}]")] {
            regexp::compile(class.as_bytes(), 1 << 22).unwrap_or_else(|e| panic!("{class}: {e}"));
        }
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
        (
            &["a,b,c,d"],
            "filter: parse error: [a,b,c >|,|< d]: more than 3 selectors",
        ),
        (&["topic~=(a|b|c){200}{200}"], "invalid nested repetition"),
        (
            &["topic~=((a|b|c){40}){30}"],
            "invalid repeat count: `{30}`",
        ),
        (&["topic~=\\pL{500}"], "exceeds size limit"),
        (
            &["topic~=[", "a"],
            "filter 1: parse error: [topic~= >|[|< ]",
        ),
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
    // An empty filter matches everything, but the others must still parse.
    assert!(Filter::parse_all(&["", "a"]).unwrap().is_always());
    assert!(Filter::parse_all(&["", "a=="]).is_err());
}

#[test]
fn error_names_which_filter() {
    let err = Filter::parse_all(&["topic==x", "bad=="]).unwrap_err();
    assert_eq!(
        err.message(),
        "filter 2: parse error: [bad==]: expected value or quoted"
    );
}

#[test]
fn quoted_escapes() {
    let f = Filter::parse(r#"name=="a\"b\x41\u00e9\101\a\v""#).unwrap();
    assert!(f.matches(&obj(&[(&["name"], "a\"bAéA\u{7}\u{b}")])));
    let f = Filter::parse(r"name~=|^\|a\||").unwrap();
    assert!(f.matches(&obj(&[(&["name"], "|a|")])));
    let f = Filter::parse(r"name~=/^a\/b$/").unwrap();
    assert!(f.matches(&obj(&[(&["name"], "a/b")])));
}

//! The regular expressions of `~=`: Go's syntax (RE2, as Go's `regexp` reads it),
//! matched by Rust's `regex`.
//!
//! A pattern is read by Go's rules and written out again in a form that the `regex`
//! crate reads the same way: each literal escaped, each class spelled as explicit
//! ranges (so `\d`, `\w`, `\s`, `[[:alpha:]]` and `\b` stay ASCII as in Go, a `[` or
//! `&&` in a class stays literal), each flag group written in full. What Go rejects is
//! rejected here with Go's message: `\C`, `\Q` inside a class, `\u`, `(?x)`, `a**`,
//! counts above 1000 (also multiplied through nested counts), an unknown `\p{…}` name.
//! What Go reads as literal text stays literal: `{,3}`, `x{`, `\<`, `\>`.
//!
//! Left to the `regex` crate: the compiled size (keel's bound, tighter than Go's) and
//! the depth of nesting (250 levels, where Go allows 1000).

use regex::{Regex, RegexBuilder};

/// Compiles a Go regular expression, its compiled size bounded by `size_limit`.
pub(super) fn compile(pattern: &[u8], size_limit: usize) -> Result<Regex, String> {
    let pattern = std::str::from_utf8(pattern)
        .map_err(|_| "error parsing regexp: invalid UTF-8".to_string())?;
    let rust = translate(pattern)?;
    RegexBuilder::new(&rust)
        .size_limit(size_limit)
        .dfa_size_limit(size_limit)
        .build()
        .map_err(|e| e.to_string())
}

/// The largest count Go allows in `{n,m}`, also as the product of nested counts.
const MAX_REPEAT: i64 = 1000;

/// Unicode general categories Go knows by name.
#[rustfmt::skip]
pub(super) const CATEGORIES: &[&str] = &[
    "C", "Cc", "Cf", "Co", "Cs", "L", "Ll", "Lm", "Lo", "Lt", "Lu", "M", "Mc", "Me", "Mn",
    "N", "Nd", "Nl", "No", "P", "Pc", "Pd", "Pe", "Pf", "Pi", "Po", "Ps", "S", "Sc", "Sk",
    "Sm", "So", "Z", "Zl", "Zp", "Zs",
];

/// Unicode scripts Go knows by name (Unicode 15, as Go 1.21 and later have them).
#[rustfmt::skip]
pub(super) const SCRIPTS: &[&str] = &[
    "Adlam", "Ahom", "Anatolian_Hieroglyphs", "Arabic", "Armenian", "Avestan", "Balinese",
    "Bamum", "Bassa_Vah", "Batak", "Bengali", "Bhaiksuki", "Bopomofo", "Brahmi", "Braille",
    "Buginese", "Buhid", "Canadian_Aboriginal", "Carian", "Caucasian_Albanian", "Chakma",
    "Cham", "Cherokee", "Chorasmian", "Common", "Coptic", "Cuneiform", "Cypriot",
    "Cypro_Minoan", "Cyrillic", "Deseret", "Devanagari", "Dives_Akuru", "Dogra", "Duployan",
    "Egyptian_Hieroglyphs", "Elbasan", "Elymaic", "Ethiopic", "Georgian", "Glagolitic",
    "Gothic", "Grantha", "Greek", "Gujarati", "Gunjala_Gondi", "Gurmukhi", "Han", "Hangul",
    "Hanifi_Rohingya", "Hanunoo", "Hatran", "Hebrew", "Hiragana", "Imperial_Aramaic",
    "Inherited", "Inscriptional_Pahlavi", "Inscriptional_Parthian", "Javanese", "Kaithi",
    "Kannada", "Katakana", "Kawi", "Kayah_Li", "Kharoshthi", "Khitan_Small_Script", "Khmer",
    "Khojki", "Khudawadi", "Lao", "Latin", "Lepcha", "Limbu", "Linear_A", "Linear_B",
    "Lisu", "Lycian", "Lydian", "Mahajani", "Makasar", "Malayalam", "Mandaic", "Manichaean",
    "Marchen", "Masaram_Gondi", "Medefaidrin", "Meetei_Mayek", "Mende_Kikakui",
    "Meroitic_Cursive", "Meroitic_Hieroglyphs", "Miao", "Modi", "Mongolian", "Mro",
    "Multani", "Myanmar", "Nabataean", "Nag_Mundari", "Nandinagari", "New_Tai_Lue", "Newa",
    "Nko", "Nushu", "Nyiakeng_Puachue_Hmong", "Ogham", "Ol_Chiki", "Old_Hungarian",
    "Old_Italic", "Old_North_Arabian", "Old_Permic", "Old_Persian", "Old_Sogdian",
    "Old_South_Arabian", "Old_Turkic", "Old_Uyghur", "Oriya", "Osage", "Osmanya",
    "Pahawh_Hmong", "Palmyrene", "Pau_Cin_Hau", "Phags_Pa", "Phoenician", "Psalter_Pahlavi",
    "Rejang", "Runic", "Samaritan", "Saurashtra", "Sharada", "Shavian", "Siddham",
    "SignWriting", "Sinhala", "Sogdian", "Sora_Sompeng", "Soyombo", "Sundanese",
    "Syloti_Nagri", "Syriac", "Tagalog", "Tagbanwa", "Tai_Le", "Tai_Tham", "Tai_Viet",
    "Takri", "Tamil", "Tangsa", "Tangut", "Telugu", "Thaana", "Thai", "Tibetan", "Tifinagh",
    "Tirhuta", "Toto", "Ugaritic", "Vai", "Vithkuqi", "Wancho", "Warang_Citi", "Yezidi",
    "Yi", "Zanabazar_Square",
];

/// `\d \s \w` and POSIX classes by name: the ranges Go gives them (ASCII only).
fn ascii_class(name: &str) -> Option<&'static str> {
    Some(match name {
        "d" | "digit" => r"0-9",
        "s" => r"\t\n\x0C\r ",
        "w" | "word" => r"0-9A-Za-z_",
        "alnum" => r"0-9A-Za-z",
        "alpha" => r"A-Za-z",
        "ascii" => r"\x00-\x7F",
        "blank" => r"\t ",
        "cntrl" => r"\x00-\x1F\x7F",
        "graph" => r"!-~",
        "lower" => r"a-z",
        "print" => r" -~",
        "punct" => r"!-/:-@\[-`\{-~",
        "space" => r"\t-\r ",
        "upper" => r"A-Z",
        "xdigit" => r"0-9A-Fa-f",
        _ => return None,
    })
}

/// A class that matches nothing (what a surrogate code point matches in UTF-8 text).
const NOTHING: &str = r"[^\x{0}-\x{10FFFF}]";

fn go_error(code: &str, expr: &str) -> String {
    format!("error parsing regexp: {code}: `{expr}`")
}

/// The flags Go lets a pattern set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Flags {
    fold_case: bool,
    multi_line: bool,
    dot_nl: bool,
    ungreedy: bool,
}

impl Flags {
    /// The flags in full, as a `regex` flag group's contents.
    fn spelled(self) -> String {
        let (mut on, mut off) = (String::new(), String::from("-"));
        for (set, c) in [
            (self.fold_case, 'i'),
            (self.multi_line, 'm'),
            (self.dot_nl, 's'),
            (self.ungreedy, 'U'),
        ] {
            if set { &mut on } else { &mut off }.push(c);
        }
        if off.len() > 1 {
            on.push_str(&off);
        }
        on
    }
}

/// The last complete item of the sequence being read: what a repetition applies to.
#[derive(Debug, Clone, Copy)]
struct Item {
    /// Where it starts in the output.
    start: usize,
    /// The least count budget it fits in (Go's check of nested counts).
    need: u64,
    /// Whether it is a repetition already.
    repeated: bool,
}

/// An open group, and what to go back to when it closes.
struct Group {
    start: usize,
    flags: Flags,
    written: Flags,
    need: u64,
}

struct Translator<'a> {
    /// The pattern left to read.
    rest: &'a str,
    out: String,
    /// The flags in force by Go's reading.
    flags: Flags,
    /// The flags in force in what has been written.
    written: Flags,
    groups: Vec<Group>,
    /// The count budget of the items of the current group, but its last.
    need: u64,
    last: Option<Item>,
}

fn translate(pattern: &str) -> Result<String, String> {
    let mut t = Translator {
        rest: pattern,
        out: String::with_capacity(pattern.len() * 2),
        flags: Flags::default(),
        written: Flags::default(),
        groups: Vec::new(),
        need: 0,
        last: None,
    };
    // Where the repetition operator just read starts, if the last token was one.
    let mut repeated_last: Option<&str> = None;
    while let Some(c) = t.rest.chars().next() {
        let mut repeated = None;
        match c {
            '(' => t.open()?,
            '|' => {
                t.settle();
                t.out.push('|');
                t.rest = &t.rest[1..];
            }
            ')' => t.close(pattern)?,
            '^' | '$' | '.' => {
                t.atom(&c.to_string());
                t.rest = &t.rest[1..];
            }
            '[' => {
                let class = t.class()?;
                t.atom(&class);
            }
            '*' | '+' | '?' => {
                let before = t.rest;
                t.rest = &t.rest[1..];
                t.repeat(before, &c.to_string(), None, repeated_last)?;
                repeated = Some(before);
            }
            '{' => match parse_count(t.rest) {
                None => {
                    t.literal('{');
                    t.rest = &t.rest[1..];
                }
                Some((min, max, after)) => {
                    let before = t.rest;
                    let written = &before[..before.len() - after.len()];
                    if min > MAX_REPEAT || max > MAX_REPEAT || max >= 0 && min > max {
                        return Err(go_error("invalid repeat count", written));
                    }
                    t.rest = after;
                    let op = match max {
                        -1 => format!("{{{min},}}"),
                        m if m == min => format!("{{{min}}}"),
                        m => format!("{{{min},{m}}}"),
                    };
                    t.repeat(before, &op, Some((min, max)), repeated_last)?;
                    repeated = Some(before);
                }
            },
            '\\' => t.escape()?,
            c => {
                t.literal(c);
                t.rest = &t.rest[c.len_utf8()..];
            }
        }
        repeated_last = repeated;
    }
    if !t.groups.is_empty() {
        return Err(go_error("missing closing )", pattern));
    }
    Ok(t.out)
}

/// `{min}`, `{min,}` (max -1) or `{min,max}` at the start of `s`, and what follows it;
/// `None` when it is not one (Go then reads the `{` as a literal).
fn parse_count(s: &str) -> Option<(i64, i64, &str)> {
    let s = s.strip_prefix('{')?;
    let (min, s) = parse_int(s)?;
    let (max, s) = match s.strip_prefix(',') {
        None => (min, s),
        Some(s) if s.starts_with('}') => (-1, s),
        Some(s) => parse_int(s)?,
    };
    let rest = s.strip_prefix('}')?;
    Some((min, max, rest))
}

/// A decimal number without leading zeros (`i64::MAX` when too large to be a count).
fn parse_int(s: &str) -> Option<(i64, &str)> {
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 || (digits >= 2 && s.starts_with('0')) {
        return None;
    }
    let n = s[..digits].parse().unwrap_or(i64::MAX);
    Some((n, &s[digits..]))
}

impl Translator<'_> {
    /// Ends the last item: it can no longer be repeated.
    fn settle(&mut self) {
        if let Some(last) = self.last.take() {
            self.need = self.need.max(last.need);
        }
    }

    /// Writes an item (with the flags it is read under).
    fn atom(&mut self, text: &str) {
        self.settle();
        if self.flags != self.written {
            self.out.push_str(&format!("(?{})", self.flags.spelled()));
            self.written = self.flags;
        }
        self.last = Some(Item {
            start: self.out.len(),
            need: 0,
            repeated: false,
        });
        self.out.push_str(text);
    }

    fn literal(&mut self, c: char) {
        self.atom(&regex::escape(c.encode_utf8(&mut [0; 4])));
    }

    /// A literal given by its code point (from an escape): a surrogate matches nothing.
    fn literal_code(&mut self, v: u32) {
        match char::from_u32(v) {
            Some(c) => self.literal(c),
            None => self.atom(NOTHING),
        }
    }

    /// A repetition operator (`op` as written out) of the last item; `count` for
    /// `{min,max}`.
    fn repeat(
        &mut self,
        before: &str,
        op: &str,
        count: Option<(i64, i64)>,
        repeated_last: Option<&str>,
    ) -> Result<(), String> {
        let lazy = self.rest.starts_with('?');
        if lazy {
            self.rest = &self.rest[1..];
        }
        let written = &before[..before.len() - self.rest.len()];
        if let Some(previous) = repeated_last {
            let both = &previous[..previous.len() - self.rest.len()];
            return Err(go_error("invalid nested repetition operator", both));
        }
        let Some(mut last) = self.last else {
            return Err(go_error("missing argument to repetition operator", written));
        };
        if let Some((min, max)) = count {
            last.need = match (min, max) {
                (_, 0) => 0,
                (0, -1) => last.need,
                (m, -1) | (_, m) => (m as u64).saturating_mul(last.need.max(1)),
            };
            if (min >= 2 || max >= 2) && last.need > MAX_REPEAT as u64 {
                return Err(go_error("invalid repeat count", written));
            }
        }
        if last.repeated {
            // A repetition of a repetition, which only a flag group between them lets
            // through: the regex crate wants it grouped.
            self.out.insert_str(last.start, "(?:");
            self.out.push(')');
        }
        self.out.push_str(op);
        if lazy {
            self.out.push('?');
        }
        last.repeated = true;
        self.last = Some(last);
        Ok(())
    }

    /// `(`, `(?P<name>`, `(?<name>`, `(?flags)` or `(?flags:`.
    fn open(&mut self) -> Result<(), String> {
        let s = self.rest;
        let Some(after) = s.strip_prefix("(?") else {
            self.rest = &s[1..];
            return self.push_group("(");
        };
        let named = after
            .strip_prefix("P<")
            .filter(|_| s.len() > 4)
            .or_else(|| after.strip_prefix('<').filter(|_| s.len() > 3));
        if let Some(named) = named {
            let Some(end) = named.find('>') else {
                return Err(go_error("invalid named capture", s));
            };
            let name = &named[..end];
            let capture = &s[..s.len() - named.len() + end + 1];
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(go_error("invalid named capture", capture));
            }
            self.rest = &named[end + 1..];
            // Names do not change what matches (and Go allows a name twice).
            return self.push_group("(");
        }
        let mut flags = self.flags;
        let mut negated = false;
        let mut saw_flag = false;
        for (i, c) in after.char_indices() {
            let on = !negated;
            match c {
                'i' => flags.fold_case = on,
                'm' => flags.multi_line = on,
                's' => flags.dot_nl = on,
                'U' => flags.ungreedy = on,
                '-' if !negated => {
                    negated = true;
                    saw_flag = false;
                    continue;
                }
                ':' | ')' if !negated || saw_flag => {
                    self.rest = &after[i + 1..];
                    if c == ')' {
                        self.flags = flags;
                        return Ok(());
                    }
                    self.push_group("(?:")?;
                    self.flags = flags;
                    return Ok(());
                }
                _ => {
                    let end = 2 + i + c.len_utf8();
                    return Err(go_error("invalid or unsupported Perl syntax", &s[..end]));
                }
            }
            saw_flag = true;
        }
        Err(go_error("invalid or unsupported Perl syntax", s))
    }

    fn push_group(&mut self, open: &str) -> Result<(), String> {
        self.settle();
        self.groups.push(Group {
            start: self.out.len(),
            flags: self.flags,
            written: self.written,
            need: self.need,
        });
        self.need = 0;
        self.out.push_str(open);
        Ok(())
    }

    fn close(&mut self, pattern: &str) -> Result<(), String> {
        let Some(group) = self.groups.pop() else {
            return Err(go_error("unexpected )", pattern));
        };
        self.settle();
        let need = self.need;
        self.out.push(')');
        self.rest = &self.rest[1..];
        self.flags = group.flags;
        self.written = group.written;
        self.need = group.need;
        self.last = Some(Item {
            start: group.start,
            need,
            repeated: false,
        });
        Ok(())
    }

    /// An escape outside a class.
    fn escape(&mut self) -> Result<(), String> {
        let s = self.rest;
        match s.as_bytes().get(1) {
            Some(b'A') => self.atom(r"\A"),
            Some(b'z') => self.atom(r"\z"),
            Some(b'b') => self.atom(r"(?-u:\b)"),
            Some(b'B') => self.atom(r"(?-u:\B)"),
            Some(b'C') => return Err(go_error("invalid escape sequence", &s[..2])),
            Some(b'Q') => {
                let (quoted, rest) = s[2..].split_once(r"\E").unwrap_or((&s[2..], ""));
                for c in quoted.chars() {
                    self.literal(c);
                }
                self.rest = rest;
                return Ok(());
            }
            _ => {
                if let Some((class, rest)) = unicode_class(s)? {
                    self.atom(&class);
                    self.rest = rest;
                } else if let Some((class, rest)) = perl_class(s) {
                    self.atom(&format!("[{class}]"));
                    self.rest = rest;
                } else {
                    let (v, rest) = escaped_char(s)?;
                    self.literal_code(v);
                    self.rest = rest;
                }
                return Ok(());
            }
        }
        self.rest = &s[2..];
        Ok(())
    }

    /// A bracketed class, written as a `regex` class of explicit items.
    fn class(&mut self) -> Result<String, String> {
        let whole = self.rest;
        let mut t = &whole[1..];
        let negated = t.starts_with('^');
        if negated {
            t = &t[1..];
        }
        let mut items = String::new();
        let mut first = true;
        loop {
            if !first && t.starts_with(']') {
                t = &t[1..];
                break;
            }
            first = false;
            if t.len() > 2 && t.starts_with("[:") {
                if let Some(end) = t[2..].find(":]") {
                    let name = &t[..end + 4];
                    let inner = &name[2..name.len() - 2];
                    let (neg, base) = match inner.strip_prefix('^') {
                        Some(b) => (true, b),
                        None => (false, inner),
                    };
                    let ranges = ascii_class(base)
                        .filter(|_| !matches!(base, "d" | "s" | "w"))
                        .ok_or_else(|| go_error("invalid character class range", name))?;
                    items.push_str(&format!("[{}{ranges}]", if neg { "^" } else { "" }));
                    t = &t[end + 4..];
                    continue;
                }
            }
            if let Some((class, rest)) = unicode_class(t)? {
                items.push_str(&class);
                t = rest;
                continue;
            }
            if let Some((class, rest)) = perl_class(t) {
                items.push_str(&format!("[{class}]"));
                t = rest;
                continue;
            }
            let range_start = t;
            let (lo, rest) = class_char(t, whole)?;
            t = rest;
            let mut hi = lo;
            if t.len() >= 2 && t.starts_with('-') && !t[1..].starts_with(']') {
                let (h, rest) = class_char(&t[1..], whole)?;
                t = rest;
                hi = h;
                if hi < lo {
                    let written = &range_start[..range_start.len() - t.len()];
                    return Err(go_error("invalid character class range", written));
                }
            }
            // Surrogates match nothing in UTF-8 text (and the regex crate has no
            // such code points): leave them out.
            let (lo, hi) = match (lo, hi) {
                (0xD800..=0xDFFF, 0xD800..=0xDFFF) => continue,
                (0xD800..=0xDFFF, hi) => (0xE000, hi),
                (lo, 0xD800..=0xDFFF) => (lo, 0xD7FF),
                range => range,
            };
            if lo == hi {
                items.push_str(&format!(r"\x{{{lo:X}}}"));
            } else {
                items.push_str(&format!(r"\x{{{lo:X}}}-\x{{{hi:X}}}"));
            }
        }
        if items.is_empty() {
            items.push_str(NOTHING);
        }
        self.rest = t;
        Ok(format!("[{}{items}]", if negated { "^" } else { "" }))
    }
}

/// `\d`, `\D`, `\s`, `\S`, `\w` or `\W` at the start of `s`: its class contents (ASCII,
/// as Go has them) and what follows.
fn perl_class(s: &str) -> Option<(String, &str)> {
    let s = s.strip_prefix('\\')?;
    let c = s.chars().next()?;
    let ranges = ascii_class(&c.to_ascii_lowercase().to_string())
        .filter(|_| matches!(c, 'd' | 'D' | 's' | 'S' | 'w' | 'W'))?;
    let neg = if c.is_ascii_uppercase() { "^" } else { "" };
    Some((format!("{neg}{ranges}"), &s[1..]))
}

/// `\pN`, `\p{Name}`, `\p{^Name}` or `\P…` at the start of `s`: the class as a `regex`
/// item and what follows; `None` if `s` holds no such class.
fn unicode_class(s: &str) -> Result<Option<(String, &str)>, String> {
    let mut negated = match s.as_bytes() {
        [b'\\', b'p', ..] => false,
        [b'\\', b'P', ..] => true,
        _ => return Ok(None),
    };
    let t = &s[2..];
    let (written, mut name, rest) = match t.chars().next() {
        Some('{') => {
            let Some(end) = s.find('}') else {
                return Err(go_error("invalid character class range", s));
            };
            (&s[..end + 1], &s[3..end], &s[end + 1..])
        }
        Some(c) => (
            &s[..2 + c.len_utf8()],
            &t[..c.len_utf8()],
            &t[c.len_utf8()..],
        ),
        None => (s, "", ""),
    };
    if let Some(n) = name.strip_prefix('^') {
        negated = !negated;
        name = n;
    }
    let property = if name == "Any" {
        "Any".to_string()
    } else if name == "Cs" {
        // Surrogates: none in UTF-8 text (nor a class of them in the regex crate).
        let class = if negated { r"\p{Any}" } else { NOTHING };
        return Ok(Some((class.to_string(), rest)));
    } else if CATEGORIES.contains(&name) {
        format!("gc={name}")
    } else if SCRIPTS.contains(&name) {
        format!("sc={name}")
    } else {
        return Err(go_error("invalid character class range", written));
    };
    let p = if negated { 'P' } else { 'p' };
    Ok(Some((format!(r"\{p}{{{property}}}"), rest)))
}

/// A character of a class (maybe escaped), as a code point, and what follows.
fn class_char<'a>(s: &'a str, whole: &str) -> Result<(u32, &'a str), String> {
    match s.chars().next() {
        None => Err(go_error("missing closing ]", whole)),
        Some('\\') => escaped_char(s),
        Some(c) => Ok((u32::from(c), &s[c.len_utf8()..])),
    }
}

/// A single-character escape at the start of `s` (after `\`): its code point and what
/// follows. Octal takes up to three digits (`\1` to `\7` alone would be
/// back-references, which Go does not have); `\xHH` two hex digits, `\x{…}` any number
/// up to 10FFFF; punctuation stands for itself.
fn escaped_char(s: &str) -> Result<(u32, &str), String> {
    let t = &s[1..];
    let Some(c) = t.chars().next() else {
        return Err(go_error("trailing backslash at end of expression", ""));
    };
    let mut t = &t[c.len_utf8()..];
    let invalid = |t: &str| Err(go_error("invalid escape sequence", &s[..s.len() - t.len()]));
    let octal = |b: Option<&u8>| {
        b.filter(|b| (b'0'..=b'7').contains(b))
            .map(|b| u32::from(b - b'0'))
    };
    match c {
        '1'..='7' if octal(t.as_bytes().first()).is_none() => invalid(t),
        '0'..='7' => {
            let mut v = u32::from(c) - u32::from('0');
            for _ in 0..2 {
                let Some(d) = octal(t.as_bytes().first()) else {
                    break;
                };
                v = v * 8 + d;
                t = &t[1..];
            }
            Ok((v, t))
        }
        'x' => {
            let mut chars = t.chars();
            match chars.next() {
                None => invalid(t),
                Some('{') => {
                    let body = &t[1..];
                    let mut v: u32 = 0;
                    for (i, d) in body.char_indices() {
                        let after = &body[i + d.len_utf8()..];
                        if d == '}' {
                            return if i == 0 {
                                invalid(after)
                            } else {
                                Ok((v, after))
                            };
                        }
                        match d.to_digit(16) {
                            Some(d) if v * 16 + d <= 0x10FFFF => v = v * 16 + d,
                            _ => return invalid(after),
                        }
                    }
                    invalid("")
                }
                Some(x) => {
                    let y = chars.next();
                    let rest = chars.as_str();
                    match (x.to_digit(16), y.and_then(|y| y.to_digit(16))) {
                        (Some(x), Some(y)) => Ok((x * 16 + y, rest)),
                        _ => invalid(rest),
                    }
                }
            }
        }
        'a' => Ok((0x07, t)),
        'f' => Ok((0x0C, t)),
        'n' => Ok((0x0A, t)),
        'r' => Ok((0x0D, t)),
        't' => Ok((0x09, t)),
        'v' => Ok((0x0B, t)),
        c if c.is_ascii() && !c.is_ascii_alphanumeric() => Ok((u32::from(c), t)),
        _ => invalid(t),
    }
}

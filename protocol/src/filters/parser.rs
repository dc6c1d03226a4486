//! Selectors from tokens, and the decoding of quoted literals.

use std::fmt;

use super::scanner::{Ch, Scanner, Token};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Present,
    Equal,
    NotEqual,
    Matches,
}

/// A selector as written: its field path and value decoded (bytes: `\x` and octal
/// escapes may leave them outside UTF-8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Parsed {
    pub(super) path: Vec<Vec<u8>>,
    pub(super) op: Op,
    pub(super) value: Vec<u8>,
    /// Where the value starts in the filter.
    pub(super) value_pos: usize,
}

/// A filter that does not parse, shown as containerd shows it:
/// `parse error: [before >|c|< after]: message`, where `c` is the byte at the error
/// (`[filter]: message` when the error is at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    input: String,
    pos: usize,
    msg: String,
}

impl ParseError {
    pub(super) fn new(input: &str, pos: usize, msg: impl Into<String>) -> Self {
        Self {
            input: input.to_string(),
            pos,
            msg: msg.into(),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.input.as_bytes();
        if self.pos >= b.len() {
            return write!(f, "parse error: [{}]: {}", self.input, self.msg);
        }
        // One byte is marked, even of a longer character; what a byte cut from its
        // character leaves is shown as U+FFFD.
        let mut out = Vec::with_capacity(b.len() + 8);
        out.extend_from_slice(&b[..self.pos]);
        out.extend_from_slice(b" >|");
        out.push(b[self.pos]);
        out.extend_from_slice(b"|< ");
        out.extend_from_slice(&b[self.pos + 1..]);
        write!(
            f,
            "parse error: [{}]: {}",
            String::from_utf8_lossy(&out),
            self.msg
        )
    }
}

impl std::error::Error for ParseError {}

pub(super) struct Parser<'a> {
    input: &'a str,
    scanner: Scanner<'a>,
    /// Selectors allowed in the filter.
    max_selectors: usize,
}

impl<'a> Parser<'a> {
    pub(super) fn new(input: &'a str, max_selectors: usize) -> Self {
        Self {
            input,
            scanner: Scanner::new(input),
            max_selectors,
        }
    }

    fn err(&self, pos: usize, msg: impl Into<String>) -> ParseError {
        ParseError::new(self.input, pos, msg)
    }

    /// The scanner's problem, at `pos`.
    fn illegal(&self, pos: usize) -> ParseError {
        self.err(pos, self.scanner.err.unwrap_or_default())
    }

    /// `selector ("," selector)*`, to the end of the input.
    pub(super) fn selectors(mut self) -> Result<Vec<Parsed>, ParseError> {
        let mut all = vec![self.selector()?];
        loop {
            match self.scanner.peek() {
                Ch::Eof => return Ok(all),
                Ch::Char(',') => {
                    let (pos, token, _) = self.scanner.scan();
                    if token != Token::Separator {
                        return Err(self.err(pos, "expected a separator"));
                    }
                    if all.len() >= self.max_selectors {
                        return Err(
                            self.err(pos, format!("more than {} selectors", self.max_selectors))
                        );
                    }
                    all.push(self.selector()?);
                }
                ch => {
                    let c = match ch {
                        Ch::Char(c) => c,
                        _ => '\u{FFFD}',
                    };
                    return Err(self.err(self.scanner.ppos, format!("unexpected input: {c}")));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Parsed, ParseError> {
        let path = self.fieldpath()?;
        let present = Parsed {
            path,
            op: Op::Present,
            value: Vec::new(),
            value_pos: 0,
        };
        if matches!(self.scanner.peek(), Ch::Char(',') | Ch::Eof) {
            return Ok(present);
        }
        let op = self.operator()?;
        let (value_pos, value) = self.value(op == Op::Matches)?;
        Ok(Parsed {
            op,
            value,
            value_pos,
            ..present
        })
    }

    fn fieldpath(&mut self) -> Result<Vec<Vec<u8>>, ParseError> {
        let mut path = vec![self.field()?];
        while self.scanner.peek() == Ch::Char('.') {
            let (pos, token, _) = self.scanner.scan();
            if token != Token::Separator {
                return Err(self.err(pos, "expected a field separator (`.`)"));
            }
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<Vec<u8>, ParseError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Field => Ok(text.as_bytes().to_vec()),
            Token::Quoted => self.unquote(pos, text, false),
            Token::Illegal => Err(self.illegal(pos)),
            _ => Err(self.err(pos, "expected field or quoted")),
        }
    }

    fn operator(&mut self) -> Result<Op, ParseError> {
        let (pos, token, text) = self.scanner.scan();
        match token {
            Token::Operator => match text {
                "==" => Ok(Op::Equal),
                "!=" => Ok(Op::NotEqual),
                "~=" => Ok(Op::Matches),
                _ => Err(self.err(pos, format!("unsupported operator \"{text}\""))),
            },
            Token::Illegal => Err(self.illegal(pos)),
            _ => Err(self.err(pos, r#"expected an operator ("=="|"!="|"~=")"#)),
        }
    }

    /// The value after an operator; `/…/` and `|…|` are allowed if `alt_quotes`.
    fn value(&mut self, alt_quotes: bool) -> Result<(usize, Vec<u8>), ParseError> {
        let (pos, token, text) = self.scanner.scan();
        let value = match token {
            Token::Value | Token::Field => text.as_bytes().to_vec(),
            Token::Quoted => self.unquote(pos, text, alt_quotes)?,
            Token::Illegal => return Err(self.illegal(pos)),
            _ => return Err(self.err(pos, "expected value or quoted")),
        };
        Ok((pos, value))
    }

    fn unquote(&self, pos: usize, quoted: &str, alt_quotes: bool) -> Result<Vec<u8>, ParseError> {
        if !alt_quotes && !quoted.starts_with('"') {
            return Err(self.err(pos, "invalid quote encountered"));
        }
        unquote(quoted).ok_or_else(|| self.err(pos, "unquoting failed: quote syntax error"))
    }
}

/// Decodes a quoted literal (quotes included) as Go decodes a double-quoted string,
/// with its own quote character as the one that may be escaped; `None` if malformed.
pub(super) fn unquote(quoted: &str) -> Option<Vec<u8>> {
    let b = quoted.as_bytes();
    let (&quote, &last) = (b.first()?, b.last()?);
    if b.len() < 2 || quote != last || !matches!(quote, b'"' | b'/' | b'|') {
        return None;
    }
    let inner = &quoted[1..b.len() - 1];
    let mut out = Vec::with_capacity(inner.len());
    let mut rest = inner;
    while let Some(c) = rest.chars().next() {
        if c == '\n' || c == quote as char {
            return None;
        }
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let esc = rest.as_bytes();
        let kind = *esc.get(1)?;
        let mut used = 2;
        match kind {
            b'a' => out.push(0x07),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'\\' => out.push(b'\\'),
            b'"' | b'/' | b'|' if kind == quote => out.push(kind),
            b'x' | b'u' | b'U' => {
                let n = match kind {
                    b'x' => 2,
                    b'u' => 4,
                    _ => 8,
                };
                let digits = esc.get(2..2 + n)?;
                let mut v: u32 = 0;
                for d in digits {
                    v = v << 4 | (*d as char).to_digit(16)?;
                }
                used += n;
                if kind == b'x' {
                    // One byte, whatever it is.
                    out.push(u8::try_from(v).ok()?);
                } else if v > 0x10FFFF {
                    return None;
                } else {
                    // A surrogate half becomes U+FFFD.
                    let c = char::from_u32(v).unwrap_or('\u{FFFD}');
                    let mut buf = [0; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
            b'0'..=b'7' => {
                let digits = esc.get(1..4)?;
                let mut v: u32 = 0;
                for d in digits {
                    if !(b'0'..=b'7').contains(d) {
                        return None;
                    }
                    v = v << 3 | u32::from(d - b'0');
                }
                used = 4;
                // At most \377: one byte.
                out.push(u8::try_from(v).ok()?);
            }
            _ => return None,
        }
        rest = &rest[used..];
    }
    Some(out)
}

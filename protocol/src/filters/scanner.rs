//! The filter language's tokens.
//!
//! The scanner keeps two offsets: `pos`, where the character read last starts, and
//! `ppos`, where it ends. A token's text is `input[start..ppos]`. Whitespace before a
//! token is skipped; a field, value or operator ends at the first character that cannot
//! continue it. After an operator the scanner reads values instead of fields, until the
//! next value or separator.
//!
//! Problems are reported as [`Token::Illegal`] with a message in [`Scanner::err`]. The
//! message is the first one of the whole scan: it is set once, also by a look-ahead.

use std::sync::LazyLock;

use regex::Regex;

/// One character read, or why there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ch {
    /// The end of the input.
    Eof,
    /// A NUL or U+FFFD (what a decoder leaves of invalid UTF-8).
    Illegal,
    Char(char),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Token {
    Eof,
    /// `"…"`, `/…/` or `|…|`, escapes checked but not decoded.
    Quoted,
    /// A bare value (only right after an operator).
    Value,
    /// `[A-Za-z0-9_]+`.
    Field,
    /// `,` or `.`.
    Separator,
    /// A run of `=`, `!` and `~`.
    Operator,
    Illegal,
    /// Any other character, alone.
    Other(char),
}

pub(super) struct Scanner<'a> {
    input: &'a str,
    /// Where the character read last starts.
    pos: usize,
    /// Where the character read last ends: the next one starts here.
    pub(super) ppos: usize,
    /// Whether the next bare word is a value (an operator came before it).
    value: bool,
    /// The first problem met.
    pub(super) err: Option<&'static str>,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '~')
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn is_separator(c: char) -> bool {
    matches!(c, ',' | '.')
}

/// A character a bare value may hold: a graphic one (a letter, mark, number,
/// punctuation or symbol) other than `,`; never white space, a control or format
/// character, a private-use or unassigned code point.
fn is_value_char(c: char) -> bool {
    static GRAPHIC: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"^[\p{L}\p{M}\p{N}\p{P}\p{S}]$").expect("a valid class"));
    if c.is_ascii() {
        return c.is_ascii_graphic() && c != ',';
    }
    !c.is_whitespace() && GRAPHIC.is_match(c.encode_utf8(&mut [0; 4]))
}

/// The value of a hexadecimal digit; 16 for anything else.
fn digit_value(ch: Ch) -> u32 {
    match ch {
        Ch::Char(c) => c.to_digit(16).unwrap_or(16),
        _ => 16,
    }
}

impl<'a> Scanner<'a> {
    pub(super) fn new(input: &'a str) -> Self {
        Self {
            input,
            pos: 0,
            ppos: 0,
            value: false,
            err: None,
        }
    }

    fn error(&mut self, msg: &'static str) {
        self.err.get_or_insert(msg);
    }

    /// Reads one character.
    fn next(&mut self) -> Ch {
        if self.pos >= self.input.len() {
            return Ch::Eof;
        }
        self.pos = self.ppos;
        let Some(c) = self.input[self.ppos..].chars().next() else {
            return Ch::Eof;
        };
        self.ppos += c.len_utf8();
        match c {
            '\u{FFFD}' => {
                self.error("rune error");
                Ch::Illegal
            }
            '\0' => {
                self.error("unexpected null");
                Ch::Illegal
            }
            c => Ch::Char(c),
        }
    }

    /// The next character, left unread (a problem it meets is still recorded).
    pub(super) fn peek(&mut self) -> Ch {
        let (pos, ppos) = (self.pos, self.ppos);
        let ch = self.next();
        (self.pos, self.ppos) = (pos, ppos);
        ch
    }

    /// Reads characters while `keep` holds for the next one.
    fn take_while(&mut self, keep: impl Fn(char) -> bool) {
        while let Ch::Char(c) = self.peek() {
            if !keep(c) {
                break;
            }
            self.next();
        }
    }

    /// The next token: where it starts, what it is, and its text.
    pub(super) fn scan(&mut self) -> (usize, Token, &'a str) {
        let mut ch = self.next();
        let mut start = self.pos;
        while let Ch::Char(c) = ch {
            let token = if is_quote(c) {
                if self.quoted(c) {
                    Token::Quoted
                } else {
                    Token::Illegal
                }
            } else if is_separator(c) {
                self.value = false;
                Token::Separator
            } else if is_operator_char(c) {
                self.take_while(is_operator_char);
                self.value = true;
                Token::Operator
            } else if c.is_whitespace() {
                ch = self.next();
                start = self.pos;
                continue;
            } else if self.value {
                self.take_while(is_value_char);
                self.value = false;
                Token::Value
            } else if is_field_char(c) {
                self.take_while(is_field_char);
                Token::Field
            } else {
                break;
            };
            return (start, token, &self.input[start..self.ppos]);
        }
        let token = match ch {
            Ch::Eof => Token::Eof,
            Ch::Illegal => Token::Illegal,
            Ch::Char(c) => Token::Other(c),
        };
        (self.pos, token, "")
    }

    /// Reads a quoted literal up to its closing `quote` (the opening one is read);
    /// false if it is not terminated or an escape in it is malformed.
    fn quoted(&mut self, quote: char) -> bool {
        let mut legal = true;
        let mut ch = self.next();
        while ch != Ch::Char(quote) {
            match ch {
                Ch::Char('\n') | Ch::Eof | Ch::Illegal => {
                    self.error("quoted literal not terminated");
                    return false;
                }
                Ch::Char('\\') => {
                    let ok;
                    (ch, ok) = self.escape(quote);
                    legal &= ok;
                }
                _ => ch = self.next(),
            }
        }
        legal
    }

    /// Reads an escape after its backslash: the character after it, and whether the
    /// escape is well formed.
    fn escape(&mut self, quote: char) -> (Ch, bool) {
        let ch = self.next();
        match ch {
            Ch::Char('a' | 'b' | 'f' | 'n' | 'r' | 't' | 'v' | '\\') => (self.next(), true),
            Ch::Char(c) if c == quote => (self.next(), true),
            Ch::Char('0'..='7') => self.digits(ch, 8, 3),
            Ch::Char('x') => {
                let first = self.next();
                self.digits(first, 16, 2)
            }
            Ch::Char('u') => {
                let first = self.next();
                self.digits(first, 16, 4)
            }
            Ch::Char('U') => {
                let first = self.next();
                self.digits(first, 16, 8)
            }
            _ => {
                self.error("illegal escape sequence");
                (ch, false)
            }
        }
    }

    /// Reads `n` digits in `base`, the first being `ch`: the character after them, and
    /// whether all `n` were there.
    fn digits(&mut self, mut ch: Ch, base: u32, mut n: usize) -> (Ch, bool) {
        while n > 0 && digit_value(ch) < base {
            ch = self.next();
            n -= 1;
        }
        if n > 0 {
            self.error("illegal numeric escape sequence");
            return (ch, false);
        }
        (ch, true)
    }
}

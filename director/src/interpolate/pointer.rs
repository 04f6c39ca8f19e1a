//! go-patch paths ("pointers"): parsing `/a/b=c?/0:next/-` into tokens and
//! printing them back the way go-patch does in its error messages.
//!
//! This module owns path syntax only. It must not look at documents (see
//! `patch`), and it must not touch the director's state, CPIs or the network.
//!
//! Syntax (go-patch's `NewPointerFromString`):
//! - a path is empty (the whole document) or starts with `/`;
//! - tokens are split on `/`; each may carry `:prev`, `:next`, `:before`,
//!   `:after` modifiers (split on `:` before unescaping);
//! - `-` as the last token appends (no modifiers allowed);
//! - a token that parses as an integer is an array index (negative counts
//!   from the end);
//! - a trailing `?` makes this token and every later one optional;
//! - `key=value` selects the one array item that is a map whose `key` is the
//!   string `value`;
//! - anything else is a map key (modifiers not allowed).
//!
//! Escapes, decoded inside keys and `key=value` parts: `~0` = `~`,
//! `~1` = `/`, `~2` = `?`, `~3` = `=`, `~7` = `:`.

use std::fmt;

/// A modifier on an index or `key=value` token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modifier {
    /// `:prev`: the item before the selected one.
    Prev,
    /// `:next`: the item after the selected one.
    Next,
    /// `:before`: (replace only) insert before the selected item.
    Before,
    /// `:after`: (replace only) insert after the selected item.
    After,
}

impl Modifier {
    pub fn name(self) -> &'static str {
        match self {
            Modifier::Prev => "prev",
            Modifier::Next => "next",
            Modifier::Before => "before",
            Modifier::After => "after",
        }
    }
}

/// One token of a path (the root is implicit).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Token {
    /// An array index; negative counts from the end.
    Index {
        index: i64,
        modifiers: Vec<Modifier>,
    },
    /// `-`: after the last item (append).
    AfterLast,
    /// `key=value`: the single array item that is a map with `key: value`.
    Matching {
        key: String,
        value: String,
        optional: bool,
        modifiers: Vec<Modifier>,
    },
    /// A map key.
    Key { key: String, optional: bool },
}

/// A parsed go-patch path.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Pointer {
    tokens: Vec<Token>,
}

/// A path that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PointerError {
    #[error("Expected to start with '/'")]
    NoLeadingSlash,
    #[error("Expected to find one of the following modifiers: 'prev', 'next', 'before', or 'after' but found '{0}'")]
    UnknownModifier(String),
    #[error("Expected not to find any modifiers with after last index token")]
    ModifierOnAfterLast,
    #[error("Expected not to find any modifiers with key token")]
    ModifierOnKey,
}

impl Pointer {
    /// Parse a path; the empty string is the whole document.
    pub fn parse(text: &str) -> Result<Pointer, PointerError> {
        if text.is_empty() {
            return Ok(Pointer::default());
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PointerError::NoLeadingSlash);
        };
        let pieces: Vec<&str> = rest.split('/').collect();
        let mut tokens = Vec::with_capacity(pieces.len());
        let mut optional = false;
        for (i, piece) in pieces.iter().enumerate() {
            let is_last = i + 1 == pieces.len();
            let mut parts = piece.split(':');
            let mut tok = parts.next().unwrap_or_default();
            let mut modifiers = Vec::new();
            for m in parts {
                modifiers.push(match m {
                    "prev" => Modifier::Prev,
                    "next" => Modifier::Next,
                    "before" => Modifier::Before,
                    "after" => Modifier::After,
                    other => return Err(PointerError::UnknownModifier(other.to_string())),
                });
            }
            if is_last && tok == "-" {
                if !modifiers.is_empty() {
                    return Err(PointerError::ModifierOnAfterLast);
                }
                tokens.push(Token::AfterLast);
                continue;
            }
            if let Some(index) = parse_go_int(tok) {
                tokens.push(Token::Index { index, modifiers });
                continue;
            }
            if let Some(t) = tok.strip_suffix('?') {
                optional = true;
                tok = t;
            }
            if let Some((k, v)) = tok.split_once('=') {
                tokens.push(Token::Matching {
                    key: unescape(k),
                    value: unescape(v),
                    optional,
                    modifiers,
                });
                continue;
            }
            if !modifiers.is_empty() {
                return Err(PointerError::ModifierOnKey);
            }
            tokens.push(Token::Key {
                key: unescape(tok),
                optional,
            });
        }
        Ok(Pointer { tokens })
    }

    /// A path made of the given tokens.
    pub fn from_tokens(tokens: Vec<Token>) -> Pointer {
        Pointer { tokens }
    }

    pub fn tokens(&self) -> &[Token] {
        &self.tokens
    }

    /// True for the empty path (the whole document).
    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The path made of the first `n` tokens, printed (for messages).
    pub fn prefix_string(&self, n: usize) -> String {
        format_tokens(&self.tokens[..n.min(self.tokens.len())])
    }
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_tokens(&self.tokens))
    }
}

impl std::str::FromStr for Pointer {
    type Err = PointerError;
    fn from_str(s: &str) -> Result<Pointer, PointerError> {
        Pointer::parse(s)
    }
}

/// Print tokens as go-patch does: `?` only after the first optional token.
fn format_tokens(tokens: &[Token]) -> String {
    let mut out = String::new();
    let mut optional_seen = false;
    for token in tokens {
        out.push('/');
        match token {
            Token::Index { index, modifiers } => {
                out.push_str(&index.to_string());
                push_modifiers(&mut out, modifiers);
            }
            Token::AfterLast => out.push('-'),
            Token::Matching {
                key,
                value,
                optional,
                modifiers,
            } => {
                out.push_str(&escape(key));
                out.push('=');
                out.push_str(&escape(value));
                if *optional && !optional_seen {
                    out.push('?');
                    optional_seen = true;
                }
                push_modifiers(&mut out, modifiers);
            }
            Token::Key { key, optional } => {
                out.push_str(&escape(key));
                if *optional && !optional_seen {
                    out.push('?');
                    optional_seen = true;
                }
            }
        }
    }
    out
}

fn push_modifiers(out: &mut String, modifiers: &[Modifier]) {
    for m in modifiers {
        out.push(':');
        out.push_str(m.name());
    }
}

/// Go's `strconv.Atoi`: optional sign, ASCII digits, fits in 64 bits.
fn parse_go_int(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<i64>().ok()
}

/// Decode `~0`, `~1`, `~2`, `~3`, `~7` left to right (like Go's
/// `strings.Replacer`: other `~` sequences stay as they are).
pub fn unescape(s: &str) -> String {
    if !s.contains('~') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '~' {
            let decoded = match chars.peek() {
                Some('0') => Some('~'),
                Some('1') => Some('/'),
                Some('2') => Some('?'),
                Some('3') => Some('='),
                Some('7') => Some(':'),
                _ => None,
            };
            if let Some(d) = decoded {
                chars.next();
                out.push(d);
                continue;
            }
        }
        out.push(c);
    }
    out
}

/// Encode a key for printing in a path (inverse of [`unescape`]).
pub fn escape(s: &str) -> String {
    if !s.contains(['~', '/', '?', '=', ':']) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            '~' => out.push_str("~0"),
            '/' => out.push_str("~1"),
            '?' => out.push_str("~2"),
            '=' => out.push_str("~3"),
            ':' => out.push_str("~7"),
            c => out.push(c),
        }
    }
    out
}

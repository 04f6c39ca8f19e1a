//! Names that operators give (deployments, instance groups, jobs, networks,
//! azs, VM and disk types, variables) and that bosun may turn into file
//! names, lock files, tags or object names: BOSH's character set,
//! `[-0-9A-Za-z_+.]`, at most [`MAX_LEN`] characters, and never a name made
//! only of dots (`.` and `..` are path components).
//!
//! This module only says whether a name is acceptable. It must not build
//! paths itself: callers that turn a name into a path check it here first.

use crate::model::yaml::{Decoder, Fields};

/// The longest name accepted (well under a file name's 255 bytes, so a
/// name plus a suffix such as `.lock` always fits).
pub const MAX_LEN: usize = 128;

/// Why a name is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} '{shown}' is not a valid name: {why}")]
pub struct NameError {
    pub what: String,
    /// The name, with control characters escaped.
    pub shown: String,
    pub why: &'static str,
}

/// Check `name` (a `what`: "deployment name", "network name", ...).
pub fn check(what: &str, name: &str) -> Result<(), NameError> {
    let why = if name.is_empty() {
        Some("it is empty")
    } else if name.chars().count() > MAX_LEN {
        Some("it is longer than 128 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'.'))
    {
        Some("use only letters, digits, '-', '_', '+' and '.'")
    } else if name.bytes().all(|b| b == b'.') {
        Some("a name cannot be only dots")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(NameError {
            what: what.to_string(),
            shown: name.escape_debug().to_string(),
            why,
        }),
    }
}

/// The string under `key` of `f`, checked as a name; a bad name is
/// reported at its path and gives `None`.
pub fn decode(d: &mut Decoder, f: &Fields, key: &str, what: &str) -> Option<String> {
    let name = d.str(f, key)?;
    match check(what, &name) {
        Ok(()) => Some(name),
        Err(e) => {
            d.problem(&f.child(key), e.to_string());
            None
        }
    }
}

/// A list of names under `key` (absent or null: empty); bad ones are
/// reported at their paths and left out.
pub fn decode_list(d: &mut Decoder, f: &Fields, key: &str, what: &str) -> Vec<String> {
    let mut names = Vec::new();
    for it in d.opt_seq(f, key) {
        let Some(name) = d.node_str(it.node, &it.path) else {
            continue;
        };
        match check(what, &name) {
            Ok(()) => names.push(name),
            Err(e) => d.problem(&it.path, e.to_string()),
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bosh_names_pass() {
        for n in [
            "quickstart",
            "cf",
            "kv-2",
            "zookeeper_1",
            "a.b",
            "v1+build",
            "Z9",
        ] {
            assert_eq!(check("deployment name", n), Ok(()), "{n}");
        }
        assert!(check("x", &"a".repeat(MAX_LEN)).is_ok());
    }

    #[test]
    fn names_that_could_escape_a_directory_are_refused() {
        for n in [
            "",
            ".",
            "..",
            "...",
            "../../x/Cargo",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\0b",
            "a b",
            "new\nline",
            "ünïcode",
            "$(rm)",
        ] {
            let e = check("deployment name", n).expect_err(n);
            assert!(e.to_string().starts_with("deployment name '"), "{e}");
        }
        assert!(check("x", &"a".repeat(MAX_LEN + 1)).is_err());
        let e = check("deployment name", "a\nb").expect_err("newline");
        assert_eq!(
            e.to_string(),
            "deployment name 'a\\nb' is not a valid name: use only letters, digits, '-', '_', '+' and '.'"
        );
    }
}

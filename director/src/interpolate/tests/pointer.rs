//! go-patch path syntax: tokens, modifiers, escapes, printing.

use crate::interpolate::pointer::{Modifier, Pointer, PointerError, Token};

#[test]
fn parses_every_token_kind() {
    let p = Pointer::parse("/instance_groups/name=web/jobs/0:next/-").unwrap();
    assert_eq!(
        p.tokens(),
        &[
            Token::Key {
                key: "instance_groups".into(),
                optional: false
            },
            Token::Matching {
                key: "name".into(),
                value: "web".into(),
                optional: false,
                modifiers: vec![]
            },
            Token::Key {
                key: "jobs".into(),
                optional: false
            },
            Token::Index {
                index: 0,
                modifiers: vec![Modifier::Next]
            },
            Token::AfterLast,
        ]
    );
    assert_eq!(p.to_string(), "/instance_groups/name=web/jobs/0:next/-");
}

#[test]
fn negative_index_and_empty_path() {
    let p = Pointer::parse("/a/-1").unwrap();
    assert_eq!(
        p.tokens()[1],
        Token::Index {
            index: -1,
            modifiers: vec![]
        }
    );
    assert!(Pointer::parse("").unwrap().is_root());
    // `-` that is not last is a plain map key.
    let p = Pointer::parse("/-/a").unwrap();
    assert_eq!(
        p.tokens()[0],
        Token::Key {
            key: "-".into(),
            optional: false
        }
    );
}

#[test]
fn escapes_decode_and_print_back() {
    let p = Pointer::parse("/a~1b/c~0d/e~2~3~7f/x~5").unwrap();
    let keys: Vec<&str> = p
        .tokens()
        .iter()
        .map(|t| match t {
            Token::Key { key, .. } => key.as_str(),
            _ => "",
        })
        .collect();
    assert_eq!(keys, ["a/b", "c~d", "e?=:f", "x~5"]);
    assert_eq!(p.to_string(), "/a~1b/c~0d/e~2~3~7f/x~05");
}

#[test]
fn optional_is_sticky_and_printed_once() {
    let p = Pointer::parse("/a?/b/name=x/c").unwrap();
    for t in p.tokens() {
        match t {
            Token::Key { optional, .. } | Token::Matching { optional, .. } => assert!(optional),
            _ => panic!("unexpected token"),
        }
    }
    assert_eq!(p.to_string(), "/a?/b/name=x/c");
    let p = Pointer::parse("/a/name=x?/b").unwrap();
    assert_eq!(p.to_string(), "/a/name=x?/b");
}

#[test]
fn path_syntax_errors() {
    assert_eq!(Pointer::parse("a/b"), Err(PointerError::NoLeadingSlash));
    assert_eq!(
        Pointer::parse("/a/0:sideways").unwrap_err().to_string(),
        "Expected to find one of the following modifiers: 'prev', 'next', 'before', or 'after' but found 'sideways'"
    );
    assert_eq!(
        Pointer::parse("/a:next").unwrap_err(),
        PointerError::ModifierOnKey
    );
    assert_eq!(
        Pointer::parse("/a/-:after").unwrap_err(),
        PointerError::ModifierOnAfterLast
    );
}

//! The public API: ops then variables then `--path`, output format, key
//! order, explicit stores, input errors.

use super::{int_err, int_ok, with_vars, y};
use crate::interpolate::{
    interpolate_value, interpolate_value_with, to_output, InterpolateOptions, MemoryStore,
    VariableStore,
};

#[test]
fn key_order_is_preserved_in_the_output() {
    let text = "zeta: 1\nalpha:\n  mu: 2\n  beta: 3\nmiddle:\n- c\n- a\n- b\n";
    assert_eq!(int_ok(text, &InterpolateOptions::default()), text);
}

#[test]
fn ops_then_variables_then_path() {
    let opts = InterpolateOptions {
        ops_files: vec![(
            "o.yml".to_string(),
            "- {type: replace, path: /db/password?, value: ((db_pw))}".to_string(),
        )],
        path: Some("/db/password".to_string()),
        ..with_vars(&[("db_pw", "s3cret")])
    };
    assert_eq!(int_ok("db: {}\n", &opts), "s3cret\n");
}

#[test]
fn path_prints_strings_raw_and_other_values_as_yaml() {
    let text = "a:\n  pem: |\n    -----BEGIN X-----\n    abc\n    -----END X-----\n  m: {k: v}\n";
    let raw = InterpolateOptions {
        path: Some("/a/pem".to_string()),
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_ok(text, &raw),
        "-----BEGIN X-----\nabc\n-----END X-----\n\n"
    );
    let map = InterpolateOptions {
        path: Some("/a/m".to_string()),
        ..InterpolateOptions::default()
    };
    assert_eq!(int_ok(text, &map), "k: v\n");
}

#[test]
fn path_errors() {
    let missing = InterpolateOptions {
        path: Some("/a/x".to_string()),
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: {b: 1}", &missing),
        "--path: Expected to find a map key 'x' for path '/a/x' (found map keys: 'b')"
    );
    let bad = InterpolateOptions {
        path: Some("a".to_string()),
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: 1", &bad),
        "--path 'a': Expected to start with '/'"
    );
    // A missing optional key is null, as in go-patch.
    let optional = InterpolateOptions {
        path: Some("/a/x?".to_string()),
        ..InterpolateOptions::default()
    };
    assert_eq!(int_ok("a: {b: 1}", &optional), "null\n");
}

#[test]
fn invalid_manifest_yaml_names_the_file_and_line() {
    let e =
        crate::interpolate::interpolate("m.yml", "a: 1\nb: [\n", &InterpolateOptions::default())
            .unwrap_err();
    match &e {
        crate::interpolate::InterpolateError::Yaml { file, line, .. } => {
            assert_eq!(file, "m.yml");
            assert!(line.is_some());
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().starts_with("m.yml: invalid YAML: "), "{e}");
}

#[test]
fn ops_file_errors_come_before_any_change_and_name_the_file() {
    let opts = InterpolateOptions {
        ops_files: vec![
            (
                "good.yml".to_string(),
                "- {type: remove, path: /a}".to_string(),
            ),
            ("bad.yml".to_string(), "- {type: remove}".to_string()),
        ],
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: 1", &opts),
        "operation [0] in bad.yml (line 1): missing 'path'"
    );
    let opts = InterpolateOptions {
        ops_files: vec![
            (
                "one.yml".to_string(),
                "- {type: remove, path: /a}".to_string(),
            ),
            (
                "two.yml".to_string(),
                "- {type: remove, path: /b}\n- {type: remove, path: /a}\n".to_string(),
            ),
        ],
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: 1\nb: 2\n", &opts),
        "operation [1] in two.yml failed (line 2): Expected to find a map key 'a' for path '/a' (found no other map keys)"
    );
}

#[test]
fn merge_keys_are_applied() {
    let text = "base: &b {x: 1, y: 2}\nderived:\n  <<: *b\n  y: 3\n";
    let v = interpolate_value("m.yml", text, &InterpolateOptions::default()).unwrap();
    assert_eq!(v["derived"], y("{x: 1, y: 3}"));
}

#[test]
fn found_definitions_leave_the_variables_section() {
    let opts = with_vars(&[("given", "v")]);
    let out = int_ok(
        "variables:\n- {name: given}\n- {name: other}\na: ((given))\n",
        &opts,
    );
    assert_eq!(out, "variables:\n- name: other\na: v\n");
}

#[test]
fn an_explicit_store_replaces_the_vars_store_file() {
    let mut store = MemoryStore::new();
    let text = "variables:\n- {name: pw, type: password}\na: ((pw))\n";
    let opts = InterpolateOptions::default();
    let first = interpolate_value_with("m.yml", text, &opts, Some(&mut store), &[]).unwrap();
    assert_eq!(store.len(), 1);
    assert!(store.definition_digest("pw").unwrap().is_some());
    let second = interpolate_value_with("m.yml", text, &opts, Some(&mut store), &[]).unwrap();
    assert_eq!(first, second);
    assert_eq!(Some(first["a"].clone()), store.get("pw").unwrap());
}

#[test]
fn empty_document_is_null() {
    assert_eq!(int_ok("", &InterpolateOptions::default()), "null\n");
    assert_eq!(
        to_output(&y("s: 1"), true).unwrap(),
        "s: 1\n",
        "raw output only changes strings"
    );
}

#[test]
fn invalid_vars_store_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.yml");
    std::fs::write(&path, "- not\n- a map\n").unwrap();
    let opts = InterpolateOptions {
        vars_store: Some(path.clone()),
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: 1", &opts),
        format!(
            "vars store {}: expected a map of variable names to values",
            path.display()
        )
    );
}

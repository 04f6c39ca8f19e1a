//! go-patch operations (replace, remove, test) on maps and arrays, every
//! token kind and modifier, exact error messages, ops-file shape errors.

use super::{err, ok, y};
use crate::interpolate::parse_ops;

const DOC: &str = "
name: dep
a:
  b: 1
  c: 2
list: [x, y, z]
jobs:
- name: web
  instances: 1
- name: db
  instances: 2
";

// ------------------------------------------------------------- replace

#[test]
fn replace_existing_map_key_keeps_key_order() {
    let v = ok(DOC, "- {type: replace, path: /a/b, value: 10}");
    assert_eq!(v["a"], y("{b: 10, c: 2}"));
    let keys: Vec<&str> = v["a"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["b", "c"]);
}

#[test]
fn replace_nested_value_with_structure() {
    let v = ok(
        DOC,
        "- type: replace\n  path: /a/c\n  value:\n    deep: [1, {k: v}]\n",
    );
    assert_eq!(v["a"]["c"], y("deep: [1, {k: v}]"));
}

#[test]
fn replace_missing_key_is_an_error_with_siblings() {
    assert_eq!(
        err(DOC, "- {type: replace, path: /a/x, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map key 'x' for path '/a/x' (found map keys: 'b', 'c')"
    );
}

#[test]
fn missing_key_in_empty_map_says_no_other_keys() {
    assert_eq!(
        err("a: {}", "- {type: replace, path: /a/x/y, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map key 'x' for path '/a/x' (found no other map keys)"
    );
}

#[test]
fn replace_array_index_and_negative_indexes() {
    let v = ok(DOC, "- {type: replace, path: /list/1, value: Y}");
    assert_eq!(v["list"], y("[x, Y, z]"));
    let v = ok(DOC, "- {type: replace, path: /list/-1, value: Z}");
    assert_eq!(v["list"], y("[x, y, Z]"));
    let v = ok(DOC, "- {type: replace, path: /list/-3, value: X}");
    assert_eq!(v["list"], y("[X, y, z]"));
}

#[test]
fn index_out_of_range_error() {
    assert_eq!(
        err("a: [1, 2]", "- {type: replace, path: /a/5, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find array index '5' but found array of length '2' for path '/a/5'"
    );
    assert_eq!(
        err("a: [1, 2]", "- {type: replace, path: /a/-3, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find array index '-3' but found array of length '2' for path '/a/-3'"
    );
}

#[test]
fn append_with_dash() {
    let v = ok(DOC, "- {type: replace, path: /list/-, value: w}");
    assert_eq!(v["list"], y("[x, y, z, w]"));
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=web/tags?/-, value: t}",
    );
    assert_eq!(v["jobs"][0]["tags"], y("[t]"));
}

#[test]
fn type_mismatch_errors_name_the_kind_found() {
    assert_eq!(
        err(DOC, "- {type: replace, path: /a/-, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find an array at path '/a/-' but found a map"
    );
    assert_eq!(
        err(DOC, "- {type: replace, path: /list/k, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map at path '/list/k' but found an array"
    );
    assert_eq!(
        err(DOC, "- {type: replace, path: /name/k, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map at path '/name/k' but found a string"
    );
    assert_eq!(
        err("a: ~", "- {type: replace, path: /a/0, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find an array at path '/a/0' but found null"
    );
}

#[test]
fn matching_index_replaces_inside_the_single_match() {
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=db/instances, value: 5}",
    );
    assert_eq!(
        v["jobs"],
        y("[{name: web, instances: 1}, {name: db, instances: 5}]")
    );
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=db, value: {name: pg}}",
    );
    assert_eq!(v["jobs"][1], y("{name: pg}"));
}

#[test]
fn matching_index_with_no_match_is_an_error() {
    assert_eq!(
        err(DOC, "- {type: replace, path: /jobs/name=x/instances, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find exactly one matching array item for path '/jobs/name=x' but found 0"
    );
}

#[test]
fn matching_index_with_two_matches_is_an_error() {
    let doc = "jobs: [{name: a}, {name: a}, {name: b}]";
    assert_eq!(
        err(doc, "- {type: remove, path: /jobs/name=a}"),
        "operation [0] in ops.yml failed (line 1): Expected to find exactly one matching array item for path '/jobs/name=a' but found 2"
    );
}

#[test]
fn matching_index_compares_strings_only() {
    // `id: 1` is a number, so `id=1` does not match it (as in go-patch).
    let doc = "items: [{id: 1}, {id: '1', v: s}]";
    let v = ok(doc, "- {type: replace, path: /items/id=1/v, value: t}");
    assert_eq!(v["items"], y("[{id: 1}, {id: '1', v: t}]"));
}

#[test]
fn optional_key_creates_nested_maps() {
    let v = ok(DOC, "- {type: replace, path: /props?/x/y/z, value: 1}");
    assert_eq!(v["props"], y("{x: {y: {z: 1}}}"));
    // Existing parts are reused.
    let v = ok(DOC, "- {type: replace, path: /a/d?/e, value: 3}");
    assert_eq!(v["a"], y("{b: 1, c: 2, d: {e: 3}}"));
}

#[test]
fn optional_key_creates_an_array_for_append_and_matching() {
    let v = ok("{}", "- {type: replace, path: /a?/-, value: 1}");
    assert_eq!(v, y("a: [1]"));
    let v = ok("{}", "- {type: replace, path: /a?/name=n/v, value: 1}");
    assert_eq!(v, y("a: [{name: n, v: 1}]"));
}

#[test]
fn optional_matching_index_appends_then_continues() {
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=cache?/instances, value: 3}",
    );
    assert_eq!(v["jobs"][2], y("{name: cache, instances: 3}"));
    // An existing match is used as is.
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=web?/instances, value: 4}",
    );
    assert_eq!(v["jobs"][0], y("{name: web, instances: 4}"));
    assert_eq!(v["jobs"].as_sequence().unwrap().len(), 2);
}

#[test]
fn optional_matching_index_as_last_token_appends_the_value() {
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=cache?, value: {name: cache, x: 1}}",
    );
    assert_eq!(v["jobs"][2], y("{name: cache, x: 1}"));
}

#[test]
fn optional_path_at_depth_under_matching_index() {
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=web/properties?/tls/enabled, value: true}",
    );
    assert_eq!(v["jobs"][0]["properties"], y("tls: {enabled: true}"));
}

#[test]
fn optional_key_before_index_cannot_create() {
    assert_eq!(
        err("{}", "- {type: replace, path: /a?/0, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find key, matching index or after last index token at path '/a?/0'"
    );
}

#[test]
fn before_and_after_insert_next_to_an_index() {
    let v = ok(DOC, "- {type: replace, path: /list/0:before, value: w}");
    assert_eq!(v["list"], y("[w, x, y, z]"));
    let v = ok(DOC, "- {type: replace, path: /list/1:after, value: w}");
    assert_eq!(v["list"], y("[x, y, w, z]"));
    let v = ok(DOC, "- {type: replace, path: /list/-1:after, value: w}");
    assert_eq!(v["list"], y("[x, y, z, w]"));
}

#[test]
fn before_and_after_insert_next_to_a_matching_item() {
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=db:before, value: {name: mid}}",
    );
    let names: Vec<&str> = v["jobs"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "mid", "db"]);
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=web:after, value: {name: mid}}",
    );
    assert_eq!(v["jobs"][1]["name"], y("mid"));
}

#[test]
fn prev_and_next_move_the_selection() {
    let v = ok(DOC, "- {type: replace, path: /list/1:prev, value: X}");
    assert_eq!(v["list"], y("[X, y, z]"));
    let v = ok(DOC, "- {type: replace, path: /list/1:next, value: Z}");
    assert_eq!(v["list"], y("[x, y, Z]"));
    let v = ok(
        DOC,
        "- {type: replace, path: /jobs/name=web:next/instances, value: 9}",
    );
    assert_eq!(v["jobs"][1]["instances"], y("9"));
    let v = ok(
        DOC,
        "- {type: replace, path: /list/2:prev:before, value: w}",
    );
    assert_eq!(v["list"], y("[x, w, y, z]"));
}

#[test]
fn next_past_the_end_is_a_missing_index() {
    assert_eq!(
        err(DOC, "- {type: replace, path: /list/2:next, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find array index '3' but found array of length '3' for path '/list/2:next'"
    );
}

#[test]
fn modifiers_after_before_are_rejected() {
    assert_eq!(
        err(DOC, "- {type: replace, path: /list/0:before:next, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to not find any modifiers after 'before' modifier, but found modifier 'next' in path '/list/0:before:next'"
    );
    // before/after only make sense on the last token.
    assert_eq!(
        err(DOC, "- {type: replace, path: /jobs/0:after/name, value: 1}"),
        "operation [0] in ops.yml failed (line 1): Expected to find one of the following modifiers: 'prev', 'next', but found modifier 'after' in path '/jobs/0:after'"
    );
}

#[test]
fn replace_the_whole_document() {
    let v = ok(DOC, "- {type: replace, path: '', value: {fresh: true}}");
    assert_eq!(v, y("fresh: true"));
}

#[test]
fn escaped_keys_address_keys_with_slashes_and_tildes() {
    let doc = "props:\n  a/b: 1\n  c~d: 2\n";
    let v = ok(
        doc,
        "- {type: replace, path: /props/a~1b, value: 10}\n- {type: replace, path: /props/c~0d, value: 20}\n",
    );
    assert_eq!(v["props"], y("{a/b: 10, c~d: 20}"));
}

// -------------------------------------------------------------- remove

#[test]
fn remove_map_key_keeps_the_order_of_the_others() {
    let v = ok("{a: 1, b: 2, c: 3, d: 4}", "- {type: remove, path: /b}");
    let keys: Vec<&str> = v
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys, ["a", "c", "d"]);
}

#[test]
fn remove_array_items_by_index_and_match() {
    assert_eq!(
        ok(DOC, "- {type: remove, path: /list/0}")["list"],
        y("[y, z]")
    );
    assert_eq!(
        ok(DOC, "- {type: remove, path: /list/-1}")["list"],
        y("[x, y]")
    );
    assert_eq!(
        ok(DOC, "- {type: remove, path: /list/1:next}")["list"],
        y("[x, y]")
    );
    let v = ok(DOC, "- {type: remove, path: /jobs/name=web}");
    assert_eq!(v["jobs"], y("[{name: db, instances: 2}]"));
    let v = ok(DOC, "- {type: remove, path: /jobs/name=db/instances}");
    assert_eq!(v["jobs"][1], y("{name: db}"));
}

#[test]
fn remove_of_missing_optional_paths_does_nothing() {
    let before = y(DOC);
    assert_eq!(ok(DOC, "- {type: remove, path: /nope?}"), before);
    assert_eq!(
        ok(DOC, "- {type: remove, path: /nope?/deeper/still}"),
        before
    );
    assert_eq!(ok(DOC, "- {type: remove, path: /jobs/name=cache?}"), before);
    assert_eq!(
        ok(DOC, "- {type: remove, path: /jobs/name=web/props?/x}"),
        before
    );
}

#[test]
fn remove_of_missing_paths_is_an_error() {
    assert_eq!(
        err(DOC, "- {type: remove, path: /a/x}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map key 'x' for path '/a/x' (found map keys: 'b', 'c')"
    );
    assert_eq!(
        err(DOC, "- {type: remove, path: /list/3}"),
        "operation [0] in ops.yml failed (line 1): Expected to find array index '3' but found array of length '3' for path '/list/3'"
    );
}

#[test]
fn remove_root_and_append_token_are_errors() {
    assert_eq!(
        err(DOC, "- {type: remove, path: ''}"),
        "operation [0] in ops.yml failed (line 1): Cannot remove entire document"
    );
    assert_eq!(
        err(DOC, "- {type: remove, path: /list/-}"),
        "operation [0] in ops.yml failed (line 1): Expected to not find after last index token at path '/list/-' (not supported in remove operations)"
    );
}

// ---------------------------------------------------------------- test

#[test]
fn test_with_value() {
    ok(DOC, "- {type: test, path: /a, value: {b: 1, c: 2}}");
    ok(
        DOC,
        "- {type: test, path: /jobs/name=db/instances, value: 2}",
    );
    assert_eq!(
        err(DOC, "- {type: test, path: /a/b, value: 2}"),
        "operation [0] in ops.yml failed (line 1): Found value does not match expected value for path '/a/b'"
    );
    // 1 and 1.0 are different values, as in go-patch.
    err(DOC, "- {type: test, path: /a/b, value: 1.0}");
}

#[test]
fn test_absent() {
    ok(DOC, "- {type: test, path: /a/x, absent: true}");
    ok(DOC, "- {type: test, path: /list/7, absent: true}");
    assert_eq!(
        err(DOC, "- {type: test, path: /a/b, absent: true}"),
        "operation [0] in ops.yml failed (line 1): Expected to not find '/a/b'"
    );
    // A missing parent is still an error.
    assert_eq!(
        err(DOC, "- {type: test, path: /x/y, absent: true}"),
        "operation [0] in ops.yml failed (line 1): Expected to find a map key 'x' for path '/x' (found map keys: 'a', 'jobs', 'list', 'name')"
    );
}

#[test]
fn failed_test_stops_the_following_operations() {
    let e = err(
        DOC,
        "- {type: test, path: /name, value: other}\n- {type: remove, path: /missing}\n",
    );
    assert!(e.starts_with("operation [0] in ops.yml failed"), "{e}");
}

#[test]
fn operation_error_message_wraps_the_failure() {
    assert_eq!(
        err(
            DOC,
            "- type: replace\n  path: /nope/x\n  value: 1\n  error: the nope section is required\n"
        ),
        "operation [0] in ops.yml failed (line 1): Error 'the nope section is required': Expected to find a map key 'nope' for path '/nope' (found map keys: 'a', 'jobs', 'list', 'name')"
    );
}

#[test]
fn operations_apply_in_order_and_see_each_other() {
    let v = ok(
        DOC,
        "
- type: replace
  path: /jobs/-
  value: {name: cache}
- type: replace
  path: /jobs/name=cache/instances?
  value: 3
- type: remove
  path: /jobs/name=web
",
    );
    assert_eq!(
        v["jobs"],
        y("[{name: db, instances: 2}, {name: cache, instances: 3}]")
    );
}

#[test]
fn errors_name_the_operation_index_and_line() {
    let e = err(
        DOC,
        "
- type: replace
  path: /a/b
  value: 5

# a comment
- type: remove
  path: /a/nope
",
    );
    assert_eq!(
        e,
        "operation [1] in ops.yml failed (line 7): Expected to find a map key 'nope' for path '/a/nope' (found map keys: 'b', 'c')"
    );
}

// --------------------------------------------------------------- shape

#[test]
fn ops_file_must_be_an_array() {
    assert_eq!(
        parse_ops("o.yml", "type: replace\npath: /a\n")
            .unwrap_err()
            .to_string(),
        "ops file o.yml: expected an array of operations but found a map"
    );
    assert!(parse_ops("o.yml", "").unwrap().ops.is_empty());
    assert!(parse_ops("o.yml", "# nothing\n").unwrap().ops.is_empty());
}

#[test]
fn op_shape_errors_name_file_index_and_line() {
    let e = |text: &str| parse_ops("o.yml", text).unwrap_err().to_string();
    let prefix = "- {type: remove, path: /a}\n";
    assert_eq!(
        e(&format!("{prefix}- path: /a\n  value: 1\n")),
        "operation [1] in o.yml (line 2): missing 'type'"
    );
    assert_eq!(
        e(&format!("{prefix}- type: replace\n  value: 1\n")),
        "operation [1] in o.yml (line 2): missing 'path'"
    );
    assert_eq!(
        e(&format!("{prefix}- type: move\n  path: /a\n")),
        "operation [1] in o.yml (line 2): unknown operation type 'move' (expected replace, remove or test)"
    );
    assert_eq!(
        e(&format!("{prefix}- type: replace\n  path: /a\n  value: 1\n  vaule: 2\n")),
        "operation [1] in o.yml (line 5): unknown key 'vaule' (allowed keys: type, path, value, absent, error)"
    );
    assert_eq!(
        e(&format!(
            "{prefix}- type: replace\n  path: a/b\n  value: 1\n"
        )),
        "operation [1] in o.yml (line 3): invalid path 'a/b': Expected to start with '/'"
    );
    assert_eq!(
        e(&format!("{prefix}- just a string\n")),
        "operation [1] in o.yml (line 2): expected a map with 'type' and 'path' but found a string"
    );
}

#[test]
fn op_value_rules() {
    let e = |text: &str| parse_ops("o.yml", text).unwrap_err().to_string();
    assert_eq!(
        e("- {type: replace, path: /a}"),
        "operation [0] in o.yml (line 1): missing 'value'"
    );
    // go-patch reads `value: null` as no value.
    assert_eq!(
        e("- {type: replace, path: /a, value: ~}"),
        "operation [0] in o.yml (line 1): missing 'value'"
    );
    assert_eq!(
        e("- type: remove\n  path: /a\n  value: 1\n"),
        "operation [0] in o.yml (line 3): 'value' is not allowed with type 'remove'"
    );
    assert_eq!(
        e("- {type: test, path: /a}"),
        "operation [0] in o.yml (line 1): missing 'value' or 'absent'"
    );
    assert_eq!(
        e("- {type: test, path: /a, absent: yes}"),
        "operation [0] in o.yml (line 1): 'absent' must be true or false but is a string"
    );
    assert_eq!(
        e("- {type: replace, path: /a, value: 1, absent: true}"),
        "operation [0] in o.yml (line 1): 'absent' is only allowed with type 'test'"
    );
}

#[test]
fn invalid_yaml_in_an_ops_file_names_file_and_line() {
    let e = parse_ops("o.yml", "- type: replace\n  path: [unclosed\n").unwrap_err();
    let msg = bosun_cpi::chain::chain(&e);
    assert!(msg.starts_with("ops file o.yml: invalid YAML:"), "{msg}");
    match e {
        crate::interpolate::OpsError::Yaml { line, .. } => assert!(line.is_some()),
        other => panic!("unexpected {other:?}"),
    }
}

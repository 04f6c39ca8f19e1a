//! Variables: placeholders, `.key` access, sources and their precedence,
//! missing variables.

use std::collections::HashMap;

use serde_yaml_ng::Value;

use super::{int_err, int_ok, with_vars, y};
use crate::interpolate::vars::{placeholders, substitute, StaticVars};
use crate::interpolate::{interpolate_value_with, InterpolateOptions};

fn map(pairs: &[(&str, &str)]) -> HashMap<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), y(v))).collect()
}

fn sub(doc: &str, vars: &[(&str, &str)]) -> Value {
    let mut d = y(doc);
    substitute(&mut d, &mut map(vars)).unwrap();
    d
}

#[test]
fn whole_value_keeps_the_variables_type() {
    let v = sub(
        "a: ((m))\nb: ((n))\nc: ((t))\nd: [((l))]\ne: ((s))",
        &[
            ("m", "{x: 1}"),
            ("n", "42"),
            ("t", "true"),
            ("l", "[1, 2]"),
            ("s", "'007'"),
        ],
    );
    assert_eq!(v, y("a: {x: 1}\nb: 42\nc: true\nd: [[1, 2]]\ne: '007'"));
}

#[test]
fn embedded_placeholders_are_substituted_as_text() {
    let v = sub(
        "url: https://((host)):((port))/((path))?tls=((tls))&r=((ratio))",
        &[
            ("host", "example.com"),
            ("port", "8443"),
            ("path", "x"),
            ("tls", "true"),
            ("ratio", "0.5"),
        ],
    );
    assert_eq!(v, y("url: https://example.com:8443/x?tls=true&r=0.5"));
}

#[test]
fn embedding_a_map_is_an_error_naming_variable_and_path() {
    let mut d = y("groups:\n- name: web\n  url: http://((cert))/\n");
    let e = substitute(&mut d, &mut map(&[("cert", "{ca: x}")])).unwrap_err();
    assert_eq!(
        bosun_cpi::chain::chain(&e),
        "Invalid type 'a map' for variable 'cert' at path '/groups/0/url': only strings, numbers and booleans can be interpolated within a string"
    );
}

#[test]
fn dot_key_access_into_values() {
    let v = sub(
        "ca: ((cert.ca))\ncrt: ((cert.certificate))\nkey: ((cert.private_key))\nfp: ((k.public_key_fingerprint))\ndeep: ((a.b.c))\nidx: ((list.1))\nnumkey: ((m.0))",
        &[
            ("cert", "{ca: CA, certificate: CRT, private_key: KEY}"),
            ("k", "{public_key_fingerprint: 'aa:bb'}"),
            ("a", "{b: {c: 3}}"),
            ("list", "[x, y]"),
            ("m", "{'0': zero}"),
        ],
    );
    assert_eq!(
        v,
        y("ca: CA\ncrt: CRT\nkey: KEY\nfp: 'aa:bb'\ndeep: 3\nidx: y\nnumkey: zero")
    );
}

#[test]
fn dot_key_access_to_a_missing_key_is_an_error() {
    let mut d = y("x: ((cert.nope))");
    let e = substitute(&mut d, &mut map(&[("cert", "{ca: CA, certificate: CRT}")])).unwrap_err();
    assert_eq!(
        bosun_cpi::chain::chain(&e),
        "Finding variable 'cert.nope': Expected to find a map key 'nope' for path '/nope' (found map keys: 'ca', 'certificate')"
    );
}

#[test]
fn bang_placeholders_resolve_like_plain_ones() {
    // bosh-cli strips the `!` and interpolates the variable.
    let v = sub("a: ((!pw))\nb: x-((!pw))-y", &[("pw", "secret")]);
    assert_eq!(v, y("a: secret\nb: x-secret-y"));
    // ... and leaves it exactly as written when unknown.
    let v = sub("a: ((!other))\nb: x-((!other))", &[]);
    assert_eq!(v, y("a: ((!other))\nb: x-((!other))"));
}

#[test]
fn whitespace_inside_the_parentheses_is_allowed() {
    let v = sub("a: (( name ))\nb: x(( name))y", &[("name", "v")]);
    assert_eq!(v, y("a: v\nb: xvy"));
}

#[test]
fn placeholder_scanner_matches_bosh_syntax() {
    let names =
        |s: &str| -> Vec<String> { placeholders(s).iter().map(|p| p.name.to_string()).collect() };
    assert_eq!(names("(((x)))"), ["x"]);
    assert_eq!(
        names("((a b)) ((/abs/name)) ((a-b_c.d)) (()) ((é))"),
        ["/abs/name", "a-b_c.d", "é"]
    );
    assert_eq!(names("no ( ( placeholders ) ) here"), Vec::<String>::new());
    assert_eq!(names("((a))((b))"), ["a", "b"]);
}

#[test]
fn unknown_variables_stay_in_place_without_var_errs() {
    let out = int_ok(
        "a: ((known))\nb: ((unknown))\nc: pre-((unknown))-((known))\n",
        &with_vars(&[("known", "k")]),
    );
    assert_eq!(out, "a: k\nb: ((unknown))\nc: pre-((unknown))-k\n");
}

#[test]
fn var_errs_lists_every_missing_variable_sorted_once() {
    let opts = InterpolateOptions {
        var_errs: true,
        ..with_vars(&[("known", "k")])
    };
    let e = int_err(
        "a: ((zeta))\nb: ((alpha.key))\nc: x((zeta))y((beta))\nd: ((known))\ne: [((alpha))]\n",
        &opts,
    );
    assert_eq!(
        e,
        "manifest.yml: Expected to find variables:\n  - alpha\n  - beta\n  - zeta"
    );
}

#[test]
fn values_are_not_interpolated_again() {
    let v = sub("a: ((x))\nb: s-((x))", &[("x", "'((y))'"), ("y", "no")]);
    assert_eq!(v, y("a: '((y))'\nb: s-((y))"));
}

#[test]
fn map_keys_are_interpolated() {
    let v = sub(
        "((k)): 1\nother:\n  ((n))-suffix: 2\n",
        &[("k", "key"), ("n", "7")],
    );
    assert_eq!(v, y("key: 1\nother:\n  7-suffix: 2\n"));
    let mut d = y("((k)): 1\nkey: 2\n");
    let e = substitute(&mut d, &mut map(&[("k", "key")])).unwrap_err();
    assert_eq!(
        bosun_cpi::chain::chain(&e),
        "duplicate map key 'key' after interpolation at path ''"
    );
}

#[test]
fn precedence_v_over_l_over_env_over_store() {
    let files = vec![
        (
            "one.yml".to_string(),
            "a: from-l1\nb: from-l1\nc: from-l1\n".to_string(),
        ),
        ("two.yml".to_string(), "b: from-l2\n".to_string()),
    ];
    let env = vec![
        ("P_a".to_string(), "from-env".to_string()),
        ("P_c".to_string(), "from-env".to_string()),
        ("P_d".to_string(), "from-env".to_string()),
        ("Q_d".to_string(), "from-env-q".to_string()),
        ("OTHER_e".to_string(), "no".to_string()),
    ];
    let opts = InterpolateOptions {
        vars: vec![("a".to_string(), "from-v".to_string())],
        var_files: files,
        vars_env: vec!["P".to_string(), "Q".to_string()],
        ..InterpolateOptions::default()
    };
    let mut store = crate::interpolate::MemoryStore::new();
    use crate::interpolate::VariableStore;
    store.put("e", y("from-store"), "d").unwrap();
    store.put("a", y("from-store"), "d").unwrap();
    let v = interpolate_value_with(
        "m.yml",
        "a: ((a))\nb: ((b))\nc: ((c))\nd: ((d))\ne: ((e))\n",
        &opts,
        Some(&mut store),
        &env,
    )
    .unwrap();
    assert_eq!(
        v,
        y("a: from-v\nb: from-l2\nc: from-l1\nd: from-env-q\ne: from-store\n")
    );
}

#[test]
fn v_values_are_read_as_yaml_like_bosh() {
    let out = int_ok(
        "n: ((n))\ns: ((s))\nq: ((q))\nm: ((m))\nweird: ((w))\n",
        &with_vars(&[
            ("n", "3"),
            ("s", "plain text"),
            ("q", "\"3\""),
            ("m", "{a: 1}"),
            ("w", "a: b: c"),
        ]),
    );
    assert_eq!(
        out,
        "n: 3\ns: plain text\nq: '3'\nm:\n  a: 1\nweird: 'a: b: c'\n"
    );
    let e = int_err("a: 1", &with_vars(&[("x", "")]));
    assert_eq!(e, "-v 'x=...': expected a non-empty value");
}

#[test]
fn vars_env_values_are_yaml() {
    let opts = InterpolateOptions {
        vars_env: vec!["BOSUN".to_string()],
        ..InterpolateOptions::default()
    };
    let env = vec![
        ("BOSUN_port".to_string(), "8080".to_string()),
        ("BOSUN_list".to_string(), "[a, b]".to_string()),
        ("BOSUNX_no".to_string(), "1".to_string()),
    ];
    let v = interpolate_value_with(
        "m.yml",
        "p: ((port))\nl: ((list))\nn: ((no))",
        &opts,
        None,
        &env,
    )
    .unwrap();
    assert_eq!(v, y("p: 8080\nl: [a, b]\nn: ((no))"));
}

#[test]
fn vars_files_must_be_maps() {
    let opts = InterpolateOptions {
        var_files: vec![("v.yml".to_string(), "- a\n- b\n".to_string())],
        ..InterpolateOptions::default()
    };
    assert_eq!(
        int_err("a: 1", &opts),
        "vars file v.yml: expected a map of variable names to values but found an array"
    );
}

#[test]
fn static_vars_merge_order() {
    let s = StaticVars::from_sources(
        &[("x".to_string(), "v".to_string())],
        &[("f".to_string(), "x: l\ny: l\n".to_string())],
        &["E".to_string()],
        &[
            ("E_y".to_string(), "e".to_string()),
            ("E_z".to_string(), "e".to_string()),
        ],
    )
    .unwrap();
    assert_eq!(s.get("x"), Some(&y("v")));
    assert_eq!(s.get("y"), Some(&y("l")));
    assert_eq!(s.get("z"), Some(&y("e")));
}

#[test]
fn bad_key_path_in_a_placeholder_is_an_error() {
    // `:` cannot appear in a placeholder, but `lookup_full` is public.
    let e = crate::interpolate::vars::lookup_full(&mut map(&[("v", "{b: 1}")]), "v.b:sideways")
        .unwrap_err();
    assert_eq!(
        bosun_cpi::chain::chain(&e),
        "Finding variable 'v.b:sideways': Expected to find one of the following modifiers: 'prev', 'next', 'before', or 'after' but found 'sideways'"
    );
}

#[test]
fn options_debug_output_shows_names_not_values() {
    let opts = InterpolateOptions {
        vars: vec![("db_password".to_string(), "hunter2".to_string())],
        var_files: vec![("creds.yml".to_string(), "token: s3cret".to_string())],
        ..InterpolateOptions::default()
    };
    let shown = format!("{opts:?}");
    assert!(
        shown.contains("db_password") && shown.contains("creds.yml"),
        "{shown}"
    );
    assert!(
        !shown.contains("hunter2") && !shown.contains("s3cret"),
        "{shown}"
    );
}

//! Input limits of every YAML the interpolation reads (document, ops files,
//! vars files, the vars store): NUL bytes and aliases that expand too far are
//! refused with the file and the line before anything is expanded.

use crate::interpolate::{interpolate, InterpolateOptions};

/// 3000 copies of a list of 1000 items: 3 MB of text, 3 million nodes once
/// expanded (every copy alone is small).
fn wide_aliases() -> String {
    let mut text = String::from("base: &b\n");
    for i in 0..1000 {
        text.push_str(&format!("- x{i}\n"));
    }
    text.push_str("copies:\n");
    text.push_str(&"- *b\n".repeat(3000));
    text
}

/// Line of the alias whose copy goes over the node limit (see `wide_aliases`).
const OVER_AT: usize = 1002 + 1000;

fn err(file: &str, text: &str, opts: &InterpolateOptions) -> String {
    match interpolate(file, text, opts) {
        Ok(_) => panic!("{file} should be refused"),
        Err(e) => bosun_cpi::chain::chain(&e),
    }
}

#[test]
fn limits_document_with_wide_aliases_is_refused() {
    let e = err("m.yml", &wide_aliases(), &InterpolateOptions::default());
    assert_eq!(
        e,
        format!(
            "m.yml: invalid YAML: aliases expand to more than 1000000 nodes \
             (the most one document may copy through anchors and aliases) at line {OVER_AT}"
        )
    );
}

#[test]
fn limits_ops_file_with_wide_aliases_is_refused() {
    let ops = format!(
        "- type: replace\n  path: /x?\n  value:\n    {}",
        wide_aliases().replace('\n', "\n    ")
    );
    let opts = InterpolateOptions {
        ops_files: vec![("ops.yml".to_string(), ops)],
        ..InterpolateOptions::default()
    };
    let e = err("m.yml", "a: 1\n", &opts);
    assert!(
        e.starts_with("ops file ops.yml: invalid YAML: aliases expand to more than 1000000 nodes"),
        "{e}"
    );
    assert!(e.ends_with(&format!("at line {}", OVER_AT + 3)), "{e}");
}

#[test]
fn limits_vars_file_with_wide_aliases_is_refused() {
    let opts = InterpolateOptions {
        var_files: vec![("vars.yml".to_string(), wide_aliases())],
        ..InterpolateOptions::default()
    };
    let e = err("m.yml", "a: ((base))\n", &opts);
    assert!(e.starts_with("vars file vars.yml: "), "{e}");
    assert!(e.contains(&format!("more than 1000000 nodes (the most one document may copy through anchors and aliases) at line {OVER_AT}")), "{e}");
}

#[test]
fn limits_nul_byte_is_refused_with_its_line() {
    let e = err("m.yml", "a: 1\nb: x\0\n", &InterpolateOptions::default());
    assert_eq!(
        e,
        "m.yml: invalid YAML: the text contains a NUL byte (\\0), which YAML does not allow at line 2"
    );
}

#[test]
fn limits_few_aliases_still_expand() {
    let text = "base: &b {x: 1}\ncopies: [*b, *b]\n";
    let out = interpolate("m.yml", text, &InterpolateOptions::default()).expect("interpolates");
    assert_eq!(out, "base:\n  x: 1\ncopies:\n- x: 1\n- x: 1\n");
}

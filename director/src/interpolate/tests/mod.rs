//! Tests of `interpolate`: go-patch paths and operations, ops-file shape
//! errors, variables, generation and the public API. Expected error strings
//! are the exact messages an operator sees.

mod api;
mod generate;
mod limits;
mod ops;
mod pointer;
mod vars;

use serde_yaml_ng::Value;

use super::{interpolate, parse_ops, InterpolateOptions};

/// Parse YAML in a test.
pub(super) fn y(text: &str) -> Value {
    super::parse_yaml(text).expect("test YAML parses")
}

/// Apply the ops file `ops` (named `ops.yml`) to `doc`.
pub(super) fn apply(doc: &str, ops: &str) -> Result<Value, String> {
    let mut d = y(doc);
    let file = parse_ops("ops.yml", ops).map_err(|e| e.to_string())?;
    file.apply(&mut d)
        .map_err(|e| bosun_cpi::chain::chain(&e))?;
    Ok(d)
}

/// Apply and expect success.
pub(super) fn ok(doc: &str, ops: &str) -> Value {
    match apply(doc, ops) {
        Ok(v) => v,
        Err(e) => panic!("ops failed: {e}"),
    }
}

/// Apply and expect failure.
pub(super) fn err(doc: &str, ops: &str) -> String {
    match apply(doc, ops) {
        Ok(v) => panic!("ops succeeded: {v:?}"),
        Err(e) => e,
    }
}

/// Interpolate with options, expecting success.
pub(super) fn int_ok(text: &str, opts: &InterpolateOptions) -> String {
    match interpolate("manifest.yml", text, opts) {
        Ok(s) => s,
        Err(e) => panic!("interpolate failed: {e}"),
    }
}

/// Interpolate with options, expecting failure.
pub(super) fn int_err(text: &str, opts: &InterpolateOptions) -> String {
    match interpolate("manifest.yml", text, opts) {
        Ok(s) => panic!("interpolate succeeded: {s}"),
        Err(e) => bosun_cpi::chain::chain(&e),
    }
}

/// Options with `-v` pairs.
pub(super) fn with_vars(pairs: &[(&str, &str)]) -> InterpolateOptions {
    InterpolateOptions {
        vars: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..InterpolateOptions::default()
    }
}

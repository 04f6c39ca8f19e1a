//! JSON value helpers shared by every floor: deep merge and dotted paths
//! (`a.b.c`) into `serde_json::Value` trees, as BOSH merges properties.
//!
//! Pure functions on values: this module must not parse files or know any
//! manifest type.

use serde_json::{json, Value as Json};

/// Deep-merge `over` into `base` (maps merge, other values replace; nulls do not).
pub fn merge_json(base: &mut Json, over: &Json) {
    match (base, over) {
        (Json::Object(b), Json::Object(o)) => {
            for (k, v) in o {
                merge_json(b.entry(k.clone()).or_insert(Json::Null), v);
            }
        }
        (b, o) if !o.is_null() => *b = o.clone(),
        _ => {}
    }
}

/// Set `value` at a dotted path in a nested object.
pub(crate) fn set_path(root: &mut Json, dotted: &str, value: Json) {
    let mut cur = root;
    let parts: Vec<&str> = dotted.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = json!({});
        }
        let Json::Object(map) = cur else { return };
        if i + 1 == parts.len() {
            map.insert(part.to_string(), value);
            return;
        }
        cur = map.entry(part.to_string()).or_insert_with(|| json!({}));
    }
}

pub(crate) fn get_path<'a>(root: &'a Json, dotted: &str) -> Option<&'a Json> {
    let mut cur = root;
    for part in dotted.split('.') {
        cur = cur.as_object()?.get(part)?;
    }
    (!cur.is_null()).then_some(cur)
}

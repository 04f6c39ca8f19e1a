//! go-patch's document operations on a YAML value: `replace`, `remove`,
//! `test` and `find` along a [`Pointer`], with go-patch's error messages.
//!
//! This module owns the semantics of one operation on one document. It must
//! not parse ops files (see `ops`), must not interpolate variables, and must
//! not touch the director's state, CPIs or the network. It never panics on
//! input: every failure is a [`PatchError`].

use std::borrow::Cow;

use serde_yaml_ng::{Mapping, Value};

use super::pointer::{Modifier, Pointer, Token};

/// Why an operation could not be applied. Paths are printed go-patch style
/// and name the prefix of the operation's path where the problem is.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum PatchError {
    #[error("Expected to find {expected} at path '{path}' but found {found}")]
    TypeMismatch {
        expected: &'static str,
        path: String,
        found: &'static str,
    },
    #[error("Expected to find a map key '{key}' for path '{path}' ({siblings})")]
    MissingKey {
        key: String,
        path: String,
        siblings: String,
    },
    #[error("Expected to find array index '{index}' but found array of length '{len}' for path '{path}'")]
    MissingIndex {
        index: i64,
        len: usize,
        path: String,
    },
    #[error(
        "Expected to find exactly one matching array item for path '{path}' but found {count}"
    )]
    Matching { path: String, count: usize },
    #[error("Expected to find key, matching index or after last index token at path '{path}'")]
    CannotCreate { path: String },
    #[error("Expected to find key or matching index token at path '{path}'")]
    CannotDescendMissing { path: String },
    #[error("Expected not to find after last index token in path '{path}' (not supported in find operations)")]
    AfterLastInFind { path: String },
    #[error("Expected to not find after last index token at path '{path}' (not supported in remove operations)")]
    AfterLastInRemove { path: String },
    #[error("Expected after last index token to be last in path '{path}'")]
    AfterLastNotLast { path: String },
    #[error("Expected to find one of the following modifiers: 'prev', 'next', but found modifier '{found}' in path '{path}'")]
    BadIndexModifier { found: &'static str, path: String },
    #[error("Expected to not find any modifiers after '{after}' modifier, but found modifier '{found}' in path '{path}'")]
    ModifierAfterInsertion {
        after: &'static str,
        found: &'static str,
        path: String,
    },
    #[error("Cannot remove entire document")]
    RemoveRoot,
    #[error("Found value does not match expected value for path '{path}'")]
    TestValueMismatch { path: String },
    #[error("Expected to not find '{path}'")]
    TestNotAbsent { path: String },
    /// An operation's own `error:` message wrapped around the failure.
    #[error("Error '{message}'")]
    Described {
        message: String,
        source: Box<PatchError>,
    },
}

impl PatchError {
    /// The path the error is about, if it names one.
    pub fn path(&self) -> Option<&str> {
        match self {
            PatchError::TypeMismatch { path, .. }
            | PatchError::MissingKey { path, .. }
            | PatchError::MissingIndex { path, .. }
            | PatchError::Matching { path, .. }
            | PatchError::CannotCreate { path }
            | PatchError::CannotDescendMissing { path }
            | PatchError::AfterLastInFind { path }
            | PatchError::AfterLastInRemove { path }
            | PatchError::AfterLastNotLast { path }
            | PatchError::BadIndexModifier { path, .. }
            | PatchError::ModifierAfterInsertion { path, .. }
            | PatchError::TestValueMismatch { path }
            | PatchError::TestNotAbsent { path } => Some(path),
            PatchError::RemoveRoot => None,
            PatchError::Described { source, .. } => source.path(),
        }
    }
}

/// A word for a value's kind, for messages: `a map`, `an array`, ...
pub fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "an array",
        Value::Mapping(_) => "a map",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Replace (or create, along optional tokens) the value at `ptr`.
pub fn replace(doc: &mut Value, ptr: &Pointer, value: &Value) -> Result<(), PatchError> {
    if ptr.is_root() {
        *doc = value.clone();
        return Ok(());
    }
    replace_at(doc, ptr, 0, value)
}

/// Remove the value at `ptr`; a missing optional path is not an error.
pub fn remove(doc: &mut Value, ptr: &Pointer) -> Result<(), PatchError> {
    if ptr.is_root() {
        return Err(PatchError::RemoveRoot);
    }
    remove_at(doc, ptr, 0)
}

/// The value at `ptr`. A missing optional key yields `null`; a missing
/// optional `key=value` item yields `{key: value}` (as go-patch does).
pub fn find<'a>(doc: &'a Value, ptr: &Pointer) -> Result<Cow<'a, Value>, PatchError> {
    let tokens = ptr.tokens();
    let mut cur: Cow<'a, Value> = Cow::Borrowed(doc);
    for (i, token) in tokens.iter().enumerate() {
        let is_last = i + 1 == tokens.len();
        let path = || ptr.prefix_string(i + 1);
        let next: Cow<'a, Value> = match token {
            Token::Index { index, modifiers } => {
                let pos = {
                    let seq = seq_ref(&cur, path)?;
                    concrete_index(*index, modifiers, seq.len(), path)?
                };
                child(cur, |v| v.as_sequence().and_then(|s| s.get(pos)))
            }
            Token::AfterLast => {
                return Err(PatchError::AfterLastInFind {
                    path: ptr.to_string(),
                })
            }
            Token::Matching {
                key,
                value,
                optional,
                modifiers,
            } => {
                let pos = {
                    let seq = seq_ref(&cur, path)?;
                    let idxs = matching(seq, key, value);
                    if *optional && idxs.is_empty() {
                        None
                    } else if idxs.len() != 1 {
                        return Err(PatchError::Matching {
                            path: path(),
                            count: idxs.len(),
                        });
                    } else {
                        Some(concrete_index(idxs[0] as i64, modifiers, seq.len(), path)?)
                    }
                };
                match pos {
                    None => Cow::Owned(single_map(key, value)),
                    Some(pos) => child(cur, |v| v.as_sequence().and_then(|s| s.get(pos))),
                }
            }
            Token::Key { key, optional } => {
                let found = {
                    let map = map_ref(&cur, path)?;
                    let found = map.contains_key(key.as_str());
                    if !found && !optional {
                        return Err(missing_key(key, path(), map));
                    }
                    found
                };
                if found {
                    child(cur, |v| v.as_mapping().and_then(|m| m.get(key.as_str())))
                } else if is_last {
                    Cow::Owned(Value::Null)
                } else {
                    match tokens.get(i + 1) {
                        Some(Token::Matching { .. }) => Cow::Owned(Value::Sequence(Vec::new())),
                        Some(Token::Key { .. }) => Cow::Owned(Value::Mapping(Mapping::new())),
                        _ => {
                            return Err(PatchError::CannotDescendMissing {
                                path: ptr.prefix_string(i + 2),
                            })
                        }
                    }
                }
            }
        };
        cur = next;
    }
    Ok(cur)
}

/// go-patch's `test` with a value: the value at `ptr` must equal `expected`.
pub fn test_value(doc: &Value, ptr: &Pointer, expected: &Value) -> Result<(), PatchError> {
    let found = find(doc, ptr)?;
    if found.as_ref() != expected {
        return Err(PatchError::TestValueMismatch {
            path: ptr.to_string(),
        });
    }
    Ok(())
}

/// go-patch's `test` with `absent: true`: the last token of `ptr` must be
/// missing (a missing parent is still an error).
pub fn test_absent(doc: &Value, ptr: &Pointer) -> Result<(), PatchError> {
    match find(doc, ptr) {
        Ok(_) => Err(PatchError::TestNotAbsent {
            path: ptr.to_string(),
        }),
        Err(e @ (PatchError::MissingIndex { .. } | PatchError::MissingKey { .. })) => {
            if e.path() == Some(ptr.to_string().as_str()) {
                Ok(())
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

fn child<'a>(cur: Cow<'a, Value>, get: impl Fn(&Value) -> Option<&Value>) -> Cow<'a, Value> {
    match cur {
        Cow::Borrowed(v) => get(v).map_or(Cow::Owned(Value::Null), Cow::Borrowed),
        Cow::Owned(v) => Cow::Owned(get(&v).cloned().unwrap_or(Value::Null)),
    }
}

fn replace_at(node: &mut Value, ptr: &Pointer, i: usize, value: &Value) -> Result<(), PatchError> {
    let tokens = ptr.tokens();
    let is_last = i + 1 == tokens.len();
    let path = || ptr.prefix_string(i + 1);
    match &tokens[i] {
        Token::Index { index, modifiers } => {
            let seq = seq_mut(node, path)?;
            if is_last {
                let (pos, insert) = insertion(*index, modifiers, seq.len(), path)?;
                put_at(seq, pos, insert, value.clone());
                Ok(())
            } else {
                let pos = concrete_index(*index, modifiers, seq.len(), path)?;
                replace_at(&mut seq[pos], ptr, i + 1, value)
            }
        }
        Token::AfterLast => {
            let seq = seq_mut(node, path)?;
            if !is_last {
                return Err(PatchError::AfterLastNotLast {
                    path: ptr.to_string(),
                });
            }
            seq.push(value.clone());
            Ok(())
        }
        Token::Matching {
            key,
            value: want,
            optional,
            modifiers,
        } => {
            let seq = seq_mut(node, path)?;
            let idxs = matching(seq, key, want);
            if *optional && idxs.is_empty() {
                if is_last {
                    seq.push(value.clone());
                    return Ok(());
                }
                seq.push(single_map(key, want));
                let last = seq.len() - 1;
                return replace_at(&mut seq[last], ptr, i + 1, value);
            }
            if idxs.len() != 1 {
                return Err(PatchError::Matching {
                    path: path(),
                    count: idxs.len(),
                });
            }
            if is_last {
                let (pos, insert) = insertion(idxs[0] as i64, modifiers, seq.len(), path)?;
                put_at(seq, pos, insert, value.clone());
                Ok(())
            } else {
                let pos = concrete_index(idxs[0] as i64, modifiers, seq.len(), path)?;
                replace_at(&mut seq[pos], ptr, i + 1, value)
            }
        }
        Token::Key { key, optional } => {
            let map = map_mut(node, path)?;
            let found = map.contains_key(key.as_str());
            if !found && !optional {
                return Err(missing_key(key, path(), map));
            }
            if is_last {
                map.insert(Value::String(key.clone()), value.clone());
                return Ok(());
            }
            if !found {
                let created = match tokens.get(i + 1) {
                    Some(Token::AfterLast) | Some(Token::Matching { .. }) => {
                        Value::Sequence(Vec::new())
                    }
                    Some(Token::Key { .. }) => Value::Mapping(Mapping::new()),
                    _ => {
                        return Err(PatchError::CannotCreate {
                            path: ptr.prefix_string(i + 2),
                        })
                    }
                };
                map.insert(Value::String(key.clone()), created);
            }
            match map.get_mut(key.as_str()) {
                Some(next) => replace_at(next, ptr, i + 1, value),
                None => Err(missing_key(key, path(), &Mapping::new())),
            }
        }
    }
}

fn remove_at(node: &mut Value, ptr: &Pointer, i: usize) -> Result<(), PatchError> {
    let tokens = ptr.tokens();
    let is_last = i + 1 == tokens.len();
    let path = || ptr.prefix_string(i + 1);
    match &tokens[i] {
        Token::Index { index, modifiers } => {
            let seq = seq_mut(node, path)?;
            let pos = concrete_index(*index, modifiers, seq.len(), path)?;
            if is_last {
                seq.remove(pos);
                Ok(())
            } else {
                remove_at(&mut seq[pos], ptr, i + 1)
            }
        }
        Token::AfterLast => Err(PatchError::AfterLastInRemove { path: path() }),
        Token::Matching {
            key,
            value,
            optional,
            modifiers,
        } => {
            let seq = seq_mut(node, path)?;
            let idxs = matching(seq, key, value);
            if *optional && idxs.is_empty() {
                return Ok(());
            }
            if idxs.len() != 1 {
                return Err(PatchError::Matching {
                    path: path(),
                    count: idxs.len(),
                });
            }
            let pos = concrete_index(idxs[0] as i64, modifiers, seq.len(), path)?;
            if is_last {
                seq.remove(pos);
                Ok(())
            } else {
                remove_at(&mut seq[pos], ptr, i + 1)
            }
        }
        Token::Key { key, optional } => {
            let map = map_mut(node, path)?;
            if !map.contains_key(key.as_str()) {
                if *optional {
                    return Ok(());
                }
                return Err(missing_key(key, path(), map));
            }
            if is_last {
                map.shift_remove(key.as_str());
                return Ok(());
            }
            match map.get_mut(key.as_str()) {
                Some(next) => remove_at(next, ptr, i + 1),
                None => Ok(()),
            }
        }
    }
}

fn put_at(seq: &mut Vec<Value>, pos: usize, insert: bool, value: Value) {
    if insert {
        seq.insert(pos, value);
    } else {
        seq[pos] = value;
    }
}

fn single_map(key: &str, value: &str) -> Value {
    let mut m = Mapping::with_capacity(1);
    m.insert(
        Value::String(key.to_string()),
        Value::String(value.to_string()),
    );
    Value::Mapping(m)
}

/// Indexes of the items that are maps whose `key` is the string `value`.
fn matching(seq: &[Value], key: &str, value: &str) -> Vec<usize> {
    seq.iter()
        .enumerate()
        .filter(|(_, item)| {
            matches!(item.as_mapping().and_then(|m| m.get(key)), Some(Value::String(s)) if s == value)
        })
        .map(|(i, _)| i)
        .collect()
}

/// go-patch's `ArrayIndex.Concrete`: apply `:prev`/`:next`, check bounds,
/// resolve negative indexes.
fn concrete_index(
    index: i64,
    modifiers: &[Modifier],
    len: usize,
    path: impl Fn() -> String,
) -> Result<usize, PatchError> {
    let mut result = index;
    for m in modifiers {
        match m {
            Modifier::Prev => result -= 1,
            Modifier::Next => result += 1,
            other => {
                return Err(PatchError::BadIndexModifier {
                    found: other.name(),
                    path: path(),
                })
            }
        }
    }
    let len_i = len as i64;
    if result >= len_i || -result > len_i {
        return Err(PatchError::MissingIndex {
            index: result,
            len,
            path: path(),
        });
    }
    if result < 0 {
        result += len_i;
    }
    Ok(result as usize)
}

/// go-patch's `ArrayInsertion.Concrete`: the position and whether to insert
/// (`:before`/`:after`) rather than replace.
fn insertion(
    index: i64,
    modifiers: &[Modifier],
    len: usize,
    path: impl Fn() -> String,
) -> Result<(usize, bool), PatchError> {
    let mut before = false;
    let mut after = false;
    let mut rest = Vec::new();
    for m in modifiers {
        if before || after {
            return Err(PatchError::ModifierAfterInsertion {
                after: if before { "before" } else { "after" },
                found: m.name(),
                path: path(),
            });
        }
        match m {
            Modifier::Before => before = true,
            Modifier::After => after = true,
            other => rest.push(*other),
        }
    }
    let mut pos = concrete_index(index, &rest, len, &path)?;
    if after && pos != len {
        pos += 1;
    }
    Ok((pos, before || after))
}

fn missing_key(key: &str, path: String, map: &Mapping) -> PatchError {
    let mut keys: Vec<&str> = map.keys().filter_map(Value::as_str).collect();
    keys.sort_unstable();
    let siblings = if keys.is_empty() {
        "found no other map keys".to_string()
    } else {
        format!("found map keys: '{}'", keys.join("', '"))
    };
    PatchError::MissingKey {
        key: key.to_string(),
        path,
        siblings,
    }
}

fn seq_mut(node: &mut Value, path: impl Fn() -> String) -> Result<&mut Vec<Value>, PatchError> {
    match node {
        Value::Sequence(s) => Ok(s),
        other => Err(PatchError::TypeMismatch {
            expected: "an array",
            path: path(),
            found: kind_of(other),
        }),
    }
}

fn map_mut(node: &mut Value, path: impl Fn() -> String) -> Result<&mut Mapping, PatchError> {
    match node {
        Value::Mapping(m) => Ok(m),
        other => Err(PatchError::TypeMismatch {
            expected: "a map",
            path: path(),
            found: kind_of(other),
        }),
    }
}

fn seq_ref(node: &Value, path: impl Fn() -> String) -> Result<&Vec<Value>, PatchError> {
    match node {
        Value::Sequence(s) => Ok(s),
        other => Err(PatchError::TypeMismatch {
            expected: "an array",
            path: path(),
            found: kind_of(other),
        }),
    }
}

fn map_ref(node: &Value, path: impl Fn() -> String) -> Result<&Mapping, PatchError> {
    match node {
        Value::Mapping(m) => Ok(m),
        other => Err(PatchError::TypeMismatch {
            expected: "a map",
            path: path(),
            found: kind_of(other),
        }),
    }
}

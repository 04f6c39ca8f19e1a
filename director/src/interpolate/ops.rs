//! Ops files: parsing a YAML array of go-patch operations (`replace`,
//! `remove`, `test`) with the line of every operation, and applying them in
//! order to a document.
//!
//! This module owns the ops-file format and its error messages (file,
//! operation index, line). The semantics of one operation live in `patch`.
//! It must not interpolate variables and must not touch the director's
//! state, CPIs or the network.

use serde_yaml_ng::Value;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

use super::patch::{self, kind_of, PatchError};
use super::pointer::Pointer;

/// What an operation does.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// Set the value at the path (creating along optional tokens).
    Replace { value: Value },
    /// Remove the value at the path.
    Remove,
    /// Check the value at the path (`value`) or its absence (`absent: true`).
    Test { value: Option<Value>, absent: bool },
}

/// One operation of an ops file.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    pub path: Pointer,
    /// The operation's own `error:` message, shown around a failure.
    pub error: Option<String>,
    /// Position in its file (0-based, as in BOSH's messages).
    pub index: usize,
    /// 1-based line where the operation starts, when known.
    pub line: Option<usize>,
}

/// A parsed ops file.
#[derive(Clone, Debug, PartialEq)]
pub struct OpsFile {
    /// The file's name, for messages.
    pub name: String,
    pub ops: Vec<Op>,
}

/// An ops file that cannot be read or applied.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("ops file {file}: invalid YAML: {message}")]
    Yaml {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error("ops file {file}: expected an array of operations but found {found}")]
    NotAnArray { file: String, found: &'static str },
    #[error("operation [{index}] in {file}{}: {message}", at_line(.line))]
    Invalid {
        file: String,
        index: usize,
        line: Option<usize>,
        message: String,
    },
    #[error("operation [{index}] in {file} failed{}", at_line(.line))]
    Failed {
        file: String,
        index: usize,
        line: Option<usize>,
        #[source]
        source: PatchError,
    },
}

fn at_line(line: &Option<usize>) -> String {
    match line {
        Some(l) => format!(" (line {l})"),
        None => String::new(),
    }
}

const ALLOWED_KEYS: &str = "type, path, value, absent, error";

/// Parse an ops file: a YAML array of operations (an empty file has none).
pub fn parse_ops(file: &str, text: &str) -> Result<OpsFile, OpsError> {
    let doc = super::parse_yaml(text).map_err(|(line, message)| OpsError::Yaml {
        file: file.to_string(),
        line,
        message,
    })?;
    let items = match doc {
        Value::Null => {
            return Ok(OpsFile {
                name: file.to_string(),
                ops: Vec::new(),
            })
        }
        Value::Sequence(items) => items,
        other => {
            return Err(OpsError::NotAnArray {
                file: file.to_string(),
                found: kind_of(&other),
            })
        }
    };
    let lines = op_lines(text);
    let mut ops = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let info = lines.get(index);
        ops.push(parse_op(file, index, item, info)?);
    }
    Ok(OpsFile {
        name: file.to_string(),
        ops,
    })
}

fn parse_op(file: &str, index: usize, item: Value, info: Option<&OpLine>) -> Result<Op, OpsError> {
    let op_line = info.map(|i| i.line);
    let key_line = |key: &str| {
        info.and_then(|i| i.keys.iter().find(|(k, _)| k == key).map(|(_, l)| *l))
            .or(op_line)
    };
    let invalid = |line: Option<usize>, message: String| OpsError::Invalid {
        file: file.to_string(),
        index,
        line,
        message,
    };
    let Value::Mapping(map) = item else {
        return Err(invalid(
            op_line,
            format!(
                "expected a map with 'type' and 'path' but found {}",
                kind_of(&item)
            ),
        ));
    };
    let mut op_type = None;
    let mut path = None;
    let mut value = None;
    let mut absent = None;
    let mut error = None;
    for (k, v) in map {
        let Some(key) = k.as_str() else {
            return Err(invalid(
                op_line,
                format!("unexpected non-string key (allowed keys: {ALLOWED_KEYS})"),
            ));
        };
        let string = |v: Value| match v {
            Value::String(s) => Ok(s),
            other => Err(invalid(
                key_line(key),
                format!("'{key}' must be a string but is {}", kind_of(&other)),
            )),
        };
        match key {
            "type" => op_type = Some(string(v)?),
            "path" => path = Some(string(v)?),
            "error" => error = Some(string(v)?),
            // go-patch reads `value: null` as no value at all.
            "value" => value = if v.is_null() { None } else { Some(v) },
            "absent" => match v {
                Value::Bool(b) => absent = Some(b),
                other => {
                    return Err(invalid(
                        key_line(key),
                        format!("'absent' must be true or false but is {}", kind_of(&other)),
                    ))
                }
            },
            other => {
                return Err(invalid(
                    key_line(other),
                    format!("unknown key '{other}' (allowed keys: {ALLOWED_KEYS})"),
                ))
            }
        }
    }
    let Some(op_type) = op_type else {
        return Err(invalid(op_line, "missing 'type'".to_string()));
    };
    let Some(path_text) = path else {
        return Err(invalid(op_line, "missing 'path'".to_string()));
    };
    let path = Pointer::parse(&path_text)
        .map_err(|e| invalid(key_line("path"), format!("invalid path '{path_text}': {e}")))?;
    let kind = match op_type.as_str() {
        "replace" => {
            if absent.is_some() {
                return Err(invalid(
                    key_line("absent"),
                    "'absent' is only allowed with type 'test'".to_string(),
                ));
            }
            match value {
                Some(value) => OpKind::Replace { value },
                None => return Err(invalid(op_line, "missing 'value'".to_string())),
            }
        }
        "remove" => {
            if value.is_some() {
                return Err(invalid(
                    key_line("value"),
                    "'value' is not allowed with type 'remove'".to_string(),
                ));
            }
            if absent.is_some() {
                return Err(invalid(
                    key_line("absent"),
                    "'absent' is only allowed with type 'test'".to_string(),
                ));
            }
            OpKind::Remove
        }
        "test" => {
            if value.is_none() && absent.is_none() {
                return Err(invalid(op_line, "missing 'value' or 'absent'".to_string()));
            }
            OpKind::Test {
                value,
                absent: absent.unwrap_or(false),
            }
        }
        other => {
            return Err(invalid(
                key_line("type"),
                format!("unknown operation type '{other}' (expected replace, remove or test)"),
            ))
        }
    };
    Ok(Op {
        kind,
        path,
        error,
        index,
        line: op_line,
    })
}

impl Op {
    /// Apply this operation to `doc`.
    pub fn apply(&self, doc: &mut Value) -> Result<(), PatchError> {
        let result = match &self.kind {
            OpKind::Replace { value } => patch::replace(doc, &self.path, value),
            OpKind::Remove => patch::remove(doc, &self.path),
            OpKind::Test { absent: true, .. } => patch::test_absent(doc, &self.path),
            OpKind::Test { value, .. } => {
                patch::test_value(doc, &self.path, value.as_ref().unwrap_or(&Value::Null))
            }
        };
        match (result, &self.error) {
            (Err(e), Some(message)) => Err(PatchError::Described {
                message: message.clone(),
                source: Box::new(e),
            }),
            (r, _) => r,
        }
    }
}

impl OpsFile {
    /// Apply every operation in order; the first failure stops.
    pub fn apply(&self, doc: &mut Value) -> Result<(), OpsError> {
        for op in &self.ops {
            op.apply(doc).map_err(|source| OpsError::Failed {
                file: self.name.clone(),
                index: op.index,
                line: op.line,
                source,
            })?;
        }
        Ok(())
    }
}

/// Apply ops files in order.
pub fn apply_ops(doc: &mut Value, files: &[OpsFile]) -> Result<(), OpsError> {
    for f in files {
        f.apply(doc)?;
    }
    Ok(())
}

/// Where an operation starts and where each of its keys is.
#[derive(Debug, Default)]
struct OpLine {
    line: usize,
    keys: Vec<(String, usize)>,
}

enum Frame {
    Seq,
    Map { expect_key: bool },
}

/// Collects the line of each item of the root sequence and of its keys.
#[derive(Default)]
struct LineCollector {
    stack: Vec<Frame>,
    ops: Vec<OpLine>,
}

impl LineCollector {
    fn node_start(&mut self, line: usize, scalar: Option<&str>) {
        let depth = self.stack.len();
        match self.stack.last() {
            Some(Frame::Seq) if depth == 1 => self.ops.push(OpLine {
                line,
                keys: Vec::new(),
            }),
            Some(Frame::Map { expect_key: true }) if depth == 2 => {
                if let (Some(op), Some(text)) = (self.ops.last_mut(), scalar) {
                    op.keys.push((text.to_string(), line));
                }
            }
            _ => {}
        }
    }

    fn node_end(&mut self) {
        if let Some(Frame::Map { expect_key }) = self.stack.last_mut() {
            *expect_key = !*expect_key;
        }
    }
}

impl MarkedEventReceiver for LineCollector {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line().max(1);
        match ev {
            Event::Scalar(text, ..) => {
                self.node_start(line, Some(&text));
                self.node_end();
            }
            Event::Alias(_) => {
                self.node_start(line, None);
                self.node_end();
            }
            Event::SequenceStart(..) => {
                self.node_start(line, None);
                self.stack.push(Frame::Seq);
            }
            Event::MappingStart(..) => {
                self.node_start(line, None);
                self.stack.push(Frame::Map { expect_key: true });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
                self.node_end();
            }
            _ => {}
        }
    }
}

/// Lines of the operations of an ops file (best effort: empty when the
/// text does not parse, which `parse_yaml` has reported already).
fn op_lines(text: &str) -> Vec<OpLine> {
    let mut collector = LineCollector::default();
    let mut parser = Parser::new_from_str(text);
    if parser.load(&mut collector, false).is_err() {
        return Vec::new();
    }
    collector.ops
}

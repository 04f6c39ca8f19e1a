//! YAML parsed into a tree of [`Node`]s that know their 1-based line, and a
//! small, generic decoding kit ([`Decoder`], [`Fields`]) that turns such trees
//! into typed values while recording every node's line in a [`SourceMap`]
//! and collecting every [`Problem`] (file, path, line) instead of stopping at
//! the first one.
//!
//! This module owns YAML syntax and generic decoding only. It must not know
//! about manifests, cloud-configs, releases or any other document kind (those
//! modules use the kit), and it never panics on operator input.

use std::collections::{HashMap, HashSet};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, ScanError, TScalarStyle};

use crate::model::problems::{Problem, Problems, SourceMap};

/// One YAML node and the 1-based line it starts on. A map value carries the
/// line of its key, so problems about a nested map point at the key.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub line: usize,
    pub value: NodeValue,
}

/// The value of a node. Plain scalars are resolved with the YAML 1.2 core
/// schema; quoted and block scalars are always strings. Map keys keep their
/// source text and order.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Seq(Vec<Node>),
    Map(Vec<(String, Node)>),
}

impl Node {
    pub fn new(line: usize, value: NodeValue) -> Node {
        Node { line, value }
    }

    /// The node as JSON (NaN and infinities become `null`).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.value {
            NodeValue::Null => Value::Null,
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Int(i) => Value::from(*i),
            NodeValue::Float(f) => serde_json::Number::from_f64(*f)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            NodeValue::String(s) => Value::String(s.clone()),
            NodeValue::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// A word for the node's kind, for messages: `null`, `boolean`,
    /// `integer`, `float`, `string`, `list`, `map`.
    pub fn kind_name(&self) -> &'static str {
        match self.value {
            NodeValue::Null => "null",
            NodeValue::Bool(_) => "boolean",
            NodeValue::Int(_) => "integer",
            NodeValue::Float(_) => "float",
            NodeValue::String(_) => "string",
            NodeValue::Seq(_) => "list",
            NodeValue::Map(_) => "map",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self.value, NodeValue::Null)
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            NodeValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_seq(&self) -> Option<&[Node]> {
        match &self.value {
            NodeValue::Seq(items) => Some(items),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(String, Node)]> {
        match &self.value {
            NodeValue::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under `key`, when this is a map that has it.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// Parse one YAML document (only the first of a stream). An empty document
/// is [`NodeValue::Null`]. Syntax errors, duplicate keys, unknown aliases, NUL
/// bytes and documents over the limits ([`MAX_ALIASES`], [`MAX_COPIED_NODES`],
/// [`MAX_COPIED_BYTES`], [`MAX_DEPTH`]) become a [`Problem`] naming `file`
/// and the line. Time and memory grow linearly with the text.
pub fn parse(file: &str, text: &str) -> Result<Node, Problem> {
    if let Some(line) = nul_line(text) {
        return Err(Problem {
            file: file.to_string(),
            path: String::new(),
            line: Some(line),
            message: NUL_MESSAGE.to_string(),
        });
    }
    let mut builder = Builder::default();
    if let Err(e) = feed(text, &mut builder, |b| b.error.is_some() || b.done) {
        return Err(Problem {
            file: file.to_string(),
            path: String::new(),
            line: Some(e.marker().line().max(1)),
            message: format!("invalid YAML: {}", e.info()),
        });
    }
    if let Some((line, path, message)) = builder.error {
        return Err(Problem {
            file: file.to_string(),
            path,
            line: Some(line),
            message,
        });
    }
    Ok(builder
        .root
        .unwrap_or_else(|| Node::new(1, NodeValue::Null)))
}

/// Resolve a plain scalar with the YAML 1.2 core schema.
pub fn resolve_plain(s: &str) -> NodeValue {
    match s {
        "" | "~" | "null" | "Null" | "NULL" => return NodeValue::Null,
        "true" | "True" | "TRUE" => return NodeValue::Bool(true),
        "false" | "False" | "FALSE" => return NodeValue::Bool(false),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => {
            return NodeValue::Float(f64::INFINITY)
        }
        "-.inf" | "-.Inf" | "-.INF" => return NodeValue::Float(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return NodeValue::Float(f64::NAN),
        _ => {}
    }
    if let Some(v) = resolve_int(s) {
        return v;
    }
    if is_core_float(s) {
        if let Ok(f) = s.parse::<f64>() {
            return NodeValue::Float(f);
        }
    }
    NodeValue::String(s.to_string())
}

fn resolve_int(s: &str) -> Option<NodeValue> {
    let radix = |p: &str, r: u32| {
        let digits = s.strip_prefix(p)?;
        if digits.is_empty() {
            return None;
        }
        i64::from_str_radix(digits, r).ok().map(NodeValue::Int)
    };
    if s.starts_with("0x") {
        return radix("0x", 16);
    }
    if s.starts_with("0o") {
        return radix("0o", 8);
    }
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match s.parse::<i64>() {
        Ok(i) => Some(NodeValue::Int(i)),
        // Too big for i64: keep it as a (lossy) float, like most YAML loaders.
        Err(_) => s.parse::<f64>().ok().map(NodeValue::Float),
    }
}

/// `[-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?`
fn is_core_float(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
    }
    let int_start = i;
    while i < b.len() && b[i].is_ascii_digit() {
        i += 1;
    }
    let int_digits = i - int_start;
    let mut frac_digits = 0;
    if i < b.len() && b[i] == b'.' {
        i += 1;
        let fs = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        frac_digits = i - fs;
    }
    if int_digits == 0 && frac_digits == 0 {
        return false;
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
            i += 1;
        }
        let es = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == es {
            return false;
        }
    }
    i == b.len()
}

const CORE_TAG: &str = "tag:yaml.org,2002:";

/// Resolve a scalar with an explicit tag; `Err` names what went wrong.
fn resolve_tagged(v: &str, tag: &Tag) -> Result<NodeValue, String> {
    if tag.handle != CORE_TAG && tag.handle != "!!" {
        // Application tags mean nothing to bosun: resolve as if untagged.
        return Ok(resolve_plain(v));
    }
    let bad = |what: &str| format!("'{v}' is not a valid {what} (tag !!{})", tag.suffix);
    match tag.suffix.as_str() {
        "str" => Ok(NodeValue::String(v.to_string())),
        "null" => match resolve_plain(v) {
            NodeValue::Null => Ok(NodeValue::Null),
            _ => Err(bad("null")),
        },
        "bool" => match resolve_plain(v) {
            b @ NodeValue::Bool(_) => Ok(b),
            _ => Err(bad("boolean")),
        },
        "int" => match resolve_int(v) {
            Some(i @ NodeValue::Int(_)) => Ok(i),
            _ => Err(bad("integer")),
        },
        "float" => match resolve_plain(v) {
            NodeValue::Float(f) => Ok(NodeValue::Float(f)),
            NodeValue::Int(i) => Ok(NodeValue::Float(i as f64)),
            _ => Err(bad("float")),
        },
        _ => Ok(resolve_plain(v)),
    }
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

/// Most aliases (`*name`) one document may use.
pub const MAX_ALIASES: usize = 100_000;
/// Most nodes that aliases may copy into one document (an alias to a map of
/// ten entries copies eleven nodes, counting the map itself; the keys are not
/// counted). Anchors nested inside other anchors count as copies too.
pub const MAX_COPIED_NODES: usize = 1_000_000;
/// Most bytes of scalar text (keys and values) that aliases may copy into
/// one document.
pub const MAX_COPIED_BYTES: usize = 32 << 20;
/// Deepest nesting of lists and maps in one document.
pub const MAX_DEPTH: usize = 256;

const NUL_MESSAGE: &str = "the text contains a NUL byte (\\0), which YAML does not allow";

/// The 1-based line of the first NUL byte of `text`, if it has one.
pub fn nul_line(text: &str) -> Option<usize> {
    let at = text.bytes().position(|b| b == 0)?;
    Some(
        text.as_bytes()[..at]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
    )
}

fn depth_message() -> String {
    format!("lists and maps are nested more than {MAX_DEPTH} levels deep")
}

/// What a node holds: nodes (itself included), bytes of scalar text, and
/// height (0 for a scalar, 1 + its highest child for a list or map).
#[derive(Clone, Copy, Debug)]
struct Size {
    nodes: usize,
    bytes: usize,
    height: usize,
}

impl Size {
    fn scalar(text: &str) -> Size {
        Size {
            nodes: 1,
            bytes: text.len(),
            height: 0,
        }
    }

    fn container() -> Size {
        Size {
            nodes: 1,
            bytes: 0,
            height: 1,
        }
    }

    /// Keys count for their text only (they are not nodes of the tree).
    fn add_key(&mut self, text: &str) {
        self.bytes = self.bytes.saturating_add(text.len());
    }

    fn add_child(&mut self, child: Size) {
        self.nodes = self.nodes.saturating_add(child.nodes);
        self.bytes = self.bytes.saturating_add(child.bytes);
        self.height = self.height.max(child.height.saturating_add(1));
    }
}

/// What aliases have copied so far in one document.
#[derive(Default)]
struct Budget {
    aliases: usize,
    nodes: usize,
    bytes: usize,
}

impl Budget {
    /// One alias to a node of `size`.
    fn alias(&mut self, size: Size) -> Result<(), String> {
        self.aliases += 1;
        if self.aliases > MAX_ALIASES {
            return Err(format!("more than {MAX_ALIASES} aliases in one document"));
        }
        self.copy(size)
    }

    /// A copy of a node of `size`.
    fn copy(&mut self, size: Size) -> Result<(), String> {
        self.nodes = self.nodes.saturating_add(size.nodes);
        self.bytes = self.bytes.saturating_add(size.bytes);
        if self.nodes > MAX_COPIED_NODES {
            return Err(format!(
                "aliases expand to more than {MAX_COPIED_NODES} nodes \
                 (the most one document may copy through anchors and aliases)"
            ));
        }
        if self.bytes > MAX_COPIED_BYTES {
            return Err(format!(
                "aliases expand to more than {} MiB of text \
                 (the most one document may copy through anchors and aliases)",
                MAX_COPIED_BYTES >> 20
            ));
        }
        Ok(())
    }
}

/// Check `text` against the limits [`parse`] enforces on NUL bytes and
/// aliases, without building a tree: for readers other than [`parse`] that
/// expand aliases themselves. Returns the 1-based line and a message. Syntax
/// errors are not reported here; the caller's reader reports them.
pub fn check_limits(text: &str) -> Result<(), (usize, String)> {
    if let Some(line) = nul_line(text) {
        return Err((line, NUL_MESSAGE.to_string()));
    }
    // Without a '*' there is no alias.
    if !text.contains('*') {
        return Ok(());
    }
    let mut counter = AliasCounter::default();
    match (
        feed(text, &mut counter, |c| c.error.is_some() || c.done),
        counter.error,
    ) {
        (_, Some(e)) => Err(e),
        // A syntax error is the caller's reader's to report, with its own position.
        (Err(_), None) | (Ok(()), None) => Ok(()),
    }
}

/// Feed the events of `text` to `recv`, one at a time, until the first
/// document ends or `stop(recv)`. (yaml-rust2's own `Parser::load` recurses
/// once per level of nesting: a deep enough document overflows the stack.)
fn feed<R: MarkedEventReceiver>(
    text: &str,
    recv: &mut R,
    stop: fn(&R) -> bool,
) -> Result<(), ScanError> {
    let mut parser = Parser::new_from_str(text);
    loop {
        let (ev, mark) = parser.next_token()?;
        let last = matches!(ev, Event::DocumentEnd | Event::StreamEnd);
        recv.on_event(ev, mark);
        if last || stop(recv) {
            return Ok(());
        }
    }
}

/// Counts what the aliases of a document copy (see [`check_limits`]).
#[derive(Default)]
struct AliasCounter {
    /// Open lists and maps.
    stack: Vec<CountFrame>,
    anchors: HashMap<usize, Size>,
    budget: Budget,
    done: bool,
    error: Option<(usize, String)>,
}

/// An open list or map of [`AliasCounter`].
struct CountFrame {
    anchor: usize,
    size: Size,
    /// A map whose next child is a key (counted as [`Builder`] counts keys).
    key_next: Option<bool>,
}

impl AliasCounter {
    fn complete(&mut self, size: Size, anchor: usize, text: Option<&str>) {
        if anchor > 0 {
            self.anchors.insert(anchor, size);
        }
        if let Some(top) = self.stack.last_mut() {
            match (top.key_next, text) {
                (Some(true), Some(key)) => top.size.add_key(key),
                _ => top.size.add_child(size),
            }
            top.key_next = top.key_next.map(|k| !k);
        }
    }

    fn push(&mut self, anchor: usize, map: bool) {
        self.stack.push(CountFrame {
            anchor,
            size: Size::container(),
            key_next: map.then_some(true),
        });
    }
}

impl MarkedEventReceiver for AliasCounter {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() || self.done {
            return;
        }
        match ev {
            Event::DocumentEnd => self.done = true,
            // An unknown anchor is the reader's to report.
            Event::Alias(id) => {
                if let Some(size) = self.anchors.get(&id).copied() {
                    match self.budget.alias(size) {
                        Ok(()) => self.complete(size, 0, None),
                        Err(m) => self.error = Some((mark.line().max(1), m)),
                    }
                }
            }
            Event::Scalar(v, _, anchor, _) => self.complete(Size::scalar(&v), anchor, Some(&v)),
            Event::SequenceStart(anchor, _) => self.push(anchor, false),
            Event::MappingStart(anchor, _) => self.push(anchor, true),
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(f) = self.stack.pop() {
                    self.complete(f.size, f.anchor, None);
                }
            }
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Tree builder
// ---------------------------------------------------------------------------

enum Frame {
    Seq {
        line: usize,
        anchor: usize,
        size: Size,
        items: Vec<Node>,
    },
    Map {
        line: usize,
        anchor: usize,
        size: Size,
        entries: Vec<(String, Node)>,
        /// The keys of `entries`, for finding duplicates in constant time.
        seen: HashSet<String>,
        /// Key waiting for its value: text, line, whether it is a `<<` merge key.
        key: Option<(String, usize, bool)>,
        /// Maps merged in with `<<` (explicit keys win over them).
        merges: Vec<Node>,
    },
}

impl Frame {
    fn anchor(&self) -> usize {
        match self {
            Frame::Seq { anchor, .. } | Frame::Map { anchor, .. } => *anchor,
        }
    }
}

/// Builds a [`Node`] tree from parser events; records the first error.
#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    /// Anchored nodes, to be copied by aliases.
    anchors: HashMap<usize, (Node, Size)>,
    /// How many frames of `stack` carry an anchor.
    open_anchors: usize,
    budget: Budget,
    root: Option<Node>,
    done: bool,
    /// line, path-ish context, message
    error: Option<(usize, String, String)>,
}

impl Builder {
    fn fail(&mut self, line: usize, message: String) {
        if self.error.is_none() {
            self.error = Some((line, self.path(), message));
        }
    }

    /// A path to the node being built, for error messages.
    fn path(&self) -> String {
        let mut p = String::new();
        for f in &self.stack {
            match f {
                Frame::Seq { items, .. } => p.push_str(&format!("[{}]", items.len())),
                Frame::Map { key, .. } => {
                    if let Some((k, _, _)) = key {
                        if !p.is_empty() {
                            p.push('.');
                        }
                        p.push_str(k);
                    }
                }
            }
        }
        p
    }

    fn push(&mut self, frame: Frame, line: usize) {
        if self.stack.len() >= MAX_DEPTH {
            return self.fail(line, depth_message());
        }
        if frame.anchor() > 0 {
            self.open_anchors += 1;
        }
        self.stack.push(frame);
    }

    /// A node is complete: remember its anchor, attach it to its parent.
    /// `key_text` is the source text of a scalar (used for keys).
    fn complete(
        &mut self,
        mut node: Node,
        size: Size,
        anchor: usize,
        key_text: Option<(String, bool)>,
    ) {
        if anchor > 0 {
            // An anchor inside another anchor is copied once more with it.
            if self.open_anchors > 0 {
                if let Err(m) = self.budget.copy(size) {
                    return self.fail(node.line, m);
                }
            }
            self.anchors.insert(anchor, (node.clone(), size));
        }
        let Some(top) = self.stack.last_mut() else {
            if self.root.is_none() {
                self.root = Some(node);
            }
            return;
        };
        match top {
            Frame::Seq { items, size: s, .. } => {
                s.add_child(size);
                items.push(node);
            }
            Frame::Map {
                entries,
                seen,
                key,
                merges,
                size: s,
                ..
            } => match key.take() {
                None => match key_text {
                    Some((text, is_merge)) => {
                        s.add_key(&text);
                        if !is_merge && !seen.insert(text.clone()) {
                            let line = node.line;
                            *key = Some((text.clone(), line, false));
                            self.fail(line, format!("duplicate key '{text}'"));
                            return;
                        }
                        *key = Some((text, node.line, is_merge));
                    }
                    None => {
                        let line = node.line;
                        let kind = node.kind_name();
                        self.fail(line, format!("map keys must be scalars, found a {kind}"));
                    }
                },
                Some((k, key_line, is_merge)) => {
                    s.add_child(size);
                    node.line = key_line;
                    if is_merge {
                        match node.value {
                            NodeValue::Map(_) => merges.push(node),
                            NodeValue::Seq(list) if list.iter().all(|n| n.as_map().is_some()) => {
                                merges.extend(list)
                            }
                            _ => self.fail(
                                key_line,
                                "a '<<' merge key needs a map or a list of maps".to_string(),
                            ),
                        }
                    } else {
                        entries.push((k, node));
                    }
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() || self.done {
            return;
        }
        let line = mark.line().max(1);
        match ev {
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentStart => {}
            Event::DocumentEnd => self.done = true,
            Event::Alias(id) => {
                let Some(size) = self.anchors.get(&id).map(|(_, s)| *s) else {
                    return self.fail(line, "alias to an unknown anchor".to_string());
                };
                if self.stack.len().saturating_add(size.height) > MAX_DEPTH {
                    return self.fail(line, depth_message());
                }
                if let Err(m) = self.budget.alias(size) {
                    return self.fail(line, m);
                }
                if let Some((n, _)) = self.anchors.get(&id) {
                    let mut n = n.clone();
                    n.line = line;
                    let key = scalar_key_text(&n);
                    self.complete(n, size, 0, key);
                }
            }
            Event::Scalar(v, style, anchor, tag) => {
                let value = match &tag {
                    Some(t) => match resolve_tagged(&v, t) {
                        Ok(v) => v,
                        Err(m) => return self.fail(line, m),
                    },
                    None if style != TScalarStyle::Plain => NodeValue::String(v.clone()),
                    None => resolve_plain(&v),
                };
                let is_merge = style == TScalarStyle::Plain && tag.is_none() && v == "<<";
                let size = Size::scalar(&v);
                self.complete(Node::new(line, value), size, anchor, Some((v, is_merge)));
            }
            Event::SequenceStart(anchor, _) => self.push(
                Frame::Seq {
                    line,
                    anchor,
                    size: Size::container(),
                    items: Vec::new(),
                },
                line,
            ),
            Event::MappingStart(anchor, _) => self.push(
                Frame::Map {
                    line,
                    anchor,
                    size: Size::container(),
                    entries: Vec::new(),
                    seen: HashSet::new(),
                    key: None,
                    merges: Vec::new(),
                },
                line,
            ),
            Event::SequenceEnd | Event::MappingEnd => {
                let Some(frame) = self.stack.pop() else {
                    return self.fail(line, "unbalanced YAML structure".to_string());
                };
                if frame.anchor() > 0 {
                    self.open_anchors -= 1;
                }
                match frame {
                    Frame::Seq {
                        line,
                        anchor,
                        size,
                        items,
                    } => self.complete(Node::new(line, NodeValue::Seq(items)), size, anchor, None),
                    Frame::Map {
                        line,
                        anchor,
                        size,
                        mut entries,
                        mut seen,
                        merges,
                        ..
                    } => {
                        for m in merges {
                            if let NodeValue::Map(extra) = m.value {
                                for (k, v) in extra {
                                    if !seen.contains(&k) {
                                        seen.insert(k.clone());
                                        entries.push((k, v));
                                    }
                                }
                            }
                        }
                        self.complete(Node::new(line, NodeValue::Map(entries)), size, anchor, None)
                    }
                }
            }
        }
    }
}

/// The text an aliased scalar contributes when used as a map key.
fn scalar_key_text(n: &Node) -> Option<(String, bool)> {
    let text = match &n.value {
        NodeValue::Null => "null".to_string(),
        NodeValue::Bool(b) => b.to_string(),
        NodeValue::Int(i) => i.to_string(),
        NodeValue::Float(f) => f.to_string(),
        NodeValue::String(s) => s.clone(),
        NodeValue::Seq(_) | NodeValue::Map(_) => return None,
    };
    Some((text, false))
}

// ---------------------------------------------------------------------------
// Decoding kit
// ---------------------------------------------------------------------------

/// `parent.key`, or `key` at the top.
pub fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `parent[index]`.
pub fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// The candidate closest to `word`, when it is close enough to be a likely typo.
pub fn suggest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let mut best: Option<(&str, f64)> = None;
    for c in candidates {
        let d = strsim::damerau_levenshtein(word, c);
        let jw = strsim::jaro_winkler(word, c);
        let close = (d <= 2 && d < word.len().min(c.len())) || jw >= 0.9;
        if close && best.is_none_or(|(_, s)| jw > s) {
            best = Some((c, jw));
        }
    }
    best.map(|(c, _)| c)
}

/// " (did you mean 'x'?)" or "".
pub fn did_you_mean(word: &str, candidates: &[&str]) -> String {
    match suggest(word, candidates) {
        Some(s) => format!(" (did you mean '{s}'?)"),
        None => String::new(),
    }
}

/// The entries of a map node that passed [`Decoder::map`], with its path.
#[derive(Clone, Debug)]
pub struct Fields<'n> {
    pub node: &'n Node,
    entries: &'n [(String, Node)],
    path: String,
}

impl<'n> Fields<'n> {
    /// The map's own path.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of `key` in this map.
    pub fn child(&self, key: &str) -> String {
        child_path(&self.path, key)
    }

    /// The value under `key` (may be a null node).
    pub fn get(&self, key: &str) -> Option<&'n Node> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether `key` is present with a non-null value.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some_and(|n| !n.is_null())
    }

    pub fn entries(&self) -> &'n [(String, Node)] {
        self.entries
    }
}

/// One item of a list, with its path.
#[derive(Clone, Debug)]
pub struct Item<'n> {
    pub path: String,
    pub node: &'n Node,
}

/// Walks a [`Node`] tree, recording lines into a [`SourceMap`] and problems
/// into [`Problems`]. Getters never fail: on a problem they record it and
/// return `None` (or an empty value), so decoding goes on and every problem
/// is reported at once.
///
/// Convention: [`Decoder::map`] reports missing required keys, so getters on
/// [`Fields`] return `None` silently for absent keys. The plain getters
/// (`str`, `u64`, ...) report a null value as a wrong type; the `opt_*`
/// getters treat null like absence.
pub struct Decoder<'a> {
    pub source: &'a mut SourceMap,
    pub problems: &'a mut Problems,
}

impl<'a> Decoder<'a> {
    pub fn new(source: &'a mut SourceMap, problems: &'a mut Problems) -> Self {
        Decoder { source, problems }
    }

    /// Record the line of `node` and all its descendants under `path`.
    pub fn record(&mut self, node: &Node, path: &str) {
        self.source.lines.insert(path.to_string(), node.line);
        match &node.value {
            NodeValue::Seq(items) => {
                for (i, n) in items.iter().enumerate() {
                    self.record(n, &index_path(path, i));
                }
            }
            NodeValue::Map(entries) => {
                for (k, n) in entries {
                    self.record(n, &child_path(path, k));
                }
            }
            _ => {}
        }
    }

    /// Report a problem at `path` (line from the source map).
    pub fn problem(&mut self, path: &str, message: impl Into<String>) {
        let p = self.source.problem(path, message);
        self.problems.push(p);
    }

    fn wrong_type(&mut self, node: &Node, path: &str, want: &str) {
        self.problem(
            path,
            format!(
                "expected {want}, found {} {}",
                article(node.kind_name()),
                node.kind_name()
            ),
        );
    }

    /// Check that `node` is a map whose keys are all in `required` or
    /// `optional`, and that every `required` key is present. Unknown keys are
    /// reported with a did-you-mean. `None` if `node` is not a map.
    pub fn map<'n>(
        &mut self,
        node: &'n Node,
        path: &str,
        required: &[&str],
        optional: &[&str],
    ) -> Option<Fields<'n>> {
        let Some(entries) = node.as_map() else {
            self.wrong_type(node, path, "a map");
            return None;
        };
        let allowed: Vec<&str> = required.iter().chain(optional).copied().collect();
        for (k, _) in entries {
            if !allowed.contains(&k.as_str()) {
                let hint = did_you_mean(k, &allowed);
                self.problem(&child_path(path, k), format!("unknown key '{k}'{hint}"));
            }
        }
        for r in required {
            if !entries.iter().any(|(k, _)| k == r) {
                self.problem(&child_path(path, r), format!("missing required key '{r}'"));
            }
        }
        Some(Fields {
            node,
            entries,
            path: path.to_string(),
        })
    }

    /// A map whose keys are not checked (free-form, e.g. `consumes`).
    pub fn any_map<'n>(&mut self, node: &'n Node, path: &str) -> Option<Fields<'n>> {
        match node.as_map() {
            Some(entries) => Some(Fields {
                node,
                entries,
                path: path.to_string(),
            }),
            None => {
                self.wrong_type(node, path, "a map");
                None
            }
        }
    }

    // ---- node-level getters -------------------------------------------------

    pub fn node_str(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            NodeValue::String(s) => Some(s.clone()),
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    /// A string, also accepting numbers and booleans written plainly (their
    /// canonical text: `1.10` reads as `1.1`; quote such values).
    pub fn node_text(&mut self, node: &Node, path: &str) -> Option<String> {
        match &node.value {
            NodeValue::String(s) => Some(s.clone()),
            NodeValue::Int(i) => Some(i.to_string()),
            NodeValue::Float(f) => Some(f.to_string()),
            NodeValue::Bool(b) => Some(b.to_string()),
            _ => {
                self.wrong_type(node, path, "a string");
                None
            }
        }
    }

    pub fn node_u64(&mut self, node: &Node, path: &str) -> Option<u64> {
        match node.value {
            NodeValue::Int(i) if i >= 0 => Some(i as u64),
            NodeValue::Int(i) => {
                self.problem(path, format!("must not be negative (found {i})"));
                None
            }
            _ => {
                self.wrong_type(node, path, "a non-negative integer");
                None
            }
        }
    }

    pub fn node_u32(&mut self, node: &Node, path: &str) -> Option<u32> {
        let v = self.node_u64(node, path)?;
        match u32::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                self.problem(path, format!("{v} is too large (at most {})", u32::MAX));
                None
            }
        }
    }

    pub fn node_bool(&mut self, node: &Node, path: &str) -> Option<bool> {
        match node.value {
            NodeValue::Bool(b) => Some(b),
            _ => {
                self.wrong_type(node, path, "true or false");
                None
            }
        }
    }

    /// The items of a list node with their paths.
    pub fn node_seq<'n>(&mut self, node: &'n Node, path: &str) -> Option<Vec<Item<'n>>> {
        match node.as_seq() {
            Some(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, n)| Item {
                        path: index_path(path, i),
                        node: n,
                    })
                    .collect(),
            ),
            None => {
                self.wrong_type(node, path, "a list");
                None
            }
        }
    }

    // ---- field getters ------------------------------------------------------

    fn field<'n>(f: &Fields<'n>, key: &str, opt: bool) -> Option<(&'n Node, String)> {
        let n = f.get(key)?;
        if opt && n.is_null() {
            return None;
        }
        Some((n, f.child(key)))
    }

    pub fn str(&mut self, f: &Fields, key: &str) -> Option<String> {
        let (n, p) = Self::field(f, key, false)?;
        self.node_str(n, &p)
    }

    pub fn opt_str(&mut self, f: &Fields, key: &str) -> Option<String> {
        let (n, p) = Self::field(f, key, true)?;
        self.node_str(n, &p)
    }

    /// See [`Decoder::node_text`].
    pub fn text(&mut self, f: &Fields, key: &str) -> Option<String> {
        let (n, p) = Self::field(f, key, false)?;
        self.node_text(n, &p)
    }

    pub fn opt_text(&mut self, f: &Fields, key: &str) -> Option<String> {
        let (n, p) = Self::field(f, key, true)?;
        self.node_text(n, &p)
    }

    pub fn u64(&mut self, f: &Fields, key: &str) -> Option<u64> {
        let (n, p) = Self::field(f, key, false)?;
        self.node_u64(n, &p)
    }

    pub fn opt_u64(&mut self, f: &Fields, key: &str) -> Option<u64> {
        let (n, p) = Self::field(f, key, true)?;
        self.node_u64(n, &p)
    }

    pub fn u32(&mut self, f: &Fields, key: &str) -> Option<u32> {
        let (n, p) = Self::field(f, key, false)?;
        self.node_u32(n, &p)
    }

    pub fn opt_u32(&mut self, f: &Fields, key: &str) -> Option<u32> {
        let (n, p) = Self::field(f, key, true)?;
        self.node_u32(n, &p)
    }

    pub fn bool(&mut self, f: &Fields, key: &str) -> Option<bool> {
        let (n, p) = Self::field(f, key, false)?;
        self.node_bool(n, &p)
    }

    pub fn opt_bool(&mut self, f: &Fields, key: &str) -> Option<bool> {
        let (n, p) = Self::field(f, key, true)?;
        self.node_bool(n, &p)
    }

    /// The items of a list (empty when absent or not a list; the latter is reported).
    pub fn seq<'n>(&mut self, f: &Fields<'n>, key: &str) -> Vec<Item<'n>> {
        match Self::field(f, key, false) {
            Some((n, p)) => self.node_seq(n, &p).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Like [`Decoder::seq`], but a null value is an empty list.
    pub fn opt_seq<'n>(&mut self, f: &Fields<'n>, key: &str) -> Vec<Item<'n>> {
        match Self::field(f, key, true) {
            Some((n, p)) => self.node_seq(n, &p).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// A list of strings (absent or null: empty).
    pub fn str_list(&mut self, f: &Fields, key: &str) -> Vec<String> {
        self.opt_seq(f, key)
            .into_iter()
            .filter_map(|it| self.node_str(it.node, &it.path))
            .collect()
    }

    /// A free-form value as JSON (absent: `None`).
    pub fn json(&mut self, f: &Fields, key: &str) -> Option<serde_json::Value> {
        f.get(key).map(Node::to_json)
    }

    /// A free-form map as a JSON object; absent or null: `{}`; anything else
    /// is reported and gives `{}`.
    pub fn json_object(&mut self, f: &Fields, key: &str) -> serde_json::Value {
        let empty = serde_json::Value::Object(Default::default());
        match Self::field(f, key, true) {
            None => empty,
            Some((n, p)) => match n.value {
                NodeValue::Map(_) => n.to_json(),
                _ => {
                    self.wrong_type(n, &p, "a map");
                    empty
                }
            },
        }
    }

    /// A nested map with checked keys (absent or null: `None`, silently).
    pub fn opt_map<'n>(
        &mut self,
        f: &Fields<'n>,
        key: &str,
        required: &[&str],
        optional: &[&str],
    ) -> Option<Fields<'n>> {
        let n = f.get(key)?;
        if n.is_null() {
            return None;
        }
        self.map(n, &f.child(key), required, optional)
    }
}

fn article(kind: &str) -> &'static str {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "unknown KIND 'x' (did you mean 'y'?)" or "... (known: a, b)".
pub(crate) fn unknown(kind: &str, name: &str, known: &[&str]) -> String {
    match suggest(name, known) {
        Some(s) => format!("unknown {kind} '{name}' (did you mean '{s}'?)"),
        None if known.is_empty() => {
            format!("unknown {kind} '{name}' (the cloud-config defines none)")
        }
        None => format!("unknown {kind} '{name}' (known: {})", known.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Node {
        parse("t.yml", text).expect("parses")
    }

    #[test]
    fn yaml_scalars_resolve_with_core_schema() {
        let n = p("a: ~\nb: null\nc: true\nd: False\ne: 42\nf: -7\ng: 0x1f\nh: 0o17\n\
                   i: 1.5\nj: 1e3\nk: '42'\nl: \"true\"\nm: hello\nn:\no: .inf\np: yes\nq: !!str 5\nr: 1.10\n");
        let j = n.to_json();
        assert_eq!(j["a"], serde_json::Value::Null);
        assert_eq!(j["b"], serde_json::Value::Null);
        assert_eq!(j["c"], true);
        assert_eq!(j["d"], false);
        assert_eq!(j["e"], 42);
        assert_eq!(j["f"], -7);
        assert_eq!(j["g"], 31);
        assert_eq!(j["h"], 15);
        assert_eq!(j["i"], 1.5);
        assert_eq!(j["j"], 1000.0);
        assert_eq!(j["k"], "42");
        assert_eq!(j["l"], "true");
        assert_eq!(j["m"], "hello");
        assert_eq!(j["n"], serde_json::Value::Null);
        assert_eq!(j["o"], serde_json::Value::Null);
        assert_eq!(j["p"], "yes"); // YAML 1.2: not a boolean
        assert_eq!(j["q"], "5");
        assert_eq!(n.get("r").map(Node::kind_name), Some("float"));
    }

    #[test]
    fn yaml_lines_are_one_based_and_map_values_carry_key_line() {
        let n = p("# comment\nname: x\ngroups:\n  - name: a\n    n: 1\n  - name: b\n");
        assert_eq!(n.get("name").map(|n| n.line), Some(2));
        let groups = n.get("groups").expect("groups");
        assert_eq!(groups.line, 3);
        let items = groups.as_seq().expect("seq");
        assert_eq!(items[0].line, 4);
        assert_eq!(items[0].get("n").map(|n| n.line), Some(5));
        assert_eq!(items[1].line, 6);
    }

    #[test]
    fn yaml_anchors_aliases_and_merge_keys() {
        let n = p("base: &b\n  x: 1\n  y: 2\nother:\n  <<: *b\n  y: 3\nlist: [*b, &s str, *s]\n");
        let j = n.to_json();
        assert_eq!(j["other"], serde_json::json!({"x": 1, "y": 3}));
        assert_eq!(
            j["list"],
            serde_json::json!([{"x": 1, "y": 2}, "str", "str"])
        );
    }

    #[test]
    fn yaml_duplicate_keys_are_a_problem() {
        let e = parse("t.yml", "a: 1\nb:\n  c: 1\n  c: 2\n").expect_err("duplicate");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.path, "b.c");
        assert!(e.message.contains("duplicate key 'c'"), "{e}");
    }

    #[test]
    fn yaml_syntax_error_has_line() {
        let e = parse("bad.yml", "a: 1\nb: [1, 2\nc: 3\n").expect_err("bad");
        assert_eq!(e.file, "bad.yml");
        assert!(e.line.is_some_and(|l| l >= 2), "{e}");
        let e = parse("bad.yml", "a: 1\n  b: 2\n").expect_err("bad");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.starts_with("invalid YAML"));
    }

    #[test]
    fn yaml_empty_document_is_null() {
        assert_eq!(p("").value, NodeValue::Null);
        assert_eq!(p("# only a comment\n").value, NodeValue::Null);
        assert_eq!(p("---\n").value, NodeValue::Null);
    }

    #[test]
    fn yaml_decoder_reports_unknown_missing_and_types() {
        let n = p("name: x\ninstnces: 3\ncount: -1\nflag: 'yes'\nlist: {}\n");
        let mut source = SourceMap::new("t.yml");
        let mut problems = Problems::default();
        let mut d = Decoder::new(&mut source, &mut problems);
        d.record(&n, "");
        let f = d
            .map(&n, "", &["name", "instances"], &["count", "flag", "list"])
            .expect("map");
        assert_eq!(d.str(&f, "name").as_deref(), Some("x"));
        assert_eq!(d.u64(&f, "count"), None);
        assert_eq!(d.opt_bool(&f, "flag"), None);
        assert!(d.seq(&f, "list").is_empty());
        let msgs: Vec<String> = problems.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "t.yml:2: instnces: unknown key 'instnces' (did you mean 'instances'?)",
                "t.yml: instances: missing required key 'instances'",
                "t.yml:3: count: must not be negative (found -1)",
                "t.yml:4: flag: expected true or false, found a string",
                "t.yml:5: list: expected a list, found a map",
            ]
        );
    }

    /// Ten levels of nine aliases each: 9^10 nodes if expanded.
    fn billion_laughs() -> String {
        let mut text = "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n".to_string();
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            text.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        text
    }

    #[test]
    fn yaml_billion_laughs_is_refused_at_the_alias_over_the_limit() {
        let e = parse("laughs.yml", &billion_laughs()).expect_err("over the limit");
        assert_eq!(e.file, "laughs.yml");
        // a5 holds 597871 nodes: its first copy goes over 1000000 in all.
        assert_eq!(e.line, Some(7), "{e}");
        assert_eq!(e.path, "a6[0]");
        assert!(
            e.message
                .contains("aliases expand to more than 1000000 nodes"),
            "{e}"
        );
        let e = check_limits(&billion_laughs()).expect_err("over the limit");
        assert_eq!(e.0, 7, "{e:?}");
        assert!(e.1.contains("more than 1000000 nodes"), "{e:?}");
    }

    #[test]
    fn yaml_many_aliases_of_a_wide_anchor_are_refused() {
        // Not exponential, but 2000 copies of 1001 nodes.
        let mut text = String::from("base: &b\n");
        for i in 0..1000 {
            text.push_str(&format!("- x{i}\n"));
        }
        text.push_str("copies:\n");
        text.push_str(&"- *b\n".repeat(2000));
        let e = parse("wide.yml", &text).expect_err("over the limit");
        // The 1000th copy brings the total over 1000000.
        assert_eq!(e.line, Some(1002 + 1000), "{e}");
        assert!(e.message.contains("more than 1000000 nodes"), "{e}");
        assert!(check_limits(&text).is_err());
        // Fewer copies are fine.
        let text = text.replace(&"- *b\n".repeat(1500), "");
        let n = p(&text);
        assert_eq!(
            n.get("copies").and_then(Node::as_seq).map(<[Node]>::len),
            Some(500)
        );
        assert_eq!(check_limits(&text), Ok(()));
    }

    #[test]
    fn yaml_aliases_of_a_long_string_are_refused_by_size() {
        let text = format!(
            "s: &s '{}'\nl: [{}]\n",
            "x".repeat(1 << 20),
            ["*s"; 40].join(", ")
        );
        let e = parse("long.yml", &text).expect_err("over the limit");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("more than 32 MiB of text"), "{e}");
        assert!(check_limits(&text).is_err());
    }

    #[test]
    fn yaml_check_limits_counts_maps_as_parse_does() {
        // A map of 999 entries is 1000 nodes: 1000 copies are exactly the limit.
        let mut text = String::from("base: &b\n");
        for i in 0..999 {
            text.push_str(&format!("  k{i}: v\n"));
        }
        text.push_str("copies:\n");
        text.push_str(&"- *b\n".repeat(1000));
        assert!(parse("maps.yml", &text).is_ok());
        assert_eq!(check_limits(&text), Ok(()));
        text.push_str("- *b\n");
        assert_eq!(
            parse("maps.yml", &text).map_err(|e| e.line),
            Err(Some(2002))
        );
        assert_eq!(check_limits(&text).map_err(|e| e.0), Err(2002));
    }

    #[test]
    fn yaml_too_many_aliases_are_refused() {
        let text = format!("s: &s x\nl:\n{}", "- *s\n".repeat(MAX_ALIASES + 1));
        let e = parse("many.yml", &text).expect_err("over the limit");
        assert_eq!(e.line, Some(MAX_ALIASES + 3), "{e}");
        assert!(e.message.contains("more than 100000 aliases"), "{e}");
        let e = check_limits(&text).expect_err("over the limit");
        assert_eq!(e.0, MAX_ALIASES + 3);
        // One fewer is fine.
        let text = format!("s: &s x\nl:\n{}", "- *s\n".repeat(MAX_ALIASES));
        assert_eq!(
            p(&text).get("l").and_then(Node::as_seq).map(<[Node]>::len),
            Some(MAX_ALIASES)
        );
    }

    #[test]
    fn yaml_nested_anchors_count_as_copies() {
        // Every level is anchored, so every level is copied with its parent.
        let mut text = String::from("a: ");
        for i in 0..20 {
            text.push_str(&format!("&l{i} [[x, y, z, w, v], "));
        }
        text.push_str(&"q".repeat(1 << 21));
        text.push_str(&"]".repeat(20));
        text.push('\n');
        let e = parse("nested.yml", &text).expect_err("over the limit");
        assert!(e.message.contains("MiB of text"), "{e}");
        // Anchors that are not nested cost nothing.
        let text = "a: &a [x]\nb: &b [y]\nc: [*a, *b]\n";
        assert_eq!(p(text).to_json()["c"], serde_json::json!([["x"], ["y"]]));
    }

    #[test]
    fn yaml_deep_nesting_is_refused() {
        let text = format!("a:\n  {}x\n", "- ".repeat(MAX_DEPTH + 1));
        let e = parse("deep.yml", &text).expect_err("too deep");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("nested more than 256 levels"), "{e}");
        // The deepest allowed: the root map and MAX_DEPTH - 1 lists.
        let text = format!("a:\n  {}x\n", "- ".repeat(MAX_DEPTH - 1));
        assert!(parse("deep.yml", &text).is_ok());
        // An alias may not carry a deep anchor deeper.
        let text = format!("a: &a\n  {}x\nb:\n  - - - *a\n", "- ".repeat(MAX_DEPTH - 2));
        let e = parse("deep.yml", &text).expect_err("too deep");
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("nested more than"), "{e}");
    }

    #[test]
    fn yaml_very_deep_nesting_is_refused_without_overflowing_the_stack() {
        let text = format!("a:\n  {}*x\n", "- ".repeat(200_000));
        let e = parse("deep.yml", &text).expect_err("too deep");
        assert!(e.message.contains("nested more than 256 levels"), "{e}");
        assert_eq!(check_limits(&text), Ok(()));
        let text = format!("{}x{}\n", "[".repeat(250), "]".repeat(250));
        assert!(parse("flow.yml", &text).is_ok());
    }

    #[test]
    fn yaml_big_map_parses_and_a_late_duplicate_is_found() {
        let n = 100_000;
        let mut text = String::from("big:\n");
        for i in 0..n {
            text.push_str(&format!("  key{i}: {i}\n"));
        }
        let node = p(&text);
        let big = node.get("big").and_then(Node::as_map).expect("map");
        assert_eq!(big.len(), n);
        assert_eq!(big[n - 1].1.line, n + 1);
        text.push_str("  key17: again\n");
        let e = parse("big.yml", &text).expect_err("duplicate");
        assert_eq!(e.line, Some(n + 2), "{e}");
        assert_eq!(e.path, "big.key17");
        assert!(e.message.contains("duplicate key 'key17'"), "{e}");
    }

    #[test]
    fn yaml_big_merge_keeps_explicit_keys_and_first_merge_wins() {
        let n = 50_000;
        let mut text = String::from("base: &b\n");
        for i in 0..n {
            text.push_str(&format!("  key{i}: base\n"));
        }
        text.push_str("more: &m {key0: more, extra: more}\n");
        text.push_str("merged:\n  <<: [*b, *m]\n  key1: own\n");
        let node = p(&text);
        let merged = node.get("merged").expect("merged");
        assert_eq!(merged.as_map().map(<[_]>::len), Some(n + 1));
        assert_eq!(merged.get("key1").and_then(Node::as_str), Some("own"));
        assert_eq!(merged.get("key0").and_then(Node::as_str), Some("base"));
        assert_eq!(merged.get("extra").and_then(Node::as_str), Some("more"));
        assert_eq!(merged.get("key9").and_then(Node::as_str), Some("base"));
    }

    #[test]
    fn yaml_nul_byte_is_refused_with_its_line() {
        let e = parse("nul.yml", "a: 1\nb: x\0y\nc: [\n").expect_err("NUL");
        assert_eq!(e.file, "nul.yml");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("NUL byte"), "{e}");
        assert_eq!(e.to_string(), format!("nul.yml:2: {NUL_MESSAGE}"));
        assert_eq!(
            check_limits("a: 1\n\n\0"),
            Err((3, NUL_MESSAGE.to_string()))
        );
        assert_eq!(nul_line("\0"), Some(1));
        assert_eq!(nul_line("a\nb"), None);
    }

    #[test]
    fn yaml_check_limits_leaves_syntax_errors_to_the_reader() {
        assert_eq!(check_limits("a: [*x, \n  b: 2\n"), Ok(()));
        assert_eq!(check_limits("a: *unknown\n"), Ok(()));
        assert_eq!(check_limits("a: '*'\n"), Ok(()));
    }

    #[test]
    fn yaml_suggest_only_close_words() {
        assert_eq!(
            suggest("vm_tpye", &["vm_type", "stemcell"]),
            Some("vm_type")
        );
        assert_eq!(suggest("zzz", &["vm_type", "stemcell"]), None);
    }
}

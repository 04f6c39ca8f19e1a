//! Variables: `((name))` placeholders, their sources, the `variables:`
//! definitions and the resolver that generates missing values into a
//! [`VariableStore`].
//!
//! Semantics follow BOSH's CLI (`director/template` in bosh-cli):
//! - a placeholder is `((name))`, `((name.key.sub))` or `((!name))`
//!   (the `!` is accepted and ignored, as bosh-cli does); whitespace just
//!   inside the parentheses is allowed; names use letters, digits, `_`,
//!   `-`, `.` and `/`;
//! - a placeholder that is a whole string is replaced by the value with its
//!   type; inside a longer string only strings, numbers and booleans may be
//!   embedded;
//! - map values, array items and map keys are interpolated, in one pass (a
//!   value's own placeholders are not expanded again);
//! - sources, highest precedence first: `-v`, `-l` files (later wins),
//!   `--vars-env` (later prefix wins), then the store, which generates the
//!   typed `variables:` entries that no other source provides.
//!
//! This module must not touch the director's state, CPIs or the network;
//! it reaches stored values only through [`VariableStore`].

use std::collections::{BTreeSet, HashMap, HashSet};

use serde_yaml_ng::{Mapping, Value};
use sha2::{Digest, Sha256};

use super::generate::{self, CaMaterial, CertOptions, GenerateError, VarType};
use super::patch::{self, kind_of, PatchError};
use super::pointer::{escape, Pointer, PointerError, Token};
use super::store::{StoreError, VariableStore};

/// A variables problem.
#[derive(Debug, thiserror::Error)]
pub enum VarsError {
    #[error("Expected to find variables:{}", list(.0))]
    Missing(Vec<String>),
    #[error("Finding variable '{name}'")]
    Finding {
        name: String,
        #[source]
        source: PatchError,
    },
    #[error("Invalid type '{kind}' for variable '{name}' at path '{path}': only strings, numbers and booleans can be interpolated within a string")]
    Embed {
        name: String,
        kind: &'static str,
        path: String,
    },
    #[error("Invalid type '{kind}' for variable '{name}' used as a map key at path '{path}': only strings, numbers and booleans can be map keys")]
    KeyType {
        name: String,
        kind: &'static str,
        path: String,
    },
    #[error("duplicate map key '{key}' after interpolation at path '{path}'")]
    DuplicateKey { key: String, path: String },
    #[error("Detected recursion in variable definitions: {}", .0.join(" -> "))]
    Recursion(Vec<String>),
    /// A `-v` argument (its value is never shown).
    #[error("-v '{name}=...': {message}")]
    BadVar { name: String, message: String },
    #[error("Finding variable '{name}'")]
    BadName {
        name: String,
        #[source]
        source: PointerError,
    },
    #[error("vars file {file}: {message}")]
    VarsFile {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error("environment variable '{name}': {message}")]
    Env { name: String, message: String },
    #[error("variables[{index}]: {message}")]
    Definition { index: usize, message: String },
    #[error("variables: expected an array of definitions but found {0}")]
    DefinitionsNotArray(&'static str),
    #[error("variable '{name}' (type {kind})")]
    Generate {
        name: String,
        kind: String,
        #[source]
        source: GenerateError,
    },
    #[error("variable '{name}': certificate authority '{ca}' not found (define it in variables or provide it)")]
    CaNotFound { name: String, ca: String },
    #[error("cannot regenerate '{0}': it has no variable definition with a type")]
    Regenerate(String),
    #[error("cannot regenerate {0:?} without a vars store")]
    RegenerateWithoutStore(Vec<String>),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn list(names: &[String]) -> String {
    names.iter().map(|n| format!("\n  - {n}")).collect()
}

// ---------------------------------------------------------------- sources

/// Values given on the command line, in files and in the environment,
/// merged with BOSH's precedence.
#[derive(Clone, Debug, Default)]
pub struct StaticVars {
    values: HashMap<String, Value>,
}

impl StaticVars {
    /// Merge the sources: env (prefixes in order), then `-l` files in
    /// order, then `-v`; later ones win.
    pub fn from_sources(
        vars: &[(String, String)],
        var_files: &[(String, String)],
        vars_env: &[String],
        env: &[(String, String)],
    ) -> Result<StaticVars, VarsError> {
        let mut values = HashMap::new();
        for prefix in vars_env {
            if prefix.is_empty() {
                return Err(VarsError::Env {
                    name: String::new(),
                    message: "Expected environment variable prefix to be non-empty".to_string(),
                });
            }
            let full = format!("{prefix}_");
            for (key, text) in env {
                let Some(name) = key.strip_prefix(&full) else {
                    continue;
                };
                let value = super::parse_yaml(text).map_err(|(_, m)| VarsError::Env {
                    name: key.clone(),
                    message: format!("Deserializing YAML: {m}"),
                })?;
                values.insert(name.to_string(), value);
            }
        }
        for (file, text) in var_files {
            let doc = super::parse_yaml(text).map_err(|(line, message)| VarsError::VarsFile {
                file: file.clone(),
                line,
                message: format!("invalid YAML: {message}"),
            })?;
            match doc {
                Value::Null => {}
                Value::Mapping(map) => {
                    for (k, v) in map {
                        let Value::String(name) = k else {
                            return Err(VarsError::VarsFile {
                                file: file.clone(),
                                line: None,
                                message: "variable names must be strings".to_string(),
                            });
                        };
                        values.insert(name, v);
                    }
                }
                other => {
                    return Err(VarsError::VarsFile {
                        file: file.clone(),
                        line: None,
                        message: format!(
                            "expected a map of variable names to values but found {}",
                            kind_of(&other)
                        ),
                    })
                }
            }
        }
        for (name, text) in vars {
            values.insert(name.clone(), parse_var_value(name, text)?);
        }
        Ok(StaticVars { values })
    }

    /// Values from a plain map (for callers and tests).
    pub fn from_map(values: HashMap<String, Value>) -> StaticVars {
        StaticVars { values }
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }
}

/// A `-v name=value` value, read as bosh-cli does: YAML, unless that yields
/// a string, in which case the text itself (wrapping quotes removed). Text
/// that is not valid YAML is taken as a string too.
pub fn parse_var_value(name: &str, text: &str) -> Result<Value, VarsError> {
    if name.is_empty() {
        return Err(VarsError::BadVar {
            name: String::new(),
            message: "expected a non-empty name".to_string(),
        });
    }
    if text.is_empty() {
        return Err(VarsError::BadVar {
            name: name.to_string(),
            message: "expected a non-empty value".to_string(),
        });
    }
    match super::parse_yaml(text) {
        Ok(Value::String(_)) | Err(_) => Ok(Value::String(trim_wrapping_quotes(text).to_string())),
        Ok(v) => Ok(v),
    }
}

fn trim_wrapping_quotes(s: &str) -> &str {
    let b = s.as_bytes();
    if b.len() >= 2
        && ((b[0] == b'"' && b[b.len() - 1] == b'"') || (b[0] == b'\'' && b[b.len() - 1] == b'\''))
    {
        &s[1..s.len() - 1]
    } else {
        s
    }
}

// ---------------------------------------------------------- placeholders

/// One `((...))` in a string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placeholder<'a> {
    /// Byte range of the whole `((...))`.
    pub start: usize,
    pub end: usize,
    /// The name with any `!` removed, e.g. `cert.ca`.
    pub name: &'a str,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/') || c.is_alphabetic()
}

fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0c')
}

/// Find the placeholders of a string, left to right.
pub fn placeholders(s: &str) -> Vec<Placeholder<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(rel) = s[from..].find("((") {
        let start = from + rel;
        match placeholder_at(s, start) {
            Some(p) => {
                from = p.end;
                out.push(p);
            }
            None => from = start + 1,
        }
    }
    out
}

fn placeholder_at(s: &str, start: usize) -> Option<Placeholder<'_>> {
    let mut i = start + 2;
    let rest = |i: usize| s[i..].chars().next();
    while let Some(c) = rest(i).filter(|c| is_space(*c)) {
        i += c.len_utf8();
    }
    if rest(i) == Some('!') {
        i += 1;
    }
    let name_start = i;
    while let Some(c) = rest(i).filter(|c| is_name_char(*c)) {
        i += c.len_utf8();
    }
    let name_end = i;
    if name_end == name_start {
        return None;
    }
    while let Some(c) = rest(i).filter(|c| is_space(*c)) {
        i += c.len_utf8();
    }
    if !s[i..].starts_with("))") {
        return None;
    }
    Some(Placeholder {
        start,
        end: i + 2,
        name: &s[name_start..name_end],
    })
}

/// The base name of a placeholder name (`cert` of `cert.ca`).
pub fn base_name(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

// -------------------------------------------------------------- lookups

/// Something that gives variable values by base name.
pub trait Lookup {
    /// The value of the variable `name` (no `.key` part), or `None`.
    fn get(&mut self, name: &str) -> Result<Option<Value>, VarsError>;
}

impl Lookup for HashMap<String, Value> {
    fn get(&mut self, name: &str) -> Result<Option<Value>, VarsError> {
        Ok(HashMap::get(self, name).cloned())
    }
}

/// Look up a full placeholder name: the base variable, then the `.key`
/// path inside it (as a go-patch path; numeric parts are retried as keys).
pub fn lookup_full(lookup: &mut dyn Lookup, name: &str) -> Result<Option<Value>, VarsError> {
    let mut parts = name.split('.');
    let base = parts.next().unwrap_or(name);
    let Some(value) = lookup.get(base)? else {
        return Ok(None);
    };
    let rest: Vec<&str> = parts.collect();
    if rest.is_empty() {
        return Ok(Some(value));
    }
    let finding = |source| VarsError::Finding {
        name: name.to_string(),
        source,
    };
    let ptr =
        Pointer::parse(&format!("/{}", rest.join("/"))).map_err(|source| VarsError::BadName {
            name: name.to_string(),
            source,
        })?;
    match patch::find(&value, &ptr) {
        Ok(v) => Ok(Some(v.into_owned())),
        Err(_) => {
            let as_keys = Pointer::from_tokens(
                ptr.tokens()
                    .iter()
                    .map(|t| match t {
                        Token::Index { index, .. } => Token::Key {
                            key: index.to_string(),
                            optional: false,
                        },
                        other => other.clone(),
                    })
                    .collect(),
            );
            patch::find(&value, &as_keys)
                .map(|v| Some(v.into_owned()))
                .map_err(finding)
        }
    }
}

// ---------------------------------------------------------- substitution

/// Replace the placeholders of `doc` (values, array items, map keys) with
/// values from `lookup`. Unknown placeholders are left as they are; their
/// base names are returned, sorted.
pub fn substitute(doc: &mut Value, lookup: &mut dyn Lookup) -> Result<BTreeSet<String>, VarsError> {
    let mut missing = BTreeSet::new();
    walk(doc, lookup, &mut missing, &|| String::new())?;
    Ok(missing)
}

fn walk(
    node: &mut Value,
    lookup: &mut dyn Lookup,
    missing: &mut BTreeSet<String>,
    path: &dyn Fn() -> String,
) -> Result<(), VarsError> {
    match node {
        Value::String(s) => {
            if let Some(v) = substitute_str(s, lookup, missing, path)? {
                *node = v;
            }
        }
        Value::Sequence(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                if needs_walk(item) {
                    walk(item, lookup, missing, &|| format!("{}/{i}", path()))?;
                }
            }
        }
        Value::Mapping(map) => {
            let keys_have_placeholders = map
                .keys()
                .any(|k| matches!(k, Value::String(s) if s.contains("((")));
            if keys_have_placeholders {
                walk_map_with_keys(map, lookup, missing, path)?;
            } else {
                for (k, v) in map.iter_mut() {
                    if needs_walk(v) {
                        walk(v, lookup, missing, &|| {
                            format!("{}/{}", path(), key_text(k))
                        })?;
                    }
                }
            }
        }
        Value::Tagged(t) => walk(&mut t.value, lookup, missing, path)?,
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
    Ok(())
}

fn needs_walk(v: &Value) -> bool {
    match v {
        Value::String(s) => s.contains("(("),
        Value::Sequence(_) | Value::Mapping(_) | Value::Tagged(_) => true,
        _ => false,
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) => escape(s),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".to_string(),
        _ => "?".to_string(),
    }
}

fn walk_map_with_keys(
    map: &mut Mapping,
    lookup: &mut dyn Lookup,
    missing: &mut BTreeSet<String>,
    path: &dyn Fn() -> String,
) -> Result<(), VarsError> {
    let old = std::mem::take(map);
    for (k, mut v) in old {
        let kt = key_text(&k);
        walk(&mut v, lookup, missing, &|| format!("{}/{kt}", path()))?;
        let new_key = match &k {
            Value::String(s) => {
                match substitute_str(s, lookup, missing, &|| format!("{}/{kt}", path()))? {
                    None => k,
                    Some(nk @ (Value::String(_) | Value::Number(_) | Value::Bool(_))) => nk,
                    Some(other) => {
                        return Err(VarsError::KeyType {
                            name: s.clone(),
                            kind: kind_of(&other),
                            path: format!("{}/{kt}", path()),
                        })
                    }
                }
            }
            _ => k,
        };
        if map.contains_key(&new_key) {
            return Err(VarsError::DuplicateKey {
                key: key_text(&new_key),
                path: path(),
            });
        }
        map.insert(new_key, v);
    }
    Ok(())
}

/// Interpolate one string; `None` when nothing changed.
fn substitute_str(
    s: &str,
    lookup: &mut dyn Lookup,
    missing: &mut BTreeSet<String>,
    path: &dyn Fn() -> String,
) -> Result<Option<Value>, VarsError> {
    if !s.contains("((") {
        return Ok(None);
    }
    let found = placeholders(s);
    if found.is_empty() {
        return Ok(None);
    }
    if found.len() == 1 && found[0].start == 0 && found[0].end == s.len() {
        let name = found[0].name;
        return match lookup_full(lookup, name)? {
            Some(v) => Ok(Some(v)),
            None => {
                missing.insert(base_name(name).to_string());
                Ok(None)
            }
        };
    }
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut changed = false;
    for p in &found {
        out.push_str(&s[last..p.start]);
        match lookup_full(lookup, p.name)? {
            Some(v) => {
                out.push_str(&embed_text(&v).ok_or_else(|| VarsError::Embed {
                    name: p.name.to_string(),
                    kind: kind_of(&v),
                    path: path(),
                })?);
                changed = true;
            }
            None => {
                missing.insert(base_name(p.name).to_string());
                out.push_str(&s[p.start..p.end]);
            }
        }
        last = p.end;
    }
    out.push_str(&s[last..]);
    Ok(changed.then_some(Value::String(out)))
}

fn embed_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

// ----------------------------------------------------------- definitions

/// One entry of the document's `variables:` section.
#[derive(Clone, Debug, PartialEq)]
pub struct Definition {
    pub name: String,
    /// `password`, `certificate`, `ssh`, `rsa`; `None` for a definition
    /// that is only declared (never generated).
    pub kind: Option<String>,
    /// The options as written (placeholders not yet interpolated).
    pub options: Value,
}

/// Read the `variables:` section of a document (after ops, before
/// interpolation).
pub fn definitions(doc: &Value) -> Result<Vec<Definition>, VarsError> {
    let Some(section) = doc.as_mapping().and_then(|m| m.get("variables")) else {
        return Ok(Vec::new());
    };
    let items = match section {
        Value::Null => return Ok(Vec::new()),
        Value::Sequence(items) => items,
        other => return Err(VarsError::DefinitionsNotArray(kind_of(other))),
    };
    let mut defs = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let bad = |message: String| VarsError::Definition { index, message };
        let Value::Mapping(m) = item else {
            return Err(bad(format!(
                "expected a map with 'name' but found {}",
                kind_of(item)
            )));
        };
        let name = match m.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) if !other.is_null() => {
                return Err(bad(format!(
                    "'name' must be a string but is {}",
                    kind_of(other)
                )))
            }
            _ => return Err(bad("missing 'name'".to_string())),
        };
        let kind = match m.get("type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(bad(format!(
                    "'type' of '{name}' must be a string but is {}",
                    kind_of(other)
                )))
            }
        };
        defs.push(Definition {
            name,
            kind,
            options: m.get("options").cloned().unwrap_or(Value::Null),
        });
    }
    Ok(defs)
}

/// The digest of a definition: its type, its interpolated options (map
/// keys sorted) and, for a signed certificate, the CA's certificate.
pub fn definition_digest(kind: &str, options: &Value, ca_certificate: Option<&str>) -> String {
    let mut text = String::new();
    text.push_str("type=");
    canonical(&Value::String(kind.to_string()), &mut text);
    text.push_str("\noptions=");
    canonical(options, &mut text);
    if let Some(ca) = ca_certificate {
        text.push_str("\nca=");
        canonical(&Value::String(ca.to_string()), &mut text);
    }
    hex::encode(Sha256::digest(text.as_bytes()))
}

fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => {
            out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}")))
        }
        Value::Sequence(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(item, out);
            }
            out.push(']');
        }
        Value::Mapping(m) => {
            let mut entries: Vec<(String, &Value)> = m
                .iter()
                .map(|(k, v)| {
                    let mut ks = String::new();
                    canonical(k, &mut ks);
                    (ks, v)
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (k, v)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(k);
                out.push(':');
                canonical(v, out);
            }
            out.push('}');
        }
        Value::Tagged(t) => {
            out.push_str(&t.tag.to_string());
            out.push(' ');
            canonical(&t.value, out);
        }
    }
}

// -------------------------------------------------------------- resolver

/// Resolves variables from the static sources, then the store (generating
/// typed definitions there). Each variable is resolved once per run.
pub struct Resolver<'s> {
    statics: StaticVars,
    defs: Vec<Definition>,
    def_index: HashMap<String, usize>,
    store: Option<&'s mut dyn VariableStore>,
    regenerate: HashSet<String>,
    cache: HashMap<String, Option<Value>>,
    visiting: Vec<String>,
    missing: BTreeSet<String>,
}

impl<'s> Resolver<'s> {
    /// A resolver over `statics` and `defs`, generating into `store` (no
    /// generation without one). `regenerate` names typed definitions to
    /// generate anew even if stored.
    pub fn new(
        statics: StaticVars,
        defs: Vec<Definition>,
        store: Option<&'s mut dyn VariableStore>,
        regenerate: &[String],
    ) -> Result<Resolver<'s>, VarsError> {
        let mut def_index = HashMap::new();
        for (i, d) in defs.iter().enumerate() {
            def_index.entry(d.name.clone()).or_insert(i);
        }
        for name in regenerate {
            let typed = def_index.get(name).is_some_and(|&i| defs[i].kind.is_some());
            if !typed {
                return Err(VarsError::Regenerate(name.clone()));
            }
        }
        if store.is_none() && !regenerate.is_empty() {
            return Err(VarsError::RegenerateWithoutStore(regenerate.to_vec()));
        }
        Ok(Resolver {
            statics,
            defs,
            def_index,
            store,
            regenerate: regenerate.iter().cloned().collect(),
            cache: HashMap::new(),
            visiting: Vec::new(),
            missing: BTreeSet::new(),
        })
    }

    /// The definitions this resolver knows.
    pub fn definitions(&self) -> &[Definition] {
        &self.defs
    }

    /// Resolve (and generate where needed) every typed definition, in
    /// order, as BOSH does before interpolating.
    pub fn resolve_definitions(&mut self) -> Result<(), VarsError> {
        let names: Vec<String> = self
            .defs
            .iter()
            .filter(|d| d.kind.is_some())
            .map(|d| d.name.clone())
            .collect();
        for name in names {
            Lookup::get(self, &name)?;
        }
        if let Some(store) = self.store.as_deref_mut() {
            store.flush()?;
        }
        Ok(())
    }

    /// Base names that were looked up and not found, sorted.
    pub fn missing(&self) -> &BTreeSet<String> {
        &self.missing
    }

    fn resolve(&mut self, name: &str) -> Result<Option<Value>, VarsError> {
        if let Some(v) = self.statics.get(name) {
            return Ok(Some(v.clone()));
        }
        if self.store.is_none() {
            return Ok(None);
        }
        let def = self
            .def_index
            .get(name)
            .map(|&i| self.defs[i].clone())
            .filter(|d| d.kind.is_some());
        let Some(def) = def else {
            return match self.store.as_deref() {
                Some(store) => Ok(store.get(name)?),
                None => Ok(None),
            };
        };
        if self.visiting.iter().any(|v| v == name) {
            let mut chain = self.visiting.clone();
            chain.push(name.to_string());
            return Err(VarsError::Recursion(chain));
        }
        self.visiting.push(name.to_string());
        let result = self.resolve_generated(&def);
        self.visiting.pop();
        result
    }

    fn resolve_generated(&mut self, def: &Definition) -> Result<Option<Value>, VarsError> {
        let kind_name = def.kind.clone().unwrap_or_default();
        let generr = |source: GenerateError| VarsError::Generate {
            name: def.name.clone(),
            kind: kind_name.clone(),
            source,
        };
        let mut options = def.options.clone();
        let options_missing = substitute(&mut options, self)?;
        if !options_missing.is_empty() {
            // Already recorded as missing by the lookups.
            return Ok(None);
        }
        let password_length = if kind_name == "password" {
            generate::password_length(&options).map_err(generr)?
        } else {
            generate::PASSWORD_LENGTH
        };
        let (cert_options, ca) = if kind_name == "certificate" {
            let o = CertOptions::from_value(&options).map_err(generr)?;
            let ca = match &o.ca {
                Some(ca_name) => match Lookup::get(self, ca_name)? {
                    Some(v) => Some(CaMaterial::from_value(ca_name, &v).map_err(generr)?),
                    // A defined CA that is only missing (its own options
                    // lack a variable, or there is no store) makes this
                    // certificate missing too; an undefined one is an error.
                    None if self.def_index.contains_key(ca_name.as_str()) => return Ok(None),
                    None => {
                        return Err(VarsError::CaNotFound {
                            name: def.name.clone(),
                            ca: ca_name.clone(),
                        })
                    }
                },
                None => None,
            };
            (Some(o), ca)
        } else {
            (None, None)
        };
        let digest = definition_digest(
            &kind_name,
            &options,
            ca.as_ref().map(|c| c.certificate.as_str()),
        );
        let regenerate = self.regenerate.contains(&def.name);
        let Some(store) = self.store.as_deref_mut() else {
            return Ok(None);
        };
        if !regenerate {
            if let Some(existing) = store.get(&def.name)? {
                match store.definition_digest(&def.name)? {
                    Some(d) if d == digest => return Ok(Some(existing)),
                    None => {
                        // Written by BOSH or by hand: keep it, adopt the digest.
                        store.adopt_digest(&def.name, &digest)?;
                        return Ok(Some(existing));
                    }
                    Some(_) => {} // the definition changed: generate anew
                }
            }
        }
        let value = match VarType::parse(&kind_name).map_err(generr)? {
            VarType::Password => generate::password(password_length),
            VarType::Certificate => {
                let o = cert_options.unwrap_or_default();
                generate::certificate(&o, ca.as_ref()).map_err(generr)?
            }
            VarType::Ssh => generate::ssh().map_err(generr)?,
            VarType::Rsa => generate::rsa_key().map_err(generr)?,
        };
        store.put(&def.name, value.clone(), &digest)?;
        Ok(Some(value))
    }
}

impl Lookup for Resolver<'_> {
    fn get(&mut self, name: &str) -> Result<Option<Value>, VarsError> {
        if let Some(v) = self.cache.get(name) {
            return Ok(v.clone());
        }
        let v = self.resolve(name)?;
        if v.is_none() {
            self.missing.insert(name.to_string());
        }
        self.cache.insert(name.to_string(), v.clone());
        Ok(v)
    }
}

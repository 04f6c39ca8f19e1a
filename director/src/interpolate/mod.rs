//! `bosun interpolate`: BOSH's `bosh interpolate` as a library. A YAML
//! document goes through, in order (as bosh-cli's `template.Evaluate`):
//!
//! 1. ops files ([`ops`], go-patch semantics: [`pointer`], [`patch`]);
//! 2. variables ([`vars`]): the typed `variables:` definitions are resolved
//!    first (generated into a [`VariableStore`] when no other source has
//!    them: [`generate`], [`store`]), then every `((placeholder))` of the
//!    document is replaced; definitions whose value was found are removed
//!    from the output's `variables:` section, as bosh-cli does;
//! 3. unresolved placeholders are an error listing all of them when
//!    `var_errs` is set, and are left in place otherwise;
//! 4. `path` picks one value out of the result.
//!
//! Map key order is preserved in the output.
//!
//! This module is pure apart from reading the environment (`--vars-env`)
//! and writing the vars store. It must not touch the director's state, CPIs
//! or the network, and it must never log a variable's value.

pub mod generate;
pub mod ops;
pub mod patch;
pub mod pointer;
pub mod store;
pub mod vars;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde_yaml_ng::Value;

pub use ops::{apply_ops, parse_ops, Op, OpKind, OpsError, OpsFile};
pub use patch::PatchError;
pub use pointer::{Pointer, PointerError};
pub use store::{FileStore, MemoryStore, StoreError, VariableStore};
pub use vars::{substitute, Definition, Lookup, Resolver, StaticVars, VarsError};

/// What to do besides reading the document (the flags of `bosh int`).
/// Its `Debug` shows names only, never variable values or file contents.
#[derive(Clone, Default)]
pub struct InterpolateOptions {
    /// `-o`: (name for messages, text), applied in order.
    pub ops_files: Vec<(String, String)>,
    /// `-v name=value` (the value is read as bosh-cli does: YAML, unless
    /// that gives a string, then the text itself).
    pub vars: Vec<(String, String)>,
    /// `-l`: (name, text) of YAML files of variables; later files win.
    pub var_files: Vec<(String, String)>,
    /// `--vars-env PREFIX`: environment variables `PREFIX_name` (YAML).
    pub vars_env: Vec<String>,
    /// `--vars-store FILE`: where typed definitions are generated and kept.
    pub vars_store: Option<PathBuf>,
    /// `--var-errs`: unresolved variables are an error (otherwise they are
    /// left in place).
    pub var_errs: bool,
    /// `--path`: output only the value at this go-patch path.
    pub path: Option<String>,
    /// Typed variables to generate anew even if the store has them.
    pub regenerate: Vec<String>,
}

impl std::fmt::Debug for InterpolateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names = |pairs: &[(String, String)]| -> Vec<String> {
            pairs.iter().map(|(name, _)| name.clone()).collect()
        };
        f.debug_struct("InterpolateOptions")
            .field("ops_files", &names(&self.ops_files))
            .field("vars", &names(&self.vars))
            .field("var_files", &names(&self.var_files))
            .field("vars_env", &self.vars_env)
            .field("vars_store", &self.vars_store)
            .field("var_errs", &self.var_errs)
            .field("path", &self.path)
            .field("regenerate", &self.regenerate)
            .finish()
    }
}

/// Why a document could not be interpolated.
#[derive(Debug, thiserror::Error)]
pub enum InterpolateError {
    #[error("{file}: invalid YAML: {message}")]
    Yaml {
        file: String,
        line: Option<usize>,
        message: String,
    },
    #[error(transparent)]
    Ops(#[from] OpsError),
    #[error(transparent)]
    Vars(#[from] VarsError),
    /// `((variables))` of `file` that nothing provides.
    #[error("{file}: {missing}")]
    Missing {
        file: String,
        missing: Box<VarsError>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("--path '{path}'")]
    PathSyntax {
        path: String,
        #[source]
        source: PointerError,
    },
    #[error("--path")]
    Path(#[source] PatchError),
    #[error("writing YAML: {0}")]
    Output(String),
}

/// Interpolate `text` (the manifest named `file` in messages). Returns the
/// YAML output text; with `path`, a string result is returned raw (plus a
/// newline), as `bosh int --path` prints it.
pub fn interpolate(
    file: &str,
    text: &str,
    opts: &InterpolateOptions,
) -> Result<String, InterpolateError> {
    let value = interpolate_value(file, text, opts)?;
    to_output(&value, opts.path.is_some())
}

/// The same, returning the value (for deploy, which goes on to parse it).
pub fn interpolate_value(
    file: &str,
    text: &str,
    opts: &InterpolateOptions,
) -> Result<Value, InterpolateError> {
    let env: Vec<(String, String)> = if opts.vars_env.is_empty() {
        Vec::new()
    } else {
        // Entries that are not UTF-8 cannot name or hold a variable.
        std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect()
    };
    match &opts.vars_store {
        Some(path) => {
            let mut store = FileStore::open(path)?;
            interpolate_value_with(file, text, opts, Some(&mut store), &env)
        }
        None => interpolate_value_with(file, text, opts, None, &env),
    }
}

/// The same with an explicit store (which takes the place of
/// `opts.vars_store`, e.g. the director's own encrypted state) and an
/// explicit environment for `vars_env`.
pub fn interpolate_value_with(
    file: &str,
    text: &str,
    opts: &InterpolateOptions,
    store: Option<&mut dyn VariableStore>,
    env: &[(String, String)],
) -> Result<Value, InterpolateError> {
    // Read every input before changing anything.
    let ops_files = opts
        .ops_files
        .iter()
        .map(|(name, text)| parse_ops(name, text))
        .collect::<Result<Vec<_>, _>>()?;
    let statics = StaticVars::from_sources(&opts.vars, &opts.var_files, &opts.vars_env, env)?;
    let path = match &opts.path {
        Some(p) => Some(
            Pointer::parse(p).map_err(|source| InterpolateError::PathSyntax {
                path: p.clone(),
                source,
            })?,
        ),
        None => None,
    };
    let mut doc = parse_yaml(text).map_err(|(line, message)| InterpolateError::Yaml {
        file: file.to_string(),
        line,
        message,
    })?;

    apply_ops(&mut doc, &ops_files)?;

    let defs = vars::definitions(&doc)?;
    let mut resolver = Resolver::new(statics, defs, store, &opts.regenerate)?;
    resolver.resolve_definitions()?;
    substitute(&mut doc, &mut resolver)?;
    remove_found_definitions(&mut doc, &mut resolver)?;
    if opts.var_errs && !resolver.missing().is_empty() {
        return Err(InterpolateError::Missing {
            file: file.to_string(),
            missing: Box::new(VarsError::Missing(
                resolver.missing().iter().cloned().collect(),
            )),
        });
    }

    match path {
        Some(ptr) => patch::find(&doc, &ptr)
            .map(|v| v.into_owned())
            .map_err(InterpolateError::Path),
        None => Ok(doc),
    }
}

/// bosh-cli drops the definitions whose value was found from the output's
/// `variables:` section (all definitions are looked up, so with
/// `var_errs` an unprovided untyped definition is reported too).
fn remove_found_definitions(doc: &mut Value, resolver: &mut Resolver<'_>) -> Result<(), VarsError> {
    let names: Vec<String> = resolver
        .definitions()
        .iter()
        .map(|d| d.name.clone())
        .collect();
    let mut found = std::collections::HashSet::new();
    for name in names {
        if Lookup::get(resolver, &name)?.is_some() {
            found.insert(name);
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    if let Some(Value::Sequence(items)) = doc.as_mapping_mut().and_then(|m| m.get_mut("variables"))
    {
        items.retain(|item| {
            !matches!(item.get("name").and_then(Value::as_str), Some(n) if found.contains(n))
        });
    }
    Ok(())
}

/// Render an interpolation result: YAML, or with `raw_strings` a string
/// value as itself plus a newline (as `bosh int --path` prints it).
pub fn to_output(value: &Value, raw_strings: bool) -> Result<String, InterpolateError> {
    if raw_strings {
        if let Value::String(s) = value {
            return Ok(format!("{s}\n"));
        }
    }
    serde_yaml_ng::to_string(value).map_err(|e| InterpolateError::Output(e.to_string()))
}

/// Parse one YAML document into a value with merge keys (`<<`) applied.
/// An empty document is `null`. Errors carry the 1-based line when known.
/// NUL bytes and aliases are held to the limits of the manifest reader
/// ([`crate::model::yaml::check_limits`]) before anything is expanded.
pub(crate) fn parse_yaml(text: &str) -> Result<Value, (Option<usize>, String)> {
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    crate::model::yaml::check_limits(text)
        .map_err(|(line, message)| (Some(line), format!("{message} at line {line}")))?;
    let mut v: Value = serde_yaml_ng::from_str(text)
        .map_err(|e| (e.location().map(|l| l.line()), e.to_string()))?;
    v.apply_merge()
        .map_err(|e| (e.location().map(|l| l.line()), e.to_string()))?;
    Ok(v)
}

//! Where generated variable values are kept between runs: the
//! [`VariableStore`] trait, a YAML file store (`--vars-store`) and an
//! in-memory store.
//!
//! This module owns storage only; it must not decide what to generate (see
//! `vars` and `generate`), must never log a value, and must not touch the
//! director's state, CPIs or the network. The director can keep generated
//! values in its own encrypted state by implementing [`VariableStore`].
//!
//! ## The file format
//! A YAML map of variable name to value, exactly like BOSH's
//! `--vars-store` (so either tool can read the other's file), plus one
//! bookkeeping key, [`DIGESTS_KEY`], mapping each generated variable's name
//! to the digest of the definition it was generated from. The key contains
//! a `.`, which a variable name cannot (`((a.b))` means key `b` of `a`), so
//! it never shadows a variable. Entries without a digest (a store written
//! by BOSH, or by hand) are kept as they are and adopt the current digest.
//! The file is written atomically (temporary file in the same directory,
//! fsync, rename) with mode 0600.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

/// The bookkeeping key of a store file (see the module docs).
pub const DIGESTS_KEY: &str = "bosun.definition-digests";

/// A store that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("vars store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("vars store {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// A failure of another implementation (the director's state, ...).
    #[error("variable store: {0}")]
    Backend(String),
}

/// Keeps generated values and the digest of the definition each was
/// generated from, so a changed definition can be regenerated.
pub trait VariableStore {
    /// The stored value of `name`, if any.
    fn get(&self, name: &str) -> Result<Option<Value>, StoreError>;
    /// Store `value` for `name`, generated from a definition with this
    /// digest. Implementations should make the value durable before
    /// returning.
    fn put(&mut self, name: &str, value: Value, definition_digest: &str) -> Result<(), StoreError>;
    /// The digest recorded with `name`'s value, if any.
    fn definition_digest(&self, name: &str) -> Result<Option<String>, StoreError>;
}

/// A `--vars-store` YAML file (see the module docs for the format).
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    values: Mapping,
    digests: Mapping,
}

impl FileStore {
    /// Read the store at `path`; a missing file is an empty store (created
    /// on the first `put`).
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(StoreError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let invalid = |message: String| StoreError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let doc =
            super::parse_yaml(&text).map_err(|(_, m)| invalid(format!("invalid YAML: {m}")))?;
        let mut values = Mapping::new();
        let mut digests = Mapping::new();
        match doc {
            Value::Null => {}
            Value::Mapping(map) => {
                for (k, v) in map {
                    let Some(name) = k.as_str() else {
                        return Err(invalid("variable names must be strings".to_string()));
                    };
                    if name == DIGESTS_KEY {
                        match v {
                            Value::Mapping(d) => digests = d,
                            Value::Null => {}
                            _ => return Err(invalid(format!("'{DIGESTS_KEY}' must be a map"))),
                        }
                    } else {
                        values.insert(k, v);
                    }
                }
            }
            _ => {
                return Err(invalid(
                    "expected a map of variable names to values".to_string(),
                ))
            }
        }
        Ok(FileStore {
            path: path.to_path_buf(),
            values,
            digests,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write the whole store atomically with mode 0600.
    fn save(&self) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            path: self.path.clone(),
            source,
        };
        let mut doc = self.values.clone();
        if !self.digests.is_empty() {
            doc.insert(
                Value::String(DIGESTS_KEY.to_string()),
                Value::Mapping(self.digests.clone()),
            );
        }
        let text = serde_yaml_ng::to_string(&Value::Mapping(doc))
            .map_err(|e| StoreError::Backend(format!("encoding the vars store: {e}")))?;
        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let mut tmp = tempfile::Builder::new()
            .prefix(".vars-store")
            .tempfile_in(&dir)
            .map_err(io)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        tmp.write_all(text.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            // Make the rename durable; failing here loses nothing written.
            let _ = d.sync_all();
        }
        Ok(())
    }
}

impl VariableStore for FileStore {
    fn get(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.values.get(name).cloned())
    }

    fn put(&mut self, name: &str, value: Value, definition_digest: &str) -> Result<(), StoreError> {
        self.values.insert(Value::String(name.to_string()), value);
        self.digests.insert(
            Value::String(name.to_string()),
            Value::String(definition_digest.to_string()),
        );
        self.save()
    }

    fn definition_digest(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .digests
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string))
    }
}

/// A store in memory (for tests, or a caller that persists it itself).
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    entries: HashMap<String, (Value, String)>,
}

impl MemoryStore {
    pub fn new() -> MemoryStore {
        MemoryStore::default()
    }

    /// Number of stored values.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl VariableStore for MemoryStore {
    fn get(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.entries.get(name).map(|(v, _)| v.clone()))
    }

    fn put(&mut self, name: &str, value: Value, definition_digest: &str) -> Result<(), StoreError> {
        self.entries
            .insert(name.to_string(), (value, definition_digest.to_string()));
        Ok(())
    }

    fn definition_digest(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self.entries.get(name).map(|(_, d)| d.clone()))
    }
}

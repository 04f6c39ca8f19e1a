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
//! The store file is a YAML map of variable name to value and nothing
//! else, exactly like bosh-cli's `--vars-store`, so either tool can read
//! and write the other's file. It is written only when a value is
//! generated: reading a store that has every value leaves the file as it
//! was, byte for byte. A write is atomic (temporary file in the same
//! directory, fsync, rename) with mode 0600.
//!
//! bosun also remembers, for each value, the digest of the definition it
//! was generated from, so that a changed definition is generated anew.
//! Those digests live in a side file next to the store,
//! `<store>`[`DIGESTS_SUFFIX`] (a YAML map of name to digest, mode 0600),
//! never in the store itself. A value without a recorded digest (made by
//! bosh-cli, written by hand, or the side file is gone) is kept as it is
//! and adopts the current definition's digest, which is written to the
//! side file only. Losing the side file therefore loses no value: every
//! entry is adopted again. A store written by earlier bosun versions
//! carries the digests under [`DIGESTS_KEY`]; they are read, and the key
//! is dropped the next time the store is written (the digests then move
//! to the side file).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

/// The key under which earlier versions kept the digests inside the
/// store file (read for compatibility, never written).
pub const DIGESTS_KEY: &str = "bosun.definition-digests";

/// Appended to the store's file name to name the digests side file.
pub const DIGESTS_SUFFIX: &str = ".bosun-digests";

const DIGESTS_HEADER: &str =
    "# bosun: digest of the variable definition each value of the vars store\n\
# next to this file was generated from. No secrets. Deleting this file is\n\
# safe: every stored value is then kept and adopts its current definition.\n";

/// A store that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("vars store {path}")]
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
    /// Record `definition_digest` for the stored value of `name`, which had
    /// none, without changing the value. It need not be durable before
    /// [`VariableStore::flush`]: a lost record only means the value is
    /// adopted again. By default the value is put again with the digest.
    fn adopt_digest(&mut self, name: &str, definition_digest: &str) -> Result<(), StoreError> {
        match self.get(name)? {
            Some(value) => self.put(name, value, definition_digest),
            None => Ok(()),
        }
    }
    /// Make what [`VariableStore::adopt_digest`] recorded durable.
    fn flush(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// A `--vars-store` YAML file and its digests side file (see the module
/// docs for the format).
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    digests_path: PathBuf,
    values: Mapping,
    digests: Mapping,
    /// Digests adopted since the side file was last written.
    unsaved_digests: bool,
}

impl FileStore {
    /// Read the store at `path` and its digests side file; a missing file
    /// is an empty store (created on the first `put`), a missing side file
    /// records no digest.
    pub fn open(path: &Path) -> Result<FileStore, StoreError> {
        let digests_path = digests_path(path);
        let mut values = Mapping::new();
        let mut digests = Mapping::new();
        if let Some(text) = read_if_exists(path)? {
            let invalid = |message: String| StoreError::Invalid {
                path: path.to_path_buf(),
                message,
            };
            let doc =
                super::parse_yaml(&text).map_err(|(_, m)| invalid(format!("invalid YAML: {m}")))?;
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
        }
        if let Some(text) = read_if_exists(&digests_path)? {
            let invalid = |message: String| StoreError::Invalid {
                path: digests_path.clone(),
                message,
            };
            match super::parse_yaml(&text)
                .map_err(|(_, m)| invalid(format!("invalid YAML: {m}")))?
            {
                Value::Null => {}
                Value::Mapping(map) => {
                    for (k, v) in map {
                        let Value::String(name) = &k else {
                            return Err(invalid("variable names must be strings".to_string()));
                        };
                        if !matches!(v, Value::String(_)) {
                            return Err(invalid(format!(
                                "'{}': expected a digest (a string) but found {}",
                                super::pointer::escape(name),
                                super::patch::kind_of(&v)
                            )));
                        }
                        // The side file is newer than a legacy key.
                        digests.insert(k, v);
                    }
                }
                _ => {
                    return Err(invalid(
                        "expected a map of variable names to digests".to_string(),
                    ))
                }
            }
        }
        Ok(FileStore {
            path: path.to_path_buf(),
            digests_path,
            values,
            digests,
            unsaved_digests: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The digests side file of this store.
    pub fn digests_path(&self) -> &Path {
        &self.digests_path
    }

    /// Write the store file: the values only.
    fn save_values(&self) -> Result<(), StoreError> {
        let text = serde_yaml_ng::to_string(&Value::Mapping(self.values.clone()))
            .map_err(|e| StoreError::Backend(format!("encoding the vars store: {e}")))?;
        write_atomically(&self.path, &text)
    }

    /// Write the digests side file, keeping only the digests of stored
    /// values.
    fn save_digests(&mut self) -> Result<(), StoreError> {
        let values = &self.values;
        self.digests
            .retain(|name, _| name.as_str().is_some_and(|n| values.contains_key(n)));
        let text = serde_yaml_ng::to_string(&Value::Mapping(self.digests.clone()))
            .map_err(|e| StoreError::Backend(format!("encoding the digests file: {e}")))?;
        write_atomically(&self.digests_path, &format!("{DIGESTS_HEADER}{text}"))?;
        self.unsaved_digests = false;
        Ok(())
    }
}

/// `<store>.bosun-digests`, next to the store.
fn digests_path(store: &Path) -> PathBuf {
    let mut name = store.as_os_str().to_os_string();
    name.push(DIGESTS_SUFFIX);
    PathBuf::from(name)
}

fn read_if_exists(path: &Path) -> Result<Option<String>, StoreError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Replace `path` with `text` atomically, mode 0600.
fn write_atomically(path: &Path, text: &str) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
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
    tmp.persist(path).map_err(|e| io(e.error))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        // Make the rename durable; failing here loses nothing written.
        let _ = d.sync_all();
    }
    Ok(())
}

impl VariableStore for FileStore {
    fn get(&self, name: &str) -> Result<Option<Value>, StoreError> {
        Ok(self.values.get(name).cloned())
    }

    /// The value is written first, its digest after: a crash in between
    /// leaves an old or no digest, so the value is generated again or
    /// adopted, never wrongly taken as current.
    fn put(&mut self, name: &str, value: Value, definition_digest: &str) -> Result<(), StoreError> {
        self.values.insert(Value::String(name.to_string()), value);
        self.save_values()?;
        self.digests.insert(
            Value::String(name.to_string()),
            Value::String(definition_digest.to_string()),
        );
        self.save_digests()
    }

    fn definition_digest(&self, name: &str) -> Result<Option<String>, StoreError> {
        if !self.values.contains_key(name) {
            return Ok(None);
        }
        Ok(self
            .digests
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_string))
    }

    fn adopt_digest(&mut self, name: &str, definition_digest: &str) -> Result<(), StoreError> {
        self.digests.insert(
            Value::String(name.to_string()),
            Value::String(definition_digest.to_string()),
        );
        self.unsaved_digests = true;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StoreError> {
        if self.unsaved_digests {
            self.save_digests()?;
        }
        Ok(())
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

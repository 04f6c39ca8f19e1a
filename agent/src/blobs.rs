//! The agent's content-addressed blob store: one file per blob under a root
//! directory, named by the sha256 (64 lowercase hex chars) of its content.
//!
//! Writes are atomic (temp file in the same directory, fsync, rename), so a
//! crash never leaves a partial blob under its final name, and every blob put
//! through [`BlobStore::put_verified`] or [`BlobWriter::finish`] is checked
//! against its expected sha256 first. This module must not interpret blob
//! contents, and must never accept a name that is not a sha256 hex digest
//! (no path traversal).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid blob name {0:?}: expected 64 lowercase hex characters (a sha256)")]
    BadName(String),
    #[error("blob {expected} does not match its content (content has sha256 {actual})")]
    Mismatch { expected: String, actual: String },
    #[error("blob {0} not found in the blob store")]
    NotFound(String),
    #[error("blob store {op} {path}")]
    Io {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BlobError {
    let path = path.display().to_string();
    move |source| BlobError::Io { op, path, source }
}

/// Lowercase hex sha256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Whether `name` is a valid blob name (64 lowercase hex chars).
pub fn is_valid_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn check_name(name: &str) -> Result<(), BlobError> {
    if is_valid_name(name) {
        Ok(())
    } else {
        Err(BlobError::BadName(name.to_string()))
    }
}

/// A directory of sha256-named blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Open (creating the directory if needed) a blob store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, BlobError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err("creating", &root))?;
        Ok(BlobStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether the blob is present (false for invalid names).
    pub fn has(&self, sha256: &str) -> bool {
        is_valid_name(sha256) && self.root.join(sha256).is_file()
    }

    /// Where the blob lives (it may not exist). For an invalid name this is a
    /// path under the root that can never hold a blob.
    pub fn path(&self, sha256: &str) -> PathBuf {
        if is_valid_name(sha256) {
            self.root.join(sha256)
        } else {
            self.root.join(".invalid-blob-name")
        }
    }

    /// Store `data`, returning its sha256.
    pub fn put_bytes(&self, data: &[u8]) -> Result<String, BlobError> {
        let mut w = self.writer()?;
        w.write(data)?;
        let sha = w.sha256_so_far();
        w.finish(&sha)?;
        Ok(sha)
    }

    /// Copy the file at `src` into the store, returning its sha256.
    pub fn put_file(&self, src: &Path) -> Result<String, BlobError> {
        let mut input = File::open(src).map_err(io_err("opening", src))?;
        let mut w = self.writer()?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = input.read(&mut buf).map_err(io_err("reading", src))?;
            if n == 0 {
                break;
            }
            w.write(&buf[..n])?;
        }
        let sha = w.sha256_so_far();
        w.finish(&sha)?;
        Ok(sha)
    }

    /// Store `data` under `expected_sha256`, refusing it (and keeping
    /// nothing) if its sha256 differs.
    pub fn put_verified(&self, expected_sha256: &str, data: &[u8]) -> Result<(), BlobError> {
        check_name(expected_sha256)?;
        let actual = sha256_hex(data);
        if actual != expected_sha256 {
            return Err(BlobError::Mismatch {
                expected: expected_sha256.to_string(),
                actual,
            });
        }
        let mut w = self.writer()?;
        w.write(data)?;
        w.finish(expected_sha256)
    }

    /// Start a streaming write; [`BlobWriter::finish`] verifies and commits.
    pub fn writer(&self) -> Result<BlobWriter, BlobError> {
        let tmp = self
            .root
            .join(format!(".tmp-{:016x}", rand::thread_rng().next_u64()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("creating", &tmp))?;
        Ok(BlobWriter {
            root: self.root.clone(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// The blob's content.
    pub fn read(&self, sha256: &str) -> Result<Vec<u8>, BlobError> {
        check_name(sha256)?;
        let path = self.root.join(sha256);
        std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BlobError::NotFound(sha256.to_string())
            } else {
                io_err("reading", &path)(e)
            }
        })
    }

    /// The subset of `sha256s` not in the store (invalid names count as missing).
    pub fn missing(&self, sha256s: &[String]) -> Vec<String> {
        sha256s.iter().filter(|s| !self.has(s)).cloned().collect()
    }

    /// Remove a blob; absent is fine.
    pub fn delete(&self, sha256: &str) -> Result<(), BlobError> {
        check_name(sha256)?;
        let path = self.root.join(sha256);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("deleting", &path)(e)),
        }
    }
}

/// A blob being written to a temp file in the store; dropped without
/// [`finish`](BlobWriter::finish), the temp file is removed.
#[derive(Debug)]
pub struct BlobWriter {
    root: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    len: u64,
}

impl BlobWriter {
    pub fn write(&mut self, data: &[u8]) -> Result<(), BlobError> {
        let Some(file) = self.file.as_mut() else {
            return Err(BlobError::Io {
                op: "writing",
                path: self.tmp.display().to_string(),
                source: std::io::Error::other("writer already finished"),
            });
        };
        file.write_all(data).map_err(io_err("writing", &self.tmp))?;
        self.hasher.update(data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// sha256 of what was written so far.
    pub fn sha256_so_far(&self) -> String {
        hex::encode(self.hasher.clone().finalize())
    }

    /// Verify the content against `expected_sha256` and move it to its final
    /// name; on mismatch nothing is kept.
    pub fn finish(mut self, expected_sha256: &str) -> Result<(), BlobError> {
        check_name(expected_sha256)?;
        let actual = self.sha256_so_far();
        if actual != expected_sha256 {
            return Err(BlobError::Mismatch {
                expected: expected_sha256.to_string(),
                actual,
            });
        }
        if let Some(file) = self.file.take() {
            file.sync_all().map_err(io_err("syncing", &self.tmp))?;
        }
        let dest = self.root.join(expected_sha256);
        std::fs::rename(&self.tmp, &dest).map_err(io_err("renaming into", &dest))?;
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // After a successful rename the temp path no longer exists.
        match std::fs::remove_file(&self.tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(file = %self.tmp.display(), error = %e, "removing an unfinished blob failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(store: &BlobStore) -> Vec<String> {
        std::fs::read_dir(store.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect()
    }

    #[test]
    fn put_has_read_missing_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path().join("blobs")).unwrap();
        let sha = store.put_bytes(b"hello").unwrap();
        assert_eq!(sha, sha256_hex(b"hello"));
        assert!(store.has(&sha));
        assert_eq!(store.read(&sha).unwrap(), b"hello");
        assert_eq!(store.path(&sha), store.root().join(&sha));

        let absent = sha256_hex(b"absent");
        assert!(!store.has(&absent));
        assert_eq!(
            store.missing(&[sha.clone(), absent.clone()]),
            vec![absent.clone()]
        );
        assert!(matches!(store.read(&absent), Err(BlobError::NotFound(_))));

        let src = dir.path().join("src");
        std::fs::write(&src, b"file content").unwrap();
        let fsha = store.put_file(&src).unwrap();
        assert_eq!(fsha, sha256_hex(b"file content"));
        assert_eq!(store.read(&fsha).unwrap(), b"file content");

        store.delete(&sha).unwrap();
        assert!(!store.has(&sha));
        store.delete(&sha).unwrap();
        assert!(leftovers(&store).is_empty());
    }

    #[test]
    fn put_verified_rejects_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let good = sha256_hex(b"data");
        store.put_verified(&good, b"data").unwrap();
        assert!(store.has(&good));

        let wrong = sha256_hex(b"other");
        let err = store.put_verified(&wrong, b"data").unwrap_err();
        assert!(matches!(err, BlobError::Mismatch { .. }), "{err}");
        assert!(!store.has(&wrong));

        let mut w = store.writer().unwrap();
        w.write(b"streamed").unwrap();
        assert!(matches!(w.finish(&wrong), Err(BlobError::Mismatch { .. })));
        assert!(!store.has(&wrong));
        assert!(leftovers(&store).is_empty());
    }

    #[test]
    fn bad_names_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        for bad in [
            "../etc/passwd",
            "",
            "abc",
            &"A".repeat(64),
            &format!("../{}", "a".repeat(61)),
            &"g".repeat(64),
        ] {
            assert!(!store.has(bad));
            assert!(matches!(
                store.put_verified(bad, b"x"),
                Err(BlobError::BadName(_))
            ));
            assert!(matches!(store.read(bad), Err(BlobError::BadName(_))));
            assert!(matches!(store.delete(bad), Err(BlobError::BadName(_))));
            assert!(store.path(bad).starts_with(store.root()));
        }
        assert_eq!(store.missing(&["../x".to_string()]), vec!["../x"]);
    }
}

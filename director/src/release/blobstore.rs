//! A release directory's own blobstore, as `config/final.yml` names it
//! (`blobstore.provider` and `blobstore.options`): where final builds and
//! uploaded blobs are kept. Only the `local` provider (a directory,
//! `options.blobstore_path`, relative to the release directory when
//! relative) is supported; any other provider is an error naming it.
//!
//! This module owns putting files into that directory under new ids and
//! reading them back by id, plus the small file helpers the release-writing
//! modules share (atomic writes, streamed sha256). It must not know what
//! the files are (jobs, packages, blobs): callers record ids and digests.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::spec::check_name;

/// What went wrong with a release's blobstore.
#[derive(Debug, thiserror::Error)]
pub enum BlobstoreError {
    #[error("reading {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid YAML")]
    ConfigSyntax {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{path} names no blobstore (blobstore.provider: local with options.blobstore_path)")]
    NoBlobstore { path: PathBuf },
    #[error("the release blobstore provider '{provider}' (config/final.yml) is not supported: only 'local' is")]
    UnsupportedProvider { provider: String },
    #[error("config/final.yml: the local blobstore has no options.blobstore_path")]
    NoBlobstorePath,
    #[error("blobstore id '{id}' is not a plain file name")]
    BadId { id: String },
    #[error("blob '{id}' is not in the local blobstore {store}")]
    Missing { id: String, store: PathBuf },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The local blobstore of a release directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalBlobstore {
    root: PathBuf,
}

impl LocalBlobstore {
    /// The blobstore `DIR/config/final.yml` names. No file, no `blobstore`
    /// key, a provider other than `local` or no `blobstore_path`: an error.
    pub fn of_release(dir: &Path) -> Result<Self, BlobstoreError> {
        let path = dir.join("config/final.yml");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(BlobstoreError::NoBlobstore { path })
            }
            Err(source) => return Err(BlobstoreError::ReadConfig { path, source }),
        };
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).map_err(|source| BlobstoreError::ConfigSyntax {
                path: path.clone(),
                source,
            })?;
        let Some(store) = doc.get("blobstore") else {
            return Err(BlobstoreError::NoBlobstore { path });
        };
        let provider = store
            .get("provider")
            .and_then(|p| p.as_str())
            .unwrap_or_default();
        if provider != "local" {
            return Err(BlobstoreError::UnsupportedProvider {
                provider: provider.to_string(),
            });
        }
        let at = store
            .get("options")
            .and_then(|o| o.get("blobstore_path"))
            .and_then(|p| p.as_str())
            .filter(|p| !p.trim().is_empty())
            .ok_or(BlobstoreError::NoBlobstorePath)?;
        Ok(LocalBlobstore { root: dir.join(at) })
    }

    /// A blobstore at `root` (for tests and callers that know it).
    pub fn at(root: impl Into<PathBuf>) -> Self {
        LocalBlobstore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where blob `id` is (or would be). An id that is not a plain file
    /// name is refused.
    pub fn path_of(&self, id: &str) -> Result<PathBuf, BlobstoreError> {
        check_name("blobstore id", id).map_err(|_| BlobstoreError::BadId { id: id.to_string() })?;
        Ok(self.root.join(id))
    }

    /// Copy everything `content` gives into the store under a new id; the
    /// id and the sha256 (hex) of what was written.
    pub fn put(&self, content: &mut dyn Read) -> Result<(String, String), BlobstoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let dest = self.path_of(&id)?;
        let sha256 = write_streamed(&dest, content)?;
        Ok((id, sha256))
    }

    /// Open blob `id` for reading.
    pub fn open(&self, id: &str) -> Result<File, BlobstoreError> {
        let path = self.path_of(id)?;
        File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobstoreError::Missing {
                    id: id.to_string(),
                    store: self.root.clone(),
                }
            } else {
                BlobstoreError::Read { path, source }
            }
        })
    }
}

/// Write `content` to `dest` through a temporary file beside it, renamed
/// into place (parents created); the sha256 (hex) of what was written.
pub(crate) fn write_streamed(
    dest: &Path,
    content: &mut dyn Read,
) -> Result<String, BlobstoreError> {
    let failed = |source: io::Error| BlobstoreError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(failed)?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(failed)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match content.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(e)),
        };
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(failed)?;
    }
    tmp.as_file().sync_all().map_err(failed)?;
    tmp.persist(dest).map_err(|e| failed(e.error))?;
    Ok(hex::encode(hasher.finalize()))
}

/// Write `text` to `dest` atomically (see [`write_streamed`]).
pub(crate) fn write_text(dest: &Path, text: &str) -> Result<(), BlobstoreError> {
    write_streamed(dest, &mut text.as_bytes()).map(|_| ())
}

/// The sha256 (hex) of the file at `path`, streamed.
pub(crate) fn sha256_file(path: &Path) -> Result<String, BlobstoreError> {
    let failed = |source: io::Error| BlobstoreError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(failed)?;
    let mut hasher = Sha256::new();
    io::copy(&mut f, &mut hasher).map_err(failed)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release_with_final_yml(text: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        fs::write(dir.path().join("config/final.yml"), text).expect("write");
        dir
    }

    #[test]
    fn a_relative_blobstore_path_is_relative_to_the_release() {
        let dir = release_with_final_yml(
            "name: r\nblobstore:\n  provider: local\n  options:\n    blobstore_path: /tmp/../x/store\n",
        );
        let abs = LocalBlobstore::of_release(dir.path()).expect("local");
        assert_eq!(abs.root(), Path::new("/tmp/../x/store"));
        let dir = release_with_final_yml(
            "name: r\nblobstore:\n  provider: local\n  options:\n    blobstore_path: store\n",
        );
        let rel = LocalBlobstore::of_release(dir.path()).expect("local");
        assert_eq!(rel.root(), dir.path().join("store"));
    }

    #[test]
    fn other_providers_and_missing_settings_are_errors() {
        let dir = release_with_final_yml(
            "name: r\nblobstore:\n  provider: s3\n  options:\n    bucket_name: b\n",
        );
        let err = LocalBlobstore::of_release(dir.path()).expect_err("s3");
        assert_eq!(
            err.to_string(),
            "the release blobstore provider 's3' (config/final.yml) is not supported: only 'local' is"
        );
        let dir = release_with_final_yml("name: r\nblobstore:\n  provider: local\n");
        let err = LocalBlobstore::of_release(dir.path()).expect_err("no path");
        assert!(matches!(err, BlobstoreError::NoBlobstorePath), "{err}");
        let dir = release_with_final_yml("name: r\n");
        let err = LocalBlobstore::of_release(dir.path()).expect_err("no blobstore");
        assert!(matches!(err, BlobstoreError::NoBlobstore { .. }), "{err}");
        let none = tempfile::tempdir().expect("tempdir");
        let err = LocalBlobstore::of_release(none.path()).expect_err("no final.yml");
        assert!(matches!(err, BlobstoreError::NoBlobstore { .. }), "{err}");
    }

    #[test]
    fn put_gives_new_ids_and_the_content_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalBlobstore::at(dir.path().join("store"));
        let (a, sha_a) = store.put(&mut &b"hello"[..]).expect("put");
        let (b, _) = store.put(&mut &b"hello"[..]).expect("put");
        assert_ne!(a, b, "every put has its own id");
        assert_eq!(sha_a, super::super::archive::sha256_hex(b"hello"));
        let mut back = String::new();
        store
            .open(&a)
            .expect("open")
            .read_to_string(&mut back)
            .expect("read");
        assert_eq!(back, "hello");
        assert!(matches!(
            store.open("nope"),
            Err(BlobstoreError::Missing { .. })
        ));
        assert!(matches!(
            store.path_of("../escape"),
            Err(BlobstoreError::BadId { .. })
        ));
    }
}

//! A release directory's own blobstore, as `config/final.yml` names it
//! (`blobstore.provider` and `blobstore.options`, with the options of
//! `config/private.yml`'s `blobstore` merged over them, as BOSH does for
//! credentials): where final builds and uploaded blobs are kept.
//!
//! This module owns the [`Blobstore`] interface (put a file under a new
//! id, get it back by id), reading a release's [`BlobstoreConfig`], the
//! `local` provider ([`LocalBlobstore`], a directory:
//! `options.blobstore_path`, relative to the release directory when
//! relative) and the [`BlobstoreProviders`] seam through which callers
//! supply other providers (the binary adds `s3`), plus the small file
//! helpers the release-writing modules share (atomic writes, streamed
//! sha256). It must not know what the files are (jobs, packages, blobs):
//! callers record ids and digests. It must not print option values: the
//! options hold credentials.

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
    #[error(
        "{path} names no blobstore (blobstore.provider, e.g. local with options.blobstore_path)"
    )]
    NoBlobstore { path: PathBuf },
    #[error("config/final.yml: blobstore.provider is missing or not a string")]
    NoProvider,
    #[error("the release blobstore provider '{provider}' (config/final.yml) is not supported: {supported}")]
    UnsupportedProvider { provider: String, supported: String },
    #[error("config/final.yml: the {provider} blobstore needs options.{option}")]
    MissingOption {
        provider: String,
        option: &'static str,
    },
    #[error("config/final.yml or config/private.yml: blobstore option '{option}': {message}")]
    BadOption { option: String, message: String },
    #[error("blobstore id '{id}' is not a plain file name")]
    BadId { id: String },
    #[error("blob '{id}' is not in {store}")]
    Missing { id: String, store: String },
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
    #[error("{operation} in {store}")]
    Remote {
        operation: String,
        store: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A place that keeps files by id.
pub trait Blobstore: Send + Sync {
    /// What it is, for messages (`the local blobstore DIR`, `s3 bucket B at
    /// URL`); never credentials.
    fn describe(&self) -> String;

    /// Copy everything `content` gives into the store under a new id; the
    /// id and the sha256 (hex) of what was stored.
    fn put(&self, content: &mut dyn Read) -> Result<(String, String), BlobstoreError>;

    /// Write blob `id` into `out`. An id the store does not have:
    /// [`BlobstoreError::Missing`].
    fn get(&self, id: &str, out: &mut dyn Write) -> Result<(), BlobstoreError>;
}

/// A release's blobstore settings: `config/final.yml`'s `blobstore`, with
/// `config/private.yml`'s `blobstore.options` merged over its options.
#[derive(Clone, PartialEq)]
pub struct BlobstoreConfig {
    /// The release directory (relative paths in options are relative to it).
    pub release_dir: PathBuf,
    pub provider: String,
    pub options: serde_yaml_ng::Mapping,
}

impl std::fmt::Debug for BlobstoreConfig {
    // The options hold credentials: only their names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.options.keys().filter_map(|k| k.as_str()).collect();
        f.debug_struct("BlobstoreConfig")
            .field("release_dir", &self.release_dir)
            .field("provider", &self.provider)
            .field("options", &keys)
            .finish()
    }
}

fn read_yaml(path: &Path) -> Result<Option<serde_yaml_ng::Value>, BlobstoreError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(BlobstoreError::ReadConfig {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_yaml_ng::from_str(&text)
        .map(Some)
        .map_err(|source| BlobstoreError::ConfigSyntax {
            path: path.to_path_buf(),
            source,
        })
}

impl BlobstoreConfig {
    /// The blobstore `DIR/config/final.yml` names, or none (no file or no
    /// `blobstore` key).
    pub fn of_release(dir: &Path) -> Result<Option<Self>, BlobstoreError> {
        let path = dir.join("config/final.yml");
        let Some(doc) = read_yaml(&path)? else {
            return Ok(None);
        };
        let Some(store) = doc.get("blobstore") else {
            return Ok(None);
        };
        let provider = store
            .get("provider")
            .and_then(|p| p.as_str())
            .ok_or(BlobstoreError::NoProvider)?
            .to_string();
        let mut options = match store.get("options") {
            Some(serde_yaml_ng::Value::Mapping(m)) => m.clone(),
            None | Some(serde_yaml_ng::Value::Null) => serde_yaml_ng::Mapping::new(),
            Some(_) => {
                return Err(BlobstoreError::BadOption {
                    option: "options".into(),
                    message: "is not a map".into(),
                })
            }
        };
        let private = read_yaml(&dir.join("config/private.yml"))?;
        if let Some(extra) = private
            .as_ref()
            .and_then(|p| p.get("blobstore"))
            .and_then(|b| b.get("options"))
        {
            let serde_yaml_ng::Value::Mapping(extra) = extra else {
                return Err(BlobstoreError::BadOption {
                    option: "options".into(),
                    message: "config/private.yml: blobstore.options is not a map".into(),
                });
            };
            for (k, v) in extra {
                options.insert(k.clone(), v.clone());
            }
        }
        Ok(Some(BlobstoreConfig {
            release_dir: dir.to_path_buf(),
            provider,
            options,
        }))
    }

    /// Option `name` as text (strings, numbers and booleans); none when
    /// absent or empty.
    pub fn option(&self, name: &str) -> Result<Option<String>, BlobstoreError> {
        use serde_yaml_ng::Value;
        match self.options.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(Value::Number(n)) => Ok(Some(n.to_string())),
            Some(Value::Bool(b)) => Ok(Some(b.to_string())),
            Some(_) => Err(BlobstoreError::BadOption {
                option: name.to_string(),
                message: "is not a string, number or boolean".into(),
            }),
        }
    }

    /// Option `name`, which this provider needs.
    pub fn required(&self, name: &'static str) -> Result<String, BlobstoreError> {
        self.option(name)?
            .ok_or_else(|| BlobstoreError::MissingOption {
                provider: self.provider.clone(),
                option: name,
            })
    }

    /// Boolean option `name` (`true`/`false`), `default` when absent.
    pub fn flag(&self, name: &str, default: bool) -> Result<bool, BlobstoreError> {
        match self.option(name)?.as_deref() {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(BlobstoreError::BadOption {
                option: name.to_string(),
                message: format!("'{other}' is not true or false"),
            }),
        }
    }
}

/// Opens the blobstore a release's config names. The director knows only
/// `local` ([`LocalOnly`]); the binary supplies one that also knows the
/// providers it links (`s3`).
pub trait BlobstoreProviders: Send + Sync {
    fn open(&self, config: &BlobstoreConfig) -> Result<Box<dyn Blobstore>, BlobstoreError>;
}

/// The providers the director itself has: `local` only.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalOnly;

impl BlobstoreProviders for LocalOnly {
    fn open(&self, config: &BlobstoreConfig) -> Result<Box<dyn Blobstore>, BlobstoreError> {
        match config.provider.as_str() {
            "local" => Ok(Box::new(LocalBlobstore::from_config(config)?)),
            other => Err(BlobstoreError::UnsupportedProvider {
                provider: other.to_string(),
                supported: "only 'local' is".into(),
            }),
        }
    }
}

/// The blobstore of release `dir`: an error when `config/final.yml` names
/// none or `providers` cannot open it.
pub fn open_release_blobstore(
    dir: &Path,
    providers: &dyn BlobstoreProviders,
) -> Result<Box<dyn Blobstore>, BlobstoreError> {
    match BlobstoreConfig::of_release(dir)? {
        Some(config) => providers.open(&config),
        None => Err(BlobstoreError::NoBlobstore {
            path: dir.join("config/final.yml"),
        }),
    }
}

/// The local blobstore of a release directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalBlobstore {
    root: PathBuf,
}

impl LocalBlobstore {
    /// The `local` blobstore `config` describes (`blobstore_path`).
    pub fn from_config(config: &BlobstoreConfig) -> Result<Self, BlobstoreError> {
        let at = config.required("blobstore_path")?;
        Ok(LocalBlobstore {
            root: config.release_dir.join(at),
        })
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
        check_id(id)?;
        Ok(self.root.join(id))
    }
}

/// Blobstore ids become file and object names: plain names only.
pub fn check_id(id: &str) -> Result<(), BlobstoreError> {
    check_name("blobstore id", id).map_err(|_| BlobstoreError::BadId { id: id.to_string() })
}

impl Blobstore for LocalBlobstore {
    fn describe(&self) -> String {
        format!("the local blobstore {}", self.root.display())
    }

    fn put(&self, content: &mut dyn Read) -> Result<(String, String), BlobstoreError> {
        let id = uuid::Uuid::new_v4().to_string();
        let dest = self.path_of(&id)?;
        let sha256 = write_streamed(&dest, content)?;
        Ok((id, sha256))
    }

    fn get(&self, id: &str, out: &mut dyn Write) -> Result<(), BlobstoreError> {
        let path = self.path_of(id)?;
        let mut f = File::open(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::NotFound {
                BlobstoreError::Missing {
                    id: id.to_string(),
                    store: self.describe(),
                }
            } else {
                BlobstoreError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        io::copy(&mut f, out).map_err(|source| BlobstoreError::Read { path, source })?;
        Ok(())
    }
}

/// Every chunk `content` gives, in order, handed to `each` (reads
/// interrupted by a signal are retried).
pub fn for_each_chunk(
    content: &mut dyn Read,
    mut each: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match content.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => each(&buf[..n])?,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copy everything `content` gives to `out`; the sha256 (hex) of it.
pub fn copy_hashed(content: &mut dyn Read, out: &mut dyn Write) -> io::Result<String> {
    let mut hasher = Sha256::new();
    for_each_chunk(content, |chunk| {
        hasher.update(chunk);
        out.write_all(chunk)
    })?;
    Ok(hex::encode(hasher.finalize()))
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
    let sha256 = copy_hashed(content, tmp.as_file_mut()).map_err(failed)?;
    tmp.as_file().sync_all().map_err(failed)?;
    tmp.persist(dest).map_err(|e| failed(e.error))?;
    Ok(sha256)
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

    fn release_with(final_yml: &str, private_yml: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        fs::write(dir.path().join("config/final.yml"), final_yml).expect("write");
        if let Some(p) = private_yml {
            fs::write(dir.path().join("config/private.yml"), p).expect("write");
        }
        dir
    }

    fn local(dir: &Path) -> Result<LocalBlobstore, BlobstoreError> {
        let config = BlobstoreConfig::of_release(dir)?.ok_or(BlobstoreError::NoProvider)?;
        LocalBlobstore::from_config(&config)
    }

    #[test]
    fn a_relative_blobstore_path_is_relative_to_the_release() {
        let dir = release_with(
            "name: r\nblobstore:\n  provider: local\n  options:\n    blobstore_path: /tmp/../x/store\n",
            None,
        );
        assert_eq!(
            local(dir.path()).expect("local").root(),
            Path::new("/tmp/../x/store")
        );
        let dir = release_with(
            "name: r\nblobstore:\n  provider: local\n  options:\n    blobstore_path: store\n",
            None,
        );
        assert_eq!(
            local(dir.path()).expect("local").root(),
            dir.path().join("store")
        );
    }

    #[test]
    fn private_yml_options_override_final_yml_and_are_not_shown() {
        let dir = release_with(
            "name: r\nblobstore:\n  provider: s3\n  options:\n    bucket_name: b\n    access_key_id: public\n",
            Some("blobstore:\n  options:\n    access_key_id: id\n    secret_access_key: hush\n"),
        );
        let c = BlobstoreConfig::of_release(dir.path())
            .expect("read")
            .expect("some");
        assert_eq!(c.provider, "s3");
        assert_eq!(c.required("bucket_name").expect("bucket"), "b");
        assert_eq!(
            c.option("access_key_id").expect("id").as_deref(),
            Some("id")
        );
        assert_eq!(
            c.option("secret_access_key").expect("key").as_deref(),
            Some("hush")
        );
        assert!(!format!("{c:?}").contains("hush"), "{c:?}");
        assert!(c.flag("use_ssl", true).expect("default"));
        let err = c.required("region").expect_err("no region");
        assert_eq!(
            err.to_string(),
            "config/final.yml: the s3 blobstore needs options.region"
        );
    }

    #[test]
    fn other_providers_and_missing_settings_are_errors() {
        let dir = release_with(
            "name: r\nblobstore:\n  provider: s3\n  options:\n    bucket_name: b\n",
            None,
        );
        let err = open_release_blobstore(dir.path(), &LocalOnly)
            .err()
            .expect("s3");
        assert_eq!(
            err.to_string(),
            "the release blobstore provider 's3' (config/final.yml) is not supported: only 'local' is"
        );
        let dir = release_with("name: r\nblobstore:\n  provider: local\n", None);
        let err = local(dir.path()).expect_err("no path");
        assert!(
            matches!(
                err,
                BlobstoreError::MissingOption {
                    option: "blobstore_path",
                    ..
                }
            ),
            "{err}"
        );
        let dir = release_with("name: r\n", None);
        let err = open_release_blobstore(dir.path(), &LocalOnly)
            .err()
            .expect("no blobstore");
        assert!(matches!(err, BlobstoreError::NoBlobstore { .. }), "{err}");
        let none = tempfile::tempdir().expect("tempdir");
        let err = open_release_blobstore(none.path(), &LocalOnly)
            .err()
            .expect("no final.yml");
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
        let mut back = Vec::new();
        store.get(&a, &mut back).expect("get");
        assert_eq!(back, b"hello");
        assert!(matches!(
            store.get("nope", &mut Vec::new()),
            Err(BlobstoreError::Missing { .. })
        ));
        assert!(matches!(
            store.get("../escape", &mut Vec::new()),
            Err(BlobstoreError::BadId { .. })
        ));
    }
}

//! The builds a release directory records: `.final_builds/` and
//! `.dev_builds/` indexes (`{jobs,packages}/NAME/index.yml`,
//! `license/index.yml`: builds by fingerprint, each with a version, a
//! blobstore id and a digest) and finding a build's tarball on disk.
//!
//! This module only reads: it must not write indexes, write into a
//! blobstore or build anything. A tarball is looked for beside the index,
//! then in `.dev_builds`, then (by its blobstore id) in the release's
//! blobstore (`config/final.yml`, opened through the caller's
//! [`BlobstoreProviders`] only when needed); what is found is verified
//! against the recorded digest.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::archive::{ArchiveData, BothHasher, DigestAlgorithm};
use super::blobstore::{Blobstore, BlobstoreConfig, BlobstoreError, BlobstoreProviders, LocalOnly};
use super::spec::parse_yaml;
use super::{digest, ReleaseError};

/// What a build is of: a job, a package (each by name) or the license.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Job,
    Package,
    License,
}

impl Kind {
    /// `jobs/NAME`, `packages/NAME` or `license`, under a builds directory.
    pub(crate) fn subdir(self, name: &str) -> String {
        match self {
            Kind::Job => format!("jobs/{name}"),
            Kind::Package => format!("packages/{name}"),
            Kind::License => "license".to_string(),
        }
    }

    fn what(self, name: &str) -> String {
        match self {
            Kind::Job => format!("job '{name}'"),
            Kind::Package => format!("package '{name}'"),
            Kind::License => "the license".to_string(),
        }
    }
}

/// One build of an index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Build {
    pub version: String,
    pub blobstore_id: Option<String>,
    /// As recorded (`<40 hex>` or `sha256:<64 hex>`), when recorded.
    pub sha1: Option<String>,
}

#[derive(Deserialize)]
struct RawIndex {
    #[serde(default)]
    builds: BTreeMap<String, RawBuild>,
}

#[derive(Deserialize)]
struct RawBuild {
    #[serde(default)]
    version: Option<serde_yaml_ng::Value>,
    #[serde(default)]
    blobstore_id: Option<String>,
    #[serde(default)]
    sha1: Option<String>,
}

/// The builds of a release directory.
pub(crate) struct Builds<'a> {
    dir: PathBuf,
    /// The release's blobstore settings (none, or why they cannot be read).
    store_config: Result<Option<BlobstoreConfig>, String>,
    providers: &'a dyn BlobstoreProviders,
    /// The blobstore the caller opened already, if it did.
    given: Option<&'a dyn Blobstore>,
    /// The blobstore, opened the first time a tarball is looked for in it
    /// (or why it could not be).
    store: OnceCell<Result<Box<dyn Blobstore>, String>>,
}

/// A build's tarball, found and verified.
pub(crate) struct Found {
    pub archive: ArchiveData,
    pub sha256: String,
}

impl<'a> Builds<'a> {
    pub(crate) fn new(
        dir: &Path,
        store_config: Result<Option<BlobstoreConfig>, String>,
        providers: &'a dyn BlobstoreProviders,
    ) -> Self {
        Builds {
            dir: dir.to_path_buf(),
            store_config,
            providers,
            given: None,
            store: OnceCell::new(),
        }
    }

    /// The builds of `dir`, whose blobstore the caller has open.
    pub(crate) fn with_store(dir: &Path, store: &'a dyn Blobstore) -> Self {
        Builds {
            given: Some(store),
            ..Builds::new(dir, Ok(None), &LocalOnly)
        }
    }

    /// The release's blobstore, or why there is none to look in.
    fn store(&self) -> Result<&dyn Blobstore, String> {
        if let Some(s) = self.given {
            return Ok(s);
        }
        let opened = self.store.get_or_init(|| match &self.store_config {
            Err(why) => Err(why.clone()),
            Ok(None) => Err("config/final.yml names no blobstore".to_string()),
            Ok(Some(c)) => self
                .providers
                .open(c)
                .map_err(|e| bosun_cpi::chain::chain(&e)),
        });
        match opened {
            Ok(s) => Ok(s.as_ref()),
            Err(e) => Err(e.clone()),
        }
    }

    /// The build of `kind`/`name` with `fingerprint`: a final build, else
    /// a dev build, else none.
    pub(crate) fn find(
        &self,
        kind: Kind,
        name: &str,
        fingerprint: &str,
    ) -> Result<Option<Build>, ReleaseError> {
        for root in [".final_builds", ".dev_builds"] {
            let file = format!("{root}/{}/index.yml", kind.subdir(name));
            if let Some(b) = read_index(&self.dir, &file)?.remove(fingerprint) {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// The build of `kind`/`name` with `fingerprint` (when indexed) and its
    /// tarball, verified against `expected` (else the build's digest).
    pub(crate) fn fetch(
        &self,
        kind: Kind,
        name: &str,
        fingerprint: &str,
        expected: Option<&str>,
    ) -> Result<(Option<Build>, Found), ReleaseError> {
        let build = self.find(kind, name, fingerprint)?;
        let found = self.tarball(kind, name, fingerprint, build.as_ref(), expected)?;
        Ok((build, found))
    }

    /// The tarball of `kind`/`name` with `fingerprint` (of `build`, when
    /// indexed), verified against `expected` (a recorded digest) or else
    /// the build's digest. Not found: an error naming what, its
    /// fingerprint and every place looked.
    fn tarball(
        &self,
        kind: Kind,
        name: &str,
        fingerprint: &str,
        build: Option<&Build>,
        expected: Option<&str>,
    ) -> Result<Found, ReleaseError> {
        let mut places: Vec<PathBuf> = Vec::new();
        for root in [".final_builds", ".dev_builds"] {
            let sub = self.dir.join(root).join(kind.subdir(name));
            places.push(sub.join(format!("{fingerprint}.tgz")));
            if let Some(b) = build {
                if b.version != fingerprint {
                    places.push(sub.join(format!("{}.tgz", b.version)));
                }
                if let Some(id) = &b.blobstore_id {
                    places.push(sub.join(id));
                }
            }
        }
        let expected = expected
            .map(str::to_string)
            .or_else(|| build.and_then(|b| b.sha1.clone()));
        let expected = match expected {
            Some(e) => Some(digest::parse(&e).map_err(|m| {
                ReleaseError::invalid(kind.subdir(name), format!("{}: {m}", kind.what(name)))
            })?),
            None => None,
        };
        let mut looked = Vec::new();
        // A candidate's bytes, kept when they have the expected digest
        // (else what was wrong with them).
        let check = |place: String, data: Vec<u8>| -> Result<Found, String> {
            let mut h = BothHasher::default();
            h.update(&data);
            let (sha1, sha256) = h.finish();
            if let Some((algo, hex)) = &expected {
                let got = match algo {
                    DigestAlgorithm::Sha1 => &sha1,
                    DigestAlgorithm::Sha256 => &sha256,
                };
                if got != hex {
                    return Err(format!(
                        "{place} ({} is {got}, recorded {hex})",
                        algo.name()
                    ));
                }
            }
            Ok(Found {
                archive: ArchiveData::from_bytes(data),
                sha256,
            })
        };
        for place in places {
            if !place.is_file() {
                looked.push(format!("{} (absent)", place.display()));
                continue;
            }
            let data = std::fs::read(&place).map_err(|e| {
                ReleaseError::io(
                    kind.subdir(name),
                    format!("reading {}: {e}", place.display()),
                )
            })?;
            match check(place.display().to_string(), data) {
                Ok(found) => return Ok(found),
                Err(why) => looked.push(why),
            }
        }
        if let Some(id) = build.and_then(|b| b.blobstore_id.as_deref()) {
            match self.store() {
                Err(why) => looked.push(format!("the release's blobstore ({why})")),
                Ok(store) => {
                    let mut data = Vec::new();
                    match store.get(id, &mut data) {
                        Ok(()) => match check(format!("{}, object {id}", store.describe()), data) {
                            Ok(found) => return Ok(found),
                            Err(why) => looked.push(why),
                        },
                        Err(BlobstoreError::Missing { .. }) => {
                            looked.push(format!("{}, object {id} (absent)", store.describe()))
                        }
                        Err(e) => looked.push(format!(
                            "{}, object {id} ({})",
                            store.describe(),
                            bosun_cpi::chain::chain(&e)
                        )),
                    }
                }
            }
        }
        Err(ReleaseError::invalid(
            kind.subdir(name),
            format!(
                "no tarball of {} with fingerprint {fingerprint}; looked in: {}",
                kind.what(name),
                looked.join(", ")
            ),
        ))
    }
}

/// The builds of one `index.yml` (none when it does not exist).
fn read_index(dir: &Path, file: &str) -> Result<BTreeMap<String, Build>, ReleaseError> {
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let mut text = String::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| ReleaseError::io(file, e))?;
    let raw: RawIndex = parse_yaml(file, &text)?;
    Ok(raw
        .builds
        .into_iter()
        .map(|(fp, b)| {
            let version = match b.version {
                Some(serde_yaml_ng::Value::String(s)) => s,
                Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
                _ => fp.clone(),
            };
            let build = Build {
                version,
                blobstore_id: b.blobstore_id,
                sha1: b.sha1,
            };
            (fp, build)
        })
        .collect())
}

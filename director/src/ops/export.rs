//! Compiled releases: `export-release` (a release's jobs and the packages
//! the store holds compiled for one stemcell, written as a BOSH compiled
//! release tarball) and the check that a deploy can have every package it
//! needs, compiled or from source.
//!
//! This module must not compile anything (a package never compiled for the
//! stemcell is an error, not a compilation) and must not print or read the
//! terminal.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::plan::desired::NeededPackage;
use crate::release::{
    write_tarball, ArchiveData, CompiledPackage, CompiledPackageEntry, Job, Release,
    ReleaseManifest,
};
use crate::store::Store;

use super::{Director, OpError};

/// Why a release could not be exported, or a deploy cannot have a package.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("exporting release {release}: no release {release} is uploaded")]
    NoRelease { release: String },
    #[error("exporting release {release}: stemcell '{stemcell}' is not of the form OS/VERSION")]
    BadStemcell { release: String, stemcell: String },
    #[error(
        "exporting release {release} for stemcell {stemcell}: package(s) {} never compiled for {stemcell}; deploy the release on that stemcell first (bosun does not compile on export)",
        packages.join(", ")
    )]
    NotCompiled {
        release: String,
        stemcell: String,
        packages: Vec<String>,
    },
    #[error("exporting release {release}: {message}")]
    Inconsistent { release: String, message: String },
    #[error("exporting release {release}")]
    State {
        release: String,
        #[source]
        source: crate::store::StateError,
    },
    #[error("exporting release {release}: writing the tarball")]
    Write {
        release: String,
        #[source]
        source: crate::release::ReleaseError,
    },
    #[error("exporting release {release}: copying blob {sha256}")]
    Blob {
        release: String,
        sha256: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "package '{package}' of release {release} has no source and is compiled only for {}, but stemcell {stemcell} needs it; upload the release's source, or a release compiled for {stemcell}",
        if compiled_for.is_empty() { "no stemcell".to_string() } else { compiled_for.join(", ") }
    )]
    NoSource {
        package: String,
        release: String,
        compiled_for: Vec<String>,
        stemcell: String,
    },
}

/// What `export-release` wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exported {
    pub path: PathBuf,
    pub jobs: usize,
    pub packages: usize,
}

/// The tarball's file name, as BOSH's CLI shapes it
/// (`NAME-VERSION-OS-VERSION.tgz`).
pub fn export_file_name(name: &str, version: &str, stemcell: &str) -> String {
    format!("{name}-{version}-{}.tgz", stemcell.replace('/', "-"))
}

impl Director {
    /// Write release `name/version` compiled for `stemcell` (`os/version`)
    /// into `dir` as a compiled release tarball: every job, and every
    /// package as the store holds it compiled for that stemcell.
    pub fn export_release(
        &self,
        name: &str,
        version: &str,
        stemcell: &str,
        dir: &Path,
    ) -> Result<Exported, ExportError> {
        let release = format!("{name}/{version}");
        if stemcell
            .split_once('/')
            .is_none_or(|(os, v)| os.is_empty() || v.is_empty() || v.contains('/'))
        {
            return Err(ExportError::BadStemcell {
                release,
                stemcell: stemcell.to_string(),
            });
        }
        let rec = self
            .store
            .release(name, version)
            .map_err(|source| ExportError::State {
                release: release.clone(),
                source,
            })?
            .ok_or_else(|| ExportError::NoRelease {
                release: release.clone(),
            })?;
        let release = format!("{}/{}", rec.name(), rec.version());
        let scratch = self.store.dir().join("tmp");
        std::fs::create_dir_all(&scratch).map_err(|source| ExportError::Blob {
            release: release.clone(),
            sha256: "(creating the scratch directory)".into(),
            source,
        })?;
        let blob = |sha256: &str| copy_blob(&self.store, &scratch, &release, sha256);

        let mut missing = Vec::new();
        let mut compiled = Vec::new();
        for p in &rec.packages {
            let name = &p.spec.name;
            let key = rec
                .compile_key(name)
                .ok_or_else(|| ExportError::Inconsistent {
                    release: release.clone(),
                    message: format!("package '{name}' has an unknown dependency or a cycle"),
                })?;
            let found = self
                .store
                .compiled_package(&key, stemcell)
                .map_err(|source| ExportError::State {
                    release: release.clone(),
                    source,
                })?;
            match found {
                None => missing.push(name.clone()),
                Some(c) => compiled.push((p, c)),
            }
        }
        if !missing.is_empty() {
            return Err(ExportError::NotCompiled {
                release,
                stemcell: stemcell.to_string(),
                packages: missing,
            });
        }

        let mut jobs = Vec::with_capacity(rec.jobs.len());
        for j in &rec.jobs {
            let version = rec
                .manifest
                .jobs
                .iter()
                .find(|e| e.name == j.spec.name)
                .map_or_else(|| j.fingerprint.clone(), |e| e.version.clone());
            jobs.push(Job {
                spec: j.spec.clone(),
                fingerprint: j.fingerprint.clone(),
                version,
                templates: j.templates.clone(),
                monit: j.monit.clone(),
                archive: blob(&j.sha256)?,
                sha256: j.sha256.clone(),
            });
        }
        let mut packages = Vec::with_capacity(compiled.len());
        let mut entries = Vec::with_capacity(compiled.len());
        for (p, c) in compiled {
            let version = rec
                .package_version(&p.spec.name)
                .unwrap_or_else(|| p.fingerprint.clone());
            entries.push(CompiledPackageEntry {
                name: p.spec.name.clone(),
                version: version.clone(),
                fingerprint: p.fingerprint.clone(),
                sha1: format!("sha256:{}", c.sha256),
                stemcell: stemcell.to_string(),
                dependencies: p.spec.dependencies.clone(),
            });
            packages.push(CompiledPackage {
                name: p.spec.name.clone(),
                version,
                fingerprint: p.fingerprint.clone(),
                stemcell: stemcell.to_string(),
                dependencies: p.spec.dependencies.clone(),
                archive: blob(&c.sha256)?,
                sha256: c.sha256,
            });
        }
        let out = Release {
            manifest: ReleaseManifest {
                name: rec.manifest.name.clone(),
                version: rec.manifest.version.clone(),
                commit_hash: rec.manifest.commit_hash.clone(),
                uncommitted_changes: rec.manifest.uncommitted_changes,
                jobs: rec.manifest.jobs.clone(),
                packages: Vec::new(),
                compiled_packages: entries,
                // The store keeps no license archive.
                license: None,
            },
            jobs,
            packages: Vec::new(),
            compiled_packages: packages,
            license: None,
            warnings: Vec::new(),
        };
        let path = dir.join(export_file_name(rec.name(), rec.version(), stemcell));
        write_tarball(&out, &path).map_err(|source| ExportError::Write { release, source })?;
        Ok(Exported {
            path,
            jobs: out.jobs.len(),
            packages: out.compiled_packages.len(),
        })
    }
}

/// A blob of the store as an archive of a release being written: a
/// temporary copy in `scratch` (removed when dropped), not a copy in memory.
fn copy_blob(
    store: &Store,
    scratch: &Path,
    release: &str,
    sha256: &str,
) -> Result<ArchiveData, ExportError> {
    let err = |source| ExportError::Blob {
        release: release.to_string(),
        sha256: sha256.to_string(),
        source,
    };
    let mut src = std::fs::File::open(store.blobs().path(sha256)).map_err(err)?;
    let mut tmp = tempfile::NamedTempFile::new_in(scratch).map_err(err)?;
    let len = std::io::copy(&mut src, tmp.as_file_mut()).map_err(err)?;
    tmp.as_file_mut().flush().map_err(err)?;
    Ok(ArchiveData::from_temp_file(tmp.into_temp_path(), len))
}

/// Every package the deploy needs that is neither compiled for its
/// stemcell nor has a source to compile from is an error naming the
/// package, the stemcells it is compiled for and the one needed.
pub(super) fn check_compilable(
    store: &Store,
    needed: &[NeededPackage],
    compiled: &BTreeSet<(String, String)>,
) -> Result<(), OpError> {
    for p in needed {
        if !p.source_sha256.is_empty()
            || compiled.contains(&(p.fingerprint.clone(), p.stemcell.clone()))
        {
            continue;
        }
        let compiled_for: Vec<String> = store
            .compiled_packages()?
            .into_iter()
            .filter(|c| c.fingerprint == p.fingerprint)
            .map(|c| c.stemcell)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        return Err(ExportError::NoSource {
            package: p.name.clone(),
            release: p.release.clone(),
            compiled_for,
            stemcell: p.stemcell.clone(),
        }
        .into());
    }
    Ok(())
}

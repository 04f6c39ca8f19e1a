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
        "exporting release {release} for stemcell {stemcell}: {} {} never compiled for {stemcell}; deploy the release on that stemcell first (bosun does not compile on export)",
        if packages.len() == 1 { "package" } else { "packages" },
        if packages.len() == 1 { format!("{} was", packages[0]) } else { format!("{} were", packages.join(", ")) }
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
    #[error("exporting release {release}: creating {}", dir.display())]
    Scratch {
        release: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
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
        std::fs::create_dir_all(&scratch).map_err(|source| ExportError::Scratch {
            release: release.clone(),
            dir: scratch.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execute::executor::{Cpis, ExecOptions};
    use crate::release::{read_release, read_release_dir};
    use crate::store::{ReleaseRecord, StateError};
    use sha2::Digest;

    fn kv_source() -> Release {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../releases/kv");
        read_release_dir(&dir, None).unwrap()
    }

    /// The kv release as a compiled release for `stemcell`: its packages
    /// only compiled, each archive a distinct made-up content.
    fn kv_compiled(stemcell: &str) -> Release {
        let mut rel = kv_source();
        let mut compiled = Vec::new();
        let mut entries = Vec::new();
        for p in &rel.packages {
            let data = install_dir_tgz(&p.spec.name, stemcell);
            let sha256 = hex::encode(sha2::Sha256::digest(&data));
            entries.push(CompiledPackageEntry {
                name: p.spec.name.clone(),
                version: p.version.clone(),
                fingerprint: p.fingerprint.clone(),
                sha1: format!("sha256:{sha256}"),
                stemcell: stemcell.to_string(),
                dependencies: p.spec.dependencies.clone(),
            });
            compiled.push(CompiledPackage {
                name: p.spec.name.clone(),
                version: p.version.clone(),
                fingerprint: p.fingerprint.clone(),
                stemcell: stemcell.to_string(),
                dependencies: p.spec.dependencies.clone(),
                archive: ArchiveData::from_bytes(data),
                sha256,
            });
        }
        rel.packages.clear();
        rel.manifest.packages.clear();
        rel.manifest.compiled_packages = entries;
        rel.compiled_packages = compiled;
        rel
    }

    /// A compiled package as BOSH packs one: the install directory's
    /// contents at the top level.
    fn install_dir_tgz(name: &str, stemcell: &str) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        let mut b = tar::Builder::new(gz);
        let body = format!("#!/bin/sh\necho {name} built for {stemcell}\n");
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o755);
        h.set_cksum();
        b.append_data(&mut h, format!("bin/{name}"), body.as_bytes())
            .unwrap();
        b.into_inner().unwrap().finish().unwrap()
    }

    fn director(dir: &Path) -> Director {
        Director {
            store: Store::open(dir).unwrap(),
            cpis: Cpis::new(),
            opts: ExecOptions::default(),
            blobstores: std::sync::Arc::new(crate::release::LocalOnly),
        }
    }

    #[test]
    fn a_compiled_upload_is_cached_under_the_keys_a_source_deploy_uses() {
        let tmp = tempfile::tempdir().unwrap();
        let d = director(&tmp.path().join("state"));
        let rel = kv_compiled("ubuntu-noble/1.5");
        assert_eq!(d.store.save_compiled_release(&rel).unwrap(), (true, 2));
        let rec = d
            .store
            .release(&rel.manifest.name, &rel.manifest.version)
            .unwrap()
            .unwrap();
        let source = ReleaseRecord::from_release(&kv_source());
        for name in ["kv-common", "kv-server"] {
            let p = rec.package(name).unwrap();
            assert!(p.sha256.is_empty(), "{name} has no source blob");
            let key = rec.compile_key(name).unwrap();
            assert_eq!(Some(&key), source.compile_key(name).as_ref(), "{name}");
            let c = d
                .store
                .compiled_package(&key, "ubuntu-noble/1.5")
                .unwrap()
                .unwrap_or_else(|| panic!("{name} cached"));
            let want = rel
                .compiled_packages
                .iter()
                .find(|c| c.name == name)
                .unwrap();
            assert_eq!(c.sha256, want.sha256);
            assert_eq!(
                d.store.blobs().read(&c.sha256).unwrap(),
                want.archive.to_vec().unwrap()
            );
            assert!(d
                .store
                .compiled_package(&key, "ubuntu-noble/2")
                .unwrap()
                .is_none());
        }
        assert_eq!(
            rec.package("kv-server").unwrap().spec.dependencies,
            ["kv-common"]
        );
        // The same upload again records no new release.
        assert_eq!(d.store.save_compiled_release(&rel).unwrap(), (false, 2));
    }

    #[test]
    fn a_compiled_upload_adds_to_its_source_release_but_not_to_another_release() {
        let tmp = tempfile::tempdir().unwrap();
        let d = director(&tmp.path().join("state"));
        let source = kv_source();
        assert!(d.store.save_release(&source).unwrap());
        let rel = kv_compiled("ubuntu-noble/1.5");
        assert_eq!(d.store.save_compiled_release(&rel).unwrap(), (false, 2));
        let rec = d
            .store
            .release(&rel.manifest.name, &rel.manifest.version)
            .unwrap()
            .unwrap();
        assert!(
            rec.packages.iter().all(|p| !p.sha256.is_empty()),
            "the source record is kept"
        );

        let mut other = kv_compiled("ubuntu-noble/1.5");
        other.compiled_packages[0].fingerprint = "0".repeat(40);
        other.manifest.compiled_packages[0].fingerprint = "0".repeat(40);
        let err = d.store.save_compiled_release(&other).unwrap_err();
        assert!(matches!(err, StateError::ReleaseConflict { .. }), "{err}");
    }

    #[test]
    fn export_writes_the_compiled_packages_and_refuses_a_stemcell_they_lack() {
        let tmp = tempfile::tempdir().unwrap();
        let d = director(&tmp.path().join("state"));
        let rel = kv_compiled("ubuntu-noble/1.5");
        d.store.save_compiled_release(&rel).unwrap();
        let (name, version) = (&rel.manifest.name, &rel.manifest.version);

        let err = d
            .export_release(name, version, "ubuntu-noble/2", tmp.path())
            .unwrap_err();
        match &err {
            ExportError::NotCompiled { packages, .. } => {
                assert_eq!(packages, &["kv-common", "kv-server"])
            }
            other => panic!("{other}"),
        }
        assert!(err
            .to_string()
            .contains("deploy the release on that stemcell first"));
        assert!(matches!(
            d.export_release(name, version, "noble", tmp.path()),
            Err(ExportError::BadStemcell { .. })
        ));
        assert!(matches!(
            d.export_release(name, "9.9", "ubuntu-noble/1.5", tmp.path()),
            Err(ExportError::NoRelease { .. })
        ));

        let out = d
            .export_release(name, version, "ubuntu-noble/1.5", tmp.path())
            .unwrap();
        assert_eq!(
            out.path,
            tmp.path()
                .join(format!("kv-{version}-ubuntu-noble-1.5.tgz"))
        );
        assert_eq!((out.jobs, out.packages), (rel.jobs.len(), 2));
        let back = read_release(&out.path, None).unwrap();
        assert!(back.packages.is_empty());
        assert_eq!(back.jobs.len(), rel.jobs.len());
        for (a, b) in back.compiled_packages.iter().zip(&rel.compiled_packages) {
            assert_eq!(
                (
                    &a.name,
                    &a.fingerprint,
                    &a.stemcell,
                    &a.dependencies,
                    &a.sha256
                ),
                (
                    &b.name,
                    &b.fingerprint,
                    &b.stemcell,
                    &b.dependencies,
                    &b.sha256
                )
            );
        }
        for (a, b) in back.jobs.iter().zip(&rel.jobs) {
            assert_eq!((&a.fingerprint, &a.sha256), (&b.fingerprint, &b.sha256));
        }
    }

    #[test]
    fn a_package_with_no_source_names_where_it_is_compiled() {
        let tmp = tempfile::tempdir().unwrap();
        let d = director(&tmp.path().join("state"));
        let rel = kv_compiled("ubuntu-noble/1.5");
        d.store.save_compiled_release(&rel).unwrap();
        let rec = d
            .store
            .release(&rel.manifest.name, &rel.manifest.version)
            .unwrap()
            .unwrap();
        let key = rec.compile_key("kv-common").unwrap();
        let mut needed = NeededPackage {
            name: "kv-common".into(),
            fingerprint: key.clone(),
            release: "kv".into(),
            source_sha256: String::new(),
            dependencies: Vec::new(),
            stemcell: "ubuntu-jammy/3".into(),
        };
        let err = check_compilable(&d.store, std::slice::from_ref(&needed), &BTreeSet::new())
            .unwrap_err()
            .to_string();
        for part in ["'kv-common'", "ubuntu-noble/1.5", "ubuntu-jammy/3"] {
            assert!(err.contains(part), "{part} in {err}");
        }
        let compiled = BTreeSet::from([(key, "ubuntu-jammy/3".to_string())]);
        check_compilable(&d.store, std::slice::from_ref(&needed), &compiled).unwrap();
        needed.source_sha256 = "ab".repeat(32);
        check_compilable(&d.store, &[needed], &BTreeSet::new()).unwrap();
    }
}

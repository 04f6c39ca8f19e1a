//! Final releases, as BOSH's `create-release --final` makes them: the
//! release built from its directory; every job, package and license whose
//! fingerprint has no final build yet put into the release's blobstore
//! (any [`Blobstore`] the caller's providers open) and recorded in
//! `.final_builds/{jobs,packages}/NAME/index.yml` or
//! `.final_builds/license/index.yml` (fingerprint -> `version` (the
//! fingerprint), `blobstore_id`, `sha1: sha256:<hex>`); the release's
//! manifest written to `releases/NAME/NAME-VERSION.yml` and its version
//! recorded in `releases/NAME/index.yml`.
//!
//! This module owns writing those indexes and manifests. It must not
//! change what the reader ([`read_release_dir`]) makes of a directory:
//! reading the directory at the new version gives the release that was
//! finalized, and that is checked before returning. Existing index entries
//! are never changed; an index with nothing new is not rewritten.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use super::blobstore::{
    write_text, Blobstore, BlobstoreConfig, BlobstoreError, BlobstoreProviders,
};
use super::final_builds::{Builds, Kind};
use super::spec::check_name;
use super::{read_release_dir_with, ArchiveData, DigestAlgorithm, Release, ReleaseError};

/// What went wrong making a final release.
#[derive(Debug, thiserror::Error)]
pub enum FinalizeError {
    #[error("building the release from its directory")]
    Build(#[source] ReleaseError),
    #[error("reading the final release back")]
    ReadBack(#[source] ReleaseError),
    #[error("reusing the final build of {what}")]
    Reuse {
        what: String,
        #[source]
        source: ReleaseError,
    },
    #[error("the release's blobstore")]
    Blobstore(#[from] BlobstoreError),
    #[error("reading {path}")]
    ReadIndex {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not valid YAML")]
    IndexSyntax {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("{path}: {message}")]
    IndexShape { path: PathBuf, message: String },
    #[error("writing {what}")]
    Serialize {
        what: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("reading the archive of {what}")]
    Archive {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{message}")]
    BadVersion { message: String },
    #[error("release '{name}' version '{version}' already exists")]
    VersionExists { name: String, version: String },
    #[error("the stored archive of {what} has sha256 {got}, the release built {want}")]
    Stored {
        what: String,
        got: String,
        want: String,
    },
}

/// A final release made, and what it took.
#[derive(Debug)]
pub struct FinalRelease {
    /// The release as read back from the directory at its new version.
    pub release: Release,
    /// `releases/NAME/NAME-VERSION.yml`.
    pub manifest_path: PathBuf,
    /// The builds put into the blobstore (`job NAME`, `package NAME`, `license`).
    pub new_builds: Vec<String>,
    /// The builds that already had a final build.
    pub reused_builds: Vec<String>,
}

/// `create-release --final [--version V]` in `dir`: version `V`, else the
/// next integer after the highest final version (1 when there is none).
/// A version that exists is refused. New builds go into the blobstore
/// `config/final.yml` names, opened through `providers`.
pub fn create_final_release(
    dir: &Path,
    version: Option<&str>,
    providers: &dyn BlobstoreProviders,
) -> Result<FinalRelease, FinalizeError> {
    let config = BlobstoreConfig::of_release(dir)?.ok_or_else(|| BlobstoreError::NoBlobstore {
        path: dir.join("config/final.yml"),
    })?;
    let store = providers.open(&config)?;
    // Reused builds are checked in the store new ones go to: one client.
    let builds = Builds::with_store(dir, store.as_ref());
    let read = |version| read_release_dir_with(dir, version, DigestAlgorithm::default(), providers);
    let mut rel = read(None).map_err(FinalizeError::Build)?;
    let name = rel.manifest.name.clone();
    let releases_dir = dir.join("releases").join(&name);
    let index_path = releases_dir.join("index.yml");
    let mut index = read_index(&index_path)?;
    let mut known = release_versions(&index, &index_path)?;
    known.extend(manifest_versions(&releases_dir, &name)?);
    let version = match version {
        Some(v) => {
            check_name("release version", v)
                .map_err(|message| FinalizeError::BadVersion { message })?;
            if v.contains(char::is_whitespace) {
                return Err(FinalizeError::BadVersion {
                    message: format!("release version '{v}' contains white space"),
                });
            }
            v.to_string()
        }
        None => next_final_version(&known),
    };
    let manifest_path = releases_dir.join(format!("{name}-{version}.yml"));
    if known.contains(&version) || manifest_path.exists() {
        return Err(FinalizeError::VersionExists { name, version });
    }
    rel.manifest.version = version.clone();

    let mut new_builds = Vec::new();
    let mut reused_builds = Vec::new();
    let final_builds = dir.join(".final_builds");
    let Release {
        manifest,
        jobs,
        packages,
        license,
        ..
    } = &mut rel;
    // Every job, package and license, with the manifest fields its final
    // build decides (version, digest).
    let mut work: Vec<(Candidate<'_>, &mut String, &mut String)> = Vec::new();
    for (j, entry) in jobs.iter().zip(manifest.jobs.iter_mut()) {
        let c = Candidate::new(
            Kind::Job,
            &j.spec.name,
            &final_builds,
            &j.fingerprint,
            &j.archive,
            &j.sha256,
        );
        work.push((c, &mut entry.version, &mut entry.sha1));
    }
    for (p, entry) in packages.iter().zip(manifest.packages.iter_mut()) {
        let c = Candidate::new(
            Kind::Package,
            &p.spec.name,
            &final_builds,
            &p.fingerprint,
            &p.archive,
            &p.sha256,
        );
        work.push((c, &mut entry.version, &mut entry.sha1));
    }
    if let (Some(l), Some(entry)) = (license.as_ref(), manifest.license.as_mut()) {
        let c = Candidate::new(
            Kind::License,
            "license",
            &final_builds,
            &l.fingerprint,
            &l.archive,
            &l.sha256,
        );
        work.push((c, &mut entry.version, &mut entry.sha1));
    }
    for (c, version, sha1) in work {
        let (v, digest, new) = finalize_build(store.as_ref(), &builds, &c)?;
        *version = v;
        *sha1 = digest;
        if new {
            &mut new_builds
        } else {
            &mut reused_builds
        }
        .push(c.what);
    }

    let text =
        serde_yaml_ng::to_string(&rel.manifest).map_err(|source| FinalizeError::Serialize {
            what: manifest_path.display().to_string(),
            source,
        })?;
    write_text(&manifest_path, &format!("---\n{text}"))?;
    let builds = builds_of(&mut index, &index_path)?;
    let mut entry = Mapping::new();
    entry.insert("version".into(), Value::String(version.clone()));
    builds.insert(
        Value::String(uuid::Uuid::new_v4().to_string()),
        Value::Mapping(entry),
    );
    write_index(&index_path, index)?;

    let release = read(Some(&version)).map_err(FinalizeError::ReadBack)?;
    Ok(FinalRelease {
        release,
        manifest_path,
        new_builds,
        reused_builds,
    })
}

/// One job, package or license that may need a final build.
struct Candidate<'a> {
    kind: Kind,
    name: &'a str,
    /// `job NAME`, `package NAME` or `license`.
    what: String,
    index: PathBuf,
    fingerprint: &'a str,
    archive: &'a ArchiveData,
    sha256: &'a str,
}

impl<'a> Candidate<'a> {
    /// `kind`/`name`, its index under `final_builds`.
    fn new(
        kind: Kind,
        name: &'a str,
        final_builds: &Path,
        fingerprint: &'a str,
        archive: &'a ArchiveData,
        sha256: &'a str,
    ) -> Self {
        let what = match kind {
            Kind::Job => format!("job {name}"),
            Kind::Package => format!("package {name}"),
            Kind::License => "license".to_string(),
        };
        Candidate {
            kind,
            name,
            what,
            index: final_builds.join(kind.subdir(name)).join("index.yml"),
            fingerprint,
            archive,
            sha256,
        }
    }
}

/// The final build of `c`: its version, its digest and whether it is new
/// (put into `store` and added to its index now). A build reused must have
/// its tarball where the reader looks, with the recorded digest, so that
/// the release about to be recorded can be read.
fn finalize_build(
    store: &dyn Blobstore,
    builds: &Builds,
    c: &Candidate<'_>,
) -> Result<(String, String, bool), FinalizeError> {
    let mut index = read_index(&c.index)?;
    if let Some(existing) = builds_of(&mut index, &c.index)?.get(c.fingerprint) {
        let version = match existing.get("version") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => c.fingerprint.to_string(),
        };
        let sha1 = match existing.get("sha1") {
            Some(Value::String(s)) => super::digest::normalise(s),
            _ => format!("sha256:{}", c.sha256),
        };
        let reuse = |source| FinalizeError::Reuse {
            what: c.what.clone(),
            source,
        };
        builds
            .fetch(c.kind, c.name, c.fingerprint, Some(&sha1))
            .map_err(reuse)?;
        return Ok((version, sha1, false));
    }
    let mut content = c.archive.open().map_err(|source| FinalizeError::Archive {
        what: c.what.clone(),
        source,
    })?;
    let (id, got) = store.put(&mut content)?;
    if got != c.sha256 {
        return Err(FinalizeError::Stored {
            what: c.what.clone(),
            got,
            want: c.sha256.to_string(),
        });
    }
    let sha1 = format!("sha256:{got}");
    let mut entry = Mapping::new();
    entry.insert("version".into(), Value::String(c.fingerprint.to_string()));
    entry.insert("blobstore_id".into(), Value::String(id));
    entry.insert("sha1".into(), Value::String(sha1.clone()));
    builds_of(&mut index, &c.index)?.insert(
        Value::String(c.fingerprint.to_string()),
        Value::Mapping(entry),
    );
    write_index(&c.index, index)?;
    Ok((c.fingerprint.to_string(), sha1, true))
}

/// An `index.yml` (`builds:` + `format-version:`), empty when absent.
fn read_index(path: &Path) -> Result<Mapping, FinalizeError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Mapping::new()),
        Err(source) => {
            return Err(FinalizeError::ReadIndex {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let doc: Value =
        serde_yaml_ng::from_str(&text).map_err(|source| FinalizeError::IndexSyntax {
            path: path.to_path_buf(),
            source,
        })?;
    match doc {
        Value::Null => Ok(Mapping::new()),
        Value::Mapping(m) => Ok(m),
        _ => Err(FinalizeError::IndexShape {
            path: path.to_path_buf(),
            message: "expected a mapping with 'builds'".to_string(),
        }),
    }
}

/// The `builds` mapping of an index (created when absent).
fn builds_of<'a>(index: &'a mut Mapping, path: &Path) -> Result<&'a mut Mapping, FinalizeError> {
    let builds = index
        .entry(Value::String("builds".to_string()))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if builds.is_null() {
        *builds = Value::Mapping(Mapping::new());
    }
    builds
        .as_mapping_mut()
        .ok_or_else(|| FinalizeError::IndexShape {
            path: path.to_path_buf(),
            message: "'builds' is not a mapping".to_string(),
        })
}

fn write_index(path: &Path, mut index: Mapping) -> Result<(), FinalizeError> {
    index.insert("format-version".into(), Value::String("2".to_string()));
    let text = serde_yaml_ng::to_string(&index).map_err(|source| FinalizeError::Serialize {
        what: path.display().to_string(),
        source,
    })?;
    write_text(path, &format!("---\n{text}"))?;
    Ok(())
}

/// The versions `releases/NAME/index.yml` records.
fn release_versions(index: &Mapping, path: &Path) -> Result<BTreeSet<String>, FinalizeError> {
    let mut out = BTreeSet::new();
    let Some(builds) = index.get("builds") else {
        return Ok(out);
    };
    if builds.is_null() {
        return Ok(out);
    }
    let builds = builds
        .as_mapping()
        .ok_or_else(|| FinalizeError::IndexShape {
            path: path.to_path_buf(),
            message: "'builds' is not a mapping".to_string(),
        })?;
    for entry in builds.values() {
        match entry.get("version") {
            Some(Value::String(s)) => out.insert(s.clone()),
            Some(Value::Number(n)) => out.insert(n.to_string()),
            _ => {
                return Err(FinalizeError::IndexShape {
                    path: path.to_path_buf(),
                    message: "a build has no version".to_string(),
                })
            }
        };
    }
    Ok(out)
}

/// The versions of the `NAME-V.yml` files in `releases/NAME/` (a
/// manifest whose index entry was never written still takes its version).
fn manifest_versions(releases_dir: &Path, name: &str) -> Result<BTreeSet<String>, FinalizeError> {
    let mut out = BTreeSet::new();
    let entries = match fs::read_dir(releases_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(source) => {
            return Err(FinalizeError::ReadIndex {
                path: releases_dir.to_path_buf(),
                source,
            })
        }
    };
    let prefix = format!("{name}-");
    for entry in entries {
        let entry = entry.map_err(|source| FinalizeError::ReadIndex {
            path: releases_dir.to_path_buf(),
            source,
        })?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(v) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".yml"))
        {
            out.insert(v.to_string());
        }
    }
    Ok(out)
}

/// One more than the highest leading integer of `versions` (`12`, `12.3`
/// and `12-rc.1` all count as 12); 1 when none has one.
fn next_final_version(versions: &BTreeSet<String>) -> String {
    let highest = versions
        .iter()
        .filter_map(|v| {
            let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
            digits.parse::<u64>().ok()
        })
        .max();
    match highest {
        Some(n) => n.saturating_add(1).to_string(),
        None => "1".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::blobstore::LocalOnly;
    use super::super::read_release_dir;
    use super::*;

    fn write(root: &Path, rel: &str, content: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        fs::write(p, content).expect("write");
    }

    /// A release with one job, one package (a source file and a blob) and
    /// a license, its blobstore at `store/`.
    fn release() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        write(
            d,
            "config/final.yml",
            "---\nfinal_name: tiny\nblobstore:\n  provider: local\n  options:\n    blobstore_path: store\n",
        );
        write(
            d,
            "jobs/hello/spec",
            "---\nname: hello\ntemplates:\n  run.erb: bin/run\npackages: [greeting]\n",
        );
        write(d, "jobs/hello/monit", "");
        write(d, "jobs/hello/templates/run.erb", "#!/bin/sh\necho hi\n");
        write(
            d,
            "packages/greeting/spec",
            "---\nname: greeting\nfiles: [greeting/*]\n",
        );
        write(
            d,
            "packages/greeting/packaging",
            "cp greeting/* ${BOSH_INSTALL_TARGET}/\n",
        );
        write(d, "src/greeting/text.txt", "hello\n");
        write(d, "LICENSE", "be nice\n");
        dir
    }

    fn read(p: &Path) -> String {
        fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn finalizing_records_builds_and_reads_back_the_same_release() {
        let dir = release();
        let d = dir.path();
        let dev = read_release_dir(d, Some("1")).expect("dev read");
        let fin = create_final_release(d, None, &LocalOnly).expect("final");
        assert_eq!(fin.release.manifest.version, "1");
        assert_eq!(fin.release.manifest.name, "tiny");
        assert_eq!(
            fin.new_builds,
            vec!["job hello", "package greeting", "license"]
        );
        assert!(fin.reused_builds.is_empty());
        // The same release as building version 1 from source.
        assert_eq!(fin.release.manifest, dev.manifest);
        assert_eq!(fin.release.jobs[0].archive, dev.jobs[0].archive);
        assert_eq!(fin.release.packages[0].archive, dev.packages[0].archive);
        assert_eq!(
            fin.release.license.as_ref().map(|l| &l.archive),
            dev.license.as_ref().map(|l| &l.archive)
        );

        let job = &dev.jobs[0];
        let index = read(&d.join(".final_builds/jobs/hello/index.yml"));
        let doc: Value = serde_yaml_ng::from_str(&index).expect("yaml");
        let entry = &doc["builds"][job.fingerprint.as_str()];
        assert_eq!(entry["version"].as_str(), Some(job.fingerprint.as_str()));
        assert_eq!(
            entry["sha1"].as_str().map(str::to_string),
            Some(format!("sha256:{}", job.sha256))
        );
        assert_eq!(doc["format-version"].as_str(), Some("2"));
        let id = entry["blobstore_id"].as_str().expect("blobstore id");
        assert_eq!(
            fs::read(d.join("store").join(id)).expect("stored"),
            job.archive.to_vec().expect("archive")
        );
        assert!(d.join(".final_builds/license/index.yml").is_file());
        assert!(d
            .join(".final_builds/packages/greeting/index.yml")
            .is_file());

        let manifest: Value =
            serde_yaml_ng::from_str(&read(&d.join("releases/tiny/tiny-1.yml"))).expect("yaml");
        assert_eq!(manifest["name"].as_str(), Some("tiny"));
        assert_eq!(manifest["version"].as_str(), Some("1"));
        assert_eq!(manifest["jobs"][0]["name"].as_str(), Some("hello"));
        let rindex: Value =
            serde_yaml_ng::from_str(&read(&d.join("releases/tiny/index.yml"))).expect("yaml");
        let versions: Vec<&str> = rindex["builds"]
            .as_mapping()
            .expect("builds")
            .values()
            .filter_map(|b| b["version"].as_str())
            .collect();
        assert_eq!(versions, vec!["1"]);
    }

    #[test]
    fn a_second_final_release_reuses_unchanged_builds() {
        let dir = release();
        let d = dir.path();
        create_final_release(d, None, &LocalOnly).expect("v1");
        let indexes = [
            ".final_builds/jobs/hello/index.yml",
            ".final_builds/packages/greeting/index.yml",
            ".final_builds/license/index.yml",
        ];
        let before: Vec<String> = indexes.iter().map(|i| read(&d.join(i))).collect();
        let stored = fs::read_dir(d.join("store")).expect("store").count();
        let v2 = create_final_release(d, None, &LocalOnly).expect("v2");
        assert_eq!(v2.release.manifest.version, "2");
        assert!(v2.new_builds.is_empty(), "{:?}", v2.new_builds);
        assert_eq!(v2.reused_builds.len(), 3);
        let after: Vec<String> = indexes.iter().map(|i| read(&d.join(i))).collect();
        assert_eq!(before, after, "unchanged builds leave their indexes alone");
        assert_eq!(
            fs::read_dir(d.join("store")).expect("store").count(),
            stored
        );
        // A changed job gets a new build; the package is reused.
        write(d, "jobs/hello/templates/run.erb", "#!/bin/sh\necho bye\n");
        let v3 = create_final_release(d, None, &LocalOnly).expect("v3");
        assert_eq!(v3.release.manifest.version, "3");
        assert_eq!(v3.new_builds, vec!["job hello"]);
        let doc: Value = serde_yaml_ng::from_str(&read(&d.join(indexes[0]))).expect("job index");
        assert_eq!(doc["builds"].as_mapping().expect("builds").len(), 2);
        // Every version still reads.
        for v in ["1", "2", "3"] {
            let r = read_release_dir(d, Some(v)).expect("final read");
            assert_eq!(r.manifest.version, v);
        }
        assert_ne!(
            read_release_dir(d, Some("1")).expect("v1").jobs[0].fingerprint,
            read_release_dir(d, Some("3")).expect("v3").jobs[0].fingerprint
        );
    }

    #[test]
    fn a_reused_build_must_have_its_tarball() {
        let dir = release();
        let d = dir.path();
        create_final_release(d, None, &LocalOnly).expect("v1");
        for e in fs::read_dir(d.join("store")).expect("store").flatten() {
            fs::remove_file(e.path()).expect("rm stored build");
        }
        let err = create_final_release(d, None, &LocalOnly).expect_err("tarballs gone");
        assert!(matches!(err, FinalizeError::Reuse { .. }), "{err}");
        assert!(!d.join("releases/tiny/tiny-2.yml").exists());
        let index = read(&d.join("releases/tiny/index.yml"));
        assert!(!index.contains("    version: '2'"), "{index}");
    }

    #[test]
    fn versions_are_given_or_next_and_never_reused() {
        let dir = release();
        let d = dir.path();
        let v = create_final_release(d, Some("7"), &LocalOnly).expect("v7");
        assert_eq!(v.release.manifest.version, "7");
        let err = create_final_release(d, Some("7"), &LocalOnly).expect_err("exists");
        assert_eq!(err.to_string(), "release 'tiny' version '7' already exists");
        let next = create_final_release(d, None, &LocalOnly).expect("next");
        assert_eq!(next.release.manifest.version, "8");
        assert!(matches!(
            create_final_release(d, Some("../x"), &LocalOnly),
            Err(FinalizeError::BadVersion { .. })
        ));
        // A manifest without its index entry (an interrupted run) still
        // takes its version.
        write(
            d,
            "releases/tiny/tiny-12.yml",
            "---\nname: tiny\nversion: '12'\n",
        );
        let after = create_final_release(d, None, &LocalOnly).expect("after 12");
        assert_eq!(after.release.manifest.version, "13");
    }

    #[test]
    fn next_version_counts_leading_integers() {
        let set = |vs: &[&str]| vs.iter().map(|v| v.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(next_final_version(&set(&[])), "1");
        assert_eq!(next_final_version(&set(&["2", "10", "9"])), "11");
        assert_eq!(next_final_version(&set(&["3.1", "x"])), "4");
        assert_eq!(next_final_version(&set(&["x"])), "1");
    }

    #[test]
    fn a_provider_the_caller_cannot_open_writes_nothing() {
        let dir = release();
        let d = dir.path();
        write(
            d,
            "config/final.yml",
            "---\nname: tiny\nblobstore:\n  provider: s3\n  options:\n    bucket_name: b\n",
        );
        let err = create_final_release(d, None, &LocalOnly).expect_err("s3");
        assert!(
            matches!(&err, FinalizeError::Blobstore(BlobstoreError::UnsupportedProvider { provider, .. }) if provider == "s3"),
            "{err}"
        );
        assert!(!d.join(".final_builds").exists());
        assert!(!d.join("releases").exists());
    }
}

//! BOSH-layout releases: reading a release directory (`jobs/`, `packages/`,
//! `src/`, `blobs/`, `config/final.yml`), writing and reading release
//! tarballs (`release.MF`, `jobs/<name>.tgz`, `packages/<name>.tgz`), job and
//! package spec parsing, content fingerprints and deterministic archives.
//!
//! This module owns the release *format* and a release directory's own
//! files: besides reading, it writes final builds and blobs into the
//! release's own blobstore (`config/final.yml` + `config/private.yml`;
//! [`Blobstore`], `finalize`, `blobs`): the `local` provider is here, other
//! providers come in through [`BlobstoreProviders`]. It must not keep the director's state (no state
//! store, no caches), must not compile packages or run `packaging`
//! scripts, and must not render templates: it hands out parsed specs,
//! template sources and byte-identical archives to the modules that do
//! (`compiler`, `templates`, `desired`).
//!
//! Tarballs are streamed, within [`ArchiveLimits`]: a job or package
//! archive read from a tarball lives in a temporary file (an
//! [`ArchiveData`], in the scratch directory the caller names, removed when
//! the last copy is dropped), never in memory; the files inside package
//! archives are only hashed.
//!
//! Determinism: the same source gives the same fingerprints, the same dev
//! version and byte-identical archives (entries sorted, mtime 0, uid/gid 0,
//! modes 0644/0755, gzip header mtime 0).
//!
//! Fingerprints are BOSH's "v2" fingerprints (see [`DigestAlgorithm`]): a
//! job or package built from the same source has the fingerprint a BOSH
//! release's `releases/NAME/NAME-V.yml` and `.final_builds` record, and a
//! dev job's or package's version is its fingerprint. `release.MF` has the
//! keys bosh.io tarballs have; archives are verified by the digest given
//! (`sha1: <40 hex>` or `sha1: sha256:<64 hex>`).
//!
//! Spec files are read leniently, as BOSH does: an unknown key is a
//! warning ([`Release::warnings`]), not an error. Names and paths are
//! checked strictly.
//!
//! Differences from BOSH (on purpose): `pre_packaging` scripts are never
//! run (a package that has one gets a warning); a dev release's
//! `commit_hash` is `unknown` (bosun runs no git commands) and its version
//! is `0+dev.<digest of its fingerprints>`; a final build's tarball is
//! looked for in the release directory, then fetched from the release's
//! blobstore into memory (BOSH keeps a download cache in `~/.bosh/cache`;
//! bosun keeps none).

mod archive;
mod blobs;
mod blobstore;
#[cfg(test)]
mod bosh_tests;
mod dir;
mod final_builds;
mod finalize;
mod sha1;
mod spec;
mod tarball;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::archive_limits::ArchiveLimits;
use crate::model::problems::Problem;

pub use archive::{ArchiveData, DigestAlgorithm};
pub use blobs::{
    add_blob, list_blobs, read_blobs, sync_blobs, upload_blobs, BlobRecord, BlobStatus, BlobsError,
    SyncReport,
};
pub use blobstore::{
    check_id, copy_hashed, open_release_blobstore, Blobstore, BlobstoreConfig, BlobstoreError,
    BlobstoreProviders, LocalBlobstore, LocalOnly,
};
pub use dir::{read_release_dir, read_release_dir_with};
pub use finalize::{create_final_release, FinalRelease, FinalizeError};
pub use spec::{
    parse_job_spec, parse_job_spec_with_warnings, parse_package_spec,
    parse_package_spec_with_warnings,
};
pub use tarball::{read_tarball, read_tarball_with_limits, write_tarball};

/// A job's `spec` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Template source (under `templates/`) -> destination (under the job dir).
    #[serde(default)]
    pub templates: BTreeMap<String, String>,
    #[serde(default)]
    pub packages: Vec<String>,
    #[serde(default)]
    pub properties: BTreeMap<String, PropertyDef>,
    #[serde(default)]
    pub consumes: Vec<LinkDef>,
    #[serde(default)]
    pub provides: Vec<LinkDef>,
    /// How the job's templates and monit file are rendered (spec key
    /// `template_engine`: `erb`, the default, or `tera`). A stored record
    /// without the key predates ERB support, when every job was rendered
    /// with Tera.
    #[serde(default = "TemplateEngine::stored_default")]
    pub template_engine: TemplateEngine,
}

/// The template language of a job's templates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateEngine {
    /// ERB, as in every BOSH release.
    #[default]
    Erb,
    /// bosun's own engine, Tera.
    Tera,
}

impl TemplateEngine {
    fn stored_default() -> TemplateEngine {
        TemplateEngine::Tera
    }

    /// The spelling of every engine in a spec, for error messages.
    pub const ALLOWED: &'static [&'static str] = &["erb", "tera"];

    /// The engine named `s` in a spec.
    pub fn from_spec(s: &str) -> Option<Self> {
        match s {
            "erb" => Some(TemplateEngine::Erb),
            "tera" => Some(TemplateEngine::Tera),
            _ => None,
        }
    }
}

/// One property declared in a job spec.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PropertyDef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub example: Option<serde_json::Value>,
}

/// One entry of a job spec's `consumes` or `provides`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinkDef {
    pub name: String,
    #[serde(rename = "type")]
    pub link_type: String,
    #[serde(default)]
    pub optional: bool,
    /// Properties exported through the link (provides) or expected (consumes).
    #[serde(default)]
    pub properties: Vec<String>,
}

/// A package's `spec` file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageSpec {
    pub name: String,
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Globs over `src/` then `blobs/`. For a package read from a tarball,
    /// the literal paths of the files in its archive.
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub excluded_files: Vec<String>,
}

/// A job of a release, with its sources and archive.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub spec: JobSpec,
    /// BOSH v2 fingerprint (40 hex for SHA-1, 64 hex for SHA-256).
    pub fingerprint: String,
    /// The fingerprint for a dev job; a final build's version otherwise.
    pub version: String,
    /// Template source name -> content.
    pub templates: BTreeMap<String, String>,
    /// The `monit` file, if the job has one (bosun supervises from `bpm.yml`).
    pub monit: Option<String>,
    /// Deterministic tgz (or a final build's tarball): `job.MF` (the spec
    /// text), `monit`, `templates/<src>`.
    pub archive: ArchiveData,
    /// Hex sha256 of `archive` (what the blob store names it by).
    pub sha256: String,
}

/// A package of a release, with its source archive.
#[derive(Clone, Debug, PartialEq)]
pub struct Package {
    pub spec: PackageSpec,
    /// BOSH v2 fingerprint (40 hex for SHA-1, 64 hex for SHA-256).
    pub fingerprint: String,
    /// The fingerprint for a dev package; a final build's version otherwise.
    pub version: String,
    /// Deterministic tgz (or a final build's tarball): `packaging` at the
    /// top and the selected files at their paths relative to `src/` or
    /// `blobs/`.
    pub archive: ArchiveData,
    /// Hex sha256 of `archive`.
    pub sha256: String,
}

/// A compiled package of a compiled release (`compiled_packages/NAME.tgz`).
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledPackage {
    pub name: String,
    pub version: String,
    pub fingerprint: String,
    /// `os/version` of the stemcell it was compiled on.
    pub stemcell: String,
    pub dependencies: Vec<String>,
    pub archive: ArchiveData,
    /// Hex sha256 of `archive`.
    pub sha256: String,
}

/// A release's license (`license.tgz`: `LICENSE*` and `NOTICE*` files).
#[derive(Clone, Debug, PartialEq)]
pub struct License {
    pub fingerprint: String,
    pub version: String,
    pub archive: ArchiveData,
    /// Hex sha256 of `archive`.
    pub sha256: String,
}

/// `release.MF`, with the keys BOSH writes. `sha1` is the digest of an
/// archive: 40 hex (SHA-1) or `sha256:<64 hex>`. A record stored by older
/// bosun versions (`sha256: <64 hex>`) reads as `sha1: sha256:<64 hex>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseManifest {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub commit_hash: String,
    #[serde(default)]
    pub uncommitted_changes: bool,
    #[serde(default)]
    pub jobs: Vec<JobEntry>,
    #[serde(default)]
    pub packages: Vec<PackageEntry>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compiled_packages: Vec<CompiledPackageEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<LicenseEntry>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    pub name: String,
    pub version: String,
    pub fingerprint: String,
    #[serde(alias = "sha256", deserialize_with = "digest::deserialize")]
    pub sha1: String,
    #[serde(default)]
    pub packages: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageEntry {
    pub name: String,
    pub version: String,
    pub fingerprint: String,
    #[serde(alias = "sha256", deserialize_with = "digest::deserialize")]
    pub sha1: String,
    #[serde(default)]
    pub dependencies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompiledPackageEntry {
    pub name: String,
    pub version: String,
    pub fingerprint: String,
    #[serde(alias = "sha256", deserialize_with = "digest::deserialize")]
    pub sha1: String,
    /// `os/version`.
    pub stemcell: String,
    #[serde(default)]
    pub dependencies: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LicenseEntry {
    pub version: String,
    pub fingerprint: String,
    #[serde(alias = "sha256", deserialize_with = "digest::deserialize")]
    pub sha1: String,
}

/// The `sha1` values of `release.MF` and `.final_builds` indexes.
pub mod digest {
    use serde::{Deserialize, Deserializer};

    use super::DigestAlgorithm;

    /// `<64 hex>` (bosun's old records) becomes `sha256:<64 hex>`; anything
    /// else is kept as written.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = String::deserialize(d)?;
        Ok(normalise(&s))
    }

    /// See [`deserialize`].
    pub fn normalise(s: &str) -> String {
        let s = s.trim();
        if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            format!("sha256:{}", s.to_ascii_lowercase())
        } else {
            s.to_string()
        }
    }

    /// The algorithm and lowercase hex of a recorded digest:
    /// `<40 hex>` (SHA-1) or `sha256:<64 hex>`. Several digests separated
    /// by `;` (as BOSH allows) give the strongest one.
    pub fn parse(s: &str) -> Result<(DigestAlgorithm, String), String> {
        let mut best: Option<(DigestAlgorithm, String)> = None;
        for part in s.split(';').map(str::trim) {
            let (algo, hex) = match part.split_once(':') {
                None => (DigestAlgorithm::Sha1, part),
                Some(("sha1", h)) => (DigestAlgorithm::Sha1, h),
                Some(("sha256", h)) => (DigestAlgorithm::Sha256, h),
                Some((other, _)) => {
                    return Err(format!(
                        "digest '{s}' uses '{other}', not one of sha1, sha256"
                    ))
                }
            };
            let want = match algo {
                DigestAlgorithm::Sha1 => 40,
                DigestAlgorithm::Sha256 => 64,
            };
            if hex.len() != want || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "digest '{s}' is not {want} hex digits of {}",
                    algo.name()
                ));
            }
            let stronger = best
                .as_ref()
                .is_none_or(|(b, _)| *b == DigestAlgorithm::Sha1);
            if stronger {
                best = Some((algo, hex.to_ascii_lowercase()));
            }
        }
        best.ok_or_else(|| format!("digest '{s}' is empty"))
    }
}

/// A whole release: manifest, jobs and packages (both sorted by name).
#[derive(Clone, Debug, PartialEq)]
pub struct Release {
    pub manifest: ReleaseManifest,
    pub jobs: Vec<Job>,
    pub packages: Vec<Package>,
    /// Compiled packages of a compiled release (sorted by name, stemcell).
    pub compiled_packages: Vec<CompiledPackage>,
    pub license: Option<License>,
    /// What was read but ignored or doubtful (unknown spec keys, a
    /// fingerprint that could not be recomputed, ...), each naming the file
    /// and, when known, the line.
    pub warnings: Vec<String>,
}

/// What went wrong, for callers that want to branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseErrorKind {
    /// A file could not be read or written.
    Io,
    /// A file is not valid YAML or does not have the expected shape.
    Syntax,
    /// The release is inconsistent (missing dependency, cycle, glob matching
    /// nothing, missing template, unknown package, ...).
    Invalid,
    /// A tarball's content does not match its recorded sha256 / fingerprint.
    Integrity,
    /// A tarball expands past a limit of [`ArchiveLimits`] (or a limit's
    /// setting is not valid).
    Limit,
}

/// A problem with a release, naming the release (directory or tarball), the
/// file inside it and, when known, the line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ReleaseError {
    pub kind: ReleaseErrorKind,
    /// The release directory or tarball as given (empty when parsing a lone spec).
    pub release: String,
    /// The file inside the release (e.g. `packages/kv-server/spec`).
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ReleaseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.release.is_empty() {
            write!(f, "release {}: ", self.release)?;
        }
        if !self.file.is_empty() {
            write!(f, "{}", self.file)?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl ReleaseError {
    pub(crate) fn new(
        kind: ReleaseErrorKind,
        file: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ReleaseError {
            kind,
            release: String::new(),
            file: file.into(),
            line: None,
            message: message.into(),
        }
    }

    pub(crate) fn invalid(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ReleaseErrorKind::Invalid, file, message)
    }

    pub(crate) fn io(file: impl Into<String>, err: impl fmt::Display) -> Self {
        Self::new(ReleaseErrorKind::Io, file, err.to_string())
    }

    pub(crate) fn integrity(file: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(ReleaseErrorKind::Integrity, file, message)
    }

    pub(crate) fn at_line(mut self, line: Option<usize>) -> Self {
        self.line = line;
        self
    }

    /// Attach the release directory or tarball, unless one is already set.
    pub(crate) fn in_release(mut self, release: &Path) -> Self {
        if self.release.is_empty() {
            self.release = release.display().to_string();
        }
        self
    }

    /// As an input [`Problem`] (file = release + file inside it).
    pub fn to_problem(&self) -> Problem {
        let file = match (self.release.is_empty(), self.file.is_empty()) {
            (true, _) => self.file.clone(),
            (false, true) => self.release.clone(),
            (false, false) => format!("{}/{}", self.release, self.file),
        };
        Problem {
            file,
            path: String::new(),
            line: self.line,
            message: self.message.clone(),
        }
    }
}

impl Release {
    pub fn job(&self, name: &str) -> Option<&Job> {
        self.jobs.iter().find(|j| j.spec.name == name)
    }

    pub fn package(&self, name: &str) -> Option<&Package> {
        self.packages.iter().find(|p| p.spec.name == name)
    }

    /// Packages in dependency order (dependencies first; ties by name).
    pub fn packages_in_order(&self) -> Vec<&Package> {
        let mut by_name: BTreeMap<&str, &Package> = BTreeMap::new();
        for p in &self.packages {
            by_name.insert(p.spec.name.as_str(), p);
        }
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for name in by_name.keys() {
            visit_in_order(name, &by_name, &mut done, &mut out);
        }
        out
    }

    /// The named packages plus their transitive dependencies, dependencies
    /// first. An unknown name (or dependency) is an error.
    pub fn package_closure(&self, names: &[String]) -> Result<Vec<&Package>, ReleaseError> {
        let mut wanted: BTreeSet<&str> = BTreeSet::new();
        let mut stack: Vec<(&str, Option<&str>)> =
            names.iter().map(|n| (n.as_str(), None)).collect();
        while let Some((name, needed_by)) = stack.pop() {
            let Some(pkg) = self.package(name) else {
                let message = match needed_by {
                    Some(by) => format!("package '{by}' depends on unknown package '{name}'"),
                    None => format!("no package named '{name}' in the release"),
                };
                return Err(ReleaseError {
                    kind: ReleaseErrorKind::Invalid,
                    release: format!("{}/{}", self.manifest.name, self.manifest.version),
                    file: String::new(),
                    line: None,
                    message,
                });
            };
            if wanted.insert(pkg.spec.name.as_str()) {
                for d in &pkg.spec.dependencies {
                    stack.push((d.as_str(), Some(pkg.spec.name.as_str())));
                }
            }
        }
        Ok(self
            .packages_in_order()
            .into_iter()
            .filter(|p| wanted.contains(p.spec.name.as_str()))
            .collect())
    }

    /// The transitive dependencies of package `name` with their
    /// fingerprints, as `dep:fingerprint` sorted by name and joined by `,`
    /// (empty without dependencies). A BOSH package fingerprint names its
    /// dependencies but not their content, so whatever caches compiled
    /// packages must key on this as well as on the fingerprint.
    pub fn dependency_key(&self, name: &str) -> Result<String, ReleaseError> {
        let closure = self.package_closure(&[name.to_string()])?;
        let mut deps: Vec<String> = closure
            .iter()
            .filter(|p| p.spec.name != name)
            .map(|p| format!("{}:{}", p.spec.name, p.fingerprint))
            .collect();
        deps.sort();
        Ok(deps.join(","))
    }
}

/// Depth-first, dependencies first. Cycles (rejected when reading) are cut.
fn visit_in_order<'a>(
    name: &str,
    by_name: &BTreeMap<&str, &'a Package>,
    done: &mut BTreeSet<String>,
    out: &mut Vec<&'a Package>,
) {
    if !done.insert(name.to_string()) {
        return;
    }
    let Some(pkg) = by_name.get(name) else { return };
    let mut deps: Vec<&str> = pkg.spec.dependencies.iter().map(String::as_str).collect();
    deps.sort_unstable();
    for d in deps {
        visit_in_order(d, by_name, done, out);
    }
    out.push(pkg);
}

/// Directory or tarball, by looking at `path`. `version` applies to
/// directories only: a tarball carries its own version in `release.MF`.
/// A tarball is read within the limits of [`ArchiveLimits::from_env`], its
/// job and package archives copied to the system's temporary directory.
/// A directory's final builds are looked for in a `local` blobstore only.
pub fn read_release(path: &Path, version: Option<&str>) -> Result<Release, ReleaseError> {
    read_release_in(path, version, None, &LocalOnly)
}

/// [`read_release`], a tarball's job and package archives copied to
/// `scratch_dir` (created if needed) when given, a directory's final
/// builds fetched from any blobstore `providers` can open.
pub fn read_release_in(
    path: &Path,
    version: Option<&str>,
    scratch_dir: Option<&Path>,
    providers: &dyn BlobstoreProviders,
) -> Result<Release, ReleaseError> {
    let limits = if path.is_file() {
        tarball::limits_from_env(path)?
    } else {
        ArchiveLimits::default()
    };
    read_release_with_limits(path, version, &limits, scratch_dir, providers)
}

/// [`read_release_in`], a tarball read within `limits`.
pub fn read_release_with_limits(
    path: &Path,
    version: Option<&str>,
    limits: &ArchiveLimits,
    scratch_dir: Option<&Path>,
    providers: &dyn BlobstoreProviders,
) -> Result<Release, ReleaseError> {
    if path.is_dir() {
        read_release_dir_with(path, version, DigestAlgorithm::default(), providers)
    } else if path.is_file() {
        read_tarball_with_limits(path, limits, scratch_dir)
    } else {
        Err(ReleaseError::new(
            ReleaseErrorKind::Io,
            "",
            "no such release directory or tarball",
        )
        .in_release(path))
    }
}

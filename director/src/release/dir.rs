//! Reading a BOSH-layout release directory: `config/final.yml`,
//! `config/blobs.yml` + `blobs/`, `jobs/`, `packages/` (vendored ones by
//! `spec.lock`), `src/`, `LICENSE*`/`NOTICE*`, `.final_builds/`,
//! `.dev_builds/` and `releases/NAME/NAME-V.yml`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use super::archive::{
    build_tgz, digests, job_archive, job_fingerprint, license_fingerprint, package_archive,
    package_fingerprint, sha256_hex, BothHasher, DigestAlgorithm, FileEntry,
};
use super::blobstore::{BlobstoreConfig, BlobstoreProviders, LocalOnly};
use super::final_builds::{Builds, Kind};
use super::spec::{
    check_name, parse_job_spec_with_warnings, parse_package_spec_with_warnings, parse_yaml,
    yaml_error,
};
use super::tarball::{job_from_archive, license_from_archive, package_from_archive};
use super::{
    digest, Job, JobEntry, License, LicenseEntry, Package, PackageEntry, PackageSpec, Release,
    ReleaseError, ReleaseManifest,
};
use crate::archive_limits::{ArchiveLimits, Budget};

/// [`read_release_dir_with`] computing SHA-256 fingerprints (as BOSH's CLI
/// does today), final builds looked for in a `local` blobstore only.
pub fn read_release_dir(dir: &Path, version: Option<&str>) -> Result<Release, ReleaseError> {
    read_release_dir_with(dir, version, DigestAlgorithm::default(), &LocalOnly)
}

/// Read a BOSH-layout release directory: name from `config/final.yml`
/// (`name`, else `final_name`), else the directory name.
///
/// With a `version` that `releases/NAME/NAME-V.yml` records, the final
/// release: every job, package and license taken from its final build's
/// tarball. Otherwise a dev release built from source, with `version` or
/// `0+dev.<first 12 hex of a digest of all fingerprints>` (same source,
/// same version); fingerprints made with `algo` (a job or package whose
/// fingerprint under the other algorithm is a recorded build takes that
/// build's fingerprint and version); vendored packages (`spec.lock`) from
/// their build's tarball. A build tarball the directory does not hold is
/// fetched by its blobstore id from the release's blobstore, which
/// `providers` opens.
pub fn read_release_dir_with(
    dir: &Path,
    version: Option<&str>,
    algo: DigestAlgorithm,
    providers: &dyn BlobstoreProviders,
) -> Result<Release, ReleaseError> {
    read_dir_inner(dir, version, algo, providers).map_err(|e| e.in_release(dir))
}

/// What `config/final.yml` says.
struct FinalConfig {
    name: String,
    blobstore: Result<Option<BlobstoreConfig>, String>,
}

fn read_dir_inner(
    dir: &Path,
    version: Option<&str>,
    algo: DigestAlgorithm,
    providers: &dyn BlobstoreProviders,
) -> Result<Release, ReleaseError> {
    if !dir.is_dir() {
        return Err(ReleaseError::io("", "not a directory"));
    }
    let config = final_config(dir)?;
    let builds = Builds::new(dir, config.blobstore.clone(), providers);
    if let Some(v) = version {
        if v.trim().is_empty() {
            return Err(ReleaseError::invalid("", "the release version is empty"));
        }
        let file = format!("releases/{0}/{0}-{v}.yml", config.name);
        if check_name("release version", v).is_ok() && dir.join(&file).is_file() {
            return read_final_release(dir, &file, &config.name, v, &builds);
        }
    }
    let mut warnings = Vec::new();
    let blobs = read_blobs_yml(dir)?;
    let packages = read_packages(dir, algo, &builds, &blobs, &mut warnings)?;
    let jobs = read_jobs(dir, algo, &builds, &packages, &mut warnings)?;
    let license = read_license(dir, algo, &builds)?;

    let version = match version {
        Some(v) => v.to_string(),
        None => dev_version(&jobs, &packages, license.as_ref()),
    };
    let manifest = ReleaseManifest {
        name: config.name,
        version,
        commit_hash: "unknown".to_string(),
        uncommitted_changes: false,
        jobs: jobs
            .iter()
            .map(|j| JobEntry {
                name: j.spec.name.clone(),
                version: j.version.clone(),
                fingerprint: j.fingerprint.clone(),
                sha1: format!("sha256:{}", j.sha256),
                packages: j.spec.packages.clone(),
            })
            .collect(),
        packages: packages
            .iter()
            .map(|p| PackageEntry {
                name: p.spec.name.clone(),
                version: p.version.clone(),
                fingerprint: p.fingerprint.clone(),
                sha1: format!("sha256:{}", p.sha256),
                dependencies: p.spec.dependencies.clone(),
            })
            .collect(),
        compiled_packages: Vec::new(),
        license: license.as_ref().map(|l| LicenseEntry {
            version: l.version.clone(),
            fingerprint: l.fingerprint.clone(),
            sha1: format!("sha256:{}", l.sha256),
        }),
    };
    Ok(Release {
        manifest,
        jobs,
        packages,
        compiled_packages: Vec::new(),
        license,
        warnings,
    })
}

fn dev_version(jobs: &[Job], packages: &[Package], license: Option<&License>) -> String {
    let mut listing = String::new();
    for j in jobs {
        listing.push_str(&format!("job {} {}\n", j.spec.name, j.fingerprint));
    }
    for p in packages {
        listing.push_str(&format!("package {} {}\n", p.spec.name, p.fingerprint));
    }
    if let Some(l) = license {
        listing.push_str(&format!("license {}\n", l.fingerprint));
    }
    let digest = sha256_hex(listing.as_bytes());
    format!("0+dev.{}", &digest[..12])
}

fn final_config(dir: &Path) -> Result<FinalConfig, ReleaseError> {
    let file = "config/final.yml";
    let path = dir.join(file);
    let from_final = if path.is_file() {
        let text = read_text(&path, file)?;
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).map_err(|e| yaml_error(file, &e))?;
        let get = |k: &str| doc.get(k).and_then(|v| v.as_str()).map(str::to_string);
        get("name").or_else(|| get("final_name"))
    } else {
        None
    };
    let name = match from_final {
        Some(n) => n,
        None => {
            let canonical = dir.canonicalize().map_err(|e| ReleaseError::io("", e))?;
            canonical
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .ok_or_else(|| {
                    ReleaseError::invalid(file, "no release name and no directory name")
                })?
        }
    };
    check_name("release name", &name).map_err(|m| ReleaseError::invalid(file, m))?;
    // Blobstore settings that cannot be read are an error only when a build
    // must be fetched from the blobstore: what is here can still be read.
    let blobstore = BlobstoreConfig::of_release(dir).map_err(|e| bosun_cpi::chain::chain(&e));
    Ok(FinalConfig { name, blobstore })
}

/// Limits for reading final builds' archives (they were made by a release
/// author, but are still bounded).
fn build_budget() -> Budget {
    Budget::new(ArchiveLimits::default())
}

/// A final release (`releases/NAME/NAME-V.yml`): each job, package and the
/// license from its build's tarball, verified against the recorded digest.
fn read_final_release(
    dir: &Path,
    file: &str,
    name: &str,
    version: &str,
    builds: &Builds,
) -> Result<Release, ReleaseError> {
    let text = read_text(&dir.join(file), file)?;
    let mut manifest: ReleaseManifest = parse_yaml(file, &text)?;
    if manifest.name != name || manifest.version != version {
        return Err(ReleaseError::invalid(
            file,
            format!(
                "records release {}/{}, not {name}/{version}",
                manifest.name, manifest.version
            ),
        ));
    }
    let budget = build_budget();
    let mut warnings = Vec::new();
    let mut packages = Vec::new();
    for entry in &mut manifest.packages {
        check_name("package name", &entry.name).map_err(|m| ReleaseError::invalid(file, m))?;
        let (_, found) = builds.fetch(
            Kind::Package,
            &entry.name,
            &entry.fingerprint,
            Some(&entry.sha1),
        )?;
        let at = format!("packages/{}", entry.name);
        let pkg = package_from_archive(
            entry,
            found.archive,
            found.sha256,
            &at,
            &budget,
            &mut warnings,
        )?;
        entry.sha1 = digest::normalise(&entry.sha1);
        packages.push(pkg);
    }
    packages.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let known: BTreeSet<String> = packages.iter().map(|p| p.spec.name.clone()).collect();
    let mut jobs = Vec::new();
    for entry in &manifest.jobs {
        check_name("job name", &entry.name).map_err(|m| ReleaseError::invalid(file, m))?;
        let (_, found) = builds.fetch(
            Kind::Job,
            &entry.name,
            &entry.fingerprint,
            Some(&entry.sha1),
        )?;
        let at = format!("jobs/{}", entry.name);
        jobs.push(job_from_archive(
            entry,
            found.archive,
            found.sha256,
            &at,
            &budget,
            &known,
            &mut warnings,
        )?);
    }
    jobs.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    let license = match &manifest.license {
        Some(entry) => {
            let (_, found) = builds.fetch(
                Kind::License,
                "license",
                &entry.fingerprint,
                Some(&entry.sha1),
            )?;
            Some(license_from_archive(
                entry,
                found.archive,
                found.sha256,
                "license",
                &budget,
                &mut warnings,
            )?)
        }
        None => None,
    };
    Ok(Release {
        manifest,
        jobs,
        packages,
        compiled_packages: Vec::new(),
        license,
        warnings,
    })
}

/// The fingerprint and version of a job, package or license computed as
/// `fps` (the chosen algorithm's first): the first that a recorded build
/// has, with that build's version; else the first, as its own version.
fn fingerprint_and_version(
    builds: &Builds,
    kind: Kind,
    name: &str,
    fps: [String; 2],
) -> Result<(String, String), ReleaseError> {
    for fp in &fps {
        if let Some(b) = builds.find(kind, name, fp)? {
            return Ok((fp.clone(), b.version));
        }
    }
    let [first, _] = fps;
    Ok((first.clone(), first))
}

/// Both algorithms, `algo` first.
fn algorithms(algo: DigestAlgorithm) -> [DigestAlgorithm; 2] {
    match algo {
        DigestAlgorithm::Sha1 => [DigestAlgorithm::Sha1, DigestAlgorithm::Sha256],
        DigestAlgorithm::Sha256 => [DigestAlgorithm::Sha256, DigestAlgorithm::Sha1],
    }
}

/// `LICENSE*` and `NOTICE*` at the top of the release directory, if any.
fn read_license(
    dir: &Path,
    algo: DigestAlgorithm,
    builds: &Builds,
) -> Result<Option<License>, ReleaseError> {
    let mut files = BTreeMap::new();
    for entry in fs::read_dir(dir).map_err(|e| ReleaseError::io("", e))? {
        let entry = entry.map_err(|e| ReleaseError::io("", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("LICENSE") || name.starts_with("NOTICE")) {
            continue;
        }
        let path = entry.path();
        if !path.is_file() {
            continue;
        }
        let data = fs::read(&path).map_err(|e| ReleaseError::io(&name, e))?;
        files.insert(
            name,
            FileEntry {
                data,
                executable: is_executable(&path),
            },
        );
    }
    if files.is_empty() {
        return Ok(None);
    }
    let d = digests(&files);
    let fps = algorithms(algo).map(|a| license_fingerprint(a, &d));
    let (fingerprint, version) = fingerprint_and_version(builds, Kind::License, "license", fps)?;
    let archive = build_tgz(&files).map_err(|e| ReleaseError::io("license", e))?;
    Ok(Some(License {
        fingerprint,
        version,
        sha256: sha256_hex(&archive),
        archive: archive.into(),
    }))
}

/// `config/blobs.yml`: blob path -> recorded digest (`sha`), if any.
fn read_blobs_yml(dir: &Path) -> Result<BTreeMap<String, Option<String>>, ReleaseError> {
    #[derive(Deserialize)]
    struct RawBlob {
        #[serde(default)]
        sha: Option<String>,
    }
    let file = "config/blobs.yml";
    let path = dir.join(file);
    if !path.is_file() {
        return Ok(BTreeMap::new());
    }
    let text = read_text(&path, file)?;
    if text.trim().is_empty() || text.trim() == "---" {
        return Ok(BTreeMap::new());
    }
    let raw: Option<BTreeMap<String, RawBlob>> = parse_yaml(file, &text)?;
    Ok(raw
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.sha))
        .collect())
}

fn read_text(path: &Path, file: &str) -> Result<String, ReleaseError> {
    let bytes = fs::read(path).map_err(|e| ReleaseError::io(file, e))?;
    String::from_utf8(bytes).map_err(|_| ReleaseError::invalid(file, "not valid UTF-8 text"))
}

/// Subdirectory names of `dir` (sorted), or none if it does not exist.
fn subdirs(dir: &Path, file: &str) -> Result<Vec<String>, ReleaseError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| ReleaseError::io(file, e))? {
        let entry = entry.map_err(|e| ReleaseError::io(file, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if entry.path().is_dir() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Every regular file under `root`, by `/`-separated path relative to it.
fn list_files(root: &Path, file: &str) -> Result<BTreeMap<String, PathBuf>, ReleaseError> {
    let mut out = BTreeMap::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for entry in walkdir::WalkDir::new(root).follow_links(true) {
        let entry = entry.map_err(|e| ReleaseError::io(file, e))?;
        if !entry.file_type().is_file() {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(|e| ReleaseError::io(file, e))?;
        let rel: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        out.insert(rel.join("/"), entry.path().to_path_buf());
    }
    Ok(out)
}

fn glob(pattern: &str) -> Result<GlobMatcher, globset::Error> {
    Ok(GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()?
        .compile_matcher())
}

fn glob_set(patterns: &[String]) -> Result<GlobSet, globset::Error> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(GlobBuilder::new(p).literal_separator(true).build()?);
    }
    b.build()
}

fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

struct PackageSource {
    spec: PackageSpec,
    /// `packaging`, `pre_packaging` and the selected files.
    files: BTreeMap<String, FileEntry>,
}

/// A vendored package (`spec.lock`): name, fingerprint, dependencies.
#[derive(Deserialize)]
struct SpecLock {
    name: String,
    fingerprint: String,
    #[serde(default)]
    dependencies: Vec<String>,
}

enum PackageInput {
    Source(PackageSource),
    Vendored(SpecLock),
}

impl PackageInput {
    fn dependencies(&self) -> &[String] {
        match self {
            PackageInput::Source(s) => &s.spec.dependencies,
            PackageInput::Vendored(l) => &l.dependencies,
        }
    }
}

fn read_packages(
    dir: &Path,
    algo: DigestAlgorithm,
    builds: &Builds,
    blobs_yml: &BTreeMap<String, Option<String>>,
    warnings: &mut Vec<String>,
) -> Result<Vec<Package>, ReleaseError> {
    let names = subdirs(&dir.join("packages"), "packages")?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let src = list_files(&dir.join("src"), "src")?;
    let blobs = list_files(&dir.join("blobs"), "blobs")?;

    let mut inputs: BTreeMap<String, PackageInput> = BTreeMap::new();
    for name in &names {
        let pdir = dir.join("packages").join(name);
        let lock_file = format!("packages/{name}/spec.lock");
        if pdir.join("spec.lock").is_file() {
            let lock: SpecLock =
                parse_yaml(&lock_file, &read_text(&pdir.join("spec.lock"), &lock_file)?)?;
            if lock.name != *name {
                return Err(ReleaseError::invalid(
                    lock_file,
                    format!(
                        "package name '{}' does not match its directory '{name}'",
                        lock.name
                    ),
                ));
            }
            if lock.fingerprint.trim().is_empty() {
                return Err(ReleaseError::invalid(lock_file, "the fingerprint is empty"));
            }
            for d in &lock.dependencies {
                check_name("dependency", d).map_err(|m| ReleaseError::invalid(&lock_file, m))?;
            }
            inputs.insert(name.clone(), PackageInput::Vendored(lock));
            continue;
        }
        let spec_file = format!("packages/{name}/spec");
        if !pdir.join("spec").is_file() {
            return Err(ReleaseError::invalid(spec_file, "missing package spec"));
        }
        let (spec, spec_warnings) = parse_package_spec_with_warnings(
            &spec_file,
            &read_text(&pdir.join("spec"), &spec_file)?,
        )?;
        warnings.extend(spec_warnings);
        if spec.name != *name {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "package name '{}' does not match its directory '{name}'",
                    spec.name
                ),
            ));
        }
        let packaging_file = format!("packages/{name}/packaging");
        let packaging = fs::read(pdir.join("packaging")).map_err(|e| {
            ReleaseError::io(&packaging_file, format!("missing packaging script: {e}"))
        })?;
        let mut files = select_files(&spec, &spec_file, &src, &blobs, blobs_yml)?;
        files.insert(
            "packaging".to_string(),
            FileEntry {
                data: packaging,
                executable: true,
            },
        );
        let pre = pdir.join("pre_packaging");
        if pre.is_file() {
            let pre_file = format!("packages/{name}/pre_packaging");
            let data = fs::read(&pre).map_err(|e| ReleaseError::io(&pre_file, e))?;
            warnings.push(format!(
                "{pre_file}: pre_packaging scripts are not run (the file is part of the fingerprint and the archive)"
            ));
            files.insert(
                "pre_packaging".to_string(),
                FileEntry {
                    data,
                    executable: true,
                },
            );
        }
        inputs.insert(
            name.clone(),
            PackageInput::Source(PackageSource { spec, files }),
        );
    }

    // Dependencies must exist and must not form a cycle.
    for (name, input) in &inputs {
        for d in input.dependencies() {
            if !inputs.contains_key(d) {
                return Err(ReleaseError::invalid(
                    format!("packages/{name}/spec"),
                    format!(
                        "package '{name}' depends on '{d}', which is not a package of this release"
                    ),
                ));
            }
        }
    }
    let deps: BTreeMap<&str, &[String]> = inputs
        .iter()
        .map(|(n, s)| (n.as_str(), s.dependencies()))
        .collect();
    topo_order(&deps)?;

    let budget = build_budget();
    let mut packages = Vec::new();
    for (name, input) in inputs {
        let pkg = match input {
            PackageInput::Source(s) => {
                let d = digests(&s.files);
                let fps =
                    algorithms(algo).map(|a| package_fingerprint(a, &d, &s.spec.dependencies));
                let (fingerprint, version) =
                    fingerprint_and_version(builds, Kind::Package, &name, fps)?;
                let mut files = s.files;
                let packaging = files
                    .remove("packaging")
                    .map(|f| f.data)
                    .unwrap_or_default();
                let archive = package_archive(&packaging, &files)
                    .map_err(|e| ReleaseError::io(format!("packages/{name}"), e))?;
                Package {
                    spec: s.spec,
                    fingerprint,
                    version,
                    sha256: sha256_hex(&archive),
                    archive: archive.into(),
                }
            }
            PackageInput::Vendored(lock) => {
                let (build, found) = builds.fetch(Kind::Package, &name, &lock.fingerprint, None)?;
                let entry = PackageEntry {
                    name: name.clone(),
                    version: build
                        .as_ref()
                        .map_or_else(|| lock.fingerprint.clone(), |b| b.version.clone()),
                    fingerprint: lock.fingerprint.clone(),
                    sha1: format!("sha256:{}", found.sha256),
                    dependencies: lock.dependencies.clone(),
                };
                package_from_archive(
                    &entry,
                    found.archive,
                    found.sha256,
                    &format!("packages/{name}/spec.lock"),
                    &budget,
                    warnings,
                )?
            }
        };
        packages.push(pkg);
    }
    Ok(packages)
}

/// Dependencies first, ties by name; a cycle is an error naming it.
pub(crate) fn topo_order(deps: &BTreeMap<&str, &[String]>) -> Result<Vec<String>, ReleaseError> {
    fn visit(
        name: &str,
        deps: &BTreeMap<&str, &[String]>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), ReleaseError> {
        if done.contains(name) {
            return Ok(());
        }
        if let Some(at) = path.iter().position(|p| p == name) {
            let mut cycle = path[at..].to_vec();
            cycle.push(name.to_string());
            return Err(ReleaseError::invalid(
                format!("packages/{name}/spec"),
                format!("dependency cycle: {}", cycle.join(" -> ")),
            ));
        }
        path.push(name.to_string());
        let mut ds: Vec<&String> = deps
            .get(name)
            .map(|d| d.iter().collect())
            .unwrap_or_default();
        ds.sort();
        for d in ds {
            visit(d, deps, done, path, out)?;
        }
        path.pop();
        done.insert(name.to_string());
        out.push(name.to_string());
        Ok(())
    }
    let mut done = BTreeSet::new();
    let mut out = Vec::new();
    for name in deps.keys() {
        visit(name, deps, &mut done, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// The files a package's globs select: each glob over `src/` and `blobs/`
/// (a path in both comes from `src/`), minus `excluded_files`.
fn select_files(
    spec: &PackageSpec,
    spec_file: &str,
    src: &BTreeMap<String, PathBuf>,
    blobs: &BTreeMap<String, PathBuf>,
    blobs_yml: &BTreeMap<String, Option<String>>,
) -> Result<BTreeMap<String, FileEntry>, ReleaseError> {
    let bad_glob = |g: &str, e: globset::Error| {
        ReleaseError::invalid(
            spec_file,
            format!("package '{}': invalid glob '{g}': {e}", spec.name),
        )
    };
    let excluded = glob_set(&spec.excluded_files).map_err(|e| bad_glob("excluded_files", e))?;
    let mut selected: BTreeMap<String, (&str, &PathBuf)> = BTreeMap::new();
    let candidates = || {
        let s = src.iter().map(|(r, p)| ("src", r, p));
        s.chain(blobs.iter().map(|(r, p)| ("blobs", r, p)))
    };
    for g in &spec.files {
        let m = glob(g).map_err(|e| bad_glob(g, e))?;
        let mut matched = false;
        for (origin, rel, path) in candidates() {
            if m.is_match(rel) {
                matched = true;
                // `src/` comes first, so it wins over `blobs/`.
                selected.entry(rel.clone()).or_insert((origin, path));
            }
        }
        if let Some(missing) = blobs_yml
            .keys()
            .find(|b| m.is_match(b) && !src.contains_key(*b) && !blobs.contains_key(*b))
        {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "package '{}': blob '{missing}' (config/blobs.yml) is not in blobs/; fetch it first (bosun sync-blobs)",
                    spec.name
                ),
            ));
        }
        if !matched {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "package '{}': files glob '{g}' matches no file in src/ or blobs/",
                    spec.name
                ),
            ));
        }
    }
    let mut out = BTreeMap::new();
    for (rel, (origin, path)) in selected {
        if excluded.is_match(&rel) {
            continue;
        }
        if rel == "packaging" || rel == "pre_packaging" {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "package '{}': a selected file is named '{rel}', which clashes with the {rel} script",
                    spec.name
                ),
            ));
        }
        let data = fs::read(path).map_err(|e| ReleaseError::io(format!("{origin}/{rel}"), e))?;
        if origin == "blobs" {
            if let Some(Some(sha)) = blobs_yml.get(&rel) {
                check_blob(&rel, sha, &data)?;
            }
        }
        out.insert(
            rel,
            FileEntry {
                data,
                executable: is_executable(path),
            },
        );
    }
    Ok(out)
}

/// A blob of `blobs/` against the digest `config/blobs.yml` records.
fn check_blob(rel: &str, recorded: &str, data: &[u8]) -> Result<(), ReleaseError> {
    let file = format!("blobs/{rel}");
    let (algo, hex) = digest::parse(recorded)
        .map_err(|m| ReleaseError::invalid("config/blobs.yml", format!("blob '{rel}': {m}")))?;
    let mut h = BothHasher::default();
    h.update(data);
    let (sha1, sha256) = h.finish();
    let got = match algo {
        DigestAlgorithm::Sha1 => sha1,
        DigestAlgorithm::Sha256 => sha256,
    };
    if got != hex {
        return Err(ReleaseError::integrity(
            file,
            format!("{} is {got}, config/blobs.yml says {recorded}", algo.name()),
        ));
    }
    Ok(())
}

fn read_jobs(
    dir: &Path,
    algo: DigestAlgorithm,
    builds: &Builds,
    packages: &[Package],
    warnings: &mut Vec<String>,
) -> Result<Vec<Job>, ReleaseError> {
    let known: BTreeSet<&str> = packages.iter().map(|p| p.spec.name.as_str()).collect();
    let mut jobs = Vec::new();
    for name in subdirs(&dir.join("jobs"), "jobs")? {
        let jdir = dir.join("jobs").join(&name);
        let spec_file = format!("jobs/{name}/spec");
        let spec_text = read_text(&jdir.join("spec"), &spec_file)?;
        let (spec, spec_warnings) = parse_job_spec_with_warnings(&spec_file, &spec_text)?;
        warnings.extend(spec_warnings);
        if spec.name != name {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "job name '{}' does not match its directory '{name}'",
                    spec.name
                ),
            ));
        }
        for p in &spec.packages {
            if !known.contains(p.as_str()) {
                return Err(ReleaseError::invalid(
                    spec_file,
                    format!(
                        "job '{name}' uses package '{p}', which is not a package of this release"
                    ),
                ));
            }
        }
        let mut files = BTreeMap::new();
        files.insert(
            "job.MF".to_string(),
            FileEntry {
                data: spec_text.into_bytes(),
                executable: is_executable(&jdir.join("spec")),
            },
        );
        let monit_path = jdir.join("monit");
        let monit = if monit_path.is_file() {
            let text = read_text(&monit_path, &format!("jobs/{name}/monit"))?;
            files.insert(
                "monit".to_string(),
                FileEntry {
                    data: text.clone().into_bytes(),
                    executable: is_executable(&monit_path),
                },
            );
            Some(text)
        } else {
            None
        };
        let schema = jdir.join("properties_schema.json");
        if schema.is_file() {
            let file = format!("jobs/{name}/properties_schema.json");
            let data = fs::read(&schema).map_err(|e| ReleaseError::io(file, e))?;
            files.insert(
                "properties_schema.json".to_string(),
                FileEntry {
                    data,
                    executable: is_executable(&schema),
                },
            );
        }
        let mut templates = BTreeMap::new();
        for src in spec.templates.keys() {
            let file = format!("jobs/{name}/templates/{src}");
            let path = jdir.join("templates").join(src);
            if !path.is_file() {
                return Err(ReleaseError::invalid(
                    file,
                    format!("job '{name}': template '{src}' listed in the spec does not exist"),
                ));
            }
            let text = read_text(&path, &file)?;
            files.insert(
                format!("templates/{src}"),
                FileEntry {
                    data: text.clone().into_bytes(),
                    executable: is_executable(&path),
                },
            );
            templates.insert(src.clone(), text);
        }
        let d = digests(&files);
        let fps = algorithms(algo).map(|a| job_fingerprint(a, &d));
        let (fingerprint, version) = fingerprint_and_version(builds, Kind::Job, &name, fps)?;
        let archive =
            job_archive(&files).map_err(|e| ReleaseError::io(format!("jobs/{name}"), e))?;
        jobs.push(Job {
            spec,
            fingerprint,
            version,
            templates,
            monit,
            sha256: sha256_hex(&archive),
            archive: archive.into(),
        });
    }
    Ok(jobs)
}

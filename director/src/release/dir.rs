//! Reading a BOSH-layout release directory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};

use super::archive::{
    job_archive, job_fingerprint, package_archive, package_fingerprint, sha256_hex, FileEntry,
};
use super::spec::{check_name, parse_job_spec, parse_package_spec, yaml_error};
use super::{
    Job, JobEntry, Package, PackageEntry, PackageSpec, Release, ReleaseError, ReleaseManifest,
};

/// Read a BOSH-layout release directory: name from `config/final.yml`
/// (`name`, else `final_name`), else the directory name; version = `version`
/// or `0+dev.<first 12 hex of a digest of all fingerprints>` (same source,
/// same version).
pub fn read_release_dir(dir: &Path, version: Option<&str>) -> Result<Release, ReleaseError> {
    read_dir_inner(dir, version).map_err(|e| e.in_release(dir))
}

fn read_dir_inner(dir: &Path, version: Option<&str>) -> Result<Release, ReleaseError> {
    if !dir.is_dir() {
        return Err(ReleaseError::io("", "not a directory"));
    }
    let name = release_name(dir)?;
    let packages = read_packages(dir)?;
    let jobs = read_jobs(dir, &packages)?;

    let version = match version {
        Some(v) if v.trim().is_empty() => {
            return Err(ReleaseError::invalid("", "the release version is empty"))
        }
        Some(v) => v.to_string(),
        None => dev_version(&jobs, &packages),
    };
    let manifest = ReleaseManifest {
        name,
        version,
        commit_hash: "unknown".to_string(),
        uncommitted_changes: false,
        jobs: jobs
            .iter()
            .map(|j| JobEntry {
                name: j.spec.name.clone(),
                version: j.fingerprint.clone(),
                fingerprint: j.fingerprint.clone(),
                sha256: j.sha256.clone(),
                packages: j.spec.packages.clone(),
            })
            .collect(),
        packages: packages
            .iter()
            .map(|p| PackageEntry {
                name: p.spec.name.clone(),
                version: p.fingerprint.clone(),
                fingerprint: p.fingerprint.clone(),
                sha256: p.sha256.clone(),
                dependencies: p.spec.dependencies.clone(),
            })
            .collect(),
    };
    Ok(Release {
        manifest,
        jobs,
        packages,
    })
}

fn dev_version(jobs: &[Job], packages: &[Package]) -> String {
    let mut listing = String::new();
    for j in jobs {
        listing.push_str(&format!("job {} {}\n", j.spec.name, j.fingerprint));
    }
    for p in packages {
        listing.push_str(&format!("package {} {}\n", p.spec.name, p.fingerprint));
    }
    let digest = sha256_hex(listing.as_bytes());
    format!("0+dev.{}", &digest[..12])
}

fn release_name(dir: &Path) -> Result<String, ReleaseError> {
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
    Ok(name)
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
    packaging: Vec<u8>,
    files: BTreeMap<String, FileEntry>,
}

fn read_packages(dir: &Path) -> Result<Vec<Package>, ReleaseError> {
    let names = subdirs(&dir.join("packages"), "packages")?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let src = list_files(&dir.join("src"), "src")?;
    let blobs = list_files(&dir.join("blobs"), "blobs")?;

    let mut sources: BTreeMap<String, PackageSource> = BTreeMap::new();
    for name in &names {
        let pdir = dir.join("packages").join(name);
        let spec_file = format!("packages/{name}/spec");
        if !pdir.join("spec").is_file() {
            let why = if pdir.join("spec.lock").is_file() {
                "vendored packages (spec.lock without spec) are not supported"
            } else {
                "missing package spec"
            };
            return Err(ReleaseError::invalid(spec_file, why));
        }
        let spec = parse_package_spec(&spec_file, &read_text(&pdir.join("spec"), &spec_file)?)?;
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
        let files = select_files(&spec, &spec_file, &src, &blobs)?;
        sources.insert(
            name.clone(),
            PackageSource {
                spec,
                packaging,
                files,
            },
        );
    }

    // Dependencies must exist and must not form a cycle.
    for s in sources.values() {
        for d in &s.spec.dependencies {
            if !sources.contains_key(d) {
                return Err(ReleaseError::invalid(
                    format!("packages/{}/spec", s.spec.name),
                    format!(
                        "package '{}' depends on '{d}', which is not a package of this release",
                        s.spec.name
                    ),
                ));
            }
        }
    }
    let deps: BTreeMap<&str, &[String]> = sources
        .iter()
        .map(|(n, s)| (n.as_str(), s.spec.dependencies.as_slice()))
        .collect();
    let order = topo_order(&deps)?;

    let mut fingerprints: BTreeMap<String, String> = BTreeMap::new();
    let mut packages = BTreeMap::new();
    for name in order {
        let Some(s) = sources.remove(&name) else {
            continue;
        };
        let dep_fps: BTreeMap<String, String> = s
            .spec
            .dependencies
            .iter()
            .filter_map(|d| fingerprints.get(d).map(|fp| (d.clone(), fp.clone())))
            .collect();
        let fingerprint = package_fingerprint(&name, &s.packaging, &s.files, &dep_fps);
        let archive = package_archive(&s.packaging, &s.files)
            .map_err(|e| ReleaseError::io(format!("packages/{name}"), e))?;
        fingerprints.insert(name.clone(), fingerprint.clone());
        packages.insert(
            name,
            Package {
                spec: s.spec,
                fingerprint,
                sha256: sha256_hex(&archive),
                archive: archive.into(),
            },
        );
    }
    Ok(packages.into_values().collect())
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
        if rel == "packaging" {
            return Err(ReleaseError::invalid(
                spec_file,
                format!(
                    "package '{}': a selected file is named 'packaging', which clashes with the packaging script",
                    spec.name
                ),
            ));
        }
        let data = fs::read(path).map_err(|e| ReleaseError::io(format!("{origin}/{rel}"), e))?;
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

fn read_jobs(dir: &Path, packages: &[Package]) -> Result<Vec<Job>, ReleaseError> {
    let known: BTreeSet<&str> = packages.iter().map(|p| p.spec.name.as_str()).collect();
    let mut jobs = Vec::new();
    for name in subdirs(&dir.join("jobs"), "jobs")? {
        let jdir = dir.join("jobs").join(&name);
        let spec_file = format!("jobs/{name}/spec");
        let spec_text = read_text(&jdir.join("spec"), &spec_file)?;
        let spec = parse_job_spec(&spec_file, &spec_text)?;
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
        let monit_path = jdir.join("monit");
        let monit = if monit_path.is_file() {
            Some(read_text(&monit_path, &format!("jobs/{name}/monit"))?)
        } else {
            None
        };
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
            templates.insert(src.clone(), read_text(&path, &file)?);
        }
        let fingerprint = job_fingerprint(&spec_text, monit.as_deref(), &templates);
        let archive = job_archive(&spec_text, monit.as_deref(), &templates)
            .map_err(|e| ReleaseError::io(format!("jobs/{name}"), e))?;
        jobs.push(Job {
            spec,
            fingerprint,
            templates,
            monit,
            sha256: sha256_hex(&archive),
            archive: archive.into(),
        });
    }
    Ok(jobs)
}

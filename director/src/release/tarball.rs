//! Release tarballs: `release.MF`, `jobs/<name>.tgz`, `packages/<name>.tgz`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use super::archive::{
    build_tgz, job_fingerprint, package_fingerprint, read_tgz, sha256_hex, FileEntry,
};
use super::dir::topo_order;
use super::spec::{check_name, parse_job_spec, parse_yaml};
use super::{Job, Package, PackageSpec, Release, ReleaseError, ReleaseManifest};

const MANIFEST: &str = "release.MF";

/// Write `release` as a deterministic tgz at `out` (via a temporary file
/// renamed into place).
pub fn write_tarball(release: &Release, out: &Path) -> Result<(), ReleaseError> {
    write_inner(release, out).map_err(|e| e.in_release(out))
}

fn write_inner(release: &Release, out: &Path) -> Result<(), ReleaseError> {
    let m = &release.manifest;
    let mut files = BTreeMap::new();
    let mut put = |path: String, data: Vec<u8>| {
        files.insert(
            path,
            FileEntry {
                data,
                executable: false,
            },
        )
    };
    if m.jobs.len() != release.jobs.len() || m.packages.len() != release.packages.len() {
        return Err(ReleaseError::invalid(
            MANIFEST,
            "the manifest and the release disagree on the jobs or packages",
        ));
    }
    for entry in &m.jobs {
        let job = release
            .job(&entry.name)
            .filter(|j| j.sha256 == entry.sha256 && j.fingerprint == entry.fingerprint)
            .ok_or_else(|| {
                ReleaseError::invalid(
                    MANIFEST,
                    format!("job '{}' does not match its manifest entry", entry.name),
                )
            })?;
        put(format!("jobs/{}.tgz", entry.name), job.archive.clone());
    }
    for entry in &m.packages {
        let pkg = release
            .package(&entry.name)
            .filter(|p| p.sha256 == entry.sha256 && p.fingerprint == entry.fingerprint)
            .ok_or_else(|| {
                ReleaseError::invalid(
                    MANIFEST,
                    format!("package '{}' does not match its manifest entry", entry.name),
                )
            })?;
        put(format!("packages/{}.tgz", entry.name), pkg.archive.clone());
    }
    let text =
        serde_yaml_ng::to_string(m).map_err(|e| ReleaseError::invalid(MANIFEST, e.to_string()))?;
    put(MANIFEST.to_string(), text.into_bytes());

    let tgz = build_tgz(&files).map_err(|e| ReleaseError::io("", e))?;
    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release.tgz".to_string());
    let tmp = out.with_file_name(format!(".{file_name}.tmp"));
    fs::write(&tmp, &tgz).map_err(|e| ReleaseError::io("", e))?;
    fs::rename(&tmp, out).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        ReleaseError::io("", e)
    })
}

/// Read a release tarball, verifying every archive's sha256 and every
/// recomputed fingerprint against `release.MF`.
pub fn read_tarball(path: &Path) -> Result<Release, ReleaseError> {
    let bytes = fs::read(path).map_err(|e| ReleaseError::io("", e).in_release(path))?;
    read_tarball_bytes(&bytes).map_err(|e| e.in_release(path))
}

fn read_tarball_bytes(bytes: &[u8]) -> Result<Release, ReleaseError> {
    let files = read_tgz(bytes).map_err(|m| ReleaseError::invalid("", m))?;
    let text = files
        .get(MANIFEST)
        .ok_or_else(|| ReleaseError::invalid(MANIFEST, "missing from the tarball"))?;
    let text = std::str::from_utf8(&text.data)
        .map_err(|_| ReleaseError::invalid(MANIFEST, "not valid UTF-8 text"))?;
    let manifest: ReleaseManifest = parse_yaml(MANIFEST, text)?;
    check_name("release name", &manifest.name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
    if manifest.version.trim().is_empty() {
        return Err(ReleaseError::invalid(
            MANIFEST,
            "the release version is empty",
        ));
    }

    // Packages: existence, dependencies, order.
    let mut seen = BTreeSet::new();
    for p in &manifest.packages {
        check_name("package name", &p.name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
        if !seen.insert(p.name.as_str()) {
            return Err(ReleaseError::invalid(
                MANIFEST,
                format!("package '{}' is listed twice", p.name),
            ));
        }
    }
    for p in &manifest.packages {
        for d in &p.dependencies {
            if !seen.contains(d.as_str()) {
                return Err(ReleaseError::invalid(
                    MANIFEST,
                    format!(
                        "package '{}' depends on '{d}', which is not a package of this release",
                        p.name
                    ),
                ));
            }
        }
    }
    let deps: BTreeMap<&str, &[String]> = manifest
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.dependencies.as_slice()))
        .collect();
    let order = topo_order(&deps).map_err(|e| ReleaseError {
        file: MANIFEST.into(),
        ..e
    })?;

    let mut fingerprints: BTreeMap<&str, &str> = BTreeMap::new();
    let mut packages = BTreeMap::new();
    for name in &order {
        let Some(entry) = manifest.packages.iter().find(|p| &p.name == name) else {
            continue;
        };
        let file = format!("packages/{name}.tgz");
        let archive = verified_archive(&files, &file, &entry.sha256)?;
        let mut contents = read_tgz(&archive).map_err(|m| ReleaseError::invalid(&file, m))?;
        let packaging = contents
            .remove("packaging")
            .ok_or_else(|| ReleaseError::invalid(&file, "no packaging script in the archive"))?;
        let dep_fps: BTreeMap<String, String> = entry
            .dependencies
            .iter()
            .filter_map(|d| {
                fingerprints
                    .get(d.as_str())
                    .map(|fp| (d.clone(), fp.to_string()))
            })
            .collect();
        let fingerprint = package_fingerprint(name, &packaging.data, &contents, &dep_fps);
        if fingerprint != entry.fingerprint {
            return Err(ReleaseError::integrity(
                &file,
                format!(
                    "package '{name}' has fingerprint {fingerprint}, release.MF says {}",
                    entry.fingerprint
                ),
            ));
        }
        fingerprints.insert(entry.name.as_str(), entry.fingerprint.as_str());
        packages.insert(
            name.clone(),
            Package {
                spec: PackageSpec {
                    name: name.clone(),
                    dependencies: entry.dependencies.clone(),
                    files: contents.keys().cloned().collect(),
                    excluded_files: Vec::new(),
                },
                fingerprint,
                sha256: entry.sha256.clone(),
                archive,
            },
        );
    }

    let mut jobs = BTreeMap::new();
    for entry in &manifest.jobs {
        let name = &entry.name;
        check_name("job name", name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
        let file = format!("jobs/{name}.tgz");
        let archive = verified_archive(&files, &file, &entry.sha256)?;
        let mut contents = read_tgz(&archive).map_err(|m| ReleaseError::invalid(&file, m))?;
        let text_of = |e: FileEntry, what: &str| {
            String::from_utf8(e.data)
                .map_err(|_| ReleaseError::invalid(&file, format!("{what} is not valid UTF-8")))
        };
        let spec_text = match contents.remove("job.MF") {
            Some(e) => text_of(e, "job.MF")?,
            None => return Err(ReleaseError::invalid(&file, "no job.MF in the archive")),
        };
        let spec = parse_job_spec(&format!("{file}:job.MF"), &spec_text)?;
        if spec.name != *name {
            return Err(ReleaseError::invalid(
                &file,
                format!("job.MF names job '{}', release.MF says '{name}'", spec.name),
            ));
        }
        if spec.packages != entry.packages {
            return Err(ReleaseError::invalid(
                &file,
                format!("job '{name}': packages in job.MF differ from release.MF"),
            ));
        }
        for p in &spec.packages {
            if !packages.contains_key(p) {
                return Err(ReleaseError::invalid(
                    &file,
                    format!(
                        "job '{name}' uses package '{p}', which is not a package of this release"
                    ),
                ));
            }
        }
        let monit = match contents.remove("monit") {
            Some(e) => Some(text_of(e, "monit")?),
            None => None,
        };
        let mut templates = BTreeMap::new();
        for src in spec.templates.keys() {
            let e = contents
                .remove(&format!("templates/{src}"))
                .ok_or_else(|| {
                    ReleaseError::invalid(
                        &file,
                        format!("job '{name}': template '{src}' is missing"),
                    )
                })?;
            templates.insert(src.clone(), text_of(e, src)?);
        }
        let fingerprint = job_fingerprint(&spec_text, monit.as_deref(), &templates);
        if fingerprint != entry.fingerprint {
            return Err(ReleaseError::integrity(
                &file,
                format!(
                    "job '{name}' has fingerprint {fingerprint}, release.MF says {}",
                    entry.fingerprint
                ),
            ));
        }
        let job = Job {
            spec,
            fingerprint,
            templates,
            monit,
            sha256: entry.sha256.clone(),
            archive,
        };
        if jobs.insert(name.clone(), job).is_some() {
            return Err(ReleaseError::invalid(
                MANIFEST,
                format!("job '{name}' is listed twice"),
            ));
        }
    }

    Ok(Release {
        manifest,
        jobs: jobs.into_values().collect(),
        packages: packages.into_values().collect(),
    })
}

/// The archive at `file` inside the tarball, after checking its sha256.
fn verified_archive(
    files: &BTreeMap<String, FileEntry>,
    file: &str,
    expected: &str,
) -> Result<Vec<u8>, ReleaseError> {
    let entry = files.get(file).ok_or_else(|| {
        ReleaseError::invalid(file, "listed in release.MF but missing from the tarball")
    })?;
    let actual = sha256_hex(&entry.data);
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(ReleaseError::integrity(
            file,
            format!("sha256 is {actual}, release.MF says {expected}"),
        ));
    }
    Ok(entry.data.clone())
}

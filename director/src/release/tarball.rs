//! Release tarballs: `release.MF`, `jobs/<name>.tgz`, `packages/<name>.tgz`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use super::archive::{
    job_fingerprint, package_fingerprint_of_digests, walk_tgz, write_tgz, ArchiveData, FileDigest,
    TgzEntry, WalkError,
};
use super::dir::topo_order;
use super::spec::{check_name, parse_job_spec, parse_yaml};
use super::{
    Job, JobEntry, Package, PackageSpec, Release, ReleaseError, ReleaseErrorKind, ReleaseManifest,
};
use crate::archive_limits::{ArchiveLimits, Budget};

const MANIFEST: &str = "release.MF";

/// Write `release` as a deterministic tgz at `out` (via a temporary file
/// renamed into place).
pub fn write_tarball(release: &Release, out: &Path) -> Result<(), ReleaseError> {
    write_inner(release, out).map_err(|e| e.in_release(out))
}

/// What goes into a release tarball at one path.
enum Member<'a> {
    Archive(&'a ArchiveData),
    Text(String),
}

fn write_inner(release: &Release, out: &Path) -> Result<(), ReleaseError> {
    let m = &release.manifest;
    let mut members: BTreeMap<String, Member<'_>> = BTreeMap::new();
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
        members.insert(
            format!("jobs/{}.tgz", entry.name),
            Member::Archive(&job.archive),
        );
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
        members.insert(
            format!("packages/{}.tgz", entry.name),
            Member::Archive(&pkg.archive),
        );
    }
    let text =
        serde_yaml_ng::to_string(m).map_err(|e| ReleaseError::invalid(MANIFEST, e.to_string()))?;
    members.insert(MANIFEST.to_string(), Member::Text(text));

    let file_name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "release.tgz".to_string());
    let tmp = out.with_file_name(format!(".{file_name}.tmp"));
    let written = File::create(&tmp).and_then(|f| {
        let entries = members.iter().map(|(path, member)| {
            let (size, content): (u64, Box<dyn Read + '_>) = match member {
                Member::Archive(a) => (a.len(), a.open()?),
                Member::Text(t) => (t.len() as u64, Box::new(t.as_bytes())),
            };
            Ok(TgzEntry {
                path,
                size,
                executable: false,
                content,
            })
        });
        let mut w = write_tgz(BufWriter::new(f), entries)?;
        w.flush()?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    });
    let result = written.and_then(|()| fs::rename(&tmp, out));
    result.map_err(|e| {
        // Best effort: the error being reported matters more than the leftover.
        let _ = fs::remove_file(&tmp);
        ReleaseError::io("", e)
    })
}

/// The limits of [`ArchiveLimits::from_env`], a bad setting reported
/// against the tarball being read.
pub(crate) fn limits_from_env(path: &Path) -> Result<ArchiveLimits, ReleaseError> {
    ArchiveLimits::from_env()
        .map_err(|e| ReleaseError::new(ReleaseErrorKind::Limit, "", e.to_string()).in_release(path))
}

/// Read a release tarball, verifying every archive's sha256 and every
/// recomputed fingerprint against `release.MF`, within the limits of
/// [`ArchiveLimits::from_env`].
pub fn read_tarball(path: &Path) -> Result<Release, ReleaseError> {
    let limits = limits_from_env(path)?;
    read_tarball_with_limits(path, &limits, None)
}

/// [`read_tarball`] within `limits`. The tarball is streamed: `release.MF`
/// and the jobs' text files are read into memory (each up to a fixed size),
/// job and package archives go to temporary files in `scratch_dir` (created
/// if needed; default: the system's temporary directory), and the files
/// inside package archives are only hashed.
pub fn read_tarball_with_limits(
    path: &Path,
    limits: &ArchiveLimits,
    scratch_dir: Option<&Path>,
) -> Result<Release, ReleaseError> {
    if let Some(dir) = scratch_dir {
        fs::create_dir_all(dir).map_err(|e| {
            ReleaseError::io("", format!("creating {}: {e}", dir.display())).in_release(path)
        })?;
    }
    read_inner(path, limits, scratch_dir).map_err(|e| e.in_release(path))
}

/// Longest `release.MF` read (it is held in memory).
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Longest `job.MF`, `monit` or template read (they are held in memory).
const MAX_JOB_FILE_BYTES: u64 = 64 << 20;

/// A job or package archive copied out of the tarball, with its sha256.
struct Spooled {
    data: ArchiveData,
    sha256: String,
}

/// `file` (inside the release) for a walk that stopped.
fn walk_error(file: &str, e: WalkError) -> ReleaseError {
    match e {
        WalkError::Limit(l) => ReleaseError::new(ReleaseErrorKind::Limit, file, l.to_string()),
        WalkError::Invalid(m) => ReleaseError::invalid(file, m),
        WalkError::Io(m) => ReleaseError::io(file, m),
    }
}

/// `jobs/<name>.tgz` or `packages/<name>.tgz`.
fn is_member_archive(path: &str) -> bool {
    ["jobs/", "packages/"].iter().any(|dir| {
        path.strip_prefix(dir)
            .and_then(|rest| rest.strip_suffix(".tgz"))
            .is_some_and(|name| !name.is_empty() && !name.contains('/'))
    })
}

/// All of `content` (an entry named `name`), refused past `max` bytes.
fn read_capped(content: &mut dyn Read, max: u64, name: &str) -> Result<Vec<u8>, WalkError> {
    let mut data = Vec::new();
    content
        .take(max + 1)
        .read_to_end(&mut data)
        .map_err(|e| WalkError::Invalid(format!("entry '{name}': {e}")))?;
    if data.len() as u64 > max {
        return Err(WalkError::Invalid(format!(
            "entry '{name}' is larger than {} MiB (it is read into memory)",
            max >> 20
        )));
    }
    Ok(data)
}

/// Copies `content` (an entry named `name`) to a new temporary file,
/// hashing it on the way.
fn spool(content: &mut dyn Read, name: &str, dir: Option<&Path>) -> Result<Spooled, WalkError> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".bosun-release-");
    let tmp = match dir {
        Some(dir) => builder.tempfile_in(dir),
        None => builder.tempfile(),
    }
    .map_err(|e| WalkError::Io(format!("creating a temporary file for '{name}': {e}")))?;
    let mut out = BufWriter::new(tmp.as_file());
    let mut hasher = Sha256::new();
    // Refuse what cannot be a tgz before copying any of it.
    let mut magic = [0u8; 2];
    match content.read_exact(&mut magic) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => magic = [0, 0],
        Err(e) => return Err(WalkError::Invalid(format!("entry '{name}': {e}"))),
    }
    if magic != [0x1f, 0x8b] {
        return Err(WalkError::Invalid(format!(
            "entry '{name}' is not a gzipped archive"
        )));
    }
    hasher.update(magic);
    let write_err =
        |e: io::Error| WalkError::Io(format!("copying '{name}' to {}: {e}", tmp.path().display()));
    out.write_all(&magic).map_err(write_err)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut len = magic.len() as u64;
    loop {
        let n = content
            .read(&mut buf)
            .map_err(|e| WalkError::Invalid(format!("entry '{name}': {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(write_err)?;
        len += n as u64;
    }
    out.flush().map_err(write_err)?;
    drop(out);
    Ok(Spooled {
        data: ArchiveData::from_temp_file(tmp.into_temp_path(), len),
        sha256: hex::encode(hasher.finalize()),
    })
}

/// The sha256 of `packaging` and the digest of every other file of the
/// package archive `archive` (at `file` in the release).
fn package_digests(
    archive: &ArchiveData,
    file: &str,
    budget: &Budget,
) -> Result<(Option<String>, BTreeMap<String, FileDigest>), ReleaseError> {
    let input = archive
        .open()
        .map_err(|e| ReleaseError::io(file, format!("reopening the archive: {e}")))?;
    let mut packaging = None;
    let mut files = BTreeMap::new();
    walk_tgz(input, budget, |path, executable, content| {
        let mut hasher = Sha256::new();
        io::copy(content, &mut hasher)
            .map_err(|e| WalkError::Invalid(format!("entry '{path}': {e}")))?;
        let sha256 = hex::encode(hasher.finalize());
        if path == "packaging" {
            packaging = Some(sha256);
        } else {
            files.insert(path.to_string(), FileDigest { executable, sha256 });
        }
        Ok(())
    })
    .map_err(|e| walk_error(file, e))?;
    Ok((packaging, files))
}

/// `job.MF`, `monit` and `templates/*` of the job archive `archive` (at
/// `file` in the release); its other files are skipped.
fn job_files(
    archive: &ArchiveData,
    file: &str,
    budget: &Budget,
) -> Result<BTreeMap<String, Vec<u8>>, ReleaseError> {
    let input = archive
        .open()
        .map_err(|e| ReleaseError::io(file, format!("reopening the archive: {e}")))?;
    let mut out = BTreeMap::new();
    walk_tgz(input, budget, |path, _, content| {
        if path == "job.MF" || path == "monit" || path.starts_with("templates/") {
            out.insert(
                path.to_string(),
                read_capped(content, MAX_JOB_FILE_BYTES, path)?,
            );
        }
        Ok(())
    })
    .map_err(|e| walk_error(file, e))?;
    Ok(out)
}

/// Reads and verifies a release tarball: its manifest, then its packages
/// in dependency order, then its jobs.
fn read_inner(
    path: &Path,
    limits: &ArchiveLimits,
    scratch_dir: Option<&Path>,
) -> Result<Release, ReleaseError> {
    let budget = Budget::new(*limits);
    let (manifest_bytes, archives) = read_members(path, &budget, scratch_dir)?;
    let manifest = parse_release_manifest(manifest_bytes)?;
    let order = package_order(&manifest)?;
    let packages = read_packages(&manifest, &order, &archives, &budget)?;
    let mut jobs = BTreeMap::new();
    for entry in &manifest.jobs {
        let job = read_job(entry, &archives, &budget, &packages)?;
        if jobs.insert(entry.name.clone(), job).is_some() {
            return Err(ReleaseError::invalid(
                MANIFEST,
                format!("job '{}' is listed twice", entry.name),
            ));
        }
    }
    Ok(Release {
        manifest,
        jobs: jobs.into_values().collect(),
        packages: packages.into_values().collect(),
    })
}

/// What a release tarball holds: `release.MF`'s bytes and the member
/// archives by path.
type Members = (Option<Vec<u8>>, BTreeMap<String, Spooled>);

/// Walks the tarball once: `release.MF`'s bytes (when there) and every
/// job and package archive, spooled (to `scratch_dir` or the temp dir).
fn read_members(
    path: &Path,
    budget: &Budget,
    scratch_dir: Option<&Path>,
) -> Result<Members, ReleaseError> {
    let input = File::open(path).map_err(|e| ReleaseError::io("", e))?;
    let mut manifest_bytes = None;
    let mut archives: BTreeMap<String, Spooled> = BTreeMap::new();
    walk_tgz(BufReader::new(input), budget, |name, _, content| {
        if name == MANIFEST {
            manifest_bytes = Some(read_capped(content, MAX_MANIFEST_BYTES, name)?);
        } else if is_member_archive(name) {
            archives.insert(name.to_string(), spool(content, name, scratch_dir)?);
        }
        Ok(())
    })
    .map_err(|e| walk_error("", e))?;
    Ok((manifest_bytes, archives))
}

/// `release.MF` from its bytes: present, UTF-8 YAML, with a valid release
/// name and a non-empty version.
fn parse_release_manifest(bytes: Option<Vec<u8>>) -> Result<ReleaseManifest, ReleaseError> {
    let text = bytes.ok_or_else(|| ReleaseError::invalid(MANIFEST, "missing from the tarball"))?;
    let text = std::str::from_utf8(&text)
        .map_err(|_| ReleaseError::invalid(MANIFEST, "not valid UTF-8 text"))?;
    let manifest: ReleaseManifest = parse_yaml(MANIFEST, text)?;
    check_name("release name", &manifest.name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
    if manifest.version.trim().is_empty() {
        return Err(ReleaseError::invalid(
            MANIFEST,
            "the release version is empty",
        ));
    }
    Ok(manifest)
}

/// The manifest's packages in dependency order (deps first), after
/// checking each name is valid and listed once and every dependency is a
/// package of the release.
fn package_order(manifest: &ReleaseManifest) -> Result<Vec<String>, ReleaseError> {
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
    topo_order(&deps).map_err(|e| ReleaseError {
        file: MANIFEST.into(),
        ..e
    })
}

/// Every package, in `order`: its archive's sha256 checked, a packaging
/// script present, and its fingerprint (over its files and its
/// dependencies' fingerprints) equal to the manifest's.
fn read_packages(
    manifest: &ReleaseManifest,
    order: &[String],
    archives: &BTreeMap<String, Spooled>,
    budget: &Budget,
) -> Result<BTreeMap<String, Package>, ReleaseError> {
    let mut fingerprints: BTreeMap<&str, &str> = BTreeMap::new();
    let mut packages = BTreeMap::new();
    for name in order {
        let Some(entry) = manifest.packages.iter().find(|p| &p.name == name) else {
            continue;
        };
        let file = format!("packages/{name}.tgz");
        let archive = verified_archive(archives, &file, &entry.sha256)?;
        let (packaging, contents) = package_digests(&archive, &file, budget)?;
        let packaging = packaging
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
        let fingerprint = package_fingerprint_of_digests(name, &packaging, &contents, &dep_fps);
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
    Ok(packages)
}

/// One job: a valid name, its archive's sha256 checked, a `job.MF` that
/// agrees with the manifest on name and packages (all of this release),
/// every template present, all text UTF-8, and its fingerprint equal to
/// the manifest's.
fn read_job(
    entry: &JobEntry,
    archives: &BTreeMap<String, Spooled>,
    budget: &Budget,
    packages: &BTreeMap<String, Package>,
) -> Result<Job, ReleaseError> {
    let name = &entry.name;
    check_name("job name", name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
    let file = format!("jobs/{name}.tgz");
    let archive = verified_archive(archives, &file, &entry.sha256)?;
    let mut contents = job_files(&archive, &file, budget)?;
    let text_of = |data: Vec<u8>, what: &str| {
        String::from_utf8(data)
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
                format!("job '{name}' uses package '{p}', which is not a package of this release"),
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
                ReleaseError::invalid(&file, format!("job '{name}': template '{src}' is missing"))
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
    Ok(Job {
        spec,
        fingerprint,
        templates,
        monit,
        sha256: entry.sha256.clone(),
        archive,
    })
}

/// The archive at `file` inside the tarball, after checking its sha256.
fn verified_archive(
    archives: &BTreeMap<String, Spooled>,
    file: &str,
    expected: &str,
) -> Result<ArchiveData, ReleaseError> {
    let entry = archives.get(file).ok_or_else(|| {
        ReleaseError::invalid(file, "listed in release.MF but missing from the tarball")
    })?;
    if !entry.sha256.eq_ignore_ascii_case(expected) {
        return Err(ReleaseError::integrity(
            file,
            format!("sha256 is {}, release.MF says {expected}", entry.sha256),
        ));
    }
    Ok(entry.data.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_with(packages: &str) -> ReleaseManifest {
        let text = format!(
            "name: r\nversion: '1'\ncommit_hash: x\nuncommitted_changes: false\njobs: []\npackages:\n{packages}"
        );
        parse_release_manifest(Some(text.into_bytes())).unwrap()
    }

    fn package(name: &str, deps: &str) -> String {
        format!(
            "- {{name: {name}, version: '1', fingerprint: f, sha256: s, dependencies: [{deps}]}}\n"
        )
    }

    #[test]
    fn parse_release_manifest_wants_the_file_and_a_version() {
        let missing = parse_release_manifest(None).unwrap_err();
        assert!(
            missing.to_string().contains("missing from the tarball"),
            "{missing}"
        );
        let text = "name: r\nversion: ' '\ncommit_hash: x\nuncommitted_changes: false\njobs: []\npackages: []\n";
        let empty = parse_release_manifest(Some(text.as_bytes().to_vec())).unwrap_err();
        assert!(
            empty.to_string().contains("the release version is empty"),
            "{empty}"
        );
    }

    #[test]
    fn package_order_puts_dependencies_first_and_rejects_unknown_ones() {
        let m = manifest_with(&(package("app", "lib") + &package("lib", "")));
        assert_eq!(package_order(&m).unwrap(), vec!["lib", "app"]);
        let m = manifest_with(&package("app", "nowhere"));
        let e = package_order(&m).unwrap_err();
        assert!(e.to_string().contains("depends on 'nowhere'"), "{e}");
        let m = manifest_with(&(package("app", "") + &package("app", "")));
        let e = package_order(&m).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }
}

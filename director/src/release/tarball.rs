//! Release tarballs as BOSH has them: `release.MF`, `jobs/<name>.tgz`,
//! `packages/<name>.tgz`, `compiled_packages/<name>.tgz`, `license.tgz`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

use super::archive::{
    job_fingerprint, license_fingerprint, package_fingerprint, walk_tgz, write_tgz, ArchiveData,
    BothHasher, DigestAlgorithm, FileDigest, TgzEntry, WalkError,
};
use super::dir::topo_order;
use super::spec::{check_name, parse_job_spec_with_warnings, parse_yaml};
use super::{
    digest, CompiledPackage, Job, JobEntry, License, LicenseEntry, Package, PackageEntry,
    PackageSpec, Release, ReleaseError, ReleaseErrorKind, ReleaseManifest,
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
    let mut m = release.manifest.clone();
    let mut members: BTreeMap<String, Member<'_>> = BTreeMap::new();
    if m.jobs.len() != release.jobs.len()
        || m.packages.len() != release.packages.len()
        || m.compiled_packages.len() != release.compiled_packages.len()
        || m.license.is_some() != release.license.is_some()
    {
        return Err(ReleaseError::invalid(
            MANIFEST,
            "the manifest and the release disagree on the jobs, packages or license",
        ));
    }
    let mismatch = |what: String| {
        ReleaseError::invalid(
            MANIFEST,
            format!("{what} does not match its manifest entry"),
        )
    };
    for entry in &mut m.jobs {
        let job = release
            .job(&entry.name)
            .filter(|j| j.fingerprint == entry.fingerprint)
            .ok_or_else(|| mismatch(format!("job '{}'", entry.name)))?;
        entry.sha1 = format!("sha256:{}", job.sha256);
        members.insert(
            format!("jobs/{}.tgz", entry.name),
            Member::Archive(&job.archive),
        );
    }
    for entry in &mut m.packages {
        let pkg = release
            .package(&entry.name)
            .filter(|p| p.fingerprint == entry.fingerprint)
            .ok_or_else(|| mismatch(format!("package '{}'", entry.name)))?;
        entry.sha1 = format!("sha256:{}", pkg.sha256);
        members.insert(
            format!("packages/{}.tgz", entry.name),
            Member::Archive(&pkg.archive),
        );
    }
    for entry in &mut m.compiled_packages {
        let pkg = release
            .compiled_packages
            .iter()
            .find(|c| c.name == entry.name && c.stemcell == entry.stemcell)
            .filter(|c| c.fingerprint == entry.fingerprint)
            .ok_or_else(|| mismatch(format!("compiled package '{}'", entry.name)))?;
        entry.sha1 = format!("sha256:{}", pkg.sha256);
        let path = format!("compiled_packages/{}.tgz", entry.name);
        if members
            .insert(path, Member::Archive(&pkg.archive))
            .is_some()
        {
            return Err(ReleaseError::invalid(
                MANIFEST,
                format!(
                    "compiled package '{}' is listed for more than one stemcell",
                    entry.name
                ),
            ));
        }
    }
    if let (Some(entry), Some(license)) = (&mut m.license, &release.license) {
        if license.fingerprint != entry.fingerprint {
            return Err(mismatch("the license".to_string()));
        }
        entry.sha1 = format!("sha256:{}", license.sha256);
        members.insert("license.tgz".to_string(), Member::Archive(&license.archive));
    }
    let text =
        serde_yaml_ng::to_string(&m).map_err(|e| ReleaseError::invalid(MANIFEST, e.to_string()))?;
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

/// A job or package archive copied out of the tarball, with its digests.
struct Spooled {
    data: ArchiveData,
    sha1: String,
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

/// `jobs/<name>.tgz`, `packages/<name>.tgz`, `compiled_packages/<name>.tgz`
/// or `license.tgz`.
fn is_member_archive(path: &str) -> bool {
    path == "license.tgz"
        || ["jobs/", "packages/", "compiled_packages/"]
            .iter()
            .any(|dir| {
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
    let mut hasher = BothHasher::default();
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
    hasher.update(&magic);
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
    let (sha1, sha256) = hasher.finish();
    Ok(Spooled {
        data: ArchiveData::from_temp_file(tmp.into_temp_path(), len),
        sha1,
        sha256,
    })
}

/// The digest of every file of the archive `archive` (at `file` in the
/// release), `packaging` included.
pub(crate) fn archive_digests(
    archive: &ArchiveData,
    file: &str,
    budget: &Budget,
) -> Result<BTreeMap<String, FileDigest>, ReleaseError> {
    let input = archive
        .open()
        .map_err(|e| ReleaseError::io(file, format!("reopening the archive: {e}")))?;
    let mut files = BTreeMap::new();
    walk_tgz(input, budget, |path, executable, content| {
        let mut hasher = BothHasher::default();
        io::copy(content, &mut hasher)
            .map_err(|e| WalkError::Invalid(format!("entry '{path}': {e}")))?;
        files.insert(path.to_string(), hasher.finish_file(executable));
        Ok(())
    })
    .map_err(|e| walk_error(file, e))?;
    Ok(files)
}

/// `job.MF`, `monit`, `properties_schema.json` and `templates/*` of the job
/// archive `archive` (at `file` in the release), with their executable
/// bits; its other files are skipped.
fn job_files(
    archive: &ArchiveData,
    file: &str,
    budget: &Budget,
) -> Result<BTreeMap<String, (Vec<u8>, bool)>, ReleaseError> {
    let input = archive
        .open()
        .map_err(|e| ReleaseError::io(file, format!("reopening the archive: {e}")))?;
    let mut out = BTreeMap::new();
    walk_tgz(input, budget, |path, executable, content| {
        if JOB_FILES.contains(&path) || path.starts_with("templates/") {
            out.insert(
                path.to_string(),
                (read_capped(content, MAX_JOB_FILE_BYTES, path)?, executable),
            );
        }
        Ok(())
    })
    .map_err(|e| walk_error(file, e))?;
    Ok(out)
}

/// The files at the top of a job archive that make its fingerprint.
const JOB_FILES: &[&str] = &["job.MF", "monit", "properties_schema.json"];

/// Reads and verifies a release tarball: its manifest, then its packages
/// in dependency order, its compiled packages, its jobs and its license.
fn read_inner(
    path: &Path,
    limits: &ArchiveLimits,
    scratch_dir: Option<&Path>,
) -> Result<Release, ReleaseError> {
    let budget = Budget::new(*limits);
    let (manifest_bytes, archives) = read_members(path, &budget, scratch_dir)?;
    let manifest = parse_release_manifest(manifest_bytes)?;
    let order = package_order(&manifest)?;
    let mut warnings = Vec::new();
    let mut packages = BTreeMap::new();
    for name in &order {
        let Some(entry) = manifest.packages.iter().find(|p| &p.name == name) else {
            continue;
        };
        let file = format!("packages/{name}.tgz");
        let (archive, sha256) = verified_archive(&archives, &file, &entry.sha1)?;
        let pkg = package_from_archive(entry, archive, sha256, &file, &budget, &mut warnings)?;
        packages.insert(name.clone(), pkg);
    }
    let mut compiled = Vec::new();
    for entry in &manifest.compiled_packages {
        check_name("compiled package name", &entry.name)
            .map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
        let file = format!("compiled_packages/{}.tgz", entry.name);
        let (archive, sha256) = verified_archive(&archives, &file, &entry.sha1)?;
        compiled.push(CompiledPackage {
            name: entry.name.clone(),
            version: entry.version.clone(),
            fingerprint: entry.fingerprint.clone(),
            stemcell: entry.stemcell.clone(),
            dependencies: entry.dependencies.clone(),
            archive,
            sha256,
        });
    }
    compiled.sort_by(|a, b| (&a.name, &a.stemcell).cmp(&(&b.name, &b.stemcell)));
    let known: BTreeSet<String> = packages
        .keys()
        .cloned()
        .chain(compiled.iter().map(|c| c.name.clone()))
        .collect();
    let mut jobs = BTreeMap::new();
    for entry in &manifest.jobs {
        check_name("job name", &entry.name).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
        let file = format!("jobs/{}.tgz", entry.name);
        let (archive, sha256) = verified_archive(&archives, &file, &entry.sha1)?;
        let job = job_from_archive(
            entry,
            archive,
            sha256,
            &file,
            &budget,
            &known,
            &mut warnings,
        )?;
        if job.spec.packages != entry.packages {
            return Err(ReleaseError::invalid(
                &file,
                format!(
                    "job '{}': packages in job.MF differ from release.MF",
                    entry.name
                ),
            ));
        }
        if jobs.insert(entry.name.clone(), job).is_some() {
            return Err(ReleaseError::invalid(
                MANIFEST,
                format!("job '{}' is listed twice", entry.name),
            ));
        }
    }
    let license = match &manifest.license {
        Some(entry) => {
            let file = "license.tgz";
            let (archive, sha256) = verified_archive(&archives, file, &entry.sha1)?;
            Some(license_from_archive(
                entry,
                archive,
                sha256,
                file,
                &budget,
                &mut warnings,
            )?)
        }
        None => None,
    };
    Ok(Release {
        manifest,
        jobs: jobs.into_values().collect(),
        packages: packages.into_values().collect(),
        compiled_packages: compiled,
        license,
        warnings,
    })
}

/// A warning unless `recomputed` (made with the algorithm the recorded
/// fingerprint's length implies) equals `recorded`. BOSH itself does not
/// recompute fingerprints of uploaded archives (their digests are checked),
/// and fingerprints of releases made before v2 fingerprints cannot be
/// recomputed, so a difference is reported, not refused.
fn check_fingerprint(
    what: &str,
    file: &str,
    recorded: &str,
    recompute: impl FnOnce(DigestAlgorithm) -> String,
    warnings: &mut Vec<String>,
) {
    match DigestAlgorithm::of_fingerprint(recorded) {
        Some(algo) => {
            let recomputed = recompute(algo);
            if recomputed != recorded.to_ascii_lowercase() {
                warnings.push(format!(
                    "{file}: {what} has fingerprint {recomputed}, release.MF says {recorded} (kept)"
                ));
            }
        }
        None => warnings.push(format!(
            "{file}: {what}: fingerprint {recorded} is not a v2 fingerprint and was not checked"
        )),
    }
}

/// A package from its (verified) archive: a packaging script present, its
/// fingerprint compared with the recorded one.
pub(crate) fn package_from_archive(
    entry: &PackageEntry,
    archive: ArchiveData,
    sha256: String,
    file: &str,
    budget: &Budget,
    warnings: &mut Vec<String>,
) -> Result<Package, ReleaseError> {
    let name = &entry.name;
    let contents = archive_digests(&archive, file, budget)?;
    if !contents.contains_key("packaging") {
        return Err(ReleaseError::invalid(
            file,
            "no packaging script in the archive",
        ));
    }
    check_fingerprint(
        &format!("package '{name}'"),
        file,
        &entry.fingerprint,
        |algo| package_fingerprint(algo, &contents, &entry.dependencies),
        warnings,
    );
    Ok(Package {
        spec: PackageSpec {
            name: name.clone(),
            dependencies: entry.dependencies.clone(),
            files: contents
                .keys()
                .filter(|p| *p != "packaging" && *p != "pre_packaging")
                .cloned()
                .collect(),
            excluded_files: Vec::new(),
        },
        fingerprint: entry.fingerprint.clone(),
        version: entry.version.clone(),
        sha256,
        archive,
    })
}

/// The license from its (verified) archive.
pub(crate) fn license_from_archive(
    entry: &LicenseEntry,
    archive: ArchiveData,
    sha256: String,
    file: &str,
    budget: &Budget,
    warnings: &mut Vec<String>,
) -> Result<License, ReleaseError> {
    let contents = archive_digests(&archive, file, budget)?;
    check_fingerprint(
        "the license",
        file,
        &entry.fingerprint,
        |algo| license_fingerprint(algo, &contents),
        warnings,
    );
    Ok(License {
        fingerprint: entry.fingerprint.clone(),
        version: entry.version.clone(),
        archive,
        sha256,
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

/// A job from its (verified) archive: a `job.MF` naming it, using only
/// `known` packages, every template present, all text UTF-8, and its
/// fingerprint compared with the recorded one.
pub(crate) fn job_from_archive(
    entry: &JobEntry,
    archive: ArchiveData,
    sha256: String,
    file: &str,
    budget: &Budget,
    known: &BTreeSet<String>,
    warnings: &mut Vec<String>,
) -> Result<Job, ReleaseError> {
    let name = &entry.name;
    let contents = job_files(&archive, file, budget)?;
    let text_of = |data: &[u8], what: &str| {
        String::from_utf8(data.to_vec())
            .map_err(|_| ReleaseError::invalid(file, format!("{what} is not valid UTF-8")))
    };
    let spec_text = match contents.get("job.MF") {
        Some((data, _)) => text_of(data, "job.MF")?,
        None => return Err(ReleaseError::invalid(file, "no job.MF in the archive")),
    };
    let (spec, spec_warnings) =
        parse_job_spec_with_warnings(&format!("{file}:job.MF"), &spec_text)?;
    warnings.extend(spec_warnings);
    if spec.name != *name {
        return Err(ReleaseError::invalid(
            file,
            format!("job.MF names job '{}', release.MF says '{name}'", spec.name),
        ));
    }
    for p in &spec.packages {
        if !known.contains(p) {
            return Err(ReleaseError::invalid(
                file,
                format!("job '{name}' uses package '{p}', which is not a package of this release"),
            ));
        }
    }
    let monit = match contents.get("monit") {
        Some((data, _)) => Some(text_of(data, "monit")?),
        None => None,
    };
    let mut templates = BTreeMap::new();
    let mut fingerprinted = BTreeMap::new();
    for top in JOB_FILES {
        if let Some((data, exec)) = contents.get(*top) {
            fingerprinted.insert(top.to_string(), FileDigest::of(data, *exec));
        }
    }
    for src in spec.templates.keys() {
        let path = format!("templates/{src}");
        let (data, exec) = contents.get(&path).ok_or_else(|| {
            ReleaseError::invalid(file, format!("job '{name}': template '{src}' is missing"))
        })?;
        fingerprinted.insert(path, FileDigest::of(data, *exec));
        templates.insert(src.clone(), text_of(data, src)?);
    }
    check_fingerprint(
        &format!("job '{name}'"),
        file,
        &entry.fingerprint,
        |algo| job_fingerprint(algo, &fingerprinted),
        warnings,
    );
    Ok(Job {
        spec,
        fingerprint: entry.fingerprint.clone(),
        version: entry.version.clone(),
        templates,
        monit,
        sha256,
        archive,
    })
}

/// The archive at `file` inside the tarball and its sha256, after checking
/// it against the digest release.MF records (`<sha1 hex>` or
/// `sha256:<hex>`).
fn verified_archive(
    archives: &BTreeMap<String, Spooled>,
    file: &str,
    expected: &str,
) -> Result<(ArchiveData, String), ReleaseError> {
    let entry = archives.get(file).ok_or_else(|| {
        ReleaseError::invalid(file, "listed in release.MF but missing from the tarball")
    })?;
    let (algo, hex) = digest::parse(expected).map_err(|m| ReleaseError::invalid(MANIFEST, m))?;
    let got = match algo {
        DigestAlgorithm::Sha1 => &entry.sha1,
        DigestAlgorithm::Sha256 => &entry.sha256,
    };
    if *got != hex {
        return Err(ReleaseError::integrity(
            file,
            format!("{} is {got}, release.MF says {expected}", algo.name()),
        ));
    }
    Ok((entry.data.clone(), entry.sha256.clone()))
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
            "- {{name: {name}, version: '1', fingerprint: f, sha1: s, dependencies: [{deps}]}}\n"
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

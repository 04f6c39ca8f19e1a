//! Stemcells: building bosun's Docker stemcell and opening stemcell tarballs.
//!
//! A stemcell tarball is a gzipped tar holding `stemcell.MF` (YAML,
//! [`StemcellManifest`]) and `image` at its top. For the `docker-rootfs`
//! format, `image` is a gzipped tar of a Debian root filesystem that
//! `docker import` accepts: numeric owners and modes kept, device nodes left
//! out (the container runtime provides `/dev`).
//!
//! [`build_stemcell`] makes one: a minimal Debian made by `debootstrap`
//! (cached as a tarball keyed by OS, mirror and package list, see
//! [`base_cache_path`]), plus the bosun executable at
//! `/var/vcap/bosh/bin/bosun` (one binary is director and agent, so the
//! builder copies the running executable), BOSH's `/var/vcap` directories,
//! its `vcap` user and group (added to `/etc/passwd` and `/etc/group`) and
//! `/etc/bosun-stemcell`; apt caches and package lists are dropped.
//! [`open_stemcell`] unpacks a tarball into a temporary directory (streamed,
//! within [`ArchiveLimits`]), verifies the image's sha256 and hands out a
//! [`bosun_cpi::StemcellSpec`].
//!
//! This module owns the stemcell *format* and the builder only. It never
//! talks to a CPI (uploading is the caller's business), keeps no state
//! (the base rootfs cache is a directory the caller names) and never
//! modifies the host beyond its own temporary directories and the files it
//! is told to write (always written atomically).

mod rootfs;
#[cfg(test)]
mod tests;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use flate2::read::GzDecoder;
use flate2::{Compression, GzBuilder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::archive_limits::{ArchiveLimits, Budget, LimitError, Metered};

/// Operating systems the builder supports: stemcell `operating_system` and
/// the Debian suite debootstrap installs.
pub const SUPPORTED_OS: &[(&str, &str)] = &[("debian-bookworm", "bookworm")];

/// Packages every stemcell carries on top of debootstrap's `minbase`
/// (which already has `bash`, `coreutils` and the rest of Debian's
/// essential set). `BuildOptions::include` adds more (e.g. `make gcc
/// libc6-dev` for packaging scripts that compile).
pub const BASE_PACKAGES: &[&str] = &["ca-certificates", "iproute2", "procps", "python3"];

/// Where debootstrap downloads from unless told otherwise.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";

/// The format bosun's Docker CPI takes.
pub const STEMCELL_FORMAT: &str = "docker-rootfs";
/// Every format a built stemcell is: bosun's Docker CPI's, and those of
/// BOSH's warden and docker CPIs (they import the same gzip'd rootfs and
/// exec its `/usr/sbin/runsvdir-start`, which starts bosun's agent).
pub const STEMCELL_FORMATS: &[&str] = &[STEMCELL_FORMAT, "warden-tar", "general-tar"];

/// Where the agent (the bosun executable) lives inside the image.
pub const AGENT_PATH: &str = "var/vcap/bosh/bin/bosun";

/// `stemcell.MF`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StemcellManifest {
    /// e.g. `bosun-docker-debian-bookworm`.
    pub name: String,
    /// Default `1.<YYYYMMDDHHMMSS>` (UTC build time).
    pub version: String,
    /// e.g. `debian-bookworm`.
    pub operating_system: String,
    /// Hex sha256 of the `image` file.
    pub sha256: String,
    /// e.g. `["docker-rootfs"]`.
    pub stemcell_formats: Vec<String>,
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
    #[serde(default)]
    pub api_version: u32,
}

/// What to build, see [`build_stemcell`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BuildOptions {
    /// Only `debian-bookworm` for now (see [`SUPPORTED_OS`]).
    pub os: String,
    /// Extra Debian packages, on top of [`BASE_PACKAGES`].
    pub include: Vec<String>,
    /// The stemcell tarball to write (atomically).
    pub out: PathBuf,
    /// The bosun executable to install as `/var/vcap/bosh/bin/bosun`.
    pub agent_binary: PathBuf,
    /// Where debootstrapped base rootfs tarballs are cached (none: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Default `1.<YYYYMMDDHHMMSS>` of the build time (UTC).
    pub version: Option<String>,
    /// Debian mirror, default [`DEFAULT_MIRROR`].
    pub mirror: String,
}

impl BuildOptions {
    /// Options with the defaults: no extra packages, no cache, a time-based
    /// version, the default mirror.
    pub fn new(os: &str, out: impl Into<PathBuf>, agent_binary: impl Into<PathBuf>) -> Self {
        BuildOptions {
            os: os.to_string(),
            include: Vec::new(),
            out: out.into(),
            agent_binary: agent_binary.into(),
            cache_dir: None,
            version: None,
            mirror: DEFAULT_MIRROR.to_string(),
        }
    }
}

/// Everything that can go wrong building or opening a stemcell. Messages
/// name the step and the file.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StemcellError {
    #[error("unsupported operating system '{os}' (supported: {supported})")]
    UnsupportedOs { os: String, supported: String },
    #[error("invalid build option: {0}")]
    InvalidOption(String),
    #[error("debootstrap is not installed: apt-get install debootstrap")]
    DebootstrapMissing,
    #[error("{step} requires root (running as uid {uid}): run the build as root, or provide a cached base rootfs")]
    NotRoot { step: String, uid: u32 },
    /// An external command failed; `message` ends with the last lines of its output.
    #[error("{step}: {message}")]
    Command { step: String, message: String },
    #[error("{step} {}: {message}", path.display())]
    Io {
        step: String,
        path: PathBuf,
        message: String,
    },
    /// A stemcell tarball or base rootfs that is not what it should be.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{}: image sha256 is {actual} but stemcell.MF says {expected}", path.display())]
    ShaMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    /// A stemcell tarball that expands past a limit of [`ArchiveLimits`]
    /// (or a limit's setting that is not valid).
    #[error("{}: {limit}", path.display())]
    Limit { path: PathBuf, limit: LimitError },
}

impl StemcellError {
    fn io(step: &str, path: &Path, err: impl std::fmt::Display) -> Self {
        StemcellError::Io {
            step: step.to_string(),
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }

    fn invalid(path: &Path, message: impl Into<String>) -> Self {
        StemcellError::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// `|e| StemcellError::io(step, path, e)`.
fn io_err<'a, E: std::fmt::Display>(
    step: &'a str,
    path: &'a Path,
) -> impl FnOnce(E) -> StemcellError + 'a {
    move |e| StemcellError::io(step, path, e)
}

/// The Debian suite for a stemcell operating system.
pub fn suite_for(os: &str) -> Result<&'static str, StemcellError> {
    SUPPORTED_OS
        .iter()
        .find(|(name, _)| *name == os)
        .map(|(_, suite)| *suite)
        .ok_or_else(|| StemcellError::UnsupportedOs {
            os: os.to_string(),
            supported: SUPPORTED_OS
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// The full package list debootstrap installs: [`BASE_PACKAGES`] plus
/// `include`, sorted and without duplicates. Rejects names that are not
/// Debian package names.
pub fn base_packages(include: &[String]) -> Result<Vec<String>, StemcellError> {
    let mut all: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
    for p in include {
        let p = p.trim();
        let valid = p.len() >= 2
            && p.chars().enumerate().all(|(i, c)| {
                c.is_ascii_lowercase()
                    || c.is_ascii_digit()
                    || (i > 0 && matches!(c, '+' | '-' | '.'))
            });
        if !valid {
            return Err(StemcellError::InvalidOption(format!(
                "include: '{p}' is not a Debian package name"
            )));
        }
        all.push(p.to_string());
    }
    all.sort();
    all.dedup();
    Ok(all)
}

/// Where the base rootfs tarball for (`os`, `mirror`, `packages`) is cached
/// in `cache_dir`: `base-<os>-<digest>.tar.gz`, the digest covering the OS,
/// the mirror and the sorted, de-duplicated package list (so the order of
/// `packages` does not matter).
pub fn base_cache_path(cache_dir: &Path, os: &str, mirror: &str, packages: &[String]) -> PathBuf {
    let mut sorted: Vec<&str> = packages.iter().map(|p| p.trim()).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut key = format!("bosun-base-rootfs-v1\nvariant minbase\nos {os}\nmirror {mirror}\n");
    for p in sorted {
        key.push_str(&format!("package {p}\n"));
    }
    let digest = hex::encode(Sha256::digest(key.as_bytes()));
    cache_dir.join(format!("base-{os}-{}.tar.gz", &digest[..16]))
}

/// `1.<YYYYMMDDHHMMSS>` of `t` in UTC.
pub fn default_version(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "1.{y:04}{m:02}{d:02}{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 -> (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

fn validate_version(v: &str) -> Result<String, StemcellError> {
    let ok = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'));
    if ok {
        Ok(v.to_string())
    } else {
        Err(StemcellError::InvalidOption(format!(
            "version: '{v}' (letters, digits, '.', '_', '+', '-' only)"
        )))
    }
}

/// Builds a stemcell (see the module doc) and writes it to `opts.out`.
/// Progress goes to `log`, one line per call.
pub fn build_stemcell(
    opts: &BuildOptions,
    log: &mut dyn FnMut(&str),
) -> Result<StemcellManifest, StemcellError> {
    let started = Instant::now();
    let suite = suite_for(&opts.os)?;
    let packages = base_packages(&opts.include)?;
    let version = match &opts.version {
        Some(v) => validate_version(v)?,
        None => default_version(SystemTime::now()),
    };
    let mirror = opts.mirror.trim();
    if mirror.is_empty() || mirror.contains(char::is_whitespace) {
        return Err(StemcellError::InvalidOption(format!(
            "mirror: '{}' is not a URL",
            opts.mirror
        )));
    }
    let agent_meta = fs::metadata(&opts.agent_binary)
        .map_err(io_err("reading agent binary", &opts.agent_binary))?;
    if !agent_meta.is_file() {
        return Err(StemcellError::invalid(
            &opts.agent_binary,
            "agent binary is not a regular file",
        ));
    }
    let name = format!("bosun-docker-{}", opts.os);

    let out_dir = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&out_dir).map_err(io_err("creating output directory", &out_dir))?;
    let work = tempfile::Builder::new()
        .prefix(".bosun-stemcell-build-")
        .tempdir_in(&out_dir)
        .map_err(io_err("creating work directory in", &out_dir))?;

    // 1. The base root filesystem, from the cache or from debootstrap.
    let spec = rootfs::DebootstrapSpec {
        os: &opts.os,
        suite,
        mirror,
        packages: &packages,
    };
    let base = match &opts.cache_dir {
        Some(cache) => {
            let path = base_cache_path(cache, &opts.os, mirror, &packages);
            if path.is_file() {
                log(&format!("using cached base rootfs {}", path.display()));
            } else {
                fs::create_dir_all(cache).map_err(io_err("creating cache directory", cache))?;
                rootfs::debootstrap_base(&spec, work.path(), &path, log)?;
            }
            path
        }
        None => {
            let path = work.path().join("base.tar.gz");
            rootfs::debootstrap_base(&spec, work.path(), &path, log)?;
            path
        }
    };

    // 2 + 3. The image: the base plus the agent and BOSH's directories.
    let image = work.path().join("image");
    log(&format!(
        "writing image with agent {}",
        opts.agent_binary.display()
    ));
    let identity = format!(
        "name: {name}\nversion: {version}\noperating_system: {}\nstemcell_format: {STEMCELL_FORMAT}\n",
        opts.os
    );
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let additions = rootfs::Additions {
        agent_binary: &opts.agent_binary,
        identity: identity.as_bytes(),
        mtime,
    };
    let (sha256, image_size) = rootfs::write_image(&base, &image, &additions)?;
    log(&format!(
        "image: {:.1} MiB, sha256 {sha256}",
        image_size as f64 / 1_048_576.0
    ));

    let manifest = StemcellManifest {
        name,
        version,
        operating_system: opts.os.clone(),
        sha256,
        stemcell_formats: STEMCELL_FORMATS.iter().map(|f| f.to_string()).collect(),
        cloud_properties: serde_json::Value::Object(Default::default()),
        api_version: 2,
    };
    write_stemcell_tarball(&opts.out, &manifest, &image)?;

    // 4. Work directories go with `work`.
    drop(work);
    log(&format!(
        "wrote stemcell {} ({}/{}) in {:.1}s",
        opts.out.display(),
        manifest.name,
        manifest.version,
        started.elapsed().as_secs_f64()
    ));
    Ok(manifest)
}

/// Writes the stemcell tarball `out` (atomically): `stemcell.MF` and `image`
/// at its top, mtime 0, owner 0.
pub(crate) fn write_stemcell_tarball(
    out: &Path,
    manifest: &StemcellManifest,
    image: &Path,
) -> Result<(), StemcellError> {
    let step = "writing stemcell";
    let yaml = serde_yaml_ng::to_string(manifest).map_err(io_err(step, out))?;
    let out_dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".bosun-stemcell-")
        .tempfile_in(out_dir)
        .map_err(io_err(step, out))?;
    let file = tmp.as_file().try_clone().map_err(io_err(step, out))?;
    // The image is compressed already: a stored gzip stream keeps the
    // tarball a `.tgz` without spending seconds on recompression.
    let gz = GzBuilder::new()
        .mtime(0)
        .write(io::BufWriter::new(file), Compression::none());
    let mut tar = tar::Builder::new(gz);
    let header = |size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h
    };
    tar.append_data(
        &mut header(yaml.len() as u64),
        "stemcell.MF",
        yaml.as_bytes(),
    )
    .map_err(io_err(step, out))?;
    let image_file = File::open(image).map_err(io_err("reading image", image))?;
    let size = image_file
        .metadata()
        .map_err(io_err("reading image", image))?
        .len();
    tar.append_data(&mut header(size), "image", image_file)
        .map_err(io_err(step, out))?;
    let gz = tar.into_inner().map_err(io_err(step, out))?;
    let mut buf = gz.finish().map_err(io_err(step, out))?;
    buf.flush().map_err(io_err(step, out))?;
    drop(buf);
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err(step, out))?;
    tmp.as_file().sync_all().map_err(io_err(step, out))?;
    tmp.persist(out)
        .map_err(|e| StemcellError::io(step, out, e.error))?;
    Ok(())
}

/// A stemcell tarball unpacked into a temporary directory (removed on drop),
/// its image's sha256 verified.
#[derive(Debug)]
pub struct OpenedStemcell {
    pub manifest: StemcellManifest,
    /// The unpacked `image` file.
    pub image_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl OpenedStemcell {
    /// What `Cpi::create_stemcell` takes.
    pub fn spec(&self) -> bosun_cpi::StemcellSpec {
        bosun_cpi::StemcellSpec {
            name: self.manifest.name.clone(),
            os: self.manifest.operating_system.clone(),
            version: self.manifest.version.clone(),
            image_path: Some(self.image_path.clone()),
            cloud_properties: self.manifest.cloud_properties.clone(),
        }
    }
}

/// Longest `stemcell.MF` accepted.
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Unpacks the stemcell tarball at `path` (gzipped or plain tar) into a
/// temporary directory, parses `stemcell.MF` and verifies the image's
/// sha256, within the limits of [`ArchiveLimits::from_env`]. Other entries
/// of the tarball are skipped (but count towards the limits).
pub fn open_stemcell(path: &Path) -> Result<OpenedStemcell, StemcellError> {
    open_stemcell_in(path, None)
}

/// [`open_stemcell`], the temporary directory made in `scratch_dir`
/// (created if needed) when given, else in the system's.
pub fn open_stemcell_in(
    path: &Path,
    scratch_dir: Option<&Path>,
) -> Result<OpenedStemcell, StemcellError> {
    let limits = ArchiveLimits::from_env().map_err(|limit| StemcellError::Limit {
        path: path.to_path_buf(),
        limit,
    })?;
    open_stemcell_with_limits(path, &limits, scratch_dir)
}

/// [`open_stemcell_in`] within `limits`. The image is streamed to the
/// temporary directory, never held in memory.
pub fn open_stemcell_with_limits(
    path: &Path,
    limits: &ArchiveLimits,
    scratch_dir: Option<&Path>,
) -> Result<OpenedStemcell, StemcellError> {
    let budget = Budget::new(*limits);
    // A gzip or tar error caused by the meter stopping the stream is
    // really the limit.
    open_metered(path, &budget, scratch_dir).map_err(|e| match budget.exceeded() {
        Some(limit) => StemcellError::Limit {
            path: path.to_path_buf(),
            limit,
        },
        None => e,
    })
}

fn open_metered(
    path: &Path,
    budget: &Budget,
    scratch_dir: Option<&Path>,
) -> Result<OpenedStemcell, StemcellError> {
    let limit = |limit| StemcellError::Limit {
        path: path.to_path_buf(),
        limit,
    };
    let file = File::open(path).map_err(io_err("opening stemcell", path))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix("bosun-stemcell-");
    let dir = match scratch_dir {
        Some(scratch) => fs::create_dir_all(scratch)
            .and_then(|()| builder.tempdir_in(scratch))
            .map_err(io_err("creating a temporary directory for", path))?,
        None => builder
            .tempdir()
            .map_err(io_err("creating a temporary directory for", path))?,
    };
    let image_path = dir.path().join("image");
    let mut archive = tar::Archive::new(Metered::new(
        maybe_gunzip(BufReader::new(file)).map_err(io_err("reading stemcell", path))?,
        budget,
    ));
    let mut manifest_text: Option<String> = None;
    let mut image_sha: Option<String> = None;
    let mut entries = archive
        .entries()
        .map_err(|e| StemcellError::invalid(path, format!("not a stemcell tarball: {e}")))?;
    let mut rest_of_previous = 0;
    while let Some(entry) = budget.step(rest_of_previous, || entries.next()) {
        let mut entry = entry
            .map_err(|e| StemcellError::invalid(path, format!("not a stemcell tarball: {e}")))?;
        budget.charge_entry().map_err(limit)?;
        rest_of_previous = entry.size().div_ceil(512) * 512;
        budget.check_declared(entry.size()).map_err(limit)?;
        let name = entry
            .path()
            .map_err(|e| StemcellError::invalid(path, format!("bad entry name: {e}")))?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let kind = entry.header().entry_type();
        if name != "stemcell.MF" && name != "image" {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(StemcellError::invalid(
                path,
                format!("'{name}' is not a regular file"),
            ));
        }
        let already = if name == "image" {
            image_sha.is_some()
        } else {
            manifest_text.is_some()
        };
        if already {
            return Err(StemcellError::invalid(
                path,
                format!("'{name}' appears twice"),
            ));
        }
        if name == "stemcell.MF" {
            let mut text = String::new();
            (&mut entry)
                .take(MAX_MANIFEST_BYTES + 1)
                .read_to_string(&mut text)
                .map_err(|e| StemcellError::invalid(path, format!("reading stemcell.MF: {e}")))?;
            if text.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(StemcellError::invalid(path, "stemcell.MF is too large"));
            }
            manifest_text = Some(text);
        } else {
            let out =
                File::create(&image_path).map_err(io_err("unpacking image to", &image_path))?;
            let mut w = HashingWriter::new(io::BufWriter::new(out));
            io::copy(&mut entry, &mut w)
                .map_err(|e| StemcellError::invalid(path, format!("unpacking image: {e}")))?;
            let (mut inner, sha, _) = w.finish();
            inner
                .flush()
                .map_err(io_err("unpacking image to", &image_path))?;
            image_sha = Some(sha);
        }
    }
    let text = manifest_text
        .ok_or_else(|| StemcellError::invalid(path, "not a stemcell: no stemcell.MF at its top"))?;
    let manifest: StemcellManifest = serde_yaml_ng::from_str(&text)
        .map_err(|e| StemcellError::invalid(path, format!("stemcell.MF: {e}")))?;
    for (field, value) in [
        ("name", &manifest.name),
        ("version", &manifest.version),
        ("operating_system", &manifest.operating_system),
    ] {
        if value.trim().is_empty() {
            return Err(StemcellError::invalid(
                path,
                format!("stemcell.MF: '{field}' is empty"),
            ));
        }
    }
    let actual = image_sha
        .ok_or_else(|| StemcellError::invalid(path, "not a stemcell: no image at its top"))?;
    if !manifest.sha256.eq_ignore_ascii_case(&actual) {
        return Err(StemcellError::ShaMismatch {
            path: path.to_path_buf(),
            expected: manifest.sha256.clone(),
            actual,
        });
    }
    Ok(OpenedStemcell {
        manifest,
        image_path,
        _dir: dir,
    })
}

/// `r` itself, or a gzip decoder over it when it starts with gzip's magic.
fn maybe_gunzip<R: BufRead + 'static>(mut r: R) -> io::Result<Box<dyn Read>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(GzDecoder::new(r)))
    } else {
        Ok(Box::new(r))
    }
}

/// A writer that hashes (sha256) and counts what passes through it.
pub(crate) struct HashingWriter<W: Write> {
    inner: W,
    hasher: Sha256,
    len: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// The inner writer, the hex sha256 and the byte count.
    pub(crate) fn finish(self) -> (W, String, u64) {
        (self.inner, hex::encode(self.hasher.finalize()), self.len)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

//! Deterministic tgz archives and content fingerprints.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::sync::Arc;

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};
use tempfile::TempPath;

use crate::archive_limits::{Budget, LimitError, Metered};

/// One regular file in an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileEntry {
    pub data: Vec<u8>,
    pub executable: bool,
}

/// The bytes of a job or package archive: in memory (built from a release
/// directory) or in a temporary file (streamed out of a release tarball;
/// removed when the last clone is dropped). Two archives are equal when
/// their contents are.
#[derive(Clone)]
pub struct ArchiveData(Stored);

#[derive(Clone)]
enum Stored {
    Memory(Vec<u8>),
    File { path: Arc<TempPath>, len: u64 },
}

impl ArchiveData {
    pub fn from_bytes(data: Vec<u8>) -> Self {
        ArchiveData(Stored::Memory(data))
    }

    /// A temporary file the archive owns from now on.
    pub(crate) fn from_temp_file(path: TempPath, len: u64) -> Self {
        ArchiveData(Stored::File {
            path: Arc::new(path),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> u64 {
        match &self.0 {
            Stored::Memory(data) => data.len() as u64,
            Stored::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file holding the archive, when it is not in memory.
    pub fn path(&self) -> Option<&Path> {
        match &self.0 {
            Stored::Memory(_) => None,
            Stored::File { path, .. } => Some(path),
        }
    }

    /// The content, streamed.
    pub fn open(&self) -> std::io::Result<Box<dyn Read + '_>> {
        match &self.0 {
            Stored::Memory(data) => Ok(Box::new(data.as_slice())),
            Stored::File { path, .. } => {
                let path: &Path = path;
                Ok(Box::new(BufReader::new(File::open(path)?)))
            }
        }
    }

    /// The content, in memory.
    pub fn to_vec(&self) -> std::io::Result<Vec<u8>> {
        match &self.0 {
            Stored::Memory(data) => Ok(data.clone()),
            Stored::File { path, .. } => {
                let path: &Path = path;
                std::fs::read(path)
            }
        }
    }
}

impl From<Vec<u8>> for ArchiveData {
    fn from(data: Vec<u8>) -> Self {
        ArchiveData::from_bytes(data)
    }
}

impl fmt::Debug for ArchiveData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Stored::Memory(data) => write!(f, "ArchiveData({} bytes in memory)", data.len()),
            Stored::File { path, len } => {
                write!(f, "ArchiveData({len} bytes in {})", path.display())
            }
        }
    }
}

impl PartialEq for ArchiveData {
    fn eq(&self, other: &Self) -> bool {
        if self.len() != other.len() {
            return false;
        }
        if let (Stored::Memory(a), Stored::Memory(b)) = (&self.0, &other.0) {
            return a == b;
        }
        let (Ok(mut a), Ok(mut b)) = (self.open(), other.open()) else {
            return false;
        };
        let (mut x, mut y) = (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
        loop {
            let n = match a.read(&mut x) {
                Ok(n) => n,
                Err(_) => return false,
            };
            if n == 0 {
                return b.read(&mut y[..1]).is_ok_and(|m| m == 0);
            }
            if b.read_exact(&mut y[..n]).is_err() || x[..n] != y[..n] {
                return false;
            }
        }
    }
}

impl Eq for ArchiveData {}

/// Hex sha256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A gzipped tar of `files` (path -> entry): entries sorted by path, mtime 0,
/// uid/gid 0, no user/group names, mode 0644 or 0755, gzip mtime 0.
pub(crate) fn build_tgz(files: &BTreeMap<String, FileEntry>) -> std::io::Result<Vec<u8>> {
    write_tgz(
        Vec::new(),
        files.iter().map(|(path, entry)| {
            Ok(TgzEntry {
                path,
                size: entry.data.len() as u64,
                executable: entry.executable,
                content: Box::new(entry.data.as_slice()),
            })
        }),
    )
}

/// One entry for [`write_tgz`].
pub(crate) struct TgzEntry<'a> {
    pub path: &'a str,
    /// Exactly the number of bytes `content` yields.
    pub size: u64,
    pub executable: bool,
    pub content: Box<dyn Read + 'a>,
}

/// [`build_tgz`] streamed to `out`, entries in the order given (give them
/// sorted by path for a deterministic archive). Returns `out`.
pub(crate) fn write_tgz<'a, W: Write>(
    out: W,
    entries: impl IntoIterator<Item = std::io::Result<TgzEntry<'a>>>,
) -> std::io::Result<W> {
    let gz: GzEncoder<W> = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(out, Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for entry in entries {
        let entry = entry?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(entry.size);
        header.set_mode(if entry.executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, entry.path, entry.content)?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

/// Why walking a tgz stopped.
#[derive(Debug)]
pub(crate) enum WalkError {
    /// A limit of the [`Budget`] was exceeded.
    Limit(LimitError),
    /// The archive is not a tgz, is corrupt, or holds what it must not.
    Invalid(String),
    /// Writing what was read somewhere failed.
    Io(String),
}

/// Streams the regular files of a tgz, in archive order, calling `visit`
/// with each one's normalised relative path, executable bit and content
/// (read as much or as little of it as needed). Directory entries are
/// skipped; links, devices, absolute paths, `..` and a path appearing twice
/// are errors. Every entry and every expanded byte (skipped ones included)
/// is charged to `budget`; an entry whose declared size would exceed it is
/// refused before it is read.
pub(crate) fn walk_tgz<R: Read>(
    input: R,
    budget: &Budget,
    mut visit: impl FnMut(&str, bool, &mut dyn Read) -> Result<(), WalkError>,
) -> Result<(), WalkError> {
    let result = walk_inner(input, budget, &mut visit);
    // A decompressor or tar error caused by the meter stopping the stream
    // is really the limit.
    match (result, budget.exceeded()) {
        (Err(_), Some(limit)) => Err(WalkError::Limit(limit)),
        (result, _) => result,
    }
}

/// What [`walk_tgz`] calls for each regular file: path, executable, content.
type Visit<'v> = dyn FnMut(&str, bool, &mut dyn Read) -> Result<(), WalkError> + 'v;

fn walk_inner<R: Read>(input: R, budget: &Budget, visit: &mut Visit<'_>) -> Result<(), WalkError> {
    let invalid = WalkError::Invalid;
    let mut archive = tar::Archive::new(Metered::new(GzDecoder::new(input), budget));
    let mut seen = BTreeSet::new();
    let mut entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tgz: {e}")))?;
    let mut rest_of_previous = 0;
    while let Some(entry) = budget.step(rest_of_previous, || entries.next()) {
        let mut entry = entry.map_err(|e| invalid(format!("corrupt archive: {e}")))?;
        budget.charge_entry().map_err(WalkError::Limit)?;
        rest_of_previous = entry.size().div_ceil(512) * 512;
        let kind = entry.header().entry_type();
        let raw_path = entry
            .path()
            .map_err(|e| invalid(format!("corrupt archive entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path = normalise(&raw_path).map_err(invalid)?;
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(invalid(format!(
                "entry '{raw_path}' is not a regular file ({kind:?})"
            )));
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| invalid(format!("entry '{raw_path}': bad mode: {e}")))?;
        budget
            .check_declared(entry.size())
            .map_err(WalkError::Limit)?;
        if !seen.insert(path.clone()) {
            return Err(invalid(format!("entry '{path}' appears twice")));
        }
        visit(&path, mode & 0o111 != 0, &mut entry)?;
    }
    Ok(())
}

/// The regular files of an in-memory tgz, by normalised relative path (see
/// [`walk_tgz`]; no limits).
#[cfg(test)]
pub(crate) fn read_tgz(bytes: &[u8]) -> Result<BTreeMap<String, FileEntry>, String> {
    let budget = Budget::new(crate::archive_limits::ArchiveLimits {
        max_size: u64::MAX,
        max_entries: u64::MAX,
    });
    let mut out = BTreeMap::new();
    walk_tgz(bytes, &budget, |path, executable, r| {
        let mut data = Vec::new();
        r.read_to_end(&mut data)
            .map_err(|e| WalkError::Invalid(format!("entry '{path}': {e}")))?;
        out.insert(path.to_string(), FileEntry { data, executable });
        Ok(())
    })
    .map_err(|e| match e {
        WalkError::Limit(l) => l.to_string(),
        WalkError::Invalid(m) | WalkError::Io(m) => m,
    })?;
    Ok(out)
}

/// `./a/b` -> `a/b`; rejects absolute paths and `..`.
fn normalise(path: &str) -> Result<String, String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(format!("entry '{path}' escapes the archive")),
            p => parts.push(p),
        }
    }
    if path.starts_with('/') {
        return Err(format!("entry '{path}' is absolute"));
    }
    Ok(parts.join("/"))
}

/// The digest a fingerprint is built on. BOSH's CLI once used SHA-1 (40
/// hex fingerprints, file digests as plain hex); it now uses SHA-256 (64
/// hex fingerprints, file digests written `sha256:<hex>`). Both are read;
/// bosun computes SHA-256 ones for dev builds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DigestAlgorithm {
    Sha1,
    #[default]
    Sha256,
}

impl DigestAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha1 => "sha1",
            DigestAlgorithm::Sha256 => "sha256",
        }
    }

    /// The algorithm a fingerprint was made with, by its length.
    pub fn of_fingerprint(fingerprint: &str) -> Option<Self> {
        if !fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match fingerprint.len() {
            40 => Some(DigestAlgorithm::Sha1),
            64 => Some(DigestAlgorithm::Sha256),
            _ => None,
        }
    }

    /// Hex digest of `data`.
    pub(crate) fn hex(self, data: &[u8]) -> String {
        match self {
            DigestAlgorithm::Sha1 => super::sha1::sha1_hex(data),
            DigestAlgorithm::Sha256 => sha256_hex(data),
        }
    }
}

/// Both digests of one file, and its executable bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileDigest {
    pub executable: bool,
    pub sha1: String,
    pub sha256: String,
}

impl FileDigest {
    pub(crate) fn of(data: &[u8], executable: bool) -> Self {
        FileDigest {
            executable,
            sha1: super::sha1::sha1_hex(data),
            sha256: sha256_hex(data),
        }
    }

    /// The digest as BOSH writes it into a fingerprint: plain hex for
    /// SHA-1, `sha256:<hex>` for SHA-256.
    fn written(&self, algo: DigestAlgorithm) -> String {
        match algo {
            DigestAlgorithm::Sha1 => self.sha1.clone(),
            DigestAlgorithm::Sha256 => format!("sha256:{}", self.sha256),
        }
    }

    fn mode(&self) -> &'static str {
        if self.executable {
            "100755"
        } else {
            "100644"
        }
    }
}

/// A streaming pair of SHA-1 and SHA-256.
#[derive(Default)]
pub(crate) struct BothHasher {
    sha1: super::sha1::Sha1,
    sha256: Sha256,
}

impl BothHasher {
    pub(crate) fn update(&mut self, data: &[u8]) {
        self.sha1.update(data);
        self.sha256.update(data);
    }

    /// (sha1 hex, sha256 hex).
    pub(crate) fn finish(self) -> (String, String) {
        (self.sha1.hex(), hex::encode(self.sha256.finalize()))
    }

    pub(crate) fn finish_file(self, executable: bool) -> FileDigest {
        let (sha1, sha256) = self.finish();
        FileDigest {
            executable,
            sha1,
            sha256,
        }
    }
}

impl Write for BothHasher {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// BOSH's v2 fingerprint: `"v2"`, then for each file sorted by path its
/// path, its digest and (unless `None`) its mode, then the extra chunks
/// sorted and joined by `,`; all concatenated and digested.
fn v2_fingerprint<'a>(
    algo: DigestAlgorithm,
    files: impl IntoIterator<Item = (&'a str, &'a FileDigest, bool)>,
    chunks: &[String],
) -> String {
    let mut files: Vec<(&str, &FileDigest, bool)> = files.into_iter().collect();
    files.sort_by(|a, b| a.0.cmp(b.0));
    let mut text = String::from("v2");
    for (path, digest, with_mode) in files {
        text.push_str(path);
        text.push_str(&digest.written(algo));
        if with_mode {
            text.push_str(digest.mode());
        }
    }
    if !chunks.is_empty() {
        let mut sorted = chunks.to_vec();
        sorted.sort();
        text.push_str(&sorted.join(","));
    }
    algo.hex(text.as_bytes())
}

/// A package's fingerprint: `packaging` (and `pre_packaging`) by path and
/// digest without mode, every other file by path, digest and mode, then
/// the dependencies' *names*.
pub(crate) fn package_fingerprint(
    algo: DigestAlgorithm,
    files: &BTreeMap<String, FileDigest>,
    dependencies: &[String],
) -> String {
    v2_fingerprint(
        algo,
        files.iter().map(|(path, d)| {
            let special = path == "packaging" || path == "pre_packaging";
            (path.as_str(), d, !special)
        }),
        dependencies,
    )
}

/// A job's fingerprint: `job.MF`, `monit`, `properties_schema.json` and
/// `templates/<src>` by path, digest and mode.
pub(crate) fn job_fingerprint(
    algo: DigestAlgorithm,
    files: &BTreeMap<String, FileDigest>,
) -> String {
    v2_fingerprint(algo, files.iter().map(|(p, d)| (p.as_str(), d, true)), &[])
}

/// The license's fingerprint: each `LICENSE*` / `NOTICE*` file by base
/// name and digest, no mode.
pub(crate) fn license_fingerprint(
    algo: DigestAlgorithm,
    files: &BTreeMap<String, FileDigest>,
) -> String {
    v2_fingerprint(
        algo,
        files
            .iter()
            .map(|(p, d)| (p.rsplit('/').next().unwrap_or(p), d, false)),
        &[],
    )
}

/// Digests of in-memory files.
pub(crate) fn digests(files: &BTreeMap<String, FileEntry>) -> BTreeMap<String, FileDigest> {
    files
        .iter()
        .map(|(p, f)| (p.clone(), FileDigest::of(&f.data, f.executable)))
        .collect()
}

/// The archive of a job: its files (`job.MF`, `monit`, `templates/<src>`, ...)
/// as given.
pub(crate) fn job_archive(files: &BTreeMap<String, FileEntry>) -> std::io::Result<Vec<u8>> {
    build_tgz(files)
}

/// The archive of a package: `packaging` plus its files.
pub(crate) fn package_archive(
    packaging: &[u8],
    files: &BTreeMap<String, FileEntry>,
) -> std::io::Result<Vec<u8>> {
    let mut all = files.clone();
    all.insert(
        "packaging".to_string(),
        FileEntry {
            data: packaging.to_vec(),
            executable: true,
        },
    );
    build_tgz(&all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tgz_round_trips_and_is_deterministic() {
        let mut files = BTreeMap::new();
        files.insert(
            "b/long/".repeat(30) + "x",
            FileEntry {
                data: b"hello".to_vec(),
                executable: true,
            },
        );
        files.insert(
            "a".into(),
            FileEntry {
                data: vec![],
                executable: false,
            },
        );
        let one = build_tgz(&files).unwrap();
        let two = build_tgz(&files).unwrap();
        assert_eq!(one, two);
        assert_eq!(read_tgz(&one).unwrap(), files);
        assert!(read_tgz(b"not gzip").is_err());
    }

    #[test]
    fn normalise_rejects_escapes() {
        assert_eq!(normalise("./a//b").unwrap(), "a/b");
        assert!(normalise("../x").is_err());
        assert!(normalise("/etc/passwd").is_err());
    }
}

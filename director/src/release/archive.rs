//! Deterministic tgz archives and content fingerprints.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::{Compression, GzBuilder};
use sha2::{Digest, Sha256};

/// One regular file in an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct FileEntry {
    pub data: Vec<u8>,
    pub executable: bool,
}

/// Hex sha256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A gzipped tar of `files` (path -> entry): entries sorted by path, mtime 0,
/// uid/gid 0, no user/group names, mode 0644 or 0755, gzip mtime 0.
pub(crate) fn build_tgz(files: &BTreeMap<String, FileEntry>) -> std::io::Result<Vec<u8>> {
    let gz: GzEncoder<Vec<u8>> = GzBuilder::new()
        .mtime(0)
        .operating_system(255)
        .write(Vec::new(), Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, entry) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(entry.data.len() as u64);
        header.set_mode(if entry.executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        tar.append_data(&mut header, path, entry.data.as_slice())?;
    }
    let mut gz = tar.into_inner()?;
    gz.flush()?;
    gz.finish()
}

/// The regular files of a tgz, by normalised relative path. Directory
/// entries are skipped; links, devices, absolute paths and `..` are errors.
pub(crate) fn read_tgz(bytes: &[u8]) -> Result<BTreeMap<String, FileEntry>, String> {
    let mut archive = tar::Archive::new(GzDecoder::new(bytes));
    let mut out = BTreeMap::new();
    let entries = archive.entries().map_err(|e| format!("not a tgz: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("corrupt archive: {e}"))?;
        let kind = entry.header().entry_type();
        let raw_path = entry
            .path()
            .map_err(|e| format!("corrupt archive entry name: {e}"))?
            .to_string_lossy()
            .into_owned();
        let path = normalise(&raw_path)?;
        if kind.is_dir() {
            continue;
        }
        if !(kind.is_file() || kind == tar::EntryType::Continuous) {
            return Err(format!(
                "entry '{raw_path}' is not a regular file ({kind:?})"
            ));
        }
        let mode = entry
            .header()
            .mode()
            .map_err(|e| format!("entry '{raw_path}': bad mode: {e}"))?;
        let mut data = Vec::new();
        entry
            .read_to_end(&mut data)
            .map_err(|e| format!("entry '{raw_path}': {e}"))?;
        if out
            .insert(
                path.clone(),
                FileEntry {
                    data,
                    executable: mode & 0o111 != 0,
                },
            )
            .is_some()
        {
            return Err(format!("entry '{path}' appears twice"));
        }
    }
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

/// Fingerprint of a package: its name, `packaging`, every file (path,
/// executable bit, sha256; sorted by path) and its dependencies'
/// fingerprints (sorted by name).
pub(crate) fn package_fingerprint(
    name: &str,
    packaging: &[u8],
    files: &BTreeMap<String, FileEntry>,
    dependencies: &BTreeMap<String, String>,
) -> String {
    let mut listing = String::new();
    listing.push_str(&format!("bosun-package-v1\nname {name}\n"));
    listing.push_str(&format!("packaging {}\n", sha256_hex(packaging)));
    for (path, f) in files {
        listing.push_str(&format!(
            "file {} {} {}\n",
            sha256_hex(path.as_bytes()),
            if f.executable { "0755" } else { "0644" },
            sha256_hex(&f.data)
        ));
    }
    for (dep, fp) in dependencies {
        listing.push_str(&format!("dependency {dep} {fp}\n"));
    }
    sha256_hex(listing.as_bytes())
}

/// Fingerprint of a job: its spec text, monit and every template (name and
/// sha256; sorted by name).
pub(crate) fn job_fingerprint(
    spec_text: &str,
    monit: Option<&str>,
    templates: &BTreeMap<String, String>,
) -> String {
    let mut listing = String::new();
    listing.push_str("bosun-job-v1\n");
    listing.push_str(&format!("spec {}\n", sha256_hex(spec_text.as_bytes())));
    match monit {
        Some(m) => listing.push_str(&format!("monit {}\n", sha256_hex(m.as_bytes()))),
        None => listing.push_str("monit none\n"),
    }
    for (name, content) in templates {
        listing.push_str(&format!(
            "template {} {}\n",
            sha256_hex(name.as_bytes()),
            sha256_hex(content.as_bytes())
        ));
    }
    sha256_hex(listing.as_bytes())
}

/// The archive of a job: `job.MF`, `monit` (if any), `templates/<src>`.
pub(crate) fn job_archive(
    spec_text: &str,
    monit: Option<&str>,
    templates: &BTreeMap<String, String>,
) -> std::io::Result<Vec<u8>> {
    let mut files = BTreeMap::new();
    let text = |s: &str| FileEntry {
        data: s.as_bytes().to_vec(),
        executable: false,
    };
    files.insert("job.MF".to_string(), text(spec_text));
    if let Some(m) = monit {
        files.insert("monit".to_string(), text(m));
    }
    for (name, content) in templates {
        files.insert(format!("templates/{name}"), text(content));
    }
    build_tgz(&files)
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

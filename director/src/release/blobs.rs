//! A release directory's blobs, as BOSH's `add-blob`, `blobs`,
//! `upload-blobs` and `sync-blobs` keep them: files under `blobs/`, each
//! recorded in `config/blobs.yml` by its path with its `size`, its digest
//! (`sha: sha256:<hex>`) and, once uploaded to the release's blobstore,
//! its `object_id`.
//!
//! This module owns `config/blobs.yml` and `blobs/`. It must not build
//! packages or read specs; it reaches the release's blobstore only
//! through the [`Blobstore`] it is given (opened by the caller's
//! [`BlobstoreProviders`]). Every path it turns into a file
//! name (a blob path, an object id) is checked first: no `..`, no
//! absolute paths.
//!
//! Differences from BOSH (on purpose): `sync-blobs` leaves files in
//! `blobs/` that `config/blobs.yml` does not name alone (BOSH deletes
//! them), and re-adding a blob with the same content keeps its
//! `object_id`.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::archive::BothHasher;
use super::blobstore::{
    for_each_chunk, open_release_blobstore, sha256_file, write_streamed, write_text, Blobstore,
    BlobstoreError, BlobstoreProviders,
};
use super::digest;
use super::spec::check_relative_path;
use super::DigestAlgorithm;

const BLOBS_YML: &str = "config/blobs.yml";

/// What went wrong with a release's blobs.
#[derive(Debug, thiserror::Error)]
pub enum BlobsError {
    #[error("blob path: {message}")]
    BadPath { message: String },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config/blobs.yml is not valid")]
    Syntax {
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("writing config/blobs.yml")]
    Serialize {
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("blob '{path}': {message}")]
    BadDigest { path: String, message: String },
    #[error("blob '{path}' is in config/blobs.yml but not in blobs/")]
    NotLocal { path: String },
    #[error("blob '{path}': the copy in {store} (object {object_id}) has sha256 {got}, config/blobs.yml says {recorded}")]
    Mismatch {
        path: String,
        store: String,
        object_id: String,
        got: String,
        recorded: String,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the release's blobstore")]
    Blobstore(#[from] BlobstoreError),
}

/// One blob of `config/blobs.yml`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    pub size: u64,
    /// The id in the release's blobstore, once uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_id: Option<String>,
    /// `sha256:<hex>` (or a 40-hex SHA-1 written by older tools).
    pub sha: String,
}

/// A blob as `blobs` lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlobStatus {
    pub path: String,
    pub size: u64,
    pub object_id: Option<String>,
    pub sha: String,
    /// Whether `blobs/PATH` exists.
    pub local: bool,
}

/// What `sync-blobs` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Fetched from the blobstore (missing or wrong in `blobs/`).
    pub fetched: Vec<String>,
    /// Already in `blobs/` with the recorded digest.
    pub present: Vec<String>,
    /// Neither uploaded nor in `blobs/`: nowhere to fetch them from.
    pub unavailable: Vec<String>,
}

/// A blob path checked to stay inside `blobs/`.
fn checked(path: &str) -> Result<(), BlobsError> {
    check_relative_path("blob path", path).map_err(|message| BlobsError::BadPath { message })
}

/// The blobs `DIR/config/blobs.yml` records (none without the file); every
/// path checked.
pub fn read_blobs(dir: &Path) -> Result<BTreeMap<String, BlobRecord>, BlobsError> {
    let path = dir.join(BLOBS_YML);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(source) => return Err(BlobsError::Read { path, source }),
    };
    if text.trim().is_empty() || text.trim() == "---" {
        return Ok(BTreeMap::new());
    }
    let blobs: Option<BTreeMap<String, BlobRecord>> =
        serde_yaml_ng::from_str(&text).map_err(|source| BlobsError::Syntax { source })?;
    let blobs = blobs.unwrap_or_default();
    for p in blobs.keys() {
        checked(p)?;
    }
    Ok(blobs)
}

fn write_blobs(dir: &Path, blobs: &BTreeMap<String, BlobRecord>) -> Result<(), BlobsError> {
    let text = if blobs.is_empty() {
        "--- {}\n".to_string()
    } else {
        let body =
            serde_yaml_ng::to_string(blobs).map_err(|source| BlobsError::Serialize { source })?;
        format!("---\n{body}")
    };
    write_text(&dir.join(BLOBS_YML), &text)?;
    Ok(())
}

/// `add-blob FILE BLOBS_PATH`: copy `file` to `blobs/BLOBS_PATH` and record
/// it (size, `sha256:` digest, no object id unless the same content was
/// recorded there with one).
pub fn add_blob(dir: &Path, file: &Path, blobs_path: &str) -> Result<BlobRecord, BlobsError> {
    checked(blobs_path)?;
    let mut blobs = read_blobs(dir)?;
    let mut src = File::open(file).map_err(|source| BlobsError::Read {
        path: file.to_path_buf(),
        source,
    })?;
    let dest = dir.join("blobs").join(blobs_path);
    let sha256 = write_streamed(&dest, &mut src)?;
    let size = fs::metadata(&dest)
        .map_err(|source| BlobsError::Read {
            path: dest.clone(),
            source,
        })?
        .len();
    let sha = format!("sha256:{sha256}");
    let object_id = blobs
        .get(blobs_path)
        .filter(|old| old.sha == sha)
        .and_then(|old| old.object_id.clone());
    let record = BlobRecord {
        size,
        object_id,
        sha,
    };
    blobs.insert(blobs_path.to_string(), record.clone());
    write_blobs(dir, &blobs)?;
    Ok(record)
}

/// `blobs`: every recorded blob, by path.
pub fn list_blobs(dir: &Path) -> Result<Vec<BlobStatus>, BlobsError> {
    Ok(read_blobs(dir)?
        .into_iter()
        .map(|(path, r)| BlobStatus {
            local: dir.join("blobs").join(&path).is_file(),
            path,
            size: r.size,
            object_id: r.object_id,
            sha: r.sha,
        })
        .collect())
}

/// `upload-blobs`: every blob without an object id put into the release's
/// blobstore (checked against its recorded digest first), its id recorded
/// at once. The paths uploaded, with their new ids.
pub fn upload_blobs(
    dir: &Path,
    providers: &dyn BlobstoreProviders,
) -> Result<Vec<(String, String)>, BlobsError> {
    let mut blobs = read_blobs(dir)?;
    let pending: Vec<String> = blobs
        .iter()
        .filter(|(_, r)| r.object_id.is_none())
        .map(|(p, _)| p.clone())
        .collect();
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    let store = open_release_blobstore(dir, providers)?;
    let mut uploaded = Vec::new();
    for path in pending {
        let Some(record) = blobs.get(&path).cloned() else {
            continue;
        };
        let local = dir.join("blobs").join(&path);
        if !local.is_file() {
            return Err(BlobsError::NotLocal { path });
        }
        if !matches_record(&path, &record.sha, &local)? {
            return Err(BlobsError::BadDigest {
                path,
                message: format!(
                    "blobs/ holds other content than config/blobs.yml records ({})",
                    record.sha
                ),
            });
        }
        let mut f = File::open(&local).map_err(|source| BlobsError::Read {
            path: local.clone(),
            source,
        })?;
        let (id, _) = store.put(&mut f)?;
        blobs.insert(
            path.clone(),
            BlobRecord {
                object_id: Some(id.clone()),
                ..record
            },
        );
        // Recorded one by one, so an interrupted upload keeps what it did.
        write_blobs(dir, &blobs)?;
        uploaded.push((path, id));
    }
    Ok(uploaded)
}

/// Whether `data_path` has the digest `sha` records (streamed).
fn matches_record(path: &str, sha: &str, data_path: &Path) -> Result<bool, BlobsError> {
    let (algo, want) = digest::parse(sha).map_err(|message| BlobsError::BadDigest {
        path: path.to_string(),
        message,
    })?;
    let failed = |source: io::Error| BlobsError::Read {
        path: data_path.to_path_buf(),
        source,
    };
    let mut f = File::open(data_path).map_err(failed)?;
    let mut h = BothHasher::default();
    for_each_chunk(&mut f, |chunk| {
        h.update(chunk);
        Ok(())
    })
    .map_err(failed)?;
    let (sha1, sha256) = h.finish();
    Ok(match algo {
        DigestAlgorithm::Sha1 => sha1 == want,
        DigestAlgorithm::Sha256 => sha256 == want,
    })
}

/// `sync-blobs`: every uploaded blob that `blobs/` lacks (or holds with
/// another digest) fetched from the release's blobstore into a temporary
/// file beside its place, verified against its recorded digest before it
/// replaces anything. The blobstore is opened only when something is to be
/// fetched.
pub fn sync_blobs(
    dir: &Path,
    providers: &dyn BlobstoreProviders,
) -> Result<SyncReport, BlobsError> {
    let blobs = read_blobs(dir)?;
    let mut report = SyncReport::default();
    let mut store: Option<Box<dyn Blobstore>> = None;
    for (path, record) in &blobs {
        let local = dir.join("blobs").join(path);
        if local.is_file() && matches_record(path, &record.sha, &local)? {
            report.present.push(path.clone());
            continue;
        }
        let Some(id) = &record.object_id else {
            report.unavailable.push(path.clone());
            continue;
        };
        let store = match &store {
            Some(s) => s,
            None => store.insert(open_release_blobstore(dir, providers)?),
        };
        fetch_verified(store.as_ref(), path, id, &record.sha, &local)?;
        report.fetched.push(path.clone());
    }
    Ok(report)
}

/// Blob `id` of `store` written to `dest` only if it has digest `sha`.
fn fetch_verified(
    store: &dyn Blobstore,
    path: &str,
    id: &str,
    sha: &str,
    dest: &Path,
) -> Result<(), BlobsError> {
    let failed = |source: io::Error| BlobsError::Write {
        path: dest.to_path_buf(),
        source,
    };
    let parent = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(failed)?;
    let mut tmp = tempfile::NamedTempFile::new_in(parent).map_err(failed)?;
    store.get(id, tmp.as_file_mut())?;
    tmp.as_file().sync_all().map_err(failed)?;
    if !matches_record(path, sha, tmp.path())? {
        return Err(BlobsError::Mismatch {
            path: path.to_string(),
            store: store.describe(),
            object_id: id.to_string(),
            got: sha256_file(tmp.path())?,
            recorded: sha.to_string(),
        });
    }
    tmp.persist(dest).map_err(|e| failed(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::blobstore::{LocalBlobstore, LocalOnly};
    use super::*;

    fn release() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("config")).expect("mkdir");
        fs::write(
            dir.path().join("config/final.yml"),
            "name: r\nblobstore:\n  provider: local\n  options:\n    blobstore_path: store\n",
        )
        .expect("write final.yml");
        dir
    }

    fn source_file(dir: &Path, name: &str, content: &[u8]) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, content).expect("write source");
        p
    }

    #[test]
    fn add_blob_copies_and_records_size_and_sha256() {
        let rel = release();
        let src = source_file(rel.path(), "x.tar", b"some blob");
        let rec = add_blob(rel.path(), &src, "vendor/x.tar").expect("add");
        assert_eq!(rec.size, 9);
        assert_eq!(
            rec.sha,
            format!("sha256:{}", super::super::archive::sha256_hex(b"some blob"))
        );
        assert_eq!(rec.object_id, None);
        assert_eq!(
            fs::read(rel.path().join("blobs/vendor/x.tar")).expect("copied"),
            b"some blob"
        );
        let text = fs::read_to_string(rel.path().join(BLOBS_YML)).expect("blobs.yml");
        assert!(
            text.contains("vendor/x.tar:\n  size: 9\n  sha: sha256:"),
            "{text}"
        );
        assert!(!text.contains("object_id"), "{text}");
    }

    #[test]
    fn paths_that_leave_blobs_are_refused() {
        let rel = release();
        let src = source_file(rel.path(), "x", b"x");
        for bad in ["../x", "/etc/x", "a/../../x", "a//b", ""] {
            let err = add_blob(rel.path(), &src, bad).expect_err(bad);
            assert!(matches!(err, BlobsError::BadPath { .. }), "{bad}: {err}");
        }
        fs::write(
            rel.path().join(BLOBS_YML),
            "../../etc/passwd:\n  size: 1\n  sha: sha256:00\n",
        )
        .expect("write");
        assert!(matches!(
            sync_blobs(rel.path(), &LocalOnly),
            Err(BlobsError::BadPath { .. })
        ));
    }

    #[test]
    fn upload_then_sync_restores_removed_blobs() {
        let rel = release();
        let src = source_file(rel.path(), "a", b"alpha");
        add_blob(rel.path(), &src, "a/alpha.txt").expect("add");
        let listed = list_blobs(rel.path()).expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].object_id, None);
        assert!(listed[0].local);

        let up = upload_blobs(rel.path(), &LocalOnly).expect("upload");
        assert_eq!(up.len(), 1);
        let id = &up[0].1;
        assert!(rel.path().join("store").join(id).is_file());
        assert_eq!(
            read_blobs(rel.path()).expect("read")["a/alpha.txt"]
                .object_id
                .as_deref(),
            Some(id.as_str())
        );
        assert!(upload_blobs(rel.path(), &LocalOnly)
            .expect("again")
            .is_empty());

        fs::remove_dir_all(rel.path().join("blobs")).expect("rm blobs");
        assert!(!list_blobs(rel.path()).expect("list")[0].local);
        let report = sync_blobs(rel.path(), &LocalOnly).expect("sync");
        assert_eq!(report.fetched, vec!["a/alpha.txt".to_string()]);
        assert_eq!(
            fs::read(rel.path().join("blobs/a/alpha.txt")).expect("fetched"),
            b"alpha"
        );
        let report = sync_blobs(rel.path(), &LocalOnly).expect("sync again");
        assert!(report.fetched.is_empty());
        assert_eq!(report.present, vec!["a/alpha.txt".to_string()]);
    }

    #[test]
    fn sync_refuses_a_store_copy_with_another_digest() {
        let rel = release();
        let src = source_file(rel.path(), "a", b"alpha");
        add_blob(rel.path(), &src, "alpha").expect("add");
        let (_, id) = upload_blobs(rel.path(), &LocalOnly)
            .expect("upload")
            .remove(0);
        fs::write(rel.path().join("store").join(&id), b"tampered").expect("tamper");
        fs::remove_file(rel.path().join("blobs/alpha")).expect("rm");
        let err = sync_blobs(rel.path(), &LocalOnly).expect_err("mismatch");
        assert!(matches!(err, BlobsError::Mismatch { .. }), "{err}");
        assert!(!rel.path().join("blobs/alpha").exists());
        let left = fs::read_dir(rel.path().join("blobs"))
            .expect("blobs/")
            .count();
        assert_eq!(left, 0, "the refused download leaves nothing in blobs/");
        fs::remove_file(rel.path().join("store").join(&id)).expect("rm store copy");
        let err = sync_blobs(rel.path(), &LocalOnly).expect_err("missing");
        assert!(
            matches!(err, BlobsError::Blobstore(BlobstoreError::Missing { .. })),
            "{err}"
        );
    }

    #[test]
    fn upload_refuses_a_blob_changed_since_it_was_added() {
        let rel = release();
        let src = source_file(rel.path(), "a", b"alpha");
        add_blob(rel.path(), &src, "alpha").expect("add");
        fs::write(rel.path().join("blobs/alpha"), b"changed").expect("change");
        let err = upload_blobs(rel.path(), &LocalOnly).expect_err("changed");
        assert!(matches!(err, BlobsError::BadDigest { .. }), "{err}");
        assert_eq!(
            read_blobs(rel.path()).expect("read")["alpha"].object_id,
            None
        );
    }

    #[test]
    fn sha1_records_written_by_older_tools_are_checked_too() {
        let rel = release();
        let store = LocalBlobstore::at(rel.path().join("store"));
        let (id, _) = store.put(&mut &b"old"[..]).expect("put");
        let sha1 = DigestAlgorithm::Sha1.hex(b"old");
        fs::write(
            rel.path().join(BLOBS_YML),
            format!("old.txt:\n  size: 3\n  object_id: {id}\n  sha: {sha1}\n"),
        )
        .expect("write");
        let report = sync_blobs(rel.path(), &LocalOnly).expect("sync");
        assert_eq!(report.fetched, vec!["old.txt".to_string()]);
        fs::write(
            rel.path().join(BLOBS_YML),
            format!(
                "old.txt:\n  size: 3\n  object_id: {id}\n  sha: {}\n",
                DigestAlgorithm::Sha1.hex(b"other")
            ),
        )
        .expect("write");
        fs::remove_file(rel.path().join("blobs/old.txt")).expect("rm");
        assert!(matches!(
            sync_blobs(rel.path(), &LocalOnly),
            Err(BlobsError::Mismatch { .. })
        ));
    }

    #[test]
    fn upload_needs_a_provider_it_can_open() {
        let rel = release();
        fs::write(
            rel.path().join("config/final.yml"),
            "name: r\nblobstore:\n  provider: gcs\n  options: {}\n",
        )
        .expect("write");
        let src = source_file(rel.path(), "a", b"alpha");
        add_blob(rel.path(), &src, "alpha").expect("add works without a blobstore");
        let err = upload_blobs(rel.path(), &LocalOnly).expect_err("gcs");
        assert!(
            matches!(
                &err,
                BlobsError::Blobstore(BlobstoreError::UnsupportedProvider { provider, .. }) if provider == "gcs"
            ),
            "{err}"
        );
    }
}

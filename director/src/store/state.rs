//! The director's state store: one SQLite database plus a content-addressed
//! blob directory under the state dir, the director's identity (id and SSH
//! key), and per-deployment locks.
//!
//! Layout of the state dir:
//! ```text
//! state.db            SQLite (releases, stemcells, compiled packages,
//!                     cloud-configs, deployments, instances, orphaned disks, events)
//! blobs/<sha256>      job and package archives, compiled packages
//! director_ed25519    the director's SSH key (mode 0600)
//! locks/<name>.lock   deployment locks (flock: released when the holder dies)
//! ```
//! Records that change together are stored as one JSON document per row, so
//! every write is a single statement. This module must not call CPIs or
//! agents, and must not decide anything: it stores what it is told.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Serialize};

use bosun_agent::blobs::BlobStore;
use bosun_agent::keys::{load_or_create_private_key, KeyPair};
use bosun_cpi::chain::Chain;

use crate::release::Release;
use crate::store::records::{
    now, CompiledPackage, DeploymentRecord, Event, InstanceRecord, OrphanDisk, ReleaseRecord,
    StemcellRecord, TaskRecord, VariableRecord,
};

/// A state store failure, naming the operation.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("opening state in {dir}")]
    Open {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{op}")]
    Db {
        op: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{op}")]
    Json {
        op: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}")]
    Blob {
        op: String,
        #[source]
        source: bosun_agent::blobs::BlobError,
    },
    #[error("release {name}/{version} is already uploaded with different content; give the new one another version")]
    ReleaseConflict { name: String, version: String },
    #[error("deployment '{deployment}' is locked by another bosun process ({holder}); wait for it to finish")]
    Locked { deployment: String, holder: String },
    #[error("opening state: {} is empty (0 bytes), so this director's records are lost; restore it from a backup, or move it away to start a new director", path.display())]
    EmptyDatabase { path: PathBuf },
    /// A name that would become a path is not a valid name.
    #[error(transparent)]
    Name(#[from] crate::model::names::NameError),
    /// What is being stored does not hold together.
    #[error("{op}: {message}")]
    Invalid { op: String, message: String },
    #[error("{op}")]
    Secret {
        op: String,
        #[source]
        source: crate::store::secrets::SecretsError,
    },
}

type Result<T> = std::result::Result<T, StateError>;

fn db<T>(op: impl Into<String>, r: rusqlite::Result<T>) -> Result<T> {
    r.map_err(|source| StateError::Db {
        op: op.into(),
        source,
    })
}

fn to_json<T: Serialize>(op: &str, v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|source| StateError::Json {
        op: op.to_string(),
        source,
    })
}

fn from_json<T: DeserializeOwned>(op: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StateError::Json {
        op: op.to_string(),
        source,
    })
}

/// Whether an uploaded release has the jobs and packages of `release`
/// (same names and fingerprints; a package the upload only has compiled
/// counts by its compiled entry's fingerprint).
fn same_content(existing: &ReleaseRecord, release: &Release) -> bool {
    let jobs = |r: &ReleaseRecord| {
        r.jobs
            .iter()
            .map(|j| (j.spec.name.clone(), j.fingerprint.clone()))
            .collect::<BTreeSet<_>>()
    };
    let packages = |r: &ReleaseRecord| {
        r.packages
            .iter()
            .map(|p| (p.spec.name.clone(), p.fingerprint.clone()))
            .collect::<BTreeSet<_>>()
    };
    let incoming = ReleaseRecord::from_compiled_release(release);
    jobs(existing) == jobs(&incoming) && packages(existing) == packages(&incoming)
}

/// Streams a release's job or package archive into the blob store under
/// `sha256` (verified: a mismatch keeps nothing).
fn put_archive(
    blobs: &BlobStore,
    sha256: &str,
    archive: &crate::release::ArchiveData,
) -> std::result::Result<(), bosun_agent::blobs::BlobError> {
    let read_err = |source| bosun_agent::blobs::BlobError::Io {
        op: "reading",
        path: archive
            .path()
            .map_or_else(|| "the archive".to_string(), |p| p.display().to_string()),
        source,
    };
    let mut input = archive.open().map_err(read_err)?;
    let mut w = blobs.writer()?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = std::io::Read::read(&mut input, &mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        w.write(&buf[..n])?;
    }
    w.finish(sha256)
}

/// The store. Cheap to share (`Arc`).
pub struct Store {
    dir: PathBuf,
    secrets: crate::store::secrets::SecretBox,
    conn: Mutex<Connection>,
    blobs: BlobStore,
    key: KeyPair,
    director_id: String,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS releases (name TEXT NOT NULL, version TEXT NOT NULL, record TEXT NOT NULL,
  uploaded_at INTEGER NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS stemcells (cpi TEXT NOT NULL, cid TEXT NOT NULL, record TEXT NOT NULL,
  uploaded_at INTEGER NOT NULL, PRIMARY KEY (cpi, cid));
CREATE TABLE IF NOT EXISTS compiled_packages (fingerprint TEXT NOT NULL, stemcell TEXT NOT NULL,
  record TEXT NOT NULL, PRIMARY KEY (fingerprint, stemcell));
CREATE TABLE IF NOT EXISTS cloud_configs (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL,
  created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deployments (name TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, deployment TEXT NOT NULL, record TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_by_deployment ON instances (deployment);
CREATE TABLE IF NOT EXISTS orphan_disks (cid TEXT PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, deployment TEXT, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runtime_configs (id INTEGER PRIMARY KEY AUTOINCREMENT, text TEXT NOT NULL,
  base_dir TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS variables (deployment TEXT NOT NULL, name TEXT NOT NULL, record TEXT NOT NULL,
  sealed TEXT NOT NULL, PRIMARY KEY (deployment, name));
CREATE TABLE IF NOT EXISTS ip_reservations (network TEXT NOT NULL, ip TEXT NOT NULL,
  deployment TEXT NOT NULL, PRIMARY KEY (network, ip));
";

impl Store {
    /// Open (creating if needed) the state in `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Store>> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| StateError::Open {
            dir: dir.to_path_buf(),
            source: e,
        };
        std::fs::create_dir_all(dir.join("locks")).map_err(|e| open_err(Box::new(e)))?;
        // Sealed secrets, keys and rendered specs live here: owner only.
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(|e| open_err(Box::new(e)))?;
        let db_path = dir.join("state.db");
        // SQLite would take an empty file for a new database: a truncated
        // state must not silently become a new director.
        if std::fs::metadata(&db_path).is_ok_and(|m| m.len() == 0) {
            return Err(StateError::EmptyDatabase { path: db_path });
        }
        let conn = Connection::open(&db_path).map_err(|e| open_err(Box::new(e)))?;
        conn.busy_timeout(std::time::Duration::from_secs(30))
            .map_err(|e| open_err(Box::new(e)))?;
        conn.execute_batch("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
            .map_err(|e| open_err(Box::new(e)))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| open_err(Box::new(e)))?;
        // The database holds sealed secrets and VM host keys: owner only.
        std::fs::set_permissions(
            dir.join("state.db"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .map_err(|e| open_err(Box::new(e)))?;
        let secrets = crate::store::secrets::SecretBox::open_or_create(&dir.join("secrets.key"))
            .map_err(|e| open_err(Box::new(e)))?;
        let blobs = BlobStore::open(dir.join("blobs")).map_err(|e| open_err(Box::new(e)))?;
        let key = load_or_create_private_key(&dir.join("director_ed25519"))
            .map_err(|e| open_err(Box::new(e)))?;
        let director_id: Option<String> = conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'director_id'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| open_err(Box::new(e)))?;
        let director_id = match director_id {
            Some(id) => id,
            None => {
                let id = format!("bosun-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('director_id', ?1)",
                    params![id],
                )
                .map_err(|e| open_err(Box::new(e)))?;
                id
            }
        };
        Ok(Arc::new(Store {
            dir: dir.to_path_buf(),
            secrets,
            conn: Mutex::new(conn),
            blobs,
            key,
            director_id,
        }))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        match self.conn.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn blobs(&self) -> &BlobStore {
        &self.blobs
    }
    pub fn director_key(&self) -> &KeyPair {
        &self.key
    }
    pub fn director_id(&self) -> &str {
        &self.director_id
    }

    pub fn get_meta(&self, key: &str) -> Result<Option<String>> {
        db(
            format!("reading setting {key}"),
            self.conn()
                .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
                    r.get(0)
                })
                .optional(),
        )
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        db(
            format!("writing setting {key}"),
            self.conn().execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![key, value],
            ),
        )
        .map(|_| ())
    }

    // ---- releases ----

    /// Store a release's archives as blobs and record it. Returns false when
    /// that name/version was already uploaded with the same content; a
    /// different content under the same name/version is refused.
    pub fn save_release(&self, release: &Release) -> Result<bool> {
        let (name, version) = (&release.manifest.name, &release.manifest.version);
        let op = format!("uploading release {name}/{version}");
        if let Some(existing) = self.release(name, version)? {
            if existing.manifest == release.manifest {
                return Ok(false);
            }
            return Err(StateError::ReleaseConflict {
                name: name.clone(),
                version: version.clone(),
            });
        }
        let archives = release
            .jobs
            .iter()
            .map(|j| (&j.sha256, &j.archive))
            .chain(release.packages.iter().map(|p| (&p.sha256, &p.archive)));
        for (sha, data) in archives {
            put_archive(&self.blobs, sha, data).map_err(|source| StateError::Blob {
                op: op.clone(),
                source,
            })?;
        }
        let rec = ReleaseRecord::from_release(release);
        let json = to_json(&op, &rec)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO releases (name, version, record, uploaded_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name, version) DO UPDATE SET record = excluded.record, uploaded_at = excluded.uploaded_at",
                params![rec.name(), rec.version(), json, now()],
            ),
        )?;
        Ok(true)
    }

    /// Store a compiled release: its job (and any source package)
    /// archives and record as [`Store::save_release`] does, the record
    /// made by [`ReleaseRecord::from_compiled_release`], and every compiled
    /// package as a blob and a [`CompiledPackage`] under (compile key,
    /// stemcell). A release already uploaded with the same jobs and package
    /// fingerprints (its source release, say) keeps its record and gains
    /// the compiled packages. Returns whether the release record is new and
    /// how many compiled packages were recorded.
    pub fn save_compiled_release(&self, release: &Release) -> Result<(bool, usize)> {
        let (name, version) = (&release.manifest.name, &release.manifest.version);
        let op = format!("uploading compiled release {name}/{version}");
        let (rec, new) = match self.release(name, version)? {
            Some(existing) if same_content(&existing, release) => (existing, false),
            Some(_) => {
                return Err(StateError::ReleaseConflict {
                    name: name.clone(),
                    version: version.clone(),
                })
            }
            None => {
                let archives = release
                    .jobs
                    .iter()
                    .map(|j| (&j.sha256, &j.archive))
                    .chain(release.packages.iter().map(|p| (&p.sha256, &p.archive)));
                for (sha, data) in archives {
                    put_archive(&self.blobs, sha, data).map_err(|source| StateError::Blob {
                        op: op.clone(),
                        source,
                    })?;
                }
                (ReleaseRecord::from_compiled_release(release), true)
            }
        };
        let mut compiled = Vec::with_capacity(release.compiled_packages.len());
        for c in &release.compiled_packages {
            let key = rec
                .compile_key(&c.name)
                .ok_or_else(|| StateError::Invalid {
                    op: op.clone(),
                    message: format!(
                        "compiled package '{}' has an unknown dependency or a dependency cycle",
                        c.name
                    ),
                })?;
            put_archive(&self.blobs, &c.sha256, &c.archive).map_err(|source| StateError::Blob {
                op: format!("{op}: compiled package {} for {}", c.name, c.stemcell),
                source,
            })?;
            compiled.push(CompiledPackage {
                name: c.name.clone(),
                fingerprint: key,
                stemcell: c.stemcell.clone(),
                sha256: c.sha256.clone(),
                size: c.archive.len(),
            });
        }
        if new {
            let json = to_json(&op, &rec)?;
            db(
                &op,
                self.conn().execute(
                    "INSERT INTO releases (name, version, record, uploaded_at) VALUES (?1, ?2, ?3, ?4)",
                    params![rec.name(), rec.version(), json, now()],
                ),
            )?;
        }
        for c in &compiled {
            self.save_compiled_package(c)?;
        }
        Ok((new, compiled.len()))
    }

    /// A release by name and version (`latest`: the last uploaded).
    pub fn release(&self, name: &str, version: &str) -> Result<Option<ReleaseRecord>> {
        let op = format!("reading release {name}/{version}");
        let conn = self.conn();
        let row: Option<String> = if version == "latest" {
            db(
                &op,
                conn.query_row(
                    "SELECT record FROM releases WHERE name = ?1 ORDER BY uploaded_at DESC, rowid DESC LIMIT 1",
                    params![name],
                    |r| r.get(0),
                )
                .optional(),
            )?
        } else {
            db(
                &op,
                conn.query_row(
                    "SELECT record FROM releases WHERE name = ?1 AND version = ?2",
                    params![name, version],
                    |r| r.get(0),
                )
                .optional(),
            )?
        };
        row.map(|s| from_json(&op, &s)).transpose()
    }

    /// Every release: (name, version, uploaded_at).
    pub fn releases(&self) -> Result<Vec<(String, String, i64)>> {
        let conn = self.conn();
        let mut stmt = db(
            "listing releases",
            conn.prepare(
                "SELECT name, version, uploaded_at FROM releases ORDER BY name, uploaded_at",
            ),
        )?;
        let rows = db(
            "listing releases",
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))),
        )?;
        db("listing releases", rows.collect())
    }

    /// Forget a release version (its blobs are the caller's to delete).
    pub fn delete_release(&self, name: &str, version: &str) -> Result<()> {
        self.execute(
            format!("deleting release {name}/{version}"),
            "DELETE FROM releases WHERE name = ?1 AND version = ?2",
            params![name, version],
        )
    }

    // ---- stemcells ----

    /// Forget a stemcell record (the CPI's copy is the caller's to delete).
    pub fn delete_stemcell(&self, cpi: &str, cid: &str) -> Result<()> {
        self.execute(
            format!("deleting stemcell {cid} of CPI {cpi}"),
            "DELETE FROM stemcells WHERE cpi = ?1 AND cid = ?2",
            params![cpi, cid],
        )
    }

    pub fn save_stemcell(&self, rec: &StemcellRecord) -> Result<()> {
        let op = format!("recording stemcell {}/{}", rec.os, rec.version);
        let json = to_json(&op, rec)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO stemcells (cpi, cid, record, uploaded_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(cpi, cid) DO UPDATE SET record = excluded.record",
                params![rec.cpi, rec.cid, json, now()],
            ),
        )
        .map(|_| ())
    }

    pub fn stemcells(&self) -> Result<Vec<StemcellRecord>> {
        self.query_records(
            "listing stemcells",
            "SELECT record FROM stemcells ORDER BY uploaded_at",
            [],
        )
    }

    // ---- compiled packages ----

    pub fn compiled_package(
        &self,
        fingerprint: &str,
        stemcell: &str,
    ) -> Result<Option<CompiledPackage>> {
        let op = format!("reading compiled package {fingerprint}");
        let row: Option<String> = db(
            &op,
            self.conn()
                .query_row(
                    "SELECT record FROM compiled_packages WHERE fingerprint = ?1 AND stemcell = ?2",
                    params![fingerprint, stemcell],
                    |r| r.get(0),
                )
                .optional(),
        )?;
        match row {
            Some(s) => {
                let c: CompiledPackage = from_json(&op, &s)?;
                // A record whose blob vanished is no cache hit.
                Ok(self.blobs.has(&c.sha256).then_some(c))
            }
            None => Ok(None),
        }
    }

    pub fn save_compiled_package(&self, c: &CompiledPackage) -> Result<()> {
        let op = format!("recording compiled package {}", c.name);
        let json = to_json(&op, c)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO compiled_packages (fingerprint, stemcell, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(fingerprint, stemcell) DO UPDATE SET record = excluded.record",
                params![c.fingerprint, c.stemcell, json],
            ),
        )
        .map(|_| ())
    }

    pub fn compiled_packages(&self) -> Result<Vec<CompiledPackage>> {
        self.query_records(
            "listing compiled packages",
            "SELECT record FROM compiled_packages ORDER BY stemcell, fingerprint",
            [],
        )
    }

    pub fn delete_compiled_package(&self, fingerprint: &str, stemcell: &str) -> Result<()> {
        self.execute(
            format!("deleting compiled package {fingerprint} for {stemcell}"),
            "DELETE FROM compiled_packages WHERE fingerprint = ?1 AND stemcell = ?2",
            params![fingerprint, stemcell],
        )
    }

    // ---- cloud config ----

    pub fn save_cloud_config(&self, text: &str) -> Result<i64> {
        let conn = self.conn();
        db(
            "saving cloud-config",
            conn.execute(
                "INSERT INTO cloud_configs (text, created_at) VALUES (?1, ?2)",
                params![text, now()],
            ),
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The latest cloud-config: (id, text).
    pub fn cloud_config(&self) -> Result<Option<(i64, String)>> {
        db(
            "reading cloud-config",
            self.conn()
                .query_row(
                    "SELECT id, text FROM cloud_configs ORDER BY id DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional(),
        )
    }

    /// Store a runtime-config; `base_dir` resolves its release `path`s.
    pub fn save_runtime_config(&self, text: &str, base_dir: &Path) -> Result<i64> {
        let conn = self.conn();
        db(
            "saving runtime-config",
            conn.execute(
                "INSERT INTO runtime_configs (text, base_dir, created_at) VALUES (?1, ?2, ?3)",
                params![text, base_dir.to_string_lossy(), now()],
            ),
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The latest runtime-config: (id, text, base dir).
    pub fn runtime_config(&self) -> Result<Option<(i64, String, PathBuf)>> {
        db(
            "reading runtime-config",
            self.conn()
                .query_row(
                    "SELECT id, text, base_dir FROM runtime_configs ORDER BY id DESC LIMIT 1",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, PathBuf::from(r.get::<_, String>(2)?))),
                )
                .optional(),
        )
    }

    // ---- deployments ----

    pub fn save_deployment(&self, rec: &DeploymentRecord) -> Result<()> {
        let op = format!("recording deployment {}", rec.name);
        let json = to_json(&op, rec)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO deployments (name, record) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET record = excluded.record",
                params![rec.name, json],
            ),
        )
        .map(|_| ())
    }

    pub fn deployment(&self, name: &str) -> Result<Option<DeploymentRecord>> {
        let mut v = self.query_records(
            &format!("reading deployment {name}"),
            "SELECT record FROM deployments WHERE name = ?1",
            params![name],
        )?;
        Ok(v.pop())
    }

    pub fn deployments(&self) -> Result<Vec<DeploymentRecord>> {
        self.query_records(
            "listing deployments",
            "SELECT record FROM deployments ORDER BY name",
            [],
        )
    }

    pub fn delete_deployment_record(&self, name: &str) -> Result<()> {
        self.execute(
            format!("deleting deployment {name}"),
            "DELETE FROM deployments WHERE name = ?1",
            params![name],
        )
    }

    // ---- instances ----

    pub fn instances(&self, deployment: &str) -> Result<Vec<InstanceRecord>> {
        let op = format!("reading instances of {deployment}");
        let rows: Vec<serde_json::Value> = self.query_records(
            &op,
            "SELECT record FROM instances WHERE deployment = ?1",
            params![deployment],
        )?;
        let mut v = rows
            .into_iter()
            .map(|r| self.open_instance(&op, r))
            .collect::<Result<Vec<_>>>()?;
        v.sort_by(|a, b| (&a.group, a.index).cmp(&(&b.group, b.index)));
        Ok(v)
    }

    /// Every instance of every deployment (for IP reservations).
    pub fn all_instances(&self) -> Result<Vec<InstanceRecord>> {
        let op = "reading all instances";
        let rows: Vec<serde_json::Value> =
            self.query_records(op, "SELECT record FROM instances", [])?;
        rows.into_iter()
            .map(|r| self.open_instance(op, r))
            .collect()
    }

    /// An instance row: its `deployed` spec (rendered templates, which may
    /// hold secrets) is kept sealed as `deployed_sealed`.
    fn open_instance(&self, op: &str, mut row: serde_json::Value) -> Result<InstanceRecord> {
        if let Some(sealed) = row
            .as_object_mut()
            .and_then(|o| o.remove("deployed_sealed"))
            .and_then(|v| v.as_str().map(str::to_string))
        {
            row["deployed"] = self.open_json(op, &sealed)?;
        }
        serde_json::from_value(row).map_err(|source| StateError::Json {
            op: op.to_string(),
            source,
        })
    }

    pub fn save_instance(&self, rec: &InstanceRecord) -> Result<()> {
        let op = format!("recording instance {}/{}", rec.group, rec.id);
        let mut row = serde_json::to_value(rec).map_err(|source| StateError::Json {
            op: op.clone(),
            source,
        })?;
        if let Some(o) = row.as_object_mut() {
            if let Some(d) = o.remove("deployed").filter(|d| !d.is_null()) {
                let sealed = self.seal_json(&op, &d)?;
                o.insert("deployed_sealed".into(), serde_json::Value::String(sealed));
            }
        }
        let json = to_json(&op, &row)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO instances (id, deployment, record) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET record = excluded.record",
                params![rec.id, rec.deployment, json],
            ),
        )
        .map(|_| ())
    }

    pub fn delete_instance(&self, id: &str) -> Result<()> {
        self.execute(
            format!("deleting instance {id}"),
            "DELETE FROM instances WHERE id = ?1",
            params![id],
        )
    }

    // ---- IP reservations ----

    /// Take the director-wide IP lock: held from planning until the plan's
    /// IPs are reserved, so two deployments planned at the same moment
    /// never pick the same address. Waits for the holder (planning takes
    /// moments), up to `wait`.
    pub fn lock_ips(&self, wait: std::time::Duration) -> Result<IpLock> {
        // `@` is outside the deployment name character set: no deployment's
        // lock file can be this one.
        let path = self.dir.join("locks").join("@ips.lock");
        let io = |source| StateError::Io {
            op: "locking IP assignment".to_string(),
            source,
        };
        let file = open_lock_file(&path).map_err(io)?;
        let deadline = std::time::Instant::now() + wait;
        loop {
            if try_flock(&file).map_err(io)? {
                return Ok(IpLock { _file: file });
            }
            if std::time::Instant::now() >= deadline {
                return Err(StateError::Locked {
                    deployment: "(IP assignment)".to_string(),
                    holder: format!(
                        "another deploy has been planning for over {} s",
                        wait.as_secs()
                    ),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Make `ips` (network, address) the IPs `deployment` holds beyond its
    /// instance records (planned, not yet recorded): replaces what it held.
    /// An address another deployment holds is refused by the primary key.
    pub fn reserve_ips(&self, deployment: &str, ips: &BTreeSet<(String, String)>) -> Result<()> {
        let op = format!("reserving IPs for deployment {deployment}");
        let mut conn = self.conn();
        let tx = db(&op, conn.transaction())?;
        db(
            &op,
            tx.execute(
                "DELETE FROM ip_reservations WHERE deployment = ?1",
                params![deployment],
            ),
        )?;
        for (network, ip) in ips {
            db(
                format!("{op}: {ip} on network {network}"),
                tx.execute(
                    "INSERT INTO ip_reservations (network, ip, deployment) VALUES (?1, ?2, ?3)",
                    params![network, ip, deployment],
                ),
            )?;
        }
        db(&op, tx.commit())
    }

    /// Drop what `deployment` reserved beyond its instance records.
    pub fn release_ips(&self, deployment: &str) -> Result<()> {
        self.execute(
            format!("releasing IPs of deployment {deployment}"),
            "DELETE FROM ip_reservations WHERE deployment = ?1",
            params![deployment],
        )
    }

    /// Every reserved (network, ip) with the deployment holding it.
    pub fn ip_reservations(&self) -> Result<Vec<(String, String, String)>> {
        let op = "reading IP reservations";
        let conn = self.conn();
        let mut stmt = db(
            op,
            conn.prepare("SELECT network, ip, deployment FROM ip_reservations"),
        )?;
        let rows = db(
            op,
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))),
        )?;
        db(op, rows.collect())
    }

    // ---- orphaned disks ----

    pub fn save_orphan_disk(&self, d: &OrphanDisk) -> Result<()> {
        let op = format!("recording orphaned disk {}", d.cid);
        let json = to_json(&op, d)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO orphan_disks (cid, record) VALUES (?1, ?2)
                 ON CONFLICT(cid) DO UPDATE SET record = excluded.record",
                params![d.cid, json],
            ),
        )
        .map(|_| ())
    }

    /// Forget an orphaned disk (after the CPI deleted it).
    pub fn delete_orphan_disk(&self, cid: &str) -> Result<()> {
        self.execute(
            format!("forgetting orphaned disk {cid}"),
            "DELETE FROM orphan_disks WHERE cid = ?1",
            params![cid],
        )
    }

    pub fn orphan_disks(&self) -> Result<Vec<OrphanDisk>> {
        self.query_records(
            "listing orphaned disks",
            "SELECT record FROM orphan_disks ORDER BY cid",
            [],
        )
    }

    // ---- tasks ----

    /// Record a new running task; returns it with its id. Its log
    /// directory is created.
    pub fn create_task(&self, description: &str, deployment: Option<&str>) -> Result<TaskRecord> {
        let op = "recording a task";
        let mut t = TaskRecord {
            id: 0,
            description: description.to_string(),
            deployment: deployment.map(str::to_string),
            state: "running".into(),
            started_at: now(),
            ended_at: None,
            result: String::new(),
            pid: std::process::id(),
        };
        let json = to_json(op, &t)?;
        let conn = self.conn();
        db(
            op,
            conn.execute("INSERT INTO tasks (record) VALUES (?1)", params![json]),
        )?;
        t.id = conn.last_insert_rowid();
        drop(conn);
        std::fs::create_dir_all(self.task_dir(t.id)).map_err(|source| StateError::Io {
            op: format!("creating the log directory of task {}", t.id),
            source,
        })?;
        self.save_task(&t)?;
        Ok(t)
    }

    pub fn save_task(&self, t: &TaskRecord) -> Result<()> {
        let op = format!("recording task {}", t.id);
        let json = to_json(&op, t)?;
        db(
            op,
            self.conn().execute(
                "UPDATE tasks SET record = ?1 WHERE id = ?2",
                params![json, t.id],
            ),
        )
        .map(|_| ())
    }

    /// The most recent `limit` tasks, newest first. A task still `running`
    /// whose process is gone is shown as `error` (it died).
    pub fn tasks(&self, limit: usize) -> Result<Vec<TaskRecord>> {
        let op = "listing tasks";
        let conn = self.conn();
        let mut stmt = db(
            op,
            conn.prepare("SELECT id, record FROM tasks ORDER BY id DESC LIMIT ?1"),
        )?;
        let rows = db(
            op,
            stmt.query_map(params![limit as i64], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            }),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = db(op, row)?;
            let mut t: TaskRecord = from_json(op, &json)?;
            t.id = id;
            if t.state == "running" && !Path::new(&format!("/proc/{}", t.pid)).exists() {
                t.state = "error".into();
                t.result = "the bosun process running it is gone".into();
            }
            out.push(t);
        }
        Ok(out)
    }

    pub fn task(&self, id: i64) -> Result<Option<TaskRecord>> {
        Ok(self
            .tasks(usize::MAX >> 1)?
            .into_iter()
            .find(|t| t.id == id))
    }

    /// Where a task's logs are: `event.log` (what the command printed),
    /// `debug.log` (the director's log), `cpi.log` (every CPI call).
    pub fn task_dir(&self, id: i64) -> PathBuf {
        self.dir.join("tasks").join(id.to_string())
    }

    // ---- variables ----

    /// A generated variable and its value (opened), if stored.
    pub fn variable(
        &self,
        deployment: &str,
        name: &str,
    ) -> Result<Option<(VariableRecord, serde_json::Value)>> {
        let op = format!("reading variable {name} of {deployment}");
        let row: Option<(String, String)> = db(
            &op,
            self.conn()
                .query_row(
                    "SELECT record, sealed FROM variables WHERE deployment = ?1 AND name = ?2",
                    params![deployment, name],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional(),
        )?;
        let Some((record, sealed)) = row else {
            return Ok(None);
        };
        let rec: VariableRecord = from_json(&op, &record)?;
        Ok(Some((rec, self.open_json(&op, &sealed)?)))
    }

    /// A JSON value encrypted with the state's secrets key.
    fn seal_json(&self, op: &str, value: &serde_json::Value) -> Result<String> {
        let plain = serde_json::to_vec(value).map_err(|source| StateError::Json {
            op: op.to_string(),
            source,
        })?;
        self.secrets
            .seal(&plain)
            .map_err(|source| StateError::Secret {
                op: op.to_string(),
                source,
            })
    }

    /// The JSON value [`Store::seal_json`] sealed.
    fn open_json(&self, op: &str, sealed: &str) -> Result<serde_json::Value> {
        let plain = self
            .secrets
            .open(sealed)
            .map_err(|source| StateError::Secret {
                op: op.to_string(),
                source,
            })?;
        serde_json::from_slice(&plain).map_err(|source| StateError::Json {
            op: op.to_string(),
            source,
        })
    }

    /// Store (or replace) a generated variable, its value sealed.
    pub fn save_variable(&self, rec: &VariableRecord, value: &serde_json::Value) -> Result<()> {
        let op = format!("storing variable {} of {}", rec.name, rec.deployment);
        let sealed = self.seal_json(&op, value)?;
        let json = to_json(&op, rec)?;
        db(
            op,
            self.conn().execute(
                "INSERT INTO variables (deployment, name, record, sealed) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(deployment, name) DO UPDATE SET record = excluded.record, sealed = excluded.sealed",
                params![rec.deployment, rec.name, json, sealed],
            ),
        )
        .map(|_| ())
    }

    /// A deployment's generated variables (names and ids, never values).
    pub fn variables(&self, deployment: &str) -> Result<Vec<VariableRecord>> {
        self.query_records(
            "listing variables",
            "SELECT record FROM variables WHERE deployment = ?1 ORDER BY name",
            params![deployment],
        )
    }

    // ---- events ----

    /// Record an event that describes an operation already done: a failed
    /// write must not fail that operation, so it is logged here, once, with
    /// its cause chain, instead of being returned.
    pub fn record_event(&self, e: &Event) {
        if let Err(err) = self.add_event(e) {
            tracing::warn!(
                source = %e.source,
                action = %e.action,
                object = %e.object,
                "event not recorded: {}",
                Chain(&err)
            );
        }
    }

    pub fn add_event(&self, e: &Event) -> Result<()> {
        let json = to_json("recording event", e)?;
        db(
            "recording event",
            self.conn().execute(
                "INSERT INTO events (deployment, record) VALUES (?1, ?2)",
                params![e.deployment, json],
            ),
        )
        .map(|_| ())
    }

    /// Events in the order they were recorded, optionally of one deployment
    /// and only those after event `after` (for following the log).
    pub fn events(&self, deployment: Option<&str>, after: i64) -> Result<Vec<Event>> {
        let op = "listing events";
        let conn = self.conn();
        let mut stmt = db(
            op,
            conn.prepare(
                "SELECT id, record FROM events
                 WHERE (?1 IS NULL OR deployment = ?1) AND id > ?2 ORDER BY id",
            ),
        )?;
        let rows = db(
            op,
            stmt.query_map(params![deployment, after], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            }),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, json) = db(op, row)?;
            let mut e: Event = from_json(op, &json)?;
            e.id = id;
            if e.time_ms == 0 {
                e.time_ms = e.time * 1000;
            }
            out.push(e);
        }
        Ok(out)
    }

    /// Run one changing statement (the error names `op`).
    fn execute<P: rusqlite::Params>(&self, op: String, sql: &str, p: P) -> Result<()> {
        db(op, self.conn().execute(sql, p)).map(|_| ())
    }

    fn query_records<T: DeserializeOwned, P: rusqlite::Params>(
        &self,
        op: &str,
        sql: &str,
        p: P,
    ) -> Result<Vec<T>> {
        let conn = self.conn();
        let mut stmt = db(op, conn.prepare(sql))?;
        let rows = db(op, stmt.query_map(p, |r| r.get::<_, String>(0)))?;
        let mut out = Vec::new();
        for row in rows {
            out.push(from_json(op, &db(op, row)?)?);
        }
        Ok(out)
    }

    // ---- locks ----

    /// Take the deployment's lock, waiting up to 3 s for a holder that is
    /// about to let go (the health monitor holds it only for a moment
    /// unless it repairs), then failing with an error that names the holder.
    /// The lock is an flock, so a holder that dies releases it.
    pub fn lock_deployment(&self, name: &str) -> Result<DeploymentLock> {
        self.lock_deployment_as(name, "", std::time::Duration::from_secs(3))
    }

    /// Try the lock once, without waiting.
    pub fn try_lock_deployment(&self, name: &str, purpose: &str) -> Result<DeploymentLock> {
        self.lock_deployment_as(name, purpose, std::time::Duration::ZERO)
    }

    fn lock_deployment_as(
        &self,
        name: &str,
        purpose: &str,
        wait: std::time::Duration,
    ) -> Result<DeploymentLock> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.lock_once(name, purpose) {
                Err(StateError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    fn lock_once(&self, name: &str, purpose: &str) -> Result<DeploymentLock> {
        // The name becomes a file name: never let it leave `locks/`.
        crate::model::names::check("deployment name", name)?;
        let path = self.dir.join("locks").join(format!("{name}.lock"));
        let io = |source| StateError::Io {
            op: format!("locking deployment {name}"),
            source,
        };
        let mut file = open_lock_file(&path).map_err(io)?;
        if !try_flock(&file).map_err(io)? {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(StateError::Locked {
                deployment: name.to_string(),
                holder: holder.trim().to_string(),
            });
        }
        file.set_len(0).map_err(io)?;
        writeln!(
            file,
            "pid {} since {}{}{}",
            std::process::id(),
            now(),
            if purpose.is_empty() { "" } else { ": " },
            purpose
        )
        .map_err(io)?;
        Ok(DeploymentLock { _file: file })
    }
}

/// A lock file under `locks/`, created if needed and never truncated on open
/// (it names its holder).
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
}

/// Take an exclusive flock on `file` without waiting: `false` when another
/// holder has it. The lock dies with the process that holds it.
fn try_flock(file: &File) -> std::io::Result<bool> {
    // SAFETY: flock on a file descriptor we own; no memory is touched.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(err),
    }
}

/// Held while a deploy picks and reserves IPs; dropping it releases it.
pub struct IpLock {
    _file: File,
}

/// Held while a deployment changes; dropping it releases the lock.
pub struct DeploymentLock {
    _file: File,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    fn instance(id: &str, index: u32) -> InstanceRecord {
        InstanceRecord::new(id.into(), "d", "kv", index, "z1")
    }

    #[test]
    fn instances_round_trip_and_identity_persists() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let id = s.director_id().to_string();
        s.save_instance(&instance("b", 1)).unwrap();
        s.save_instance(&instance("a", 0)).unwrap();
        let got = s.instances("d").unwrap();
        assert_eq!(got.iter().map(|i| i.index).collect::<Vec<_>>(), vec![0, 1]);
        s.delete_instance("a").unwrap();
        assert_eq!(s.instances("d").unwrap().len(), 1);
        let key = s.director_key().public_openssh.clone();
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.director_id(), id);
        assert_eq!(s.director_key().public_openssh, key);
    }

    #[test]
    fn a_deployment_name_never_leaves_the_locks_directory() {
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("Cargo.lock");
        std::fs::write(&precious, "precious").unwrap();
        let s = Store::open(&dir.path().join("x").join("state")).unwrap();
        let abs = format!("{}/Cargo", dir.path().display());
        for name in [
            "../../Cargo",
            "../../../Cargo",
            abs.as_str(),
            "..",
            "a/b",
            "",
        ] {
            match s.lock_deployment(name) {
                Err(StateError::Name(e)) => {
                    assert!(e.to_string().contains("not a valid name"), "{e}")
                }
                Err(e) => panic!("{name}: {e}"),
                Ok(_) => panic!("{name}: locked"),
            }
        }
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious");
        let names: Vec<_> = std::fs::read_dir(s.dir().join("locks"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.is_empty(), "{names:?}");
    }

    #[test]
    fn state_dir_is_owner_only_and_an_empty_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        drop(Store::open(&state).unwrap());
        let mode = std::fs::metadata(&state).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(state.join("state.db"), "").unwrap();
        let _ = std::fs::remove_file(state.join("state.db-wal"));
        let e = Store::open(&state).err().expect("refused");
        assert!(e.to_string().contains("state.db is empty (0 bytes)"), "{e}");
        assert_eq!(std::fs::metadata(state.join("state.db")).unwrap().len(), 0);
    }

    #[test]
    fn ip_reservations_belong_to_one_deployment_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let ips = |list: &[&str]| -> BTreeSet<(String, String)> {
            list.iter()
                .map(|ip| ("default".to_string(), ip.to_string()))
                .collect()
        };
        s.reserve_ips("a", &ips(&["10.0.0.2", "10.0.0.3"])).unwrap();
        // Another deployment cannot reserve an address `a` holds.
        let e = s
            .reserve_ips("b", &ips(&["10.0.0.4", "10.0.0.3"]))
            .unwrap_err();
        assert!(e.to_string().contains("10.0.0.3"), "{e}");
        // ... and its failed attempt reserved nothing.
        let held: Vec<_> = s.ip_reservations().unwrap();
        assert_eq!(held.len(), 2, "{held:?}");
        assert!(held.iter().all(|(_, _, d)| d == "a"));
        // A new plan of `a` replaces what it held; releasing frees it all.
        s.reserve_ips("a", &ips(&["10.0.0.5"])).unwrap();
        assert_eq!(s.ip_reservations().unwrap().len(), 1);
        s.reserve_ips("b", &ips(&["10.0.0.3"])).unwrap();
        s.release_ips("a").unwrap();
        assert_eq!(
            s.ip_reservations().unwrap(),
            vec![("default".into(), "10.0.0.3".into(), "b".into())]
        );
        // The IP lock is exclusive and waits at most as long as told.
        let held = s.lock_ips(Duration::ZERO).unwrap();
        let e = s.lock_ips(Duration::from_millis(50)).err().expect("held");
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        drop(held);
        assert!(s.lock_ips(Duration::ZERO).is_ok());
    }

    #[test]
    fn second_lock_fails_with_holder() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let lock = s.lock_deployment("q").unwrap();
        let err = s.try_lock_deployment("q", "").err().unwrap().to_string();
        assert!(
            err.contains("locked by another bosun process (pid"),
            "{err}"
        );
        drop(lock);
        assert!(s.lock_deployment("q").is_ok());
    }

    #[test]
    fn variables_are_sealed_at_rest_and_listed_without_values() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let rec = VariableRecord {
            deployment: "d".into(),
            name: "admin_password".into(),
            id: "v1".into(),
            kind: "password".into(),
            definition_digest: "x".into(),
            created_at: 1,
        };
        s.save_variable(&rec, &serde_json::json!("s3cr3t-value"))
            .unwrap();
        let (got, value) = s.variable("d", "admin_password").unwrap().unwrap();
        assert_eq!(
            (got, value),
            (rec.clone(), serde_json::json!("s3cr3t-value"))
        );
        assert_eq!(s.variables("d").unwrap(), vec![rec]);
        assert!(s.variable("d", "other").unwrap().is_none());
        drop(s);
        let db = std::fs::read(dir.path().join("state.db")).unwrap();
        let wal = std::fs::read(dir.path().join("state.db-wal")).unwrap_or_default();
        for bytes in [db, wal] {
            assert!(
                !bytes.windows(12).any(|w| w == b"s3cr3t-value"),
                "the value is not stored in clear"
            );
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn cloud_config_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.cloud_config().unwrap().is_none());
        s.save_cloud_config("a: 1").unwrap();
        let id = s.save_cloud_config("a: 2").unwrap();
        assert_eq!(s.cloud_config().unwrap(), Some((id, "a: 2".to_string())));
    }
}

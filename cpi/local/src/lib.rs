//! The local CPI: VMs, disks and stemcells on this machine, no daemon.
//!
//! Owns everything under its root directory (`<state-dir>/local-cpi`):
//!
//! ```text
//! stemcells/<cid>.json        the recorded StemcellSpec (the stemcell is the host itself)
//! vms/<cid>/                  a VM, 0700 (root's alone: the settings hold its host key)
//! vms/<cid>/vcap/             the VM's /var/vcap (bosh/settings.json, data/, store/, sys/log/, jobs/, packages/)
//! vms/<cid>/meta.json         agent id, stemcell, cloud properties, metadata
//! vms/<cid>/pid               the agent process (host pid)
//! vms/<cid>/agent.log         the agent's stdout and stderr
//! disks/<cid>/                a persistent disk (a directory)
//! disks/<cid>.json            its size, metadata and the VM it is attached to
//! snapshots/<cid>/ + .json    a copy of a disk and its metadata
//! vms/.creating-<cid>/ + .lock  a VM being laid out, and its builder's lock
//! ```
//!
//! A staging directory whose builder died (its lock released) is removed
//! by the next `create_vm`, `delete_vm` or `find_vms`, so a crash in the
//! middle of `create_vm` leaks no host key.
//!
//! A VM is an agent process (`agent_command --settings /var/vcap/bosh/settings.json
//! --vm-root <vm>/vcap`) that calls [`enter_vm_namespace`] first: it then runs
//! as PID 1 of its own PID namespace, in its own mount namespace (plus a user
//! namespace when not root) where the VM directory is bound at `/var/vcap`. The
//! host network is shared: the agent listens on its own loopback address.
//! Killing the recorded process takes the whole namespace with it.
//!
//! This crate must not talk to the agent (it only writes its settings file and
//! starts/kills its process), must not call the director, and must not know
//! about manifests or deployments. Every state change is written atomically
//! (temporary file + rename).

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun_cpi::records;
use bosun_cpi::{
    CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint, Metadata,
    SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};
use serde::{Deserialize, Serialize};

/// Where the agent finds its settings inside the VM.
pub const SETTINGS_PATH_IN_VM: &str = "/var/vcap/bosh/settings.json";
/// Where each VM's directory is bound inside its mount namespace.
pub const VCAP_MOUNT_POINT: &str = "/var/vcap";
/// How long delete_vm / reboot_vm wait for a killed agent to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Configuration of the local CPI.
#[derive(Clone, Debug)]
pub struct LocalCpiConfig {
    /// Where VMs, disks and stemcells live, e.g. <state-dir>/local-cpi
    pub root: PathBuf,
    /// The program to run as the agent, with its leading args, e.g. ["/path/to/bosun", "agent"].
    pub agent_command: Vec<String>,
}

/// Everything that can go wrong in the local CPI.
#[derive(Debug, thiserror::Error)]
pub enum LocalCpiError {
    #[error("VM {0} not found")]
    VmNotFound(VmCid),
    #[error("disk {0} not found")]
    DiskNotFound(DiskCid),
    #[error("stemcell {0} not found")]
    StemcellNotFound(StemcellCid),
    #[error("local CPI: invalid configuration: {0}")]
    Config(String),
    #[error("local CPI: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("local CPI: {}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("local CPI: {0}")]
    Conflict(String),
    #[error("local CPI: starting the agent for {vm} ({command}): {source}")]
    Spawn {
        vm: VmCid,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("local CPI: {0} (retry)")]
    StillRunning(String),
    #[error("VM namespace: {step} failed: {source}{hint}")]
    Namespace {
        step: &'static str,
        /// What is missing, starting with "; " (or empty).
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("local CPI: internal error: {0}")]
    Internal(String),
}

impl From<records::RecordError> for LocalCpiError {
    fn from(e: records::RecordError) -> Self {
        match e {
            records::RecordError::Io { op, path, source } => LocalCpiError::Io { op, path, source },
            records::RecordError::Json { path, source } => LocalCpiError::Json { path, source },
        }
    }
}

impl From<LocalCpiError> for CpiError {
    fn from(e: LocalCpiError) -> Self {
        match e {
            LocalCpiError::VmNotFound(cid) => CpiError::VmNotFound(cid),
            LocalCpiError::DiskNotFound(cid) => CpiError::DiskNotFound(cid),
            LocalCpiError::StemcellNotFound(cid) => CpiError::StemcellNotFound(cid),
            LocalCpiError::StillRunning(_) => CpiError::Transient {
                message: e.to_string(),
                retry_after: Some(Duration::from_secs(1)),
            },
            other => CpiError::fatal(other.to_string()),
        }
    }
}

type Result<T, E = LocalCpiError> = std::result::Result<T, E>;

/// Prefixes a fatal error's message with the operation it failed in.
fn in_context(e: CpiError, what: &str) -> CpiError {
    match e {
        CpiError::Fatal { message } => CpiError::fatal(format!("{what}: {message}")),
        other => other,
    }
}

fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> LocalCpiError + 'p {
    move |source| LocalCpiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// `vms/<cid>/meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct VmMeta {
    cid: VmCid,
    agent_id: String,
    stemcell: StemcellCid,
    #[serde(default)]
    cloud_properties: serde_json::Value,
    #[serde(default)]
    metadata: Metadata,
}

/// `disks/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct DiskRecord {
    cid: DiskCid,
    size_mb: u64,
    #[serde(default)]
    cloud_properties: serde_json::Value,
    #[serde(default)]
    metadata: Metadata,
    attached_to: Option<VmCid>,
}

/// `snapshots/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SnapshotRecord {
    cid: SnapshotCid,
    disk: DiskCid,
    #[serde(default)]
    metadata: Metadata,
}

/// How old a trash (`.deleting-*`) directory, or a staging one without its
/// lock file, must be to count as left behind by a crash: each lives for
/// milliseconds.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Prefix of staging directories (and of their lock files).
const STAGING_PREFIX: &str = ".creating-";
/// Suffix of a staging directory's lock file.
const LOCK_SUFFIX: &str = ".lock";

/// A directory being built aside (`<parent>/.creating-<name>`, 0700) before
/// it is renamed into place. While it lives, its lock file
/// (`.creating-<name>.lock`, created first) is locked (flock), so a sweep
/// ([`sweep_staging`]) tells a staging directory in use from one whose
/// builder died (a crash or abort releases the lock): that one is removed at
/// once, whatever its age. Dropped without [`Staging::commit`], the
/// directory is removed.
struct Staging {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: fs::File,
}

impl Staging {
    fn create(parent: &Path, name: &str) -> Result<Staging> {
        use std::os::unix::fs::DirBuilderExt;
        let path = parent.join(format!("{STAGING_PREFIX}{name}"));
        let lock_path = parent.join(format!("{STAGING_PREFIX}{name}{LOCK_SUFFIX}"));
        let lock = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lock_path)
            .map_err(io_err("creating", &lock_path))?;
        let staging = Staging {
            path,
            lock_path,
            _lock: lock,
        };
        let locked = try_lock(&staging._lock).map_err(io_err("locking", &staging.lock_path))?;
        if !locked {
            return Err(LocalCpiError::Internal(format!(
                "{} is locked by another process",
                staging.lock_path.display()
            )));
        }
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging.path)
            .map_err(io_err("creating", &staging.path))?;
        Ok(staging)
    }

    /// Renames the directory into place (then the lock file goes).
    fn commit(self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).map_err(io_err("renaming into place", dest))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Committed: the directory is gone already. Otherwise a failed build.
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "local CPI: cannot remove a staging directory")
            }
            _ => {}
        }
        if let Err(e) = fs::remove_file(&self.lock_path) {
            tracing::warn!(path = %self.lock_path.display(), error = %e, "local CPI: cannot remove a staging lock file");
        }
    }
}

/// Takes an exclusive flock without waiting: false when another open file
/// holds it.
fn try_lock(file: &fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Removes what a crash left in `dir`: staging directories whose builder is
/// gone (their lock file unlocked; without one, older than
/// [`ABANDONED_AFTER`]), their lock files, and trash directories older than
/// [`ABANDONED_AFTER`]. Best effort: failures are logged.
fn sweep_staging(dir: &Path) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "local CPI: cannot list for leftovers of a crash");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if let Some(staged) = name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|n| n.strip_suffix(LOCK_SUFFIX))
        {
            remove_if_builder_gone(&dir.join(format!("{STAGING_PREFIX}{staged}")), &path);
        } else if name.starts_with(STAGING_PREFIX) {
            let lock = dir.join(format!("{name}{LOCK_SUFFIX}"));
            if !lock.exists() {
                remove_if_abandoned(&path);
            }
        } else if name.starts_with(".deleting-") {
            remove_if_abandoned(&path);
        }
    }
}

/// Removes `staging` and its lock file when no process holds the lock.
fn remove_if_builder_gone(staging: &Path, lock_path: &Path) {
    let lock = match fs::File::open(lock_path) {
        Ok(f) => f,
        // Committed or removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot open a staging lock file");
            return;
        }
    };
    match try_lock(&lock) {
        Ok(true) => {}
        Ok(false) => return, // in use
        Err(e) => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot lock a staging lock file");
            return;
        }
    }
    match fs::remove_dir_all(staging) {
        Ok(()) => {
            tracing::info!(path = %staging.display(), "local CPI: removed a directory left by a crash")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %staging.display(), error = %e, "local CPI: cannot remove a directory left by a crash");
            return;
        }
    }
    match fs::remove_file(lock_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot remove a staging lock file")
        }
        _ => {}
    }
}

/// Remove `path` when it is older than [`ABANDONED_AFTER`] (best effort).
fn remove_if_abandoned(path: &Path) {
    let old = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER);
    if old {
        match fs::remove_dir_all(path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "local CPI: removed a directory left by a crash")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "local CPI: cannot remove a directory left by a crash")
            }
        }
    }
}

/// A cid is used as a file name: only `[A-Za-z0-9._-]`, not starting with a dot.
fn valid_cid(cid: &str) -> bool {
    !cid.is_empty()
        && !cid.starts_with('.')
        && cid.len() <= 200
        && cid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    Ok(records::write_atomic(path, bytes, mode)?)
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T, mode: u32) -> Result<()> {
    Ok(records::write_json(path, value, mode)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    Ok(records::read_json(path)?)
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    Ok(records::remove_file_if_exists(path)?)
}

/// A mount point at or below `path`, as this process sees the mounts.
fn mount_point_under(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let base = path.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .find(|m| m == &base || m.starts_with(&format!("{base}/")))
}

/// Removes a directory tree: renamed aside first so it disappears at once.
fn remove_dir_atomic(path: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(LocalCpiError::Internal(format!(
            "refusing to remove {}",
            path.display()
        )));
    };
    // Never recurse into a mounted persistent disk: that would delete its data.
    if let Some(mount) = mount_point_under(path) {
        return Err(LocalCpiError::Internal(format!(
            "refusing to remove {}: {} is mounted inside it (a persistent disk?); unmount it first",
            path.display(),
            mount
        )));
    }
    let trash = dir.join(format!(
        ".deleting-{}-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4()
    ));
    match fs::rename(path, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("moving aside for removal", path)(e)),
    }
    fs::remove_dir_all(&trash).map_err(io_err("removing", &trash))
}

/// Copies a directory tree (files, directories, symlinks; permissions kept).
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir(to).map_err(io_err("creating", to))?;
    let perms = fs::metadata(from)
        .map_err(io_err("inspecting", from))?
        .permissions();
    for entry in fs::read_dir(from).map_err(io_err("listing", from))? {
        let entry = entry.map_err(io_err("listing", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type().map_err(io_err("inspecting", &src))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("reading link", &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io_err("creating link", &dst))?;
        } else if ty.is_file() {
            fs::copy(&src, &dst).map_err(io_err("copying to", &dst))?;
        }
        // Sockets, fifos and devices are not data: skipped.
    }
    fs::set_permissions(to, perms).map_err(io_err("setting permissions of", to))
}

// ---------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------

/// Whether `pid` is a live process (not a zombie) whose command line contains `needle`.
fn process_alive_with(pid: i32, needle: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may contain anything).
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X") | Some("x")) {
        return false;
    }
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => contains(&cmdline, needle.as_bytes()),
        Err(_) => false,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Live processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me && process_alive_with(pid, needle))
        .collect()
}

fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

// ---------------------------------------------------------------------------
// The CPI
// ---------------------------------------------------------------------------

/// The local CPI (see the crate documentation).
pub struct LocalCpi {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    agent_command: Vec<String>,
    /// Serialises read-modify-write of records (attachments, settings, metadata).
    lock: Mutex<()>,
}

impl LocalCpi {
    /// Creates the root layout (`stemcells/`, `vms/`, `disks/`, `snapshots/`).
    pub fn new(config: LocalCpiConfig) -> Result<LocalCpi, LocalCpiError> {
        if config.agent_command.is_empty() || config.agent_command[0].is_empty() {
            return Err(LocalCpiError::Config(
                "agent_command is empty (want e.g. [\"/path/to/bosun\", \"agent\"])".into(),
            ));
        }
        for sub in ["stemcells", "vms", "disks", "snapshots"] {
            let dir = config.root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        let root = fs::canonicalize(&config.root).map_err(io_err("resolving", &config.root))?;
        Ok(LocalCpi {
            inner: Arc::new(Inner {
                root,
                agent_command: config.agent_command,
                lock: Mutex::new(()),
            }),
        })
    }

    /// The (absolute) root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// The host directory of a VM (`<root>/vms/<cid>`), whether or not it exists.
    pub fn vm_dir(&self, cid: &VmCid) -> PathBuf {
        self.inner.vm_dir(cid)
    }

    async fn blocking<T, F>(&self, f: F) -> CpiResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| CpiError::fatal(format!("local CPI: worker thread failed: {e}")))?
            .map_err(CpiError::from)
    }
}

impl Inner {
    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stemcell_file(&self, cid: &StemcellCid) -> PathBuf {
        self.root.join("stemcells").join(format!("{cid}.json"))
    }
    fn vm_dir(&self, cid: &VmCid) -> PathBuf {
        self.root.join("vms").join(&cid.0)
    }
    fn vcap_dir(&self, cid: &VmCid) -> PathBuf {
        self.vm_dir(cid).join("vcap")
    }
    fn settings_file(&self, cid: &VmCid) -> PathBuf {
        self.vcap_dir(cid).join("bosh").join("settings.json")
    }
    fn disk_dir(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(&cid.0)
    }
    fn disk_file(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(format!("{cid}.json"))
    }
    fn snapshot_dir(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(&cid.0)
    }
    fn snapshot_file(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(format!("{cid}.json"))
    }

    // --- stemcells ---------------------------------------------------------

    fn create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let cid = StemcellCid(format!("stemcell-{}", uuid::Uuid::new_v4()));
        write_json(&self.stemcell_file(&cid), spec, 0o644)?;
        Ok(cid)
    }

    fn delete_stemcell(&self, cid: &StemcellCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        remove_file_if_exists(&self.stemcell_file(cid))
    }

    // --- VMs ---------------------------------------------------------------

    fn vm_exists(&self, cid: &VmCid) -> bool {
        valid_cid(&cid.0) && self.vm_dir(cid).is_dir()
    }

    fn require_vm(&self, cid: &VmCid) -> Result<()> {
        if self.vm_exists(cid) {
            Ok(())
        } else {
            Err(LocalCpiError::VmNotFound(cid.clone()))
        }
    }

    /// Lays out `vms/<cid>/` (built aside, then renamed into place); no process.
    fn prepare_vm_dir(&self, req: &CreateVmRequest) -> Result<VmCid> {
        if !valid_cid(&req.stemcell.0) || !self.stemcell_file(&req.stemcell).is_file() {
            return Err(LocalCpiError::StemcellNotFound(req.stemcell.clone()));
        }
        let cid = VmCid(format!("vm-{}", uuid::Uuid::new_v4()));
        let vms = self.root.join("vms");
        sweep_staging(&vms);
        // 0700 from the start: the settings hold the agent's host key.
        let staging = Staging::create(&vms, &cid.0)?;
        let vcap = staging.path.join("vcap");
        for sub in ["bosh", "data", "store", "sys/log", "jobs", "packages"] {
            let d = vcap.join(sub);
            fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
        }
        let bosh = vcap.join("bosh");
        fs::set_permissions(&bosh, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions of", &bosh))?;
        write_json(&bosh.join("settings.json"), &req.settings, 0o600)?;
        let meta = VmMeta {
            cid: cid.clone(),
            agent_id: req.agent_id.clone(),
            stemcell: req.stemcell.clone(),
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
        };
        write_json(&staging.path.join("meta.json"), &meta, 0o644)?;
        staging.commit(&self.vm_dir(&cid))?;
        Ok(cid)
    }

    fn create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
        let cid = self.prepare_vm_dir(req)?;
        if let Err(e) = self.spawn_agent(&cid) {
            let _ = remove_dir_atomic(&self.vm_dir(&cid));
            return Err(e);
        }
        tracing::info!(vm = %cid, agent_id = %req.agent_id, "local CPI: created VM");
        Ok(cid)
    }

    /// Starts the agent detached (own session, stdin null, output appended to
    /// agent.log), records its pid, and reaps it from a background thread.
    fn spawn_agent(&self, cid: &VmCid) -> Result<()> {
        let dir = self.vm_dir(cid);
        let vcap = self.vcap_dir(cid);
        // Only root on the host may look inside (rendered secrets, host key);
        // a VM created by an older version is restricted at its next start.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions of", &dir))?;
        let log_path = dir.join("agent.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log_path)
            .map_err(io_err("opening", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("opening", &log_path))?;
        let mut cmd = Command::new(&self.agent_command[0]);
        cmd.args(&self.agent_command[1..])
            .arg("--settings")
            .arg(SETTINGS_PATH_IN_VM)
            .arg("--vm-root")
            .arg(&vcap)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LocalCpiError::Spawn {
            vm: cid.clone(),
            command: self.agent_command.join(" "),
            source,
        })?;
        let pid = child.id();
        let pid_file = dir.join("pid");
        let recorded = write_atomic(&pid_file, format!("{pid}\n").as_bytes(), 0o644);
        // Reap it whenever it exits, so it never lingers as a zombie.
        let name = format!("reap-{cid}");
        let reaper = std::thread::Builder::new().name(name).spawn(move || {
            let _ = child.wait();
        });
        if let Err(e) = recorded {
            kill(pid as i32, libc::SIGKILL);
            return Err(e);
        }
        if let Err(e) = reaper {
            // No reaper thread: the process is still killable by delete_vm, it
            // may just stay a zombie until this process exits.
            tracing::warn!(vm = %cid, "local CPI: cannot start reaper thread: {e}");
        }
        Ok(())
    }

    fn recorded_pid(&self, cid: &VmCid) -> Option<i32> {
        fs::read_to_string(self.vm_dir(cid).join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 0)
    }

    fn has_vm(&self, cid: &VmCid) -> bool {
        if !self.vm_exists(cid) {
            return false;
        }
        match self.recorded_pid(cid) {
            Some(pid) => process_alive_with(pid, &self.vm_marker(cid)),
            None => false,
        }
    }

    /// What the agent's command line contains (`--vm-root <vm>/vcap`, NUL-separated
    /// as in /proc/<pid>/cmdline), and nothing else's does (not even a host
    /// process that merely names a file of the VM).
    fn vm_marker(&self, cid: &VmCid) -> String {
        format!("--vm-root\0{}\0", self.vcap_dir(cid).to_string_lossy())
    }

    /// SIGKILLs the agent (its process group too, and any other process
    /// started with this VM's `--vm-root`) and waits until it is gone; its
    /// PID namespace, and so every job, dies with it.
    fn kill_agent(&self, cid: &VmCid) -> Result<()> {
        let marker = self.vm_marker(cid);
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut pids = processes_with(&marker);
            if let Some(pid) = self.recorded_pid(cid) {
                if process_alive_with(pid, &marker) && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LocalCpiError::StillRunning(format!(
                    "the agent of VM {cid} (pids {pids:?}) is still running {}s after SIGKILL",
                    KILL_TIMEOUT.as_secs()
                )));
            }
            for pid in pids {
                // The agent leads its own session/process group (setsid).
                kill(-pid, libc::SIGKILL);
                kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn delete_vm(&self, cid: &VmCid) -> Result<()> {
        sweep_staging(&self.root.join("vms"));
        if !self.vm_exists(cid) {
            return Ok(());
        }
        self.kill_agent(cid)?;
        {
            let _g = self.guard();
            for mut disk in self.disk_records()? {
                if disk.attached_to.as_ref() == Some(cid) {
                    disk.attached_to = None;
                    write_json(&self.disk_file(&disk.cid), &disk, 0o644)?;
                }
            }
            remove_dir_atomic(&self.vm_dir(cid))?;
        }
        tracing::info!(vm = %cid, "local CPI: deleted VM");
        Ok(())
    }

    fn reboot_vm(&self, cid: &VmCid) -> Result<()> {
        self.require_vm(cid)?;
        self.kill_agent(cid)?;
        {
            let _g = self.guard();
            let disks: BTreeMap<String, serde_json::Value> = self
                .disk_records()?
                .into_iter()
                .filter(|d| d.attached_to.as_ref() == Some(cid))
                .map(|d| (d.cid.0.clone(), self.disk_hint_json(&d.cid)))
                .collect();
            self.update_settings_disks(cid, |map| *map = disks.into_iter().collect())?;
        }
        self.spawn_agent(cid)?;
        tracing::info!(vm = %cid, "local CPI: rebooted VM");
        Ok(())
    }

    fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> Result<()> {
        self.require_vm(cid)?;
        let _g = self.guard();
        let path = self.vm_dir(cid).join("meta.json");
        let mut meta: VmMeta =
            read_json(&path)?.ok_or_else(|| LocalCpiError::VmNotFound(cid.clone()))?;
        meta.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_json(&path, &meta, 0o644)
    }

    /// Every VM directory (its agent alive or not) whose recorded metadata
    /// matches `filter`, by cid. A directory without `meta.json` (never
    /// written by this CPI) counts with empty metadata; one removed while
    /// listing is skipped.
    fn find_vms(&self, filter: &Metadata) -> Result<Vec<(VmCid, Metadata)>> {
        let dir = self.root.join("vms");
        // Staging (.creating-*) and trash (.deleting-*) directories are not
        // VMs; those left by a crash are removed here.
        sweep_staging(&dir);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| valid_cid(n)) else {
                continue;
            };
            let cid = VmCid(name.to_string());
            let metadata = match read_json::<VmMeta>(&self.vm_dir(&cid).join("meta.json"))? {
                Some(meta) => meta.metadata,
                None if self.vm_exists(&cid) => Metadata::new(),
                None => continue,
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                out.push((cid, metadata));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Edits the `disks` map of the VM's settings.json, keeping every other field as is.
    fn update_settings_disks(
        &self,
        cid: &VmCid,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Result<()> {
        let path = self.settings_file(cid);
        let mut settings: serde_json::Value =
            read_json(&path)?.ok_or_else(|| LocalCpiError::VmNotFound(cid.clone()))?;
        let Some(obj) = settings.as_object_mut() else {
            return Err(LocalCpiError::Internal(format!(
                "{} is not a JSON object",
                path.display()
            )));
        };
        let disks = obj
            .entry("disks")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !disks.is_object() {
            *disks = serde_json::Value::Object(Default::default());
        }
        if let Some(map) = disks.as_object_mut() {
            edit(map);
        }
        write_json(&path, &settings, 0o600)
    }

    // --- disks -------------------------------------------------------------

    fn disk_record(&self, cid: &DiskCid) -> Result<DiskRecord> {
        if !valid_cid(&cid.0) {
            return Err(LocalCpiError::DiskNotFound(cid.clone()));
        }
        read_json(&self.disk_file(cid))?.ok_or_else(|| LocalCpiError::DiskNotFound(cid.clone()))
    }

    fn disk_records(&self) -> Result<Vec<DiskRecord>> {
        let dir = self.root.join("disks");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(cid) = name.strip_suffix(".json") else {
                continue;
            };
            if !valid_cid(cid) {
                continue;
            }
            if let Some(rec) = read_json::<DiskRecord>(&entry.path())? {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.cid.cmp(&b.cid));
        Ok(out)
    }

    /// Every disk record whose metadata matches `filter`, by cid.
    fn find_disks(&self, filter: &Metadata) -> Result<Vec<(DiskCid, Metadata)>> {
        Ok(self
            .disk_records()?
            .into_iter()
            .filter(|d| bosun_cpi::metadata_matches(&d.metadata, filter))
            .map(|d| (d.cid, d.metadata))
            .collect())
    }

    fn disk_hint_json(&self, cid: &DiskCid) -> serde_json::Value {
        serde_json::json!({ "path": self.disk_dir(cid).to_string_lossy() })
    }

    fn create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let cid = DiskCid(format!("disk-{}", uuid::Uuid::new_v4()));
        let dir = self.disk_dir(&cid);
        fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb: req.size_mb,
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
            attached_to: None,
        };
        if let Err(e) = write_json(&self.disk_file(&cid), &rec, 0o644) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(cid)
    }

    fn has_disk(&self, cid: &DiskCid) -> bool {
        valid_cid(&cid.0) && self.disk_file(cid).is_file()
    }

    fn delete_disk(&self, cid: &DiskCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        let _g = self.guard();
        let rec = match self.disk_record(cid) {
            Ok(rec) => rec,
            Err(LocalCpiError::DiskNotFound(_)) => {
                // Gone already; remove a leftover directory if any.
                return remove_dir_atomic(&self.disk_dir(cid));
            }
            Err(e) => return Err(e),
        };
        if let Some(vm) = rec.attached_to {
            return Err(LocalCpiError::Conflict(format!(
                "cannot delete disk {cid}: it is attached to VM {vm} (detach it first)"
            )));
        }
        remove_file_if_exists(&self.disk_file(cid))?;
        remove_dir_atomic(&self.disk_dir(cid))
    }

    fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let _g = self.guard();
        self.require_vm(vm)?;
        let mut rec = self.disk_record(disk)?;
        match &rec.attached_to {
            Some(other) if other != vm => {
                return Err(LocalCpiError::Conflict(format!(
                    "cannot attach disk {disk} to VM {vm}: it is attached to VM {other}"
                )))
            }
            _ => {}
        }
        rec.attached_to = Some(vm.clone());
        write_json(&self.disk_file(disk), &rec, 0o644)?;
        let hint = self.disk_hint_json(disk);
        self.update_settings_disks(vm, |map| {
            map.insert(disk.0.clone(), hint);
        })?;
        Ok(DiskHint {
            path: self.disk_dir(disk).to_string_lossy().into_owned(),
        })
    }

    fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let _g = self.guard();
        self.require_vm(vm)?;
        let mut rec = self.disk_record(disk)?;
        match &rec.attached_to {
            Some(other) if other != vm => {
                return Err(LocalCpiError::Conflict(format!(
                    "cannot detach disk {disk} from VM {vm}: it is attached to VM {other}"
                )))
            }
            Some(_) => {
                rec.attached_to = None;
                write_json(&self.disk_file(disk), &rec, 0o644)?;
            }
            None => {}
        }
        self.update_settings_disks(vm, |map| {
            map.remove(&disk.0);
        })
    }

    fn get_disks(&self, vm: &VmCid) -> Result<Vec<DiskCid>> {
        self.require_vm(vm)?;
        Ok(self
            .disk_records()?
            .into_iter()
            .filter(|d| d.attached_to.as_ref() == Some(vm))
            .map(|d| d.cid)
            .collect())
    }

    fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> Result<()> {
        let _g = self.guard();
        let mut rec = self.disk_record(cid)?;
        if new_size_mb < rec.size_mb {
            return Err(LocalCpiError::Conflict(format!(
                "cannot shrink disk {cid} from {} MB to {new_size_mb} MB",
                rec.size_mb
            )));
        }
        rec.size_mb = new_size_mb;
        write_json(&self.disk_file(cid), &rec, 0o644)
    }

    fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> Result<()> {
        let _g = self.guard();
        let mut rec = self.disk_record(cid)?;
        rec.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_json(&self.disk_file(cid), &rec, 0o644)
    }

    fn snapshot_disk(&self, disk: &DiskCid, metadata: &Metadata) -> Result<SnapshotCid> {
        self.disk_record(disk)?;
        let cid = SnapshotCid(format!("snap-{}", uuid::Uuid::new_v4()));
        let staging = self.root.join("snapshots").join(format!(".creating-{cid}"));
        let result = (|| {
            copy_tree(&self.disk_dir(disk), &staging)?;
            let dir = self.snapshot_dir(&cid);
            fs::rename(&staging, &dir).map_err(io_err("renaming into place", &dir))?;
            let rec = SnapshotRecord {
                cid: cid.clone(),
                disk: disk.clone(),
                metadata: metadata.clone(),
            };
            write_json(&self.snapshot_file(&cid), &rec, 0o644)
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            let _ = fs::remove_dir_all(self.snapshot_dir(&cid));
            return Err(e);
        }
        Ok(cid)
    }

    fn delete_snapshot(&self, cid: &SnapshotCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        remove_file_if_exists(&self.snapshot_file(cid))?;
        remove_dir_atomic(&self.snapshot_dir(cid))
    }
}

#[async_trait]
impl bosun_cpi::Cpi for LocalCpi {
    async fn info(&self) -> CpiResult<CpiInfo> {
        Ok(CpiInfo {
            name: "local".into(),
            api_version: 2,
            stemcell_formats: vec!["local".into()],
        })
    }

    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid> {
        let spec = spec.clone();
        self.blocking(move |i| i.create_stemcell(&spec)).await
    }

    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.delete_stemcell(&cid)).await
    }

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        let req = req.clone();
        self.blocking(move |i| i.create_vm(&req)).await
    }

    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.delete_vm(&cid)).await
    }

    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        let cid = cid.clone();
        self.blocking(move |i| Ok(i.has_vm(&cid))).await
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.reboot_vm(&cid)).await
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        let (cid, metadata) = (cid.clone(), metadata.clone());
        self.blocking(move |i| i.set_vm_metadata(&cid, &metadata))
            .await
    }

    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
        let what = format!("listing VMs tagged {}", bosun_cpi::describe_filter(filter));
        let filter = filter.clone();
        self.blocking(move |i| i.find_vms(&filter))
            .await
            .map_err(|e| in_context(e, &what))
    }

    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
        let req = req.clone();
        self.blocking(move |i| i.create_disk(&req)).await
    }

    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.delete_disk(&cid)).await
    }

    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        let (vm, disk) = (vm.clone(), disk.clone());
        self.blocking(move |i| i.attach_disk(&vm, &disk)).await
    }

    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        let (vm, disk) = (vm.clone(), disk.clone());
        self.blocking(move |i| i.detach_disk(&vm, &disk)).await
    }

    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        let cid = cid.clone();
        self.blocking(move |i| Ok(i.has_disk(&cid))).await
    }

    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        let vm = vm.clone();
        self.blocking(move |i| i.get_disks(&vm)).await
    }

    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.resize_disk(&cid, new_size_mb))
            .await
    }

    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        let (cid, metadata) = (cid.clone(), metadata.clone());
        self.blocking(move |i| i.set_disk_metadata(&cid, &metadata))
            .await
    }

    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
        let what = format!(
            "listing disks tagged {}",
            bosun_cpi::describe_filter(filter)
        );
        let filter = filter.clone();
        self.blocking(move |i| i.find_disks(&filter))
            .await
            .map_err(|e| in_context(e, &what))
    }

    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid> {
        let (cid, metadata) = (cid.clone(), metadata.clone());
        self.blocking(move |i| i.snapshot_disk(&cid, &metadata))
            .await
    }

    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
        let cid = cid.clone();
        self.blocking(move |i| i.delete_snapshot(&cid)).await
    }
}

// ---------------------------------------------------------------------------
// The VM namespace (run by the agent process itself)
// ---------------------------------------------------------------------------

/// The namespace's PID 1, for the parent's signal forwarder.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);
/// How many terminating signals the parent has forwarded.
static SIGNALS_FORWARDED: AtomicI32 = AtomicI32::new(0);
/// How long PID 1 of a VM namespace gets to exit after a forwarded signal
/// before it is SIGKILLed (PID 1 ignores signals it has no handler for).
pub const SIGNAL_GRACE_SECS: u32 = 30;

/// Forwards the signal to the namespace's PID 1; escalates to SIGKILL on a
/// second signal or when the grace period (SIGALRM) runs out.
extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    let forwarded = SIGNALS_FORWARDED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: kill(2) and alarm(2) are async-signal-safe.
    unsafe {
        if sig == libc::SIGALRM || forwarded > 0 {
            libc::kill(pid, libc::SIGKILL);
        } else {
            libc::kill(pid, sig);
            libc::alarm(SIGNAL_GRACE_SECS);
        }
    }
}

fn last_os_error(step: &'static str, hint: impl Into<String>) -> LocalCpiError {
    LocalCpiError::Namespace {
        step,
        hint: hint.into(),
        source: io::Error::last_os_error(),
    }
}

fn cstring(p: &Path, step: &'static str) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| LocalCpiError::Namespace {
        step,
        hint: String::new(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn write_proc_file(path: &str, content: &str, step: &'static str) -> Result<()> {
    fs::write(path, content).map_err(|source| LocalCpiError::Namespace {
        step,
        hint: format!("; writing {path}"),
        source,
    })
}

/// Called by the `bosun agent` entry point BEFORE any threads or the tokio runtime exist,
/// when it was given `--vm-root DIR`: unshare mount+PID (+user if not root) namespaces, fork;
/// the parent waits for the child and exits the process with its status (forwarding SIGTERM/SIGINT to it);
/// the child (PID 1 of the new namespace; PR_SET_PDEATHSIG=SIGKILL so it dies with the parent)
/// makes mounts private, bind-mounts DIR at /var/vcap (as root, create /var/vcap on the host if missing;
/// not root and missing: error saying `sudo mkdir /var/vcap` once), mounts a new proc at /proc,
/// and returns Ok(()) so the caller runs the agent. Errors name the step and the missing capability.
///
/// PID 1 ignores signals it installs no handler for, so the parent escalates
/// to SIGKILL on a second terminating signal or [`SIGNAL_GRACE_SECS`] after the first.
pub fn enter_vm_namespace(vm_dir: &Path) -> Result<(), LocalCpiError> {
    let vm_dir = fs::canonicalize(vm_dir).map_err(|source| LocalCpiError::Namespace {
        step: "resolving the VM root",
        hint: format!("; {} must be an existing directory", vm_dir.display()),
        source,
    })?;
    if !vm_dir.is_dir() {
        return Err(LocalCpiError::Namespace {
            step: "resolving the VM root",
            hint: String::new(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", vm_dir.display()),
            ),
        });
    }
    let vm_dir_c = cstring(&vm_dir, "resolving the VM root")?;
    let mount_point = Path::new(VCAP_MOUNT_POINT);

    // SAFETY: plain syscalls without memory-safety preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = euid == 0;
    if !mount_point.is_dir() {
        if root {
            fs::create_dir_all(mount_point).map_err(|source| LocalCpiError::Namespace {
                step: "creating /var/vcap on the host",
                hint: String::new(),
                source,
            })?;
        } else {
            return Err(LocalCpiError::Namespace {
                step: "finding the mount point /var/vcap",
                hint: "; it does not exist and only root can create it: run `sudo mkdir /var/vcap` once"
                    .into(),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
    }

    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare(2) has no memory-safety preconditions; the caller is single-threaded.
    if unsafe { libc::unshare(flags) } != 0 {
        let hint = if root {
            "; needs CAP_SYS_ADMIN and a kernel with mount and PID namespaces (inside a container: --privileged or CAP_SYS_ADMIN with an unconfined seccomp profile)"
        } else {
            "; needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, and for Ubuntu's AppArmor kernel.apparmor_restrict_unprivileged_userns=0) or running as root"
        };
        return Err(last_os_error(
            if root {
                "unshare(mount, PID namespaces)"
            } else {
                "unshare(user, mount, PID namespaces)"
            },
            hint,
        ));
    }
    if !root {
        // Map the caller to root inside its user namespace.
        write_proc_file(
            "/proc/self/setgroups",
            "deny",
            "denying setgroups in the user namespace",
        )?;
        write_proc_file(
            "/proc/self/uid_map",
            &format!("0 {euid} 1"),
            "mapping the caller's uid to 0 in the user namespace",
        )?;
        write_proc_file(
            "/proc/self/gid_map",
            &format!("0 {egid} 1"),
            "mapping the caller's gid to 0 in the user namespace",
        )?;
    }

    // SAFETY: the caller guarantees no other threads exist, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error(
            "fork into the new PID namespace",
            "; needs free PIDs (kernel.pid_max, ulimit -u)",
        ));
    }
    if pid > 0 {
        wait_and_exit(pid);
    }

    // The child: PID 1 of the new namespace.
    // SAFETY: prctl(PR_SET_PDEATHSIG) with an integer argument.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(last_os_error("prctl(PR_SET_PDEATHSIG)", ""));
    }
    let none: *const libc::c_char = std::ptr::null();
    let slash = c"/";
    // SAFETY: valid NUL-terminated strings; null for unused arguments.
    if unsafe {
        libc::mount(
            none,
            slash.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "making all mounts private (mount --make-rprivate /)",
            "; needs CAP_SYS_ADMIN in the mount namespace",
        ));
    }
    let target = c"/var/vcap";
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            vm_dir_c.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "bind-mounting the VM root at /var/vcap",
            format!(
                "; source {} (needs CAP_SYS_ADMIN in the mount namespace)",
                vm_dir.display()
            ),
        ));
    }
    let proc_ = c"proc";
    let proc_dir = c"/proc";
    // SAFETY: as above.
    if unsafe {
        libc::mount(
            proc_.as_ptr(),
            proc_dir.as_ptr(),
            proc_.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "mounting a new proc at /proc",
            "; needs CAP_SYS_ADMIN over the new PID namespace and a fully visible /proc on the host (no masked /proc as in unprivileged containers)",
        ));
    }
    Ok(())
}

/// The namespace parent: forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to `child`
/// (SIGKILL on a second signal or after [`SIGNAL_GRACE_SECS`]), waits for it
/// and exits with its status (128 + signal when it was killed).
fn wait_and_exit(child: libc::pid_t) -> ! {
    CHILD_PID.store(child, Ordering::SeqCst);
    // SAFETY: installing an async-signal-safe handler with a zeroed, then filled, sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = forward_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGALRM,
        ] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            std::process::exit(code);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!(
                "bosun VM namespace: waiting for pid {child}: {}",
                io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bosun_cpi::{AgentSettings, Cpi};

    #[test]
    fn removing_a_dir_never_recurses_into_a_mounted_disk() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: this test needs root to bind-mount"
            );
            eprintln!("skipped: needs root to bind-mount (not in CI)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk");
        let vm = t.path().join("vm");
        fs::create_dir_all(&disk).unwrap();
        fs::create_dir_all(vm.join("store")).unwrap();
        fs::write(disk.join("precious"), "data").unwrap();
        let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let (src, dst) = (c(&disk), c(&vm.join("store")));
        // SAFETY: valid NUL-terminated paths; a bind mount of our own temp dir.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "bind mount: {}", io::Error::last_os_error());
        let err = remove_dir_atomic(&vm).unwrap_err().to_string();
        // SAFETY: unmounting the mount made above.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
        assert!(err.contains("is mounted inside it"), "{err}");
        assert_eq!(fs::read_to_string(disk.join("precious")).unwrap(), "data");
        remove_dir_atomic(&vm).unwrap();
        assert!(!vm.exists());
    }

    fn cpi(dir: &Path) -> LocalCpi {
        LocalCpi::new(LocalCpiConfig {
            root: dir.join("local-cpi"),
            agent_command: vec!["/bin/false".into()],
        })
        .unwrap()
    }

    fn vm_request(stemcell: &StemcellCid) -> CreateVmRequest {
        let settings = AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: "ssh-ed25519 AAAA director".into(),
            host_private_key: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
            listen_ip: "127.0.0.9".into(),
            listen_port: bosun_cpi::AGENT_PORT,
            networks: BTreeMap::new(),
            disks: BTreeMap::new(),
            env: serde_json::json!({"x": 1}),
        };
        CreateVmRequest {
            agent_id: "agent-1".into(),
            stemcell: stemcell.clone(),
            cloud_properties: serde_json::json!({}),
            networks: BTreeMap::new(),
            disk_cids: Vec::new(),
            settings,
            metadata: Metadata::from([("token".into(), "t".into())]),
        }
    }

    fn stemcell_spec() -> StemcellSpec {
        StemcellSpec {
            name: "bosh-local".into(),
            os: "ubuntu-noble".into(),
            version: "1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        }
    }

    /// A VM directory without its agent.
    fn fake_vm(c: &LocalCpi) -> VmCid {
        let sc = c.inner.create_stemcell(&stemcell_spec()).unwrap();
        c.inner.prepare_vm_dir(&vm_request(&sc)).unwrap()
    }

    fn settings_disks(c: &LocalCpi, vm: &VmCid) -> serde_json::Value {
        let s: serde_json::Value = read_json(&c.inner.settings_file(vm)).unwrap().unwrap();
        s["disks"].clone()
    }

    #[test]
    fn vm_dir_layout_and_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let vm = fake_vm(&c);
        let dir = c.vm_dir(&vm);
        for sub in ["bosh", "data", "store", "sys/log", "jobs", "packages"] {
            assert!(dir.join("vcap").join(sub).is_dir(), "{sub}");
        }
        let settings = c.inner.settings_file(&vm);
        let mode = fs::metadata(&settings).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the VM directory is root's alone");
        let s: AgentSettings = read_json(&settings).unwrap().unwrap();
        assert_eq!(s.agent_id, "agent-1");
        let meta: VmMeta = read_json(&dir.join("meta.json")).unwrap().unwrap();
        assert_eq!(meta.metadata["token"], "t");
        // No staging leftovers.
        let names: Vec<_> = fs::read_dir(c.root().join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![vm.0.clone()]);
    }

    /// What a builder killed mid-way leaves: the lock file (unlocked, its
    /// holder dead) and a staging directory holding a host key.
    fn crashed_staging(c: &LocalCpi, name: &str) -> (PathBuf, PathBuf) {
        let vms = c.root().join("vms");
        let dir = vms.join(format!(".creating-{name}"));
        let lock = vms.join(format!(".creating-{name}.lock"));
        fs::write(&lock, "").unwrap();
        fs::create_dir_all(dir.join("vcap/bosh")).unwrap();
        fs::write(
            dir.join("vcap/bosh/settings.json"),
            "{\"host_private_key\":\"k\"}",
        )
        .unwrap();
        (dir, lock)
    }

    #[tokio::test]
    async fn a_staging_directory_left_by_a_crash_goes_at_the_next_call() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        // One still being built (its lock held), even if old, stays.
        let busy = Staging::create(&c.root().join("vms"), "vm-busy").unwrap();
        fs::File::open(&busy.path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * ABANDONED_AFTER)
            .unwrap();
        // Deleting any VM (even one already gone) sweeps: fresh or not, a
        // staging directory whose builder died goes.
        let (dir, lock) = crashed_staging(&c, "vm-a");
        c.delete_vm(&VmCid("vm-gone".into())).await.unwrap();
        assert!(!dir.exists() && !lock.exists(), "swept by delete_vm");
        assert!(
            busy.path.exists() && busy.lock_path.exists(),
            "in use: kept"
        );
        let (dir, lock) = crashed_staging(&c, "vm-b");
        c.find_vms(&Metadata::new()).await.unwrap();
        assert!(!dir.exists() && !lock.exists(), "swept by find_vms");
        let (dir, _) = crashed_staging(&c, "vm-c");
        let vm = fake_vm(&c);
        assert!(!dir.exists(), "swept by create_vm");
        // A build that fails or is dropped uncommitted leaves nothing.
        let (path, lock_path) = (busy.path.clone(), busy.lock_path.clone());
        drop(busy);
        assert!(!path.exists() && !lock_path.exists());
        let names: Vec<_> = fs::read_dir(c.root().join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![vm.0.clone()]);
    }

    #[tokio::test]
    async fn unknown_stemcell_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let err = c
            .create_vm(&vm_request(&StemcellCid::from("stemcell-nope")))
            .await
            .unwrap_err();
        assert!(matches!(err, CpiError::StemcellNotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_vm_whose_agent_exits_is_gone_but_deletable() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let sc = c.create_stemcell(&stemcell_spec()).await.unwrap();
        let vm = c.create_vm(&vm_request(&sc)).await.unwrap();
        let pid_file = c.vm_dir(&vm).join("pid");
        assert!(pid_file.is_file());
        // /bin/false exits at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.has_vm(&vm).await.unwrap() {
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        c.delete_vm(&vm).await.unwrap();
        assert!(!c.vm_dir(&vm).exists());
        c.delete_vm(&vm).await.unwrap();
    }

    #[tokio::test]
    async fn disk_records() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let disk = c
            .create_disk(&CreateDiskRequest {
                size_mb: 100,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: Metadata::from([("a".into(), "1".into())]),
            })
            .await
            .unwrap();
        assert!(disk.0.starts_with("disk-"));
        assert!(c.has_disk(&disk).await.unwrap());
        assert!(c.inner.disk_dir(&disk).is_dir());
        c.set_disk_metadata(&disk, &Metadata::from([("b".into(), "2".into())]))
            .await
            .unwrap();
        c.resize_disk(&disk, 200).await.unwrap();
        let err = c.resize_disk(&disk, 50).await.unwrap_err();
        assert!(err.to_string().contains("shrink"), "{err}");
        let rec = c.inner.disk_record(&disk).unwrap();
        assert_eq!(rec.size_mb, 200);
        assert_eq!(rec.metadata.len(), 2);

        fs::write(c.inner.disk_dir(&disk).join("data"), "hello").unwrap();
        let snap = c.snapshot_disk(&disk, &Metadata::new()).await.unwrap();
        let copy = c.inner.snapshot_dir(&snap).join("data");
        assert_eq!(fs::read_to_string(copy).unwrap(), "hello");
        c.delete_snapshot(&snap).await.unwrap();
        assert!(!c.inner.snapshot_dir(&snap).exists());
        c.delete_snapshot(&snap).await.unwrap();

        c.delete_disk(&disk).await.unwrap();
        assert!(!c.has_disk(&disk).await.unwrap());
        assert!(!c.inner.disk_dir(&disk).exists());
        c.delete_disk(&disk).await.unwrap();
        let err = c.resize_disk(&disk, 300).await.unwrap_err();
        assert!(matches!(err, CpiError::DiskNotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn attach_bookkeeping() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let a = fake_vm(&c);
        let b = fake_vm(&c);
        let req = CreateDiskRequest {
            size_mb: 1,
            cloud_properties: serde_json::json!({}),
            vm_locality: Some(a.clone()),
            metadata: Metadata::new(),
        };
        let disk = c.create_disk(&req).await.unwrap();

        let hint = c.attach_disk(&a, &disk).await.unwrap();
        assert_eq!(hint.path, c.inner.disk_dir(&disk).to_string_lossy());
        assert_eq!(
            settings_disks(&c, &a),
            serde_json::json!({ disk.0.clone(): { "path": hint.path } })
        );
        assert_eq!(c.get_disks(&a).await.unwrap(), vec![disk.clone()]);
        // Attaching again to the same VM is idempotent.
        c.attach_disk(&a, &disk).await.unwrap();

        // Elsewhere: refused, naming both VMs.
        let err = c.attach_disk(&b, &disk).await.unwrap_err().to_string();
        assert!(err.contains(&a.0) && err.contains(&b.0), "{err}");
        // Deleting an attached disk is refused.
        let err = c.delete_disk(&disk).await.unwrap_err().to_string();
        assert!(err.contains("attached"), "{err}");
        // Other settings survive the edit.
        let s: AgentSettings = read_json(&c.inner.settings_file(&a)).unwrap().unwrap();
        assert_eq!(s.env, serde_json::json!({"x": 1}));

        c.detach_disk(&a, &disk).await.unwrap();
        assert_eq!(settings_disks(&c, &a), serde_json::json!({}));
        assert!(c.get_disks(&a).await.unwrap().is_empty());
        c.detach_disk(&a, &disk).await.unwrap();

        c.attach_disk(&b, &disk).await.unwrap();
        assert_eq!(c.get_disks(&b).await.unwrap(), vec![disk.clone()]);
        assert!(c.get_disks(&a).await.unwrap().is_empty());

        // Not found errors.
        let nope_vm = VmCid::from("vm-nope");
        let nope_disk = DiskCid::from("disk-nope");
        assert!(matches!(
            c.attach_disk(&nope_vm, &disk).await,
            Err(CpiError::VmNotFound(_))
        ));
        assert!(matches!(
            c.attach_disk(&a, &nope_disk).await,
            Err(CpiError::DiskNotFound(_))
        ));
        assert!(matches!(
            c.attach_disk(&VmCid::from("../../etc"), &disk).await,
            Err(CpiError::VmNotFound(_))
        ));
        assert!(matches!(
            c.get_disks(&nope_vm).await,
            Err(CpiError::VmNotFound(_))
        ));

        // Deleting the VM detaches (records only) and keeps the disk's data.
        fs::write(c.inner.disk_dir(&disk).join("keep"), "x").unwrap();
        c.delete_vm(&b).await.unwrap();
        assert_eq!(c.inner.disk_record(&disk).unwrap().attached_to, None);
        assert!(c.inner.disk_dir(&disk).join("keep").is_file());
        c.delete_disk(&disk).await.unwrap();
    }

    #[tokio::test]
    async fn reboot_rewrites_settings_disks_from_records() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let a = fake_vm(&c);
        let disk = c
            .create_disk(&CreateDiskRequest {
                size_mb: 1,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: Metadata::new(),
            })
            .await
            .unwrap();
        c.attach_disk(&a, &disk).await.unwrap();
        // Settings drifted (e.g. hand-edited): reboot restores them from the records.
        c.inner
            .update_settings_disks(&a, |m| {
                m.clear();
                m.insert("disk-stale".into(), serde_json::json!({}));
            })
            .unwrap();
        c.reboot_vm(&a).await.unwrap();
        let hint = c.inner.disk_hint_json(&disk);
        assert_eq!(
            settings_disks(&c, &a),
            serde_json::json!({ disk.0.clone(): hint })
        );
        c.set_vm_metadata(&a, &Metadata::from([("name".into(), "x".into())]))
            .await
            .unwrap();
        let meta: VmMeta = read_json(&c.vm_dir(&a).join("meta.json")).unwrap().unwrap();
        assert_eq!(meta.metadata.len(), 2);
        c.detach_disk(&a, &disk).await.unwrap();
        c.delete_vm(&a).await.unwrap();
    }

    #[tokio::test]
    async fn finds_vms_and_disks_by_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let tagged = |pairs: &[(&str, &str)]| -> Metadata {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // VM directories without a running agent (dead or never started) count.
        let a = fake_vm(&c);
        let b = fake_vm(&c);
        c.set_vm_metadata(&b, &tagged(&[("token", "b"), ("director", "d")]))
            .await
            .unwrap();
        // A record of an older version, without metadata, is still readable.
        let old = c.vm_dir(&a).join("meta.json");
        let mut raw: serde_json::Value = read_json(&old).unwrap().unwrap();
        raw.as_object_mut().unwrap().remove("metadata");
        write_json(&old, &raw, 0o644).unwrap();
        // Staging and trash directories are not VMs; old ones (a crash
        // left them) are removed, fresh ones (in use) are not.
        fs::create_dir_all(c.root().join("vms/.creating-vm-x")).unwrap();
        fs::create_dir_all(c.root().join("vms/.deleting-vm-y-1")).unwrap();
        let stale = c.root().join("vms/.creating-vm-z");
        fs::create_dir_all(stale.join("vcap/bosh")).unwrap();
        fs::File::open(&stale)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * ABANDONED_AFTER)
            .unwrap();

        let all = c.find_vms(&Metadata::new()).await.unwrap();
        let mut want = vec![
            (a.clone(), Metadata::new()),
            (b.clone(), tagged(&[("token", "b"), ("director", "d")])),
        ];
        want.sort();
        assert_eq!(all, want);
        assert!(!stale.exists(), "a stale staging directory is removed");
        assert!(c.root().join("vms/.creating-vm-x").exists());
        assert_eq!(
            c.find_vms(&tagged(&[("director", "d")])).await.unwrap(),
            vec![(b.clone(), tagged(&[("token", "b"), ("director", "d")]))]
        );
        assert!(c
            .find_vms(&tagged(&[("director", "d"), ("token", "t")]))
            .await
            .unwrap()
            .is_empty());
        c.delete_vm(&b).await.unwrap();
        assert!(c
            .find_vms(&tagged(&[("director", "d")]))
            .await
            .unwrap()
            .is_empty());

        let mut disks = Vec::new();
        for token in ["x", "y"] {
            let req = CreateDiskRequest {
                size_mb: 1,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: tagged(&[("token", token), ("director", "d")]),
            };
            disks.push(c.create_disk(&req).await.unwrap());
        }
        c.set_disk_metadata(&disks[1], &tagged(&[("name", "n")]))
            .await
            .unwrap();
        assert_eq!(
            c.find_disks(&tagged(&[("token", "y")])).await.unwrap(),
            vec![(
                disks[1].clone(),
                tagged(&[("token", "y"), ("director", "d"), ("name", "n")])
            )]
        );
        let found = c.find_disks(&tagged(&[("director", "d")])).await.unwrap();
        let mut sorted = disks.clone();
        sorted.sort();
        assert_eq!(
            found.into_iter().map(|(d, _)| d).collect::<Vec<_>>(),
            sorted
        );
        // Snapshots are not disks.
        c.snapshot_disk(&disks[0], &tagged(&[("token", "x")]))
            .await
            .unwrap();
        assert_eq!(
            c.find_disks(&tagged(&[("token", "x")]))
                .await
                .unwrap()
                .len(),
            1
        );
        c.delete_disk(&disks[0]).await.unwrap();
        assert!(c
            .find_disks(&tagged(&[("token", "x")]))
            .await
            .unwrap()
            .is_empty());
    }

    #[test]
    fn cids_are_file_names() {
        assert!(valid_cid("vm-1234"));
        assert!(!valid_cid(""));
        assert!(!valid_cid(".."));
        assert!(!valid_cid("a/b"));
        assert!(!valid_cid(".creating-vm-1"));
    }

    #[test]
    fn errors_map_to_cpi_errors() {
        let e: CpiError = LocalCpiError::VmNotFound(VmCid::from("vm-1")).into();
        assert!(matches!(e, CpiError::VmNotFound(_)));
        let e: CpiError = LocalCpiError::StillRunning("x".into()).into();
        assert!(e.is_retryable());
        let e: CpiError = LocalCpiError::Conflict("disk d attached to vm v".into()).into();
        assert!(matches!(e, CpiError::Fatal { .. }));
    }

    #[test]
    fn empty_agent_command_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let err = LocalCpi::new(LocalCpiConfig {
            root: tmp.path().into(),
            agent_command: vec![],
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("agent_command"), "{err}");
    }
}

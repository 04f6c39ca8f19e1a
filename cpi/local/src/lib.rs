//! The local CPI: VMs, disks and stemcells on this machine, no daemon.
//!
//! Owns everything under its root directory (`<state-dir>/local-cpi`):
//!
//! ```text
//! stemcells/<cid>.json        the recorded StemcellSpec (the stemcell is the host itself)
//! vms/<cid>/                  a VM, 0700 (root's alone: the settings hold its host key)
//! vms/<cid>/vcap/             the VM's /var/vcap (bosh/settings.json, data/, store/, sys/log/, jobs/, packages/)
//! vms/<cid>/root/             the VM's own etc/ (a copy of the host's), tmp/, var/tmp/, root/, home/
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
//! namespace when not root) where the VM directory is bound at `/var/vcap` and
//! its own `/etc`, `/tmp`, `/var/tmp`, `/root` and `/home` over the host's. The
//! host network, kernel and the rest of the file system are shared: the agent
//! listens on its own loopback address.
//! Killing the recorded process takes the whole namespace with it.
//!
//! This crate must not talk to the agent (it only writes its settings file and
//! starts/kills its process), must not call the director, and must not know
//! about manifests or deployments. Every state change is written atomically
//! (temporary file + rename).

mod config;
mod disk;
mod files;
mod namespace;
mod process;
mod stemcell;
mod sysdirs;
#[cfg(test)]
mod test_support;
mod vm;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bosun_cpi::records;
use bosun_cpi::{
    CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint, Metadata,
    SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};

pub use config::LocalCpiConfig;
pub use namespace::{enter_vm_namespace, SIGNAL_GRACE_SECS};

/// Where the agent finds its settings inside the VM.
pub const SETTINGS_PATH_IN_VM: &str = "/var/vcap/bosh/settings.json";
/// Where each VM's directory is bound inside its mount namespace.
pub const VCAP_MOUNT_POINT: &str = "/var/vcap";

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
    #[error("local CPI: {op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("local CPI: {}: invalid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("local CPI: {0}")]
    Conflict(String),
    #[error("local CPI: starting the agent for {vm} ({command})")]
    Spawn {
        vm: VmCid,
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("local CPI: {0} (retry)")]
    StillRunning(String),
    #[error("VM namespace: {step} failed{hint}")]
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
            // The CPI error ends the chain: it carries the causes.
            other => CpiError::fatal(bosun_cpi::chain::chain(&other)),
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
        config.validate()?;
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
    pub(crate) fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn stemcell_file(&self, cid: &StemcellCid) -> PathBuf {
        self.root.join("stemcells").join(format!("{cid}.json"))
    }
    pub(crate) fn vm_dir(&self, cid: &VmCid) -> PathBuf {
        self.root.join("vms").join(&cid.0)
    }
    pub(crate) fn vcap_dir(&self, cid: &VmCid) -> PathBuf {
        self.vm_dir(cid).join("vcap")
    }
    pub(crate) fn settings_file(&self, cid: &VmCid) -> PathBuf {
        self.vcap_dir(cid).join("bosh").join("settings.json")
    }
    pub(crate) fn disk_dir(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(&cid.0)
    }
    pub(crate) fn disk_file(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(format!("{cid}.json"))
    }
    pub(crate) fn snapshot_dir(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(&cid.0)
    }
    pub(crate) fn snapshot_file(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(format!("{cid}.json"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_cpi_errors() {
        let e: CpiError = LocalCpiError::VmNotFound(VmCid::from("vm-1")).into();
        assert!(matches!(e, CpiError::VmNotFound(_)));
        let e: CpiError = LocalCpiError::StillRunning("x".into()).into();
        assert!(e.is_retryable());
        let e: CpiError = LocalCpiError::Conflict("disk d attached to vm v".into()).into();
        assert!(matches!(e, CpiError::Fatal { .. }));
    }
}

//! The Docker CPI: stemcells, VMs and persistent disks on a Docker engine.
//!
//! | CPI concept | Docker object |
//! |---|---|
//! | stemcell | an image imported from a gzip'd root filesystem tarball (`docker import`), tagged `<prefix>-stemcell:<name>-<version>`; its cid is the image id |
//! | VM | a container named by its cid (`vm-<uuid>`) whose PID 1 is the agent (`/var/vcap/bosh/bin/bosun agent --settings /var/vcap/bosh/settings.json`) |
//! | manual network | a user-defined bridge network `<prefix>-<network>` with the network's subnet and gateway; the container gets the requested static IPv4 address |
//! | persistent disk | a named volume `disk-<uuid>` mounted at `/var/vcap/store` |
//! | snapshot | a named volume `snap-<uuid>` holding a copy of the disk |
//!
//! Every object it creates carries the labels `bosun.cpi=<prefix>` and `bosun.<key>`
//! for each metadata entry (director, deployment, instance, token, ...), so
//! orphans can be found with `docker ps -a --filter label=bosun.cpi=<prefix>`.
//! `find_vms` / `find_disks` do just that (containers labelled `bosun.vm`,
//! volumes except snapshots), taking each object's metadata from its record
//! when there is one (containers cannot be relabelled, so only the record has
//! set_vm_metadata's tags) and from its `bosun.<key>` labels otherwise.
//!
//! Owns its records under its root directory (`<state-dir>/docker-cpi`), each
//! written atomically (temporary file + rename):
//!
//! ```text
//! vms/<cid>.json         the CreateVmRequest, merged metadata and attached disks
//! disks/<cid>.json       size, metadata and the VM the disk is attached to
//! snapshots/<cid>.json   the snapshotted disk and metadata
//! ```
//!
//! Containers can be neither relabelled nor given a volume after creation, so
//! `attach_disk` / `detach_disk` *recreate* the container from its record:
//! same name, image, IPs and labels, with the new set of volumes and the agent
//! settings' `disks` map updated. The settings file is uploaded into each new
//! container before it starts (mode 0600). Containers are never privileged and
//! never get host bind mounts.
//!
//! This crate must not talk to the agent (it only writes its settings file and
//! starts/stops its container), must not call the director, must not know
//! about manifests or deployments, and must not shell out to the `docker` CLI.
//! It cannot pull images: there may be no registry.

mod config;
mod container;
mod disk;
mod names;
mod network;
mod records;
mod stemcell;
#[cfg(test)]
mod test_support;
mod vm;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::Docker;
use bosun_cpi::records as record_files;
use bosun_cpi::{
    CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint, Metadata,
    SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};

pub use config::DockerCpiConfig;
pub use container::{container_config, settings_archive, settings_for, vm_networks, VmNetwork};
pub use names::{
    labels, metadata_of_labels, network_name, sanitize_name, stemcell_repo, stemcell_tag,
};
pub use records::{DiskRecord, SnapshotRecord, VmRecord};

/// Where the agent finds its settings inside the container.
pub const SETTINGS_PATH_IN_VM: &str = "/var/vcap/bosh/settings.json";
/// The agent binary inside the stemcell image.
pub const AGENT_PATH_IN_VM: &str = "/var/vcap/bosh/bin/bosun";
/// Where the (first) persistent disk is mounted.
pub const STORE_PATH: &str = "/var/vcap/store";
/// The stemcell format this CPI accepts.
pub const STEMCELL_FORMAT: &str = "docker-rootfs";
/// Label put on every object this CPI creates, valued with the prefix.
pub const LABEL_CPI: &str = "bosun.cpi";
/// Label on the networks this CPI manages (and may remove).
pub const LABEL_MANAGED: &str = "bosun.managed";
/// Label of a VM's container, valued with its cid.
const LABEL_VM: &str = "bosun.vm";
/// Label of a VM's container, valued with its agent id.
const LABEL_AGENT_ID: &str = "bosun.agent_id";
/// Label of a disk's volume, valued with its cid.
const LABEL_DISK: &str = "bosun.disk";
/// Label of a disk's volume, valued with its size in MB.
const LABEL_SIZE_MB: &str = "bosun.size_mb";
/// Label of a snapshot's volume, valued with the snapshotted disk.
const LABEL_SNAPSHOT_OF: &str = "bosun.snapshot_of";
/// The labels of a stemcell image (`bosun.stemcell.name`, ...), which its
/// containers inherit: never metadata.
const STEMCELL_LABELS_PREFIX: &str = "bosun.stemcell.";
/// The labels of a VM container that are the CPI's, not metadata.
const VM_OWN_LABELS: &[&str] = &[LABEL_CPI, LABEL_VM, LABEL_AGENT_ID];
/// The labels of a disk volume that are the CPI's, not metadata.
const DISK_OWN_LABELS: &[&str] = &[LABEL_CPI, LABEL_DISK, LABEL_SIZE_MB];
/// Seconds a container gets between SIGTERM and SIGKILL when stopped or restarted.
const STOP_GRACE_SECS: i32 = 5;
/// Request timeout (an image import can be slow).
const DOCKER_TIMEOUT_SECS: u64 = 600;

/// Which CPI object a Docker call was about, so that a 404 becomes the right
/// typed not-found error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    None,
    Vm(VmCid),
    Disk(DiskCid),
    Stemcell(StemcellCid),
}

/// Everything that can go wrong in the Docker CPI.
#[derive(Debug, thiserror::Error)]
pub enum DockerCpiError {
    #[error("Docker is unreachable at {socket}")]
    Unreachable {
        socket: String,
        #[source]
        source: BollardError,
    },
    #[error("docker CPI: {op}")]
    Docker {
        op: String,
        target: Target,
        #[source]
        source: BollardError,
    },
    #[error("VM {0} not found")]
    VmNotFound(VmCid),
    #[error("disk {0} not found")]
    DiskNotFound(DiskCid),
    #[error("stemcell {0} not found")]
    StemcellNotFound(StemcellCid),
    #[error("docker CPI: invalid configuration: {0}")]
    Config(String),
    #[error("docker CPI: {0}")]
    Invalid(String),
    #[error("docker CPI: {0}")]
    Conflict(String),
    #[error("docker CPI: {op} {}", path.display())]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("docker CPI: {}: invalid JSON", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{method} is not supported by the docker CPI: {reason}")]
    NotSupported {
        method: &'static str,
        reason: String,
    },
}

impl From<record_files::RecordError> for DockerCpiError {
    fn from(e: record_files::RecordError) -> Self {
        match e {
            record_files::RecordError::Io { op, path, source } => DockerCpiError::Io {
                op: op.into(),
                path,
                source,
            },
            record_files::RecordError::Json { path, source } => {
                DockerCpiError::Json { path, source }
            }
        }
    }
}

/// The HTTP status of a Docker error response, if it is one.
fn status_of(e: &BollardError) -> Option<u16> {
    match e {
        BollardError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_not_found(e: &BollardError) -> bool {
    status_of(e) == Some(404)
}

/// Whether the error is about reaching the daemon rather than the request.
fn is_connection_error(e: &BollardError) -> bool {
    matches!(
        e,
        BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
    )
}

impl From<DockerCpiError> for CpiError {
    fn from(e: DockerCpiError) -> Self {
        let transient = |message: String| CpiError::Transient {
            message,
            retry_after: Some(Duration::from_secs(2)),
        };
        match e {
            DockerCpiError::VmNotFound(cid) => CpiError::VmNotFound(cid),
            DockerCpiError::DiskNotFound(cid) => CpiError::DiskNotFound(cid),
            DockerCpiError::StemcellNotFound(cid) => CpiError::StemcellNotFound(cid),
            DockerCpiError::NotSupported { method, .. } => CpiError::NotSupported {
                cpi: "docker".into(),
                method: method.into(),
            },
            // The CPI error ends the chain: its message carries the causes.
            DockerCpiError::Unreachable { .. } => transient(bosun_cpi::chain::chain(&e)),
            DockerCpiError::Docker {
                ref target,
                ref source,
                ..
            } => {
                if is_not_found(source) {
                    match target {
                        Target::Vm(cid) => return CpiError::VmNotFound(cid.clone()),
                        Target::Disk(cid) => return CpiError::DiskNotFound(cid.clone()),
                        Target::Stemcell(cid) => return CpiError::StemcellNotFound(cid.clone()),
                        Target::None => {}
                    }
                }
                if is_connection_error(source) {
                    transient(bosun_cpi::chain::chain(&e))
                } else {
                    CpiError::fatal(bosun_cpi::chain::chain(&e))
                }
            }
            other => CpiError::fatal(bosun_cpi::chain::chain(&other)),
        }
    }
}

type Result<T, E = DockerCpiError> = std::result::Result<T, E>;

/// Builds the error of a Docker call: `op` names the operation and the object.
fn docker_err(
    op: impl Into<String>,
    target: Target,
) -> impl FnOnce(BollardError) -> DockerCpiError {
    let op = op.into();
    move |source| DockerCpiError::Docker { op, target, source }
}

fn io_err(op: impl Into<String>, path: &Path) -> impl FnOnce(io::Error) -> DockerCpiError + '_ {
    let op = op.into();
    move |source| DockerCpiError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// The Docker CPI (see the crate documentation).
pub struct DockerCpi {
    docker: Docker,
    root: PathBuf,
    prefix: String,
    socket: String,
    /// Held while networks are created, containers attached to them, or
    /// networks removed, so a network is never removed under a new container.
    net_lock: tokio::sync::Mutex<()>,
    /// Serialises read-modify-write of record files.
    records: Mutex<()>,
    /// One lock per VM / disk cid for multi-step operations (attach, detach, delete).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl DockerCpi {
    /// Connects and pings the daemon; the error names the socket and says Docker is unreachable.
    pub async fn connect(config: DockerCpiConfig) -> Result<DockerCpi, DockerCpiError> {
        let prefix = config.validated_prefix()?;
        let socket = config.socket();
        let address = config::address(&socket);
        let unreachable = |source| DockerCpiError::Unreachable {
            socket: socket.clone(),
            source,
        };
        let docker = Docker::connect_with_host(&address)
            .map_err(unreachable)?
            .with_timeout(Duration::from_secs(DOCKER_TIMEOUT_SECS));
        // The engine may speak an older API than bollard's default (20.10: 1.41).
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;

        for sub in ["vms", "disks", "snapshots"] {
            let dir = config.root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        }
        Ok(DockerCpi {
            docker,
            root: config.root,
            prefix,
            socket,
            net_lock: tokio::sync::Mutex::new(()),
            records: Mutex::new(()),
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The daemon address in use.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    /// The prefix of the objects this CPI creates (also the `bosun.cpi` label).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The records directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn records_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.locks.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, m| Arc::strong_count(m) > 1);
            Arc::clone(map.entry(key.to_string()).or_default())
        };
        m.lock_owned().await
    }

    /// The `label` filter selecting this CPI's objects (plus `more`).
    fn label_filter(&self, more: &[&str]) -> HashMap<String, Vec<String>> {
        let mut labels = vec![format!("{LABEL_CPI}={}", self.prefix)];
        labels.extend(more.iter().map(|l| l.to_string()));
        HashMap::from([("label".to_string(), labels)])
    }
}

#[async_trait]
impl bosun_cpi::Cpi for DockerCpi {
    async fn info(&self) -> CpiResult<CpiInfo> {
        Ok(CpiInfo {
            name: "docker".into(),
            api_version: 2,
            stemcell_formats: vec![STEMCELL_FORMAT.into()],
        })
    }

    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid> {
        Ok(self.do_create_stemcell(spec).await?)
    }

    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        Ok(self.do_delete_stemcell(cid).await?)
    }

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        Ok(self.do_create_vm(req).await?)
    }

    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_delete_vm(cid).await?)
    }

    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        Ok(self.do_has_vm(cid).await?)
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_reboot_vm(cid).await?)
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        Ok(self.do_set_vm_metadata(cid, metadata).await?)
    }

    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
        Ok(self.do_find_vms(filter).await?)
    }

    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
        Ok(self.do_create_disk(req).await?)
    }

    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        Ok(self.do_delete_disk(cid).await?)
    }

    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        Ok(self.do_attach_disk(vm, disk).await?)
    }

    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        Ok(self.do_detach_disk(vm, disk).await?)
    }

    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        Ok(self.volume_exists(&cid.0).await?)
    }

    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        Ok(self.do_get_disks(vm)?)
    }

    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        Ok(self.do_resize_disk(cid, new_size_mb).await?)
    }

    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        Ok(self.do_set_disk_metadata(cid, metadata).await?)
    }

    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
        Ok(self.do_find_disks(filter).await?)
    }

    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid> {
        Ok(self.do_snapshot_disk(cid, metadata).await?)
    }

    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
        Ok(self.do_delete_snapshot(cid).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_typed_cpi_errors() {
        let not_found = || BollardError::DockerResponseServerError {
            status_code: 404,
            message: "No such container".into(),
        };
        let e: CpiError = docker_err("x", Target::Vm(VmCid("vm-1".into())))(not_found()).into();
        assert!(matches!(e, CpiError::VmNotFound(c) if c.0 == "vm-1"));
        let e: CpiError = docker_err("x", Target::Disk(DiskCid("d".into())))(not_found()).into();
        assert!(matches!(e, CpiError::DiskNotFound(_)));
        let e: CpiError =
            docker_err("x", Target::Stemcell(StemcellCid("s".into())))(not_found()).into();
        assert!(matches!(e, CpiError::StemcellNotFound(_)));
        let e: CpiError = docker_err("creating container vm-1 for kv/0", Target::None)(
            BollardError::RequestTimeoutError,
        )
        .into();
        assert!(e.is_retryable());
        assert!(
            e.to_string().contains("creating container vm-1 for kv/0"),
            "{e}"
        );
        let e: CpiError = DockerCpiError::Unreachable {
            socket: "unix:///nowhere.sock".into(),
            source: BollardError::SocketNotFoundError("/nowhere.sock".into()),
        }
        .into();
        assert!(e.is_retryable());
        assert!(e
            .to_string()
            .contains("Docker is unreachable at unix:///nowhere.sock"));
        let e: CpiError = DockerCpiError::NotSupported {
            method: "snapshot_disk",
            reason: "no image".into(),
        }
        .into();
        assert!(matches!(e, CpiError::NotSupported { .. }));
    }

    #[tokio::test]
    async fn connecting_to_a_missing_socket_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let socket = format!("unix://{}/docker.sock", dir.path().display());
        let err = DockerCpi::connect(DockerCpiConfig {
            root: dir.path().join("docker-cpi"),
            socket: Some(socket.clone()),
            prefix: "bosun".into(),
        })
        .await
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("Docker is unreachable"), "{err}");
        assert!(err.contains(&socket), "{err}");
    }
}

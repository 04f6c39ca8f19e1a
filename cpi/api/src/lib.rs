//! The CPI contract: the one trait (`Cpi`) through which the director creates
//! and destroys machines and persistent disks on an IaaS, its value types, its
//! typed errors, the agent settings a CPI delivers to each VM, and the
//! conformance suite every backend must pass.
//!
//! Layout:
//! - [`Cpi`]: BOSH CPI v2 methods, async, one attempt each (callers retry
//!   errors for which [`CpiError::is_retryable`] says so).
//! - [`AgentSettings`]: what the agent on a new VM needs to start (its id, the
//!   director's public key, its own SSH host key, networks, disks). A backend
//!   delivers it unchanged (a file for local/docker, user-data for AWS).
//! - [`agent_env`]: BOSH's agent env (what a BOSH CPI delivers to a VM) and
//!   its translation to and from [`AgentSettings`].
//! - [`conformance`]: a suite generic over `Cpi`.
//! - [`records`]: atomic JSON record files for backends' own bookkeeping.
//! - [`failpoint`]: crash-test hooks around every CPI call and agent action.
//! - [`vm_users`]: the `vcap` user and group every VM has, as on BOSH's
//!   stemcells.
//!
//! This crate must not know about manifests, deployments or the agent
//! protocol: it speaks only of stemcells, VMs, disks and metadata. It must not
//! talk to agents, and backends must never call the director.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub mod agent_env;
pub mod chain;
pub mod conformance;
pub mod failpoint;
pub mod logged;
pub mod records;
pub mod vm_users;

/// The TCP port every agent listens on for the director's SSH sessions
/// (BOSH's agent uses 6868 too).
pub const AGENT_PORT: u16 = 6868;

macro_rules! cid {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_string())
            }
        }
    };
}

cid!(
    /// The cloud id of a stemcell (an image, an AMI, a directory).
    StemcellCid
);
cid!(
    /// The cloud id of a VM.
    VmCid
);
cid!(
    /// The cloud id of a persistent disk.
    DiskCid
);
cid!(
    /// The cloud id of a disk snapshot.
    SnapshotCid
);

/// Tags put on every created resource; keys used by the director:
/// `director`, `deployment`, `instance_group`, `instance`, `name`, `token`.
pub type Metadata = BTreeMap<String, String>;

/// A filter (or metadata) for messages: `director=d, token=t`, or `(anything)`
/// when empty.
pub fn describe_filter(filter: &Metadata) -> String {
    if filter.is_empty() {
        return "(anything)".to_string();
    }
    filter
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether `metadata` contains every entry of `filter` (the matching rule of
/// [`Cpi::find_vms`] / [`Cpi::find_disks`]; an empty filter matches all).
pub fn metadata_matches(metadata: &Metadata, filter: &Metadata) -> bool {
    filter
        .iter()
        .all(|(k, v)| metadata.get(k).is_some_and(|have| have == v))
}

/// What a backend reports of itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpiInfo {
    /// Backend name: `local`, `docker`, `aws`.
    pub name: String,
    /// CPI API version (BOSH's is 2).
    pub api_version: u32,
    /// Stemcell formats it accepts, e.g. `local-host`, `docker-rootfs`.
    pub stemcell_formats: Vec<String>,
}

/// A stemcell handed to `create_stemcell`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StemcellSpec {
    pub name: String,
    pub os: String,
    pub version: String,
    /// The unpacked image (root filesystem tarball, ...), when the format has one.
    pub image_path: Option<PathBuf>,
    /// `cloud_properties` from `stemcell.MF`.
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
}

/// Network type, as in BOSH's cloud-config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkKind {
    Manual,
    Dynamic,
    Vip,
}

/// One network of a VM, with the address the director chose for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSettings {
    #[serde(rename = "type")]
    pub kind: NetworkKind,
    /// The IPv4 address (empty for dynamic networks until the IaaS assigns one).
    pub ip: String,
    pub netmask: String,
    /// The subnet's range in CIDR form, e.g. `127.77.0.0/24`.
    pub range: String,
    pub gateway: Option<String>,
    #[serde(default)]
    pub dns: Vec<String>,
    /// Which defaults this network provides (`dns`, `gateway`).
    #[serde(default)]
    pub default: Vec<String>,
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
}

/// Everything the agent on a VM needs to start. Delivered by the CPI, read by
/// the agent; the CPI must not interpret it beyond what it needs to place the
/// VM (the networks).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    pub agent_id: String,
    /// The director's SSH public key (OpenSSH format); the only key the agent accepts.
    pub director_public_key: String,
    /// The agent's SSH host private key (OpenSSH PEM), generated by the director,
    /// which pins the matching public key.
    pub host_private_key: String,
    /// Address the agent listens on (its VM's default IP; `0.0.0.0` if unknown).
    pub listen_ip: String,
    pub listen_port: u16,
    pub networks: BTreeMap<String, NetworkSettings>,
    /// Persistent disks attached at boot: disk cid to device hint.
    #[serde(default)]
    pub disks: BTreeMap<String, serde_json::Value>,
    /// Free-form `env` from the manifest / vm_type.
    #[serde(default)]
    pub env: serde_json::Value,
}

impl AgentSettings {
    /// The IP the director dials to reach this agent: the default network's
    /// address, else the first network with an address.
    pub fn primary_ip(&self) -> Option<&str> {
        self.networks
            .values()
            .find(|n| n.default.iter().any(|d| d == "gateway") && !n.ip.is_empty())
            .or_else(|| self.networks.values().find(|n| !n.ip.is_empty()))
            .map(|n| n.ip.as_str())
    }
}

/// Arguments of `create_vm` (BOSH: agent_id, stemcell_cid, cloud_properties,
/// networks, disk_cids, env).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateVmRequest {
    pub agent_id: String,
    pub stemcell: StemcellCid,
    /// Merged cloud properties of the AZ, vm_type and vm_extensions.
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
    pub networks: BTreeMap<String, NetworkSettings>,
    /// Disks the VM should be placed near (locality hint).
    #[serde(default)]
    pub disk_cids: Vec<DiskCid>,
    pub settings: AgentSettings,
    /// Tags for the VM (see [`Metadata`]).
    #[serde(default)]
    pub metadata: Metadata,
}

/// Arguments of `create_disk`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateDiskRequest {
    pub size_mb: u64,
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
    /// The VM the disk will be attached to, so it is created nearby.
    pub vm_locality: Option<VmCid>,
    #[serde(default)]
    pub metadata: Metadata,
}

/// What `attach_disk` returns: how the agent finds the disk on the VM (a
/// device path, a host directory for the local CPI, a volume name...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskHint {
    pub path: String,
}

/// A CPI failure. Messages name the operation and the resource.
#[derive(Debug, thiserror::Error)]
pub enum CpiError {
    #[error("VM {0} not found")]
    VmNotFound(VmCid),
    #[error("disk {0} not found")]
    DiskNotFound(DiskCid),
    #[error("stemcell {0} not found")]
    StemcellNotFound(StemcellCid),
    #[error("{method} is not supported by the {cpi} CPI")]
    NotSupported { cpi: String, method: String },
    #[error("{message} (transient, retry)")]
    Transient {
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{message}")]
    Fatal { message: String },
}

impl CpiError {
    /// A fatal error with a message naming the operation.
    pub fn fatal(message: impl Into<String>) -> Self {
        CpiError::Fatal {
            message: message.into(),
        }
    }

    /// Whether the same call may succeed if tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, CpiError::Transient { .. })
    }
}

pub type CpiResult<T> = Result<T, CpiError>;

/// The CPI: BOSH CPI v2, async. Deleting what is already gone succeeds.
/// Every created resource carries the metadata it was given so orphans can be
/// found by tag.
#[async_trait]
pub trait Cpi: Send + Sync {
    async fn info(&self) -> CpiResult<CpiInfo>;

    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid>;
    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()>;

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid>;
    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()>;
    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool>;
    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()>;
    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()>;
    /// Every VM this CPI still has (not deleted) whose metadata contains every
    /// entry of `filter` (e.g. `{"director": "<id>"}`), with its metadata as
    /// last set (create_vm's metadata merged with later set_vm_metadata calls).
    /// An empty filter matches every VM the CPI manages. Sorted by cid.
    ///
    /// The director's cloud check uses it to find orphans: VMs carrying its
    /// tags that its state does not know (e.g. after a crash between
    /// `create_vm` returning and the cid being recorded). A VM whose agent
    /// died but which was not deleted is still listed.
    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>>;

    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid>;
    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()>;
    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint>;
    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()>;
    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool>;
    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>>;
    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()>;
    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()>;
    /// The same as [`Cpi::find_vms`] for persistent disks (create_disk's
    /// metadata merged with set_disk_metadata), sorted by cid. Snapshots are
    /// not disks and are never listed.
    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>>;
    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid>;
    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()>;

    /// What `find_vms` and `find_disks` cannot see, when they answer from
    /// records rather than from the cloud (an external CPI: its protocol
    /// has no listing call). Cloud-check prints it with its orphan scan.
    fn listing_caveat(&self) -> Option<String> {
        None
    }

    /// The cloud properties of a VM with these resources (BOSH's
    /// `vm_resources`: `cpu`, `ram` in MB, `ephemeral_disk_size` in MB).
    /// Optional: a backend without it answers `NotSupported`.
    async fn calculate_vm_cloud_properties(
        &self,
        _vm_resources: &serde_json::Value,
    ) -> CpiResult<serde_json::Value> {
        Err(CpiError::NotSupported {
            cpi: self.info().await.map(|i| i.name).unwrap_or_default(),
            method: "calculate_vm_cloud_properties".into(),
        })
    }

    /// Changes a disk's size or cloud properties in place (BOSH's
    /// `update_disk`). Optional: a backend without it answers
    /// `NotSupported`, and the director then copies the disk instead.
    async fn update_disk(
        &self,
        _cid: &DiskCid,
        _new_size_mb: u64,
        _cloud_properties: &serde_json::Value,
    ) -> CpiResult<()> {
        Err(CpiError::NotSupported {
            cpi: self.info().await.map(|i| i.name).unwrap_or_default(),
            method: "update_disk".into(),
        })
    }
}

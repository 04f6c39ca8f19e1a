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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummaryStateEnum, EndpointIpamConfig,
    EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkConnectRequest, NetworkCreateRequest,
    NetworkingConfig, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptions, CreateImageOptions, InspectNetworkOptions, ListContainersOptions,
    ListImagesOptions, ListVolumesOptions, RemoveContainerOptions, RemoveImageOptions,
    RemoveVolumeOptions, RestartContainerOptions, StopContainerOptions, UploadToContainerOptions,
};
use bollard::Docker;
use bosun_cpi::records;
use bosun_cpi::{
    AgentSettings, CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid,
    DiskHint, Metadata, NetworkKind, NetworkSettings, SnapshotCid, StemcellCid, StemcellSpec,
    VmCid,
};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

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

/// Configuration of the Docker CPI.
#[derive(Clone, Debug)]
pub struct DockerCpiConfig {
    /// The CPI's own records (VM create requests, disk sizes/metadata, snapshots), e.g. <state-dir>/docker-cpi
    pub root: PathBuf,
    /// Daemon address; None = DOCKER_HOST or unix:///var/run/docker.sock
    pub socket: Option<String>,
    /// Prefix of Docker object names this CPI creates (networks), e.g. "bosun"
    pub prefix: String,
}

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
    #[error("Docker is unreachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        #[source]
        source: BollardError,
    },
    #[error("docker CPI: {op}: {source}")]
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
    #[error("docker CPI: {op} {}: {source}", path.display())]
    Io {
        op: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("docker CPI: {}: invalid JSON: {source}", path.display())]
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

impl From<records::RecordError> for DockerCpiError {
    fn from(e: records::RecordError) -> Self {
        match e {
            records::RecordError::Io { op, path, source } => DockerCpiError::Io {
                op: op.into(),
                path,
                source,
            },
            records::RecordError::Json { path, source } => DockerCpiError::Json { path, source },
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
            DockerCpiError::Unreachable { .. } => transient(e.to_string()),
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
                    transient(e.to_string())
                } else {
                    CpiError::fatal(e.to_string())
                }
            }
            other => CpiError::fatal(other.to_string()),
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

// ---------------------------------------------------------------------------
// Names, labels and container configuration (pure)
// ---------------------------------------------------------------------------

/// A cid is used in file names and URL paths: only `[A-Za-z0-9._-]`, not
/// starting with a dot (stemcell cids, image ids, may also contain `:`).
fn valid_cid(cid: &str, allow_colon: bool) -> bool {
    !cid.is_empty()
        && !cid.starts_with('.')
        && cid.len() <= 200
        && cid.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || b == b'-'
                || b == b'_'
                || b == b'.'
                || (allow_colon && b == b':')
        })
}

/// Makes `s` usable in a Docker image tag or object name: characters outside
/// `[A-Za-z0-9_.-]` become `-`, it starts with an alphanumeric character, and
/// it is at most `max` bytes long. Never empty (`x` then).
pub fn sanitize_name(s: &str, max: usize) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let trimmed = mapped.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut out: String = trimmed.chars().take(max.max(1)).collect();
    if out.is_empty() {
        out.push('x');
    }
    out
}

/// A Docker repository name component: lowercase `[a-z0-9]` separated by single `-`.
fn sanitize_repo(s: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let mut out = String::new();
    for c in lower.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "bosun".to_string()
    } else {
        out
    }
}

/// The repository stemcell images are tagged into: `<prefix>-stemcell`.
pub fn stemcell_repo(prefix: &str) -> String {
    format!("{}-stemcell", sanitize_repo(prefix))
}

/// The tag of a stemcell image: `<sanitized name>-<sanitized version>`.
pub fn stemcell_tag(spec: &StemcellSpec) -> String {
    sanitize_name(&format!("{}-{}", spec.name, spec.version), 128)
}

/// The Docker network of a BOSH network: `<prefix>-<sanitized name>`.
pub fn network_name(prefix: &str, network: &str) -> String {
    sanitize_name(&format!("{prefix}-{network}"), 200)
}

/// `bosun.<key>` for every metadata entry, plus `bosun.cpi=<prefix>`.
pub fn labels(prefix: &str, metadata: &Metadata) -> HashMap<String, String> {
    let mut l: HashMap<String, String> = metadata
        .iter()
        .map(|(k, v)| (format!("bosun.{k}"), v.clone()))
        .collect();
    l.insert(LABEL_CPI.into(), prefix.into());
    l
}

/// The metadata an object's labels carry: every `bosun.<key>` label as
/// `<key>`, except the CPI's own labels named in `own` (`bosun.cpi`, ...)
/// and the stemcell image's (`bosun.stemcell.*`, inherited by containers).
pub fn metadata_of_labels(labels: &HashMap<String, String>, own: &[&str]) -> Metadata {
    labels
        .iter()
        .filter(|(k, _)| !own.contains(&k.as_str()) && !k.starts_with(STEMCELL_LABELS_PREFIX))
        .filter_map(|(k, v)| k.strip_prefix("bosun.").map(|k| (k.to_string(), v.clone())))
        .collect()
}

/// One Docker network a VM is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNetwork {
    /// The BOSH network name.
    pub name: String,
    /// The Docker network name.
    pub docker_name: String,
    /// The subnet (CIDR), when known.
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    /// The static IPv4 address (manual networks).
    pub ip: Option<String>,
}

impl VmNetwork {
    fn endpoint(&self) -> EndpointSettings {
        EndpointSettings {
            ipam_config: self.ip.as_ref().map(|ip| EndpointIpamConfig {
                ipv4_address: Some(ip.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The Docker networks of a VM, the default-gateway network first. Manual
/// networks need an IP and a range; dynamic ones get whatever Docker assigns;
/// VIP networks are not Docker networks and are skipped.
pub fn vm_networks(prefix: &str, req: &CreateVmRequest) -> Result<Vec<VmNetwork>> {
    let mut out = Vec::new();
    let mut names: Vec<(&String, &NetworkSettings)> = req.networks.iter().collect();
    // Stable sort: the network providing the default gateway first.
    names.sort_by_key(|(_, n)| !n.default.iter().any(|d| d == "gateway"));
    for (name, net) in names {
        let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        match net.kind {
            NetworkKind::Vip => continue,
            NetworkKind::Manual => {
                if net.ip.trim().is_empty() || net.range.trim().is_empty() {
                    return Err(DockerCpiError::Invalid(format!(
                        "creating VM for agent {}: manual network {name} needs an ip and a range (got ip {:?}, range {:?})",
                        req.agent_id, net.ip, net.range
                    )));
                }
            }
            NetworkKind::Dynamic => {}
        }
        out.push(VmNetwork {
            name: name.clone(),
            docker_name: network_name(prefix, name),
            subnet: non_empty(&net.range),
            gateway: net.gateway.as_deref().and_then(non_empty),
            ip: match net.kind {
                NetworkKind::Manual => non_empty(&net.ip),
                _ => None,
            },
        });
    }
    Ok(out)
}

/// Where the n-th attached disk is mounted: the first at `/var/vcap/store`,
/// any further one (a disk migration) at `/var/vcap/store-<disk cid>`.
fn mount_path(index: usize, disk: &DiskCid) -> String {
    if index == 0 {
        STORE_PATH.to_string()
    } else {
        format!("{STORE_PATH}-{}", disk.0)
    }
}

/// The agent settings to deliver: the request's, with `disks` set from the
/// attached disks (`{<cid>: {"path": <mount point>}}`).
pub fn settings_for(req: &CreateVmRequest, disks: &[DiskCid]) -> AgentSettings {
    let mut settings = req.settings.clone();
    settings.disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| (d.0.clone(), serde_json::json!({ "path": mount_path(i, d) })))
        .collect();
    settings
}

/// The container of a VM: its create body (with the first network attached)
/// and the further networks to connect before starting it.
pub fn container_config(
    prefix: &str,
    cid: &VmCid,
    req: &CreateVmRequest,
    metadata: &Metadata,
    disks: &[DiskCid],
) -> Result<(ContainerCreateBody, Vec<VmNetwork>)> {
    let mut networks = vm_networks(prefix, req)?;
    let first = if networks.is_empty() {
        None
    } else {
        Some(networks.remove(0))
    };
    let mut l = labels(prefix, metadata);
    l.insert(LABEL_VM.into(), cid.0.clone());
    l.insert(LABEL_AGENT_ID.into(), req.agent_id.clone());
    let binds: Vec<String> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{}:{}", d.0, mount_path(i, d)))
        .collect();
    // DNS servers of the network providing DNS (else of any network).
    let dns: Vec<String> = req
        .networks
        .values()
        .find(|n| n.default.iter().any(|d| d == "dns") && !n.dns.is_empty())
        .or_else(|| req.networks.values().find(|n| !n.dns.is_empty()))
        .map(|n| n.dns.clone())
        .unwrap_or_default();
    let host_config = HostConfig {
        binds: Some(binds),
        network_mode: first.as_ref().map(|n| n.docker_name.clone()),
        privileged: Some(false),
        dns: (!dns.is_empty()).then_some(dns),
        ..Default::default()
    };
    let networking_config = first.as_ref().map(|n| NetworkingConfig {
        endpoints_config: Some(HashMap::from([(n.docker_name.clone(), n.endpoint())])),
    });
    let body = ContainerCreateBody {
        image: Some(req.stemcell.0.clone()),
        cmd: Some(vec![
            AGENT_PATH_IN_VM.to_string(),
            "agent".to_string(),
            "--settings".to_string(),
            SETTINGS_PATH_IN_VM.to_string(),
        ]),
        labels: Some(l),
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    };
    Ok((body, networks))
}

/// A tar archive holding the settings file (`var/vcap/bosh/settings.json`,
/// root-owned, mode 0600), to be extracted at `/`.
pub fn settings_archive(settings: &AgentSettings) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(settings).map_err(|source| DockerCpiError::Json {
        path: PathBuf::from(SETTINGS_PATH_IN_VM),
        source,
    })?;
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    let in_archive = SETTINGS_PATH_IN_VM.trim_start_matches('/');
    builder
        .append_data(&mut header, in_archive, json.as_slice())
        .and_then(|()| builder.into_inner())
        .map_err(io_err("archiving", Path::new(SETTINGS_PATH_IN_VM)))
}

// ---------------------------------------------------------------------------
// Records
// ---------------------------------------------------------------------------

/// `vms/<cid>.json`: what it takes to recreate the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub cid: VmCid,
    pub request: CreateVmRequest,
    /// The request's metadata merged with every `set_vm_metadata`.
    #[serde(default)]
    pub metadata: Metadata,
    /// Attached disks, in attachment order (the first is at `/var/vcap/store`).
    #[serde(default)]
    pub disks: Vec<DiskCid>,
}

/// `disks/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub cid: DiskCid,
    pub size_mb: u64,
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
    #[serde(default)]
    pub metadata: Metadata,
    pub attached_to: Option<VmCid>,
}

/// `snapshots/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub cid: SnapshotCid,
    pub disk: DiskCid,
    #[serde(default)]
    pub metadata: Metadata,
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    Ok(records::write_json(path, value, 0o600)?)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    Ok(records::read_json(path)?)
}

fn remove_file_if_exists(path: &Path) -> Result<()> {
    Ok(records::remove_file_if_exists(path)?)
}

/// Reads a file as a stream of chunks (for image imports).
fn file_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::result::Result<Bytes, io::Error>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; 256 * 1024];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

// ---------------------------------------------------------------------------
// The CPI
// ---------------------------------------------------------------------------

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
        let prefix = config.prefix.trim().to_string();
        if prefix.is_empty() || sanitize_name(&prefix, 64) != prefix {
            return Err(DockerCpiError::Config(format!(
                "prefix {:?} must be non-empty and use only [A-Za-z0-9_.-], starting with a letter or digit",
                config.prefix
            )));
        }
        let socket = match config.socket.filter(|s| !s.trim().is_empty()) {
            Some(s) => s,
            None => std::env::var("DOCKER_HOST")
                .ok()
                .filter(|s| !s.trim().is_empty())
                .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string()),
        };
        let address = if socket.starts_with('/') {
            format!("unix://{socket}")
        } else {
            socket.clone()
        };
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

    fn vm_file(&self, cid: &VmCid) -> PathBuf {
        self.root.join("vms").join(format!("{}.json", cid.0))
    }

    fn disk_file(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(format!("{}.json", cid.0))
    }

    fn snapshot_file(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(format!("{}.json", cid.0))
    }

    fn read_vm(&self, cid: &VmCid) -> Result<Option<VmRecord>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        read_json(&self.vm_file(cid))
    }

    fn read_disk(&self, cid: &DiskCid) -> Result<Option<DiskRecord>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        read_json(&self.disk_file(cid))
    }

    /// Read-modify-write of a disk record (no-op when there is none).
    fn update_disk(&self, cid: &DiskCid, f: impl FnOnce(&mut DiskRecord)) -> Result<()> {
        let _g = self.records_guard();
        if let Some(mut rec) = self.read_disk(cid)? {
            f(&mut rec);
            write_json(&self.disk_file(cid), &rec)?;
        }
        Ok(())
    }

    /// Read-modify-write of a VM record; `VmNotFound` when there is none.
    fn update_vm(&self, cid: &VmCid, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord> {
        let _g = self.records_guard();
        let mut rec = self
            .read_vm(cid)?
            .ok_or_else(|| DockerCpiError::VmNotFound(cid.clone()))?;
        f(&mut rec);
        write_json(&self.vm_file(cid), &rec)?;
        Ok(rec)
    }

    /// The container, or `None` when it does not exist.
    async fn inspect_container(&self, cid: &VmCid) -> Result<Option<ContainerInspectResponse>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        match self.docker.inspect_container(&cid.0, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(docker_err(
                format!("inspecting container {cid}"),
                Target::Vm(cid.clone()),
            )(e)),
        }
    }

    async fn volume_exists(&self, name: &str) -> Result<bool> {
        if !valid_cid(name, false) {
            return Ok(false);
        }
        match self.docker.inspect_volume(name).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err(
                format!("inspecting volume {name}"),
                Target::None,
            )(e)),
        }
    }

    /// The disk's record; `DiskNotFound` when its volume does not exist. A
    /// volume without a record (records lost) gets one from its labels.
    async fn disk_record(&self, cid: &DiskCid) -> Result<DiskRecord> {
        if !valid_cid(&cid.0, false) {
            return Err(DockerCpiError::DiskNotFound(cid.clone()));
        }
        let volume = match self.docker.inspect_volume(&cid.0).await {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Err(DockerCpiError::DiskNotFound(cid.clone())),
            Err(e) => {
                return Err(docker_err(
                    format!("inspecting volume of disk {cid}"),
                    Target::Disk(cid.clone()),
                )(e))
            }
        };
        if let Some(rec) = self.read_disk(cid)? {
            return Ok(rec);
        }
        let metadata = metadata_of_labels(&volume.labels, DISK_OWN_LABELS);
        let size_mb = volume
            .labels
            .get(LABEL_SIZE_MB)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb,
            cloud_properties: serde_json::json!({}),
            metadata,
            attached_to: None,
        };
        let _g = self.records_guard();
        write_json(&self.disk_file(cid), &rec)?;
        Ok(rec)
    }

    /// Creates the Docker network of a VM network, or checks the existing one
    /// has the same subnet. Called with `net_lock` held.
    async fn ensure_network(&self, net: &VmNetwork, what: &str) -> Result<()> {
        for attempt in 0..2 {
            match self
                .docker
                .inspect_network(&net.docker_name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(existing) => {
                    let subnets: Vec<String> = existing
                        .ipam
                        .as_ref()
                        .and_then(|i| i.config.as_ref())
                        .map(|c| c.iter().filter_map(|c| c.subnet.clone()).collect())
                        .unwrap_or_default();
                    if let Some(want) = &net.subnet {
                        if !subnets.iter().any(|s| s == want) {
                            return Err(DockerCpiError::Conflict(format!(
                                "{what}: Docker network {} already exists with subnet {}, but network {} wants {want}; remove it or rename the network",
                                net.docker_name,
                                if subnets.is_empty() { "(none)".to_string() } else { subnets.join(", ") },
                                net.name
                            )));
                        }
                    }
                    return Ok(());
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(docker_err(
                        format!("{what}: inspecting Docker network {}", net.docker_name),
                        Target::None,
                    )(e))
                }
            }
            let mut l = labels(&self.prefix, &Metadata::new());
            l.insert(LABEL_MANAGED.into(), "true".into());
            l.insert("bosun.network".into(), net.name.clone());
            let request = NetworkCreateRequest {
                name: net.docker_name.clone(),
                driver: Some("bridge".into()),
                ipam: net.subnet.as_ref().map(|subnet| Ipam {
                    driver: Some("default".into()),
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet.clone()),
                        gateway: net.gateway.clone(),
                        ..Default::default()
                    }]),
                    options: None,
                }),
                labels: Some(l),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {
                    tracing::info!(network = %net.docker_name, subnet = ?net.subnet, "created Docker network");
                    return Ok(());
                }
                // Created by someone else meanwhile: check it.
                Err(e) if status_of(&e) == Some(409) && attempt == 0 => continue,
                Err(e) => {
                    return Err(docker_err(
                        format!(
                            "{what}: creating Docker network {} (subnet {}) for network {}",
                            net.docker_name,
                            net.subnet.as_deref().unwrap_or("assigned by Docker"),
                            net.name
                        ),
                        Target::None,
                    )(e))
                }
            }
        }
        Err(DockerCpiError::Conflict(format!(
            "{what}: Docker network {} keeps appearing and disappearing",
            net.docker_name
        )))
    }

    /// Removes the given Docker networks of this CPI that no container uses
    /// any more (errors are logged: a leftover network is harmless).
    async fn remove_unused_networks(&self, names: BTreeSet<String>) {
        let _net = self.net_lock.lock().await;
        for name in names {
            let network = match self
                .docker
                .inspect_network(&name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(n) => n,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "inspecting Docker network");
                    continue;
                }
            };
            let ours = network.labels.as_ref().is_some_and(|l| {
                l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                    && l.get(LABEL_CPI) == Some(&self.prefix)
            });
            let attached = network.containers.as_ref().is_some_and(|c| !c.is_empty());
            if !ours || attached {
                continue;
            }
            // Stopped containers have no endpoint but still name the network.
            let options = ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("network".to_string(), vec![name.clone()])])),
                ..Default::default()
            };
            match self.docker.list_containers(Some(options)).await {
                Ok(c) if c.is_empty() => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "listing containers of Docker network");
                    continue;
                }
            }
            match self.docker.remove_network(&name).await {
                Ok(()) => tracing::info!(network = %name, "removed Docker network"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(network = %name, error = %e, "removing Docker network"),
            }
        }
    }

    /// Removes a container (force, volumes kept); already gone is fine.
    async fn remove_container(&self, cid: &VmCid, what: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: false,
            link: false,
        };
        for _ in 0..50 {
            match self
                .docker
                .remove_container(&cid.0, Some(options.clone()))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if is_not_found(&e) => return Ok(()),
                // "removal already in progress": wait for it.
                Err(e) if status_of(&e) == Some(409) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(docker_err(
                        format!("{what}: removing container {cid}"),
                        Target::None,
                    )(e))
                }
            }
        }
        Err(DockerCpiError::Conflict(format!(
            "{what}: container {cid} is still being removed (retry)"
        )))
    }

    /// Creates (or recreates) the container of a VM from its record: removes
    /// any existing one, creates it with the record's disks, uploads the
    /// settings, starts it.
    async fn run_container(&self, rec: &VmRecord, what: &str) -> Result<()> {
        let cid = &rec.cid;
        let (body, extra) =
            container_config(&self.prefix, cid, &rec.request, &rec.metadata, &rec.disks)?;
        {
            let _net = self.net_lock.lock().await;
            for net in vm_networks(&self.prefix, &rec.request)? {
                self.ensure_network(&net, what).await?;
            }
            self.remove_container(cid, what).await?;
            let options = CreateContainerOptions {
                name: Some(cid.0.clone()),
                ..Default::default()
            };
            self.docker
                .create_container(Some(options), body)
                .await
                .map_err(|e| {
                    if is_not_found(&e) {
                        DockerCpiError::StemcellNotFound(rec.request.stemcell.clone())
                    } else {
                        docker_err(format!("{what}: creating container"), Target::None)(e)
                    }
                })?;
            for net in &extra {
                let request = NetworkConnectRequest {
                    container: cid.0.clone(),
                    endpoint_config: Some(net.endpoint()),
                };
                self.docker
                    .connect_network(&net.docker_name, request)
                    .await
                    .map_err(docker_err(
                        format!(
                            "{what}: connecting container to Docker network {}",
                            net.docker_name
                        ),
                        Target::None,
                    ))?;
            }
        }
        let archive = settings_archive(&settings_for(&rec.request, &rec.disks))?;
        let options = UploadToContainerOptions {
            path: "/".to_string(),
            ..Default::default()
        };
        self.docker
            .upload_to_container(
                &cid.0,
                Some(options),
                bollard::body_full(Bytes::from(archive)),
            )
            .await
            .map_err(docker_err(
                format!("{what}: uploading the agent settings to {SETTINGS_PATH_IN_VM}"),
                Target::None,
            ))?;
        self.docker
            .start_container(&cid.0, None)
            .await
            .map_err(docker_err(
                format!("{what}: starting container"),
                Target::None,
            ))?;
        Ok(())
    }

    /// Whether the container runs with exactly the record's disks mounted.
    fn container_matches(container: &ContainerInspectResponse, rec: &VmRecord) -> bool {
        let running = container
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let mounted: BTreeSet<&str> = container
            .mounts
            .iter()
            .flatten()
            .filter_map(|m| m.name.as_deref())
            .collect();
        let wanted: BTreeSet<&str> = rec.disks.iter().map(|d| d.0.as_str()).collect();
        running && mounted == wanted
    }

    /// Recreates the container with the record's disks (stop, remove, create, start).
    async fn recreate(&self, rec: &VmRecord, what: &str) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        match self.docker.stop_container(&rec.cid.0, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(docker_err(
                    format!("{what}: stopping container"),
                    Target::Vm(rec.cid.clone()),
                )(e))
            }
        }
        self.run_container(rec, what).await
    }

    /// What a VM is called in messages: `vm-... for <instance>`.
    fn describe_vm(cid: &VmCid, metadata: &Metadata) -> String {
        match metadata.get("instance").or_else(|| metadata.get("name")) {
            Some(i) => format!("{cid} for {i}"),
            None => cid.to_string(),
        }
    }

    /// An image to run helper containers with: the disk's VM's stemcell, else
    /// any stemcell image of this CPI.
    async fn helper_image(&self, disk: &DiskRecord) -> Result<Option<String>> {
        if let Some(vm) = &disk.attached_to {
            if let Some(rec) = self.read_vm(vm)? {
                if self
                    .docker
                    .inspect_image(&rec.request.stemcell.0)
                    .await
                    .is_ok()
                {
                    return Ok(Some(rec.request.stemcell.0));
                }
            }
        }
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "reference".to_string(),
                vec![stemcell_repo(&self.prefix)],
            )])),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(docker_err("listing stemcell images", Target::None))?;
        Ok(images.into_iter().next().map(|i| i.id))
    }

    /// Runs `cp -a /from/. /to/` in a short-lived helper container.
    async fn copy_volume(&self, image: &str, from: &str, to: &str, what: &str) -> Result<()> {
        let name = format!("{}-copy-{}", self.prefix, uuid::Uuid::new_v4());
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec![
                "cp".into(),
                "-a".into(),
                "/from/.".into(),
                "/to/".into(),
            ]),
            labels: Some(labels(&self.prefix, &Metadata::new())),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{from}:/from:ro"), format!("{to}:/to")]),
                network_mode: Some("none".into()),
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(docker_err(
                format!("{what}: creating helper container {name}"),
                Target::None,
            ))?;
        let result = async {
            self.docker
                .start_container(&name, None)
                .await
                .map_err(docker_err(
                    format!("{what}: starting helper container {name}"),
                    Target::None,
                ))?;
            let mut wait = self.docker.wait_container(&name, None);
            while let Some(r) = wait.next().await {
                match r {
                    Ok(r) if r.status_code == 0 => {}
                    Ok(r) => {
                        return Err(DockerCpiError::Conflict(format!(
                            "{what}: copying {from} to {to} exited with status {}",
                            r.status_code
                        )))
                    }
                    Err(BollardError::DockerContainerWaitError { error, code }) => {
                        return Err(DockerCpiError::Conflict(format!(
                            "{what}: copying {from} to {to} exited with status {code} {error}"
                        )))
                    }
                    Err(e) => {
                        return Err(docker_err(
                            format!("{what}: waiting for helper container {name}"),
                            Target::None,
                        )(e))
                    }
                }
            }
            Ok(())
        }
        .await;
        let removed = self.remove_container(&VmCid(name.clone()), what).await;
        result.and(removed)
    }

    // -- the operations, with this crate's error type -----------------------

    async fn do_create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let what = format!("creating stemcell {}/{}", spec.name, spec.version);
        let path = spec.image_path.as_ref().ok_or_else(|| {
            DockerCpiError::Invalid(format!(
                "{what}: the stemcell has no image (want a {STEMCELL_FORMAT} stemcell: a gzip'd root filesystem tarball)"
            ))
        })?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(io_err(format!("{what}: opening the image"), path))?;
        let repo = stemcell_repo(&self.prefix);
        let tag = stemcell_tag(spec);
        let reference = format!("{repo}:{tag}");
        let label = |k: &str, v: &str| {
            format!(
                "LABEL {k}={}",
                serde_json::to_string(v).unwrap_or_else(|_| "\"\"".into())
            )
        };
        let options = CreateImageOptions {
            from_src: Some("-".into()),
            repo: Some(repo.clone()),
            tag: Some(tag.clone()),
            message: Some(format!("bosun stemcell {}/{}", spec.name, spec.version)),
            changes: vec![
                label(LABEL_CPI, &self.prefix),
                label(&format!("{STEMCELL_LABELS_PREFIX}name"), &spec.name),
                label(&format!("{STEMCELL_LABELS_PREFIX}version"), &spec.version),
                label(&format!("{STEMCELL_LABELS_PREFIX}os"), &spec.os),
            ],
            ..Default::default()
        };
        let mut stream = self.docker.create_image(
            Some(options),
            Some(bollard::body_try_stream(file_stream(file))),
            None,
        );
        while let Some(item) = stream.next().await {
            item.map_err(docker_err(
                format!("{what}: importing {} as {reference}", path.display()),
                Target::None,
            ))?;
        }
        let image = self
            .docker
            .inspect_image(&reference)
            .await
            .map_err(docker_err(
                format!("{what}: inspecting imported image {reference}"),
                Target::None,
            ))?;
        let id = image.id.ok_or_else(|| {
            DockerCpiError::Conflict(format!("{what}: imported image {reference} has no id"))
        })?;
        tracing::info!(stemcell = %id, reference = %reference, "imported stemcell");
        Ok(StemcellCid(id))
    }

    async fn do_delete_stemcell(&self, cid: &StemcellCid) -> Result<()> {
        if !valid_cid(&cid.0, true) {
            return Ok(());
        }
        let options = RemoveImageOptions {
            force: false,
            noprune: false,
            platforms: None,
        };
        match self.docker.remove_image(&cid.0, Some(options), None).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Err(DockerCpiError::Conflict(format!(
                "deleting stemcell {cid}: the image is still used by containers (delete their VMs first): {e}"
            ))),
            Err(e) => Err(docker_err(
                format!("deleting stemcell {cid}"),
                Target::None,
            )(e)),
        }
    }

    async fn do_create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
        let cid = VmCid(format!("vm-{}", uuid::Uuid::new_v4()));
        let what = format!(
            "creating container {}",
            Self::describe_vm(&cid, &req.metadata)
        );
        // Validate before any side effect.
        vm_networks(&self.prefix, req)?;
        if !valid_cid(&req.stemcell.0, true) {
            return Err(DockerCpiError::StemcellNotFound(req.stemcell.clone()));
        }
        match self.docker.inspect_image(&req.stemcell.0).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return Err(DockerCpiError::StemcellNotFound(req.stemcell.clone()))
            }
            Err(e) => {
                return Err(docker_err(
                    format!("{what}: inspecting stemcell image {}", req.stemcell),
                    Target::Stemcell(req.stemcell.clone()),
                )(e))
            }
        }
        let _l = self.lock(&cid.0).await;
        let rec = VmRecord {
            cid: cid.clone(),
            request: req.clone(),
            metadata: req.metadata.clone(),
            disks: Vec::new(),
        };
        // Recorded before the container exists, so a crash leaves a trace.
        {
            let _g = self.records_guard();
            write_json(&self.vm_file(&cid), &rec)?;
        }
        if let Err(e) = self.run_container(&rec, &what).await {
            if let Err(cleanup) = self.remove_container(&cid, &what).await {
                tracing::warn!(vm = %cid, error = %cleanup, "cleaning up a failed container");
            }
            let _ = remove_file_if_exists(&self.vm_file(&cid));
            let networks = vm_networks(&self.prefix, req)
                .map(|n| n.into_iter().map(|n| n.docker_name).collect())
                .unwrap_or_default();
            self.remove_unused_networks(networks).await;
            return Err(e);
        }
        tracing::info!(vm = %cid, agent = %req.agent_id, "created VM container");
        Ok(cid)
    }

    async fn do_delete_vm(&self, cid: &VmCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        let _l = self.lock(&cid.0).await;
        let rec = self.read_vm(cid)?;
        let what = format!(
            "deleting container {}",
            Self::describe_vm(
                cid,
                rec.as_ref()
                    .map(|r| &r.metadata)
                    .unwrap_or(&Metadata::new())
            )
        );
        let mut networks: BTreeSet<String> = BTreeSet::new();
        if let Some(rec) = &rec {
            networks.extend(
                vm_networks(&self.prefix, &rec.request)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| n.docker_name),
            );
        }
        if let Some(container) = self.inspect_container(cid).await? {
            let ours = format!("{}-", self.prefix);
            networks.extend(
                container
                    .network_settings
                    .and_then(|n| n.networks)
                    .unwrap_or_default()
                    .into_keys()
                    .filter(|n| n.starts_with(&ours)),
            );
        }
        self.remove_container(cid, &what).await?;
        // Its disks become detached (never deleted).
        let mut disks: BTreeSet<DiskCid> = rec.iter().flat_map(|r| r.disks.clone()).collect();
        if let Ok(dir) = fs::read_dir(self.root.join("disks")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(disk) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                    disks.insert(DiskCid(disk.to_string()));
                }
            }
        }
        for disk in disks {
            self.update_disk(&disk, |d| {
                if d.attached_to.as_ref() == Some(cid) {
                    d.attached_to = None;
                }
            })?;
        }
        remove_file_if_exists(&self.vm_file(cid))?;
        self.remove_unused_networks(networks).await;
        tracing::info!(vm = %cid, "deleted VM container");
        Ok(())
    }

    /// The `label` filter selecting this CPI's objects (plus `more`).
    fn label_filter(&self, more: &[&str]) -> HashMap<String, Vec<String>> {
        let mut labels = vec![format!("{LABEL_CPI}={}", self.prefix)];
        labels.extend(more.iter().map(|l| l.to_string()));
        HashMap::from([("label".to_string(), labels)])
    }

    /// Every VM container of this CPI (running or not, but not being
    /// removed) whose metadata matches: the record's when there is one (it
    /// has set_vm_metadata's tags, which a container's labels may lack),
    /// else the container's labels (a container whose record was lost).
    async fn do_find_vms(&self, filter: &Metadata) -> Result<Vec<(VmCid, Metadata)>> {
        let what = format!("listing VMs tagged {}", bosun_cpi::describe_filter(filter));
        let options = ListContainersOptions {
            all: true,
            filters: Some(self.label_filter(&[LABEL_VM])),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(docker_err(
                format!("{what}: listing containers"),
                Target::None,
            ))?;
        let mut found = BTreeMap::new();
        for container in containers {
            if container.state == Some(ContainerSummaryStateEnum::REMOVING) {
                continue;
            }
            let labels = container.labels.unwrap_or_default();
            if labels.get(LABEL_CPI) != Some(&self.prefix) {
                continue;
            }
            // Its name is its cid (`/vm-...`; link aliases have a second `/`).
            let Some(name) = container
                .names
                .iter()
                .flatten()
                .map(|n| n.trim_start_matches('/'))
                .find(|n| valid_cid(n, false))
            else {
                continue;
            };
            let cid = VmCid(name.to_string());
            let metadata = match self.read_vm(&cid) {
                Ok(Some(rec)) => rec.metadata,
                Ok(None) => metadata_of_labels(&labels, VM_OWN_LABELS),
                Err(e) => {
                    tracing::warn!(vm = %cid, error = %e, "{what}: unreadable record, using the container's labels");
                    metadata_of_labels(&labels, VM_OWN_LABELS)
                }
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                found.insert(cid, metadata);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Every disk volume of this CPI (snapshots excluded) whose metadata
    /// matches: the record's when there is one (with set_disk_metadata's
    /// tags), else the volume's labels.
    async fn do_find_disks(&self, filter: &Metadata) -> Result<Vec<(DiskCid, Metadata)>> {
        let what = format!(
            "listing disks tagged {}",
            bosun_cpi::describe_filter(filter)
        );
        let options = ListVolumesOptions {
            filters: Some(self.label_filter(&[])),
        };
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(docker_err(format!("{what}: listing volumes"), Target::None))?
            .volumes
            .unwrap_or_default();
        let mut found = BTreeMap::new();
        for volume in volumes {
            if volume.labels.get(LABEL_CPI) != Some(&self.prefix)
                || volume.labels.contains_key(LABEL_SNAPSHOT_OF)
                || !valid_cid(&volume.name, false)
            {
                continue;
            }
            let cid = DiskCid(volume.name.clone());
            let metadata = match self.read_disk(&cid) {
                Ok(Some(rec)) => rec.metadata,
                Ok(None) => metadata_of_labels(&volume.labels, DISK_OWN_LABELS),
                Err(e) => {
                    tracing::warn!(disk = %cid, error = %e, "{what}: unreadable record, using the volume's labels");
                    metadata_of_labels(&volume.labels, DISK_OWN_LABELS)
                }
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                found.insert(cid, metadata);
            }
        }
        Ok(found.into_iter().collect())
    }

    async fn do_reboot_vm(&self, cid: &VmCid) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        if self.inspect_container(cid).await?.is_none() {
            return Err(DockerCpiError::VmNotFound(cid.clone()));
        }
        let options = RestartContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        self.docker
            .restart_container(&cid.0, Some(options))
            .await
            .map_err(docker_err(
                format!("rebooting VM {cid}: restarting container"),
                Target::Vm(cid.clone()),
            ))
    }

    async fn do_create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let cid = DiskCid(format!("disk-{}", uuid::Uuid::new_v4()));
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb: req.size_mb,
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
            attached_to: None,
        };
        {
            let _g = self.records_guard();
            write_json(&self.disk_file(&cid), &rec)?;
        }
        let mut l = labels(&self.prefix, &req.metadata);
        l.insert(LABEL_SIZE_MB.into(), req.size_mb.to_string());
        l.insert(LABEL_DISK.into(), cid.0.clone());
        let request = VolumeCreateRequest {
            name: Some(cid.0.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        };
        if let Err(e) = self.docker.create_volume(request).await {
            let _ = remove_file_if_exists(&self.disk_file(&cid));
            return Err(docker_err(
                format!("creating disk {cid} ({} MB): creating volume", req.size_mb),
                Target::None,
            )(e));
        }
        tracing::info!(disk = %cid, size_mb = req.size_mb, "created disk volume");
        Ok(cid)
    }

    async fn do_delete_disk(&self, cid: &DiskCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        let _l = self.lock(&cid.0).await;
        if let Some(rec) = self.read_disk(cid)? {
            if let Some(vm) = &rec.attached_to {
                if self.read_vm(vm)?.is_some() {
                    return Err(DockerCpiError::Conflict(format!(
                        "deleting disk {cid}: it is attached to VM {vm}; detach it first"
                    )));
                }
            }
        }
        let options = RemoveVolumeOptions { force: false };
        match self.docker.remove_volume(&cid.0, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if status_of(&e) == Some(409) => {
                return Err(DockerCpiError::Conflict(format!(
                    "deleting disk {cid}: its volume is in use by a container: {e}"
                )))
            }
            Err(e) => {
                return Err(docker_err(
                    format!("deleting disk {cid}: removing volume"),
                    Target::None,
                )(e))
            }
        }
        remove_file_if_exists(&self.disk_file(cid))?;
        tracing::info!(disk = %cid, "deleted disk volume");
        Ok(())
    }

    async fn do_attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let _dl = self.lock(&disk.0).await;
        let _vl = self.lock(&vm.0).await;
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| DockerCpiError::VmNotFound(vm.clone()))?;
        let what = format!(
            "attaching disk {disk} to VM {}",
            Self::describe_vm(vm, &rec.metadata)
        );
        let drec = self.disk_record(disk).await?;
        if let Some(other) = &drec.attached_to {
            if other != vm && self.read_vm(other)?.is_some() {
                return Err(DockerCpiError::Conflict(format!(
                    "{what}: disk {disk} is attached to VM {other}; detach it from {other} first"
                )));
            }
        }
        let Some(container) = self.inspect_container(vm).await? else {
            return Err(DockerCpiError::VmNotFound(vm.clone()));
        };
        // Recorded before the container is recreated.
        self.update_disk(disk, |d| d.attached_to = Some(vm.clone()))?;
        let rec = self.update_vm(vm, |r| {
            if !r.disks.contains(disk) {
                r.disks.push(disk.clone());
            }
        })?;
        if !Self::container_matches(&container, &rec) {
            self.recreate(&rec, &what).await?;
            tracing::info!(vm = %vm, disk = %disk, "attached disk (container recreated)");
        }
        let index = rec.disks.iter().position(|d| d == disk).unwrap_or(0);
        Ok(DiskHint {
            path: mount_path(index, disk),
        })
    }

    async fn do_detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let _dl = self.lock(&disk.0).await;
        let _vl = self.lock(&vm.0).await;
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| DockerCpiError::VmNotFound(vm.clone()))?;
        let what = format!(
            "detaching disk {disk} from VM {}",
            Self::describe_vm(vm, &rec.metadata)
        );
        let rec = self.update_vm(vm, |r| r.disks.retain(|d| d != disk))?;
        if let Some(container) = self.inspect_container(vm).await? {
            let mounted = container
                .mounts
                .iter()
                .flatten()
                .any(|m| m.name.as_deref() == Some(disk.0.as_str()));
            if mounted {
                self.recreate(&rec, &what).await?;
                tracing::info!(vm = %vm, disk = %disk, "detached disk (container recreated)");
            }
        }
        self.update_disk(disk, |d| {
            if d.attached_to.as_ref() == Some(vm) {
                d.attached_to = None;
            }
        })
    }

    async fn do_resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        let rec = self.disk_record(cid).await?;
        if new_size_mb < rec.size_mb {
            return Err(DockerCpiError::Conflict(format!(
                "resizing disk {cid} from {} MB to {new_size_mb} MB: disks cannot shrink",
                rec.size_mb
            )));
        }
        // Local-driver volumes have no size: only the record changes.
        self.update_disk(cid, |d| d.size_mb = new_size_mb)
    }

    async fn do_set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        self.disk_record(cid).await?;
        self.update_disk(cid, |d| {
            d.metadata
                .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())))
        })
    }

    async fn do_snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> Result<SnapshotCid> {
        let _l = self.lock(&cid.0).await;
        let rec = self.disk_record(cid).await?;
        let what = format!("snapshotting disk {cid}");
        let Some(image) = self.helper_image(&rec).await? else {
            return Err(DockerCpiError::NotSupported {
                method: "snapshot_disk",
                reason: format!(
                    "{what}: no {} image to copy the data with",
                    stemcell_repo(&self.prefix)
                ),
            });
        };
        let snap = SnapshotCid(format!("snap-{}", uuid::Uuid::new_v4()));
        let srec = SnapshotRecord {
            cid: snap.clone(),
            disk: cid.clone(),
            metadata: metadata.clone(),
        };
        {
            let _g = self.records_guard();
            write_json(&self.snapshot_file(&snap), &srec)?;
        }
        let mut l = labels(&self.prefix, metadata);
        l.insert(LABEL_SNAPSHOT_OF.into(), cid.0.clone());
        let request = VolumeCreateRequest {
            name: Some(snap.0.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        };
        let result = async {
            self.docker
                .create_volume(request)
                .await
                .map_err(docker_err(
                    format!("{what}: creating volume {snap}"),
                    Target::None,
                ))?;
            self.copy_volume(&image, &cid.0, &snap.0, &what).await
        }
        .await;
        if let Err(e) = result {
            let _ = self
                .docker
                .remove_volume(&snap.0, Some(RemoveVolumeOptions { force: true }))
                .await;
            let _ = remove_file_if_exists(&self.snapshot_file(&snap));
            return Err(e);
        }
        tracing::info!(disk = %cid, snapshot = %snap, "snapshotted disk");
        Ok(snap)
    }

    async fn do_delete_snapshot(&self, cid: &SnapshotCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        match self
            .docker
            .remove_volume(&cid.0, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(docker_err(
                    format!("deleting snapshot {cid}: removing volume"),
                    Target::None,
                )(e))
            }
        }
        remove_file_if_exists(&self.snapshot_file(cid))
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
        // An exited container means its agent (PID 1) died: the VM is gone.
        Ok(self
            .inspect_container(cid)
            .await?
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false))
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_reboot_vm(cid).await?)
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        // Containers cannot be relabelled: the record keeps the tags, and the
        // next recreation (attach/detach) applies them.
        let _l = self.lock(&cid.0).await;
        self.update_vm(cid, |r| {
            r.metadata
                .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())))
        })?;
        Ok(())
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
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| CpiError::VmNotFound(vm.clone()))?;
        Ok(rec.disks)
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
    use std::collections::BTreeMap;

    fn net(kind: NetworkKind, ip: &str, range: &str, default: &[&str]) -> NetworkSettings {
        NetworkSettings {
            kind,
            ip: ip.into(),
            netmask: "255.255.255.0".into(),
            range: range.into(),
            gateway: Some("10.244.250.1".into()),
            dns: vec!["10.244.250.2".into()],
            default: default.iter().map(|s| s.to_string()).collect(),
            cloud_properties: serde_json::json!({}),
        }
    }

    fn request() -> CreateVmRequest {
        let networks = BTreeMap::from([
            (
                "a-private".to_string(),
                net(NetworkKind::Manual, "10.244.251.10", "10.244.251.0/24", &[]),
            ),
            (
                "z default".to_string(),
                net(
                    NetworkKind::Manual,
                    "10.244.250.10",
                    "10.244.250.0/24",
                    &["dns", "gateway"],
                ),
            ),
            (
                "public".to_string(),
                net(NetworkKind::Vip, "1.2.3.4", "", &[]),
            ),
        ]);
        CreateVmRequest {
            agent_id: "agent-1".into(),
            stemcell: StemcellCid("sha256:abc".into()),
            cloud_properties: serde_json::json!({}),
            networks: networks.clone(),
            disk_cids: Vec::new(),
            settings: AgentSettings {
                agent_id: "agent-1".into(),
                director_public_key: "ssh-ed25519 AAAA director".into(),
                host_private_key: "secret".into(),
                listen_ip: "10.244.250.10".into(),
                listen_port: bosun_cpi::AGENT_PORT,
                networks,
                disks: BTreeMap::new(),
                env: serde_json::json!({}),
            },
            metadata: Metadata::from([
                ("token".to_string(), "t-1".to_string()),
                ("instance".to_string(), "kv/0".to_string()),
            ]),
        }
    }

    #[test]
    fn names_are_sanitized() {
        assert_eq!(
            sanitize_name("bosh-docker/ubuntu jammy", 128),
            "bosh-docker-ubuntu-jammy"
        );
        assert_eq!(sanitize_name("..-x", 128), "x");
        assert_eq!(sanitize_name("", 128), "x");
        assert_eq!(sanitize_name("abcdef", 3), "abc");
        assert_eq!(sanitize_repo("My_Prefix"), "my-prefix");
        assert_eq!(sanitize_repo("--"), "bosun");
        assert_eq!(stemcell_repo("bosun-t12"), "bosun-t12-stemcell");
        let spec = StemcellSpec {
            name: "bosh-docker-debian".into(),
            os: "debian".into(),
            version: "1.2+dev/3".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        };
        assert_eq!(stemcell_tag(&spec), "bosh-docker-debian-1.2-dev-3");
        assert_eq!(network_name("bosun", "z default"), "bosun-z-default");
    }

    #[test]
    fn cids_are_checked_before_use_as_paths() {
        assert!(valid_cid("vm-1234", false));
        assert!(!valid_cid("../etc", false));
        assert!(!valid_cid("a/b", false));
        assert!(!valid_cid("sha256:ab", false));
        assert!(valid_cid("sha256:ab", true));
    }

    #[test]
    fn networks_put_the_default_gateway_first_and_skip_vips() {
        let nets = vm_networks("bosun", &request()).unwrap();
        let names: Vec<&str> = nets.iter().map(|n| n.docker_name.as_str()).collect();
        assert_eq!(names, ["bosun-z-default", "bosun-a-private"]);
        assert_eq!(nets[0].ip.as_deref(), Some("10.244.250.10"));
        assert_eq!(nets[0].subnet.as_deref(), Some("10.244.250.0/24"));
        assert_eq!(nets[0].gateway.as_deref(), Some("10.244.250.1"));

        let mut bad = request();
        bad.networks.get_mut("a-private").unwrap().ip.clear();
        let err = vm_networks("bosun", &bad).unwrap_err().to_string();
        assert!(
            err.contains("a-private") && err.contains("agent-1"),
            "{err}"
        );
    }

    #[test]
    fn metadata_comes_back_from_labels_without_the_cpis_own() {
        let req = request();
        let cid = VmCid("vm-1".into());
        let (body, _) = container_config("bosun", &cid, &req, &req.metadata, &[]).unwrap();
        let mut container = body.labels.unwrap();
        // As Docker lists it: with the labels of its image.
        container.insert("bosun.stemcell.name".into(), "bosun-docker".into());
        assert_eq!(metadata_of_labels(&container, VM_OWN_LABELS), req.metadata);

        let mut volume = labels(
            "bosun",
            &Metadata::from([("token".to_string(), "t".to_string())]),
        );
        volume.insert(LABEL_SIZE_MB.into(), "64".into());
        volume.insert(LABEL_DISK.into(), "disk-1".into());
        volume.insert("com.example.other".into(), "x".into());
        assert_eq!(
            metadata_of_labels(&volume, DISK_OWN_LABELS),
            Metadata::from([("token".to_string(), "t".to_string())])
        );
    }

    #[test]
    fn container_config_from_a_request() {
        let req = request();
        let cid = VmCid("vm-1".into());
        let disks = vec![DiskCid("disk-1".into()), DiskCid("disk-2".into())];
        let (body, extra) = container_config("bosun", &cid, &req, &req.metadata, &disks).unwrap();
        assert_eq!(body.image.as_deref(), Some("sha256:abc"));
        assert_eq!(
            body.cmd.as_deref().unwrap(),
            [AGENT_PATH_IN_VM, "agent", "--settings", SETTINGS_PATH_IN_VM]
        );
        let labels = body.labels.as_ref().unwrap();
        assert_eq!(labels["bosun.token"], "t-1");
        assert_eq!(labels["bosun.instance"], "kv/0");
        assert_eq!(labels["bosun.vm"], "vm-1");
        assert_eq!(labels[LABEL_CPI], "bosun");
        let host = body.host_config.as_ref().unwrap();
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("bosun-z-default"));
        assert_eq!(
            host.binds.as_deref().unwrap(),
            ["disk-1:/var/vcap/store", "disk-2:/var/vcap/store-disk-2"]
        );
        assert_eq!(host.dns.as_deref().unwrap(), ["10.244.250.2"]);
        let endpoints = body
            .networking_config
            .as_ref()
            .and_then(|n| n.endpoints_config.as_ref())
            .unwrap();
        assert_eq!(endpoints.len(), 1);
        let ep = &endpoints["bosun-z-default"];
        assert_eq!(
            ep.ipam_config.as_ref().unwrap().ipv4_address.as_deref(),
            Some("10.244.250.10")
        );
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].docker_name, "bosun-a-private");
        assert_eq!(
            extra[0]
                .endpoint()
                .ipam_config
                .unwrap()
                .ipv4_address
                .as_deref(),
            Some("10.244.251.10")
        );
    }

    #[test]
    fn settings_carry_the_attached_disks() {
        let req = request();
        let s = settings_for(&req, &[DiskCid("disk-1".into())]);
        assert_eq!(s.disks.len(), 1);
        assert_eq!(s.disks["disk-1"]["path"], STORE_PATH);
        assert_eq!(s.agent_id, req.settings.agent_id);
        assert!(settings_for(&req, &[]).disks.is_empty());

        let archive = settings_archive(&s).unwrap();
        let mut ar = tar::Archive::new(archive.as_slice());
        let mut entries = ar.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(
            entry.path().unwrap().to_string_lossy(),
            "var/vcap/bosh/settings.json"
        );
        assert_eq!(entry.header().mode().unwrap(), 0o600);
        assert_eq!(entry.header().uid().unwrap(), 0);
        let mut json = String::new();
        io::Read::read_to_string(&mut entry, &mut json).unwrap();
        let back: AgentSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(entries.next().is_none());
    }

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let rec = VmRecord {
            cid: VmCid("vm-1".into()),
            request: request(),
            metadata: request().metadata,
            disks: vec![DiskCid("disk-1".into())],
        };
        let path = dir.path().join("vm-1.json");
        write_json(&path, &rec).unwrap();
        assert_eq!(read_json::<VmRecord>(&path).unwrap(), Some(rec));
        let disk = DiskRecord {
            cid: DiskCid("disk-1".into()),
            size_mb: 64,
            cloud_properties: serde_json::json!({}),
            metadata: Metadata::from([("token".to_string(), "t".to_string())]),
            attached_to: Some(VmCid("vm-1".into())),
        };
        let path = dir.path().join("disk-1.json");
        write_json(&path, &disk).unwrap();
        assert_eq!(read_json::<DiskRecord>(&path).unwrap(), Some(disk));
        assert_eq!(
            read_json::<DiskRecord>(&dir.path().join("missing.json")).unwrap(),
            None
        );
        // Only the two records: no temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }

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

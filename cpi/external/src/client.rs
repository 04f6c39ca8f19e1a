//! [`ExternalCpi`]: a [`Cpi`] that runs a CPI executable once per call,
//! writes one request to its stdin and reads one response from its stdout,
//! within a time limit, and maps BOSH's answers onto bosun's types and
//! errors. The protocol version is negotiated once (`info`); every
//! created VM and disk is recorded with its metadata under the CPI's root,
//! because the protocol has no listing call: `find_vms` and `find_disks`
//! answer from those records.
//!
//! It must not log request bodies (env carries the agent's keys, the
//! context the CPI's credentials); the CPI's own stderr and `log` go to the
//! task's CPI log.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use bosun_cpi::records::{read_json, remove_file_if_exists, write_json};
use bosun_cpi::{
    metadata_matches, Cpi, CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest,
    DiskCid, DiskHint, Metadata, SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};

use crate::config::ExternalCpiConfig;
use crate::wire::{self, Request, Response, WireError, API_VERSION};

/// How long the CPI's output may stay open after it exited (a daemon it
/// started may hold it); what was written by then is the answer.
const OUTPUT_GRACE: Duration = Duration::from_secs(2);
/// At most this much of the CPI's stderr is kept for the task log.
const STDERR_KEPT: usize = 256 * 1024;

/// BOSH's CPI protocol, one process per call.
pub struct ExternalCpi {
    config: ExternalCpiConfig,
    /// min(bosun's, the CPI's) once `info` was asked.
    api_version: OnceCell<u32>,
}

/// What is kept of each VM and disk the CPI created.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    cid: String,
    metadata: Metadata,
}

/// What a create call makes.
#[derive(Clone, Copy)]
enum Kind {
    Vm,
    Disk,
}

/// Which kind of resource a call's first cid names (for not-found errors).
#[derive(Clone, Copy)]
enum Subject {
    None,
    /// The first argument is a VM cid.
    Vm,
    /// The first argument is a disk cid.
    Disk,
    /// A VM cid, then a disk cid.
    VmAndDisk,
}

impl ExternalCpi {
    pub fn new(config: ExternalCpiConfig) -> ExternalCpi {
        ExternalCpi {
            config,
            api_version: OnceCell::new(),
        }
    }

    pub fn config(&self) -> &ExternalCpiConfig {
        &self.config
    }

    fn fatal(&self, method: &str, request_id: &str, what: impl std::fmt::Display) -> CpiError {
        CpiError::fatal(format!(
            "CPI '{}' {method} (request {request_id}): {what}",
            self.config.name
        ))
    }

    /// The negotiated protocol version (asking `info` the first time).
    async fn version(&self) -> CpiResult<u32> {
        self.api_version
            .get_or_try_init(|| async {
                match self.raw_info().await {
                    Ok(v) => Ok(negotiated(&v)),
                    // A CPI that predates `info` speaks v1.
                    Err(CpiError::NotSupported { .. }) => Ok(1),
                    Err(e) => Err(e),
                }
            })
            .await
            .copied()
    }

    async fn raw_info(&self) -> CpiResult<Value> {
        self.exchange("info", Vec::new(), API_VERSION, Subject::None)
            .await
    }

    /// One call at the negotiated version.
    async fn call(
        &self,
        method: &str,
        arguments: Vec<Value>,
        subject: Subject,
    ) -> CpiResult<Value> {
        let version = self.version().await?;
        self.exchange(method, arguments, version, subject).await
    }

    /// Runs the CPI once: request in, response out, errors mapped.
    async fn exchange(
        &self,
        method: &str,
        arguments: Vec<Value>,
        version: u32,
        subject: Subject,
    ) -> CpiResult<Value> {
        let request_id = format!("cpi-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let context = self.context(&request_id);
        let request = Request {
            method: method.to_string(),
            arguments,
            context,
            api_version: (version >= 2).then_some(version),
        };
        let body = serde_json::to_vec(&request)
            .map_err(|e| self.fatal(method, &request_id, format!("encoding the request: {e}")))?;
        let (stdout, stderr, status) = self.run(method, &request_id, &body).await?;
        if !stderr.trim().is_empty() {
            tracing::debug!(
                target: "bosun_cpi::calls",
                "CPI '{}' {method} (request {request_id}) stderr:\n{}",
                self.config.name,
                stderr.trim_end()
            );
        }
        if stdout.iter().all(u8::is_ascii_whitespace) {
            return Err(self.fatal(
                method,
                &request_id,
                format!(
                    "answered nothing on stdout ({status}){}",
                    stderr_tail(&stderr)
                ),
            ));
        }
        let response: Response = serde_json::from_slice(&stdout).map_err(|e| {
            self.fatal(
                method,
                &request_id,
                format!(
                    "answered with something that is not a CPI response ({e}): {}",
                    excerpt(&stdout)
                ),
            )
        })?;
        if !response.log.trim().is_empty() {
            tracing::debug!(
                target: "bosun_cpi::calls",
                "CPI '{}' {method} (request {request_id}) log:\n{}",
                self.config.name,
                response.log.trim_end()
            );
        }
        match response.error {
            None => Ok(response.result),
            Some(e) => Err(self.map_error(method, &request_id, &request.arguments, subject, e)),
        }
    }

    fn map_error(
        &self,
        method: &str,
        request_id: &str,
        args: &[Value],
        subject: Subject,
        e: WireError,
    ) -> CpiError {
        let cid = |i: usize| args.get(i).and_then(Value::as_str).map(str::to_string);
        let typed = match (e.short_kind(), subject) {
            ("VMNotFound", Subject::Vm | Subject::VmAndDisk) => {
                cid(0).map(|c| CpiError::VmNotFound(VmCid(c)))
            }
            ("DiskNotFound", Subject::Disk) => cid(0).map(|c| CpiError::DiskNotFound(DiskCid(c))),
            ("DiskNotFound", Subject::VmAndDisk) => {
                cid(1).map(|c| CpiError::DiskNotFound(DiskCid(c)))
            }
            ("NotImplemented" | "NotSupported", _) => Some(CpiError::NotSupported {
                cpi: self.config.name.clone(),
                method: method.to_string(),
            }),
            _ => None,
        };
        if let Some(typed) = typed {
            return typed;
        }
        let kind = if e.kind.is_empty() {
            "error"
        } else {
            e.kind.as_str()
        };
        let message = format!(
            "CPI '{}' {method} (request {request_id}): {kind}: {}",
            self.config.name, e.message
        );
        if e.ok_to_retry {
            CpiError::Transient {
                message,
                retry_after: None,
            }
        } else {
            CpiError::Fatal { message }
        }
    }

    /// The request's context: the CPI's properties, then the ids.
    fn context(&self, request_id: &str) -> Value {
        let mut m = wire::fields_of(&self.config.properties);
        m.insert("director_uuid".into(), json!(self.config.director_uuid));
        m.insert("request_id".into(), json!(request_id));
        m.insert(
            "vm".into(),
            json!({"stemcell": {"api_version": self.config.stemcell_api_version}}),
        );
        Value::Object(m)
    }

    /// Spawns the CPI in its own process group, feeds it the request and
    /// collects stdout and stderr; the whole group is killed at the limit.
    async fn run(
        &self,
        method: &str,
        request_id: &str,
        body: &[u8],
    ) -> CpiResult<(Vec<u8>, String, std::process::ExitStatus)> {
        let c = &self.config;
        let mut cmd = tokio::process::Command::new(&c.exec_path);
        cmd.args(&c.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            self.fatal(
                method,
                request_id,
                format!("cannot run {}: {e}", c.exec_path.display()),
            )
        })?;
        let pgid = child.id();
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out_reader = child
            .stdout
            .take()
            .map(|r| tokio::spawn(collect(r, stdout.clone(), usize::MAX)));
        let err_reader = child
            .stderr
            .take()
            .map(|r| tokio::spawn(collect(r, stderr.clone(), STDERR_KEPT)));
        if let Some(mut stdin) = child.stdin.take() {
            let body = body.to_vec();
            // A CPI may answer without reading its request (or die first):
            // its answer, or its silence, says what happened.
            tokio::spawn(async move {
                if stdin.write_all(&body).await.is_ok() {
                    let _closed = stdin.shutdown().await;
                }
            });
        }
        let status = match tokio::time::timeout(c.timeout, child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => {
                return Err(self.fatal(method, request_id, format!("waiting for the CPI: {e}")))
            }
            Err(_) => {
                kill_group(pgid);
                // Reap it; SIGKILL cannot be refused.
                let _reaped = child.wait().await;
                return Err(self.fatal(
                    method,
                    request_id,
                    format!(
                        "no answer within {} s; the CPI was killed{}",
                        c.timeout.as_secs(),
                        stderr_tail(&lossy(&stderr))
                    ),
                ));
            }
        };
        let grace = tokio::time::Instant::now() + OUTPUT_GRACE;
        for reader in [out_reader, err_reader].into_iter().flatten() {
            if tokio::time::timeout_at(grace, reader).await.is_err() {
                tracing::debug!(
                    target: "bosun_cpi::calls",
                    "CPI '{}' {method} (request {request_id}): its output stayed open after it exited ({status})",
                    c.name
                );
            }
        }
        let out = std::mem::take(&mut *stdout.lock().unwrap_or_else(|p| p.into_inner()));
        Ok((out, lossy(&stderr), status))
    }

    fn records_dir(&self, kind: &str) -> PathBuf {
        self.config.root.join(kind)
    }

    fn record_path(&self, kind: &str, cid: &str) -> PathBuf {
        // Hex keeps any cid a plain file name.
        self.records_dir(kind)
            .join(format!("{}.json", hex::encode(cid)))
    }

    fn record_error(&self, e: impl std::fmt::Display) -> CpiError {
        CpiError::fatal(format!(
            "CPI '{}': keeping its records under {}: {e}",
            self.config.name,
            self.config.root.display()
        ))
    }

    /// Records a created VM or disk, or merges metadata into its record.
    fn record(&self, kind: &str, cid: &str, metadata: &Metadata) -> CpiResult<()> {
        let dir = self.records_dir(kind);
        std::fs::create_dir_all(&dir).map_err(|e| self.record_error(e))?;
        let path = self.record_path(kind, cid);
        let mut rec = read_json::<Record>(&path)
            .map_err(|e| self.record_error(e))?
            .unwrap_or(Record {
                cid: cid.to_string(),
                metadata: Metadata::new(),
            });
        rec.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_json(&path, &rec, 0o600).map_err(|e| self.record_error(e))
    }

    fn forget(&self, kind: &str, cid: &str) -> CpiResult<()> {
        remove_file_if_exists(&self.record_path(kind, cid)).map_err(|e| self.record_error(e))
    }

    fn find(&self, kind: &str, filter: &Metadata) -> CpiResult<Vec<(String, Metadata)>> {
        let dir = self.records_dir(kind);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.record_error(e)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| self.record_error(e))?.path();
            if path.extension().is_none_or(|x| x != "json") || is_temporary(&path) {
                continue;
            }
            if let Some(rec) = read_json::<Record>(&path).map_err(|e| self.record_error(e))? {
                if metadata_matches(&rec.metadata, filter) {
                    found.push((rec.cid, rec.metadata));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// Creates a VM or disk, records it, then tags it through the CPI (BOSH's
    /// create calls take no metadata).
    async fn create(&self, kind: Kind, args: Vec<Value>, metadata: &Metadata) -> CpiResult<String> {
        let (method, records, set, subject) = match kind {
            Kind::Vm => ("create_vm", "vms", "set_vm_metadata", Subject::Vm),
            Kind::Disk => ("create_disk", "disks", "set_disk_metadata", Subject::Disk),
        };
        let v = self.call(method, args, Subject::None).await?;
        let cid = as_cid(self, method, &v)?;
        self.record(records, &cid, metadata)?;
        if !metadata.is_empty() {
            self.set_metadata(set, &cid, metadata, subject).await?;
        }
        Ok(cid)
    }

    /// Sets metadata through the CPI; one without the method is not an error
    /// (bosun's records keep the tags), as BOSH's director treats it.
    async fn set_metadata(
        &self,
        method: &str,
        cid: &str,
        metadata: &Metadata,
        subject: Subject,
    ) -> CpiResult<()> {
        let args = vec![json!(cid), json!(metadata)];
        match self.call(method, args, subject).await {
            Ok(_) | Err(CpiError::NotSupported { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// min(bosun's version, the one `info` reports; 1 when it reports none).
fn negotiated(info: &Value) -> u32 {
    info.get("api_version")
        .and_then(Value::as_u64)
        .map_or(1, |v| v.clamp(1, u64::from(API_VERSION)) as u32)
}

fn is_temporary(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

async fn collect(mut r: impl AsyncRead + Unpin, into: Arc<Mutex<Vec<u8>>>, keep: usize) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let mut v = into.lock().unwrap_or_else(|p| p.into_inner());
                let room = keep.saturating_sub(v.len());
                v.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

fn lossy(buf: &Arc<Mutex<Vec<u8>>>) -> String {
    String::from_utf8_lossy(&buf.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill(2) with a negative pid signals that process group.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
}

/// The end of the CPI's stderr, for an error message.
fn stderr_tail(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    if lines.is_empty() {
        return String::new();
    }
    let tail = &lines[lines.len().saturating_sub(5)..];
    format!("; its stderr ends: {}", tail.join(" | "))
}

/// The first bytes of an unreadable answer.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut s: String = text.trim().chars().take(120).collect();
    if text.trim().chars().count() > 120 {
        s.push_str("...");
    }
    format!("{s:?}")
}

fn as_bool(cpi: &ExternalCpi, method: &str, v: Value) -> CpiResult<bool> {
    v.as_bool().ok_or_else(|| {
        CpiError::fatal(format!(
            "CPI '{}' {method}: expected true or false, got {v}",
            cpi.config.name
        ))
    })
}

fn as_cid(cpi: &ExternalCpi, method: &str, v: &Value) -> CpiResult<String> {
    // v2 create_vm answers [cid, networks].
    let v = match v {
        Value::Array(a) => a.first().unwrap_or(&Value::Null),
        other => other,
    };
    match v.as_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(CpiError::fatal(format!(
            "CPI '{}' {method}: expected a cid, got {v}",
            cpi.config.name
        ))),
    }
}

#[async_trait]
impl Cpi for ExternalCpi {
    async fn info(&self) -> CpiResult<CpiInfo> {
        let v = self.raw_info().await?;
        let formats = bosun_cpi::agent_env::string_list(
            v.get("stemcell_formats").unwrap_or(&Value::Null),
            "stemcell_formats",
        )
        .map_err(|e| CpiError::fatal(format!("CPI '{}' info: {e}", self.config.name)))?;
        let api_version = *self
            .api_version
            .get_or_init(|| async { negotiated(&v) })
            .await;
        Ok(CpiInfo {
            name: self.config.name.clone(),
            api_version,
            stemcell_formats: formats,
        })
    }

    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid> {
        let image = spec
            .image_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        let args = vec![json!(image), wire::stemcell_properties_to_wire(spec)];
        let v = self.call("create_stemcell", args, Subject::None).await?;
        as_cid(self, "create_stemcell", &v).map(StemcellCid)
    }

    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        self.call(
            "delete_stemcell",
            vec![wire::stemcell_cid(cid)],
            Subject::None,
        )
        .await
        .map(drop)
    }

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        let args = vec![
            json!(req.agent_id),
            wire::stemcell_cid(&req.stemcell),
            wire::object_or_empty(&req.cloud_properties),
            wire::networks_to_bosh(&req.networks),
            json!(req
                .disk_cids
                .iter()
                .map(|d| d.0.clone())
                .collect::<Vec<_>>()),
            wire::env_to_bosh(&req.settings, &req.metadata),
        ];
        self.create(Kind::Vm, args, &req.metadata).await.map(VmCid)
    }

    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        match self
            .call("delete_vm", vec![wire::vm_cid(cid)], Subject::Vm)
            .await
        {
            Ok(_) | Err(CpiError::VmNotFound(_)) => self.forget("vms", &cid.0),
            Err(e) => Err(e),
        }
    }

    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        match self
            .call("has_vm", vec![wire::vm_cid(cid)], Subject::Vm)
            .await
        {
            Ok(v) => as_bool(self, "has_vm", v),
            Err(CpiError::VmNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        self.call("reboot_vm", vec![wire::vm_cid(cid)], Subject::Vm)
            .await
            .map(drop)
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        self.set_metadata("set_vm_metadata", &cid.0, metadata, Subject::Vm)
            .await?;
        self.record("vms", &cid.0, metadata)
    }

    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
        Ok(self
            .find("vms", filter)?
            .into_iter()
            .map(|(c, m)| (VmCid(c), m))
            .collect())
    }

    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
        let args = vec![
            json!(req.size_mb),
            wire::object_or_empty(&req.cloud_properties),
            req.vm_locality.as_ref().map_or(Value::Null, wire::vm_cid),
        ];
        self.create(Kind::Disk, args, &req.metadata)
            .await
            .map(DiskCid)
    }

    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        match self
            .call("delete_disk", vec![wire::disk_cid(cid)], Subject::Disk)
            .await
        {
            Ok(_) | Err(CpiError::DiskNotFound(_)) => self.forget("disks", &cid.0),
            Err(e) => Err(e),
        }
    }

    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        let args = vec![wire::vm_cid(vm), wire::disk_cid(disk)];
        let v = self.call("attach_disk", args, Subject::VmAndDisk).await?;
        wire::disk_hint_from_bosh(&v)
            .map_err(|e| CpiError::fatal(format!("CPI '{}' attach_disk: {e}", self.config.name)))
    }

    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        let args = vec![wire::vm_cid(vm), wire::disk_cid(disk)];
        self.call("detach_disk", args, Subject::VmAndDisk)
            .await
            .map(drop)
    }

    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        match self
            .call("has_disk", vec![wire::disk_cid(cid)], Subject::Disk)
            .await
        {
            Ok(v) => as_bool(self, "has_disk", v),
            Err(CpiError::DiskNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        let v = self
            .call("get_disks", vec![wire::vm_cid(vm)], Subject::Vm)
            .await?;
        let cids = wire::cids_from_wire(&v)
            .map_err(|e| CpiError::fatal(format!("CPI '{}' get_disks: {e}", self.config.name)))?;
        Ok(cids.into_iter().map(DiskCid).collect())
    }

    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        let args = vec![wire::disk_cid(cid), json!(new_size_mb)];
        self.call("resize_disk", args, Subject::Disk)
            .await
            .map(drop)
    }

    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        self.set_metadata("set_disk_metadata", &cid.0, metadata, Subject::Disk)
            .await?;
        self.record("disks", &cid.0, metadata)
    }

    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
        Ok(self
            .find("disks", filter)?
            .into_iter()
            .map(|(c, m)| (DiskCid(c), m))
            .collect())
    }

    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid> {
        let args = vec![wire::disk_cid(cid), json!(metadata)];
        let v = self.call("snapshot_disk", args, Subject::Disk).await?;
        as_cid(self, "snapshot_disk", &v).map(SnapshotCid)
    }

    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
        self.call("delete_snapshot", vec![json!(cid.0)], Subject::None)
            .await
            .map(drop)
    }

    fn listing_caveat(&self) -> Option<String> {
        Some(
            "orphans are found only among the VMs and disks bosun recorded: BOSH's CPI \
             protocol has no listing call, so one whose create call's answer was lost \
             cannot be listed; look for it in the cloud itself"
                .to_string(),
        )
    }

    async fn calculate_vm_cloud_properties(&self, vm_resources: &Value) -> CpiResult<Value> {
        self.call(
            "calculate_vm_cloud_properties",
            vec![vm_resources.clone()],
            Subject::None,
        )
        .await
    }

    async fn update_disk(
        &self,
        cid: &DiskCid,
        new_size_mb: u64,
        cloud_properties: &Value,
    ) -> CpiResult<()> {
        let args = vec![
            wire::disk_cid(cid),
            json!(new_size_mb),
            cloud_properties.clone(),
        ];
        self.call("update_disk", args, Subject::Disk)
            .await
            .map(drop)
    }
}

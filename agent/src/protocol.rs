//! The director ↔ agent protocol: JSON-RPC actions carried over SSH.
//!
//! Transport (see `server` and `client`):
//! - RPC: a session channel requests the subsystem [`RPC_SUBSYSTEM`]; the
//!   client writes one [`RpcRequest`] as a JSON line, the agent answers one
//!   [`RpcResponse`] JSON line and closes the channel. One channel per call,
//!   so calls may run concurrently.
//! - Blobs: a session channel `exec`s `put-blob <sha256>` (client streams the
//!   bytes, then EOF; the agent verifies the sha256 before keeping it) or
//!   `get-blob <sha256>` (the agent streams the bytes). Exit status 0 on
//!   success; on failure a message on stderr and exit status 1.
//!
//! Every type here is plain data; changing it means bumping
//! [`PROTOCOL_VERSION`].

use std::collections::BTreeMap;

use bosun_cpi::{DiskHint, NetworkSettings};
use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change to the types in this module.
pub const PROTOCOL_VERSION: u32 = 1;
/// SSH subsystem name of the RPC channel.
pub const RPC_SUBSYSTEM: &str = "bosun-agent-v1";

/// One RPC call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RpcRequest {
    pub id: u64,
    pub protocol_version: u32,
    #[serde(flatten)]
    pub action: Action,
}

/// One RPC answer: exactly one of `result` / `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RpcResponse {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ActionFailure>,
}

/// Why an action failed, as the agent reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionFailure {
    /// Machine-readable kind: `stale_generation`, `missing_blob`,
    /// `compile_failed`, `script_failed`, `invalid`, `io`, `unsupported_version`.
    pub kind: String,
    /// Human message naming the operation and the object.
    pub message: String,
    /// The last lines of output of the script that failed, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
}

/// The actions. Serialized as `{"method": "apply", "params": {...}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", content = "params", rename_all = "snake_case")]
pub enum Action {
    /// -> `PingResult`
    Ping,
    /// -> [`AgentState`]
    GetState,
    /// Lay down the whole desired spec of this VM. Rejects a generation lower
    /// than the one applied; re-applying the same spec is a no-op. Does not
    /// start or stop processes. -> `null`
    Apply(ApplySpec),
    /// Run each job's `bin/pre-start` (if any), then start and supervise every
    /// process of the applied jobs. -> `null`
    Start,
    /// Stop every process (SIGTERM, then SIGKILL after its shutdown timeout). -> `null`
    Stop,
    /// Stop and start again every process of the named jobs (without
    /// pre-start), resetting their restart backoff; the health monitor's
    /// second step when a job stays failing. -> `null`
    RestartJobs(RestartJobsParams),
    /// Run each job's `bin/drain` and wait as it asks. -> [`DrainResult`]
    Drain(DrainParams),
    /// Run `bin/<script>` of every applied job that has it (e.g. `post-start`,
    /// `post-deploy`, `pre-stop`, `post-stop`). -> [`ScriptResults`]
    RunScript(RunScriptParams),
    /// Compile one package on this (compilation) VM. -> [`CompileResult`]
    CompilePackage(CompileRequest),
    /// Pack job logs into a blob. -> [`FetchLogsResult`]
    FetchLogs(FetchLogsParams),
    /// Mount an attached persistent disk at `/var/vcap/store`. -> `null`
    MountDisk(MountDiskParams),
    /// Unmount a persistent disk. -> `null`
    UnmountDisk(UnmountDiskParams),
    /// Which of these blobs the agent does not have. -> `Vec<String>`
    MissingBlobs(MissingBlobsParams),
    /// Copy a blob the agent has to a file on the VM (`bosun scp` upload),
    /// atomically, creating its directory. -> `null`
    InstallFile(InstallFileParams),
    /// Pack the mounted persistent disk (`/var/vcap/store`) into a blob,
    /// owners, modes and times kept, for a disk migration. Jobs must be
    /// stopped. -> [`FetchLogsResult`] (the blob)
    PackDisk,
    /// Unpack a blob made by `pack_disk` into the mounted persistent disk,
    /// which must be empty. -> `null`
    UnpackDisk(UnpackDiskParams),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingResult {
    pub agent_id: String,
    pub protocol_version: u32,
}

/// The whole desired spec of one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplySpec {
    /// Monotonic per VM; the agent rejects lower generations.
    pub generation: u64,
    pub deployment: String,
    pub instance_group: String,
    pub id: String,
    pub index: u32,
    pub az: String,
    pub bootstrap: bool,
    /// The instance's address (default network IP).
    pub address: String,
    #[serde(default)]
    pub networks: BTreeMap<String, NetworkSettings>,
    /// Compiled packages to install at `/var/vcap/packages/<name>`.
    pub packages: Vec<PackageRef>,
    /// Jobs with their rendered templates, laid down at `/var/vcap/jobs/<name>`.
    pub jobs: Vec<RenderedJob>,
}

/// A compiled package (or, for compilation inputs, a compiled dependency).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackageRef {
    pub name: String,
    pub fingerprint: String,
    /// sha256 of the package's tgz blob (its install target's contents).
    pub sha256: String,
}

/// One job with every template rendered by the director.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedJob {
    pub name: String,
    /// Digest of the job's fingerprint and rendered files.
    pub digest: String,
    pub files: Vec<RenderedFile>,
}

/// One rendered template, `path` relative to the job directory
/// (`bin/ctl`, `config/bpm.yml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenderedFile {
    pub path: String,
    pub content: String,
    /// Files under `bin/` are executable.
    pub executable: bool,
}

/// Per-process and per-job state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProcessState {
    Running,
    Failing,
    Stopped,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub name: String,
    pub state: ProcessState,
    pub pid: Option<u32>,
    pub uptime_secs: Option<u64>,
    pub restarts: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub name: String,
    pub state: ProcessState,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Vitals {
    /// 1, 5, 15 minute load averages.
    pub load: [f64; 3],
    pub mem_total_kb: u64,
    pub mem_used_kb: u64,
    /// Percent used of `/var/vcap/data` and `/var/vcap/store` (if mounted).
    pub ephemeral_disk_percent: Option<u8>,
    pub persistent_disk_percent: Option<u8>,
}

/// What `get_state` returns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub agent_id: String,
    pub protocol_version: u32,
    /// Generation of the applied spec (0 = none).
    pub generation: u64,
    /// The applied spec, if any (so the director can tell what is on the VM).
    pub spec: Option<ApplySpec>,
    /// Aggregate: running if every process of every job runs; failing if any
    /// is failing; stopped otherwise (or when nothing is applied).
    pub job_state: ProcessState,
    pub jobs: Vec<JobStatus>,
    /// Disk cid mounted at `/var/vcap/store`, if any.
    pub persistent_disk: Option<String>,
    pub vitals: Vitals,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainKind {
    /// The instance is being updated (job will come back).
    Update,
    /// The instance is going away.
    Shutdown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainParams {
    pub kind: DrainKind,
    /// Upper bound for the whole drain, seconds.
    pub timeout_secs: u64,
    /// On an update: the jobs whose spec changes (their drain gets
    /// `job_changed`, the others `job_unchanged`, as in BOSH).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_jobs: Vec<String>,
    /// `BOSH_JOB_STATE` and `BOSH_JOB_NEXT_STATE` for the drain scripts:
    /// JSON such as `{"persistent_disk":1024}` (`{}` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_job_state: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainResult {
    /// Seconds spent draining.
    pub waited_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestartJobsParams {
    /// Job names; every applied job when empty.
    pub jobs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunScriptParams {
    /// Script name under each job's `bin/`.
    pub script: String,
    pub timeout_secs: u64,
    /// Only these jobs (an errand job colocated with others); all when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<String>>,
    /// Write each job's output as it comes to
    /// `/var/vcap/data/tmp/<output_prefix>-<job>.out` (removed when the
    /// script ends), so the director can stream it (`run-errand`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_prefix: Option<String>,
    /// Extra environment for the scripts; only `BOSH_*` names are taken
    /// (`pre-stop` gets `BOSH_VM_NEXT_STATE` and the like).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptResult {
    pub job: String,
    pub exit_code: i32,
    pub output_tail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScriptResults {
    /// Only jobs that have the script.
    pub results: Vec<ScriptResult>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileRequest {
    pub name: String,
    pub fingerprint: String,
    /// Blob (tgz) of the package source: `packaging` at its top plus the
    /// files its spec selects, at their paths relative to `src/`/`blobs/`.
    pub source_sha256: String,
    /// Compiled dependencies (direct and transitive), installed at
    /// `/var/vcap/packages/<name>` before `packaging` runs.
    pub dependencies: Vec<PackageRef>,
    pub timeout_secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompileResult {
    /// Blob (tgz) of the install target; fetch it with `get-blob`.
    pub sha256: String,
    pub size: u64,
    pub output_tail: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchLogsParams {
    /// Jobs whose logs to include; empty = all.
    #[serde(default)]
    pub jobs: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchLogsResult {
    /// Blob (tgz) of `/var/vcap/sys/log/<job>/...`; fetch it with `get-blob`.
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountDiskParams {
    pub cid: String,
    pub hint: DiskHint,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallFileParams {
    pub sha256: String,
    /// Absolute path on the VM.
    pub path: String,
    pub mode: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackDiskParams {
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmountDiskParams {
    pub cid: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MissingBlobsParams {
    pub sha256s: Vec<String>,
}

/// A job's process file, rendered from its `bpm.yml` template to
/// `/var/vcap/jobs/<job>/config/bpm.yml` (BOSH bpm's shape, trimmed).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpmConfig {
    pub processes: Vec<BpmProcess>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpmProcess {
    pub name: String,
    pub executable: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/var/vcap/jobs/<job>`).
    #[serde(default)]
    pub workdir: Option<String>,
    /// Seconds between SIGTERM and SIGKILL (default 10).
    #[serde(default)]
    pub shutdown_timeout: Option<u64>,
    /// Optional health probe; without one a process that stays up counts as running.
    #[serde(default)]
    pub health: Option<HealthProbe>,
}

/// A probe the agent runs against a running process.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthProbe {
    /// `host:port` that must accept a TCP connection.
    #[serde(default)]
    pub tcp: Option<String>,
    /// `http://host:port/path` that must answer 2xx to a GET.
    #[serde(default)]
    pub http: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_wire_shape_is_method_and_params() {
        let req = RpcRequest {
            id: 7,
            protocol_version: PROTOCOL_VERSION,
            action: Action::Drain(DrainParams {
                kind: DrainKind::Update,
                timeout_secs: 30,
                changed_jobs: vec![],
                job_state: None,
                next_job_state: None,
            }),
        };
        let v = serde_json::to_value(&req).unwrap();
        assert_eq!(v["method"], "drain");
        assert_eq!(v["params"]["kind"], "update");
        let back: RpcRequest = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
        let ping: RpcRequest =
            serde_json::from_str(r#"{"id":1,"protocol_version":1,"method":"ping"}"#).unwrap();
        assert_eq!(ping.action, Action::Ping);
    }
}

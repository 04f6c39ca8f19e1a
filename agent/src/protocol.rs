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
    /// `/var/vcap/data/tmp/<output_prefix>-<job>.out`, so the director can
    /// stream it (`run-errand`). The files are left when the script ends:
    /// the director reads each to its end (its `output_bytes`) and removes
    /// them.
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
    /// How many bytes of output the script wrote in all.
    #[serde(default)]
    pub output_bytes: u64,
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
/// `/var/vcap/jobs/<job>/config/bpm.yml` (BOSH bpm's schema, plus bosun's
/// `shutdown_timeout` and `health`). Keys it does not know are kept in
/// `unknown` (the agent warns about them) rather than refused, as bpm does.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmConfig {
    #[serde(default)]
    pub processes: Vec<BpmProcess>,
    /// Keys bosun does not know; ignored.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

impl BpmConfig {
    /// Dotted paths of every key the agent ignored (`processes[0].bogus`).
    pub fn unknown_keys(&self) -> Vec<String> {
        let mut out: Vec<String> = self.unknown.keys().cloned().collect();
        for (i, p) in self.processes.iter().enumerate() {
            let at = format!("processes[{i}]");
            out.extend(p.unknown.keys().map(|k| format!("{at}.{k}")));
            if let Some(h) = &p.hooks {
                out.extend(h.unknown.keys().map(|k| format!("{at}.hooks.{k}")));
            }
            if let Some(l) = &p.limits {
                out.extend(l.unknown.keys().map(|k| format!("{at}.limits.{k}")));
            }
            for (j, v) in p.additional_volumes.iter().enumerate() {
                out.extend(
                    v.unknown
                        .keys()
                        .map(|k| format!("{at}.additional_volumes[{j}].{k}")),
                );
            }
            if let Some(u) = &p.unsafe_ {
                out.extend(u.unknown.keys().map(|k| format!("{at}.unsafe.{k}")));
                for (j, v) in u.unrestricted_volumes.iter().enumerate() {
                    out.extend(
                        v.unknown
                            .keys()
                            .map(|k| format!("{at}.unsafe.unrestricted_volumes[{j}].{k}")),
                    );
                }
            }
        }
        out
    }
}

/// One process of a `bpm.yml`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmProcess {
    pub name: String,
    pub executable: String,
    /// Arguments; YAML numbers and booleans are taken as their text.
    #[serde(default, deserialize_with = "de::strings")]
    pub args: Vec<String>,
    /// Environment; YAML numbers and booleans are taken as their text.
    #[serde(default, deserialize_with = "de::string_map")]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/var/vcap/jobs/<job>`).
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub hooks: Option<BpmHooks>,
    #[serde(default)]
    pub limits: Option<BpmLimits>,
    /// Signal that asks the process to stop (default `TERM`).
    #[serde(default)]
    pub shutdown_signal: Option<ShutdownSignal>,
    /// bpm gives the process `/var/vcap/data/<job>`; the agent creates it.
    #[serde(default)]
    pub ephemeral_disk: Option<bool>,
    /// bpm gives the process `/var/vcap/store/<job>`; the agent creates it
    /// when a persistent disk is mounted.
    #[serde(default)]
    pub persistent_disk: Option<bool>,
    /// Accepted, not enforced (the agent runs no container).
    #[serde(default)]
    pub additional_volumes: Vec<BpmVolume>,
    /// Accepted, not enforced.
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Accepted, not enforced.
    #[serde(default, rename = "unsafe")]
    pub unsafe_: Option<BpmUnsafe>,
    /// Seconds between the shutdown signal and SIGKILL (default 10).
    #[serde(default)]
    pub shutdown_timeout: Option<u64>,
    /// Optional health probe; without one a process that stays up counts as running.
    #[serde(default)]
    pub health: Option<HealthProbe>,
    /// Keys bosun does not know; ignored.
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `hooks` of a bpm process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmHooks {
    /// Executable run (with the process's environment and working directory)
    /// before each start of the process; a failure fails the start.
    #[serde(default)]
    pub pre_start: Option<String>,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `limits` of a bpm process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmLimits {
    /// Memory limit such as `1G` or `512M` (powers of 1024), through a cgroup.
    #[serde(default, deserialize_with = "de::opt_string")]
    pub memory: Option<String>,
    /// RLIMIT_NOFILE (soft and hard).
    #[serde(default)]
    pub open_files: Option<u64>,
    /// RLIMIT_NPROC (soft and hard).
    #[serde(default)]
    pub processes: Option<u64>,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// The signal a bpm process is stopped with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownSignal {
    #[default]
    #[serde(rename = "TERM")]
    Term,
    #[serde(rename = "INT")]
    Int,
}

/// One entry of `additional_volumes` (or `unsafe.unrestricted_volumes`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmVolume {
    pub path: String,
    #[serde(default)]
    pub writable: bool,
    #[serde(default)]
    pub allow_executions: bool,
    #[serde(default)]
    pub mount_only: bool,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// `unsafe` of a bpm process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BpmUnsafe {
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub unrestricted_volumes: Vec<BpmVolume>,
    #[serde(default)]
    pub host_pid_namespace: bool,
    #[serde(flatten, default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown: BTreeMap<String, serde_json::Value>,
}

/// Lenient scalar decoding for `bpm.yml` (bpm's YAML reader turns any
/// scalar into a string where a string is expected).
mod de {
    use std::collections::BTreeMap;
    use std::fmt;

    use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde::Deserialize;

    /// A string, number or boolean, as text.
    struct Scalar(String);

    impl<'de> Deserialize<'de> for Scalar {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl Visitor<'_> for V {
                type Value = Scalar;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string, number or boolean")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Scalar, E> {
                    Ok(Scalar(v))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Scalar, E> {
                    Ok(Scalar(String::new()))
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                    Ok(Scalar(v.to_string()))
                }
            }
            d.deserialize_any(V)
        }
    }

    pub(super) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of strings")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Vec<String>, E> {
                Ok(Vec::new())
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
                let mut out = Vec::new();
                while let Some(Scalar(s)) = seq.next_element()? {
                    out.push(s);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }

    pub(super) fn string_map<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, String>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BTreeMap<String, String>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of names to strings")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(BTreeMap::new())
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((Scalar(k), Scalar(v))) = map.next_entry()? {
                    out.insert(k, v);
                }
                Ok(out)
            }
        }
        d.deserialize_any(V)
    }

    pub(super) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(Option::<Scalar>::deserialize(d)?.map(|Scalar(s)| s))
    }
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
    fn bpm_yml_whole_schema() {
        let text = r#"
processes:
- name: server
  executable: /var/vcap/packages/zk/bin/server
  args: [--port, 2181, true]
  env:
    PORT: 2181
    DEBUG: false
    NAME: zk
  workdir: /var/vcap/data/zk
  hooks:
    pre_start: /var/vcap/jobs/zk/bin/bpm-pre-start
  limits:
    memory: 1G
    open_files: 2048
    processes: 100
  shutdown_signal: INT
  ephemeral_disk: true
  persistent_disk: true
  additional_volumes:
  - path: /var/vcap/data/shared
    writable: true
    allow_executions: true
    mount_only: false
  capabilities: [NET_BIND_SERVICE]
  unsafe:
    privileged: true
    unrestricted_volumes:
    - path: /dev/log
    host_pid_namespace: true
  shutdown_timeout: 20
  newer_key: 1
top_level_extra: x
"#;
        let cfg: BpmConfig = serde_yaml_ng::from_str(text).unwrap();
        let p = &cfg.processes[0];
        assert_eq!(p.args, vec!["--port", "2181", "true"]);
        assert_eq!(p.env["PORT"], "2181");
        assert_eq!(p.env["DEBUG"], "false");
        assert_eq!(p.workdir.as_deref(), Some("/var/vcap/data/zk"));
        assert_eq!(
            p.hooks.as_ref().unwrap().pre_start.as_deref(),
            Some("/var/vcap/jobs/zk/bin/bpm-pre-start")
        );
        let l = p.limits.as_ref().unwrap();
        assert_eq!(l.memory.as_deref(), Some("1G"));
        assert_eq!((l.open_files, l.processes), (Some(2048), Some(100)));
        assert_eq!(p.shutdown_signal, Some(ShutdownSignal::Int));
        assert_eq!(
            (p.ephemeral_disk, p.persistent_disk),
            (Some(true), Some(true))
        );
        assert!(p.additional_volumes[0].writable && p.additional_volumes[0].allow_executions);
        assert_eq!(p.capabilities, vec!["NET_BIND_SERVICE"]);
        let u = p.unsafe_.as_ref().unwrap();
        assert!(u.privileged && u.host_pid_namespace);
        assert_eq!(u.unrestricted_volumes[0].path, "/dev/log");
        assert_eq!(p.shutdown_timeout, Some(20));
        assert_eq!(
            cfg.unknown_keys(),
            vec![
                "top_level_extra".to_string(),
                "processes[0].newer_key".to_string()
            ]
        );

        let minimal: BpmConfig =
            serde_yaml_ng::from_str("processes:\n- name: a\n  executable: /bin/true\n").unwrap();
        assert!(minimal.unknown_keys().is_empty());
        assert_eq!(minimal.processes[0].shutdown_signal, None);

        for bad in [
            "processes: 5\n",
            "processes: [{name: a}]\n",
            "processes: [{name: a, executable: x, shutdown_signal: KILL}]\n",
            "processes: [{name: a, executable: x, args: [[1]]}]\n",
            "processes: [{name: a, executable: x, limits: {open_files: many}}]\n",
        ] {
            assert!(serde_yaml_ng::from_str::<BpmConfig>(bad).is_err(), "{bad}");
        }
    }

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

//! The agent's action handler: what each director action does on the VM.
//!
//! It owns the BOSH layout under its root (`/var/vcap` on a VM):
//! `packages/<name>` (symlinks into `data/packages/<name>/<sha256>`),
//! `jobs/<name>/` (rendered files), `data/` (blobs, compilation, scratch),
//! `store/` (persistent disk mount point), `sys/log/<job>/`, `sys/run/`, and
//! `bosh/` (its own records: the applied spec, the mounted disk, whether jobs
//! were started). It lays files down, runs lifecycle and packaging scripts,
//! and tells the [`Supervisor`] which processes to run.
//!
//! Beside the handler (this file):
//! - `layout`: checking a spec and laying packages and jobs down on disk.
//! - `scripts`: running job and packaging scripts and keeping their output.
//! - `system`: mounts, vitals and tgz archives.
//!
//! It must not call the CPI or the director, must not speak the wire protocol
//! (that is `server`), must keep only what the applied spec names, and must
//! never log rendered files, environments or settings (they carry secrets).

mod layout;
mod scripts;
mod system;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bosun_cpi::{AgentSettings, DiskHint};
use serde::{Deserialize, Serialize};

use crate::blobs::BlobStore;
use crate::monit;
use crate::protocol::{
    Action, ActionFailure, AgentState, ApplySpec, BpmConfig, CompileRequest, CompileResult,
    DrainParams, DrainResult, FetchLogsParams, FetchLogsResult, InstallFileParams, JobStatus,
    MountDiskParams, PingResult, ProcessState, RenderedJob, RestartJobsParams, RunScriptParams,
    ScriptResult, ScriptResults, UnmountDiskParams, UnpackDiskParams, Vitals, PROTOCOL_VERSION,
};
use crate::server::{self, ActionHandler};
use crate::settings_source::SettingsSource;
use crate::supervisor::{self, JobProcess, Supervisor};
use layout::{
    blob_from_tmp, install_package, lay_down, remove_any, remove_leftover, valid_name,
    validate_spec, write_atomic,
};
use scripts::{
    drain_job, run_command, tail_lines, ScriptCtx, ScriptRun, COMPILE_TAIL_LINES,
    ERRAND_TAIL_LINES, SCRIPT_TAIL_LINES,
};
use system::{
    cpath, disk_hint_path, disk_percent, is_mount_point, mount_block_device, read_loadavg,
    read_meminfo, sys_mount, unpack_tgz, write_tgz,
};

/// Why the agent could not start or run (action failures are
/// [`ActionFailure`]s instead).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading agent settings {path}: {message}")]
    Settings { path: PathBuf, message: String },
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("loading applied spec {path}: {message}")]
    Spec { path: PathBuf, message: String },
    #[error("opening blob store {path}: {message}")]
    Blobs { path: PathBuf, message: String },
    #[error("agent server failed")]
    Server(#[source] server::ServerError),
}

fn agent_io(op: impl Into<String>) -> impl FnOnce(io::Error) -> AgentError {
    let op = op.into();
    move |source| AgentError::Io { op, source }
}

/// The persisted record of the mounted persistent disk (`bosh/disk.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct DiskRecord {
    cid: String,
    path: String,
}

/// The persistent disk mount point on a VM.
const VCAP_STORE: &str = "/var/vcap/store";

/// The action handler. Mutating actions are serialized; `ping` and
/// `get_state` answer while one runs.
pub struct Agent {
    settings: AgentSettings,
    /// Where the settings came from: read again for a disk whose mount
    /// request has no hint (a v1 CPI's attach_disk gives none; it rewrites
    /// the agent env instead).
    settings_source: Option<SettingsSource>,
    root: PathBuf,
    blobs: Arc<BlobStore>,
    supervisor: Supervisor,
    ops: tokio::sync::Mutex<()>,
    spec: Mutex<Option<ApplySpec>>,
    /// Job name -> digest it was last started with.
    started: Mutex<BTreeMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn failure(kind: &str, message: impl Into<String>) -> ActionFailure {
    ActionFailure {
        kind: kind.to_string(),
        message: message.into(),
        output_tail: None,
    }
}

fn io_fail(op: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ActionFailure {
    let op = op.to_string();
    move |e| failure("io", format!("{op}: {e}"))
}

fn short(sha: &str) -> String {
    let end = sha.char_indices().nth(8).map_or(sha.len(), |(i, _)| i);
    format!("{}..", &sha[..end])
}

fn rand_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Runs blocking file work off the async runtime.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, ActionFailure> + Send + 'static,
) -> Result<T, ActionFailure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(failure("io", format!("{what}: internal task failed: {e}"))),
    }
}

fn to_json<T: Serialize>(v: &T) -> Result<serde_json::Value, ActionFailure> {
    serde_json::to_value(v).map_err(|e| failure("io", format!("encoding result: {e}")))
}

/// How a packaging run ended: the tail of its output when it succeeded, a
/// `compile_failed` failure (with that tail) when it failed or timed out.
fn packaging_outcome(
    name: &str,
    timeout_secs: u64,
    run: &ScriptRun,
) -> Result<String, ActionFailure> {
    let tail = tail_lines(&run.output, COMPILE_TAIL_LINES);
    if run.timed_out {
        return Err(ActionFailure {
            kind: "compile_failed".into(),
            message: format!("compiling package {name} timed out after {timeout_secs}s"),
            output_tail: Some(tail),
        });
    }
    if run.exit_code != 0 {
        return Err(ActionFailure {
            kind: "compile_failed".into(),
            message: format!("compiling package {name} failed (exit {})", run.exit_code),
            output_tail: Some(tail),
        });
    }
    Ok(tail)
}

/// Reads a file that may be absent.
fn read_optional(path: &Path, op: &str) -> Result<Option<String>, ActionFailure> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(failure(
            "io",
            format!("{op}: reading {}: {e}", path.display()),
        )),
    }
}

/// The processes of the job laid down at `dir`: its `monit` file decides
/// when it has one (an empty one runs nothing; bpm-form checks select their
/// process from `config/bpm.yml`); without one, `config/bpm.yml` does.
fn job_processes(job: &str, dir: &Path) -> Result<Vec<JobProcess>, ActionFailure> {
    let op = format!("starting job {job}");
    let monit_path = dir.join("monit");
    let monit =
        match read_optional(&monit_path, &op)? {
            Some(text) => Some(monit::parse(&monit_path, &text).map_err(|e| {
                failure("invalid", format!("{op}: {}", bosun_cpi::chain::chain(&e)))
            })?),
            None => None,
        };
    let bpm = if monit.as_ref().is_none_or(monit::uses_bpm) {
        read_bpm(job, dir, &op)?
    } else {
        None
    };
    match &monit {
        Some(m) => monit::job_processes(&monit_path, job, m, bpm.as_ref())
            .map_err(|e| failure("invalid", format!("{op}: {}", bosun_cpi::chain::chain(&e)))),
        None => Ok(bpm.as_ref().map(JobProcess::from_bpm).unwrap_or_default()),
    }
}

/// Orders jobs so that a job whose processes depend on another job's
/// processes (monit's `depends on` names are VM-wide) starts after it;
/// otherwise, and within a cycle, the spec's order stays.
fn order_jobs(
    mut left: Vec<(RenderedJob, PathBuf, Vec<JobProcess>)>,
) -> Vec<(RenderedJob, PathBuf, Vec<JobProcess>)> {
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let waits_for_another = |i: usize| {
            let (job, _, procs) = &left[i];
            procs
                .iter()
                .flat_map(|p| p.depends_on.iter())
                .filter(|d| !procs.iter().any(|q| &q.name == *d))
                .any(|d| {
                    left.iter().any(|(other, _, theirs)| {
                        other.name != job.name && theirs.iter().any(|q| &q.name == d)
                    })
                })
        };
        let next = (0..left.len())
            .find(|&i| !waits_for_another(i))
            .unwrap_or(0);
        out.push(left.remove(next));
    }
    out
}

/// The job's `config/bpm.yml`, if it has one; unknown keys are logged.
fn read_bpm(job: &str, dir: &Path, op: &str) -> Result<Option<BpmConfig>, ActionFailure> {
    let path = dir.join("config/bpm.yml");
    let Some(text) = read_optional(&path, op)? else {
        return Ok(None);
    };
    let cfg = serde_yaml_ng::from_str::<BpmConfig>(&text)
        .map_err(|e| failure("invalid", format!("{op}: parsing {}: {e}", path.display())))?;
    for key in cfg.unknown_keys() {
        tracing::warn!(job, file = %path.display(), key = %key, "unknown bpm.yml key ignored");
    }
    Ok(Some(cfg))
}

impl Agent {
    /// `root` is the VM's /var/vcap (a temp dir in tests). Creates the layout
    /// and loads the last applied spec from `bosh/spec.json`, if any.
    pub fn new(
        settings: AgentSettings,
        root: PathBuf,
        blobs: Arc<BlobStore>,
    ) -> Result<Agent, AgentError> {
        for d in [
            "packages",
            "jobs",
            "data",
            "data/blobs",
            "data/packages",
            "data/compile",
            "store",
            "sys/log",
            "sys/run",
            "bosh",
        ] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(agent_io(format!("creating {}", p.display())))?;
        }
        let tmp = root.join("data/tmp");
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(agent_io(format!("cleaning {}", tmp.display())))?;
        }
        fs::create_dir_all(&tmp).map_err(agent_io(format!("creating {}", tmp.display())))?;

        let spec_path = root.join("bosh/spec.json");
        let spec =
            match fs::read(&spec_path) {
                Ok(bytes) => Some(serde_json::from_slice::<ApplySpec>(&bytes).map_err(|e| {
                    AgentError::Spec {
                        path: spec_path.clone(),
                        message: e.to_string(),
                    }
                })?),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    return Err(AgentError::Io {
                        op: format!("reading {}", spec_path.display()),
                        source: e,
                    })
                }
            };
        let supervisor = Supervisor::new(root.join("sys/log"));
        Ok(Agent {
            settings,
            settings_source: None,
            root,
            blobs,
            supervisor,
            ops: tokio::sync::Mutex::new(()),
            spec: Mutex::new(spec),
            started: Mutex::new(BTreeMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The applied spec, if any.
    pub fn applied_spec(&self) -> Option<ApplySpec> {
        lock(&self.spec).clone()
    }

    fn started_marker(&self) -> PathBuf {
        self.root.join("bosh/started")
    }

    fn disk_record_path(&self) -> PathBuf {
        self.root.join("bosh/disk.json")
    }

    fn disk_record(&self) -> Option<DiskRecord> {
        let bytes = fs::read(self.disk_record_path()).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// After an agent (re)boot: kill process groups a previous agent left
    /// behind, and if jobs were started when it went away, start them again
    /// (without re-running pre-start).
    pub async fn resume(&self) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        supervisor::kill_leftovers(&self.root.join("sys/run"));
        if self.started_marker().exists() {
            tracing::info!("jobs were running before the agent restarted; starting them");
            self.start_locked(false).await?;
        }
        Ok(())
    }

    /// `get_state`.
    pub async fn get_state(&self) -> AgentState {
        let spec = self.applied_spec();
        let sup = self.supervisor.status().await;
        let jobs: Vec<JobStatus> = spec
            .iter()
            .flat_map(|s| s.jobs.iter())
            .map(|j| {
                sup.iter()
                    .find(|s| s.name == j.name)
                    .cloned()
                    .unwrap_or_else(|| JobStatus {
                        name: j.name.clone(),
                        state: ProcessState::Stopped,
                        processes: Vec::new(),
                    })
            })
            .collect();
        let job_state = if jobs.is_empty() {
            ProcessState::Stopped
        } else {
            supervisor::aggregate(jobs.iter().map(|j| j.state))
        };
        let disk = self.disk_record();
        let vitals = Vitals {
            load: read_loadavg().unwrap_or_default(),
            ephemeral_disk_percent: disk_percent(&self.root.join("data")),
            persistent_disk_percent: disk
                .as_ref()
                .and_then(|_| disk_percent(&self.root.join("store"))),
            ..read_meminfo()
        };
        AgentState {
            agent_id: self.settings.agent_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            generation: spec.as_ref().map_or(0, |s| s.generation),
            spec,
            job_state,
            jobs,
            persistent_disk: disk.map(|d| d.cid),
            vitals,
        }
    }

    /// `apply`: lay down the whole spec; starts and stops nothing except the
    /// processes of jobs the spec no longer names.
    pub async fn apply(&self, spec: ApplySpec) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        let generation = spec.generation;
        let op = format!("applying spec generation {generation}");
        let current = self.applied_spec();
        if let Some(cur) = &current {
            if generation < cur.generation {
                return Err(failure(
                    "stale_generation",
                    format!(
                        "{op}: generation {generation} is older than the applied generation {}",
                        cur.generation
                    ),
                ));
            }
            if *cur == spec {
                tracing::info!(generation, "spec already applied; nothing to do");
                return Ok(());
            }
        }
        validate_spec(&spec).map_err(|m| failure("invalid", format!("{op}: {m}")))?;
        for p in &spec.packages {
            if !self.blobs.has(&p.sha256) {
                return Err(failure(
                    "missing_blob",
                    format!("{op}: package {} blob {} missing", p.name, short(&p.sha256)),
                ));
            }
        }

        // Stop what goes away before its files do.
        let named: BTreeSet<&str> = spec.jobs.iter().map(|j| j.name.as_str()).collect();
        let mut gone: BTreeSet<String> = self
            .supervisor
            .status()
            .await
            .into_iter()
            .map(|j| j.name)
            .filter(|n| !named.contains(n.as_str()))
            .collect();
        if let Ok(dir) = fs::read_dir(self.root.join("jobs")) {
            for e in dir.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !n.starts_with('.') && !named.contains(n.as_str()) {
                    gone.insert(n);
                }
            }
        }
        for job in &gone {
            tracing::info!(job = %job, "job no longer in spec; stopping it");
            self.supervisor.forget_job(job).await;
            lock(&self.started).remove(job);
        }

        let root = self.root.clone();
        let blobs = self.blobs.clone();
        let new = spec.clone();
        let what = op.clone();
        blocking(&what, move || {
            lay_down(&root, &blobs, &new, current.as_ref(), &op)?;
            let path = root.join("bosh/spec.json");
            let bytes = serde_json::to_vec_pretty(&new)
                .map_err(|e| failure("io", format!("{op}: encoding spec: {e}")))?;
            write_atomic(&path, &bytes, 0o600)
                .map_err(io_fail(format!("{op}: writing {}", path.display())))
        })
        .await?;
        tracing::info!(
            generation,
            jobs = spec.jobs.len(),
            packages = spec.packages.len(),
            "applied spec"
        );
        *lock(&self.spec) = Some(spec);
        Ok(())
    }

    /// `start`: pre-start scripts, then every process of every applied job.
    /// Jobs already running with the same digest are left alone.
    pub async fn start(&self) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        self.start_locked(true).await
    }

    async fn start_locked(&self, pre_start: bool) -> Result<(), ActionFailure> {
        let Some(spec) = self.applied_spec() else {
            return Ok(());
        };
        let mut plans: Vec<(RenderedJob, PathBuf, Vec<JobProcess>)> = Vec::new();
        for job in &spec.jobs {
            let dir = self.root.join("jobs").join(&job.name);
            let procs = job_processes(&job.name, &dir)?;
            let same = lock(&self.started).get(&job.name) == Some(&job.digest);
            if same && self.supervisor.is_wanted(&job.name).await {
                continue;
            }
            plans.push((job.clone(), dir, procs));
        }
        let plans = order_jobs(plans);
        if pre_start {
            for (job, dir, _) in &plans {
                let script = dir.join("bin/pre-start");
                if !script.is_file() {
                    continue;
                }
                tracing::info!(job = %job.name, "running pre-start");
                let run = self
                    .run_job_script(&job.name, dir, "pre-start", &[], &[], None)
                    .await?;
                if run.exit_code != 0 {
                    return Err(ActionFailure {
                        kind: "script_failed".into(),
                        message: format!(
                            "starting job {}: pre-start failed (exit {})",
                            job.name, run.exit_code
                        ),
                        output_tail: Some(tail_lines(&run.output, SCRIPT_TAIL_LINES)),
                    });
                }
            }
        }
        for (job, dir, procs) in &plans {
            self.supervisor
                .start_job(&job.name, dir, procs)
                .await
                .map_err(|e| {
                    let message =
                        format!("starting job {}: {}", job.name, bosun_cpi::chain::chain(&e));
                    match e {
                        supervisor::SupervisorError::PreStart { output_tail, .. } => {
                            ActionFailure {
                                kind: "script_failed".into(),
                                message,
                                output_tail: Some(output_tail),
                            }
                        }
                        _ => failure("invalid", message),
                    }
                })?;
            lock(&self.started).insert(job.name.clone(), job.digest.clone());
        }
        write_atomic(&self.started_marker(), b"started\n", 0o644)
            .map_err(io_fail("starting jobs: writing bosh/started"))?;
        Ok(())
    }

    /// `stop`: every process, SIGTERM then SIGKILL after its timeout.
    pub async fn stop(&self) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        self.supervisor.stop_all().await;
        lock(&self.started).clear();
        match fs::remove_file(self.started_marker()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(failure(
                "io",
                format!("stopping jobs: removing bosh/started: {e}"),
            )),
        }
    }

    /// `restart_jobs`: stop and start again the processes of these jobs (all
    /// applied jobs when none are named), without pre-start.
    pub async fn restart_jobs(&self, p: RestartJobsParams) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        let Some(spec) = self.applied_spec() else {
            return Err(failure("invalid", "restarting jobs: no spec is applied"));
        };
        for j in &p.jobs {
            if !spec.jobs.iter().any(|x| &x.name == j) {
                return Err(failure(
                    "invalid",
                    format!("restarting job {j}: no such job is applied"),
                ));
            }
        }
        {
            let mut started = lock(&self.started);
            if p.jobs.is_empty() {
                started.clear();
            } else {
                for j in &p.jobs {
                    started.remove(j);
                }
            }
        }
        self.start_locked(false).await
    }

    /// Stops every job process (used on SIGTERM).
    pub async fn shutdown(&self) {
        self.supervisor.stop_all().await;
    }

    /// `drain`: every job's `bin/drain` (concurrently), waiting as each asks,
    /// bounded by `p.timeout_secs` overall.
    pub async fn drain(&self, p: DrainParams) -> Result<DrainResult, ActionFailure> {
        let _g = self.ops.lock().await;
        let begin = Instant::now();
        let deadline = begin + Duration::from_secs(p.timeout_secs);
        let mut set = tokio::task::JoinSet::new();
        for job in self.applied_spec().map(|s| s.jobs).unwrap_or_default() {
            let dir = self.root.join("jobs").join(&job.name);
            if !dir.join("bin/drain").is_file() {
                continue;
            }
            let ctx = self.script_ctx();
            let changed = p.changed_jobs.contains(&job.name);
            let env = vec![
                (
                    "BOSH_JOB_STATE".to_string(),
                    p.job_state.clone().unwrap_or_else(|| "{}".into()),
                ),
                (
                    "BOSH_JOB_NEXT_STATE".to_string(),
                    p.next_job_state.clone().unwrap_or_else(|| "{}".into()),
                ),
            ];
            set.spawn(drain_job(
                ctx,
                (job.name, dir),
                p.kind,
                changed,
                env,
                deadline,
            ));
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or_else(|e| Err(failure("io", format!("draining: task failed: {e}"))));
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        let waited_secs = (begin.elapsed().as_millis() as u64 + 500) / 1000;
        Ok(DrainResult { waited_secs })
    }

    /// `run_script`: `bin/<script>` of every applied job that has it,
    /// concurrently; nonzero exits are reported, not failed.
    pub async fn run_script(&self, p: RunScriptParams) -> Result<ScriptResults, ActionFailure> {
        let _g = self.ops.lock().await;
        if !valid_name(&p.script) {
            return Err(failure(
                "invalid",
                format!("running script {:?}: invalid script name", p.script),
            ));
        }
        if let Some(bad) = p.output_prefix.as_deref().filter(|x| !valid_name(x)) {
            return Err(failure(
                "invalid",
                format!("running script {}: invalid output prefix {bad:?}", p.script),
            ));
        }
        if let Some(bad) = p.env.keys().find(|k| {
            !k.starts_with("BOSH_") || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            return Err(failure(
                "invalid",
                format!(
                    "running script {}: environment variable {bad:?} is not a BOSH_* name",
                    p.script
                ),
            ));
        }
        let env: Vec<(String, String)> = p.env.clone().into_iter().collect();
        let timeout = Duration::from_secs(p.timeout_secs);
        let mut set = tokio::task::JoinSet::new();
        for job in self.applied_spec().map(|s| s.jobs).unwrap_or_default() {
            let dir = self.root.join("jobs").join(&job.name);
            if !dir.join("bin").join(&p.script).is_file()
                || p.jobs
                    .as_ref()
                    .is_some_and(|only| !only.contains(&job.name))
            {
                continue;
            }
            let ctx = self.script_ctx();
            let script = p.script.clone();
            let out_name = p
                .output_prefix
                .as_ref()
                .map(|prefix| format!("{prefix}-{}.out", job.name));
            let env = env.clone();
            set.spawn(async move {
                let run = ctx
                    .run_to(
                        &job.name,
                        &dir,
                        &script,
                        (&[], &env),
                        Some(timeout),
                        out_name.as_deref(),
                    )
                    .await?;
                // An errand's output is what the operator asked for: keep more.
                let lines = if script == "run" {
                    ERRAND_TAIL_LINES
                } else {
                    SCRIPT_TAIL_LINES
                };
                let mut tail = tail_lines(&run.output, lines);
                if run.timed_out {
                    tail.push_str(&format!(
                        "\n(bosun-agent: timed out after {}s)",
                        timeout.as_secs()
                    ));
                }
                Ok::<_, ActionFailure>(ScriptResult {
                    job: job.name,
                    exit_code: run.exit_code,
                    output_tail: tail,
                    output_bytes: run.output_bytes,
                })
            });
        }
        let mut results = Vec::new();
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or_else(|e| {
                Err(failure(
                    "io",
                    format!("running script {}: task failed: {e}", p.script),
                ))
            });
            results.push(r?);
        }
        results.sort_by(|a, b| a.job.cmp(&b.job));
        Ok(ScriptResults { results })
    }

    /// `compile_package`: the source unpacked in `data/compile/<name>`, its
    /// dependencies installed, `packaging` run, and the install target kept
    /// as a blob.
    pub async fn compile_package(&self, r: CompileRequest) -> Result<CompileResult, ActionFailure> {
        let _g = self.ops.lock().await;
        let op = format!("compiling package {}", r.name);
        self.check_compile_request(&r, &op)?;
        let (compile_dir, install) = self.prepare_compile(&r, &op).await?;
        let tail = self.run_packaging(&r, &compile_dir, &install, &op).await?;
        let (sha256, size) = self
            .pack_compiled(&r.name, compile_dir, install, &op)
            .await?;
        tracing::info!(package = %r.name, sha256 = %sha256, size, "compiled package");
        Ok(CompileResult {
            sha256,
            size,
            output_tail: tail,
        })
    }

    /// A compilation names valid packages whose blobs are all here.
    fn check_compile_request(&self, r: &CompileRequest, op: &str) -> Result<(), ActionFailure> {
        if !valid_name(&r.name) {
            return Err(failure("invalid", format!("{op}: invalid package name")));
        }
        if !self.blobs.has(&r.source_sha256) {
            return Err(failure(
                "missing_blob",
                format!("{op}: source blob {} missing", short(&r.source_sha256)),
            ));
        }
        for d in &r.dependencies {
            if !valid_name(&d.name) || d.name == r.name {
                return Err(failure(
                    "invalid",
                    format!("{op}: invalid dependency name {:?}", d.name),
                ));
            }
            if !self.blobs.has(&d.sha256) {
                return Err(failure(
                    "missing_blob",
                    format!(
                        "{op}: dependency {} blob {} missing",
                        d.name,
                        short(&d.sha256)
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Installs the dependencies, unpacks the source into a fresh compile
    /// dir and makes an empty install target: (compile dir, install target).
    async fn prepare_compile(
        &self,
        r: &CompileRequest,
        op: &str,
    ) -> Result<(PathBuf, PathBuf), ActionFailure> {
        let root = self.root.clone();
        let blobs = self.blobs.clone();
        let req = r.clone();
        let op2 = op.to_string();
        blocking(op, move || {
            for d in &req.dependencies {
                install_package(&root, &blobs, &d.name, &d.sha256)
                    .map_err(io_fail(format!("{op2}: installing dependency {}", d.name)))?;
            }
            let compile_dir = root.join("data/compile").join(&req.name);
            remove_any(&compile_dir).map_err(io_fail(format!("{op2}: cleaning compile dir")))?;
            fs::create_dir_all(&compile_dir)
                .map_err(io_fail(format!("{op2}: creating compile dir")))?;
            unpack_tgz(&blobs.path(&req.source_sha256), &compile_dir)
                .map_err(io_fail(format!("{op2}: unpacking source")))?;
            if !compile_dir.join("packaging").is_file() {
                return Err(failure(
                    "invalid",
                    format!("{op2}: source has no packaging script"),
                ));
            }
            let install = root.join("packages").join(&req.name);
            remove_any(&install).map_err(io_fail(format!("{op2}: cleaning install target")))?;
            fs::create_dir_all(&install)
                .map_err(io_fail(format!("{op2}: creating install target")))?;
            Ok((compile_dir, install))
        })
        .await
    }

    /// Runs the source's `packaging` script: the tail of its output, or a
    /// `compile_failed` failure carrying it.
    async fn run_packaging(
        &self,
        r: &CompileRequest,
        compile_dir: &Path,
        install: &Path,
        op: &str,
    ) -> Result<String, ActionFailure> {
        let cmd = self
            .script_ctx()
            .packaging(compile_dir, install, &r.name, &r.fingerprint);
        tracing::info!(package = %r.name, "compiling package");
        let run = run_command(
            cmd,
            &self.root.join("data/tmp"),
            Some(Duration::from_secs(r.timeout_secs)),
            None,
        )
        .await
        .map_err(io_fail(format!("{op}: running packaging")))?;
        packaging_outcome(&r.name, r.timeout_secs, &run)
    }

    /// Packs the install target into a blob, then removes the packed file,
    /// the install target and the compile dir (whatever happened):
    /// the blob's sha256 and size.
    async fn pack_compiled(
        &self,
        name: &str,
        compile_dir: PathBuf,
        install: PathBuf,
        op: &str,
    ) -> Result<(String, u64), ActionFailure> {
        let tmp = self
            .root
            .join("data/tmp")
            .join(format!("compiled-{name}-{}.tgz", rand_suffix()));
        let blobs = self.blobs.clone();
        let op2 = op.to_string();
        blocking(op, move || {
            let res = (|| {
                write_tgz(&tmp, &[(install.clone(), PathBuf::new(), false)])
                    .map_err(io_fail(format!("{op2}: packing install target")))?;
                let size = fs::metadata(&tmp)
                    .map_err(io_fail(format!("{op2}: reading packed size")))?
                    .len();
                let sha = blobs.put_file(&tmp).map_err(|e| {
                    failure(
                        "io",
                        format!(
                            "{op2}: storing compiled blob: {}",
                            bosun_cpi::chain::chain(&e)
                        ),
                    )
                })?;
                Ok((sha, size))
            })();
            remove_leftover(&tmp);
            remove_leftover(&install);
            remove_leftover(&compile_dir);
            res
        })
        .await
    }

    /// `fetch_logs`: a tgz of `sys/log/<job>/...` in the blob store.
    pub async fn fetch_logs(&self, p: FetchLogsParams) -> Result<FetchLogsResult, ActionFailure> {
        let op = "fetching logs";
        for j in &p.jobs {
            if !valid_name(j) {
                return Err(failure("invalid", format!("{op}: invalid job name {j:?}")));
            }
        }
        let log_root = self.root.join("sys/log");
        let tmp = self
            .root
            .join("data/tmp")
            .join(format!("logs-{}.tgz", rand_suffix()));
        let blobs = self.blobs.clone();
        blocking(op, move || {
            let mut jobs: Vec<String> = if p.jobs.is_empty() {
                fs::read_dir(&log_root)
                    .map_err(io_fail(format!("{op}: listing {}", log_root.display())))?
                    .flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            } else {
                p.jobs.clone()
            };
            jobs.sort();
            jobs.dedup();
            let trees: Vec<(PathBuf, PathBuf, bool)> = jobs
                .iter()
                .map(|j| (log_root.join(j), PathBuf::from(j), true))
                .filter(|(d, _, _)| d.is_dir())
                .collect();
            blob_from_tmp(&blobs, &tmp, op, |tmp| {
                write_tgz(tmp, &trees).map_err(io_fail(format!("{op}: packing logs")))
            })
        })
        .await
    }

    /// `install_file`: a blob copied to `p.path` (atomically).
    pub async fn install_file(&self, p: InstallFileParams) -> Result<(), ActionFailure> {
        let op = format!("installing {}", p.path);
        let dest = PathBuf::from(&p.path);
        if !dest.is_absolute() || dest.file_name().is_none() {
            return Err(failure(
                "invalid",
                format!("{op}: not an absolute file path"),
            ));
        }
        if !self.blobs.has(&p.sha256) {
            return Err(failure(
                "missing_blob",
                format!("{op}: blob {} is missing", short(&p.sha256)),
            ));
        }
        let src = self.blobs.path(&p.sha256);
        blocking("installing a file", move || {
            if let Some(dir) = dest.parent() {
                fs::create_dir_all(dir).map_err(io_fail(&op))?;
            }
            let bytes = fs::read(&src).map_err(io_fail(&op))?;
            write_atomic(&dest, &bytes, p.mode & 0o7777).map_err(io_fail(&op))
        })
        .await
    }

    /// `pack_disk`: the persistent disk's contents as a blob (tgz, owners,
    /// modes and times kept).
    pub async fn pack_disk(&self) -> Result<FetchLogsResult, ActionFailure> {
        let _g = self.ops.lock().await;
        let op = "packing the persistent disk";
        let store = self.root.join("store");
        if self.disk_record().is_none() {
            return Err(failure(
                "invalid",
                format!("{op}: no persistent disk is mounted"),
            ));
        }
        let tmp = self
            .root
            .join("data/tmp")
            .join(format!("disk-{}.tgz", rand_suffix()));
        let blobs = self.blobs.clone();
        blocking(op, move || {
            blob_from_tmp(&blobs, &tmp, op, |tmp| {
                let f = File::create(tmp).map_err(io_fail(op))?;
                let gz =
                    flate2::write::GzEncoder::new(BufWriter::new(f), flate2::Compression::fast());
                let mut b = tar::Builder::new(gz);
                b.follow_symlinks(false);
                b.mode(tar::HeaderMode::Complete);
                b.append_dir_all(".", &store).map_err(io_fail(op))?;
                let gz = b.into_inner().map_err(io_fail(op))?;
                let w = gz.finish().map_err(io_fail(op))?;
                let f = w
                    .into_inner()
                    .map_err(|e| failure("io", format!("{op}: {}", e.error())))?;
                f.sync_all().map_err(io_fail(op))
            })
        })
        .await
    }

    /// `unpack_disk`: a `pack_disk` blob into the (empty) persistent disk.
    pub async fn unpack_disk(&self, p: UnpackDiskParams) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        let op = "unpacking onto the persistent disk";
        let store = self.root.join("store");
        if self.disk_record().is_none() {
            return Err(failure(
                "invalid",
                format!("{op}: no persistent disk is mounted"),
            ));
        }
        if !self.blobs.has(&p.sha256) {
            return Err(failure(
                "missing_blob",
                format!("{op}: blob {} is missing", short(&p.sha256)),
            ));
        }
        let src = self.blobs.path(&p.sha256);
        blocking(op, move || {
            let nonempty = fs::read_dir(&store)
                .map_err(io_fail(op))?
                .flatten()
                .any(|e| e.file_name() != "lost+found");
            if nonempty {
                return Err(failure(
                    "invalid",
                    format!("{op}: {} is not empty", store.display()),
                ));
            }
            let f = File::open(&src).map_err(io_fail(op))?;
            let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(f)));
            ar.set_preserve_permissions(true);
            ar.set_preserve_ownerships(true);
            ar.set_preserve_mtime(true);
            ar.set_unpack_xattrs(false);
            ar.unpack(&store).map_err(io_fail(op))
        })
        .await
    }

    /// A persistent disk's hint as the settings source lists it now.
    async fn hint_from_settings(&self, cid: &str) -> Result<String, ActionFailure> {
        let op = format!("mounting disk {cid}");
        let Some(source) = &self.settings_source else {
            return Err(failure("invalid", format!("{op}: no hint was given")));
        };
        let settings = source.read().await.map_err(|e| {
            failure(
                "invalid",
                format!("{op}: reading the settings at {source} again: {e}"),
            )
        })?;
        settings
            .disks
            .get(cid)
            .and_then(disk_hint_path)
            .ok_or_else(|| {
                failure(
                    "invalid",
                    format!(
                        "{op}: no hint was given and the settings at {source} list none for it"
                    ),
                )
            })
    }

    /// `mount_disk`: bind-mount `p.hint.path` (or mount a block device) at
    /// `<root>/store`; idempotent for the same cid. Without a hint, the
    /// disk's is taken from the settings source, read again.
    pub async fn mount_disk(&self, mut p: MountDiskParams) -> Result<(), ActionFailure> {
        if p.hint.path.is_empty() {
            p.hint.path = self.hint_from_settings(&p.cid).await?;
        }
        let _g = self.ops.lock().await;
        let op = format!("mounting disk {} from {}", p.cid, p.hint.path);
        let store = self.root.join("store");
        // A CPI that mounts the disk itself (Docker volumes) hints the mount
        // point: nothing to mount, only to record.
        let premounted = Path::new(&p.hint.path) == store || p.hint.path == VCAP_STORE;
        if premounted {
            return self.record_disk(&op, &p.cid, &p.hint.path);
        }
        let mounted = is_mount_point(&store);
        match self.disk_record() {
            Some(rec) if mounted && rec.cid == p.cid => return Ok(()),
            Some(rec) if mounted => {
                return Err(failure(
                    "invalid",
                    format!(
                        "{op}: disk {} is already mounted at {}",
                        rec.cid,
                        store.display()
                    ),
                ))
            }
            _ if mounted => {
                return Err(failure(
                    "invalid",
                    format!("{op}: {} is already a mount point", store.display()),
                ))
            }
            _ => {}
        }
        let src = PathBuf::from(&p.hint.path);
        let md = fs::metadata(&src).map_err(io_fail(format!("{op}: {}", src.display())))?;
        fs::create_dir_all(&store)
            .map_err(io_fail(format!("{op}: creating {}", store.display())))?;
        if md.file_type().is_block_device() {
            mount_block_device(&src, &store)
                .await
                .map_err(|m| failure("io", format!("{op}: {m}")))?;
        } else {
            sys_mount(&src, &store, None, libc::MS_BIND).map_err(|e| {
                let hint = if e.raw_os_error() == Some(libc::EPERM) {
                    " (mounting needs root with CAP_SYS_ADMIN)"
                } else {
                    ""
                };
                failure("io", format!("{op}: bind mount failed: {e}{hint}"))
            })?;
        }
        self.record_disk(&op, &p.cid, &p.hint.path)
    }

    fn record_disk(&self, op: &str, cid: &str, path: &str) -> Result<(), ActionFailure> {
        let rec = DiskRecord {
            cid: cid.to_string(),
            path: path.to_string(),
        };
        let bytes = serde_json::to_vec(&rec).map_err(|e| failure("io", format!("{op}: {e}")))?;
        write_atomic(&self.disk_record_path(), &bytes, 0o644)
            .map_err(io_fail(format!("{op}: recording mount")))?;
        tracing::info!(cid = %cid, "mounted persistent disk");
        Ok(())
    }

    /// `unmount_disk`: lazy unmount of `<root>/store`; idempotent.
    pub async fn unmount_disk(&self, p: UnmountDiskParams) -> Result<(), ActionFailure> {
        let _g = self.ops.lock().await;
        let op = format!("unmounting disk {}", p.cid);
        let store = self.root.join("store");
        match self.disk_record() {
            None => return Ok(()),
            Some(rec) if rec.cid != p.cid => {
                return Err(failure(
                    "invalid",
                    format!("{op}: the mounted disk is {}", rec.cid),
                ))
            }
            Some(_) => {}
        }
        let premounted = self
            .disk_record()
            .is_some_and(|r| Path::new(&r.path) == store || r.path == VCAP_STORE);
        if is_mount_point(&store) && !premounted {
            let c = cpath(&store).map_err(io_fail(&op))?;
            // SAFETY: umount2 with a valid NUL-terminated path.
            let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if rc != 0 {
                return Err(failure(
                    "io",
                    format!("{op}: umount failed: {}", io::Error::last_os_error()),
                ));
            }
        }
        match fs::remove_file(self.disk_record_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(failure("io", format!("{op}: clearing record: {e}"))),
        }
        tracing::info!(cid = %p.cid, "unmounted persistent disk");
        Ok(())
    }

    fn script_ctx(&self) -> ScriptCtx {
        ScriptCtx {
            root: self.root.clone(),
        }
    }

    async fn run_job_script(
        &self,
        job: &str,
        dir: &Path,
        script: &str,
        args: &[&str],
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<ScriptRun, ActionFailure> {
        self.script_ctx()
            .run(job, dir, script, args, env, timeout)
            .await
    }
}

#[async_trait::async_trait]
impl ActionHandler for Agent {
    async fn handle(&self, action: Action) -> Result<serde_json::Value, ActionFailure> {
        match action {
            Action::Ping => to_json(&PingResult {
                agent_id: self.settings.agent_id.clone(),
                protocol_version: PROTOCOL_VERSION,
            }),
            Action::GetState => to_json(&self.get_state().await),
            Action::Apply(spec) => self.apply(spec).await.map(|()| serde_json::Value::Null),
            Action::Start => self.start().await.map(|()| serde_json::Value::Null),
            Action::Stop => self.stop().await.map(|()| serde_json::Value::Null),
            Action::RestartJobs(p) => self.restart_jobs(p).await.map(|()| serde_json::Value::Null),
            Action::Drain(p) => to_json(&self.drain(p).await?),
            Action::RunScript(p) => to_json(&self.run_script(p).await?),
            Action::CompilePackage(r) => to_json(&self.compile_package(r).await?),
            Action::FetchLogs(p) => to_json(&self.fetch_logs(p).await?),
            Action::MountDisk(p) => self.mount_disk(p).await.map(|()| serde_json::Value::Null),
            Action::UnmountDisk(p) => self.unmount_disk(p).await.map(|()| serde_json::Value::Null),
            Action::MissingBlobs(p) => to_json(&self.blobs.missing(&p.sha256s)),
            Action::PackDisk => to_json(&self.pack_disk().await?),
            Action::InstallFile(p) => self.install_file(p).await.map(|()| serde_json::Value::Null),
            Action::UnpackDisk(p) => self.unpack_disk(p).await.map(|()| serde_json::Value::Null),
        }
    }
}

/// Entry point of `bosun agent --settings SOURCE`: a settings file (bosun's,
/// or BOSH's agent env), `config-drive:DIR` or a metadata service URL (see
/// [`SettingsSource`]). The agent waits until the source has settings.
pub async fn run_from_settings_file(path: &Path) -> Result<(), AgentError> {
    let source = SettingsSource::parse(&path.to_string_lossy());
    let settings = source.wait().await.map_err(|e| AgentError::Settings {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    run_agent(settings, PathBuf::from("/var/vcap"), Some(source)).await
}

/// [`run_from_settings_file`] with an explicit root (for tests and odd hosts).
pub async fn run_with_root(settings: AgentSettings, root: PathBuf) -> Result<(), AgentError> {
    run_agent(settings, root, None).await
}

async fn run_agent(
    settings: AgentSettings,
    root: PathBuf,
    source: Option<SettingsSource>,
) -> Result<(), AgentError> {
    let blob_root = root.join("data/blobs");
    fs::create_dir_all(&blob_root)
        .map_err(agent_io(format!("creating {}", blob_root.display())))?;
    let blobs = Arc::new(
        BlobStore::open(blob_root.clone()).map_err(|e| AgentError::Blobs {
            path: blob_root.clone(),
            message: e.to_string(),
        })?,
    );
    let mut agent = Agent::new(settings.clone(), root, blobs.clone())?;
    agent.settings_source = source;
    let agent = Arc::new(agent);
    if std::process::id() == 1 {
        tokio::spawn(supervisor::reap_orphans_forever());
    }
    if let Some((cid, hint)) = settings.disks.iter().next() {
        match disk_hint_path(hint) {
            Some(path) => {
                let p = MountDiskParams {
                    cid: cid.clone(),
                    hint: DiskHint { path },
                };
                if let Err(e) = agent.mount_disk(p).await {
                    tracing::error!(cid = %cid, error = %e.message, "mounting persistent disk at boot failed");
                }
            }
            None => tracing::error!(cid = %cid, "persistent disk hint has no path; not mounting"),
        }
    }
    if let Err(e) = agent.resume().await {
        tracing::error!(error = %e.message, "restarting jobs after agent restart failed");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(agent_io("installing SIGTERM handler"))?;
    let handler: Arc<dyn ActionHandler> = agent.clone();
    tracing::info!(agent_id = %settings.agent_id, "agent serving");
    let result = tokio::select! {
        r = server::serve(&settings, blobs, handler) => r.map_err(AgentError::Server),
        _ = term.recv() => {
            tracing::info!("SIGTERM: stopping job processes");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT: stopping job processes");
            Ok(())
        }
    };
    agent.shutdown().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::DrainKind;
    use crate::protocol::{PackageRef, RenderedFile};
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;

    struct Fixture {
        _tmp: tempfile::TempDir,
        root: PathBuf,
        blobs: Arc<BlobStore>,
        agent: Agent,
    }

    fn settings() -> AgentSettings {
        AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: String::new(),
            host_private_key: String::new(),
            listen_ip: "127.0.0.1".into(),
            listen_port: 0,
            networks: BTreeMap::new(),
            disks: BTreeMap::new(),
            env: serde_json::Value::Null,
        }
    }

    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("vcap");
        let blobs = Arc::new(BlobStore::open(root.join("data/blobs")).unwrap());
        let agent = Agent::new(settings(), root.clone(), blobs.clone()).unwrap();
        Fixture {
            _tmp: tmp,
            root,
            blobs,
            agent,
        }
    }

    /// A tgz of (path, content, mode) entries.
    fn tgz(files: &[(&str, &str, u32)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (path, content, mode) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(*mode);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, path, content.as_bytes()).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    fn untar(data: &[u8]) -> BTreeMap<String, String> {
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data));
        let mut out = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            out.insert(path, s);
        }
        out
    }

    pub(super) fn file(path: &str, content: &str) -> RenderedFile {
        RenderedFile {
            path: path.into(),
            content: content.into(),
            executable: false,
        }
    }

    pub(super) fn job(name: &str, files: Vec<RenderedFile>) -> RenderedJob {
        let digest = crate::blobs::sha256_hex(format!("{files:?}").as_bytes());
        RenderedJob {
            name: name.into(),
            digest,
            files,
        }
    }

    fn spec(generation: u64, packages: Vec<PackageRef>, jobs: Vec<RenderedJob>) -> ApplySpec {
        ApplySpec {
            generation,
            deployment: "d".into(),
            instance_group: "g".into(),
            id: "id-0".into(),
            index: 0,
            az: "z1".into(),
            bootstrap: true,
            address: "127.0.0.1".into(),
            networks: BTreeMap::new(),
            packages,
            jobs,
        }
    }

    fn bpm(script: &str, shutdown: u64) -> String {
        format!(
            "processes:\n- name: main\n  executable: /bin/sh\n  args: [\"-c\", {}]\n  shutdown_timeout: {shutdown}\n",
            serde_json::to_string(script).unwrap()
        )
    }

    async fn wait_state(
        agent: &Agent,
        job: &str,
        f: impl Fn(&JobStatus) -> bool,
        secs: u64,
    ) -> JobStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = agent.get_state().await;
            let j = st.jobs.into_iter().find(|j| j.name == job).unwrap();
            if f(&j) || Instant::now() > deadline {
                return j;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn alive(pid: u32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[tokio::test]
    async fn apply_lays_down_is_idempotent_rejects_stale_and_removes() {
        let fx = fixture();
        let pkg_sha = fx
            .blobs
            .put_bytes(&tgz(&[("bin/tool", "#!/bin/sh\necho tool\n", 0o755)]))
            .unwrap();
        let pkg = PackageRef {
            name: "tool".into(),
            fingerprint: "fp1".into(),
            sha256: pkg_sha.clone(),
        };
        let web = job(
            "web",
            vec![
                file("bin/ctl", "#!/bin/sh\n"),
                file("config/web.conf", "port=1\n"),
            ],
        );
        let s1 = spec(1, vec![pkg.clone()], vec![web.clone()]);
        fx.agent.apply(s1.clone()).await.unwrap();

        let link = fx.root.join("packages/tool");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            fs::read_link(&link).unwrap(),
            fx.root.join("data/packages/tool").join(&pkg_sha)
        );
        assert!(link.join("bin/tool").is_file());
        let mode = |p: &str| fs::metadata(fx.root.join(p)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("jobs/web/bin/ctl"), 0o750);
        assert_eq!(mode("jobs/web/config/web.conf"), 0o640);
        assert_eq!(mode("jobs/web/config"), 0o750);
        assert_eq!(mode("jobs/web"), 0o750);
        assert!(fx.root.join("bosh/spec.json").is_file());

        // Same spec again: a no-op (a marker in the job dir survives).
        fs::write(fx.root.join("jobs/web/marker"), "x").unwrap();
        fx.agent.apply(s1.clone()).await.unwrap();
        assert!(fx.root.join("jobs/web/marker").exists());
        assert_eq!(fx.agent.get_state().await.generation, 1);

        // A restarted agent knows what was applied.
        let again = Agent::new(settings(), fx.root.clone(), fx.blobs.clone()).unwrap();
        assert_eq!(again.applied_spec(), Some(s1.clone()));

        // Stale generation.
        let err = fx.agent.apply(spec(0, vec![], vec![])).await.unwrap_err();
        assert_eq!(err.kind, "stale_generation");
        assert!(err.message.contains("generation 0"), "{}", err.message);

        // Missing blob.
        let bad = PackageRef {
            name: "other".into(),
            fingerprint: "x".into(),
            sha256: "ab".repeat(32),
        };
        let err = fx
            .agent
            .apply(spec(2, vec![bad], vec![]))
            .await
            .unwrap_err();
        assert_eq!(err.kind, "missing_blob");
        assert!(
            err.message
                .contains("package other blob abababab.. missing"),
            "{}",
            err.message
        );

        // Unsafe paths are refused.
        let evil = job("evil", vec![file("../escape", "x")]);
        let err = fx
            .agent
            .apply(spec(2, vec![], vec![evil]))
            .await
            .unwrap_err();
        assert_eq!(err.kind, "invalid");

        // Generation 3 names another job and no package: the rest goes away.
        let api = job("api", vec![file("config/a", "a")]);
        fx.agent.apply(spec(3, vec![], vec![api])).await.unwrap();
        assert!(!fx.root.join("jobs/web").exists());
        assert!(fx.root.join("jobs/api/config/a").is_file());
        assert!(fs::symlink_metadata(&link).is_err());
        assert!(!fx.root.join("data/packages/tool").exists());
        let leftovers: Vec<_> = fs::read_dir(fx.root.join("jobs"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("api")]);
    }

    #[tokio::test]
    async fn start_restart_stop_and_logs() {
        let fx = fixture();
        let web = job(
            "web",
            vec![
                file(
                    "bin/pre-start",
                    "#!/bin/sh\necho prestarted > \"$HOME/prestart-ran\"\n",
                ),
                file("config/bpm.yml", &bpm("echo hi; exec sleep 1000", 2)),
            ],
        );
        fx.agent.apply(spec(1, vec![], vec![web])).await.unwrap();
        // Apply starts nothing.
        assert_eq!(fx.agent.get_state().await.job_state, ProcessState::Stopped);

        fx.agent.start().await.unwrap();
        assert!(fx.root.join("prestart-ran").is_file());
        let j = wait_state(&fx.agent, "web", |j| j.state == ProcessState::Running, 5).await;
        assert_eq!(j.state, ProcessState::Running);
        let pid1 = j.processes[0].pid.unwrap();
        assert_eq!(fx.agent.get_state().await.job_state, ProcessState::Running);

        let log = fx.root.join("sys/log/web/main.stdout.log");
        let deadline = Instant::now() + Duration::from_secs(3);
        while fs::read_to_string(&log).unwrap_or_default().trim() != "hi"
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(fs::read_to_string(&log).unwrap().trim(), "hi");

        // SIGKILL: restarted with a new pid, restarts counted.
        // SAFETY: test-only signal to our own child.
        unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
        let j = wait_state(
            &fx.agent,
            "web",
            |j| j.processes[0].restarts >= 1 && j.state == ProcessState::Running,
            5,
        )
        .await;
        assert_eq!(j.state, ProcessState::Running);
        assert!(j.processes[0].restarts >= 1);
        let pid2 = j.processes[0].pid.unwrap();
        assert_ne!(pid1, pid2);

        // Start again with the same digest leaves the process alone.
        fx.agent.start().await.unwrap();
        let j = fx.agent.get_state().await.jobs.remove(0);
        assert_eq!(j.processes[0].pid, Some(pid2));

        // restart_jobs: a new process, without pre-start; unknown jobs refused.
        fs::remove_file(fx.root.join("prestart-ran")).unwrap();
        fx.agent
            .restart_jobs(RestartJobsParams {
                jobs: vec!["web".into()],
            })
            .await
            .unwrap();
        let j = wait_state(&fx.agent, "web", |j| j.state == ProcessState::Running, 5).await;
        let pid3 = j.processes[0].pid.unwrap();
        assert_ne!(pid3, pid2);
        assert!(!alive(pid2));
        assert!(!fx.root.join("prestart-ran").exists(), "no pre-start");
        let e = fx
            .agent
            .restart_jobs(RestartJobsParams {
                jobs: vec!["nope".into()],
            })
            .await
            .unwrap_err();
        assert_eq!(e.message, "restarting job nope: no such job is applied");
        let pid2 = pid3;

        fx.agent.stop().await.unwrap();
        let st = fx.agent.get_state().await;
        assert_eq!(st.job_state, ProcessState::Stopped);
        assert_eq!(st.jobs[0].processes[0].state, ProcessState::Stopped);
        assert!(!alive(pid2));

        // Logs come back as a tgz.
        let logs = fx
            .agent
            .fetch_logs(FetchLogsParams { jobs: vec![] })
            .await
            .unwrap();
        let files = untar(&fx.blobs.read(&logs.sha256).unwrap());
        assert!(
            files
                .get("web/main.stdout.log")
                .is_some_and(|s| s.contains("hi")),
            "{files:?}"
        );
        assert!(files.contains_key("web/pre-start.log"));
    }

    #[tokio::test]
    async fn sigterm_ignoring_process_is_killed_after_timeout() {
        let fx = fixture();
        let web = job(
            "stubborn",
            vec![file(
                "config/bpm.yml",
                &bpm("trap '' TERM; while :; do sleep 0.1; done", 1),
            )],
        );
        fx.agent.apply(spec(1, vec![], vec![web])).await.unwrap();
        fx.agent.start().await.unwrap();
        let j = wait_state(
            &fx.agent,
            "stubborn",
            |j| j.state == ProcessState::Running,
            5,
        )
        .await;
        let pid = j.processes[0].pid.unwrap();
        // Let the shell install its trap.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t = Instant::now();
        fx.agent.stop().await.unwrap();
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn failing_pre_start_and_bad_bpm_fail_start() {
        let fx = fixture();
        let lines: String = (1..=50).map(|i| format!("echo line{i}\n")).collect();
        let web = job(
            "web",
            vec![file(
                "bin/pre-start",
                &format!("#!/bin/sh\n{lines}exit 7\n"),
            )],
        );
        fx.agent.apply(spec(1, vec![], vec![web])).await.unwrap();
        let err = fx.agent.start().await.unwrap_err();
        assert_eq!(err.kind, "script_failed");
        assert!(
            err.message.contains("web") && err.message.contains("exit 7"),
            "{}",
            err.message
        );
        let tail = err.output_tail.unwrap();
        assert_eq!(tail.lines().count(), 30);
        assert!(tail.ends_with("line50"));

        // Unknown keys are ignored (with a warning), as bpm does.
        let lenient = job(
            "lenient",
            vec![file(
                "config/bpm.yml",
                "processes: [{name: x, executable: /bin/sleep, args: [1000], bogus: 1}]\n",
            )],
        );
        fx.agent
            .apply(spec(2, vec![], vec![lenient]))
            .await
            .unwrap();
        fx.agent.start().await.unwrap();
        let j = wait_state(
            &fx.agent,
            "lenient",
            |j| j.state == ProcessState::Running,
            5,
        )
        .await;
        assert_eq!(j.state, ProcessState::Running);
        fx.agent.stop().await.unwrap();

        // A type error still fails the start.
        let bad = job("bad", vec![file("config/bpm.yml", "processes: 5\n")]);
        fx.agent.apply(spec(3, vec![], vec![bad])).await.unwrap();
        let err = fx.agent.start().await.unwrap_err();
        assert_eq!(err.kind, "invalid");
        assert!(
            err.message.contains("job bad") && err.message.contains("bpm.yml"),
            "{}",
            err.message
        );
    }

    const TWO_PROCESSES: &str = "processes:\n- name: main\n  executable: /bin/sh\n  args: [-c, exec sleep 1000]\n- name: side\n  executable: /bin/sh\n  args: [-c, exec sleep 1000]\n";

    #[tokio::test]
    async fn bpm_form_monit_selects_its_process() {
        let fx = fixture();
        let monit = "check process side\n  with pidfile /var/vcap/sys/run/bpm/zk/side.pid\n  start program \"/var/vcap/jobs/bpm/bin/bpm start zk -p side\"\n  stop program \"/var/vcap/jobs/bpm/bin/bpm stop zk -p side\"\n  group vcap\n";
        let zk = job(
            "zk",
            vec![file("monit", monit), file("config/bpm.yml", TWO_PROCESSES)],
        );
        fx.agent.apply(spec(1, vec![], vec![zk])).await.unwrap();
        fx.agent.start().await.unwrap();
        let j = wait_state(&fx.agent, "zk", |j| j.state == ProcessState::Running, 5).await;
        assert_eq!(j.state, ProcessState::Running);
        let names: Vec<&str> = j.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["side"]);
        assert!(alive(j.processes[0].pid.unwrap()));
        fx.agent.stop().await.unwrap();
    }

    #[tokio::test]
    async fn empty_monit_runs_nothing_even_with_a_bpm_yml() {
        let fx = fixture();
        let quiet = job(
            "quiet",
            vec![file("monit", ""), file("config/bpm.yml", TWO_PROCESSES)],
        );
        fx.agent.apply(spec(1, vec![], vec![quiet])).await.unwrap();
        fx.agent.start().await.unwrap();
        let st = fx.agent.get_state().await;
        assert_eq!(st.jobs[0].state, ProcessState::Running);
        assert!(st.jobs[0].processes.is_empty(), "{:?}", st.jobs[0]);
        assert!(!fx.root.join("sys/log/quiet/main.stdout.log").exists());
    }

    #[tokio::test]
    async fn ctl_form_monit_job_runs_restarts_and_stops() {
        let fx = fixture();
        let pidfile = fx.root.join("sys/run/db/db.pid");
        let ctl = format!(
            "#!/bin/sh\ncase $1 in\n  start) mkdir -p {run}; sleep 1000 >/dev/null 2>&1 &\n    echo $! > {pid} ;;\n  stop) kill $(cat {pid}); rm -f {pid}; touch {done} ;;\nesac\n",
            run = pidfile.parent().unwrap().display(),
            pid = pidfile.display(),
            done = fx.root.join("db-stopped").display(),
        );
        let jobs = fx.root.join("jobs/db/bin/ctl");
        let monit = format!(
            "check process db\n  with pidfile {}\n  start program \"{} start\" with timeout 10 seconds\n  stop program \"{} stop\"\n  if totalmem > 100 Mb then restart\n  group vcap\n",
            pidfile.display(),
            jobs.display(),
            jobs.display()
        );
        let db = job("db", vec![file("monit", &monit), file("bin/ctl", &ctl)]);
        fx.agent.apply(spec(1, vec![], vec![db])).await.unwrap();
        fx.agent.start().await.unwrap();
        let j = wait_state(&fx.agent, "db", |j| j.state == ProcessState::Running, 5).await;
        assert_eq!(j.state, ProcessState::Running);
        let pid1 = j.processes[0].pid.unwrap();
        // SAFETY: test-only signal to a process this test started.
        unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
        let j = wait_state(
            &fx.agent,
            "db",
            |j| j.processes[0].restarts >= 1 && j.state == ProcessState::Running,
            5,
        )
        .await;
        let pid2 = j.processes[0].pid.unwrap();
        assert_ne!(pid1, pid2);
        fx.agent.stop().await.unwrap();
        assert!(!alive(pid2));
        assert!(fx.root.join("db-stopped").exists());
        assert_eq!(fx.agent.get_state().await.job_state, ProcessState::Stopped);
    }

    #[tokio::test]
    async fn failing_bpm_pre_start_hook_fails_the_start_with_its_output() {
        let fx = fixture();
        let bpm = "processes:\n- name: main\n  executable: /bin/sleep\n  args: [1000]\n  hooks:\n    pre_start: bin/hook\n";
        let hooked = job(
            "hooked",
            vec![
                file("config/bpm.yml", bpm),
                file("bin/hook", "#!/bin/sh\necho not today >&2\nexit 3\n"),
            ],
        );
        fx.agent.apply(spec(1, vec![], vec![hooked])).await.unwrap();
        let err = fx.agent.start().await.unwrap_err();
        assert_eq!(err.kind, "script_failed");
        assert!(
            err.message.contains("job hooked") && err.message.contains("pre_start hook"),
            "{}",
            err.message
        );
        assert_eq!(err.output_tail.as_deref(), Some("not today"));
        assert!(fx.agent.get_state().await.jobs[0].processes.is_empty());
    }

    /// A ctl-form job `name`: its check is `name`, its ctl daemonises `sleep`;
    /// `stop` touches `<root>/<name>-stopped`; `extra` goes into the monit check.
    fn ctl_monit_job(root: &Path, name: &str, start_prefix: &str, extra: &str) -> RenderedJob {
        let pidfile = root.join(format!("sys/run/{name}/{name}.pid"));
        let ctl = format!(
            "#!/bin/sh\ncase $1 in\n  start) mkdir -p {run}; sleep 1000 >/dev/null 2>&1 &\n    echo $! > {pid} ;;\n  stop) kill $(cat {pid}); rm -f {pid}; touch {done} ;;\nesac\n",
            run = pidfile.parent().unwrap().display(),
            pid = pidfile.display(),
            done = root.join(format!("{name}-stopped")).display(),
        );
        let bin = root.join(format!("jobs/{name}/bin/ctl"));
        let monit = format!(
            "check process {name}\n  with pidfile {}\n  start program \"{start_prefix}{} start\"\n  stop program \"{} stop\"\n{extra}",
            pidfile.display(),
            bin.display(),
            bin.display()
        );
        job(name, vec![file("monit", &monit), file("bin/ctl", &ctl)])
    }

    #[tokio::test]
    async fn depends_on_a_check_of_another_job_orders_start_and_stop() {
        let fx = fixture();
        let db_pid = fx.root.join("sys/run/db/db.pid");
        let marker = fx.root.join("db-was-up");
        let prefix = format!(
            "test -s {} && touch {}; ",
            db_pid.display(),
            marker.display()
        );
        // The dependent comes first in the spec.
        let app = ctl_monit_job(&fx.root, "app", &prefix, "  depends on db\n");
        let db = ctl_monit_job(&fx.root, "db", "", "");
        fx.agent
            .apply(spec(1, vec![], vec![app, db]))
            .await
            .unwrap();
        fx.agent.start().await.unwrap();
        for j in ["app", "db"] {
            let st = wait_state(&fx.agent, j, |j| j.state == ProcessState::Running, 5).await;
            assert_eq!(st.state, ProcessState::Running, "{j}");
        }
        assert!(marker.exists(), "app started before db was up");
        fx.agent.stop().await.unwrap();
        let t = |n: &str| fs::metadata(fx.root.join(n)).unwrap().modified().unwrap();
        assert!(t("app-stopped") <= t("db-stopped"), "db stopped first");
    }

    #[tokio::test]
    async fn bad_monit_file_fails_the_start_naming_file_and_line() {
        let fx = fixture();
        let bad = job(
            "bad",
            vec![file(
                "monit",
                "check process x\n  with pidfile /p\n  sometimes \"x\"\n",
            )],
        );
        fx.agent.apply(spec(1, vec![], vec![bad])).await.unwrap();
        let err = fx.agent.start().await.unwrap_err();
        assert_eq!(err.kind, "invalid");
        assert!(
            err.message.contains("jobs/bad/monit line 3") && err.message.contains("sometimes"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn compile_package_uses_dependency_and_packs_install_target() {
        let fx = fixture();
        let dep_sha = fx
            .blobs
            .put_bytes(&tgz(&[("share/greeting.txt", "hello from lib\n", 0o644)]))
            .unwrap();
        let packaging = "set -e\n\
            echo compiling in $PWD\n\
            test \"$BOSH_COMPILE_TARGET\" = \"$PWD\"\n\
            mkdir -p \"$BOSH_INSTALL_TARGET/bin\"\n\
            cat \"$BOSH_PACKAGES_DIR/lib/share/greeting.txt\" src/extra.txt > \"$BOSH_INSTALL_TARGET/built.txt\"\n\
            echo \"$BOSH_PACKAGE_NAME $BOSH_PACKAGE_VERSION\" >> \"$BOSH_INSTALL_TARGET/built.txt\"\n\
            printf '#!/bin/sh\\n' > \"$BOSH_INSTALL_TARGET/bin/app\"\n\
            chmod 755 \"$BOSH_INSTALL_TARGET/bin/app\"\n\
            echo done\n";
        let src_sha = fx
            .blobs
            .put_bytes(&tgz(&[
                ("packaging", packaging, 0o644),
                ("src/extra.txt", "extra\n", 0o644),
            ]))
            .unwrap();
        let req = CompileRequest {
            name: "app".into(),
            fingerprint: "fp-app".into(),
            source_sha256: src_sha.clone(),
            dependencies: vec![PackageRef {
                name: "lib".into(),
                fingerprint: "fp-lib".into(),
                sha256: dep_sha,
            }],
            timeout_secs: 30,
        };
        let res = fx.agent.compile_package(req.clone()).await.unwrap();
        assert!(res.output_tail.contains("done"), "{}", res.output_tail);
        let data = fx.blobs.read(&res.sha256).unwrap();
        assert_eq!(res.size, data.len() as u64);
        let files = untar(&data);
        assert_eq!(files["built.txt"], "hello from lib\nextra\napp fp-app\n");
        assert!(files.contains_key("bin/app"));
        assert!(
            files
                .keys()
                .all(|k| !k.starts_with('/') && !k.contains("vcap")),
            "{files:?}"
        );

        // Deterministic: compiling again gives the same blob.
        let again = fx.agent.compile_package(req.clone()).await.unwrap();
        assert_eq!(again.sha256, res.sha256);

        // Missing source blob.
        let mut missing = req.clone();
        missing.source_sha256 = "cd".repeat(32);
        let err = fx.agent.compile_package(missing).await.unwrap_err();
        assert_eq!(err.kind, "missing_blob");
    }

    #[tokio::test]
    async fn failing_packaging_returns_compile_failed_with_tail() {
        let fx = fixture();
        let packaging = "for i in $(seq 1 100); do echo line$i; done\necho oops >&2\nexit 3\n";
        let src_sha = fx
            .blobs
            .put_bytes(&tgz(&[("packaging", packaging, 0o644)]))
            .unwrap();
        let err = fx
            .agent
            .compile_package(CompileRequest {
                name: "broken".into(),
                fingerprint: "fp".into(),
                source_sha256: src_sha,
                dependencies: vec![],
                timeout_secs: 30,
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind, "compile_failed");
        assert_eq!(err.message, "compiling package broken failed (exit 3)");
        let tail = err.output_tail.unwrap();
        assert_eq!(tail.lines().count(), 40);
        assert!(tail.starts_with("line62"), "{tail}");
        assert!(tail.ends_with("oops"), "{tail}");
    }

    #[tokio::test]
    async fn a_disk_the_cpi_mounted_is_only_recorded() {
        let fx = fixture();
        let store = fx.root.join("store").display().to_string();
        fx.agent
            .mount_disk(MountDiskParams {
                cid: "vol-1".into(),
                hint: DiskHint { path: store },
            })
            .await
            .unwrap();
        assert_eq!(
            fx.agent.get_state().await.persistent_disk.as_deref(),
            Some("vol-1")
        );
        fx.agent
            .unmount_disk(UnmountDiskParams {
                cid: "vol-1".into(),
            })
            .await
            .unwrap();
        assert_eq!(fx.agent.get_state().await.persistent_disk, None);
    }

    #[tokio::test]
    async fn drain_says_whether_the_job_changes() {
        let fx = fixture();
        let j = job(
            "kv",
            vec![file(
                "bin/drain",
                "#!/bin/sh\necho \"$1\" >> \"$HOME/drain-args\"\necho 0\n",
            )],
        );
        fx.agent.apply(spec(1, vec![], vec![j])).await.unwrap();
        for changed in [vec!["kv".to_string()], vec![]] {
            fx.agent
                .drain(DrainParams {
                    kind: DrainKind::Update,
                    timeout_secs: 10,
                    changed_jobs: changed,
                    job_state: None,
                    next_job_state: None,
                })
                .await
                .unwrap();
        }
        let args = fs::read_to_string(fx.root.join("drain-args")).unwrap();
        assert_eq!(args, "job_changed\njob_unchanged\n");
    }

    #[tokio::test]
    async fn drain_static_and_dynamic() {
        let fx = fixture();
        let stat = job(
            "static",
            vec![file("bin/drain", "#!/bin/sh\necho draining >&2\necho 1\n")],
        );
        fx.agent.apply(spec(1, vec![], vec![stat])).await.unwrap();
        let t = Instant::now();
        let r = fx
            .agent
            .drain(DrainParams {
                kind: DrainKind::Update,
                timeout_secs: 10,
                changed_jobs: vec![],
                job_state: None,
                next_job_state: None,
            })
            .await
            .unwrap();
        assert_eq!(r.waited_secs, 1);
        assert!(t.elapsed() >= Duration::from_millis(950));

        let dynamic = job(
            "dynamic",
            vec![file(
                "bin/drain",
                "#!/bin/sh\necho \"$1\" >> \"$HOME/drain-args\"\nif [ \"$1\" = job_check_status ]; then echo 0; else echo -1; fi\n",
            )],
        );
        fx.agent
            .apply(spec(2, vec![], vec![dynamic]))
            .await
            .unwrap();
        let r = fx
            .agent
            .drain(DrainParams {
                kind: DrainKind::Shutdown,
                timeout_secs: 10,
                changed_jobs: vec![],
                job_state: None,
                next_job_state: None,
            })
            .await
            .unwrap();
        assert_eq!(r.waited_secs, 1);
        let args = fs::read_to_string(fx.root.join("drain-args")).unwrap();
        assert_eq!(args, "job_shutdown\njob_check_status\n");

        // Bounded by the timeout.
        let slow = job("slow", vec![file("bin/drain", "#!/bin/sh\necho 30\n")]);
        fx.agent.apply(spec(3, vec![], vec![slow])).await.unwrap();
        let r = fx
            .agent
            .drain(DrainParams {
                kind: DrainKind::Update,
                timeout_secs: 1,
                changed_jobs: vec![],
                job_state: None,
                next_job_state: None,
            })
            .await
            .unwrap();
        assert_eq!(r.waited_secs, 1);
    }

    #[tokio::test]
    async fn run_script_reports_exit_codes() {
        let fx = fixture();
        let a = job("a", vec![file("bin/post-start", "#!/bin/sh\necho ok\n")]);
        let b = job(
            "b",
            vec![file("bin/post-start", "#!/bin/sh\necho bad\nexit 4\n")],
        );
        let c = job("c", vec![file("config/x", "")]);
        fx.agent
            .apply(spec(1, vec![], vec![a, b, c]))
            .await
            .unwrap();
        let r = fx
            .agent
            .run_script(RunScriptParams {
                script: "post-start".into(),
                timeout_secs: 10,
                jobs: None,
                output_prefix: None,
                env: Default::default(),
            })
            .await
            .unwrap();
        assert_eq!(r.results.len(), 2);
        assert_eq!(
            (r.results[0].job.as_str(), r.results[0].exit_code),
            ("a", 0)
        );
        assert_eq!(r.results[0].output_tail, "ok");
        assert_eq!(
            (r.results[1].job.as_str(), r.results[1].exit_code),
            ("b", 4)
        );
        let err = fx
            .agent
            .run_script(RunScriptParams {
                script: "../x".into(),
                timeout_secs: 1,
                jobs: None,
                output_prefix: None,
                env: Default::default(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.kind, "invalid");
    }

    #[tokio::test]
    async fn streamed_script_output_is_left_whole_for_its_follower() {
        let fx = fixture();
        let e = job(
            "e",
            vec![file("bin/run", "#!/bin/sh\necho one\necho two >&2\n")],
        );
        fx.agent.apply(spec(1, vec![], vec![e])).await.unwrap();
        let run = |output_prefix: Option<&str>| RunScriptParams {
            script: "run".into(),
            timeout_secs: 10,
            jobs: None,
            output_prefix: output_prefix.map(str::to_string),
            env: Default::default(),
        };
        let r = fx.agent.run_script(run(Some("errand-x"))).await.unwrap();
        let out = fx.root.join("data/tmp/errand-x-e.out");
        let text = fs::read_to_string(&out).unwrap();
        assert_eq!(text, "one\ntwo\n");
        assert_eq!(r.results[0].output_bytes, text.len() as u64);
        // Without a prefix the output goes to a file of its own, removed.
        let r = fx.agent.run_script(run(None)).await.unwrap();
        assert_eq!(r.results[0].output_bytes, 8);
        let left: Vec<_> = fs::read_dir(fx.root.join("data/tmp"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, vec!["errand-x-e.out".to_string()]);
    }

    #[tokio::test]
    async fn handle_dispatches_ping_and_missing_blobs() {
        let fx = fixture();
        let have = fx.blobs.put_bytes(b"x").unwrap();
        let v = fx.agent.handle(Action::Ping).await.unwrap();
        assert_eq!(v["agent_id"], "agent-1");
        let v = fx
            .agent
            .handle(Action::MissingBlobs(crate::protocol::MissingBlobsParams {
                sha256s: vec![have, "ef".repeat(32)],
            }))
            .await
            .unwrap();
        assert_eq!(v, serde_json::json!(["ef".repeat(32)]));
        let v = fx.agent.handle(Action::GetState).await.unwrap();
        let st: AgentState = serde_json::from_value(v).unwrap();
        assert_eq!(st.generation, 0);
        assert!(st.vitals.mem_total_kb > 0);
        assert!(st.vitals.ephemeral_disk_percent.is_some());
    }

    #[tokio::test]
    async fn mount_and_unmount_disk() {
        let fx = fixture();
        let disk = fx.root.parent().unwrap().join("disk");
        fs::create_dir_all(&disk).unwrap();
        fs::write(disk.join("data"), "persisted").unwrap();
        let p = MountDiskParams {
            cid: "disk-1".into(),
            hint: DiskHint {
                path: disk.to_string_lossy().into_owned(),
            },
        };
        match fx.agent.mount_disk(p.clone()).await {
            Ok(()) => {}
            Err(e) if e.message.contains("CAP_SYS_ADMIN") => {
                eprintln!("skipping mount test: {}", e.message);
                return;
            }
            Err(e) => panic!("{e:?}"),
        }
        assert_eq!(
            fs::read_to_string(fx.root.join("store/data")).unwrap(),
            "persisted"
        );
        fx.agent.mount_disk(p.clone()).await.unwrap();
        assert_eq!(
            fx.agent.get_state().await.persistent_disk.as_deref(),
            Some("disk-1")
        );
        let mut other = p.clone();
        other.cid = "disk-2".into();
        assert_eq!(
            fx.agent.mount_disk(other).await.unwrap_err().kind,
            "invalid"
        );
        fx.agent
            .unmount_disk(UnmountDiskParams {
                cid: "disk-1".into(),
            })
            .await
            .unwrap();
        assert!(!fx.root.join("store/data").exists());
        assert_eq!(fx.agent.get_state().await.persistent_disk, None);
        fx.agent
            .unmount_disk(UnmountDiskParams {
                cid: "disk-1".into(),
            })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_job_laid_down_world_readable_is_rewritten() {
        let fx = fixture();
        let web = job("web", vec![file("config/web.conf", "password=1\n")]);
        let s1 = spec(1, vec![], vec![web.clone()]);
        fx.agent.apply(s1.clone()).await.unwrap();
        // As an older agent left it.
        let conf = fx.root.join("jobs/web/config/web.conf");
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(fx.root.join("jobs/web"), fs::Permissions::from_mode(0o755)).unwrap();
        fx.agent.apply(spec(2, vec![], vec![web])).await.unwrap();
        let mode = fs::metadata(&conf).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn packaging_outcomes() {
        let run = |exit_code, timed_out| ScriptRun {
            exit_code,
            output: "a\nb\n".into(),
            output_bytes: 4,
            timed_out,
        };
        assert_eq!(packaging_outcome("app", 5, &run(0, false)).unwrap(), "a\nb");
        let e = packaging_outcome("app", 5, &run(137, true)).unwrap_err();
        assert_eq!(e.kind, "compile_failed");
        assert_eq!(e.message, "compiling package app timed out after 5s");
        assert_eq!(e.output_tail.as_deref(), Some("a\nb"));
        let e = packaging_outcome("app", 5, &run(2, false)).unwrap_err();
        assert_eq!(e.kind, "compile_failed");
        assert_eq!(e.message, "compiling package app failed (exit 2)");
    }

    #[test]
    fn short_shas() {
        assert_eq!(short("0123456789abcdef"), "01234567..");
    }
}

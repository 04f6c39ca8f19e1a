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
//! It must not call the CPI or the director, must not speak the wire protocol
//! (that is `server`), must keep only what the applied spec names, and must
//! never log rendered files, environments or settings (they carry secrets).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bosun_cpi::{AgentSettings, DiskHint};
use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::blobs::BlobStore;
use crate::protocol::{
    Action, ActionFailure, AgentState, ApplySpec, BpmConfig, CompileRequest, CompileResult,
    DrainKind, DrainParams, DrainResult, FetchLogsParams, FetchLogsResult, InstallFileParams,
    JobStatus, MountDiskParams, PingResult, ProcessState, RenderedJob, RestartJobsParams,
    RunScriptParams, ScriptResult, ScriptResults, UnmountDiskParams, UnpackDiskParams, Vitals,
    PROTOCOL_VERSION,
};
use crate::server::{self, ActionHandler};
use crate::supervisor::{self, Supervisor, DEFAULT_PATH};

/// Lines of output kept from a failed pre-start / lifecycle script.
const SCRIPT_TAIL_LINES: usize = 30;
/// Lines of an errand's (`bin/run`) output returned to the director.
const ERRAND_TAIL_LINES: usize = 2000;
/// Lines of output kept from a packaging script.
const COMPILE_TAIL_LINES: usize = 40;
/// Bytes of script output read back (the tail is cut from these).
const OUTPUT_READ_BYTES: u64 = 64 * 1024;
/// Rendered job files (templates carry secrets): owner and group only.
const JOB_FILE_MODE: u32 = 0o640;
/// Executables of a job (`bin/` and files rendered executable).
const JOB_EXEC_MODE: u32 = 0o750;
/// A job's directories (`jobs/<name>` and below).
const JOB_DIR_MODE: u32 = 0o750;
/// The group given read access to rendered job files, where the VM has it
/// (BOSH's stemcells do); elsewhere they stay the agent's (root's) alone.
const JOB_GROUP: &str = "vcap";
/// Where [`JOB_GROUP`] is looked up.
const GROUP_FILE: &str = "/etc/group";

/// Why the agent could not start or run (action failures are
/// [`ActionFailure`]s instead).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("reading agent settings {path}: {message}")]
    Settings { path: PathBuf, message: String },
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("loading applied spec {path}: {message}")]
    Spec { path: PathBuf, message: String },
    #[error("opening blob store {path}: {message}")]
    Blobs { path: PathBuf, message: String },
    #[error("agent server failed: {0}")]
    Server(String),
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

/// The action handler. Mutating actions are serialized; `ping` and
/// `get_state` answer while one runs.
/// The persistent disk mount point on a VM.
const VCAP_STORE: &str = "/var/vcap/store";

pub struct Agent {
    settings: AgentSettings,
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

/// A name usable as one path component (jobs, packages, processes, scripts).
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('.')
        && !s.contains('/')
        && !s.contains('\0')
}

/// A relative path without `..`, absolute or empty components.
fn valid_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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
        let mut plans: Vec<(RenderedJob, PathBuf, BpmConfig)> = Vec::new();
        for job in &spec.jobs {
            let dir = self.root.join("jobs").join(&job.name);
            let bpm_path = dir.join("config/bpm.yml");
            let cfg = match fs::read_to_string(&bpm_path) {
                Ok(text) => serde_yaml_ng::from_str::<BpmConfig>(&text).map_err(|e| {
                    failure(
                        "invalid",
                        format!(
                            "starting job {}: parsing {}: {e}",
                            job.name,
                            bpm_path.display()
                        ),
                    )
                })?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => BpmConfig {
                    processes: Vec::new(),
                },
                Err(e) => {
                    return Err(failure(
                        "io",
                        format!(
                            "starting job {}: reading {}: {e}",
                            job.name,
                            bpm_path.display()
                        ),
                    ))
                }
            };
            let same = lock(&self.started).get(&job.name) == Some(&job.digest);
            if same && self.supervisor.is_wanted(&job.name).await {
                continue;
            }
            plans.push((job.clone(), dir, cfg));
        }
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
        for (job, dir, cfg) in &plans {
            self.supervisor
                .start_job(&job.name, dir, cfg)
                .await
                .map_err(|e| failure("invalid", format!("starting job {}: {e}", job.name)))?;
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

    /// `compile_package`.
    pub async fn compile_package(&self, r: CompileRequest) -> Result<CompileResult, ActionFailure> {
        let _g = self.ops.lock().await;
        let op = format!("compiling package {}", r.name);
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
        let root = self.root.clone();
        let blobs = self.blobs.clone();
        let req = r.clone();
        let op2 = op.clone();
        let (compile_dir, install) = blocking(&op, move || {
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
        .await?;

        let bash = ["/bin/bash", "/usr/bin/bash"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("bash");
        let mut cmd = Command::new(bash);
        cmd.arg("-e").arg("packaging").current_dir(&compile_dir);
        let env: Vec<(String, String)> = vec![
            (
                "BOSH_COMPILE_TARGET".into(),
                compile_dir.to_string_lossy().into_owned(),
            ),
            (
                "BOSH_INSTALL_TARGET".into(),
                install.to_string_lossy().into_owned(),
            ),
            (
                "BOSH_PACKAGES_DIR".into(),
                self.root.join("packages").to_string_lossy().into_owned(),
            ),
            ("BOSH_PACKAGE_NAME".into(), r.name.clone()),
            ("BOSH_PACKAGE_VERSION".into(), r.fingerprint.clone()),
        ];
        self.base_env(&mut cmd, &env);
        tracing::info!(package = %r.name, "compiling package");
        let run = run_command(
            cmd,
            &self.root.join("data/tmp"),
            Some(Duration::from_secs(r.timeout_secs)),
            None,
        )
        .await
        .map_err(io_fail(format!("{op}: running packaging")))?;
        let tail = tail_lines(&run.output, COMPILE_TAIL_LINES);
        if run.timed_out {
            return Err(ActionFailure {
                kind: "compile_failed".into(),
                message: format!(
                    "compiling package {} timed out after {}s",
                    r.name, r.timeout_secs
                ),
                output_tail: Some(tail),
            });
        }
        if run.exit_code != 0 {
            return Err(ActionFailure {
                kind: "compile_failed".into(),
                message: format!(
                    "compiling package {} failed (exit {})",
                    r.name, run.exit_code
                ),
                output_tail: Some(tail),
            });
        }
        let tmp =
            self.root
                .join("data/tmp")
                .join(format!("compiled-{}-{}.tgz", r.name, rand_suffix()));
        let blobs = self.blobs.clone();
        let op2 = op.clone();
        let (sha256, size) = blocking(&op, move || {
            let res = (|| {
                write_tgz(&tmp, &[(install.clone(), PathBuf::new(), false)])
                    .map_err(io_fail(format!("{op2}: packing install target")))?;
                let size = fs::metadata(&tmp)
                    .map_err(io_fail(format!("{op2}: reading packed size")))?
                    .len();
                let sha = blobs
                    .put_file(&tmp)
                    .map_err(|e| failure("io", format!("{op2}: storing compiled blob: {e}")))?;
                Ok((sha, size))
            })();
            let _ = fs::remove_file(&tmp);
            let _ = remove_any(&install);
            let _ = remove_any(&compile_dir);
            res
        })
        .await?;
        tracing::info!(package = %r.name, sha256 = %sha256, size, "compiled package");
        Ok(CompileResult {
            sha256,
            size,
            output_tail: tail,
        })
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

    /// `mount_disk`: bind-mount `p.hint.path` (or mount a block device) at
    /// `<root>/store`; idempotent for the same cid.
    pub async fn mount_disk(&self, p: MountDiskParams) -> Result<(), ActionFailure> {
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

    fn base_env(&self, cmd: &mut Command, extra: &[(String, String)]) {
        self.script_ctx().env(cmd, extra);
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

/// Entry point of `bosun agent --settings FILE`.
pub async fn run_from_settings_file(path: &Path) -> Result<(), AgentError> {
    let text = fs::read_to_string(path).map_err(|e| AgentError::Settings {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let settings: AgentSettings =
        serde_json::from_str(&text).map_err(|e| AgentError::Settings {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    run_with_root(settings, PathBuf::from("/var/vcap")).await
}

/// [`run_from_settings_file`] with an explicit root (for tests and odd hosts).
pub async fn run_with_root(settings: AgentSettings, root: PathBuf) -> Result<(), AgentError> {
    let blob_root = root.join("data/blobs");
    fs::create_dir_all(&blob_root)
        .map_err(agent_io(format!("creating {}", blob_root.display())))?;
    let blobs = Arc::new(
        BlobStore::open(blob_root.clone()).map_err(|e| AgentError::Blobs {
            path: blob_root.clone(),
            message: e.to_string(),
        })?,
    );
    let agent = Arc::new(Agent::new(settings.clone(), root, blobs.clone())?);
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
        r = server::serve(&settings, blobs, handler) => r.map_err(|e| AgentError::Server(e.to_string())),
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

/// A disk hint from settings: `"path"` or `{"path": "..."}`.
fn disk_hint_path(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("path")?.as_str().map(str::to_string),
        _ => None,
    }
}

// ---------------------------------------------------------------- scripts

/// What a script run produced.
struct ScriptRun {
    exit_code: i32,
    /// Combined stdout+stderr (its last 64 KiB).
    output: String,
    timed_out: bool,
}

/// What a job script needs, cheap to move into a task.
#[derive(Clone)]
struct ScriptCtx {
    root: PathBuf,
}

impl ScriptCtx {
    fn env(&self, cmd: &mut Command, extra: &[(String, String)]) {
        cmd.env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &self.root)
            .env("LANG", "C.UTF-8");
        for (k, v) in extra {
            cmd.env(k, v);
        }
    }

    /// Runs `<dir>/bin/<script> args...` in `dir`; its output is also
    /// appended to `sys/log/<job>/<script>.log`.
    async fn run(
        &self,
        job: &str,
        dir: &Path,
        script: &str,
        args: &[&str],
        env: &[(String, String)],
        timeout: Option<Duration>,
    ) -> Result<ScriptRun, ActionFailure> {
        self.run_to(job, dir, script, (args, env), timeout, None)
            .await
    }

    /// [`ScriptCtx::run`], the output written as it comes to `out_name`
    /// under `data/tmp` when given (else a random name there).
    async fn run_to(
        &self,
        job: &str,
        dir: &Path,
        script: &str,
        (args, env): (&[&str], &[(String, String)]),
        timeout: Option<Duration>,
        out_name: Option<&str>,
    ) -> Result<ScriptRun, ActionFailure> {
        let mut cmd = Command::new(dir.join("bin").join(script));
        cmd.args(args).current_dir(dir);
        self.env(&mut cmd, env);
        let run = run_command(cmd, &self.root.join("data/tmp"), timeout, out_name)
            .await
            .map_err(io_fail(format!("running job {job} {script}")))?;
        let log_dir = self.root.join("sys/log").join(job);
        if fs::create_dir_all(&log_dir).is_ok() {
            if let Ok(mut f) = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_dir.join(format!("{script}.log")))
            {
                let _ = f.write_all(run.output.as_bytes());
            }
        }
        Ok(run)
    }
}

/// Spawns `cmd` in its own process group with stdout+stderr into one file
/// under `tmp_dir`, waits (killing the group on timeout) and reads the output.
async fn run_command(
    mut cmd: Command,
    tmp_dir: &Path,
    timeout: Option<Duration>,
    out_name: Option<&str>,
) -> io::Result<ScriptRun> {
    fs::create_dir_all(tmp_dir)?;
    let out_path = match out_name {
        Some(n) => tmp_dir.join(n),
        None => tmp_dir.join(format!("script-{}.log", rand_suffix())),
    };
    let out = fs::OpenOptions::new()
        .create(true)
        .truncate(out_name.is_some())
        .append(out_name.is_none())
        .write(true)
        .read(true)
        .open(&out_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out.try_clone()?))
        .process_group(0)
        .kill_on_drop(true);
    let result = async {
        let mut child = spawn_retrying(&mut cmd)?;
        let pid = child.id();
        let (status, timed_out) = match timeout {
            None => (child.wait().await?, false),
            Some(t) => match tokio::time::timeout(t, child.wait()).await {
                Ok(st) => (st?, false),
                Err(_) => {
                    if let Some(pid) = pid {
                        supervisor::kill_group(pid, libc::SIGKILL);
                    }
                    (child.wait().await?, true)
                }
            },
        };
        let exit_code = match status.code() {
            Some(c) => c,
            None => {
                use std::os::unix::process::ExitStatusExt;
                128 + status.signal().unwrap_or(0)
            }
        };
        let output = read_tail(&out_path)?;
        Ok(ScriptRun {
            exit_code,
            output,
            timed_out,
        })
    }
    .await;
    drop(out);
    let _ = fs::remove_file(&out_path);
    result
}

fn spawn_retrying(cmd: &mut Command) -> io::Result<tokio::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            // A just-written script may be briefly busy while another
            // thread's fork still holds its write descriptor.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            other => return other,
        }
    }
}

fn read_tail(path: &Path) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    if len > OUTPUT_READ_BYTES {
        f.seek(SeekFrom::Start(len - OUTPUT_READ_BYTES))?;
    }
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// One job's drain: run, then wait as it says; dynamic drains poll again
/// with `job_check_status` until they print a non-negative number.
async fn drain_job(
    ctx: ScriptCtx,
    (job, dir): (String, PathBuf),
    kind: DrainKind,
    changed: bool,
    env: Vec<(String, String)>,
    deadline: Instant,
) -> Result<(), ActionFailure> {
    let first = match kind {
        DrainKind::Update if changed => "job_changed",
        DrainKind::Update => "job_unchanged",
        DrainKind::Shutdown => "job_shutdown",
    };
    let mut args = [first, "hash_unchanged"];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            tracing::warn!(job = %job, "drain timed out");
            return Ok(());
        }
        let run = ctx
            .run(&job, &dir, "drain", &args, &env, Some(remaining))
            .await?;
        if run.timed_out {
            tracing::warn!(job = %job, "drain script timed out");
            return Ok(());
        }
        let fail = |msg: String| ActionFailure {
            kind: "script_failed".into(),
            message: msg,
            output_tail: Some(tail_lines(&run.output, SCRIPT_TAIL_LINES)),
        };
        if run.exit_code != 0 {
            return Err(fail(format!(
                "draining job {job}: drain failed (exit {})",
                run.exit_code
            )));
        }
        let n: i64 = run
            .output
            .lines()
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .and_then(|l| l.parse().ok())
            .ok_or_else(|| {
                fail(format!(
                    "draining job {job}: drain did not print an integer"
                ))
            })?;
        let wait = Duration::from_secs(n.unsigned_abs());
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(wait.min(remaining)).await;
        if n >= 0 {
            return Ok(());
        }
        args = ["job_check_status", "hash_unchanged"];
    }
}

// ---------------------------------------------------------------- files

fn validate_spec(spec: &ApplySpec) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for p in &spec.packages {
        if !valid_name(&p.name) {
            return Err(format!("invalid package name {:?}", p.name));
        }
        if !seen.insert(&p.name) {
            return Err(format!("package {} named twice", p.name));
        }
        if p.sha256.is_empty() || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("package {}: invalid sha256", p.name));
        }
    }
    let mut seen = BTreeSet::new();
    for j in &spec.jobs {
        if !valid_name(&j.name) {
            return Err(format!("invalid job name {:?}", j.name));
        }
        if !seen.insert(&j.name) {
            return Err(format!("job {} named twice", j.name));
        }
        for f in &j.files {
            if !valid_rel_path(&f.path) {
                return Err(format!("job {}: invalid file path {:?}", j.name, f.path));
            }
        }
    }
    Ok(())
}

/// Installs packages, writes changed jobs, removes what the spec no longer names.
fn lay_down(
    root: &Path,
    blobs: &BlobStore,
    spec: &ApplySpec,
    current: Option<&ApplySpec>,
    op: &str,
) -> Result<(), ActionFailure> {
    for p in &spec.packages {
        install_package(root, blobs, &p.name, &p.sha256).map_err(io_fail(format!(
            "{op}: installing package {} blob {}",
            p.name,
            short(&p.sha256)
        )))?;
    }
    let jobs_dir = root.join("jobs");
    let group = group_id(Path::new(GROUP_FILE), JOB_GROUP).map_err(io_fail(format!(
        "{op}: looking up group {JOB_GROUP} in {GROUP_FILE}"
    )))?;
    for j in &spec.jobs {
        let unchanged = current
            .and_then(|c| c.jobs.iter().find(|o| o.name == j.name))
            .is_some_and(|o| o == j)
            && job_dir_is_current(&jobs_dir.join(&j.name), group);
        if !unchanged {
            write_job(&jobs_dir, j, group)
                .map_err(io_fail(format!("{op}: writing job {}", j.name)))?;
        }
    }

    // Jobs the spec does not name (their processes are already stopped), and
    // leftovers of interrupted swaps.
    let named_jobs: BTreeSet<&str> = spec.jobs.iter().map(|j| j.name.as_str()).collect();
    for e in fs::read_dir(&jobs_dir)
        .map_err(io_fail(format!("{op}: listing jobs")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !named_jobs.contains(name.as_str()) {
            remove_any(&e.path()).map_err(io_fail(format!("{op}: removing job {name}")))?;
        }
    }

    // Packages: keep the spec's versions (and the previous spec's, which
    // running processes of changed jobs may still use until restarted).
    let mut keep: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in &spec.packages {
        keep.entry(&p.name).or_default().insert(&p.sha256);
    }
    let links = root.join("packages");
    for e in fs::read_dir(&links)
        .map_err(io_fail(format!("{op}: listing packages")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains_key(name.as_str()) {
            remove_any(&e.path()).map_err(io_fail(format!("{op}: removing package {name}")))?;
        }
    }
    if let Some(cur) = current {
        for p in &cur.packages {
            if let Some(k) = keep.get_mut(p.name.as_str()) {
                k.insert(&p.sha256);
            }
        }
    }
    let store = root.join("data/packages");
    for e in fs::read_dir(&store)
        .map_err(io_fail(format!("{op}: listing package store")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        match keep.get(name.as_str()) {
            None => {
                remove_any(&e.path()).map_err(io_fail(format!("{op}: removing package {name}")))?
            }
            Some(shas) => {
                for v in fs::read_dir(e.path())
                    .map_err(io_fail(format!("{op}: listing package {name}")))?
                    .flatten()
                {
                    let sha = v.file_name().to_string_lossy().into_owned();
                    if !shas.contains(sha.as_str()) {
                        remove_any(&v.path()).map_err(io_fail(format!(
                            "{op}: removing package {name} version {}",
                            short(&sha)
                        )))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unpacks a package blob to `data/packages/<name>/<sha>` (once) and points
/// `packages/<name>` at it atomically.
fn install_package(root: &Path, blobs: &BlobStore, name: &str, sha: &str) -> io::Result<()> {
    let store = root.join("data/packages").join(name);
    fs::create_dir_all(&store)?;
    let target = store.join(sha);
    if !target.is_dir() {
        let tmp = store.join(format!(".tmp-{}", rand_suffix()));
        fs::create_dir_all(&tmp)?;
        if let Err(e) = unpack_tgz(&blobs.path(sha), &tmp).and_then(|()| fs::rename(&tmp, &target))
        {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
    }
    let link = root.join("packages").join(name);
    if let Ok(md) = fs::symlink_metadata(&link) {
        if md.file_type().is_symlink()
            && fs::read_link(&link).ok().as_deref() == Some(target.as_path())
        {
            return Ok(());
        }
        if !md.file_type().is_symlink() {
            // A compilation install target, or junk: make room for the link.
            remove_any(&link)?;
        }
    }
    let tmp_link = root
        .join("packages")
        .join(format!(".{name}.link-{}", rand_suffix()));
    std::os::unix::fs::symlink(&target, &tmp_link)?;
    if let Err(e) = fs::rename(&tmp_link, &link) {
        let _ = fs::remove_file(&tmp_link);
        return Err(e);
    }
    Ok(())
}

/// The gid of `name` in a group file (`name:x:gid:members` lines); None
/// when the file or the group does not exist.
fn group_id(group_file: &Path, name: &str) -> io::Result<Option<u32>> {
    let text = match fs::read_to_string(group_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1)?.trim().parse().ok())
            .flatten()
    }))
}

/// Whether a job directory exists with the mode (and group) this agent lays
/// job directories down with; one written otherwise (by an older agent)
/// is rewritten.
fn job_dir_is_current(dir: &Path, group: Option<u32>) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(dir).is_ok_and(|md| {
        md.is_dir() && md.mode() & 0o7777 == JOB_DIR_MODE && group.is_none_or(|gid| md.gid() == gid)
    })
}

/// Gives a job's file or directory to `group` (owner unchanged: the agent,
/// root) and sets its mode, in that order (chown clears set-id bits).
fn restrict(path: &Path, group: Option<u32>, mode: u32) -> io::Result<()> {
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Creates the directories from `base` down to `dir` that do not exist yet,
/// each [`JOB_DIR_MODE`] and given to `group`.
fn make_job_dirs(base: &Path, dir: &Path, group: Option<u32>) -> io::Result<()> {
    let Ok(rel) = dir.strip_prefix(base) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not under {}", dir.display(), base.display()),
        ));
    };
    let mut at = base.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match fs::DirBuilder::new().mode(0o700).create(&at) {
            Ok(()) => restrict(&at, group, JOB_DIR_MODE)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a job's files to a fresh dir and swaps it in as `jobs/<name>`.
/// Files are [`JOB_FILE_MODE`] ([`JOB_EXEC_MODE`] for executables) and
/// directories [`JOB_DIR_MODE`], owned by the agent with group `group`;
/// nothing is readable by others at any moment (the fresh dir is 0700 until
/// complete).
fn write_job(jobs_dir: &Path, job: &RenderedJob, group: Option<u32>) -> io::Result<()> {
    let fresh = jobs_dir.join(format!(".{}.new-{}", job.name, rand_suffix()));
    let res = (|| {
        fs::DirBuilder::new().mode(0o700).create(&fresh)?;
        for f in &job.files {
            let path = fresh.join(&f.path);
            if let Some(parent) = path.parent() {
                make_job_dirs(&fresh, parent, group)?;
            }
            let exec = f.executable || Path::new(&f.path).starts_with("bin");
            let mode = if exec { JOB_EXEC_MODE } else { JOB_FILE_MODE };
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            out.write_all(f.content.as_bytes())?;
            if let Some(gid) = group {
                std::os::unix::fs::fchown(&out, None, Some(gid))?;
            }
            out.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        restrict(&fresh, group, JOB_DIR_MODE)?;
        let dest = jobs_dir.join(&job.name);
        if fs::symlink_metadata(&dest).is_ok() {
            if rename_exchange(&fresh, &dest).is_ok() {
                // `fresh` now holds the old contents.
                return fs::remove_dir_all(&fresh);
            }
            let old = jobs_dir.join(format!(".{}.old-{}", job.name, rand_suffix()));
            fs::rename(&dest, &old)?;
            fs::rename(&fresh, &dest)?;
            remove_any(&old)
        } else {
            fs::rename(&fresh, &dest)
        }
    })();
    if res.is_err() {
        let _ = remove_any(&fresh);
    }
    res
}

fn cpath(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Atomically exchanges two paths (renameat2 RENAME_EXCHANGE).
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    const RENAME_EXCHANGE: libc::c_uint = 2;
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: renameat2 with valid NUL-terminated paths.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes a file, symlink (not its target) or directory tree; absent is fine.
fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", rand_suffix()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Have `write` make a file at `tmp`, keep it as a blob, remove `tmp`
/// whatever happened: the blob's sha256 and size.
fn blob_from_tmp(
    blobs: &BlobStore,
    tmp: &Path,
    op: &str,
    write: impl FnOnce(&Path) -> Result<(), ActionFailure>,
) -> Result<FetchLogsResult, ActionFailure> {
    let res = (|| {
        if let Some(d) = tmp.parent() {
            fs::create_dir_all(d).map_err(io_fail(op))?;
        }
        write(tmp)?;
        let size = fs::metadata(tmp).map_err(io_fail(op))?.len();
        let sha256 = blobs
            .put_file(tmp)
            .map_err(|e| failure("io", format!("{op}: storing blob: {e}")))?;
        Ok(FetchLogsResult { sha256, size })
    })();
    let _ = fs::remove_file(tmp);
    res
}

fn unpack_tgz(src: &Path, dest: &Path) -> io::Result<()> {
    let f = File::open(src)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(f)));
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    ar.unpack(dest)
}

/// Writes a deterministic tgz: for each `(dir, prefix, include_root)`, the
/// tree under `dir` with paths `prefix/<relative>`, sorted, mtimes and owners
/// zeroed.
fn write_tgz(out: &Path, trees: &[(PathBuf, PathBuf, bool)]) -> io::Result<()> {
    let f = File::create(out)?;
    let gz = flate2::write::GzEncoder::new(BufWriter::new(f), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    b.follow_symlinks(false);
    for (dir, prefix, include_root) in trees {
        if *include_root && !prefix.as_os_str().is_empty() {
            let md = fs::metadata(dir)?;
            append_dir_entry(&mut b, prefix, md.permissions().mode())?;
        }
        append_tree(&mut b, dir, prefix)?;
    }
    let gz = b.into_inner()?;
    let w = gz.finish()?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()
}

fn new_header(mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(mode & 0o7777);
    h
}

fn append_dir_entry<W: Write>(b: &mut tar::Builder<W>, name: &Path, mode: u32) -> io::Result<()> {
    let mut h = new_header(mode);
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    b.append_data(&mut h, name, io::empty())
}

fn append_tree<W: Write>(b: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = rel.join(e.file_name());
        let path = e.path();
        let md = fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        let mode = md.permissions().mode();
        if ft.is_dir() {
            append_dir_entry(b, &name, mode)?;
            append_tree(b, &path, &name)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = new_header(mode);
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &name, &target)?;
        } else if ft.is_file() {
            let size = md.len();
            let mut h = new_header(mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(size);
            // Exactly `size` bytes even if the file grows or shrinks meanwhile
            // (logs are being written).
            let data = File::open(&path)?
                .take(size)
                .chain(io::repeat(0))
                .take(size);
            b.append_data(&mut h, &name, data)?;
        }
        // Sockets, fifos and devices are skipped.
    }
    Ok(())
}

// ---------------------------------------------------------------- mounts & vitals

fn sys_mount(
    src: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let (cs, ct) = (cpath(src)?, cpath(target)?);
    let cf = fstype
        .map(|f| {
            std::ffi::CString::new(f).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        })
        .transpose()?;
    // SAFETY: mount(2) with valid NUL-terminated strings (or NULL fstype/data).
    let rc = unsafe {
        libc::mount(
            cs.as_ptr(),
            ct.as_ptr(),
            cf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts an ext4 block device, formatting it first only when `blkid` says it
/// carries no filesystem at all.
async fn mount_block_device(dev: &Path, target: &Path) -> Result<(), String> {
    if sys_mount(dev, target, Some("ext4"), 0).is_ok() {
        return Ok(());
    }
    let probe = Command::new("blkid")
        .arg("-p")
        .arg(dev)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("probing {} with blkid: {e}", dev.display()))?;
    if probe.code() != Some(2) {
        return Err(format!(
            "{} has a filesystem that does not mount as ext4",
            dev.display()
        ));
    }
    let mkfs = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(dev)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("formatting {}: {e}", dev.display()))?;
    if !mkfs.success() {
        return Err(format!("formatting {} failed ({mkfs})", dev.display()));
    }
    sys_mount(dev, target, Some("ext4"), 0).map_err(|e| format!("mounting {}: {e}", dev.display()))
}

/// Whether `path` is a mount point, per /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)) == canon)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_loadavg() -> Option<[f64; 3]> {
    let s = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

fn read_meminfo() -> Vitals {
    let mut total = 0;
    let mut avail = None;
    let mut free = 0;
    if let Ok(s) = fs::read_to_string("/proc/meminfo") {
        for l in s.lines() {
            let mut it = l.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "MemTotal:" => total = v,
                "MemAvailable:" => avail = Some(v),
                "MemFree:" => free = v,
                _ => {}
            }
        }
    }
    Vitals {
        mem_total_kb: total,
        mem_used_kb: total.saturating_sub(avail.unwrap_or(free)),
        ..Vitals::default()
    }
}

/// Percent used of the filesystem holding `path` (df's formula).
fn disk_percent(path: &Path) -> Option<u8> {
    let c = cpath(path).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and struct pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
    let denom = used + st.f_bavail as u64;
    if denom == 0 {
        return Some(0);
    }
    Some(((used * 100).div_ceil(denom)).min(100) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{PackageRef, RenderedFile};

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

    fn file(path: &str, content: &str) -> RenderedFile {
        RenderedFile {
            path: path.into(),
            content: content.into(),
            executable: false,
        }
    }

    fn job(name: &str, files: Vec<RenderedFile>) -> RenderedJob {
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

        let bad = job(
            "bad",
            vec![file("config/bpm.yml", "processes: [{name: x, bogus: 1}]\n")],
        );
        fx.agent.apply(spec(2, vec![], vec![bad])).await.unwrap();
        let err = fx.agent.start().await.unwrap_err();
        assert_eq!(err.kind, "invalid");
        assert!(
            err.message.contains("job bad") && err.message.contains("bpm.yml"),
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

    #[test]
    fn job_files_are_for_owner_and_group_only() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let jobs = tmp.path().join("jobs");
        fs::create_dir(&jobs).unwrap();
        let mut run = file("bin/run", "#!/bin/sh\n");
        run.executable = false;
        let mut tool = file("libexec/tool", "#!/bin/sh\n");
        tool.executable = true;
        let kv = job(
            "kv",
            vec![
                file("config/deep/er/secret.conf", "password=s3cr3t\n"),
                run,
                tool,
            ],
        );
        // nogroup's gid: any group the test (root) can give files to.
        let gid = 65534;
        write_job(&jobs, &kv, Some(gid)).unwrap();
        let md = |p: &str| fs::symlink_metadata(jobs.join("kv").join(p)).unwrap();
        for (p, mode) in [
            ("", 0o750),
            ("config", 0o750),
            ("config/deep", 0o750),
            ("config/deep/er", 0o750),
            ("config/deep/er/secret.conf", 0o640),
            ("bin", 0o750),
            ("bin/run", 0o750),
            ("libexec/tool", 0o750),
        ] {
            assert_eq!(md(p).mode() & 0o7777, mode, "mode of {p:?}");
            assert_eq!(md(p).gid(), gid, "group of {p:?}");
        }
        assert!(job_dir_is_current(&jobs.join("kv"), Some(gid)));
        assert!(!job_dir_is_current(&jobs.join("kv"), Some(gid + 1)));
        // Without the group, files stay the agent's own group.
        write_job(&jobs, &kv, None).unwrap();
        let own = fs::metadata(&jobs).unwrap().gid();
        assert_eq!(md("config/deep/er/secret.conf").gid(), own);
        assert_eq!(md("config/deep/er/secret.conf").mode() & 0o777, 0o640);
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
    fn group_ids_from_a_group_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("group");
        fs::write(
            &f,
            "root:x:0:\nvcapx:x:7:\nvcap:x:1000:alice,bob\nbroken:x\n",
        )
        .unwrap();
        assert_eq!(group_id(&f, "vcap").unwrap(), Some(1000));
        assert_eq!(group_id(&f, "root").unwrap(), Some(0));
        assert_eq!(group_id(&f, "vca").unwrap(), None);
        assert_eq!(group_id(&f, "broken").unwrap(), None);
        assert_eq!(group_id(&tmp.path().join("none"), "vcap").unwrap(), None);
    }

    #[test]
    fn helpers() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
        assert_eq!(short("0123456789abcdef"), "01234567..");
        assert!(valid_rel_path("bin/ctl"));
        assert!(!valid_rel_path("/etc/passwd"));
        assert!(!valid_rel_path("a/../../b"));
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(
            disk_hint_path(&serde_json::json!({"path": "/dev/sdb"})).as_deref(),
            Some("/dev/sdb")
        );
        assert_eq!(
            disk_hint_path(&serde_json::json!("/x")).as_deref(),
            Some("/x")
        );
    }
}

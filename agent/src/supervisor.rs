//! The process supervisor: runs every process of a job, in either of the
//! two forms a BOSH job may declare, restarts it with exponential backoff
//! when it dies while wanted, probes its health, and stops it.
//!
//! - bpm processes (from `config/bpm.yml`): spawned directly, with the
//!   limits the config asks for, after its `pre_start` hook; stopped with its
//!   shutdown signal to its process group, SIGKILL after its shutdown
//!   timeout. Output is appended to `<root>/sys/log/<job>/<process>.{stdout,stderr}.log`;
//!   the pid is written to `<root>/sys/run/<job>/<process>.pid`.
//! - monit ctl processes: the start program runs under `/bin/sh -c` (working
//!   directory `/`, bosh's PATH, as the user and group its `as uid X and
//!   gid Y` names, looked up in the VM's own `/etc`), the agent waits for the pidfile to name a
//!   live pid and watches it; stop runs the stop program, waits, then
//!   SIGKILLs. The programs' own output goes to `<process>.ctl.log`.
//! - monit file checks: the start program (if any) runs, and the entry is
//!   running while the path exists.
//!
//! A process starts after the ones it depends on (of its job, or of jobs
//! started before it) and stops before them. One loop serves every form;
//! only launching, watching and stopping differ.
//!
//! It owns only the processes it spawned. It must not lay down files, read
//! specs, or decide *when* jobs start or stop: the agent tells it. It never
//! logs process environments (they may carry secrets).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::monit::Program;
use crate::protocol::{
    BpmConfig, BpmProcess, HealthProbe, JobStatus, ProcessState, ProcessStatus, ShutdownSignal,
};

/// First restart delay.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest restart delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Uptime after which a crash starts again from [`BACKOFF_START`].
const GOOD_UPTIME: Duration = Duration::from_secs(30);
/// Default seconds between the shutdown signal and SIGKILL.
const DEFAULT_SHUTDOWN_SECS: u64 = 10;
/// Monit's default timeout of a start or stop program (and of the wait for
/// the process to come up or go away).
const DEFAULT_PROGRAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a bpm `pre_start` hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a ctl pid and a checked file are looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);
/// Interval and timeout of health probes.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Lines of a failed hook's output kept in its error.
const HOOK_TAIL_LINES: usize = 30;

/// The PATH every supervised process and agent-run script gets.
pub(crate) const DEFAULT_PATH: &str =
    "/var/vcap/bosh/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why the supervisor refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("job {job}: invalid process config: {message}")]
    InvalidConfig { job: String, message: String },
    #[error("job {job}: {op}")]
    Io {
        job: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("job {job}: process {process}: pre_start hook {hook} failed: {message}")]
    PreStart {
        job: String,
        process: String,
        hook: PathBuf,
        message: String,
        /// The last lines of the hook's output.
        output_tail: String,
    },
}

/// One process of a job, as the agent hands it over.
#[derive(Clone, Debug, PartialEq)]
pub struct JobProcess {
    pub name: String,
    /// Processes of the same job this one starts after and stops before.
    pub depends_on: Vec<String>,
    pub kind: ProcessKind,
}

/// How a process is run.
#[derive(Clone, Debug, PartialEq)]
pub enum ProcessKind {
    /// A `bpm.yml` process, spawned and watched directly.
    Bpm(Box<BpmProcess>),
    /// A monit `check process` with a ctl start program.
    Ctl {
        pidfile: PathBuf,
        start: Program,
        stop: Option<Program>,
    },
    /// A monit `check file`: running while `path` exists.
    File {
        path: PathBuf,
        start: Option<Program>,
        stop: Option<Program>,
    },
}

impl JobProcess {
    /// Every process of a `bpm.yml`, in its order, without dependencies.
    pub fn from_bpm(cfg: &BpmConfig) -> Vec<JobProcess> {
        cfg.processes
            .iter()
            .map(|p| JobProcess {
                name: p.name.clone(),
                depends_on: Vec::new(),
                kind: ProcessKind::Bpm(Box::new(p.clone())),
            })
            .collect()
    }
}

/// A clone-able handle to the supervisor; all clones share the same processes.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

struct Inner {
    log_root: PathBuf,
    run_root: PathBuf,
    home: PathBuf,
    /// Serializes start/stop operations (held across their awaits).
    control: tokio::sync::Mutex<()>,
    /// The jobs; locked only briefly.
    jobs: Mutex<BTreeMap<String, JobEntry>>,
}

struct JobEntry {
    wanted: bool,
    procs: Vec<ProcEntry>,
}

struct ProcEntry {
    name: String,
    shared: Arc<Mutex<ProcShared>>,
    stop_tx: Arc<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
    /// Stop order within the job: wave 0 (nothing depends on it) stops first.
    wave: usize,
    /// Names of the processes it depends on (of this job or others).
    depends_on: Vec<String>,
}

#[derive(Default)]
struct ProcShared {
    wanted: bool,
    pid: Option<u32>,
    /// A file check: up without a pid.
    pidless: bool,
    started_at: Option<Instant>,
    healthy: bool,
    restarts: u32,
}

impl ProcShared {
    fn up(&self) -> bool {
        self.healthy && (self.pid.is_some() || self.pidless)
    }
}

/// Everything needed to (re)launch one process.
#[derive(Clone)]
struct ProcSpec {
    job: String,
    name: String,
    /// Where notes of the agent about this process go.
    note_log: PathBuf,
    runner: Runner,
}

#[derive(Clone)]
enum Runner {
    Direct(Box<DirectSpec>),
    Ctl {
        pidfile: PathBuf,
        start: Program,
        stop: Option<Program>,
        log: PathBuf,
    },
    File {
        path: PathBuf,
        start: Option<Program>,
        stop: Option<Program>,
        log: PathBuf,
    },
}

#[derive(Clone)]
struct DirectSpec {
    executable: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    pid_file: PathBuf,
    shutdown: Duration,
    signal: libc::c_int,
    health: Option<HealthProbe>,
    open_files: Option<u64>,
    max_processes: Option<u64>,
    /// Limit in bytes from `limits.memory`.
    memory: Option<u64>,
    /// The cgroup directory holding the memory limit, when one could be made.
    cgroup: Option<PathBuf>,
    pre_start: Option<PathBuf>,
}

impl ProcSpec {
    fn health(&self) -> Option<&HealthProbe> {
        match &self.runner {
            Runner::Direct(d) => d.health.as_ref(),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere; the data is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

impl Supervisor {
    /// `log_root` is `<root>/sys/log`; pid files go to the sibling `<root>/sys/run`.
    pub fn new(log_root: PathBuf) -> Supervisor {
        let sys = log_root.parent().map(Path::to_path_buf);
        let run_root = sys
            .as_ref()
            .map(|s| s.join("run"))
            .unwrap_or_else(|| log_root.join(".run"));
        let home = sys
            .as_ref()
            .and_then(|s| s.parent())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("/"));
        Supervisor {
            inner: Arc::new(Inner {
                log_root,
                run_root,
                home,
                control: tokio::sync::Mutex::new(()),
                jobs: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// (Re)starts every process of `job`; `procs` come in start order (each
    /// after what it depends on). bpm `pre_start` hooks run before anything
    /// is started and fail the start. A job with no processes counts as
    /// running while wanted.
    pub async fn start_job(
        &self,
        job: &str,
        job_dir: &Path,
        procs: &[JobProcess],
    ) -> Result<(), SupervisorError> {
        let specs = self.build_specs(job, job_dir, procs)?;
        let _guard = self.inner.control.lock().await;
        self.stop_locked(job).await;
        let io = |op: String| {
            let job = job.to_string();
            move |source| SupervisorError::Io { job, op, source }
        };
        let log_dir = self.inner.log_root.join(job);
        fs::create_dir_all(&log_dir)
            .map_err(io(format!("creating log dir {}", log_dir.display())))?;
        let run_dir = self.inner.run_root.join(job);
        fs::create_dir_all(&run_dir)
            .map_err(io(format!("creating run dir {}", run_dir.display())))?;
        for p in procs {
            if let ProcessKind::Bpm(b) = &p.kind {
                let mut dirs = Vec::new();
                if b.ephemeral_disk == Some(true) {
                    dirs.push(self.inner.home.join("data").join(job));
                }
                let store = self.inner.home.join("store");
                if b.persistent_disk == Some(true) && store.is_dir() {
                    dirs.push(store.join(job));
                }
                for d in dirs {
                    fs::create_dir_all(&d).map_err(io(format!(
                        "process {}: creating {}",
                        p.name,
                        d.display()
                    )))?;
                }
            }
        }
        let mut specs = specs;
        for spec in &mut specs {
            if let Runner::Direct(d) = &mut spec.runner {
                if let Some(bytes) = d.memory {
                    match memory_cgroup(job, &spec.name, bytes) {
                        Ok(dir) => d.cgroup = Some(dir),
                        Err(why) => tracing::warn!(
                            job,
                            process = %spec.name,
                            reason = %why,
                            "limits.memory is not enforced"
                        ),
                    }
                }
            }
        }
        for spec in &specs {
            if let Runner::Direct(d) = &spec.runner {
                if let Some(hook) = &d.pre_start {
                    run_hook(d, hook)
                        .await
                        .map_err(|f| SupervisorError::PreStart {
                            job: job.to_string(),
                            process: spec.name.clone(),
                            hook: hook.clone(),
                            message: f.message,
                            output_tail: f.tail,
                        })?;
                }
            }
        }
        let waves = stop_waves(procs);
        let mut entries: Vec<ProcEntry> = Vec::with_capacity(specs.len());
        for (spec, p) in specs.into_iter().zip(procs) {
            let shared = Arc::new(Mutex::new(ProcShared {
                wanted: true,
                pidless: matches!(spec.runner, Runner::File { .. }),
                ..ProcShared::default()
            }));
            let mut deps: Vec<Arc<Mutex<ProcShared>>> = Vec::new();
            for d in &p.depends_on {
                let found = match entries.iter().find(|e| &e.name == d) {
                    Some(e) => Some(e.shared.clone()),
                    None => lock(&self.inner.jobs)
                        .iter()
                        .filter(|(name, _)| name.as_str() != job)
                        .flat_map(|(_, j)| j.procs.iter())
                        .find(|e| &e.name == d)
                        .map(|e| e.shared.clone()),
                };
                match found {
                    Some(shared) => deps.push(shared),
                    None => tracing::warn!(
                        job,
                        process = %p.name,
                        dependency = %d,
                        "no process of that name runs on this VM; not waiting for it"
                    ),
                }
            }
            let (stop_tx, stop_rx) = watch::channel(false);
            let name = spec.name.clone();
            let task = tokio::spawn(run_process(spec, shared.clone(), deps, stop_rx));
            entries.push(ProcEntry {
                wave: waves.get(&name).copied().unwrap_or(0),
                depends_on: p.depends_on.clone(),
                name,
                shared,
                stop_tx: Arc::new(stop_tx),
                task: Some(task),
            });
        }
        tracing::info!(job, processes = entries.len(), "started job");
        lock(&self.inner.jobs).insert(
            job.to_string(),
            JobEntry {
                wanted: true,
                procs: entries,
            },
        );
        Ok(())
    }

    /// Stops every process of `job` and waits until they are gone. The job
    /// stays listed (as `stopped`) until [`Supervisor::forget_job`].
    pub async fn stop_job(&self, job: &str) -> Result<(), SupervisorError> {
        let _guard = self.inner.control.lock().await;
        self.stop_locked(job).await;
        Ok(())
    }

    /// Stops `job` and removes it from the status list.
    pub async fn forget_job(&self, job: &str) {
        let _guard = self.inner.control.lock().await;
        self.stop_locked(job).await;
        lock(&self.inner.jobs).remove(job);
    }

    /// Stops every process of every job (jobs concurrently, dependents
    /// before their dependencies) and waits for them.
    pub async fn stop_all(&self) {
        let _guard = self.inner.control.lock().await;
        let stops = {
            let mut jobs = lock(&self.inner.jobs);
            let waves = global_waves(&jobs);
            for (job, entry) in jobs.iter_mut() {
                for p in &mut entry.procs {
                    if let Some(w) = waves.get(&(job.clone(), p.name.clone())) {
                        p.wave = *w;
                    }
                }
            }
            jobs.values_mut().flat_map(signal_stop).collect()
        };
        stop_in_waves(stops).await;
    }

    /// Whether `job` is currently wanted up (started and not stopped since).
    pub async fn is_wanted(&self, job: &str) -> bool {
        lock(&self.inner.jobs).get(job).is_some_and(|j| j.wanted)
    }

    /// Per-job and per-process state, jobs sorted by name, processes in
    /// start order.
    pub async fn status(&self) -> Vec<JobStatus> {
        let jobs = lock(&self.inner.jobs);
        jobs.iter()
            .map(|(name, entry)| {
                let processes: Vec<ProcessStatus> = entry
                    .procs
                    .iter()
                    .map(|p| {
                        let s = lock(&p.shared);
                        let state = if !s.wanted {
                            ProcessState::Stopped
                        } else if s.up() {
                            ProcessState::Running
                        } else {
                            ProcessState::Failing
                        };
                        let up = s.pid.is_some() || (s.pidless && s.healthy);
                        ProcessStatus {
                            name: p.name.clone(),
                            state,
                            pid: s.pid,
                            uptime_secs: s.started_at.filter(|_| up).map(|t| t.elapsed().as_secs()),
                            restarts: s.restarts,
                        }
                    })
                    .collect();
                let state = if !entry.wanted {
                    ProcessState::Stopped
                } else {
                    aggregate(processes.iter().map(|p| p.state))
                };
                JobStatus {
                    name: name.clone(),
                    state,
                    processes,
                }
            })
            .collect()
    }

    async fn stop_locked(&self, job: &str) {
        let stops = {
            let mut jobs = lock(&self.inner.jobs);
            match jobs.get_mut(job) {
                Some(entry) => signal_stop(entry),
                None => Vec::new(),
            }
        };
        stop_in_waves(stops).await;
    }

    fn build_specs(
        &self,
        job: &str,
        job_dir: &Path,
        procs: &[JobProcess],
    ) -> Result<Vec<ProcSpec>, SupervisorError> {
        let invalid = |message: String| SupervisorError::InvalidConfig {
            job: job.to_string(),
            message,
        };
        if !valid_name(job) {
            return Err(invalid(format!("invalid job name {job:?}")));
        }
        let mut seen = HashSet::new();
        let mut specs = Vec::new();
        let log_dir = self.inner.log_root.join(job);
        let declared: HashSet<&str> = procs.iter().map(|p| p.name.as_str()).collect();
        for jp in procs {
            if !valid_name(&jp.name) {
                return Err(invalid(format!("invalid process name {:?}", jp.name)));
            }
            if !seen.insert(jp.name.clone()) {
                return Err(invalid(format!("process {} declared twice", jp.name)));
            }
            for d in &jp.depends_on {
                // Names this job does not declare are other jobs' processes.
                if d == &jp.name || (declared.contains(d.as_str()) && !seen.contains(d)) {
                    return Err(invalid(format!(
                        "process {} depends on {d}, which does not start before it",
                        jp.name
                    )));
                }
            }
            let ctl_log = log_dir.join(format!("{}.ctl.log", jp.name));
            let runner = match &jp.kind {
                ProcessKind::Bpm(p) => Runner::Direct(Box::new(
                    self.direct_spec(job, job_dir, &jp.name, p, &invalid)?,
                )),
                ProcessKind::Ctl {
                    pidfile,
                    start,
                    stop,
                } => Runner::Ctl {
                    pidfile: pidfile.clone(),
                    start: start.clone(),
                    stop: stop.clone(),
                    log: ctl_log,
                },
                ProcessKind::File { path, start, stop } => Runner::File {
                    path: path.clone(),
                    start: start.clone(),
                    stop: stop.clone(),
                    log: ctl_log,
                },
            };
            let note_log = match &runner {
                Runner::Direct(d) => d.stderr.clone(),
                Runner::Ctl { log, .. } | Runner::File { log, .. } => log.clone(),
            };
            specs.push(ProcSpec {
                job: job.to_string(),
                name: jp.name.clone(),
                note_log,
                runner,
            });
        }
        Ok(specs)
    }

    fn direct_spec(
        &self,
        job: &str,
        job_dir: &Path,
        name: &str,
        p: &BpmProcess,
        invalid: &dyn Fn(String) -> SupervisorError,
    ) -> Result<DirectSpec, SupervisorError> {
        if p.executable.is_empty() {
            return Err(invalid(format!("process {name} has no executable")));
        }
        let in_job = |s: &str| {
            let path = PathBuf::from(s);
            if path.is_absolute() || !s.contains('/') {
                path
            } else {
                job_dir.join(path)
            }
        };
        let executable = in_job(&p.executable);
        if executable.is_absolute() && !executable.exists() {
            return Err(invalid(format!(
                "process {name}: executable {} does not exist",
                executable.display()
            )));
        }
        let pre_start = match p.hooks.as_ref().and_then(|h| h.pre_start.as_deref()) {
            Some(h) if !h.is_empty() => {
                let path = in_job(h);
                if path.is_absolute() && !path.exists() {
                    return Err(invalid(format!(
                        "process {name}: pre_start hook {} does not exist",
                        path.display()
                    )));
                }
                Some(path)
            }
            _ => None,
        };
        let cwd = match &p.workdir {
            Some(w) if !w.is_empty() => {
                let w = PathBuf::from(w);
                if w.is_absolute() {
                    w
                } else {
                    job_dir.join(w)
                }
            }
            _ => job_dir.to_path_buf(),
        };
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), DEFAULT_PATH.to_string());
        env.insert(
            "HOME".to_string(),
            self.inner.home.to_string_lossy().into_owned(),
        );
        env.extend(p.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let limits = p.limits.clone().unwrap_or_default();
        let memory =
            match &limits.memory {
                Some(m) => Some(parse_memory(m).map_err(|why| {
                    invalid(format!("process {name}: limits.memory {m:?}: {why}"))
                })?),
                None => None,
            };
        let log_dir = self.inner.log_root.join(job);
        Ok(DirectSpec {
            executable,
            args: p.args.clone(),
            env,
            cwd,
            stdout: log_dir.join(format!("{name}.stdout.log")),
            stderr: log_dir.join(format!("{name}.stderr.log")),
            pid_file: self.inner.run_root.join(job).join(format!("{name}.pid")),
            shutdown: Duration::from_secs(p.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_SECS)),
            signal: match p.shutdown_signal.unwrap_or_default() {
                ShutdownSignal::Term => libc::SIGTERM,
                ShutdownSignal::Int => libc::SIGINT,
            },
            health: p.health.clone(),
            open_files: limits.open_files,
            max_processes: limits.processes,
            memory,
            cgroup: None,
            pre_start,
        })
    }
}

/// A bpm memory quantity (`512M`, `1G`, `1.5GB`, `64KiB`, `100B`) in bytes;
/// units are powers of 1024, as bpm reads them.
pub(crate) fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| "needs a unit such as M or G".to_string())?;
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{num:?} is not a number"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        other => return Err(format!("unknown unit {other:?}")),
    };
    let bytes = n * f64::from(1u32 << 10).powi(shift / 10);
    if !(bytes >= 1.0 && bytes < 2f64.powi(63)) {
        return Err("must be a positive size".to_string());
    }
    // Truncation to whole bytes is intended.
    Ok(bytes as u64)
}

/// The agent's own cgroup v2 directory.
fn own_cgroup() -> Result<PathBuf, String> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next() == Some("cgroup2"))
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
        })
        .ok_or_else(|| "no cgroup2 file system is mounted".to_string())?;
    let groups = fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let own = groups
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| "the agent is in no cgroup v2 group".to_string())?;
    Ok(mount.join(own.trim_start_matches('/')))
}

/// Makes `<own cgroup>/bosun.<job>.<process>` with `memory.max` = `bytes`.
fn memory_cgroup(job: &str, name: &str, bytes: u64) -> Result<PathBuf, String> {
    let base = own_cgroup()?;
    let dir = base.join(format!("bosun.{job}.{name}"));
    fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let max = dir.join("memory.max");
    if !max.exists() {
        let ctl = base.join("cgroup.subtree_control");
        let enabled = fs::write(&ctl, "+memory");
        if !max.exists() {
            remove_cgroup(&dir);
            return Err(match enabled {
                Ok(()) => format!(
                    "the memory controller is not available in {}",
                    base.display()
                ),
                Err(e) => format!("enabling the memory controller in {}: {e}", ctl.display()),
            });
        }
    }
    if let Err(e) = fs::write(&max, bytes.to_string()) {
        remove_cgroup(&dir);
        return Err(format!("writing {}: {e}", max.display()));
    }
    Ok(dir)
}

fn remove_cgroup(dir: &Path) {
    match fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(dir = %dir.display(), error = %e, "removing a cgroup failed"),
    }
}

/// Stop waves: a process nobody depends on stops in wave 0, a process in
/// wave `n + 1` after every process depending on it (wave `n` at most).
fn stop_waves(procs: &[JobProcess]) -> HashMap<String, usize> {
    let mut waves: HashMap<String, usize> = procs.iter().map(|p| (p.name.clone(), 0)).collect();
    // Procs come after their dependencies: walking backwards, every
    // dependent's wave is final before its dependencies are raised.
    for p in procs.iter().rev() {
        let w = waves.get(&p.name).copied().unwrap_or(0);
        for d in &p.depends_on {
            if let Some(dw) = waves.get_mut(d) {
                *dw = (*dw).max(w + 1);
            }
        }
    }
    waves
}

/// Stop waves over every job, dependencies across jobs included: a
/// dependency name is looked up in its own job first, then in the others.
fn global_waves(jobs: &BTreeMap<String, JobEntry>) -> HashMap<(String, String), usize> {
    let mut waves: HashMap<(String, String), usize> = jobs
        .iter()
        .flat_map(|(j, e)| {
            e.procs
                .iter()
                .map(move |p| ((j.clone(), p.name.clone()), 0))
        })
        .collect();
    let resolve = |job: &str, name: &str| -> Option<(String, String)> {
        if jobs
            .get(job)
            .is_some_and(|e| e.procs.iter().any(|p| p.name == name))
        {
            return Some((job.to_string(), name.to_string()));
        }
        jobs.iter()
            .find(|(_, e)| e.procs.iter().any(|p| p.name == name))
            .map(|(j, _)| (j.clone(), name.to_string()))
    };
    // Relax until stable; a cycle stops growing after one round per process.
    for _ in 0..waves.len() {
        let mut changed = false;
        for (job, entry) in jobs {
            for p in &entry.procs {
                let w = waves
                    .get(&(job.clone(), p.name.clone()))
                    .copied()
                    .unwrap_or(0);
                for d in &p.depends_on {
                    if let Some(key) = resolve(job, d) {
                        if let Some(dw) = waves.get_mut(&key) {
                            if *dw < w + 1 {
                                *dw = w + 1;
                                changed = true;
                            }
                        }
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    waves
}

/// Aggregate state: running if all run (or none exist), failing if any
/// fails, stopped otherwise.
pub(crate) fn aggregate(states: impl Iterator<Item = ProcessState>) -> ProcessState {
    let mut all_running = true;
    for s in states {
        match s {
            ProcessState::Failing => return ProcessState::Failing,
            ProcessState::Stopped => all_running = false,
            ProcessState::Running => {}
        }
    }
    if all_running {
        ProcessState::Running
    } else {
        ProcessState::Stopped
    }
}

type PendingStop = (usize, Arc<watch::Sender<bool>>, JoinHandle<()>);

/// Marks the job and its processes unwanted and returns what to stop.
fn signal_stop(entry: &mut JobEntry) -> Vec<PendingStop> {
    entry.wanted = false;
    let mut out = Vec::new();
    for p in &mut entry.procs {
        lock(&p.shared).wanted = false;
        if let Some(t) = p.task.take() {
            out.push((p.wave, p.stop_tx.clone(), t));
        }
    }
    out
}

/// Stops wave 0 of every job together, waits, then wave 1, and so on.
async fn stop_in_waves(mut stops: Vec<PendingStop>) {
    stops.sort_by_key(|s| s.0);
    let mut rest = stops.into_iter().peekable();
    while let Some(&(wave, _, _)) = rest.peek() {
        let mut tasks = Vec::new();
        while let Some((_, tx, task)) = rest.next_if(|s| s.0 == wave) {
            // The receiver lives as long as the task; a send error only
            // means the task already ended.
            if tx.send(true).is_err() {
                tracing::debug!("process task already ended");
            }
            tasks.push(task);
        }
        for t in tasks {
            if let Err(e) = t.await {
                tracing::warn!(error = %e, "process task failed");
            }
        }
    }
}

/// Sends `sig` to the process group led by `pgid` (ignores "no such process").
pub(crate) fn kill_group(pgid: u32, sig: libc::c_int) {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return;
    };
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Sends `sig` to one process (ignores "no such process").
fn kill_pid(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    if pid <= 1 {
        return;
    }
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Whether `pid` names a live (not zombie) process.
fn alive(pid: u32) -> bool {
    matches!(proc_stat(pid), Some((s, _, _)) if s != 'Z')
}

/// The pid a pidfile names, if that process is alive.
fn live_pid(pidfile: &Path) -> Option<u32> {
    let pid: u32 = fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    (pid > 1 && alive(pid)).then_some(pid)
}

fn open_append(p: &Path) -> std::io::Result<fs::File> {
    OpenOptions::new().create(true).append(true).open(p)
}

/// Spawns, retrying briefly on ETXTBSY (a freshly written executable may be
/// held open by another thread's fork for a moment).
fn spawn_retrying(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn spawn_child(d: &DirectSpec) -> std::io::Result<Child> {
    let out = open_append(&d.stdout)?;
    let err = open_append(&d.stderr)?;
    let mut cmd = Command::new(&d.executable);
    cmd.args(&d.args)
        .env_clear()
        .envs(&d.env)
        .current_dir(&d.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    let open_files = d.open_files;
    let max_processes = d.max_processes;
    let cgroup_procs = match &d.cgroup {
        Some(dir) => Some(
            CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
        ),
        None => None,
    };
    // SAFETY: the closure only makes async-signal-safe system calls
    // (setrlimit, open, write, close) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(n) = open_files {
                set_rlimit(libc::RLIMIT_NOFILE, n)?;
            }
            if let Some(n) = max_processes {
                set_rlimit(libc::RLIMIT_NPROC, n)?;
            }
            if let Some(path) = &cgroup_procs {
                // Writing "0" moves the writing process itself.
                let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = std::io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            Ok(())
        });
    }
    spawn_retrying(&mut cmd)
}

#[cfg(target_env = "gnu")]
type RlimitResource = libc::__rlimit_resource_t;
#[cfg(not(target_env = "gnu"))]
type RlimitResource = libc::c_int;

/// Soft and hard limit of `resource` to `n` (called between fork and exec).
fn set_rlimit(resource: RlimitResource, n: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: n as libc::rlim_t,
        rlim_max: n as libc::rlim_t,
    };
    // SAFETY: setrlimit with a pointer to a local.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The signature getpwnam_r and getgrnam_r share, for an entry type `T`.
type NssLookup<T> = unsafe extern "C" fn(
    *const libc::c_char,
    *mut T,
    *mut libc::c_char,
    libc::size_t,
    *mut *mut T,
) -> libc::c_int;

/// The entry `lookup` (getpwnam_r or getgrnam_r) finds for `name` in the
/// VM's databases (`/etc` as the agent sees it), through `pick`; none when
/// there is no such entry.
fn nss_entry<T, R>(name: &str, lookup: NssLookup<T>, pick: impl Fn(&T) -> R) -> Option<R> {
    let c = CString::new(name).ok()?;
    let mut entry = std::mem::MaybeUninit::<T>::uninit();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut T = std::ptr::null_mut();
    // SAFETY: the lookup writes into `entry` and `buf`, both live and sized
    // as passed; `found` is left null or pointed at `entry`.
    let rc = unsafe {
        lookup(
            c.as_ptr(),
            entry.as_mut_ptr(),
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return None;
    }
    // SAFETY: the lookup succeeded and filled `entry`.
    Some(pick(unsafe { entry.assume_init_ref() }))
}

/// A user of this VM: its uid and primary gid. A number that names no
/// user is taken as a uid and a gid.
fn lookup_user(name: &str) -> Result<(u32, u32), String> {
    nss_entry(name, libc::getpwnam_r, |p: &libc::passwd| {
        (p.pw_uid, p.pw_gid)
    })
    .or_else(|| name.parse::<u32>().ok().map(|n| (n, n)))
    .ok_or_else(|| format!("as uid '{name}': no such user on this VM"))
}

/// A group of this VM by name or number.
fn lookup_group(name: &str) -> Result<u32, String> {
    nss_entry(name, libc::getgrnam_r, |g: &libc::group| g.gr_gid)
        .or_else(|| name.parse::<u32>().ok())
        .ok_or_else(|| format!("and gid '{name}': no such group on this VM"))
}

/// Who a monit program runs as: `as uid X [and gid Y]` (gid defaults to
/// X's primary group), else the agent's own user.
fn program_identity(p: &Program) -> Result<Option<(u32, u32)>, String> {
    match (&p.uid, &p.gid) {
        (None, None) => Ok(None),
        (Some(u), g) => {
            let (uid, primary) = lookup_user(u)?;
            let gid = match g {
                Some(g) => lookup_group(g)?,
                None => primary,
            };
            Ok(Some((uid, gid)))
        }
        (None, Some(g)) => {
            // SAFETY: getuid has no preconditions.
            let uid = unsafe { libc::getuid() };
            Ok(Some((uid, lookup_group(g)?)))
        }
    }
}

/// Starts a monit program: `/bin/sh -c CMD` in its own process group,
/// working directory `/`, bosh's PATH, output appended to `log`, as the
/// user and group its `as uid ... and gid ...` names. A user or group the
/// VM does not have (a stemcell without BOSH's `vcap`, say) leaves the
/// program running as the agent's user, with a warning in the agent's log
/// and in `log`.
fn spawn_program(program: &Program, log: &Path) -> std::io::Result<Child> {
    let identity = match program_identity(program) {
        Ok(id) => id,
        Err(why) => {
            tracing::warn!(command = %program.command, reason = %why, "running a monit program as the agent's user");
            append_note(
                log,
                &format!(
                    "bosun-agent: {why}: running {:?} as the agent's user\n",
                    program.command
                ),
            );
            None
        }
    };
    let out = open_append(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new("/bin/sh");
    if let Some((uid, gid)) = identity {
        cmd.uid(uid).gid(gid);
    }
    cmd.arg("-c")
        .arg(&program.command)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    spawn_retrying(&mut cmd)
}

/// Runs a monit program to its end, at most `timeout` (then its group is
/// killed); the error says how it failed.
async fn run_program(program: &Program, log: &Path, timeout: Duration) -> Result<(), String> {
    let command = &program.command;
    let mut child =
        spawn_program(program, log).map_err(|e| format!("spawning {command:?}: {e}"))?;
    let group = child.id();
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(st)) if st.success() => Ok(()),
        Ok(Ok(st)) => Err(format!("{command:?} exited with {st}")),
        Ok(Err(e)) => Err(format!("waiting for {command:?}: {e}")),
        Err(_) => {
            if let Some(g) = group {
                kill_group(g, libc::SIGKILL);
            }
            if let Err(e) = child.wait().await {
                tracing::warn!(error = %e, "reaping a timed-out program failed");
            }
            Err(format!(
                "{command:?} did not finish within {}s",
                timeout.as_secs()
            ))
        }
    }
}

/// How a hook failed: a message and the tail of its output.
struct HookFailure {
    message: String,
    tail: String,
}

/// Runs a bpm `pre_start` hook with the process's environment and working
/// directory; its output is appended to the process's logs.
async fn run_hook(d: &DirectSpec, hook: &Path) -> Result<(), HookFailure> {
    let fail = |message: String| HookFailure {
        message,
        tail: String::new(),
    };
    let mut cmd = Command::new(hook);
    cmd.env_clear()
        .envs(&d.env)
        .current_dir(&d.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = spawn_retrying(&mut cmd).map_err(|e| fail(format!("spawning it: {e}")))?;
    let group = child.id();
    let out = match tokio::time::timeout(HOOK_TIMEOUT, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => return Err(fail(format!("waiting for it: {e}"))),
        Err(_) => {
            if let Some(g) = group {
                kill_group(g, libc::SIGKILL);
            }
            return Err(fail(format!(
                "it did not finish within {}s",
                HOOK_TIMEOUT.as_secs()
            )));
        }
    };
    for (path, bytes) in [(&d.stdout, &out.stdout), (&d.stderr, &out.stderr)] {
        use std::io::Write;
        if let Err(e) = open_append(path).and_then(|mut f| f.write_all(bytes)) {
            tracing::warn!(file = %path.display(), error = %e, "writing hook output failed");
        }
    }
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(HOOK_TAIL_LINES)..].join("\n");
    Err(HookFailure {
        message: format!("it exited with {}", out.status),
        tail,
    })
}

/// Waits `d`, or returns true early when a stop is requested.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => *stop.borrow(),
        _ = stop.changed() => true,
    }
}

/// A launched process, as watched.
enum Live {
    /// A bpm process: the agent's own child.
    Child { child: Child, pid: u32 },
    /// A ctl process: the pid its pidfile names; `starter` is the start
    /// program while it has not been reaped, `group` its process group.
    Pid {
        pid: u32,
        starter: Option<Child>,
        group: Option<u32>,
    },
    /// A file check whose path exists.
    Path {
        path: PathBuf,
        starter: Option<Child>,
    },
}

impl Live {
    fn pid(&self) -> Option<u32> {
        match self {
            Live::Child { pid, .. } | Live::Pid { pid, .. } => Some(*pid),
            Live::Path { .. } => None,
        }
    }
}

/// Reaps a start program that has ended, logging a failure.
fn reap_starter(spec: &ProcSpec, starter: &mut Option<Child>) {
    let Some(c) = starter else {
        return;
    };
    match c.try_wait() {
        Ok(None) => {}
        Ok(Some(st)) => {
            if !st.success() {
                tracing::warn!(job = %spec.job, process = %spec.name, status = %st, "start program failed");
            }
            *starter = None;
        }
        Err(e) => {
            tracing::warn!(job = %spec.job, process = %spec.name, error = %e, "waiting for the start program failed");
            *starter = None;
        }
    }
}

/// Starts the process once; `hook` says whether to run its pre_start hook.
async fn launch(
    spec: &ProcSpec,
    stop: &mut watch::Receiver<bool>,
    hook: bool,
) -> Result<Live, String> {
    match &spec.runner {
        Runner::Direct(d) => {
            if let (true, Some(h)) = (hook, &d.pre_start) {
                // A stop does not wait for the hook (dropping it kills it).
                tokio::select! {
                    r = run_hook(d, h) => r.map_err(|f| {
                        format!("pre_start hook {} failed: {}", h.display(), f.message)
                    })?,
                    _ = stop.changed() => return Err("stopped while its pre_start hook ran".into()),
                }
            }
            let mut child =
                spawn_child(d).map_err(|e| format!("spawning {}: {e}", d.executable.display()))?;
            match child.id() {
                Some(pid) => Ok(Live::Child { child, pid }),
                None => {
                    let st = child.wait().await;
                    Err(format!(
                        "{} exited at once ({st:?})",
                        d.executable.display()
                    ))
                }
            }
        }
        Runner::Ctl {
            pidfile,
            start,
            log,
            ..
        } => {
            if let Some(pid) = live_pid(pidfile) {
                // Already running (as monit sees it): watch it, start nothing.
                tracing::info!(job = %spec.job, process = %spec.name, pid, "adopting the running process its pidfile names");
                return Ok(Live::Pid {
                    pid,
                    starter: None,
                    group: None,
                });
            }
            let timeout = start.timeout.unwrap_or(DEFAULT_PROGRAM_TIMEOUT);
            let child = spawn_program(start, log)
                .map_err(|e| format!("spawning start program {:?}: {e}", start.command))?;
            let group = child.id();
            let mut starter = Some(child);
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(pid) = live_pid(pidfile) {
                    return Ok(Live::Pid {
                        pid,
                        starter,
                        group,
                    });
                }
                if let Some(c) = &mut starter {
                    match c.try_wait() {
                        Ok(None) => {}
                        Ok(Some(st)) if st.success() => starter = None,
                        Ok(Some(st)) => {
                            // The pidfile may have been written just before.
                            if let Some(pid) = live_pid(pidfile) {
                                return Ok(Live::Pid {
                                    pid,
                                    starter: None,
                                    group,
                                });
                            }
                            if let Some(g) = group {
                                kill_group(g, libc::SIGKILL);
                            }
                            return Err(format!(
                                "start program {:?} exited with {st} and {} names no live process",
                                start.command,
                                pidfile.display()
                            ));
                        }
                        Err(e) => return Err(format!("waiting for the start program: {e}")),
                    }
                }
                let stopped = sleep_or_stop(WATCH_INTERVAL, stop).await;
                if stopped || Instant::now() >= deadline {
                    if let Some(pid) = live_pid(pidfile) {
                        return Ok(Live::Pid {
                            pid,
                            starter,
                            group,
                        });
                    }
                    if let Some(g) = group {
                        kill_group(g, libc::SIGKILL);
                    }
                    if let Some(mut c) = starter {
                        if let Err(e) = c.wait().await {
                            tracing::warn!(error = %e, "reaping the start program failed");
                        }
                    }
                    return Err(if stopped {
                        "stopped while starting".to_string()
                    } else {
                        format!(
                            "{} named no live process within {}s of the start program",
                            pidfile.display(),
                            timeout.as_secs()
                        )
                    });
                }
            }
        }
        Runner::File {
            path, start, log, ..
        } => {
            let mut starter = match start {
                Some(p) => Some(
                    spawn_program(p, log)
                        .map_err(|e| format!("spawning start program {:?}: {e}", p.command))?,
                ),
                None => None,
            };
            let timeout = match (start, &starter) {
                (Some(p), Some(_)) => p.timeout.unwrap_or(DEFAULT_PROGRAM_TIMEOUT),
                _ => Duration::ZERO,
            };
            let deadline = Instant::now() + timeout;
            loop {
                if path.exists() {
                    return Ok(Live::Path {
                        path: path.clone(),
                        starter,
                    });
                }
                reap_starter(spec, &mut starter);
                if Instant::now() >= deadline || sleep_or_stop(WATCH_INTERVAL, stop).await {
                    return Err(format!("{} does not exist", path.display()));
                }
            }
        }
    }
}

/// Waits until the launched process is gone; says how it went.
async fn watch_live(spec: &ProcSpec, live: &mut Live) -> String {
    match live {
        Live::Child { child, .. } => match child.wait().await {
            Ok(st) => format!("exited with {st}"),
            Err(e) => format!("waiting for it failed: {e}"),
        },
        Live::Pid { pid, starter, .. } => loop {
            reap_starter(spec, starter);
            if !alive(*pid) {
                return format!("pid {pid} is gone");
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        },
        Live::Path { path, starter } => loop {
            reap_starter(spec, starter);
            if !path.exists() {
                return format!("{} no longer exists", path.display());
            }
            tokio::time::sleep(WATCH_INTERVAL).await;
        },
    }
}

/// Stops a launched process on request.
async fn terminate(spec: &ProcSpec, live: Live) {
    match (live, &spec.runner) {
        (Live::Child { mut child, pid }, Runner::Direct(d)) => {
            kill_group(pid, d.signal);
            if tokio::time::timeout(d.shutdown, child.wait())
                .await
                .is_err()
            {
                tracing::warn!(job = %spec.job, process = %spec.name, pid, "process ignored its shutdown signal; sending SIGKILL");
                kill_group(pid, libc::SIGKILL);
                if let Err(e) = child.wait().await {
                    tracing::warn!(pid, error = %e, "reaping a killed process failed");
                }
            }
            // Whatever else is left in the group.
            kill_group(pid, libc::SIGKILL);
        }
        (
            Live::Pid {
                pid,
                starter,
                group,
            },
            Runner::Ctl { stop, log, .. },
        ) => {
            let timeout = stop
                .as_ref()
                .and_then(|p| p.timeout)
                .unwrap_or(DEFAULT_PROGRAM_TIMEOUT);
            let deadline = Instant::now() + timeout;
            match stop {
                Some(p) => {
                    if let Err(why) = run_program(p, log, timeout).await {
                        tracing::warn!(job = %spec.job, process = %spec.name, reason = %why, "stop program failed");
                        append_note(log, &format!("bosun-agent: stop program failed: {why}\n"));
                    }
                }
                None => kill_pid(pid, libc::SIGTERM),
            }
            while alive(pid) && Instant::now() < deadline {
                tokio::time::sleep(WATCH_INTERVAL).await;
            }
            // Only a live pid: a dead one may already name another process.
            if alive(pid) {
                tracing::warn!(job = %spec.job, process = %spec.name, pid, "process outlived its stop program; sending SIGKILL");
                kill_pid(pid, libc::SIGKILL);
                kill_group(pid, libc::SIGKILL);
                // SIGKILL is delivered asynchronously: report stopped only once it is gone.
                let until = Instant::now() + Duration::from_secs(2);
                while alive(pid) && Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            end_starter(starter, group).await;
        }
        (Live::Path { starter, .. }, Runner::File { stop, log, .. }) => {
            if let Some(p) = stop {
                let timeout = p.timeout.unwrap_or(DEFAULT_PROGRAM_TIMEOUT);
                if let Err(why) = run_program(p, log, timeout).await {
                    tracing::warn!(job = %spec.job, process = %spec.name, reason = %why, "stop program failed");
                    append_note(log, &format!("bosun-agent: stop program failed: {why}\n"));
                }
            }
            let group = starter.as_ref().and_then(Child::id);
            end_starter(starter, group).await;
        }
        (live, _) => {
            // Cannot happen: `launch` makes the `Live` its runner matches.
            tracing::warn!(job = %spec.job, process = %spec.name, pid = ?live.pid(), "mismatched process record; killing it");
            if let Some(pid) = live.pid() {
                kill_pid(pid, libc::SIGKILL);
            }
        }
    }
}

/// Kills what is left of a start program's group and reaps the program.
async fn end_starter(starter: Option<Child>, group: Option<u32>) {
    if let Some(g) = group {
        kill_group(g, libc::SIGKILL);
    }
    if let Some(mut c) = starter {
        if let Err(e) = c.wait().await {
            tracing::warn!(error = %e, "reaping the start program failed");
        }
    }
}

/// After an unexpected end: what is left of the process goes too.
async fn after_exit(live: Live) {
    match live {
        Live::Child { pid, .. } => kill_group(pid, libc::SIGKILL),
        Live::Pid { starter, group, .. } => end_starter(starter, group).await,
        Live::Path { .. } => {}
    }
}

/// Waits (up to monit's program timeout) until every dependency is up;
/// false when a stop came first.
async fn wait_for_deps(
    spec: &ProcSpec,
    deps: &[Arc<Mutex<ProcShared>>],
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = Instant::now() + DEFAULT_PROGRAM_TIMEOUT;
    while !deps.iter().all(|d| lock(d).up()) {
        if Instant::now() >= deadline {
            tracing::warn!(job = %spec.job, process = %spec.name, "dependencies are not up; starting anyway");
            return true;
        }
        if sleep_or_stop(Duration::from_millis(50), stop).await {
            return false;
        }
    }
    true
}

/// One process's life: launch, watch, restart with backoff, stop on request.
async fn run_process(
    spec: ProcSpec,
    shared: Arc<Mutex<ProcShared>>,
    deps: Vec<Arc<Mutex<ProcShared>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    // The first pre_start hook ran in `start_job`.
    let mut hook = false;
    let mut go = wait_for_deps(&spec, &deps, &mut stop).await;
    while go && !*stop.borrow() {
        let launched = launch(&spec, &mut stop, hook).await;
        hook = true;
        let mut live = match launched {
            Ok(l) => l,
            Err(why) => {
                if !*stop.borrow() {
                    tracing::warn!(job = %spec.job, process = %spec.name, reason = %why, "starting process failed");
                    append_note(
                        &spec.note_log,
                        &format!("bosun-agent: starting {} failed: {why}\n", spec.name),
                    );
                }
                if sleep_or_stop(backoff, &mut stop).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
                lock(&shared).restarts += 1;
                continue;
            }
        };
        let started = Instant::now();
        {
            let mut s = lock(&shared);
            s.pid = live.pid();
            s.started_at = Some(started);
            s.healthy = spec.health().is_none();
        }
        if let (Runner::Direct(d), Some(pid)) = (&spec.runner, live.pid()) {
            if let Err(e) = fs::write(&d.pid_file, format!("{pid}\n")) {
                // Without it, an agent restarted meanwhile cannot find this group.
                tracing::warn!(job = %spec.job, process = %spec.name, file = %d.pid_file.display(), error = %e, "writing the pid file failed");
            }
        }
        let probe = spec
            .health()
            .cloned()
            .map(|h| tokio::spawn(probe_loop(h, shared.clone())));
        let exited = if *stop.borrow() {
            None
        } else {
            tokio::select! {
                why = watch_live(&spec, &mut live) => Some(why),
                _ = stop.changed() => None,
            }
        };
        if let Some(p) = probe {
            p.abort();
        }
        match exited {
            None => {
                terminate(&spec, live).await;
                let mut s = lock(&shared);
                s.pid = None;
                s.healthy = false;
                go = false;
            }
            Some(why) => {
                after_exit(live).await;
                let uptime = started.elapsed();
                {
                    let mut s = lock(&shared);
                    s.pid = None;
                    s.healthy = false;
                }
                tracing::warn!(job = %spec.job, process = %spec.name, reason = %why, uptime_ms = uptime.as_millis() as u64, "process ended");
                if uptime >= GOOD_UPTIME {
                    backoff = BACKOFF_START;
                }
                if sleep_or_stop(backoff, &mut stop).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
                lock(&shared).restarts += 1;
            }
        }
    }
    if let Runner::Direct(d) = &spec.runner {
        remove_pid_file(&d.pid_file);
        if let Some(cg) = &d.cgroup {
            remove_cgroup(cg);
        }
    }
}

/// Removes a pid file; absent is fine, any other failure is logged.
fn remove_pid_file(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "removing the pid file failed")
        }
    }
}

fn append_note(path: &Path, note: &str) {
    use std::io::Write;
    if let Err(e) = open_append(path).and_then(|mut f| f.write_all(note.as_bytes())) {
        tracing::warn!(file = %path.display(), error = %e, "writing a note to a process log failed");
    }
}

async fn probe_loop(probe: HealthProbe, shared: Arc<Mutex<ProcShared>>) {
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ok = tokio::time::timeout(PROBE_TIMEOUT, run_probe(&probe))
            .await
            .unwrap_or(false);
        lock(&shared).healthy = ok;
    }
}

/// One probe: every configured check must pass.
async fn run_probe(probe: &HealthProbe) -> bool {
    if let Some(addr) = &probe.tcp {
        if tokio::net::TcpStream::connect(addr.as_str()).await.is_err() {
            return false;
        }
    }
    if let Some(url) = &probe.http {
        if !http_get_ok(url).await {
            return false;
        }
    }
    true
}

/// A plain HTTP/1.0 GET; true on a 2xx status line.
async fn http_get_ok(url: &str) -> bool {
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr.as_str()).await else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 64];
    while !buf.contains(&b'\n') && buf.len() < 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    matches!(
        (parts.next(), parts.next()),
        (Some(v), Some(code)) if v.starts_with("HTTP/") && code.len() == 3 && code.starts_with('2')
    )
}

/// Kills process groups left over by a previous agent run, from the pid
/// files under `run_root` (only pids that still lead their own group and
/// are no younger than their file). Files naming a live process it did not
/// kill stay (a ctl daemon's own pidfile); the others are removed.
pub(crate) fn kill_leftovers(run_root: &Path) {
    let Ok(jobs) = fs::read_dir(run_root) else {
        return;
    };
    for job in jobs.flatten() {
        let Ok(files) = fs::read_dir(job.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pid") {
                continue;
            }
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            let written = f.metadata().and_then(|m| m.modified()).ok();
            if let (Some(pid), Some(written)) = (pid, written) {
                // Ours only if it still leads its group and started no later
                // than its pid file was written (not a reused pid after a reboot).
                let ours = proc_pgrp(pid) == Some(pid)
                    && proc_start_time(pid).is_some_and(|t| t <= written + Duration::from_secs(2));
                if ours {
                    tracing::warn!(pid, file = %path.display(), "killing leftover process group");
                    kill_group(pid, libc::SIGKILL);
                } else if alive(pid) {
                    // A daemon a ctl script started names itself here; its
                    // check adopts it rather than starting a second one.
                    continue;
                }
            }
            remove_pid_file(&path);
        }
    }
}

/// (state, ppid, pgrp) of a process from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(char, u32, u32)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parens: split after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let state = it.next()?.chars().next()?;
    let ppid = it.next()?.parse().ok()?;
    let pgrp = it.next()?.parse().ok()?;
    Some((state, ppid, pgrp))
}

/// Wall-clock start time of a process (boot time + field 22 of its stat).
fn proc_start_time(pid: u32) -> Option<std::time::SystemTime> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(
        std::time::UNIX_EPOCH
            + Duration::from_secs(btime)
            + Duration::from_millis(ticks * 1000 / hz),
    )
}

fn proc_pgrp(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|(_, _, g)| g)
}

/// When the agent is PID 1 (in a container), orphans are re-parented to it:
/// reap zombie children that stay unreaped across two scans (the ones the
/// agent spawned itself are reaped by tokio well before that).
pub(crate) async fn reap_orphans_forever() {
    let me = std::process::id();
    let mut seen: HashSet<u32> = HashSet::new();
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut zombies = HashSet::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if let Some(('Z', ppid, _)) = proc_stat(pid) {
                    if ppid == me {
                        zombies.insert(pid);
                    }
                }
            }
        }
        for pid in zombies.intersection(&seen) {
            if let Ok(p) = libc::pid_t::try_from(*pid) {
                let mut status = 0;
                // SAFETY: waitpid with a valid pointer to a local.
                unsafe {
                    libc::waitpid(p, &mut status, libc::WNOHANG);
                }
            }
        }
        seen = zombies;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc(name: &str, script: &str, shutdown: Option<u64>) -> BpmProcess {
        BpmProcess {
            name: name.to_string(),
            executable: "/bin/sh".to_string(),
            args: vec!["-c".to_string(), script.to_string()],
            shutdown_timeout: shutdown,
            ..BpmProcess::default()
        }
    }

    async fn wait_for<F: Fn(&[JobStatus]) -> bool>(
        sup: &Supervisor,
        f: F,
        secs: u64,
    ) -> Vec<JobStatus> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let st = sup.status().await;
            if f(&st) || Instant::now() > deadline {
                return st;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn health_probe_gates_running() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let sup = Supervisor::new(root.join("sys/log"));
        let mut p = proc("p", "sleep 1000", Some(1));
        p.health = Some(HealthProbe {
            tcp: Some(format!("127.0.0.1:{port}")),
            http: None,
        });
        let cfg = BpmConfig {
            processes: vec![p],
            ..BpmConfig::default()
        };
        sup.start_job("j", root, &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            sup.status().await[0].processes[0].state,
            ProcessState::Failing
        );
        // Now something listens: an HTTP responder would do too; tcp suffices.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let accept = tokio::spawn(async move {
            loop {
                if listener.accept().await.is_err() {
                    break;
                }
            }
        });
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 4).await;
        assert_eq!(st[0].state, ProcessState::Running);
        sup.stop_all().await;
        accept.abort();
    }

    #[tokio::test]
    async fn http_probe_accepts_2xx_only() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let resp = if n == 0 {
                    "HTTP/1.0 204 No Content\r\n\r\n"
                } else {
                    "HTTP/1.0 503 Unavailable\r\n\r\n"
                };
                n += 1;
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let url = format!("http://127.0.0.1:{port}/health");
        assert!(http_get_ok(&url).await);
        assert!(!http_get_ok(&url).await);
        server.abort();
    }

    #[tokio::test]
    async fn group_is_killed_on_stop_and_stopped_jobs_stay_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let cfg = BpmConfig {
            processes: vec![proc("a", "sleep 1000 & wait", Some(1))],
            ..BpmConfig::default()
        };
        sup.start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        let pid = st[0].processes[0].pid.unwrap();
        assert!(tmp.path().join("sys/run/j/a.pid").exists());
        sup.stop_job("j").await.unwrap();
        let st = sup.status().await;
        assert_eq!(st[0].state, ProcessState::Stopped);
        assert!(!alive(pid));
        // No member of the group survives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let survivors = fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|p| matches!(proc_stat(*p), Some((s, _, g)) if g == pid && s != 'Z'))
            .count();
        assert_eq!(survivors, 0);
        assert!(!tmp.path().join("sys/run/j/a.pid").exists());
        sup.forget_job("j").await;
        assert!(sup.status().await.is_empty());
    }

    #[tokio::test]
    async fn invalid_configs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let cfg = BpmConfig {
            processes: vec![proc("a", "true", None), proc("a", "true", None)],
            ..BpmConfig::default()
        };
        let err = sup
            .start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("declared twice"), "{err}");
        let mut p = proc("b", "true", None);
        p.executable = "/nonexistent/bin/x".into();
        let err = sup
            .start_job(
                "j",
                tmp.path(),
                &JobProcess::from_bpm(&BpmConfig {
                    processes: vec![p],
                    ..BpmConfig::default()
                }),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[tokio::test]
    async fn leftover_groups_from_pid_files_are_killed() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        fs::create_dir_all(run.join("j")).unwrap();
        let mut child = Command::new("/bin/sh")
            .args(["-c", "sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        fs::write(run.join("j/p.pid"), format!("{pid}\n")).unwrap();
        // A pid file older than its process (a reused pid) does not count.
        let mut other = Command::new("/bin/sh")
            .args(["-c", "sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let other_pid = other.id().unwrap();
        let q = run.join("j/q.pid");
        fs::write(&q, format!("{other_pid}\n")).unwrap();
        let old = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
        fs::File::options()
            .write(true)
            .open(&q)
            .unwrap()
            .set_modified(old)
            .unwrap();
        // A file naming no live process goes.
        fs::write(run.join("j/dead.pid"), "999999999\n").unwrap();
        kill_leftovers(&run);
        assert!(!run.join("j/dead.pid").exists());
        assert!(q.exists(), "a live process's pidfile it did not kill stays");
        let st = tokio::time::timeout(Duration::from_secs(3), child.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!st.success());
        assert!(!run.join("j/p.pid").exists());
        assert!(
            other.try_wait().unwrap().is_none(),
            "unrelated process was killed"
        );
        kill_group(other_pid, libc::SIGKILL);
        let _ = other.wait().await;
    }

    fn write_script(path: &Path, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, body).unwrap();
        fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
    }

    fn program(command: String) -> Program {
        Program {
            command,
            timeout: Some(Duration::from_secs(5)),
            uid: None,
            gid: None,
        }
    }

    /// A ctl script in BOSH's style: `start` backgrounds the daemon and
    /// writes its pidfile; `stop` kills it and records that it ran.
    fn ctl_job(root: &Path, name: &str) -> JobProcess {
        let ctl = root.join(format!("jobs/j/bin/{name}_ctl"));
        let pidfile = root.join(format!("sys/run/j/{name}.pid"));
        let stopped = root.join(format!("{name}.stopped"));
        write_script(
            &ctl,
            &format!(
                "#!/bin/sh\ncase $1 in\n  start) sleep 1000 >/dev/null 2>&1 &\n    echo $! > {p} ;;\n  stop) kill $(cat {p}); rm -f {p}; echo \"$PATH\" >> {s} ;;\nesac\n",
                p = pidfile.display(),
                s = stopped.display()
            ),
        );
        JobProcess {
            name: name.to_string(),
            depends_on: Vec::new(),
            kind: ProcessKind::Ctl {
                pidfile,
                start: program(format!("{} start", ctl.display())),
                stop: Some(program(format!("{} stop", ctl.display()))),
            },
        }
    }

    #[tokio::test]
    async fn programs_run_as_the_user_and_group_monit_names() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("log");
        let as_user = |uid: Option<&str>, gid: Option<&str>| Program {
            command: "echo \"$(id -u):$(id -g)\"".into(),
            timeout: Some(Duration::from_secs(5)),
            uid: uid.map(str::to_string),
            gid: gid.map(str::to_string),
        };
        let (nobody, nobody_group) = lookup_user("nobody").unwrap();
        let root_gid = lookup_group("root").unwrap();
        assert_eq!(root_gid, 0);
        // SAFETY: getuid and getgid have no preconditions.
        let (me, my_group) = unsafe { (libc::getuid(), libc::getgid()) };
        // A user or group the VM lacks: the agent's own, and the log says so.
        for (uid, gid, why) in [
            (
                Some("no-such-user-x"),
                None,
                "as uid 'no-such-user-x': no such user on this VM",
            ),
            (
                Some("nobody"),
                Some("no-such-group-x"),
                "and gid 'no-such-group-x': no such group on this VM",
            ),
        ] {
            fs::write(&log, "").unwrap();
            run_program(&as_user(uid, gid), &log, Duration::from_secs(5))
                .await
                .unwrap();
            let text = fs::read_to_string(&log).unwrap();
            assert!(
                text.contains(&format!("bosun-agent: {why}: running")),
                "{text}"
            );
            assert!(text.ends_with(&format!("{me}:{my_group}\n")), "{text}");
        }
        if me != 0 {
            // Only root may become another user: the start fails, saying so.
            let err = run_program(&as_user(Some("nobody"), None), &log, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert!(err.contains("spawning"), "{err}");
            return;
        }
        for (uid, gid, want) in [
            (None, None, format!("{me}:{my_group}")),
            (Some("nobody"), None, format!("{nobody}:{nobody_group}")),
            (Some("nobody"), Some("root"), format!("{nobody}:0")),
            (Some("54321"), None, "54321:54321".to_string()),
        ] {
            fs::write(&log, "").unwrap();
            run_program(&as_user(uid, gid), &log, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(
                fs::read_to_string(&log).unwrap().trim(),
                want,
                "{uid:?} {gid:?}"
            );
        }
    }

    #[tokio::test]
    async fn ctl_process_runs_restarts_and_stops_through_its_programs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let sup = Supervisor::new(root.join("sys/log"));
        fs::create_dir_all(root.join("sys/run/j")).unwrap();
        let procs = vec![ctl_job(root, "d")];
        sup.start_job("j", &root.join("jobs/j"), &procs)
            .await
            .unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 5).await;
        assert_eq!(st[0].state, ProcessState::Running);
        let pid1 = st[0].processes[0].pid.unwrap();
        let named: u32 = fs::read_to_string(root.join("sys/run/j/d.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(pid1, named, "the pid the pidfile names is watched");
        assert!(alive(pid1));

        // SAFETY: test-only signal to a process this test started.
        unsafe { libc::kill(pid1 as i32, libc::SIGKILL) };
        let st = wait_for(
            &sup,
            |s| {
                let p = &s[0].processes[0];
                p.restarts >= 1
                    && p.pid.is_some_and(|p| p != pid1)
                    && s[0].state == ProcessState::Running
            },
            5,
        )
        .await;
        let p = &st[0].processes[0];
        assert!(p.restarts >= 1, "{p:?}");
        let pid2 = p.pid.unwrap();
        assert_ne!(pid2, pid1);
        assert!(alive(pid2));

        let t = Instant::now();
        sup.stop_job("j").await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        assert!(!alive(pid2));
        assert_eq!(sup.status().await[0].state, ProcessState::Stopped);
        let ran = fs::read_to_string(root.join("d.stopped")).unwrap();
        assert!(
            ran.contains("/var/vcap/bosh/bin"),
            "stop program PATH: {ran}"
        );
        assert!(!root.join("sys/run/j/d.pid").exists());
    }

    #[tokio::test]
    async fn ctl_process_already_running_is_adopted_not_started_again() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let sup = Supervisor::new(root.join("sys/log"));
        let mut running = Command::new("/bin/sh")
            .args(["-c", "exec sleep 1000"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = running.id().unwrap();
        let pidfile = root.join("d.pid");
        fs::write(&pidfile, format!("{pid}\n")).unwrap();
        let marker = root.join("started");
        let procs = vec![JobProcess {
            name: "d".into(),
            depends_on: Vec::new(),
            kind: ProcessKind::Ctl {
                pidfile,
                start: program(format!("touch {}", marker.display())),
                stop: None,
            },
        }];
        sup.start_job("j", root, &procs).await.unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        assert_eq!(st[0].processes[0].pid, Some(pid));
        assert!(!marker.exists(), "the start program ran");
        // Without a stop program, stop sends SIGTERM to the pid.
        sup.stop_all().await;
        let ended = tokio::time::timeout(Duration::from_secs(3), running.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(!ended.success());
    }

    #[tokio::test]
    async fn ctl_process_outliving_its_stop_program_is_killed_after_the_timeout() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let sup = Supervisor::new(root.join("sys/log"));
        let pidfile = root.join("d.pid");
        let procs = vec![JobProcess {
            name: "d".into(),
            depends_on: Vec::new(),
            kind: ProcessKind::Ctl {
                pidfile: pidfile.clone(),
                start: program(format!(
                    "sh -c 'trap \"\" TERM; while :; do sleep 0.1; done' >/dev/null 2>&1 & echo $! > {}",
                    pidfile.display()
                )),
                stop: Some(Program {
                    timeout: Some(Duration::from_secs(1)),
                    ..program("true".into())
                }),
            },
        }];
        sup.start_job("j", root, &procs).await.unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 5).await;
        let pid = st[0].processes[0].pid.unwrap();
        let t = Instant::now();
        sup.stop_all().await;
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert!(!alive(pid));
    }

    #[tokio::test]
    async fn ctl_start_that_writes_no_pidfile_fails_and_is_retried() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let procs = vec![JobProcess {
            name: "x".into(),
            depends_on: Vec::new(),
            kind: ProcessKind::Ctl {
                pidfile: tmp.path().join("never.pid"),
                start: program("exit 3".into()),
                stop: None,
            },
        }];
        sup.start_job("j", tmp.path(), &procs).await.unwrap();
        let st = wait_for(&sup, |s| s[0].processes[0].restarts >= 2, 5).await;
        assert_eq!(st[0].state, ProcessState::Failing);
        assert!(st[0].processes[0].restarts >= 2);
        let log = fs::read_to_string(tmp.path().join("sys/log/j/x.ctl.log")).unwrap();
        assert!(log.contains("exited with exit status: 3"), "{log}");
        sup.stop_all().await;
    }

    #[tokio::test]
    async fn dependencies_start_first_and_stop_last() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let sup = Supervisor::new(root.join("sys/log"));
        fs::create_dir_all(root.join("sys/run/j")).unwrap();
        let db = ctl_job(root, "db");
        let mut web = ctl_job(root, "web");
        web.depends_on = vec!["db".into()];
        // The dependent's start program records whether db was running.
        let db_pid = root.join("sys/run/j/db.pid");
        if let ProcessKind::Ctl { start, .. } = &mut web.kind {
            start.command = format!(
                "test -s {} && echo up > {}; {}",
                db_pid.display(),
                root.join("db-was-up").display(),
                start.command
            );
        }
        sup.start_job("j", &root.join("jobs/j"), &[db, web])
            .await
            .unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 5).await;
        assert_eq!(st[0].state, ProcessState::Running);
        assert!(root.join("db-was-up").exists(), "web started before db");
        sup.stop_job("j").await.unwrap();
        let t = |n: &str| fs::metadata(root.join(n)).unwrap().modified().unwrap();
        assert!(t("web.stopped") <= t("db.stopped"));
        // Stop waves: web (nothing depends on it) first.
        let probe = vec![
            JobProcess {
                name: "a".into(),
                depends_on: vec![],
                kind: ProcessKind::File {
                    path: "/x".into(),
                    start: None,
                    stop: None,
                },
            },
            JobProcess {
                name: "b".into(),
                depends_on: vec!["a".into()],
                kind: ProcessKind::File {
                    path: "/x".into(),
                    start: None,
                    stop: None,
                },
            },
            JobProcess {
                name: "c".into(),
                depends_on: vec!["b".into(), "a".into()],
                kind: ProcessKind::File {
                    path: "/x".into(),
                    start: None,
                    stop: None,
                },
            },
        ];
        let w = stop_waves(&probe);
        assert_eq!((w["c"], w["b"], w["a"]), (0, 1, 2));
    }

    #[tokio::test]
    async fn file_check_runs_while_its_path_exists() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let path = tmp.path().join("rules.check");
        let procs = vec![JobProcess {
            name: "rules".into(),
            depends_on: Vec::new(),
            kind: ProcessKind::File {
                path: path.clone(),
                start: Some(program(format!("touch {}", path.display()))),
                stop: Some(program(format!("rm {}", path.display()))),
            },
        }];
        sup.start_job("j", tmp.path(), &procs).await.unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 5).await;
        assert_eq!(st[0].state, ProcessState::Running);
        assert_eq!(st[0].processes[0].pid, None);
        // Gone: failing, then the start program brings it back.
        fs::remove_file(&path).unwrap();
        let st = wait_for(&sup, |s| s[0].processes[0].restarts >= 1, 5).await;
        assert!(st[0].processes[0].restarts >= 1);
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 5).await;
        assert_eq!(st[0].state, ProcessState::Running);
        sup.stop_job("j").await.unwrap();
        assert!(!path.exists(), "stop program ran");
    }

    #[tokio::test]
    async fn open_files_limit_applies_to_the_process() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let mut p = proc("p", "exec sleep 1000", Some(1));
        p.limits = Some(crate::protocol::BpmLimits {
            open_files: Some(2048),
            ..Default::default()
        });
        let cfg = BpmConfig {
            processes: vec![p],
            ..BpmConfig::default()
        };
        sup.start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        let pid = st[0].processes[0].pid.unwrap();
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&fields[3..5], &["2048", "2048"], "{line}");
        sup.stop_all().await;
    }

    #[tokio::test]
    async fn memory_limit_runs_the_process_with_or_without_a_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let mut p = proc("p", "exec sleep 1000", Some(1));
        p.limits = Some(crate::protocol::BpmLimits {
            memory: Some("64M".into()),
            ..Default::default()
        });
        let cfg = BpmConfig {
            processes: vec![p.clone()],
            ..BpmConfig::default()
        };
        sup.start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        assert_eq!(st[0].state, ProcessState::Running);
        let pid = st[0].processes[0].pid.unwrap();
        if let Ok(dir) = own_cgroup() {
            let cg = dir.join("bosun.j.p");
            if cg.exists() {
                let max = fs::read_to_string(cg.join("memory.max")).unwrap();
                assert_eq!(max.trim(), (64u64 << 20).to_string());
                let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap();
                assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
            }
        }
        sup.stop_all().await;
        p.limits = Some(crate::protocol::BpmLimits {
            memory: Some("lots".into()),
            ..Default::default()
        });
        let err = sup
            .start_job(
                "k",
                tmp.path(),
                &JobProcess::from_bpm(&BpmConfig {
                    processes: vec![p],
                    ..BpmConfig::default()
                }),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("limits.memory"), "{err}");
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("512M"), Ok(512 << 20));
        assert_eq!(parse_memory("1G"), Ok(1 << 30));
        assert_eq!(parse_memory("1GB"), Ok(1 << 30));
        assert_eq!(parse_memory("2gib"), Ok(2 << 30));
        assert_eq!(parse_memory("1.5K"), Ok(1536));
        assert_eq!(parse_memory("100B"), Ok(100));
        assert!(parse_memory("100").is_err());
        assert!(parse_memory("0M").is_err());
        assert!(parse_memory("1X").is_err());
        assert!(parse_memory("M").is_err());
    }

    #[tokio::test]
    async fn pre_start_hook_runs_before_the_process_and_fails_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let marker = tmp.path().join("hooked");
        let hook = tmp.path().join("bin/hook");
        write_script(
            &hook,
            &format!("#!/bin/sh\necho \"$GREETING\" >> {}\n", marker.display()),
        );
        let mut p = proc(
            "p",
            &format!("test -f {} || exit 9; exec sleep 1000", marker.display()),
            Some(1),
        );
        p.env.insert("GREETING".into(), "hello".into());
        p.hooks = Some(crate::protocol::BpmHooks {
            pre_start: Some(hook.display().to_string()),
            ..Default::default()
        });
        let cfg = BpmConfig {
            processes: vec![p.clone()],
            ..BpmConfig::default()
        };
        sup.start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "hello");
        let st = wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let again = sup.status().await;
        assert_eq!(again[0].processes[0].pid, st[0].processes[0].pid);
        assert_eq!(again[0].processes[0].restarts, 0);
        // Before a restart the hook runs again.
        let pid = st[0].processes[0].pid.unwrap();
        // SAFETY: test-only signal to a process this test started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let st = wait_for(
            &sup,
            |s| s[0].processes[0].restarts >= 1 && s[0].state == ProcessState::Running,
            5,
        )
        .await;
        assert_eq!(st[0].state, ProcessState::Running);
        assert_eq!(fs::read_to_string(&marker).unwrap(), "hello\nhello\n");
        sup.stop_all().await;

        write_script(&hook, "#!/bin/sh\necho hook says no\nexit 4\n");
        let err = sup
            .start_job("k", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap_err();
        match &err {
            SupervisorError::PreStart {
                process,
                output_tail,
                ..
            } => {
                assert_eq!(process, "p");
                assert_eq!(output_tail, "hook says no");
            }
            other => panic!("unexpected error {other}"),
        }
        assert!(err.to_string().contains("exit status: 4"), "{err}");
        assert!(sup.status().await.iter().all(|j| j.name != "k"));
    }

    #[tokio::test]
    async fn shutdown_signal_int_is_sent_instead_of_term() {
        let tmp = tempfile::tempdir().unwrap();
        let sup = Supervisor::new(tmp.path().join("sys/log"));
        let marker = tmp.path().join("signal");
        let script = format!(
            "trap 'echo INT > {}; exit 0' INT; trap '' TERM; while :; do sleep 0.1; done",
            marker.display()
        );
        let mut p = proc("p", &script, Some(5));
        p.shutdown_signal = Some(ShutdownSignal::Int);
        let cfg = BpmConfig {
            processes: vec![p],
            ..BpmConfig::default()
        };
        sup.start_job("j", tmp.path(), &JobProcess::from_bpm(&cfg))
            .await
            .unwrap();
        wait_for(&sup, |s| s[0].state == ProcessState::Running, 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let t = Instant::now();
        sup.stop_all().await;
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        assert_eq!(fs::read_to_string(&marker).unwrap().trim(), "INT");
    }

    #[test]
    fn aggregate_rules() {
        use ProcessState::*;
        assert_eq!(aggregate([Running, Running].into_iter()), Running);
        assert_eq!(aggregate([Running, Stopped].into_iter()), Stopped);
        assert_eq!(aggregate([Stopped, Failing].into_iter()), Failing);
        assert_eq!(aggregate([].into_iter()), Running);
    }
}

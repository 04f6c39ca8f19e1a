//! The process supervisor: starts every process a job's `bpm.yml` declares,
//! restarts it with exponential backoff when it dies while wanted, probes its
//! health, and stops it (SIGTERM to its process group, SIGKILL after its
//! shutdown timeout). Each process's stdout/stderr are appended to
//! `<root>/sys/log/<job>/<process>.{stdout,stderr}.log`; its pid is written
//! to `<root>/sys/run/<job>/<process>.pid`.
//!
//! It owns only the processes it spawned. It must not lay down files, read
//! specs, or decide *when* jobs start or stop: the agent tells it. It never
//! logs process environments (they may carry secrets).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::protocol::{BpmConfig, HealthProbe, JobStatus, ProcessState, ProcessStatus};

/// First restart delay.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest restart delay.
const BACKOFF_CAP: Duration = Duration::from_secs(10);
/// Uptime after which a crash starts again from [`BACKOFF_START`].
const GOOD_UPTIME: Duration = Duration::from_secs(30);
/// Default seconds between SIGTERM and SIGKILL.
const DEFAULT_SHUTDOWN_SECS: u64 = 10;
/// Interval and timeout of health probes.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

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
    stop_tx: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct ProcShared {
    wanted: bool,
    pid: Option<u32>,
    started_at: Option<Instant>,
    healthy: bool,
    restarts: u32,
}

/// Everything needed to (re)spawn one process.
#[derive(Clone)]
struct ProcSpec {
    job: String,
    name: String,
    executable: PathBuf,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: PathBuf,
    stdout: PathBuf,
    stderr: PathBuf,
    pid_file: PathBuf,
    shutdown: Duration,
    health: Option<HealthProbe>,
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

    /// (Re)starts every process of `job` as `cfg` declares; a job with no
    /// processes counts as running while wanted.
    pub async fn start_job(
        &self,
        job: &str,
        job_dir: &Path,
        cfg: &BpmConfig,
    ) -> Result<(), SupervisorError> {
        let specs = self.build_specs(job, job_dir, cfg)?;
        let _guard = self.inner.control.lock().await;
        self.stop_locked(job).await;
        let log_dir = self.inner.log_root.join(job);
        fs::create_dir_all(&log_dir).map_err(|source| SupervisorError::Io {
            job: job.to_string(),
            op: format!("creating log dir {}", log_dir.display()),
            source,
        })?;
        let run_dir = self.inner.run_root.join(job);
        fs::create_dir_all(&run_dir).map_err(|source| SupervisorError::Io {
            job: job.to_string(),
            op: format!("creating run dir {}", run_dir.display()),
            source,
        })?;
        let mut procs = Vec::with_capacity(specs.len());
        for spec in specs {
            let shared = Arc::new(Mutex::new(ProcShared {
                wanted: true,
                ..ProcShared::default()
            }));
            let (stop_tx, stop_rx) = watch::channel(false);
            let name = spec.name.clone();
            let task = tokio::spawn(run_process(spec, shared.clone(), stop_rx));
            procs.push(ProcEntry {
                name,
                shared,
                stop_tx,
                task: Some(task),
            });
        }
        tracing::info!(job, processes = procs.len(), "started job");
        lock(&self.inner.jobs).insert(
            job.to_string(),
            JobEntry {
                wanted: true,
                procs,
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

    /// Stops every process of every job (concurrently) and waits for them.
    pub async fn stop_all(&self) {
        let _guard = self.inner.control.lock().await;
        let mut tasks = Vec::new();
        {
            let mut jobs = lock(&self.inner.jobs);
            for entry in jobs.values_mut() {
                tasks.extend(signal_stop(entry));
            }
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Whether `job` is currently wanted up (started and not stopped since).
    pub async fn is_wanted(&self, job: &str) -> bool {
        lock(&self.inner.jobs).get(job).is_some_and(|j| j.wanted)
    }

    /// Per-job and per-process state, jobs sorted by name, processes in
    /// `bpm.yml` order.
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
                        } else if s.pid.is_some() && s.healthy {
                            ProcessState::Running
                        } else {
                            ProcessState::Failing
                        };
                        ProcessStatus {
                            name: p.name.clone(),
                            state,
                            pid: s.pid,
                            uptime_secs: s.pid.and(s.started_at).map(|t| t.elapsed().as_secs()),
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
        let tasks = {
            let mut jobs = lock(&self.inner.jobs);
            match jobs.get_mut(job) {
                Some(entry) => signal_stop(entry),
                None => Vec::new(),
            }
        };
        for t in tasks {
            let _ = t.await;
        }
    }

    fn build_specs(
        &self,
        job: &str,
        job_dir: &Path,
        cfg: &BpmConfig,
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
        for p in &cfg.processes {
            if !valid_name(&p.name) {
                return Err(invalid(format!("invalid process name {:?}", p.name)));
            }
            if !seen.insert(p.name.clone()) {
                return Err(invalid(format!("process {} declared twice", p.name)));
            }
            if p.executable.is_empty() {
                return Err(invalid(format!("process {} has no executable", p.name)));
            }
            let exe = PathBuf::from(&p.executable);
            let executable = if exe.is_absolute() || !p.executable.contains('/') {
                exe
            } else {
                job_dir.join(exe)
            };
            if executable.is_absolute() && !executable.exists() {
                return Err(invalid(format!(
                    "process {}: executable {} does not exist",
                    p.name,
                    executable.display()
                )));
            }
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
            let log_dir = self.inner.log_root.join(job);
            specs.push(ProcSpec {
                job: job.to_string(),
                name: p.name.clone(),
                executable,
                args: p.args.clone(),
                env,
                cwd,
                stdout: log_dir.join(format!("{}.stdout.log", p.name)),
                stderr: log_dir.join(format!("{}.stderr.log", p.name)),
                pid_file: self
                    .inner
                    .run_root
                    .join(job)
                    .join(format!("{}.pid", p.name)),
                shutdown: Duration::from_secs(p.shutdown_timeout.unwrap_or(DEFAULT_SHUTDOWN_SECS)),
                health: p.health.clone(),
            });
        }
        Ok(specs)
    }
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

/// Marks the job unwanted, signals its process tasks, and returns them to await.
fn signal_stop(entry: &mut JobEntry) -> Vec<JoinHandle<()>> {
    entry.wanted = false;
    let mut tasks = Vec::new();
    for p in &mut entry.procs {
        lock(&p.shared).wanted = false;
        let _ = p.stop_tx.send(true);
        if let Some(t) = p.task.take() {
            tasks.push(t);
        }
    }
    tasks
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

fn spawn_child(spec: &ProcSpec) -> std::io::Result<Child> {
    let open = |p: &Path| OpenOptions::new().create(true).append(true).open(p);
    let out = open(&spec.stdout)?;
    let err = open(&spec.stderr)?;
    let mut cmd = Command::new(&spec.executable);
    cmd.args(&spec.args)
        .env_clear()
        .envs(&spec.env)
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(false);
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            // A freshly written executable may be briefly busy (ETXTBSY) while
            // another thread's fork still holds it open.
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 10 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
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

/// One process's life: spawn, watch, restart with backoff, stop on request.
async fn run_process(
    spec: ProcSpec,
    shared: Arc<Mutex<ProcShared>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_START;
    loop {
        if *stop.borrow() {
            break;
        }
        let mut child = match spawn_child(&spec) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(job = %spec.job, process = %spec.name, error = %e, "spawning process failed");
                append_note(
                    &spec.stderr,
                    &format!(
                        "bosun-agent: spawning {} failed: {e}\n",
                        spec.executable.display()
                    ),
                );
                if sleep_or_stop(backoff, &mut stop).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
                lock(&shared).restarts += 1;
                continue;
            }
        };
        let Some(pid) = child.id() else {
            // Already reaped: treat as an immediate exit.
            let _ = child.wait().await;
            if sleep_or_stop(backoff, &mut stop).await {
                break;
            }
            backoff = (backoff * 2).min(BACKOFF_CAP);
            lock(&shared).restarts += 1;
            continue;
        };
        let started = Instant::now();
        {
            let mut s = lock(&shared);
            s.pid = Some(pid);
            s.started_at = Some(started);
            s.healthy = spec.health.is_none();
        }
        if let Err(e) = fs::write(&spec.pid_file, format!("{pid}\n")) {
            // Without it, an agent restarted meanwhile cannot find this group.
            tracing::warn!(job = %spec.job, process = %spec.name, file = %spec.pid_file.display(), error = %e, "writing the pid file failed");
        }
        let probe = spec
            .health
            .clone()
            .map(|h| tokio::spawn(probe_loop(h, shared.clone())));

        let exited = tokio::select! {
            st = child.wait() => Some(st),
            _ = stop.changed() => None,
        };
        if let Some(p) = probe {
            p.abort();
        }
        match exited {
            None => {
                terminate(&mut child, pid, spec.shutdown).await;
                let mut s = lock(&shared);
                s.pid = None;
                s.healthy = false;
                break;
            }
            Some(status) => {
                // Leftovers of the group (e.g. backgrounded children) go too.
                kill_group(pid, libc::SIGKILL);
                let uptime = started.elapsed();
                {
                    let mut s = lock(&shared);
                    s.pid = None;
                    s.healthy = false;
                }
                match &status {
                    Ok(st) => {
                        tracing::warn!(job = %spec.job, process = %spec.name, status = %st, uptime_ms = uptime.as_millis() as u64, "process exited")
                    }
                    Err(e) => {
                        tracing::warn!(job = %spec.job, process = %spec.name, error = %e, "waiting for process failed")
                    }
                }
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
    remove_pid_file(&spec.pid_file);
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

/// SIGTERM to the group, wait up to `timeout`, then SIGKILL; always reaps.
async fn terminate(child: &mut Child, pid: u32, timeout: Duration) {
    kill_group(pid, libc::SIGTERM);
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        tracing::warn!(pid, "process ignored SIGTERM; sending SIGKILL");
        kill_group(pid, libc::SIGKILL);
        let _ = child.wait().await;
    }
    // Whatever else is left in the group.
    kill_group(pid, libc::SIGKILL);
}

fn append_note(path: &Path, note: &str) {
    use std::io::Write;
    if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(path) {
        let _ = f.write_all(note.as_bytes());
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
/// files under `run_root` (only pids that still lead their own group).
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
    use crate::protocol::BpmProcess;

    fn proc(name: &str, script: &str, shutdown: Option<u64>) -> BpmProcess {
        BpmProcess {
            name: name.to_string(),
            executable: "/bin/sh".to_string(),
            args: vec!["-c".to_string(), script.to_string()],
            env: BTreeMap::new(),
            workdir: None,
            shutdown_timeout: shutdown,
            health: None,
        }
    }

    fn alive(pid: u32) -> bool {
        matches!(proc_stat(pid), Some((s, _, _)) if s != 'Z')
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
        let cfg = BpmConfig { processes: vec![p] };
        sup.start_job("j", root, &cfg).await.unwrap();
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
        };
        sup.start_job("j", tmp.path(), &cfg).await.unwrap();
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
        };
        let err = sup.start_job("j", tmp.path(), &cfg).await.unwrap_err();
        assert!(err.to_string().contains("declared twice"), "{err}");
        let mut p = proc("b", "true", None);
        p.executable = "/nonexistent/bin/x".into();
        let err = sup
            .start_job("j", tmp.path(), &BpmConfig { processes: vec![p] })
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
        kill_leftovers(&run);
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

    #[test]
    fn aggregate_rules() {
        use ProcessState::*;
        assert_eq!(aggregate([Running, Running].into_iter()), Running);
        assert_eq!(aggregate([Running, Stopped].into_iter()), Stopped);
        assert_eq!(aggregate([Stopped, Failing].into_iter()), Failing);
        assert_eq!(aggregate([].into_iter()), Running);
    }
}

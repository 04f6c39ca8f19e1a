//! Running job scripts (pre-start, drain, post-start, errands, packaging):
//! a clean environment, its own process group, stdout and stderr into one
//! file, a timeout that kills the whole group, and the tail of the output
//! kept for the director.
//!
//! It must not lay files down or decide which scripts run (that is the
//! action handler), and must never log a script's environment (it may carry
//! secrets).

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::Command;

use super::layout::remove_leftover;
use super::{io_fail, rand_suffix};
use crate::protocol::{ActionFailure, DrainKind};
use crate::supervisor::{self, DEFAULT_PATH};

/// Lines of output kept from a failed pre-start / lifecycle script.
pub(super) const SCRIPT_TAIL_LINES: usize = 30;
/// Lines of an errand's (`bin/run`) output returned to the director.
pub(super) const ERRAND_TAIL_LINES: usize = 2000;
/// Lines of output kept from a packaging script.
pub(super) const COMPILE_TAIL_LINES: usize = 40;
/// Bytes of script output read back (the tail is cut from these).
const OUTPUT_READ_BYTES: u64 = 64 * 1024;

pub(super) fn tail_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What a script run produced.
pub(super) struct ScriptRun {
    pub(super) exit_code: i32,
    /// Combined stdout+stderr (its last 64 KiB).
    pub(super) output: String,
    /// How many bytes of output it wrote in all.
    pub(super) output_bytes: u64,
    pub(super) timed_out: bool,
}

/// What a job script needs, cheap to move into a task.
#[derive(Clone)]
pub(super) struct ScriptCtx {
    pub(super) root: PathBuf,
}

impl ScriptCtx {
    pub(super) fn env(&self, cmd: &mut Command, extra: &[(String, String)]) {
        cmd.env_clear()
            .env("PATH", DEFAULT_PATH)
            .env("HOME", &self.root)
            .env("LANG", "C.UTF-8");
        for (k, v) in extra {
            cmd.env(k, v);
        }
    }

    /// `bash -e packaging` in `compile_dir` with the BOSH compilation
    /// environment (the package builds into `install`; its dependencies are
    /// under `packages/`).
    pub(super) fn packaging(
        &self,
        compile_dir: &Path,
        install: &Path,
        name: &str,
        version: &str,
    ) -> Command {
        let bash = ["/bin/bash", "/usr/bin/bash"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("bash");
        let mut cmd = Command::new(bash);
        cmd.arg("-e").arg("packaging").current_dir(compile_dir);
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
            ("BOSH_PACKAGE_NAME".into(), name.to_string()),
            ("BOSH_PACKAGE_VERSION".into(), version.to_string()),
        ];
        self.env(&mut cmd, &env);
        cmd
    }

    /// Runs `<dir>/bin/<script> args...` in `dir`; its output is also
    /// appended to `sys/log/<job>/<script>.log`.
    pub(super) async fn run(
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
    pub(super) async fn run_to(
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
        if let Err(e) = append_log(&log_dir, script, &run.output) {
            tracing::warn!(job = %job, script = %script, error = %e, "keeping the script's output in its log failed");
        }
        Ok(run)
    }
}

/// Appends a script's output to `<log_dir>/<script>.log`.
fn append_log(log_dir: &Path, script: &str, output: &str) -> io::Result<()> {
    fs::create_dir_all(log_dir)?;
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_dir.join(format!("{script}.log")))?
        .write_all(output.as_bytes())
}

/// Spawns `cmd` in its own process group with stdout+stderr into one file
/// under `tmp_dir`, waits (killing the group on timeout) and reads the output.
/// A file of a random name is removed afterwards; one named by `out_name`
/// (followed by the director while it is written) is left for its follower
/// to read to the end, and the director removes it.
pub(super) async fn run_command(
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
        let output_bytes = fs::metadata(&out_path)?.len();
        Ok(ScriptRun {
            exit_code,
            output,
            output_bytes,
            timed_out,
        })
    }
    .await;
    drop(out);
    if out_name.is_none() {
        remove_leftover(&out_path);
    }
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
pub(super) async fn drain_job(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packaging_runs_bash_in_the_compile_dir_with_the_bosh_environment() {
        let ctx = ScriptCtx {
            root: PathBuf::from("/var/vcap"),
        };
        let compile_dir = Path::new("/var/vcap/data/compile/app");
        let cmd = ctx.packaging(
            compile_dir,
            Path::new("/var/vcap/packages/app"),
            "app",
            "fp1",
        );
        let cmd = cmd.as_std();
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["-e", "packaging"]);
        assert_eq!(cmd.get_current_dir(), Some(compile_dir));
        let env: std::collections::BTreeMap<String, String> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
            .collect();
        for (k, v) in [
            ("BOSH_COMPILE_TARGET", "/var/vcap/data/compile/app"),
            ("BOSH_INSTALL_TARGET", "/var/vcap/packages/app"),
            ("BOSH_PACKAGES_DIR", "/var/vcap/packages"),
            ("BOSH_PACKAGE_NAME", "app"),
            ("BOSH_PACKAGE_VERSION", "fp1"),
            ("PATH", DEFAULT_PATH),
            ("HOME", "/var/vcap"),
        ] {
            assert_eq!(env.get(k).map(String::as_str), Some(v), "{k}");
        }
    }

    #[test]
    fn last_lines() {
        assert_eq!(tail_lines("a\nb\nc\n", 2), "b\nc");
    }
}

//! Logging and task logs: the tracing set-up (stderr, and while a task runs
//! its `debug.log` and `cpi.log`), the task's `event.log` (what the command
//! printed), which commands are recorded as tasks (`task_of`), and opening
//! and closing a task's record around a command (`start`, `finish`).
//! It must not decide what a command does or print anything but warnings.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};

use bosun_director::{now, Store, TaskRecord};

use crate::cli::{Cli, Command};

/// Tracing to stderr (`BOSUN_LOG`, default info for the agent and warn for
/// the CLI), and the director's and CPIs' debug lines to the running task's
/// logs.
pub fn init_logging(agent: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOSUN_LOG").unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(if agent { "info" } else { "warn" })
    });
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    // A running task's logs: the director's (debug.log) and the CPI calls (cpi.log).
    let debug = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(TaskLog::Debug)
        .with_filter(Targets::new().with_target("bosun", LevelFilter::DEBUG));
    let cpi = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(TaskLog::Cpi)
        .with_filter(Targets::new().with_target("bosun_cpi", LevelFilter::DEBUG));
    // This fails only when a subscriber is already set, and then that one
    // stays in force: nothing to report.
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(debug)
        .with(cpi)
        .try_init();
}

/// The open log files of the task this process runs, if any.
static TASK_LOGS: Mutex<Option<TaskFiles>> = Mutex::new(None);

/// Whether a failed write to the event log was reported already (once is enough).
static EVENT_LOG_FAILED: AtomicBool = AtomicBool::new(false);

struct TaskFiles {
    event: std::fs::File,
    debug: std::fs::File,
    cpi: std::fs::File,
}

/// Which task log a tracing layer writes to.
#[derive(Clone, Copy)]
enum TaskLog {
    Event,
    Debug,
    Cpi,
}

impl Write for TaskLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut guard = TASK_LOGS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(files) = guard.as_mut() {
            let f = match self {
                TaskLog::Event => &mut files.event,
                TaskLog::Debug => &mut files.debug,
                TaskLog::Cpi => &mut files.cpi,
            };
            f.write_all(buf)?;
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TaskLog {
    type Writer = TaskLog;
    fn make_writer(&'a self) -> TaskLog {
        *self
    }
}

/// Append a line to the running task's event log (what the command printed).
pub fn task_event_line(line: &str) {
    if let Err(e) = writeln!(TaskLog::Event, "{line}") {
        if !EVENT_LOG_FAILED.swap(true, Ordering::Relaxed) {
            eprintln!("warning: writing the task's event log: {e}");
        }
    }
}

/// The task a command is recorded as, if it changes anything: its
/// description and deployment.
pub fn task_of(cli: &Cli) -> Option<(String, Option<String>)> {
    let d = cli.deployment.clone();
    let path = |p: &PathBuf| p.display().to_string();
    let what = match &cli.command {
        Command::Deploy {
            manifest,
            dry_run: false,
            ..
        } => {
            // The deployment is named in the manifest.
            return Some((format!("deploy {}", path(manifest)), None));
        }
        Command::DeleteDeployment => "delete-deployment".to_string(),
        Command::Start { instance } => format!("start {}", instance.as_deref().unwrap_or("")),
        Command::Stop { instance, hard, .. } => format!(
            "stop {}{}",
            instance.as_deref().unwrap_or(""),
            if *hard { " --hard" } else { "" }
        ),
        Command::Restart { instance, .. } => {
            format!("restart {}", instance.as_deref().unwrap_or(""))
        }
        Command::Recreate { instance, .. } => {
            format!("recreate {}", instance.as_deref().unwrap_or(""))
        }
        Command::RunErrand { name, .. } => format!("run-errand {name}"),
        Command::CloudCheck { report: false, .. } => "cloud-check".to_string(),
        Command::DeleteDisk { cid } => return Some((format!("delete-disk {cid}"), None)),
        Command::AttachDisk { instance, cid } => format!("attach-disk {instance} {cid}"),
        Command::CleanUp { all } => {
            let what = if *all { "clean-up --all" } else { "clean-up" };
            return Some((what.into(), None));
        }
        Command::UploadRelease { path: p, .. } => {
            return Some((format!("upload-release {}", path(p)), None))
        }
        Command::UploadStemcell { path: p } => {
            return Some((format!("upload-stemcell {}", path(p)), None))
        }
        _ => return None,
    };
    Some((what.trim_end().to_string(), d))
}

/// Record a task for the command about to run and send its logs to the
/// task's directory until `finish`.
pub fn start(
    store: &Store,
    description: &str,
    deployment: Option<&str>,
    json: bool,
) -> Result<TaskRecord> {
    let task = store.create_task(description, deployment)?;
    let dir = store.task_dir(task.id);
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))
            .with_context(|| format!("opening the log of task {}", task.id))
    };
    *TASK_LOGS.lock().unwrap_or_else(|e| e.into_inner()) = Some(TaskFiles {
        event: open("event.log")?,
        debug: open("debug.log")?,
        cpi: open("cpi.log")?,
    });
    if !json {
        eprintln!("Task {}: {description}", task.id);
    }
    Ok(task)
}

/// Close the task's logs and record how the command ended.
pub fn finish(store: &Store, mut task: TaskRecord, result: &Result<i32>) -> Result<()> {
    task.ended_at = Some(now());
    match result {
        Ok(0) => {
            task.state = "done".into();
        }
        Ok(code) => {
            task.state = "error".into();
            task.result = format!("exit code {code}");
        }
        Err(e) => {
            let msg = format!("{e:#}");
            task.state = if msg.contains("cancelled") {
                "cancelled"
            } else {
                "error"
            }
            .into();
            task_event_line(&format!("Error: {msg}"));
            task.result = msg;
        }
    }
    if task.result.is_empty() {
        task.result = "ok".into();
    }
    *TASK_LOGS.lock().unwrap_or_else(|e| e.into_inner()) = None;
    store.save_task(&task)?;
    Ok(())
}

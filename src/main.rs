//! `bosun`: the command line. Parses arguments, wires the CPI backends into
//! the director, prints. Everything else lives in the libraries:
//! `bosun-director` (operations), `bosun-agent` (the agent, run by
//! `bosun agent`), `bosun-cpi-*` (backends).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use bosun_cpi_aws::{AwsCpi, AwsCpiConfig};
use bosun_cpi_docker::{DockerCpi, DockerCpiConfig};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};
use bosun_director::cloudcheck::{CheckProblem, Resolution, Scan};
use bosun_director::diff::{DiffLine, DiffTag};
use bosun_director::executor::{Cpis, ExecOptions, Progress};
use bosun_director::monitor::Monitor;
use bosun_director::ops::{DeployOptions, Director, InstanceInfo, Report, StateChange};
use bosun_director::planner::Plan;
use bosun_director::state::Store;

#[derive(Parser)]
#[command(
    name = "bosun",
    version,
    about = "Deploy and keep alive distributed systems, the BOSH way"
)]
struct Cli {
    /// Where the director keeps its state.
    #[arg(long, global = true, env = "BOSUN_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Deployment name.
    #[arg(
        short = 'd',
        long = "deployment",
        global = true,
        env = "BOSUN_DEPLOYMENT",
        value_parser = deployment_name
    )]
    deployment: Option<String>,
    /// Non-interactive: do not ask for confirmation.
    #[arg(short = 'n', long = "non-interactive", global = true)]
    non_interactive: bool,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deploy a manifest: plan the changes, confirm, converge.
    Deploy {
        manifest: PathBuf,
        /// Print the manifest diff and the plan, and stop.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        vars: VarArgs,
        /// Generate this variable anew (repeatable).
        #[arg(long, value_name = "NAME")]
        regenerate: Vec<String>,
    },
    /// Apply ops files and variables to a YAML file and print it (as `bosh interpolate`).
    Interpolate {
        file: PathBuf,
        #[command(flatten)]
        vars: VarArgs,
        /// Generate declared variables into this YAML file and keep them there.
        #[arg(long, value_name = "FILE")]
        vars_store: Option<PathBuf>,
        /// Print only the value at this path (e.g. /instance_groups/name=kv/instances).
        #[arg(long)]
        path: Option<String>,
        /// Fail when a variable has no value (listing all of them).
        #[arg(long)]
        var_errs: bool,
    },
    /// List the generated variables of a deployment (-d): names and ids, never values.
    Variables,
    /// List deployments.
    Deployments,
    /// List the instances of a deployment (-d) with their live state.
    Instances {
        /// Show each process.
        #[arg(long)]
        ps: bool,
        /// Show load, memory and disk use.
        #[arg(long)]
        vitals: bool,
        /// Show the agent id, VM creation time and disk size.
        #[arg(long)]
        details: bool,
    },
    /// Start instances of a deployment (-d): a whole deployment, a group or one instance.
    Start {
        /// GROUP, GROUP/ID or GROUP/INDEX (default: every instance).
        instance: Option<String>,
    },
    /// Stop instances (drain, stop jobs); --hard also deletes the VM, keeping disk and IPs.
    Stop {
        instance: Option<String>,
        #[arg(long)]
        hard: bool,
        #[arg(long)]
        skip_drain: bool,
    },
    /// Stop and start instances again.
    Restart {
        instance: Option<String>,
        #[arg(long)]
        skip_drain: bool,
    },
    /// Give instances new VMs with the same IPs, disks and spec.
    Recreate {
        instance: Option<String>,
        #[arg(long)]
        skip_drain: bool,
    },
    /// Run an errand of a deployment (-d): an errand group (a VM for each
    /// instance, its jobs' bin/run, the VM deleted afterwards unless
    /// --keep-alive) or an errand job colocated on running instances (its
    /// bin/run on each at once). Output streams as it is written. Exits with
    /// the errand's exit code.
    RunErrand {
        name: String,
        #[arg(long)]
        keep_alive: bool,
        /// Only on these instances, GROUP or GROUP/ID or GROUP/INDEX (repeatable).
        #[arg(long = "instance", value_name = "INSTANCE")]
        instances: Vec<String>,
    },
    /// Open an interactive shell on one instance of a deployment (-d), or
    /// with -c run a command on every matching instance through their agents,
    /// printing each output line with its instance. Exits with the shell's
    /// exit status, or the first non-zero one of the command.
    Ssh {
        /// GROUP, GROUP/ID or GROUP/INDEX (with -c, default: every instance).
        instance: Option<String>,
        #[arg(short = 'c', long = "command")]
        command: Option<String>,
    },
    /// Copy a file to or from instances of a deployment (-d): `scp FILE
    /// GROUP[/ID]:PATH` writes it on every matching instance, `scp
    /// GROUP/ID:PATH FILE` reads it from one.
    Scp { from: String, to: String },
    /// Fetch job logs of a deployment's instances (-d) as tarballs.
    Logs {
        /// GROUP, GROUP/ID or GROUP/INDEX (default: every instance).
        instance: Option<String>,
        /// Only this job's logs (repeatable).
        #[arg(long = "job")]
        jobs: Vec<String>,
        /// Where to write the tarballs.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Follow the logs of all matching instances live, each line with
        /// its instance, until Ctrl-C.
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// List persistent disks no instance owns any more.
    Disks {
        /// Orphaned disks (the only kind listed for now; kept for BOSH compatibility).
        #[arg(long)]
        orphaned: bool,
    },
    /// Give a hard-stopped instance (-d) an orphaned disk; `start` mounts it.
    AttachDisk { instance: String, cid: String },
    /// Delete an orphaned disk and its data.
    DeleteDisk { cid: String },
    /// Delete release versions, stemcells and compiled packages no
    /// deployment uses, keeping the two newest unused versions of each;
    /// --all keeps none and deletes every orphaned disk too.
    CleanUp {
        #[arg(long)]
        all: bool,
    },
    /// List tasks (director operations): the running ones, or with --recent the last N.
    Tasks {
        #[arg(long, num_args = 0..=1, default_missing_value = "30", value_name = "N")]
        recent: Option<usize>,
    },
    /// Show a task's log: what it printed, or --debug the director's log, or --cpi every CPI call.
    Task {
        id: i64,
        #[arg(long, conflicts_with = "cpi")]
        debug: bool,
        #[arg(long)]
        cpi: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Delete a deployment (-d): VMs deleted, persistent disks orphaned.
    DeleteDeployment,
    /// Watch deployments (one with -d, else all) and repair them: restart
    /// failing jobs, recreate lost or silent VMs, alert. Runs until stopped.
    Monitor {
        /// Stop after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
    },
    /// Find problems of a deployment (-d) and resolve them.
    CloudCheck {
        /// Only list the problems (exit code 1 when there are any).
        #[arg(long)]
        report: bool,
        /// Apply each problem's default resolution.
        #[arg(long)]
        auto: bool,
        /// Resolve problem ID with RESOLUTION (repeatable), e.g. `--resolution 2=delete-vm`.
        #[arg(long = "resolution", value_name = "ID=RESOLUTION")]
        resolutions: Vec<String>,
    },
    /// List events: what was seen, what was done, with what result.
    Events {
        /// Only events of this instance (`group/id`).
        #[arg(long)]
        instance: Option<String>,
    },
    /// Build a release tarball from a BOSH-layout release directory.
    CreateRelease {
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Where to write the tarball (default: <name>-<version>.tgz).
        #[arg(long)]
        tarball: Option<PathBuf>,
        /// Release version (default: 0+dev.<content digest>).
        #[arg(long)]
        version: Option<String>,
    },
    /// Upload a release (directory or tarball).
    UploadRelease {
        path: PathBuf,
        #[arg(long)]
        version: Option<String>,
    },
    /// List uploaded releases.
    Releases,
    /// List uploaded stemcells.
    Stemcells,
    /// Build a stemcell tarball for the Docker CPI from a debootstrap rootfs
    /// with this bosun executable as its agent (needs root and debootstrap).
    BuildStemcell {
        #[arg(long, default_value = "debian-bookworm")]
        os: String,
        /// Extra Debian packages, comma separated.
        #[arg(long, value_delimiter = ',')]
        include: Vec<String>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        version: Option<String>,
        /// Where debootstrapped base root filesystems are cached.
        #[arg(long)]
        cache: Option<PathBuf>,
        #[arg(long, default_value = "http://deb.debian.org/debian")]
        mirror: String,
    },
    /// Upload a stemcell tarball to the CPIs that take its format.
    UploadStemcell { path: PathBuf },
    /// Print the cloud-config in force.
    CloudConfig,
    /// Upload a cloud-config.
    UpdateCloudConfig { file: PathBuf },
    /// Print the runtime-config in force.
    RuntimeConfig,
    /// Upload a runtime-config (addons for every deployment, from the next deploy on).
    UpdateRuntimeConfig { file: PathBuf },
    /// Run the agent of a VM (started by CPIs, not by operators).
    #[command(hide = true)]
    Agent {
        #[arg(long)]
        settings: PathBuf,
        /// Local CPI: enter a VM namespace with this directory at /var/vcap.
        #[arg(long)]
        vm_root: Option<PathBuf>,
    },
}

/// Ops files and variable sources, as `bosh interpolate` and `bosh deploy` take them.
#[derive(clap::Args, Clone, Debug, Default)]
struct VarArgs {
    /// Ops file to apply (repeatable, in order).
    #[arg(short = 'o', long = "ops-file", value_name = "FILE")]
    ops_files: Vec<PathBuf>,
    /// A variable: NAME=VALUE (repeatable).
    #[arg(short = 'v', long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// A YAML file of variables (repeatable; later files win).
    #[arg(short = 'l', long = "vars-file", value_name = "FILE")]
    vars_files: Vec<PathBuf>,
    /// Read variables from environment variables PREFIX_name.
    #[arg(long = "vars-env", value_name = "PREFIX")]
    vars_env: Vec<String>,
}

impl VarArgs {
    fn options(&self) -> Result<bosun_director::interpolate::InterpolateOptions> {
        let read = |p: &PathBuf| {
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))
                .map(|t| (p.display().to_string(), t))
        };
        let mut vars = Vec::new();
        for v in &self.vars {
            let (k, val) = v
                .split_once('=')
                .with_context(|| format!("-v {v}: expected NAME=VALUE"))?;
            vars.push((k.to_string(), val.to_string()));
        }
        Ok(bosun_director::interpolate::InterpolateOptions {
            ops_files: self.ops_files.iter().map(read).collect::<Result<_>>()?,
            vars,
            var_files: self.vars_files.iter().map(read).collect::<Result<_>>()?,
            vars_env: self.vars_env.clone(),
            ..Default::default()
        })
    }
}

fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("bosun");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/bosun");
    }
    PathBuf::from(".bosun-state")
}

fn main() {
    let cli = Cli::parse();
    // The agent enters its VM namespace before any thread exists.
    if let Command::Agent {
        vm_root: Some(root),
        ..
    } = &cli.command
    {
        if let Err(e) = bosun_cpi_local::enter_vm_namespace(root) {
            eprintln!("bosun agent: {e}");
            std::process::exit(1);
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bosun: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("Error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn init_logging(agent: bool) {
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
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(debug)
        .with(cpi)
        .try_init();
}

/// The open log files of the task this process runs, if any.
static TASK_LOGS: std::sync::Mutex<Option<TaskFiles>> = std::sync::Mutex::new(None);

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

impl std::io::Write for TaskLog {
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
fn task_event_line(line: &str) {
    use std::io::Write;
    let _ = writeln!(TaskLog::Event, "{line}");
}

/// The task a command is recorded as, if it changes anything: its
/// description and deployment.
fn task_of(cli: &Cli) -> Option<(String, Option<String>)> {
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

async fn run(cli: Cli) -> Result<i32> {
    if let Command::Agent { settings, .. } = &cli.command {
        init_logging(true);
        bosun_agent::agent::run_from_settings_file(settings)
            .await
            .context("running the agent")?;
        return Ok(0);
    }
    init_logging(false);
    let state_dir = cli.state_dir.clone().unwrap_or_else(default_state_dir);
    let store = Store::open(&state_dir)?;
    let Some((description, deployment)) = task_of(&cli) else {
        return run_command(cli, store).await;
    };
    let mut task = store.create_task(&description, deployment.as_deref())?;
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
    if !cli.json {
        eprintln!("Task {}: {description}", task.id);
    }
    let result = run_command(cli, store.clone()).await;
    task.ended_at = Some(bosun_director::state::now());
    match &result {
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
    result
}

async fn run_command(cli: Cli, store: Arc<Store>) -> Result<i32> {
    // upload-stemcell offers the stemcell to Docker when it is reachable.
    let try_docker = matches!(cli.command, Command::UploadStemcell { .. });
    let director = director(store.clone(), try_docker).await?;
    let printer = Arc::new(Printer::new(cli.non_interactive, cli.json));
    // Ctrl-C: stop at the next safe point; a second Ctrl-C stops at once.
    // (monitor handles Ctrl-C itself.)
    if !matches!(
        cli.command,
        Command::Monitor { .. }
            | Command::Logs { follow: true, .. }
            | Command::Ssh { command: None, .. }
    ) {
        let cancel = director.opts.cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("Cancelling at the next safe point (Ctrl-C again to stop now)...");
                task_event_line("Cancel requested (Ctrl-C)");
                cancel.store(true, std::sync::atomic::Ordering::SeqCst);
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("Stopped at once: run `bosun cloud-check` for what was left");
                    std::process::exit(130);
                }
            }
        });
    }
    match cli.command {
        Command::Agent { .. } => Ok(0),
        Command::Deploy {
            manifest,
            dry_run,
            vars,
            regenerate,
        } => {
            let started = Instant::now();
            let mut interpolate = vars.options()?;
            interpolate.regenerate = regenerate;
            let outcome = director
                .deploy(
                    &manifest,
                    &DeployOptions {
                        dry_run,
                        interpolate,
                    },
                    printer.clone(),
                )
                .await?;
            if dry_run {
                print_diff(&outcome.diff);
                print!("{}", outcome.plan);
                return Ok(0);
            }
            match outcome.summary {
                None => println!(
                    "Deployment '{}': no changes ({:.2}s)",
                    outcome.plan.deployment,
                    started.elapsed().as_secs_f64()
                ),
                Some(s) => println!(
                    "Deployed '{}' in {:.1}s: {} compiled, {} created, {} updated, {} deleted",
                    outcome.plan.deployment,
                    started.elapsed().as_secs_f64(),
                    s.compiled,
                    s.created,
                    s.updated,
                    s.deleted
                ),
            }
            Ok(0)
        }
        Command::Deployments => {
            let deps = store.deployments()?;
            if cli.json {
                let v: Vec<_> = deps
                    .iter()
                    .map(|d| {
                        let instances = store.instances(&d.name).map(|i| i.len()).unwrap_or(0);
                        serde_json::json!({"name": d.name, "instances": instances, "releases": d.releases, "stemcells": d.stemcells})
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<10} releases", "name", "instances");
                for d in deps {
                    let n = store.instances(&d.name)?.len();
                    println!("{:<24} {:<10} {}", d.name, n, d.releases.join(", "));
                }
            }
            Ok(0)
        }
        Command::Instances {
            ps,
            vitals,
            details,
        } => {
            let name = need_deployment(&cli.deployment)?;
            let list = director.instances(&name).await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_instances(&list, ps, vitals, details);
            }
            Ok(0)
        }
        Command::Start { instance } => {
            state_change(
                &director,
                (&cli.deployment, cli.non_interactive),
                instance,
                StateChange::Start,
                false,
                printer.clone(),
            )
            .await
        }
        Command::Stop {
            instance,
            hard,
            skip_drain,
        } => {
            state_change(
                &director,
                (&cli.deployment, cli.non_interactive),
                instance,
                StateChange::Stop { hard },
                skip_drain,
                printer.clone(),
            )
            .await
        }
        Command::Restart {
            instance,
            skip_drain,
        } => {
            state_change(
                &director,
                (&cli.deployment, cli.non_interactive),
                instance,
                StateChange::Restart,
                skip_drain,
                printer.clone(),
            )
            .await
        }
        Command::Recreate {
            instance,
            skip_drain,
        } => {
            state_change(
                &director,
                (&cli.deployment, cli.non_interactive),
                instance,
                StateChange::Recreate,
                skip_drain,
                printer.clone(),
            )
            .await
        }
        Command::Scp { from, to } => {
            let name = need_deployment(&cli.deployment)?;
            // INSTANCE:PATH, where PATH is absolute.
            let remote = |s: &str| {
                s.split_once(":/")
                    .map(|(i, p)| (i.to_string(), format!("/{p}")))
            };
            match (remote(&from), remote(&to)) {
                (None, Some((inst, path))) => {
                    let done = director
                        .scp_upload(&name, Some(&inst), std::path::Path::new(&from), &path)
                        .await?;
                    for i in done {
                        println!("{i}: wrote {path}");
                    }
                }
                (Some((inst, path)), None) => {
                    let (i, n) = director
                        .scp_download(&name, Some(&inst), &path, std::path::Path::new(&to))
                        .await?;
                    println!("{i}: read {path} ({n} bytes) into {to}");
                }
                _ => bail!(
                    "scp: exactly one side must be INSTANCE:/absolute/path (e.g. kv/0:/tmp/x)"
                ),
            }
            Ok(0)
        }
        Command::Ssh { instance, command } => {
            let name = need_deployment(&cli.deployment)?;
            let Some(command) = command else {
                let Some(instance) = instance else {
                    bail!("ssh: name the instance for an interactive shell (GROUP/ID or GROUP/INDEX), or run a command on every instance with -c 'CMD'");
                };
                return interactive_ssh(&director, &name, &instance).await;
            };
            let runs = director
                .run_on_instances(&name, instance.as_deref(), &command)
                .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                for r in &runs {
                    let prefix = format!("{} ({})", r.instance, r.index);
                    for line in r.stdout.lines() {
                        println!("{prefix}: {line}");
                    }
                    for line in r.stderr.lines() {
                        eprintln!("{prefix}: {line}");
                    }
                    if r.exit_code != 0 {
                        eprintln!("{prefix}: exit {}", r.exit_code);
                    }
                }
            }
            Ok(runs
                .iter()
                .map(|r| r.exit_code as i32)
                .find(|c| *c != 0)
                .unwrap_or(0))
        }
        Command::RunErrand {
            name: errand,
            keep_alive,
            instances,
        } => {
            let name = need_deployment(&cli.deployment)?;
            let opts = bosun_director::ops::ErrandOptions {
                keep_alive,
                instances,
            };
            // Output streams as it is written; --json returns it at the end.
            let sink: Option<bosun_director::ops::LineSink> = if cli.json {
                None
            } else {
                Some(Arc::new(|label: &str, line: &str| {
                    println!("[{label}] {line}");
                }))
            };
            let runs = director
                .run_errand(&name, &errand, &opts, printer.clone(), sink)
                .await?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&runs)?);
            } else {
                for r in &runs {
                    for j in &r.jobs {
                        println!("[{} {}] exit {}", r.instance, j.job, j.exit_code);
                    }
                    println!(
                        "Errand '{errand}' on {}: exit {} in {:.1}s{}",
                        r.instance,
                        r.exit_code,
                        r.seconds,
                        if r.kept { " (VM kept)" } else { "" }
                    );
                }
            }
            Ok(runs
                .iter()
                .map(|r| r.exit_code)
                .find(|c| *c != 0)
                .unwrap_or(0))
        }
        Command::Logs {
            instance,
            jobs,
            dir: _,
            follow: true,
        } => {
            let name = need_deployment(&cli.deployment)?;
            let stop = director.opts.cancel.clone();
            let on_ctrl_c = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    on_ctrl_c.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            });
            let sink: bosun_director::ops::LineSink = Arc::new(|instance, line| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{instance}: {line}");
                let _ = out.flush();
            });
            director
                .follow_logs(&name, instance.as_deref(), &jobs, stop, sink)
                .await?;
            Ok(0)
        }
        Command::Logs {
            instance,
            jobs,
            dir,
            follow: false,
        } => {
            let name = need_deployment(&cli.deployment)?;
            let got = director
                .fetch_logs(&name, instance.as_deref(), &jobs, &dir)
                .await?;
            if cli.json {
                let v: Vec<_> = got
                    .iter()
                    .map(|(i, f, n)| serde_json::json!({"instance": i, "file": f, "bytes": n}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for (i, f, n) in got {
                    println!("{i}: {} ({n} bytes)", f.display());
                }
            }
            Ok(0)
        }
        Command::Disks { orphaned: _ } => {
            let list = store.orphan_disks()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<44} {:<8} {:>8} {:<16} instance",
                    "cid", "cpi", "size_mb", "deployment"
                );
                for d in &list {
                    println!(
                        "{:<44} {:<8} {:>8} {:<16} {}",
                        d.cid, d.cpi, d.size_mb, d.deployment, d.instance
                    );
                }
                println!("\n{} orphaned disks", list.len());
            }
            Ok(0)
        }
        Command::AttachDisk { instance, cid } => {
            let name = need_deployment(&cli.deployment)?;
            let previous = director.attach_orphan_disk(&name, &instance, &cid)?;
            println!(
                "Disk {cid} is now {instance}'s persistent disk{}; `bosun -d {name} start {instance}` mounts it",
                previous.map(|p| format!(" (disk {p} orphaned)")).unwrap_or_default()
            );
            Ok(0)
        }
        Command::DeleteDisk { cid } => {
            if !cli.non_interactive && !ask(&format!("Delete disk {cid} and its data?")) {
                bail!("cancelled");
            }
            let d = director.delete_orphan_disk(&cid).await?;
            println!(
                "Deleted orphaned disk {} (was {} of {})",
                d.cid, d.instance, d.deployment
            );
            Ok(0)
        }
        Command::CleanUp { all } => {
            // As BOSH: keep the two newest unused versions of each release
            // and stemcell; --all keeps none and deletes orphaned disks too.
            let keep = if all { 0 } else { 2 };
            let plan = director.clean_up_plan(keep)?;
            let disks = if all {
                store.orphan_disks()?
            } else {
                Vec::new()
            };
            if plan.is_empty() && disks.is_empty() {
                println!("Nothing to clean up");
                return Ok(0);
            }
            let size = |b: u64| match b {
                0..=1_048_575 => format!("{:.1} KiB", b as f64 / 1024.0),
                _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
            };
            if !cli.json {
                for (n, v) in &plan.releases {
                    println!("release   {n}/{v}");
                }
                for st in &plan.stemcells {
                    println!(
                        "stemcell  {}/{} ({}) on {}: {}",
                        st.name, st.version, st.os, st.cpi, st.cid
                    );
                }
                for d in &disks {
                    println!(
                        "disk      {} (orphaned from {}/{})",
                        d.cid, d.deployment, d.instance
                    );
                }
                println!(
                    "{} compiled packages and {} blobs ({}) go with them",
                    plan.compiled_packages.len(),
                    plan.blobs.len(),
                    size(plan.bytes)
                );
            }
            if !cli.non_interactive && !ask("Delete these?") {
                bail!("cancelled");
            }
            let (done, mut problems) = director.clean_up(keep).await?;
            let mut deleted_disks = Vec::new();
            for d in &disks {
                match director.delete_orphan_disk(&d.cid).await {
                    Ok(_) => deleted_disks.push(d.cid.clone()),
                    Err(e) => problems.push(format!("deleting orphaned disk {}: {e}", d.cid)),
                }
            }
            if cli.json {
                let v = serde_json::json!({
                    "releases": done.releases.iter().map(|(n, v)| format!("{n}/{v}")).collect::<Vec<_>>(),
                    "stemcells": done.stemcells,
                    "compiled_packages": done.compiled_packages.len(),
                    "blobs": done.blobs.len(),
                    "bytes": done.bytes,
                    "orphaned_disks": deleted_disks,
                    "problems": problems,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "Deleted {} releases, {} stemcells, {} compiled packages, {} orphaned disks; freed {} of blobs",
                    done.releases.len(),
                    done.stemcells.len(),
                    done.compiled_packages.len(),
                    deleted_disks.len(),
                    size(done.bytes)
                );
                for p in &problems {
                    eprintln!("{p}");
                }
            }
            Ok(if problems.is_empty() { 0 } else { 1 })
        }
        Command::Tasks { recent } => {
            let all = store.tasks(recent.unwrap_or(1000))?;
            let list: Vec<_> = match recent {
                Some(_) => all,
                None => all.into_iter().filter(|t| t.state == "running").collect(),
            };
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<6} {:<10} {:<24} {:<16} {:<30} result",
                    "id", "state", "started", "deployment", "description"
                );
                for t in &list {
                    println!(
                        "{:<6} {:<10} {:<24} {:<16} {:<30} {}",
                        t.id,
                        t.state,
                        fmt_time(t.started_at * 1000),
                        t.deployment.as_deref().unwrap_or("-"),
                        t.description,
                        t.result.lines().next().unwrap_or("")
                    );
                }
                println!("\n{} tasks", list.len());
            }
            Ok(0)
        }
        Command::Task { id, debug, cpi } => {
            let t = store
                .task(id)?
                .with_context(|| format!("there is no task {id} (see `bosun tasks --recent`)"))?;
            let file = if debug {
                "debug.log"
            } else if cpi {
                "cpi.log"
            } else {
                "event.log"
            };
            let path = store.task_dir(id).join(file);
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if cli.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({"task": t, "log": text}))?
                );
            } else {
                println!(
                    "Task {} ({}): {} [{}]",
                    t.id,
                    t.description,
                    t.state,
                    t.result.lines().next().unwrap_or("")
                );
                print!("{text}");
            }
            Ok(0)
        }
        Command::Completions { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(shell, &mut Cli::command(), "bosun", &mut std::io::stdout());
            Ok(0)
        }
        Command::DeleteDeployment => {
            let name = need_deployment(&cli.deployment)?;
            if !cli.non_interactive && !ask(&format!("Delete deployment '{name}'?")) {
                bail!("cancelled");
            }
            let started = Instant::now();
            let n = director.delete_deployment(&name, printer.clone()).await?;
            println!(
                "Deleted deployment '{name}' ({n} instances) in {:.1}s; persistent disks are kept as orphaned disks",
                started.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Command::Interpolate {
            file,
            vars,
            vars_store,
            path,
            var_errs,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let mut opts = vars.options()?;
            opts.vars_store = vars_store;
            opts.path = path;
            opts.var_errs = var_errs;
            let out = bosun_director::interpolate::interpolate(
                &file.display().to_string(),
                &text,
                &opts,
            )?;
            print!("{out}");
            Ok(0)
        }
        Command::Variables => {
            let name = need_deployment(&cli.deployment)?;
            let list = store.variables(&name)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!("{:<32} {:<12} id", "name", "type");
                for v in &list {
                    println!("{:<32} {:<12} {}", v.name, v.kind, v.id);
                }
                println!("\n{} variables", list.len());
            }
            Ok(0)
        }
        Command::Monitor { duration } => {
            let monitor = Monitor::new(
                store.clone(),
                director.cpis.clone(),
                director.opts.clone(),
                printer.clone(),
                cli.deployment.clone(),
            );
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let mut after = store
                .events(cli.deployment.as_deref(), 0)?
                .last()
                .map(|e| e.id)
                .unwrap_or(0);
            let task = tokio::spawn(monitor.run(stop_rx));
            let deadline = duration.map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)));
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("listening for SIGTERM")?;
            println!(
                "Monitoring {} (Ctrl-C to stop)",
                cli.deployment
                    .as_deref()
                    .map(|d| format!("deployment '{d}'"))
                    .unwrap_or_else(|| "every deployment".into())
            );
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = tokio::signal::ctrl_c() => break,
                    _ = term.recv() => break,
                }
                for e in store.events(cli.deployment.as_deref(), after)? {
                    after = e.id;
                    print_event(&e, cli.json)?;
                }
                if task.is_finished() || deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
            }
            let _ = stop_tx.send(true);
            task.await.context("the monitor task")??;
            Ok(0)
        }
        Command::CloudCheck {
            report,
            auto,
            resolutions,
        } => {
            let name = need_deployment(&cli.deployment)?;
            if store.deployment(&name)?.is_none() && store.instances(&name)?.is_empty() {
                bail!("deployment '{name}' does not exist");
            }
            let _lock = store.lock_deployment(&name)?;
            let exec = director.executor_as(printer.clone(), "cloud-check");
            let scan = exec.cloud_check_scan(&name).await?;
            let mut chosen: Vec<(usize, Resolution)> = Vec::new();
            for r in &resolutions {
                let (id, res) = r
                    .split_once('=')
                    .and_then(|(i, r)| {
                        Some((
                            i.trim().parse::<usize>().ok()?,
                            Resolution::from_name(r.trim())?,
                        ))
                    })
                    .with_context(|| {
                        format!("--resolution {r}: expected ID=RESOLUTION, e.g. 1=recreate")
                    })?;
                chosen.push((id, res));
            }
            if cli.json && (report || (!auto && chosen.is_empty())) {
                println!("{}", serde_json::to_string_pretty(&scan)?);
            } else {
                print_scan(&name, &scan);
            }
            if scan.problems.is_empty() {
                return Ok(0);
            }
            if report {
                return Ok(1);
            }
            if auto {
                chosen = scan
                    .problems
                    .iter()
                    .map(|p| (p.id, p.resolutions[0]))
                    .collect();
            } else if chosen.is_empty() {
                if cli.non_interactive || !std::io::stdin().is_terminal() {
                    bail!("not resolving anything: pass --auto, --resolution ID=RESOLUTION, or run on a terminal to choose");
                }
                for p in &scan.problems {
                    chosen.push((p.id, choose(p)?));
                }
            }
            let mut failed = 0;
            for (id, res) in chosen {
                let Some(p) = scan.problems.iter().find(|p| p.id == id) else {
                    bail!("there is no problem {id} (found {})", scan.problems.len());
                };
                match exec.cloud_check_resolve(&name, p, res).await {
                    Ok(msg) => println!("  {id}: {}: {msg}", res.name()),
                    Err(e) => {
                        failed += 1;
                        println!("  {id}: {}: failed: {e}", res.name());
                    }
                }
            }
            Ok(if failed > 0 { 1 } else { 0 })
        }
        Command::Events { instance } => {
            let events: Vec<_> = store
                .events(cli.deployment.as_deref(), 0)?
                .into_iter()
                .filter(|e| {
                    instance.as_ref().is_none_or(|i| {
                        e.instance
                            .as_deref()
                            .is_some_and(|x| x.starts_with(i.as_str()))
                    })
                })
                .collect();
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&events)?);
            } else {
                for e in &events {
                    print_event(e, false)?;
                }
            }
            Ok(0)
        }
        Command::CreateRelease {
            dir,
            tarball,
            version,
        } => {
            let rel = bosun_director::release::read_release_dir(&dir, version.as_deref())?;
            let out = tarball.unwrap_or_else(|| {
                PathBuf::from(format!(
                    "{}-{}.tgz",
                    rel.manifest.name, rel.manifest.version
                ))
            });
            bosun_director::release::write_tarball(&rel, &out)?;
            println!(
                "Created release {}/{} ({} jobs, {} packages) at {}",
                rel.manifest.name,
                rel.manifest.version,
                rel.jobs.len(),
                rel.packages.len(),
                out.display()
            );
            Ok(0)
        }
        Command::UploadRelease { path, version } => {
            let (rec, new) = director.upload_release(&path, version.as_deref())?;
            println!(
                "{} release {}/{}",
                if new { "Uploaded" } else { "Already uploaded:" },
                rec.name(),
                rec.version()
            );
            Ok(0)
        }
        Command::Releases => {
            let rels = store.releases()?;
            if cli.json {
                let v: Vec<_> = rels
                    .iter()
                    .map(|(n, v, _)| serde_json::json!({"name": n, "version": v}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} version", "name");
                for (n, v, _) in rels {
                    println!("{n:<24} {v}");
                }
            }
            Ok(0)
        }
        Command::Stemcells => {
            director.ensure_local_stemcell().await?;
            let list = store.stemcells()?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<24} {:<16} {:<10} {:<8} cid",
                    "name", "os", "version", "cpi"
                );
                for s in list {
                    println!(
                        "{:<24} {:<16} {:<10} {:<8} {}",
                        s.name, s.os, s.version, s.cpi, s.cid
                    );
                }
            }
            Ok(0)
        }
        Command::BuildStemcell {
            os,
            include,
            out,
            version,
            cache,
            mirror,
        } => {
            let started = Instant::now();
            let opts = bosun_director::stemcell::BuildOptions {
                os,
                include,
                out: out.clone(),
                agent_binary: std::env::current_exe().context("finding the bosun executable")?,
                cache_dir: Some(cache.unwrap_or_else(|| default_cache_dir().join("rootfs"))),
                version,
                mirror,
            };
            let m =
                bosun_director::stemcell::build_stemcell(&opts, &mut |line| println!("{line}"))?;
            println!(
                "Built stemcell {}/{} ({}) at {} in {:.1}s",
                m.name,
                m.version,
                m.operating_system,
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(0)
        }
        Command::UploadStemcell { path } => {
            for (rec, new) in director.upload_stemcell(&path).await? {
                println!(
                    "{} stemcell {}/{} ({}) to the {} CPI: {}",
                    if new { "Uploaded" } else { "Already uploaded:" },
                    rec.name,
                    rec.version,
                    rec.os,
                    rec.cpi,
                    rec.cid
                );
            }
            Ok(0)
        }
        Command::CloudConfig => {
            match store.cloud_config()? {
                Some((_, text)) => print!("{text}"),
                None => {
                    println!("# No cloud-config uploaded; the built-in local default is in force.")
                }
            }
            Ok(0)
        }
        Command::RuntimeConfig => {
            match store.runtime_config()? {
                Some((_, text, _)) => print!("{text}"),
                None => println!("# No runtime-config uploaded."),
            }
            Ok(0)
        }
        Command::UpdateRuntimeConfig { file } => {
            let id = director.update_runtime_config(&file)?;
            println!(
                "Updated runtime-config (#{id}); it applies from each deployment's next deploy"
            );
            Ok(0)
        }
        Command::UpdateCloudConfig { file } => {
            let id = director.update_cloud_config(&file)?;
            println!("Updated cloud-config (#{id})");
            Ok(0)
        }
    }
}

/// The CPIs: local always; those the cloud-config declares under `cpis`;
/// Docker when the cloud-config names it (then it must be reachable), when
/// stemcells were uploaded to it, or when the command offers it a stemcell.
async fn director(store: Arc<Store>, try_docker: bool) -> Result<Director> {
    let exe = std::env::current_exe().context("finding the bosun executable")?;
    let local = LocalCpi::new(LocalCpiConfig {
        root: store.dir().join("local-cpi"),
        agent_command: vec![exe.display().to_string(), "agent".into()],
    })?;
    let mut cpis = Cpis::new();
    cpis.insert("local", logged("local", Arc::new(local)));
    let cc = match store.cloud_config()? {
        Some((id, text)) => {
            bosun_director::cloud_config::parse_cloud_config(&format!("cloud-config #{id}"), &text)
                .ok()
        }
        None => None,
    };
    let cloud_wants_docker = cc
        .as_ref()
        .is_some_and(|cc| cc.azs.iter().any(|a| a.cpi == "docker"));
    // CPIs the cloud-config declares under `cpis`.
    for c in cc.iter().flat_map(|cc| cc.cpis.iter()) {
        match c.kind.as_str() {
            "aws" => {
                let config = AwsCpiConfig::from_properties(&c.properties)
                    .with_context(|| format!("configuring CPI '{}' (type aws)", c.name))?;
                let aws = AwsCpi::new(config)
                    .await
                    .with_context(|| format!("starting CPI '{}' (type aws)", c.name))?;
                cpis.insert(&c.name, logged(&c.name, Arc::new(aws)));
            }
            "docker" => {
                let config = DockerCpiConfig {
                    root: store.dir().join(format!("docker-cpi-{}", c.name)),
                    socket: c.properties["socket"].as_str().map(str::to_string),
                    prefix: c.properties["prefix"]
                        .as_str()
                        .unwrap_or("bosun")
                        .to_string(),
                };
                let docker = DockerCpi::connect(config)
                    .await
                    .with_context(|| format!("starting CPI '{}' (type docker)", c.name))?;
                cpis.insert(&c.name, logged(&c.name, Arc::new(docker)));
            }
            other => bail!("CPI '{}' has an unknown type '{other}'", c.name),
        }
    }
    let has_docker_stemcells = store.stemcells()?.iter().any(|s| s.cpi == "docker");
    if try_docker || cloud_wants_docker || has_docker_stemcells {
        let config = DockerCpiConfig {
            root: store.dir().join("docker-cpi"),
            socket: None,
            prefix: "bosun".into(),
        };
        match DockerCpi::connect(config).await {
            Ok(docker) => cpis.insert("docker", logged("docker", Arc::new(docker))),
            Err(e) if cloud_wants_docker => {
                return Err(anyhow::Error::new(e).context("the docker CPI is needed"))
            }
            Err(e) => eprintln!("warning: the docker CPI is unavailable: {e}"),
        }
    }
    let mut opts = ExecOptions::default();
    if let Some(secs) = std::env::var("BOSUN_AGENT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        opts.agent_timeout = Duration::from_secs(secs);
    }
    Ok(Director { store, cpis, opts })
}

/// A CPI whose every call goes to the running task's CPI log.
/// The local terminal in raw mode for as long as this lives.
struct RawTerminal;

impl RawTerminal {
    fn enable() -> Result<RawTerminal> {
        crossterm::terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        Ok(RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

/// `ssh INSTANCE`: a login shell on the instance's pty, wired to this
/// terminal (raw mode and resizes when stdin is one; piped input otherwise).
async fn interactive_ssh(director: &Director, name: &str, instance: &str) -> Result<i32> {
    use std::io::Read;
    let (iname, client) = director.shell_session(name, instance).await?;
    let tty = std::io::stdin().is_terminal();
    let size = || crossterm::terminal::size().unwrap_or((80, 24));
    let initial = if tty { size() } else { (80, 24) };
    let term = std::env::var("TERM").unwrap_or_else(|_| "xterm".into());
    // Stdin on its own thread: a blocking read must not hold the runtime.
    let (input_tx, input_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let (resize_tx, resize_rx) = tokio::sync::mpsc::channel(4);
    if tty {
        use tokio::signal::unix::{signal, SignalKind};
        let mut winch = signal(SignalKind::window_change()).context("watching for resizes")?;
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if resize_tx.send(size()).await.is_err() {
                    break;
                }
            }
        });
    }
    eprintln!("Connected to {iname} (exit the shell to leave)");
    let raw = if tty {
        Some(RawTerminal::enable()?)
    } else {
        None
    };
    let mut stdout = std::io::stdout();
    let code = client
        .interactive_shell(&term, initial, input_rx, resize_rx, |bytes| {
            let _ = stdout.write_all(bytes);
            let _ = stdout.flush();
        })
        .await;
    drop(raw);
    client.disconnect().await;
    let code = code.with_context(|| format!("ssh to {iname}"))?;
    eprintln!("Connection to {iname} closed (exit {code})");
    Ok(i32::try_from(code).unwrap_or(255))
}

fn logged(name: &str, cpi: Arc<dyn bosun_cpi::Cpi>) -> Arc<dyn bosun_cpi::Cpi> {
    Arc::new(bosun_cpi::logged::LoggedCpi::new(name, cpi))
}

fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("bosun");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/bosun");
    }
    std::env::temp_dir().join("bosun-cache")
}

/// `-d NAME`: a deployment name is checked before anything can turn it
/// into a path.
fn deployment_name(s: &str) -> std::result::Result<String, String> {
    bosun_director::names::check("deployment name", s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

fn need_deployment(d: &Option<String>) -> Result<String> {
    d.clone()
        .context("this command needs a deployment: pass -d NAME (or set BOSUN_DEPLOYMENT)")
}

fn ask(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} (not a terminal: pass -n to proceed without asking)");
        return false;
    }
    print!("{question} [yN] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    matches!(line.trim(), "y" | "Y" | "yes")
}

/// `start`, `stop`, `restart`, `recreate`.
async fn state_change(
    director: &Director,
    (deployment, non_interactive): (&Option<String>, bool),
    instance: Option<String>,
    change: StateChange,
    skip_drain: bool,
    printer: Arc<Printer>,
) -> Result<i32> {
    let name = need_deployment(deployment)?;
    let what = instance
        .clone()
        .unwrap_or_else(|| format!("deployment '{name}'"));
    if !non_interactive && !ask(&format!("{} {what}?", change.verb())) {
        bail!("cancelled");
    }
    let started = Instant::now();
    let n = director
        .change_state(&name, instance.as_deref(), change, skip_drain, printer)
        .await?;
    println!(
        "{}: {n} instances of '{name}' in {:.1}s",
        change.verb(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// The manifest diff, coloured on a terminal.
fn print_diff(hunks: &[Vec<DiffLine>]) {
    if hunks.is_empty() {
        return;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    println!("Manifest changes:");
    for (i, h) in hunks.iter().enumerate() {
        if i > 0 {
            println!("  ...");
        }
        for l in h {
            let (mark, code) = match l.tag {
                DiffTag::Same => (' ', ""),
                DiffTag::Added => ('+', "\x1b[32m"),
                DiffTag::Removed => ('-', "\x1b[31m"),
            };
            if colour && !code.is_empty() {
                println!("{code}{mark} {}\x1b[0m", l.text);
            } else {
                println!("{mark} {}", l.text);
            }
        }
    }
    println!();
}

/// A UTC time with milliseconds, from ms since the epoch.
fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    )
}

fn print_event(e: &bosun_director::state::Event, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let mut line = format!(
        "#{:<5} {} {:<11} {}",
        e.id,
        fmt_time(e.time_ms),
        e.source,
        e.instance
            .as_deref()
            .or(e.deployment.as_deref())
            .unwrap_or("-")
    );
    if !e.seen.is_empty() {
        line.push_str(&format!("  seen: {}", e.seen));
    }
    line.push_str(&format!(
        "  did: {} {}  -> {}",
        e.action, e.object, e.result
    ));
    println!("{line}");
    Ok(())
}

fn print_scan(name: &str, scan: &Scan) {
    for n in &scan.notes {
        println!("note: {n}");
    }
    if scan.problems.is_empty() {
        println!("Deployment '{name}': no problems found");
        return;
    }
    println!("Deployment '{name}': {} problems", scan.problems.len());
    for p in &scan.problems {
        println!(
            "  {:>3}  {:<18} {}",
            p.id,
            format!("{:?}", p.kind),
            p.description
        );
        let opts: Vec<&str> = p.resolutions.iter().map(|r| r.name()).collect();
        println!(
            "       resolutions: {} (default {})",
            opts.join(", "),
            opts[0]
        );
    }
}

fn choose(p: &CheckProblem) -> Result<Resolution> {
    println!("Problem {}: {}", p.id, p.description);
    for (i, r) in p.resolutions.iter().enumerate() {
        println!(
            "  {}. {}{}",
            i + 1,
            r.describe(),
            if i == 0 { " (default)" } else { "" }
        );
    }
    print!("Choose [1]: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let n = match line.trim() {
        "" => 1,
        t => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=p.resolutions.len()).contains(n))
            .with_context(|| format!("'{t}' is not one of 1..{}", p.resolutions.len()))?,
    };
    Ok(p.resolutions[n - 1])
}

fn print_instances(list: &[InstanceInfo], ps: bool, vitals: bool, details: bool) {
    println!(
        "{:<46} {:<13} {:<4} {:<16} {:<42}",
        "instance", "process_state", "az", "ips", "vm_cid"
    );
    for i in list {
        println!(
            "{:<46} {:<13} {:<4} {:<16} {:<42}",
            format!("{}{}", i.instance, if i.bootstrap { "*" } else { "" }),
            i.process_state,
            i.az,
            i.ips.join(","),
            i.vm_cid.clone().unwrap_or_else(|| "-".into())
        );
        if vitals {
            match &i.vitals {
                Some(v) => println!(
                    "  load {:.2} {:.2} {:.2}  memory {} of {} MB  ephemeral disk {}  persistent disk {}",
                    v.load[0],
                    v.load[1],
                    v.load[2],
                    v.mem_used_kb / 1024,
                    v.mem_total_kb / 1024,
                    v.ephemeral_disk_percent.map(|p| format!("{p}%")).unwrap_or_else(|| "-".into()),
                    v.persistent_disk_percent.map(|p| format!("{p}%")).unwrap_or_else(|| "-".into()),
                ),
                None => println!("  vitals unavailable (agent not answering)"),
            }
        }
        if details {
            println!(
                "  agent {}  vm created {}  disks {} ({})",
                i.agent_id.as_deref().unwrap_or("-"),
                i.vm_created_at
                    .map(|t| fmt_time(t * 1000))
                    .unwrap_or_else(|| "-".into()),
                if i.persistent_disk_cids.is_empty() {
                    "-".to_string()
                } else {
                    i.persistent_disk_cids.join(",")
                },
                i.persistent_disk_mb
                    .map(|m| format!("{m} MB"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        if ps {
            for p in &i.processes {
                println!(
                    "  {:<44} {:<13} uptime {}s",
                    format!("{}/{}", p.job, p.name),
                    p.state,
                    p.uptime_secs.unwrap_or(0)
                );
            }
        }
    }
    println!("\n{} instances", list.len());
}

/// Prints progress lines and asks for confirmation.
struct Printer {
    started: Instant,
    non_interactive: bool,
    /// With --json, stdout is for the JSON: progress goes to stderr.
    json: bool,
}

impl Printer {
    fn new(non_interactive: bool, json: bool) -> Printer {
        Printer {
            started: Instant::now(),
            non_interactive,
            json,
        }
    }
}

impl Progress for Printer {
    fn stage(&self, subject: &str, stage: &str) {
        let line = format!(
            "{:>7.2}s  {subject:<48} {stage}",
            self.started.elapsed().as_secs_f64()
        );
        task_event_line(&line);
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

impl Report for Printer {
    fn notice(&self, msg: &str) {
        task_event_line(msg);
        if self.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }

    fn confirm(&self, diff: &[Vec<DiffLine>], plan: &Plan) -> bool {
        print_diff(diff);
        print!("{plan}");
        if self.non_interactive {
            return true;
        }
        ask("Continue?")
    }
}

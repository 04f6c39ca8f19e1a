//! The command line's shape: the clap types (`Cli`, `Command`, `VarArgs`)
//! and the value parsers that check arguments before anything uses them.
//! It must not run anything: commands live in `commands`, printing in `print`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use bosun_director::interpolate::InterpolateOptions;
use bosun_director::model::names;

#[derive(Parser)]
#[command(
    name = "bosun",
    version,
    about = "Deploy and keep alive distributed systems, the BOSH way"
)]
pub struct Cli {
    /// Where the director keeps its state.
    #[arg(long, global = true, env = "BOSUN_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Deployment name.
    #[arg(
        short = 'd',
        long = "deployment",
        global = true,
        env = "BOSUN_DEPLOYMENT",
        value_parser = deployment_name
    )]
    pub deployment: Option<String>,
    /// Non-interactive: do not ask for confirmation.
    #[arg(short = 'n', long = "non-interactive", global = true)]
    pub non_interactive: bool,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
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
        /// Release version (default: 0+dev.<content digest>; with --final,
        /// the next integer after the highest final version).
        #[arg(long)]
        version: Option<String>,
        /// Make a final release: new job, package and license builds go into
        /// the release's local blobstore and `.final_builds/`, the release
        /// into `releases/NAME/`.
        #[arg(long = "final")]
        final_release: bool,
    },
    /// Copy a file into the release's blobs/ at BLOBS_PATH and record it in
    /// config/blobs.yml (not uploaded yet).
    AddBlob {
        path: PathBuf,
        blobs_path: String,
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// List the release's blobs: path, size, uploaded or not.
    Blobs {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Put every blob not yet uploaded into the release's local blobstore.
    UploadBlobs {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Fetch into blobs/ every uploaded blob that is missing there (verified).
    SyncBlobs {
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Upload a release (directory or tarball).
    UploadRelease {
        path: PathBuf,
        #[arg(long)]
        version: Option<String>,
    },
    /// Write a compiled release (its jobs and its packages compiled for one
    /// stemcell, as deploys on it left them) to NAME-VERSION-OS-VERSION.tgz.
    ExportRelease {
        /// NAME/VERSION of an uploaded release.
        release: String,
        /// OS/VERSION of the stemcell its packages were compiled on.
        stemcell: String,
        /// Directory to write the tarball into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
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
    /// Answer one CPI request (BOSH's external CPI protocol: JSON on stdin,
    /// the response on stdout) with one of bosun's backends.
    Cpi {
        #[arg(long, value_enum)]
        backend: CpiBackend,
        /// The backend's configuration (JSON): `root` (its state directory)
        /// for local and docker, plus `socket` and `prefix` for docker; the
        /// aws CPI's properties for aws.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the agent of a VM (started by CPIs, not by operators).
    #[command(hide = true)]
    Agent {
        /// Where the settings are: a file (bosun's settings, or BOSH's agent
        /// env as the warden and docker CPIs write it), `config-drive:DIR`
        /// (a mounted config drive) or `http://HOST` (a metadata service).
        #[arg(long)]
        settings: PathBuf,
        /// Local CPI: enter a VM namespace with this directory at /var/vcap.
        #[arg(long)]
        vm_root: Option<PathBuf>,
    },
}

/// bosun's CPI backends, as `bosun cpi` serves them.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpiBackend {
    Local,
    Docker,
    Aws,
}

/// Ops files and variable sources, as `bosh interpolate` and `bosh deploy` take them.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct VarArgs {
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
    pub fn options(&self) -> Result<InterpolateOptions> {
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
        Ok(InterpolateOptions {
            ops_files: self.ops_files.iter().map(read).collect::<Result<_>>()?,
            vars,
            var_files: self.vars_files.iter().map(read).collect::<Result<_>>()?,
            vars_env: self.vars_env.clone(),
            ..Default::default()
        })
    }
}

/// `-d NAME`: a deployment name is checked before anything can turn it
/// into a path.
fn deployment_name(s: &str) -> std::result::Result<String, String> {
    names::check("deployment name", s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn deployment_names_are_checked() {
        assert_eq!(deployment_name("kv").as_deref(), Ok("kv"));
        assert!(deployment_name("../etc").is_err());
    }

    #[test]
    fn a_var_needs_an_equals_sign() {
        let args = VarArgs {
            vars: vec!["a=b=c".into()],
            ..Default::default()
        };
        let opts = args.options().expect("NAME=VALUE");
        assert_eq!(opts.vars, vec![("a".to_string(), "b=c".to_string())]);
        let bad = VarArgs {
            vars: vec!["novalue".into()],
            ..Default::default()
        };
        let err = bad.options().expect_err("no '='");
        assert_eq!(err.to_string(), "-v novalue: expected NAME=VALUE");
    }
}

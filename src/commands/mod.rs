//! The commands: wires a director for the command line's command, arranges
//! for Ctrl-C, and hands the command to its area's function (one file per
//! area). It must not parse arguments (that is `cli`) or format output
//! itself (that is `print` and the areas).

mod artifacts;
mod deploy;
mod disks;
mod health;
mod instances;
mod release_dev;
mod tasks;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use bosun_director::Store;
use bosun_director::{Director, StateChange};

use crate::cli::{Cli, Command};
use crate::print::{ask, Printer};
use crate::tasklog::task_event_line;
use crate::wiring::{director, Wants};

/// What every command gets: the director and how the command line asked.
pub struct Ctx {
    pub store: Arc<Store>,
    pub director: Director,
    pub printer: Arc<Printer>,
    /// `-d`, when given.
    pub deployment: Option<String>,
    /// `-n`: do not ask.
    pub non_interactive: bool,
    /// `--json`: JSON on stdout instead of tables.
    pub json: bool,
}

impl Ctx {
    /// The deployment (`-d`) a command needs.
    pub fn need_deployment(&self) -> Result<String> {
        self.deployment
            .clone()
            .context("this command needs a deployment: pass -d NAME (or set BOSUN_DEPLOYMENT)")
    }

    /// Ask the question unless `-n`; anything but yes cancels.
    pub fn confirm(&self, question: &str) -> Result<()> {
        if !self.non_interactive && !ask(question) {
            bail!("cancelled");
        }
        Ok(())
    }
}

/// Run the command line's command against the state in `store`; the exit code.
pub async fn run(cli: Cli, store: Arc<Store>) -> Result<i32> {
    let wants = Wants {
        // upload-stemcell offers the stemcell to Docker when it is reachable.
        try_docker: matches!(cli.command, Command::UploadStemcell { .. }),
        // Printing or replacing the cloud-config works even when it is invalid.
        invalid_cloud_config_ok: matches!(
            cli.command,
            Command::CloudConfig | Command::UpdateCloudConfig { .. }
        ),
    };
    let director = director(store.clone(), wants).await?;
    // (monitor, logs -f and an interactive ssh handle Ctrl-C themselves.)
    if !matches!(
        cli.command,
        Command::Monitor { .. }
            | Command::Logs { follow: true, .. }
            | Command::Ssh { command: None, .. }
    ) {
        cancel_on_ctrl_c(&director);
    }
    let ctx = Ctx {
        store,
        director,
        printer: Arc::new(Printer::new(cli.json)),
        deployment: cli.deployment,
        non_interactive: cli.non_interactive,
        json: cli.json,
    };
    dispatch(&ctx, cli.command).await
}

/// Ctrl-C: stop at the next safe point; a second Ctrl-C stops at once.
fn cancel_on_ctrl_c(director: &Director) {
    let cancel = director.opts.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("Cancelling at the next safe point (Ctrl-C again to stop now)...");
            task_event_line("Cancel requested (Ctrl-C)");
            cancel.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("Stopped at once: run `bosun cloud-check` for what was left");
                std::process::exit(130);
            }
        }
    });
}

/// One command, to its area's function.
async fn dispatch(ctx: &Ctx, command: Command) -> Result<i32> {
    use Command as C;
    match command {
        C::Agent { .. } | C::Cpi { .. } => Ok(0),
        C::Deploy {
            manifest,
            dry_run,
            vars,
            regenerate,
        } => deploy::deploy(ctx, &manifest, dry_run, &vars, regenerate).await,
        C::Interpolate {
            file,
            vars,
            vars_store,
            path,
            var_errs,
        } => deploy::interpolate(&file, &vars, vars_store, path, var_errs),
        C::Variables => deploy::variables(ctx),
        C::Deployments => deploy::deployments(ctx),
        C::DeleteDeployment => deploy::delete_deployment(ctx).await,
        C::Instances {
            ps,
            vitals,
            details,
        } => instances::instances(ctx, ps, vitals, details).await,
        C::Start { instance } => {
            instances::state_change(ctx, instance, StateChange::Start, false).await
        }
        C::Stop {
            instance,
            hard,
            skip_drain,
        } => instances::state_change(ctx, instance, StateChange::Stop { hard }, skip_drain).await,
        C::Restart {
            instance,
            skip_drain,
        } => instances::state_change(ctx, instance, StateChange::Restart, skip_drain).await,
        C::Recreate {
            instance,
            skip_drain,
        } => instances::state_change(ctx, instance, StateChange::Recreate, skip_drain).await,
        C::RunErrand {
            name,
            keep_alive,
            instances,
        } => instances::run_errand(ctx, &name, keep_alive, instances).await,
        C::Ssh { instance, command } => instances::ssh(ctx, instance, command).await,
        C::Scp { from, to } => instances::scp(ctx, &from, &to).await,
        C::Logs {
            instance,
            jobs,
            dir: _,
            follow: true,
        } => instances::follow_logs(ctx, instance, &jobs).await,
        C::Logs {
            instance,
            jobs,
            dir,
            follow: false,
        } => instances::fetch_logs(ctx, instance, &jobs, &dir).await,
        C::Disks { orphaned: _ } => disks::disks(ctx),
        C::AttachDisk { instance, cid } => disks::attach_disk(ctx, &instance, &cid),
        C::DeleteDisk { cid } => disks::delete_disk(ctx, &cid).await,
        C::CleanUp { all } => disks::clean_up(ctx, all).await,
        C::Tasks { recent } => tasks::tasks(ctx, recent),
        C::Task { id, debug, cpi } => tasks::task(ctx, id, debug, cpi),
        C::Completions { shell } => completions(shell),
        C::Monitor { duration } => health::monitor(ctx, duration).await,
        C::CloudCheck {
            report,
            auto,
            resolutions,
        } => health::cloud_check(ctx, report, auto, &resolutions).await,
        C::Events { instance } => health::events(ctx, instance),
        C::CreateRelease {
            dir,
            tarball,
            version,
            final_release: false,
        } => artifacts::create_release(&dir, tarball, version),
        C::CreateRelease {
            dir,
            tarball,
            version,
            final_release: true,
        } => release_dev::create_final_release(&dir, tarball, version),
        C::AddBlob {
            path,
            blobs_path,
            dir,
        } => release_dev::add_blob(&dir, &path, &blobs_path),
        C::Blobs { dir } => release_dev::blobs(ctx, &dir),
        C::UploadBlobs { dir } => release_dev::upload_blobs(&dir),
        C::SyncBlobs { dir } => release_dev::sync_blobs(&dir),
        C::UploadRelease { path, version } => artifacts::upload_release(ctx, &path, version),
        C::ExportRelease {
            release,
            stemcell,
            dir,
        } => artifacts::export_release(ctx, &release, &stemcell, &dir),
        C::Releases => artifacts::releases(ctx),
        C::Stemcells => artifacts::stemcells(ctx).await,
        C::BuildStemcell {
            os,
            include,
            out,
            version,
            cache,
            mirror,
        } => artifacts::build_stemcell(os, include, out, version, cache, mirror),
        C::UploadStemcell { path } => artifacts::upload_stemcell(ctx, &path).await,
        C::CloudConfig => artifacts::cloud_config(ctx),
        C::UpdateCloudConfig { file } => artifacts::update_cloud_config(ctx, &file),
        C::RuntimeConfig => artifacts::runtime_config(ctx),
        C::UpdateRuntimeConfig { file } => artifacts::update_runtime_config(ctx, &file),
    }
}

/// `completions SHELL`: the completion script on stdout.
fn completions(shell: clap_complete::Shell) -> Result<i32> {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "bosun", &mut std::io::stdout());
    Ok(0)
}

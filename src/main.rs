//! `bosun`: the command line. Parses arguments and hands the command on:
//! `bosun agent` to `bosun-agent`, `bosun cpi` to `cpi_server`, everything else to `commands` (recorded
//! as a task by `tasklog` when it changes anything). It prints a command's
//! error, with its causes, once, here; it must not run or print anything
//! else itself. The operations live in the libraries: `bosun-director`,
//! `bosun-agent`, `bosun-cpi-*` (backends).

mod cli;
mod commands;
mod cpi_server;
mod print;
mod tasklog;
mod wiring;

use anyhow::{Context, Result};
use clap::Parser;

use bosun_agent::agent::run_from_settings_file;
use bosun_cpi_local::enter_vm_namespace;
use bosun_director::Store;

use crate::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    // The agent enters its VM namespace before any thread exists.
    if let Command::Agent {
        vm_root: Some(root),
        ..
    } = &cli.command
    {
        if let Err(e) = enter_vm_namespace(root) {
            eprintln!("bosun agent: {}", bosun_cpi::chain::chain(&e));
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

async fn run(cli: Cli) -> Result<i32> {
    if let Command::Agent { settings, .. } = &cli.command {
        tasklog::init_logging(true);
        run_from_settings_file(settings)
            .await
            .context("running the agent")?;
        return Ok(0);
    }
    tasklog::init_logging(false);
    if let Command::Cpi { backend, config } = &cli.command {
        return cpi_server::serve(*backend, config).await;
    }
    let state_dir = cli
        .state_dir
        .clone()
        .unwrap_or_else(wiring::default_state_dir);
    let store = Store::open(&state_dir)?;
    let Some((description, deployment)) = tasklog::task_of(&cli) else {
        return commands::run(cli, store).await;
    };
    let task = tasklog::start(&store, &description, deployment.as_deref(), cli.json)?;
    let result = commands::run(cli, store.clone()).await;
    tasklog::finish(&store, task, &result)?;
    result
}

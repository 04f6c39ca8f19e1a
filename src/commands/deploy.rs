//! Deployments: `deploy`, `deployments`, `delete-deployment`, and the
//! manifest tools `interpolate` and `variables`.
//! It must not format tables or diffs itself beyond one-line summaries
//! (those are `print`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use bosun_director::interpolate::interpolate as interpolate_text;
use bosun_director::DeployOptions;

use super::Ctx;
use crate::cli::VarArgs;
use crate::print::{ask, print_diff};

/// `deploy MANIFEST`: prepare (stage inputs, diff, plan under the lock),
/// show and confirm, then apply (with --dry-run show the diff and the plan).
pub async fn deploy(
    ctx: &Ctx,
    manifest: &Path,
    dry_run: bool,
    vars: &VarArgs,
    regenerate: Vec<String>,
) -> Result<i32> {
    let started = Instant::now();
    let mut interpolate = vars.options()?;
    interpolate.regenerate = regenerate;
    let opts = DeployOptions {
        dry_run,
        interpolate,
    };
    let prepared = ctx
        .director
        .prepare(manifest, &opts, ctx.printer.as_ref())
        .await?;
    if prepared.changes_vms() {
        print_diff(prepared.diff());
        print!("{}", prepared.plan());
        if !ctx.non_interactive && !ask("Continue?") {
            ctx.director.cancel(prepared)?;
            bail!("deploy cancelled");
        }
    }
    let outcome = ctx.director.apply(prepared, ctx.printer.clone()).await?;
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

/// `deployments`: names, instance counts, releases.
pub fn deployments(ctx: &Ctx) -> Result<i32> {
    let store = &ctx.store;
    let deps = store.deployments()?;
    if ctx.json {
        let mut v = Vec::new();
        for d in &deps {
            let instances = store.instances(&d.name)?.len();
            v.push(serde_json::json!({"name": d.name, "instances": instances, "releases": d.releases, "stemcells": d.stemcells}));
        }
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

/// `delete-deployment`: VMs deleted, persistent disks orphaned.
pub async fn delete_deployment(ctx: &Ctx) -> Result<i32> {
    let name = ctx.need_deployment()?;
    ctx.confirm(&format!("Delete deployment '{name}'?"))?;
    let started = Instant::now();
    let n = ctx
        .director
        .delete_deployment(&name, ctx.printer.clone())
        .await?;
    println!(
        "Deleted deployment '{name}' ({n} instances) in {:.1}s; persistent disks are kept as orphaned disks",
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// `interpolate FILE`: ops files and variables applied, the YAML printed.
pub fn interpolate(
    file: &Path,
    vars: &VarArgs,
    vars_store: Option<PathBuf>,
    path: Option<String>,
    var_errs: bool,
) -> Result<i32> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut opts = vars.options()?;
    opts.vars_store = vars_store;
    opts.path = path;
    opts.var_errs = var_errs;
    let out = interpolate_text(&file.display().to_string(), &text, &opts)?;
    print!("{out}");
    Ok(0)
}

/// `variables`: a deployment's generated variables, names and ids only.
pub fn variables(ctx: &Ctx) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let list = ctx.store.variables(&name)?;
    if ctx.json {
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

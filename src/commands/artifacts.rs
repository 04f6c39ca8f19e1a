//! What deployments are made of: releases (`create-release`,
//! `upload-release`, `export-release`, `releases`), stemcells (`build-stemcell`,
//! `upload-stemcell`, `stemcells`) and the cloud- and runtime-configs.
//! It must not read or build release and stemcell contents itself: the
//! director's `release` and `stemcell` modules do.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};

use bosun_blobstore_s3::WithS3;
use bosun_director::release::{read_release_dir_with, write_tarball, DigestAlgorithm};
use bosun_director::stemcell::{build_stemcell as build, BuildOptions};

use super::Ctx;
use crate::wiring::default_cache_dir;

/// `create-release [DIR]`: a release tarball from a release directory.
pub fn create_release(
    dir: &Path,
    tarball: Option<PathBuf>,
    version: Option<String>,
) -> Result<i32> {
    let rel = read_release_dir_with(dir, version.as_deref(), DigestAlgorithm::default(), &WithS3)?;
    for w in &rel.warnings {
        eprintln!("Warning: release '{}': {w}", rel.manifest.name);
    }
    let out = tarball.unwrap_or_else(|| {
        PathBuf::from(format!(
            "{}-{}.tgz",
            rel.manifest.name, rel.manifest.version
        ))
    });
    write_tarball(&rel, &out)?;
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

/// `upload-release PATH`: a release directory or tarball.
pub fn upload_release(ctx: &Ctx, path: &Path, version: Option<String>) -> Result<i32> {
    let (rec, new, warnings) = ctx.director.upload_release(path, version.as_deref())?;
    for w in &warnings {
        eprintln!("Warning: release '{}': {w}", rec.name());
    }
    let compiled = &rec.manifest.compiled_packages;
    let compiled = if compiled.is_empty() {
        String::new()
    } else {
        let stemcells: std::collections::BTreeSet<&str> =
            compiled.iter().map(|c| c.stemcell.as_str()).collect();
        format!(
            " ({} packages compiled for {})",
            compiled.len(),
            stemcells.into_iter().collect::<Vec<_>>().join(", ")
        )
    };
    println!(
        "{} release {}/{}{compiled}",
        if new { "Uploaded" } else { "Already uploaded:" },
        rec.name(),
        rec.version()
    );
    Ok(0)
}

/// `export-release NAME/VERSION OS/VERSION [--dir D]`: a compiled release
/// tarball from what the director has compiled.
pub fn export_release(ctx: &Ctx, release: &str, stemcell: &str, dir: &Path) -> Result<i32> {
    let (name, version) = release
        .split_once('/')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty())
        .ok_or_else(|| anyhow::anyhow!("export-release: '{release}' is not NAME/VERSION"))?;
    let out = ctx
        .director
        .export_release(name, version, stemcell, dir)
        .map_err(bosun_director::OpError::from)?;
    println!(
        "Exported release {name}/{version} compiled for {stemcell} ({} jobs, {} compiled packages) to {}",
        out.jobs,
        out.packages,
        out.path.display()
    );
    Ok(0)
}

/// `releases`: the uploaded release versions.
pub fn releases(ctx: &Ctx) -> Result<i32> {
    let rels = ctx.store.releases()?;
    if ctx.json {
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

/// `stemcells`: the uploaded stemcells (the local CPI's host stemcell
/// registered first if it is not yet).
pub async fn stemcells(ctx: &Ctx) -> Result<i32> {
    ctx.director.ensure_local_stemcell(true).await?;
    let list = ctx.store.stemcells()?;
    if ctx.json {
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

/// `build-stemcell`: a Docker stemcell from a debootstrap root filesystem,
/// with this executable as its agent.
pub fn build_stemcell(
    os: String,
    include: Vec<String>,
    out: PathBuf,
    version: Option<String>,
    cache: Option<PathBuf>,
    mirror: String,
) -> Result<i32> {
    let started = Instant::now();
    let opts = BuildOptions {
        os,
        include,
        out: out.clone(),
        agent_binary: std::env::current_exe().context("finding the bosun executable")?,
        cache_dir: Some(cache.unwrap_or_else(|| default_cache_dir().join("rootfs"))),
        version,
        mirror,
    };
    let m = build(&opts, &mut |line| println!("{line}"))?;
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

/// `upload-stemcell PATH`: to every CPI that takes its format.
pub async fn upload_stemcell(ctx: &Ctx, path: &Path) -> Result<i32> {
    for (rec, new) in ctx.director.upload_stemcell(path).await? {
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

/// `cloud-config`: the one in force, as uploaded.
pub fn cloud_config(ctx: &Ctx) -> Result<i32> {
    match ctx.store.cloud_config()? {
        Some((_, text)) => print!("{text}"),
        None => println!("# No cloud-config uploaded; the built-in local default is in force."),
    }
    Ok(0)
}

/// `update-cloud-config FILE`: checked, then stored as the one in force.
pub fn update_cloud_config(ctx: &Ctx, file: &Path) -> Result<i32> {
    let id = ctx.director.update_cloud_config(file)?;
    println!("Updated cloud-config (#{id})");
    Ok(0)
}

/// `runtime-config`: the one in force, as uploaded.
pub fn runtime_config(ctx: &Ctx) -> Result<i32> {
    match ctx.store.runtime_config()? {
        Some((_, text, _)) => print!("{text}"),
        None => println!("# No runtime-config uploaded."),
    }
    Ok(0)
}

/// `update-runtime-config FILE`: addons for every deployment, from each
/// one's next deploy.
pub fn update_runtime_config(ctx: &Ctx, file: &Path) -> Result<i32> {
    let id = ctx.director.update_runtime_config(file)?;
    println!("Updated runtime-config (#{id}); it applies from each deployment's next deploy");
    Ok(0)
}

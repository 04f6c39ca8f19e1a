//! Release authoring in a release directory: final releases
//! (`create-release --final`) and blobs (`add-blob`, `blobs`,
//! `upload-blobs`, `sync-blobs`). It must not read or write release
//! contents itself: the director's `release` module does; this only
//! prints what it did.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use bosun_blobstore_s3::WithS3;
use bosun_director::release::{self, write_tarball};

use super::Ctx;

/// `create-release --final [--version V] [--tarball FILE] [DIR]`.
pub fn create_final_release(
    dir: &Path,
    tarball: Option<PathBuf>,
    version: Option<String>,
) -> Result<i32> {
    let fin = release::create_final_release(dir, version.as_deref(), &WithS3)
        .with_context(|| format!("creating a final release of {}", dir.display()))?;
    let rel = &fin.release;
    for w in &rel.warnings {
        eprintln!("Warning: release '{}': {w}", rel.manifest.name);
    }
    for b in &fin.new_builds {
        println!("Added final build of {b}");
    }
    if !fin.reused_builds.is_empty() {
        println!("Reused final builds: {}", fin.reused_builds.join(", "));
    }
    println!(
        "Created final release {}/{} ({} jobs, {} packages) at {}",
        rel.manifest.name,
        rel.manifest.version,
        rel.jobs.len(),
        rel.packages.len(),
        fin.manifest_path.display()
    );
    if let Some(out) = tarball {
        write_tarball(rel, &out)?;
        println!("Wrote release tarball {}", out.display());
    }
    Ok(0)
}

/// `add-blob PATH BLOBS_PATH [DIR]`.
pub fn add_blob(dir: &Path, path: &Path, blobs_path: &str) -> Result<i32> {
    let rec = release::add_blob(dir, path, blobs_path)
        .with_context(|| format!("adding blob '{blobs_path}' to {}", dir.display()))?;
    println!(
        "Added blob '{blobs_path}' ({} bytes, {})",
        rec.size, rec.sha
    );
    Ok(0)
}

/// `blobs [DIR]`: path, size, uploaded or not.
pub fn blobs(ctx: &Ctx, dir: &Path) -> Result<i32> {
    let list = release::list_blobs(dir)
        .with_context(|| format!("listing the blobs of {}", dir.display()))?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:<40} {:>12} {:<14} {:<8} sha",
        "path", "size", "uploaded", "local"
    );
    for b in &list {
        let uploaded = b.object_id.as_deref().map_or("(not uploaded)", |_| "yes");
        let local = if b.local { "yes" } else { "missing" };
        println!(
            "{:<40} {:>12} {:<14} {:<8} {}",
            b.path, b.size, uploaded, local, b.sha
        );
    }
    println!("{} blobs", list.len());
    Ok(0)
}

/// `upload-blobs [DIR]`.
pub fn upload_blobs(dir: &Path) -> Result<i32> {
    let up = release::upload_blobs(dir, &WithS3)
        .with_context(|| format!("uploading the blobs of {}", dir.display()))?;
    for (path, id) in &up {
        println!("Uploaded blob '{path}' as {id}");
    }
    println!("Uploaded {} blobs", up.len());
    Ok(0)
}

/// `sync-blobs [DIR]`.
pub fn sync_blobs(dir: &Path) -> Result<i32> {
    let report = release::sync_blobs(dir, &WithS3)
        .with_context(|| format!("syncing the blobs of {}", dir.display()))?;
    for path in &report.fetched {
        println!("Fetched blob '{path}'");
    }
    for path in &report.unavailable {
        eprintln!("Warning: blob '{path}' is neither in blobs/ nor uploaded");
    }
    println!(
        "Fetched {} blobs ({} already present)",
        report.fetched.len(),
        report.present.len()
    );
    Ok(0)
}

//! Disks and clean-up: `disks --orphaned`, `attach-disk`, `delete-disk`,
//! `clean-up`. It must not delete anything without asking (unless `-n`).

use anyhow::Result;

use bosun_director::CleanUpPlan;
use bosun_director::OrphanDisk;

use super::Ctx;
use bosun_cpi::chain::chain;

/// `disks`: the orphaned disks.
pub fn disks(ctx: &Ctx) -> Result<i32> {
    let list = ctx.store.orphan_disks()?;
    if ctx.json {
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

/// `attach-disk INSTANCE CID`: a hard-stopped instance gets an orphaned disk.
pub fn attach_disk(ctx: &Ctx, instance: &str, cid: &str) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let previous = ctx.director.attach_orphan_disk(&name, instance, cid)?;
    println!(
        "Disk {cid} is now {instance}'s persistent disk{}; `bosun -d {name} start {instance}` mounts it",
        previous.map(|p| format!(" (disk {p} orphaned)")).unwrap_or_default()
    );
    Ok(0)
}

/// `delete-disk CID`: an orphaned disk and its data.
pub async fn delete_disk(ctx: &Ctx, cid: &str) -> Result<i32> {
    ctx.confirm(&format!("Delete disk {cid} and its data?"))?;
    let d = ctx.director.delete_orphan_disk(cid).await?;
    println!(
        "Deleted orphaned disk {} (was {} of {})",
        d.cid, d.instance, d.deployment
    );
    Ok(0)
}

/// `clean-up [--all]`: as BOSH, keep the two newest unused versions of each
/// release and stemcell; --all keeps none and deletes orphaned disks too.
pub async fn clean_up(ctx: &Ctx, all: bool) -> Result<i32> {
    let keep = if all { 0 } else { 2 };
    let plan = ctx.director.clean_up_plan(keep)?;
    let disks = if all {
        ctx.store.orphan_disks()?
    } else {
        Vec::new()
    };
    if plan.is_empty() && disks.is_empty() {
        println!("Nothing to clean up");
        return Ok(0);
    }
    if !ctx.json {
        print_clean_up_plan(&plan, &disks);
    }
    ctx.confirm("Delete these?")?;
    let (done, mut problems) = ctx.director.clean_up(keep).await?;
    let mut deleted_disks = Vec::new();
    for d in &disks {
        match ctx.director.delete_orphan_disk(&d.cid).await {
            Ok(_) => deleted_disks.push(d.cid.clone()),
            Err(e) => problems.push(format!("deleting orphaned disk {}: {}", d.cid, chain(&e))),
        }
    }
    if ctx.json {
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

/// What clean-up would delete.
fn print_clean_up_plan(plan: &CleanUpPlan, disks: &[OrphanDisk]) {
    for (n, v) in &plan.releases {
        println!("release   {n}/{v}");
    }
    for st in &plan.stemcells {
        println!(
            "stemcell  {}/{} ({}) on {}: {}",
            st.name, st.version, st.os, st.cpi, st.cid
        );
    }
    for d in disks {
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

/// Bytes in KiB below a MiB, else in MiB.
fn size(b: u64) -> String {
    match b {
        0..=1_048_575 => format!("{:.1} KiB", b as f64 / 1024.0),
        _ => format!("{:.1} MiB", b as f64 / 1_048_576.0),
    }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_are_in_kib_below_a_mib() {
        assert_eq!(size(0), "0.0 KiB");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(1_048_576), "1.0 MiB");
    }
}

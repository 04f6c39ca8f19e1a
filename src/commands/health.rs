//! Health: `monitor` (watch and repair, printing events as they happen),
//! `cloud-check` (find problems, resolve them) and `events`.
//! It must not decide repairs itself: the monitor and cloud-check do.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use bosun_director::Executor;
use bosun_director::Monitor;
use bosun_director::{Resolution, Scan};

use super::Ctx;
use bosun_cpi::chain::chain;

use crate::print::{choose, print_event, print_scan};

/// `monitor [--duration S]`: repair until Ctrl-C, SIGTERM or the duration
/// is up, printing each new event.
pub async fn monitor(ctx: &Ctx, duration: Option<f64>) -> Result<i32> {
    let store = &ctx.store;
    let deployment = ctx.deployment.as_deref();
    let monitor = Monitor::new(
        store.clone(),
        ctx.director.cpis.clone(),
        ctx.director.opts.clone(),
        ctx.printer.clone(),
        ctx.deployment.clone(),
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut after = store
        .events(deployment, 0)?
        .last()
        .map(|e| e.id)
        .unwrap_or(0);
    let task = tokio::spawn(monitor.run(stop_rx));
    let deadline = duration.map(|d| Instant::now() + Duration::from_secs_f64(d.max(0.0)));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listening for SIGTERM")?;
    println!(
        "Monitoring {} (Ctrl-C to stop)",
        deployment
            .map(|d| format!("deployment '{d}'"))
            .unwrap_or_else(|| "every deployment".into())
    );
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
        for e in store.events(deployment, after)? {
            after = e.id;
            print_event(&e, ctx.json)?;
        }
        if task.is_finished() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
    }
    // This fails only when the monitor has ended already; how it ended is
    // what the task returns.
    let _ = stop_tx.send(true);
    task.await.context("the monitor task")??;
    Ok(0)
}

/// `cloud-check`: list the problems (--report: exit 1 when any), then
/// resolve them: --auto, --resolution ID=RESOLUTION, or asking on a terminal.
pub async fn cloud_check(
    ctx: &Ctx,
    report: bool,
    auto: bool,
    resolutions: &[String],
) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let store = &ctx.store;
    if store.deployment(&name)?.is_none() && store.instances(&name)?.is_empty() {
        bail!("deployment '{name}' does not exist");
    }
    let _lock = store.lock_deployment(&name)?;
    let exec = ctx.director.executor_as(ctx.printer.clone(), "cloud-check");
    let scan = exec.cloud_check_scan(&name).await?;
    let mut chosen = parse_resolutions(resolutions)?;
    if ctx.json && (report || (!auto && chosen.is_empty())) {
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
        if ctx.non_interactive || !std::io::stdin().is_terminal() {
            bail!("not resolving anything: pass --auto, --resolution ID=RESOLUTION, or run on a terminal to choose");
        }
        for p in &scan.problems {
            chosen.push((p.id, choose(p)?));
        }
    }
    resolve(&exec, &name, &scan, chosen).await
}

/// `--resolution ID=RESOLUTION` arguments.
fn parse_resolutions(args: &[String]) -> Result<Vec<(usize, Resolution)>> {
    args.iter()
        .map(|r| {
            r.split_once('=')
                .and_then(|(i, r)| {
                    Some((
                        i.trim().parse::<usize>().ok()?,
                        Resolution::from_name(r.trim())?,
                    ))
                })
                .with_context(|| {
                    format!("--resolution {r}: expected ID=RESOLUTION, e.g. 1=recreate")
                })
        })
        .collect()
}

/// Apply the chosen resolutions, printing how each went; exit 1 when any failed.
async fn resolve(
    exec: &Executor,
    name: &str,
    scan: &Scan,
    chosen: Vec<(usize, Resolution)>,
) -> Result<i32> {
    let mut failed = 0;
    for (id, res) in chosen {
        let Some(p) = scan.problems.iter().find(|p| p.id == id) else {
            bail!("there is no problem {id} (found {})", scan.problems.len());
        };
        match exec.cloud_check_resolve(name, p, res).await {
            Ok(msg) => println!("  {id}: {}: {msg}", res.name()),
            Err(e) => {
                failed += 1;
                println!("  {id}: {}: failed: {}", res.name(), chain(&e));
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

/// `events [--instance GROUP/ID]`: what was seen and done, oldest first.
pub fn events(ctx: &Ctx, instance: Option<String>) -> Result<i32> {
    let events: Vec<_> = ctx
        .store
        .events(ctx.deployment.as_deref(), 0)?
        .into_iter()
        .filter(|e| {
            instance.as_ref().is_none_or(|i| {
                e.instance
                    .as_deref()
                    .is_some_and(|x| x.starts_with(i.as_str()))
            })
        })
        .collect();
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&events)?);
    } else {
        for e in &events {
            print_event(e, false)?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolutions_are_id_equals_name() {
        let got = parse_resolutions(&[" 2 = recreate".to_string()]).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, 2);
        assert_eq!(got[0].1.name(), "recreate");
        let e = parse_resolutions(&["x=recreate".to_string()]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--resolution x=recreate: expected ID=RESOLUTION, e.g. 1=recreate"
        );
    }
}

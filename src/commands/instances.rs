//! Instances of a deployment: `instances`, `start`/`stop`/`restart`/
//! `recreate`, `run-errand`, `ssh` (a command everywhere, or an interactive
//! shell wired to this terminal), `scp` and `logs`.
//! It must not reach past the director to the agents or the CPIs.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use bosun_director::{Director, ErrandOptions, LineSink, StateChange};

use super::Ctx;
use crate::print::print_instances;

/// `instances`: the table of a deployment's instances, with their live state.
pub async fn instances(ctx: &Ctx, ps: bool, vitals: bool, details: bool) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let list = ctx.director.instances(&name).await?;
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print_instances(&list, ps, vitals, details);
    }
    Ok(0)
}

/// `start`, `stop`, `restart`, `recreate`.
pub async fn state_change(
    ctx: &Ctx,
    instance: Option<String>,
    change: StateChange,
    skip_drain: bool,
) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let what = instance
        .clone()
        .unwrap_or_else(|| format!("deployment '{name}'"));
    ctx.confirm(&format!("{} {what}?", change.verb()))?;
    let started = Instant::now();
    let n = ctx
        .director
        .change_state(
            &name,
            instance.as_deref(),
            change,
            skip_drain,
            ctx.printer.clone(),
        )
        .await?;
    println!(
        "{}: {n} instances of '{name}' in {:.1}s",
        change.verb(),
        started.elapsed().as_secs_f64()
    );
    Ok(0)
}

/// `run-errand NAME`: output streams as it is written (--json returns it at
/// the end); the exit code is the first non-zero one.
pub async fn run_errand(
    ctx: &Ctx,
    errand: &str,
    keep_alive: bool,
    instances: Vec<String>,
) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let opts = ErrandOptions {
        keep_alive,
        instances,
    };
    let sink: Option<LineSink> = if ctx.json {
        None
    } else {
        Some(Arc::new(|label: &str, line: &str| {
            println!("[{label}] {line}");
        }))
    };
    let runs = ctx
        .director
        .run_errand(&name, errand, &opts, ctx.printer.clone(), sink)
        .await?;
    if ctx.json {
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

/// `ssh [INSTANCE] [-c CMD]`: with -c the command on every matching
/// instance (exit code: the first non-zero one), else an interactive shell.
pub async fn ssh(ctx: &Ctx, instance: Option<String>, command: Option<String>) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let Some(command) = command else {
        let Some(instance) = instance else {
            bail!("ssh: name the instance for an interactive shell (GROUP/ID or GROUP/INDEX), or run a command on every instance with -c 'CMD'");
        };
        return interactive_ssh(&ctx.director, &name, &instance).await;
    };
    let runs = ctx
        .director
        .run_on_instances(&name, instance.as_deref(), &command)
        .await?;
    if ctx.json {
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
        if let Err(e) = crossterm::terminal::disable_raw_mode() {
            eprintln!("warning: taking the terminal out of raw mode: {e} (try `reset`)");
        }
    }
}

/// `ssh INSTANCE`: a login shell on the instance's pty, wired to this
/// terminal (raw mode and resizes when stdin is one; piped input otherwise).
async fn interactive_ssh(director: &Director, name: &str, instance: &str) -> Result<i32> {
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
            // Output nobody can read any more (stdout closed) is dropped;
            // the shell still runs to its end.
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

/// `scp FROM TO`: exactly one side is INSTANCE:/absolute/path.
pub async fn scp(ctx: &Ctx, from: &str, to: &str) -> Result<i32> {
    let name = ctx.need_deployment()?;
    match (remote(from), remote(to)) {
        (None, Some((inst, path))) => {
            let done = ctx
                .director
                .scp_upload(&name, Some(&inst), Path::new(from), &path)
                .await?;
            for i in done {
                println!("{i}: wrote {path}");
            }
        }
        (Some((inst, path)), None) => {
            let (i, n) = ctx
                .director
                .scp_download(&name, Some(&inst), &path, Path::new(to))
                .await?;
            println!("{i}: read {path} ({n} bytes) into {to}");
        }
        _ => bail!("scp: exactly one side must be INSTANCE:/absolute/path (e.g. kv/0:/tmp/x)"),
    }
    Ok(0)
}

/// INSTANCE:PATH, where PATH is absolute.
fn remote(s: &str) -> Option<(String, String)> {
    s.split_once(":/")
        .map(|(i, p)| (i.to_string(), format!("/{p}")))
}

/// `logs -f`: every matching instance's log lines, live, until Ctrl-C.
pub async fn follow_logs(ctx: &Ctx, instance: Option<String>, jobs: &[String]) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let stop = ctx.director.opts.cancel.clone();
    let on_ctrl_c = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.store(true, Ordering::SeqCst);
        }
    });
    let sink: LineSink = Arc::new(|instance, line| {
        let mut out = std::io::stdout().lock();
        // A line nobody can read any more (stdout closed) is dropped.
        let _ = writeln!(out, "{instance}: {line}");
        let _ = out.flush();
    });
    ctx.director
        .follow_logs(&name, instance.as_deref(), jobs, stop, sink)
        .await?;
    Ok(0)
}

/// `logs`: each matching instance's logs as a tarball in `dir`.
pub async fn fetch_logs(
    ctx: &Ctx,
    instance: Option<String>,
    jobs: &[String],
    dir: &Path,
) -> Result<i32> {
    let name = ctx.need_deployment()?;
    let got = ctx
        .director
        .fetch_logs(&name, instance.as_deref(), jobs, dir)
        .await?;
    if ctx.json {
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

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn a_remote_side_is_instance_colon_absolute_path() {
        assert_eq!(
            remote("kv/0:/tmp/x"),
            Some(("kv/0".to_string(), "/tmp/x".to_string()))
        );
        assert_eq!(remote("./local"), None);
        assert_eq!(remote("kv/0:relative"), None);
    }
}

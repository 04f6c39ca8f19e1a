//! Tasks (recorded director operations): `tasks` and `task ID` with its
//! event, debug or CPI log. It must not change any task: they are recorded
//! by `tasklog`.

use std::path::Path;

use anyhow::{Context, Result};

use super::Ctx;
use crate::print::fmt_time;

/// `tasks [--recent [N]]`: the running tasks, or the last N.
pub fn tasks(ctx: &Ctx, recent: Option<usize>) -> Result<i32> {
    let all = ctx.store.tasks(recent.unwrap_or(1000))?;
    let list: Vec<_> = match recent {
        Some(_) => all,
        None => all.into_iter().filter(|t| t.state == "running").collect(),
    };
    if ctx.json {
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

/// `task ID [--debug | --cpi]`: how a task ended and one of its logs.
pub fn task(ctx: &Ctx, id: i64, debug: bool, cpi: bool) -> Result<i32> {
    let t = ctx
        .store
        .task(id)?
        .with_context(|| format!("there is no task {id} (see `bosun tasks --recent`)"))?;
    let file = if debug {
        "debug.log"
    } else if cpi {
        "cpi.log"
    } else {
        "event.log"
    };
    let text = read_log(&ctx.store.task_dir(id).join(file))
        .with_context(|| format!("reading the {file} of task {id}"))?;
    if ctx.json {
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

/// A task log; one never written (no such file) is empty.
fn read_log(path: &Path) -> std::io::Result<String> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::read_log;

    #[test]
    fn a_missing_log_is_empty_and_others_are_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_log(&dir.path().join("none.log")).unwrap(), "");
        std::fs::write(dir.path().join("event.log"), "a\n").unwrap();
        assert_eq!(read_log(&dir.path().join("event.log")).unwrap(), "a\n");
        // A directory is not a log: that is an error, not an empty log.
        assert!(read_log(dir.path()).is_err());
    }
}

//! What the command line shows and asks: the manifest diff, events,
//! cloud-check scans, instance tables, progress lines (`Printer`) and the
//! prompts (`ask`, `choose`). It must not run director operations or decide
//! what a command does; it only formats what it is given.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{Context, Result};

use bosun_director::Event;
use bosun_director::Progress;
use bosun_director::{CheckProblem, Resolution, Scan};
use bosun_director::{DiffLine, DiffTag};
use bosun_director::{InstanceInfo, Report};

use crate::tasklog::task_event_line;

/// Ask a yes/no question on the terminal: anything but yes is no, and so is
/// no terminal.
pub fn ask(question: &str) -> bool {
    if !std::io::stdin().is_terminal() {
        eprintln!("{question} (not a terminal: pass -n to proceed without asking)");
        return false;
    }
    print!("{question} [yN] ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
        eprintln!("reading the answer: {e}");
        return false;
    }
    matches!(line.trim(), "y" | "Y" | "yes")
}

/// The manifest diff, coloured on a terminal.
pub fn print_diff(hunks: &[Vec<DiffLine>]) {
    if hunks.is_empty() {
        return;
    }
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    println!("Manifest changes:");
    for (i, h) in hunks.iter().enumerate() {
        if i > 0 {
            println!("  ...");
        }
        for l in h {
            let (mark, code) = match l.tag {
                DiffTag::Same => (' ', ""),
                DiffTag::Added => ('+', "\x1b[32m"),
                DiffTag::Removed => ('-', "\x1b[31m"),
            };
            if colour && !code.is_empty() {
                println!("{code}{mark} {}\x1b[0m", l.text);
            } else {
                println!("{mark} {}", l.text);
            }
        }
    }
    println!();
}

/// A UTC time with milliseconds, from ms since the epoch.
pub fn fmt_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms.rem_euclid(1000)
    )
}

/// One event: a line, or with `json` its JSON on one line.
pub fn print_event(e: &Event, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let mut line = format!(
        "#{:<5} {} {:<11} {}",
        e.id,
        fmt_time(e.time_ms),
        e.source,
        e.instance
            .as_deref()
            .or(e.deployment.as_deref())
            .unwrap_or("-")
    );
    if !e.seen.is_empty() {
        line.push_str(&format!("  seen: {}", e.seen));
    }
    line.push_str(&format!(
        "  did: {} {}  -> {}",
        e.action, e.object, e.result
    ));
    println!("{line}");
    Ok(())
}

/// The problems cloud-check found and how each can be resolved.
pub fn print_scan(name: &str, scan: &Scan) {
    for n in &scan.notes {
        println!("note: {n}");
    }
    if scan.problems.is_empty() {
        println!("Deployment '{name}': no problems found");
        return;
    }
    println!("Deployment '{name}': {} problems", scan.problems.len());
    for p in &scan.problems {
        println!(
            "  {:>3}  {:<18} {}",
            p.id,
            format!("{:?}", p.kind),
            p.description
        );
        let opts: Vec<&str> = p.resolutions.iter().map(|r| r.name()).collect();
        println!(
            "       resolutions: {} (default {})",
            opts.join(", "),
            opts[0]
        );
    }
}

/// Ask which resolution to apply to a problem (the first is the default).
pub fn choose(p: &CheckProblem) -> Result<Resolution> {
    println!("Problem {}: {}", p.id, p.description);
    for (i, r) in p.resolutions.iter().enumerate() {
        println!(
            "  {}. {}{}",
            i + 1,
            r.describe(),
            if i == 0 { " (default)" } else { "" }
        );
    }
    print!("Choose [1]: ");
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let n = match line.trim() {
        "" => 1,
        t => t
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=p.resolutions.len()).contains(n))
            .with_context(|| format!("'{t}' is not one of 1..{}", p.resolutions.len()))?,
    };
    Ok(p.resolutions[n - 1])
}

/// The `instances` table, with processes, vitals and details when asked.
pub fn print_instances(list: &[InstanceInfo], ps: bool, vitals: bool, details: bool) {
    println!(
        "{:<46} {:<13} {:<4} {:<16} {:<42}",
        "instance", "process_state", "az", "ips", "vm_cid"
    );
    for i in list {
        println!(
            "{:<46} {:<13} {:<4} {:<16} {:<42}",
            format!("{}{}", i.instance, if i.bootstrap { "*" } else { "" }),
            i.process_state,
            i.az,
            i.ips.join(","),
            i.vm_cid.clone().unwrap_or_else(|| "-".into())
        );
        if vitals {
            match &i.vitals {
                Some(v) => println!(
                    "  load {:.2} {:.2} {:.2}  memory {} of {} MB  ephemeral disk {}  persistent disk {}",
                    v.load[0],
                    v.load[1],
                    v.load[2],
                    v.mem_used_kb / 1024,
                    v.mem_total_kb / 1024,
                    v.ephemeral_disk_percent.map(|p| format!("{p}%")).unwrap_or_else(|| "-".into()),
                    v.persistent_disk_percent.map(|p| format!("{p}%")).unwrap_or_else(|| "-".into()),
                ),
                None => println!("  vitals unavailable (agent not answering)"),
            }
        }
        if details {
            println!(
                "  agent {}  vm created {}  disks {} ({})",
                i.agent_id.as_deref().unwrap_or("-"),
                i.vm_created_at
                    .map(|t| fmt_time(t * 1000))
                    .unwrap_or_else(|| "-".into()),
                if i.persistent_disk_cids.is_empty() {
                    "-".to_string()
                } else {
                    i.persistent_disk_cids.join(",")
                },
                i.persistent_disk_mb
                    .map(|m| format!("{m} MB"))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        if ps {
            for p in &i.processes {
                println!(
                    "  {:<44} {:<13} uptime {}s",
                    format!("{}/{}", p.job, p.name),
                    p.state,
                    p.uptime_secs.unwrap_or(0)
                );
            }
        }
    }
    println!("\n{} instances", list.len());
}

/// Prints progress lines and notices (the director's `Report`).
pub struct Printer {
    started: Instant,
    /// With --json, stdout is for the JSON: progress goes to stderr.
    json: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer {
            started: Instant::now(),
            json,
        }
    }
}

impl Progress for Printer {
    fn stage(&self, subject: &str, stage: &str) {
        let line = format!(
            "{:>7.2}s  {subject:<48} {stage}",
            self.started.elapsed().as_secs_f64()
        );
        task_event_line(&line);
        if self.json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

impl Report for Printer {
    fn notice(&self, msg: &str) {
        task_event_line(msg);
        if self.json {
            eprintln!("{msg}");
        } else {
            println!("{msg}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fmt_time;

    #[test]
    fn times_are_utc_with_milliseconds() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(fmt_time(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(fmt_time(-1), "1969-12-31T23:59:59.999Z");
    }
}

//! Host processes as /proc shows them: whether an agent process is alive,
//! finding processes by their command line, and sending signals.
//!
//! This module must not start processes nor know the VM layout: callers
//! give it the pid or the command-line marker to look for.

use std::fs;

/// Whether `pid` is a live process (not a zombie) whose command line contains `needle`.
pub(crate) fn process_alive_with(pid: i32, needle: &str) -> bool {
    if pid <= 0 {
        return false;
    }
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the last ')' (the command name may contain anything).
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X") | Some("x")) {
        return false;
    }
    match fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => contains(&cmdline, needle.as_bytes()),
        Err(_) => false,
    }
}

pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Live processes whose command line contains `needle`.
pub(crate) fn processes_with(needle: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id() as i32;
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me && process_alive_with(pid, needle))
        .collect()
}

pub(crate) fn kill(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

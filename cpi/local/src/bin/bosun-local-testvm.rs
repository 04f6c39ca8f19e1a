//! A stand-in agent for the local CPI's own tests (the real agent is the
//! `bosun` binary, exercised by the end-to-end tests).
//!
//! `bosun-local-testvm --settings FILE --vm-root DIR`: enters the VM namespace
//! like `bosun agent` does, checks the settings are visible at FILE (normally
//! `/var/vcap/bosh/settings.json`), listens on the settings' `listen_ip:listen_port`
//! (accepting and closing connections), starts one "job" process
//! (`bosun-local-testvm --job DIR`, which sleeps), writes
//! `/var/vcap/data/testvm-ready.json` (`{"pid": <its pid in the namespace>, ...}`)
//! and then sleeps until killed.
//!
//! With `--probe NAME` it first writes `NAME` into `/etc`, `/tmp`, `/var/tmp`,
//! `/root` and `/home`, appends a user `NAME` to `/etc/passwd`, and reports in
//! the ready file whether each disk path of its settings is a directory
//! (`"disks_visible": {cid: bool}`), as a job of a real release would.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use bosun_cpi::AgentSettings;

fn sleep_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn fail(message: String) -> ! {
    eprintln!("bosun-local-testvm: {message}");
    std::process::exit(1);
}

/// What a job's pre-start script might do to its VM; fails the VM on any error.
fn write_probe(name: &str, settings: &AgentSettings) -> serde_json::Value {
    use std::io::Write;
    for dir in ["/etc", "/tmp", "/var/tmp", "/root", "/home"] {
        let path = format!("{dir}/{name}");
        std::fs::write(&path, format!("written in the VM to {path}\n"))
            .unwrap_or_else(|e| fail(format!("writing {path}: {e}")));
    }
    std::fs::OpenOptions::new()
        .append(true)
        .open("/etc/passwd")
        .and_then(|mut f| writeln!(f, "{name}:x:4242:4242::/home/{name}:/usr/sbin/nologin"))
        .unwrap_or_else(|e| fail(format!("appending to /etc/passwd: {e}")));
    let visible: serde_json::Map<String, serde_json::Value> = settings
        .disks
        .iter()
        .map(|(cid, hint)| {
            let path = hint["path"].as_str().unwrap_or_default();
            (cid.clone(), std::path::Path::new(path).is_dir().into())
        })
        .collect();
    visible.into()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut settings, mut vm_root, mut job, mut probe) = (None, None, None, None);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--settings" => settings = args.next().map(PathBuf::from),
            "--vm-root" => vm_root = args.next().map(PathBuf::from),
            "--job" => job = args.next(),
            "--probe" => probe = args.next(),
            other => fail(format!("unexpected argument {other:?}")),
        }
    }
    if job.is_some() {
        sleep_forever();
    }
    let (Some(settings), Some(vm_root)) = (settings, vm_root) else {
        fail("usage: bosun-local-testvm --settings FILE --vm-root DIR".into())
    };

    if let Err(e) = bosun_cpi_local::enter_vm_namespace(&vm_root) {
        fail(bosun_cpi::chain::chain(&e));
    }

    let bytes = std::fs::read(&settings)
        .unwrap_or_else(|e| fail(format!("reading {}: {e}", settings.display())));
    let parsed: AgentSettings = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| fail(format!("parsing {}: {e}", settings.display())));

    let disks_visible = match &probe {
        Some(name) => write_probe(name, &parsed),
        None => serde_json::Value::Null,
    };

    let listener = TcpListener::bind((parsed.listen_ip.as_str(), parsed.listen_port))
        .unwrap_or_else(|e| {
            fail(format!(
                "listening on {}:{}: {e}",
                parsed.listen_ip, parsed.listen_port
            ))
        });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            drop(conn);
        }
    });

    // Through /proc/self/exe: the binary's own path may lie under a
    // directory this VM has its own of (a build under /tmp).
    let mut job = Command::new("/proc/self/exe")
        .arg("--job")
        .arg(&vm_root)
        .stdin(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(format!("starting the job process: {e}")));

    let ready = serde_json::json!({
        "pid": std::process::id(),
        "job_pid": job.id(),
        "agent_id": parsed.agent_id,
        "disks": parsed.disks,
        "disks_visible": disks_visible,
    });
    let tmp = "/var/vcap/data/.testvm-ready.json.tmp";
    std::fs::write(tmp, ready.to_string())
        .and_then(|()| std::fs::rename(tmp, "/var/vcap/data/testvm-ready.json"))
        .unwrap_or_else(|e| fail(format!("writing /var/vcap/data/testvm-ready.json: {e}")));
    // The job sleeps forever; reap it should it ever exit, then keep running.
    let _ = job.wait();
    sleep_forever();
}

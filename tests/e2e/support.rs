//! Helpers: run the binary, make a cloud-config with a private subnet, talk HTTP.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

pub const BOSUN: &str = env!("CARGO_BIN_EXE_bosun");

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A state dir plus a cloud-config on its own 127.<octet>.0.0/24 subnet.
pub struct Env {
    pub dir: tempfile::TempDir,
    /// A directory a local VM's jobs can write and the test read: not
    /// under /tmp, /var/tmp, /root or /home, which each local VM has its
    /// own of.
    pub shared: tempfile::TempDir,
}

/// Where [`Env::shared`] directories go: /dev/shm (the host's, in every
/// local VM too), else the target directory when that is not under a
/// path each VM has its own of.
fn shared_root() -> PathBuf {
    let shm = PathBuf::from("/dev/shm");
    if shm.is_dir() {
        return shm;
    }
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let private = ["/tmp", "/var/tmp", "/root", "/home"];
    assert!(
        !private.iter().any(|p| target.starts_with(p)),
        "no /dev/shm, and {} lies under a directory each local VM has its own of: the e2e tests need one of the host's directories the VMs share",
        target.display()
    );
    target
}

impl Env {
    pub fn new(octet: u8) -> Env {
        let dir = tempfile::tempdir().expect("tempdir");
        let shared = tempfile::tempdir_in(shared_root()).expect("shared tempdir");
        let env = Env { dir, shared };
        let cc = env.path("cloud-config.yml");
        std::fs::write(
            &cc,
            format!(
                "azs:\n- name: z1\nnetworks:\n- name: default\n  type: manual\n  subnets:\n  - range: 127.{o}.0.0/24\n    gateway: 127.{o}.0.1\n    static: [127.{o}.0.2 - 127.{o}.0.50]\n    azs: [z1]\nvm_types:\n- name: default\ndisk_types:\n- name: default\n  disk_size: 1024\ncompilation:\n  workers: 2\n  az: z1\n  network: default\n",
                o = octet
            ),
        )
        .expect("write cloud-config");
        let out = env.bosun(&["update-cloud-config", cc.to_str().expect("utf8")]);
        assert!(out.status.success(), "{}", text(&out));
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A path in [`Env::shared`].
    pub fn shared_path(&self, name: &str) -> PathBuf {
        self.shared.path().join(name)
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// `bosun --state-dir <this env's state> ARGS...`, not started yet.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BOSUN);
        c.arg("--state-dir").arg(self.state()).args(args);
        c
    }

    pub fn bosun(&self, args: &[&str]) -> Output {
        self.command(args)
            .env("BOSUN_AGENT_TIMEOUT", "30")
            .output()
            .expect("run bosun")
    }

    /// Write a manifest (`{release}`: the kv release path; `{os}`: this host's
    /// os, the local stemcell's).
    pub fn manifest(&self, name: &str, body: &str) -> PathBuf {
        let p = self.path(name);
        let body = body
            .replace(
                "{release}",
                repo().join("releases/kv").to_str().expect("utf8"),
            )
            .replace("{os}", &bosun_director::host_os());
        std::fs::write(&p, body).expect("write manifest");
        p
    }

    pub fn instances(&self, deployment: &str) -> Vec<serde_json::Value> {
        let out = self.bosun(&["-d", deployment, "instances", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("instances --json is JSON")
            .as_array()
            .expect("an array")
            .clone()
    }

    /// Processes whose command line mentions this env's state dir.
    pub fn processes(&self) -> Vec<String> {
        let needle = self.state().display().to_string();
        let mut found = Vec::new();
        for e in std::fs::read_dir("/proc").expect("proc").flatten() {
            let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                found.push(cmd);
            }
        }
        found
    }

    /// VMs of the local CPI: its VM directories, not its staging
    /// (`.creating-*`) or trash (`.deleting-*`) ones.
    pub fn vm_dirs(&self) -> usize {
        std::fs::read_dir(self.state().join("local-cpi/vms"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Leave nothing running, whatever the test did.
        for d in ["quickstart", "canary", "e2e"] {
            let _ = self.bosun(&["-d", d, "delete-deployment", "-n"]);
        }
        // VMs the state does not know (a test that failed before its
        // cloud-check ran): their agents would hold this env's IPs.
        let needle = format!("{}/", self.state().join("local-cpi/vms").display());
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd)
                .replace('\0', " ")
                .contains(&needle)
            {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A plain HTTP/1.0 request; returns (status, body).
pub fn http(method: &str, addr: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_with(method, addr, path, &[], body)
}

/// [`http`] with extra headers.
pub fn http_with(
    method: &str,
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Ok((status, body))
}

/// The kv release in a 3-instance deployment with a persistent disk.
pub fn kv_manifest(name: &str, port: u32, watch: &str) -> String {
    format!(
        r#"name: {name}
releases:
- name: kv
  version: latest
  path: {{release}}
stemcells:
- alias: default
  os: {{os}}
  version: latest
update:
  canaries: 1
  max_in_flight: 1
  canary_watch_time: {watch}
  update_watch_time: {watch}
instance_groups:
- name: kv
  instances: 3
  azs: [z1]
  vm_type: default
  stemcell: default
  persistent_disk_type: default
  networks:
  - name: default
  jobs:
  - name: kv
    release: kv
    properties:
      kv:
        port: {port}
"#
    )
}

/// Wait until `f` holds, polling every 100 ms; false on timeout.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Direct children of a process, with their command lines.
pub fn children(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|x| x.parse::<i32>().ok());
        if ppid == Some(pid) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// Every descendant of a process (children first).
pub fn descendants(pid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for c in children(p) {
            todo.push(c.0);
            out.push(c);
        }
    }
    out
}

pub fn signal(pid: i32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A `bosun monitor` running in the background; killed when dropped.
pub struct MonitorProc {
    child: std::process::Child,
    pub log: PathBuf,
}

impl Drop for MonitorProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Env {
    /// Start `bosun -d <deployment> monitor`, its output going to a file.
    pub fn monitor(&self, deployment: &str) -> MonitorProc {
        let log = self.path(&format!("monitor-{deployment}.log"));
        let file = std::fs::File::create(&log).expect("monitor log");
        let child = self
            .command(&["-d", deployment, "monitor"])
            .stdout(file.try_clone().expect("dup"))
            .stderr(file)
            .spawn()
            .expect("start bosun monitor");
        MonitorProc { child, log }
    }

    /// `events --json` of a deployment.
    pub fn events(&self, deployment: &str) -> Vec<serde_json::Value> {
        let out = self.bosun(&["-d", deployment, "events", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .expect("events --json is JSON")
            .as_array()
            .expect("an array")
            .clone()
    }

    /// Events of one instance (`<group>/<id>`) of a deployment, in order.
    pub fn instance_events(
        &self,
        deployment: &str,
        inst: &serde_json::Value,
    ) -> Vec<serde_json::Value> {
        let prefix = format!(
            "{}/{}",
            inst["group"].as_str().unwrap(),
            inst["id"].as_str().unwrap()
        );
        self.events(deployment)
            .into_iter()
            .filter(|e| {
                e["instance"]
                    .as_str()
                    .is_some_and(|i| i.starts_with(&prefix))
            })
            .collect()
    }

    /// The instance's events once the monitor has recorded the end of its
    /// recreate: the instance runs before that last event is written.
    pub fn events_after_recreate(
        &self,
        deployment: &str,
        inst: &serde_json::Value,
    ) -> Vec<serde_json::Value> {
        let done = |ev: &[serde_json::Value]| {
            ev.iter().any(|e| {
                e["action"] == "recreate"
                    && e["result"].as_str().is_some_and(|r| r.starts_with("ok"))
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), || done(
                &self.instance_events(deployment, inst)
            )),
            "the monitor recorded no finished recreate of {inst}"
        );
        self.instance_events(deployment, inst)
    }

    /// The pid the local CPI recorded for a VM (its agent's launcher).
    pub fn vm_pid(&self, cid: &str) -> i32 {
        std::fs::read_to_string(self.state().join("local-cpi/vms").join(cid).join("pid"))
            .expect("VM pid file")
            .trim()
            .parse()
            .expect("a pid")
    }
}

/// A release whose only job runs `sleep` and needs no packages.
pub fn noop_release(env: &Env) -> std::path::PathBuf {
    let dir = env.path("noop-release");
    let files: std::collections::BTreeMap<&str, &str> = [
        ("config/final.yml", "name: noop\n"),
        (
            "jobs/noop/spec",
            "---\nname: noop\ntemplate_engine: tera\ntemplates:\n  bpm.yml: config/bpm.yml\npackages: []\nproperties: {}\n",
        ),
        ("jobs/noop/monit", ""),
        (
            "jobs/noop/templates/bpm.yml",
            "processes:\n- name: sleep\n  executable: /bin/sleep\n  args: ['1000']\n",
        ),
    ]
    .into_iter()
    .collect();
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    std::fs::create_dir_all(dir.join("packages")).unwrap();
    dir
}

/// Position of the first event matching `action` and a result prefix.
pub fn event_pos(events: &[serde_json::Value], action: &str, result: &str, object: &str) -> usize {
    events
        .iter()
        .position(|e| {
            e["action"] == action
                && e["result"].as_str().unwrap().starts_with(result)
                && e["object"].as_str().unwrap().contains(object)
        })
        .unwrap_or_else(|| {
            panic!(
                "no event {action} {object} -> {result}... in:\n{}",
                serde_json::to_string_pretty(events).unwrap()
            )
        })
}

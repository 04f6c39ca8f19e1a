//! What runs on a VM, hardened: an agent flooded with idle unauthenticated
//! connections keeps serving `bosun ssh` and the health monitor, and a
//! rendered secret is readable by root only on the host (not by another
//! uid). Figures (flood time, connections the agent closed, ssh time) are
//! printed for the record, never asserted.

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::{kv_manifest, text, wait_until, Env};

/// Idle connections opened against one agent.
const FLOOD: usize = 5000;
/// The uid (and gid) of `nobody`: any user other than root.
const OTHER_UID: u32 = 65534;

/// The kv deployment serving TLS with a generated certificate: its private
/// key is a secret that reaches the rendered `config/tls.key`.
fn manifest() -> String {
    kv_manifest("quickstart", 8080, "300-30000")
        .replace(
            "    properties:\n      kv:\n        port: 8080\n",
            "    properties:\n      kv:\n        port: 8080\n        tls:\n          certificate: ((kv_tls.certificate))\n          private_key: ((kv_tls.private_key))\n          ca: ((kv_tls.ca))\n",
        )
        + "variables:\n- name: kv_ca\n  type: certificate\n  options: {is_ca: true, common_name: kv-ca}\n- name: kv_tls\n  type: certificate\n  options: {ca: kv_ca, common_name: kv, alternative_names: [127.140.0.101, 127.140.0.102, 127.140.0.103]}\n"
}

fn nofile() -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim
}

fn set_nofile_soft(soft: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: soft.min(nofile().rlim_max),
        rlim_max: nofile().rlim_max,
    };
    // SAFETY: setrlimit reads the struct we own.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) }, 0);
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64
}

/// `cat PATH` (`ls PATH` for a directory) as `uid` (with that gid and no
/// supplementary groups).
fn cat_as(uid: u32, path: &Path) -> std::process::Output {
    let mut cmd = Command::new(if path.is_dir() { "ls" } else { "cat" });
    cmd.arg(path);
    if uid != 0 {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run cat")
}

/// Open `n` TCP connections to `addr` and send nothing: (those
/// established, how many were not). Gives up after 20 failures in a row
/// (an agent that stopped accepting).
fn open_idle(addr: SocketAddr, n: usize) -> (Vec<TcpStream>, usize) {
    let mut open = Vec::with_capacity(n);
    let (mut failed, mut in_a_row) = (0, 0);
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => {
                open.push(s);
                in_a_row = 0;
            }
            Err(_) => {
                failed += 1;
                in_a_row += 1;
                if in_a_row == 20 {
                    break;
                }
            }
        }
    }
    (open, failed)
}

#[test]
fn a_flooded_agent_keeps_serving_and_rendered_secrets_stay_root_s() {
    // Agents start with the usual default soft limit of open files (1024);
    // this process raises its own again for the flood once they run.
    let initial = nofile();
    set_nofile_soft(1024);
    let env = Env::new(140);
    // As a state dir under /var/lib or a home directory would be: only the
    // state dir's own modes (and the VMs') keep other users out.
    std::fs::set_permissions(
        env.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod the test dir");
    let m = env.manifest("m.yml", &manifest());
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    set_nofile_soft(initial.rlim_max);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    assert_eq!(list.len(), 3);

    // Secrets: a rendered file holding a generated private key.
    let cid = list[0]["vm_cid"].as_str().unwrap();
    let vm_dir = env.state().join("local-cpi/vms").join(cid);
    let key = vm_dir.join("vcap/jobs/kv/config/tls.key");
    let as_root = cat_as(0, &key);
    assert!(as_root.status.success(), "{}", text(&as_root));
    assert!(String::from_utf8_lossy(&as_root.stdout).contains("PRIVATE KEY"));
    for path in [&key, &vm_dir, &env.state().join("state.db"), &env.state()] {
        let other = cat_as(OTHER_UID, path);
        assert!(!other.status.success(), "uid {OTHER_UID} read {path:?}");
        assert!(
            String::from_utf8_lossy(&other.stderr).contains("Permission denied"),
            "uid {OTHER_UID} gets EACCES on {path:?} (mode {:o}): {}",
            std::fs::metadata(path).map_or(0, |m| m.mode()),
            text(&other)
        );
    }
    // Each layer on its own: no access for others on the file, its job dir
    // and the VM dir.
    for path in [
        key.clone(),
        vm_dir.join("vcap/jobs/kv"),
        vm_dir.join("vcap/jobs/kv/bin/drain"),
        vm_dir.clone(),
    ] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o007, 0, "{path:?} is {:o}", mode & 0o7777);
    }

    // The flood, with the monitor watching.
    let mon = env.monitor("quickstart");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            &mon.log
        )
        .is_ok_and(|l| l.contains("Monitoring"))),
        "monitor did not start"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let ip = list[0]["ips"][0].as_str().unwrap();
    let agent: SocketAddr = format!("{ip}:{}", bosun_cpi::AGENT_PORT).parse().unwrap();
    let (started, started_ms) = (Instant::now(), now_ms());
    // Half of it at once (more than an agent with 1024 descriptors has)...
    let (mut flood, mut refused) = open_idle(agent, FLOOD / 2);
    println!(
        "flood: {} idle connections to {agent} opened in {:?} ({refused} not established)",
        flood.len(),
        started.elapsed()
    );
    let ssh_c = |when: &str| {
        let t = Instant::now();
        let out = env.bosun(&["-d", "quickstart", "ssh", "kv", "-c", "hostname"]);
        assert!(out.status.success(), "ssh -c {when}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        for i in &list {
            let prefix = format!("kv/{} ({}): ", i["id"].as_str().unwrap(), i["index"]);
            assert!(stdout.contains(&prefix), "ssh -c {when}: {stdout}");
        }
        println!("flood: ssh -c on 3 instances {when} took {:?}", t.elapsed());
    };
    ssh_c("with the first half held");
    // ... then the other half while `ssh -c` runs again and again.
    let rest = std::thread::spawn(move || open_idle(agent, FLOOD - FLOOD / 2));
    let mut runs = 0;
    while !rest.is_finished() || runs == 0 {
        ssh_c("while the flood comes in");
        runs += 1;
    }
    let (more, more_refused) = rest.join().expect("flood thread");
    flood.extend(more);
    refused += more_refused;
    println!(
        "flood: {} idle connections opened in {:?} ({refused} not established), {runs} ssh -c meanwhile",
        flood.len(),
        started.elapsed()
    );
    assert!(
        flood.len() >= FLOOD * 4 / 5,
        "the flood reached the agent: {} of {FLOOD}",
        flood.len()
    );
    ssh_c("with the whole flood held");

    // Held past the monitor's agent timeout (5 s) since the flood began.
    std::thread::sleep(Duration::from_secs(6));
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(1)))
            .expect("read timeout");
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    println!(
        "flood: after {:?}, the agent had closed {closed} of {} idle connections",
        started.elapsed(),
        flood.len()
    );
    drop(flood);

    // The monitor saw nothing wrong with the flooded instance.
    let prefix = format!("kv/{}", list[0]["id"].as_str().unwrap());
    let trouble: Vec<_> = env
        .events("quickstart")
        .into_iter()
        .filter(|e| e["time_ms"].as_i64().unwrap_or(0) >= started_ms)
        .filter(|e| {
            e["instance"]
                .as_str()
                .is_some_and(|i| i.starts_with(&prefix))
        })
        .filter(|e| {
            let all = e.to_string();
            e["action"] == "alert" || all.contains("unresponsive") || all.contains("did not answer")
        })
        .collect();
    assert!(trouble.is_empty(), "monitor events: {trouble:#?}");
    drop(mon);
}

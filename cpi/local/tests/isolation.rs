//! A local VM is not the host: what its processes write to `/etc`, `/tmp`,
//! `/var/tmp`, `/root` and `/home` stays in the VM's own copies, across a
//! reboot, and goes with the VM.
//!
//! The agent is `bosun-local-testvm --probe NAME`, which writes NAME into
//! each of those directories and appends a user to `/etc/passwd` from inside
//! its namespace. Needs root or unprivileged user namespaces (plus an
//! existing /var/vcap when not root).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bosun_cpi::Cpi;
use bosun_cpi::{AgentSettings, CreateDiskRequest, CreateVmRequest, Metadata, StemcellSpec, VmCid};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};

const TESTVM: &str = env!("CARGO_BIN_EXE_bosun-local-testvm");
const COVERED: [&str; 5] = ["/etc", "/tmp", "/var/tmp", "/root", "/home"];

fn vm_request(stemcell: &bosun_cpi::StemcellCid) -> CreateVmRequest {
    let pid = std::process::id();
    let ip = format!("127.{}.250.10", 100 + pid % 100);
    let port = 20000 + (pid % 20000) as u16;
    CreateVmRequest {
        agent_id: "agent-isolation".into(),
        stemcell: stemcell.clone(),
        cloud_properties: serde_json::json!({}),
        networks: BTreeMap::new(),
        disk_cids: Vec::new(),
        settings: AgentSettings {
            agent_id: "agent-isolation".into(),
            director_public_key: "ssh-ed25519 AAAAtest director".into(),
            host_private_key: "not a real key".into(),
            listen_ip: ip,
            listen_port: port,
            networks: BTreeMap::new(),
            disks: BTreeMap::new(),
            env: serde_json::json!({}),
        },
        metadata: Metadata::new(),
    }
}

/// Waits for the stand-in agent's ready file, removing it (so the next wait
/// sees the next start).
fn wait_ready(cpi: &LocalCpi, vm: &VmCid) -> serde_json::Value {
    let path = cpi.vm_dir(vm).join("vcap/data/testvm-ready.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            std::fs::remove_file(&path).unwrap();
            return serde_json::from_slice(&bytes).unwrap();
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(cpi.vm_dir(vm).join("agent.log")).unwrap_or_default();
            panic!("VM {vm} never became ready; agent.log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The host's `/etc/passwd` as a VM sees it before its jobs run: with
/// BOSH's `vcap` user added where the host lacks it.
fn with_vcap(host_passwd: &[u8]) -> Vec<u8> {
    let group = std::fs::read_to_string("/etc/group").unwrap();
    let passwd = String::from_utf8_lossy(host_passwd).into_owned();
    match bosun_cpi::vm_users::with_vcap(&passwd, &group) {
        Some((p, _)) => p.into_bytes(),
        None => host_passwd.to_vec(),
    }
}

fn euid_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Where the VM keeps what it wrote to `host_path`: below its overlay's
/// upper directory for `/etc` (unless it has a copy), below its own
/// directory otherwise.
fn in_vm(cpi: &LocalCpi, vm: &VmCid, host_path: &str) -> PathBuf {
    let root = cpi.vm_dir(vm).join("root");
    let rel = host_path.trim_start_matches('/');
    match rel.split_once('/') {
        Some(("etc", rest)) if !root.join("etc").is_dir() => root.join("etc.upper").join(rest),
        _ if rel == "etc" && !root.join("etc").is_dir() => root.join("etc.upper"),
        _ => root.join(rel),
    }
}

fn agent_log(cpi: &LocalCpi, vm: &VmCid) -> String {
    std::fs::read_to_string(cpi.vm_dir(vm).join("agent.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_vm_writes_to_etc_tmp_and_homes_stays_in_the_vm() {
    // The state directory is below /tmp (tempfile's default), which the VM
    // covers: its disks must still be reachable by their host paths.
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("bosun-isolation-test-{}", std::process::id());
    let cpi = LocalCpi::new(LocalCpiConfig {
        root: tmp.path().join("local-cpi"),
        agent_command: vec![TESTVM.to_string(), "--probe".into(), name.clone()],
    })
    .unwrap();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let stemcell = cpi
        .create_stemcell(&StemcellSpec {
            name: "bosh-local-host".into(),
            os: "host".into(),
            version: "0.1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        })
        .await
        .unwrap();

    let started = Instant::now();
    let vm = cpi.create_vm(&vm_request(&stemcell)).await.unwrap();
    eprintln!("create_vm took {:?}", started.elapsed());
    wait_ready(&cpi, &vm);

    let host_clean = || {
        for dir in COVERED {
            let p = Path::new(dir).join(&name);
            assert!(!p.exists(), "{} reached the host", p.display());
        }
        assert_eq!(
            std::fs::read("/etc/passwd").unwrap(),
            passwd_before,
            "the host's /etc/passwd changed"
        );
    };
    host_clean();
    let root = cpi.vm_dir(&vm).join("root");
    if euid_is_root() {
        assert!(!root.join("etc").exists(), "root: no copy of /etc");
        assert!(
            agent_log(&cpi, &vm).contains("/etc is an overlay"),
            "{}",
            agent_log(&cpi, &vm)
        );
    } else {
        assert!(
            root.join("etc/passwd").is_file(),
            "not root: a copy of /etc"
        );
    }
    for dir in COVERED {
        let p = in_vm(&cpi, &vm, dir).join(&name);
        let text = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("the VM's copy {}: {e}", p.display()));
        assert_eq!(text, format!("written in the VM to {dir}/{name}\n"));
    }
    let passwd_in_vm = std::fs::read(in_vm(&cpi, &vm, "/etc/passwd")).unwrap();
    let mut want = with_vcap(&passwd_before);
    want.extend_from_slice(
        format!("{name}:x:4242:4242::/home/{name}:/usr/sbin/nologin\n").as_bytes(),
    );
    assert_eq!(
        String::from_utf8_lossy(&passwd_in_vm),
        String::from_utf8_lossy(&want),
        "the VM's /etc/passwd is the host's plus the line its job appended"
    );

    // A disk below the covered /tmp is still visible at its hint path after a
    // reboot, and the VM's own /etc survives the reboot (it is the VM's root disk).
    let disk = cpi
        .create_disk(&CreateDiskRequest {
            size_mb: 16,
            cloud_properties: serde_json::json!({}),
            vm_locality: Some(vm.clone()),
            metadata: Metadata::new(),
        })
        .await
        .unwrap();
    let hint = cpi.attach_disk(&vm, &disk).await.unwrap();
    assert!(hint.path.starts_with("/tmp/"), "{}", hint.path);
    cpi.reboot_vm(&vm).await.unwrap();
    let ready = wait_ready(&cpi, &vm);
    assert_eq!(
        ready["disks_visible"],
        serde_json::json!({ disk.0.clone(): true }),
        "{ready}"
    );
    let passwd_in_vm = std::fs::read_to_string(in_vm(&cpi, &vm, "/etc/passwd")).unwrap();
    assert_eq!(
        passwd_in_vm.matches(&format!("{name}:x:")).count(),
        2,
        "appended once per boot"
    );
    host_clean();

    cpi.detach_disk(&vm, &disk).await.unwrap();
    cpi.delete_vm(&vm).await.unwrap();
    assert!(!cpi.vm_dir(&vm).exists(), "the VM's copies go with it");
    host_clean();
    cpi.delete_disk(&disk).await.unwrap();
}

#[test]
fn a_vm_root_without_its_system_directories_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vcap = tmp.path().join("vms/vm-old/vcap");
    std::fs::create_dir_all(&vcap).unwrap();
    let out = std::process::Command::new(TESTVM)
        .arg("--settings")
        .arg("/var/vcap/bosh/settings.json")
        .arg("--vm-root")
        .arg(&vcap)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("finding the VM's own system directories failed")
            && stderr.contains("vm-old/vcap/../root is missing"),
        "{stderr}"
    );
}

/// As root, a VM whose overlay cannot be mounted (here: its work directory
/// is gone) gets a copy of the host's /etc at that start, says so, and keeps
/// its writes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_overlay_a_vm_falls_back_to_a_copy_of_etc() {
    if !euid_is_root() {
        eprintln!("skipped: without root every VM has a copy from the start");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = format!("bosun-isolation-fallback-{}", std::process::id());
    let cpi = LocalCpi::new(LocalCpiConfig {
        root: tmp.path().join("local-cpi"),
        agent_command: vec![TESTVM.to_string(), "--probe".into(), name.clone()],
    })
    .unwrap();
    let passwd_before = std::fs::read("/etc/passwd").unwrap();
    let stemcell = cpi
        .create_stemcell(&StemcellSpec {
            name: "bosh-local-host".into(),
            os: "host".into(),
            version: "0.1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        })
        .await
        .unwrap();
    let mut req = vm_request(&stemcell);
    req.settings.listen_port += 1;
    let vm = cpi.create_vm(&req).await.unwrap();
    wait_ready(&cpi, &vm);
    let root = cpi.vm_dir(&vm).join("root");
    assert!(
        root.join("etc.upper").join(&name).is_file(),
        "first boot: overlay"
    );

    std::fs::remove_dir_all(root.join("etc.work")).unwrap();
    cpi.reboot_vm(&vm).await.unwrap();
    wait_ready(&cpi, &vm);
    let log = agent_log(&cpi, &vm);
    assert!(
        log.contains("cannot mount an overlay over /etc")
            && log.contains("uses a copy")
            && log.contains("earlier changes to /etc stay in"),
        "{log}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc").join(&name)).unwrap(),
        format!("written in the VM to /etc/{name}\n")
    );
    let mut want = with_vcap(&passwd_before);
    want.extend_from_slice(
        format!("{name}:x:4242:4242::/home/{name}:/usr/sbin/nologin\n").as_bytes(),
    );
    assert_eq!(std::fs::read(root.join("etc/passwd")).unwrap(), want);
    assert!(!Path::new("/etc").join(&name).exists(), "reached the host");
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    cpi.delete_vm(&vm).await.unwrap();
    assert!(!cpi.vm_dir(&vm).exists());
}

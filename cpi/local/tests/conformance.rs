//! The CPI conformance suite and the VM namespace, with real processes.
//!
//! The agent is `bosun-local-testvm` (this crate's stand-in): it enters the VM
//! namespace exactly as `bosun agent --vm-root` does, listens on its VM's
//! loopback address and starts a "job" process. Needs root or unprivileged
//! user namespaces (plus an existing /var/vcap when not root).

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::{
    AgentSettings, CreateDiskRequest, CreateVmRequest, Metadata, NetworkKind, NetworkSettings,
    StemcellSpec, VmCid,
};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};

const TESTVM: &str = env!("CARGO_BIN_EXE_bosun-local-testvm");

fn local_cpi(root: &Path) -> LocalCpi {
    LocalCpi::new(LocalCpiConfig {
        root: root.join("local-cpi"),
        agent_command: vec![TESTVM.to_string()],
    })
    .expect("LocalCpi::new")
}

/// A loopback address and port unlikely to be used by anything else on this
/// machine: 127.<from our pid>.<test>.<10 + n>, one port for every VM.
fn addr(test: u8, n: usize) -> (String, u16) {
    let pid = std::process::id();
    let ip = format!("127.{}.{}.{}", 100 + pid % 100, test, 10 + n);
    (ip, 20000 + (pid % 20000) as u16)
}

fn stemcell_spec() -> StemcellSpec {
    StemcellSpec {
        name: "bosh-local-host".into(),
        os: "host".into(),
        version: "0.1".into(),
        image_path: None,
        cloud_properties: serde_json::json!({}),
    }
}

fn vm_request(test: u8, n: usize, stemcell: &bosun_cpi::StemcellCid) -> CreateVmRequest {
    let (ip, port) = addr(test, n);
    let network = NetworkSettings {
        kind: NetworkKind::Manual,
        ip: ip.clone(),
        netmask: "255.255.255.0".into(),
        range: format!(
            "{}.0/24",
            ip.rsplit_once('.').map(|(p, _)| p).unwrap_or("127.0.0")
        ),
        gateway: None,
        dns: Vec::new(),
        default: vec!["dns".into(), "gateway".into()],
        cloud_properties: serde_json::json!({}),
    };
    let networks = BTreeMap::from([("default".to_string(), network)]);
    let agent_id = format!("agent-{test}-{n}");
    CreateVmRequest {
        agent_id: agent_id.clone(),
        stemcell: stemcell.clone(),
        cloud_properties: serde_json::json!({}),
        networks: networks.clone(),
        disk_cids: Vec::new(),
        settings: AgentSettings {
            agent_id,
            director_public_key: "ssh-ed25519 AAAAtest director".into(),
            host_private_key: "not a real key".into(),
            listen_ip: ip,
            listen_port: port,
            networks,
            disks: BTreeMap::new(),
            env: serde_json::json!({}),
        },
        metadata: Metadata::from([
            ("token".to_string(), format!("local-test-{test}-{n}")),
            ("instance".to_string(), format!("test/{n}")),
        ]),
    }
}

/// Live (non-zombie) processes whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next());
        if matches!(state, None | Some("Z") | Some("X")) {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if cmdline
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            out.push(pid);
        }
    }
    out
}

fn ready_file(cpi: &LocalCpi, vm: &VmCid) -> PathBuf {
    cpi.vm_dir(vm).join("vcap/data/testvm-ready.json")
}

/// Waits for the stand-in agent to report ready (from inside its namespace).
fn wait_ready(cpi: &LocalCpi, vm: &VmCid) -> serde_json::Value {
    let path = ready_file(cpi, vm);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(bytes) = std::fs::read(&path) {
            return serde_json::from_slice(&bytes).unwrap();
        }
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(cpi.vm_dir(vm).join("agent.log")).unwrap_or_default();
            panic!("VM {vm} never became ready; agent.log:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cpi_passes_the_conformance_suite() {
    let tmp = tempfile::tempdir().unwrap();
    let cpi = local_cpi(tmp.path());
    let fixture = Fixture {
        stemcell: stemcell_spec(),
        vm_request: Box::new(|n, stemcell| vm_request(1, n, stemcell)),
        disk_size_mb: 64,
    };
    if let Err(failures) = conformance::run(&cpi, &fixture).await {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
    // Everything was cleaned up.
    for sub in ["vms", "disks", "snapshots", "stemcells"] {
        let left: Vec<_> = std::fs::read_dir(cpi.root().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{sub} left behind: {left:?}");
    }
    let root = cpi.root().to_string_lossy().into_owned();
    assert!(processes_with(&root).is_empty(), "agents survived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_isolated_namespaces_that_die_whole() {
    use bosun_cpi::Cpi;
    let tmp = tempfile::tempdir().unwrap();
    let cpi = local_cpi(tmp.path());
    let stemcell = cpi.create_stemcell(&stemcell_spec()).await.unwrap();

    let mut vms = Vec::new();
    for n in 0..3 {
        vms.push(cpi.create_vm(&vm_request(2, n, &stemcell)).await.unwrap());
    }
    for (n, vm) in vms.iter().enumerate() {
        let ready = wait_ready(&cpi, vm);
        // PID 1 of its own PID namespace, reading its own settings at /var/vcap.
        assert_eq!(ready["pid"], 1, "{ready}");
        assert_eq!(ready["agent_id"], format!("agent-2-{n}"));
        // Three VMs on the same port, each on its own loopback address.
        let (ip, port) = addr(2, n);
        TcpStream::connect((ip.as_str(), port)).expect("connect to the VM's listener");
        assert!(cpi.has_vm(vm).await.unwrap());
        // Host-side agent, namespace PID 1 and the job process all carry the VM root.
        let marker = cpi.vm_dir(vm).to_string_lossy().into_owned();
        let procs = processes_with(&marker);
        assert!(procs.len() >= 3, "{vm}: processes {procs:?}");
    }
    // The host's /var/vcap is not any VM's.
    assert!(!Path::new("/var/vcap/data/testvm-ready.json").exists());

    // Reboot with a disk attached: the agent comes back and sees the disk in its settings.
    let disk = cpi
        .create_disk(&CreateDiskRequest {
            size_mb: 16,
            cloud_properties: serde_json::json!({}),
            vm_locality: Some(vms[0].clone()),
            metadata: Metadata::new(),
        })
        .await
        .unwrap();
    let hint = cpi.attach_disk(&vms[0], &disk).await.unwrap();
    assert!(Path::new(&hint.path).is_dir());
    let before = processes_with(&cpi.vm_dir(&vms[0]).to_string_lossy());
    std::fs::remove_file(ready_file(&cpi, &vms[0])).unwrap();
    cpi.reboot_vm(&vms[0]).await.unwrap();
    let ready = wait_ready(&cpi, &vms[0]);
    assert_eq!(ready["disks"][&disk.0]["path"], hint.path, "{ready}");
    let after = processes_with(&cpi.vm_dir(&vms[0]).to_string_lossy());
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "old processes survived the reboot: {before:?} / {after:?}"
    );

    // A VM whose agent died is gone.
    let pid: i32 = std::fs::read_to_string(cpi.vm_dir(&vms[2]).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while cpi.has_vm(&vms[2]).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "has_vm still true after the agent died"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGTERM reaches the namespace's PID 1 (which ignores it here); a second one kills it.
    let pid: i32 = std::fs::read_to_string(cpi.vm_dir(&vms[1]).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        cpi.has_vm(&vms[1]).await.unwrap(),
        "one SIGTERM killed a VM whose PID 1 ignores it"
    );
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while cpi.has_vm(&vms[1]).await.unwrap() {
        assert!(
            Instant::now() < deadline,
            "has_vm still true after a second SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(processes_with(&cpi.vm_dir(&vms[1]).to_string_lossy()).is_empty());

    // Deleting kills every process of the VM, jobs included.
    for vm in &vms {
        cpi.delete_vm(vm).await.unwrap();
        assert!(!cpi.has_vm(vm).await.unwrap());
        let left = processes_with(&vm.0);
        assert!(
            left.is_empty(),
            "{vm}: processes survived delete_vm: {left:?}"
        );
        assert!(!cpi.vm_dir(vm).exists());
    }
    // The disk outlived its VM, detached.
    assert!(cpi.get_disks(&vms[0]).await.is_err());
    assert!(Path::new(&hint.path).is_dir());
    cpi.delete_disk(&disk).await.unwrap();
    cpi.delete_stemcell(&stemcell).await.unwrap();
}

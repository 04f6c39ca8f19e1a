//! The CPI conformance suite and disk moves, against a real Docker engine.
//!
//! Needs a stemcell: `BOSUN_TEST_STEMCELL` = a stemcell tarball (gzip'd tar
//! with `stemcell.MF` and `image`, a gzip'd rootfs with the bosun agent at
//! /var/vcap/bosh/bin/bosun), and a reachable Docker engine. Without either,
//! the tests skip with a message, except under CI (`CI` set), where they fail.
//! The docker CLI is used only to check and to clean up.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::{
    AgentSettings, CpiError, CreateDiskRequest, CreateVmRequest, Metadata, NetworkKind,
    NetworkSettings, StemcellCid, StemcellSpec, AGENT_PORT,
};
use bosun_cpi_docker::{DockerCpi, DockerCpiConfig, LABEL_CPI};

fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Fails under CI, otherwise prints why the test is skipped.
fn skip(reason: &str) {
    if in_ci() {
        panic!("{reason}");
    }
    eprintln!("SKIPPED: {reason}");
}

struct TestStemcell {
    _dir: tempfile::TempDir,
    spec: StemcellSpec,
}

/// Unpacks `BOSUN_TEST_STEMCELL`; `None` (after `skip`) when it is not set.
fn test_stemcell() -> Option<TestStemcell> {
    let Some(path) = std::env::var_os("BOSUN_TEST_STEMCELL").filter(|p| !p.is_empty()) else {
        skip("BOSUN_TEST_STEMCELL is not set: run scripts/test, which builds the stemcell");
        return None;
    };
    let path = PathBuf::from(path);
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::open(&path)
        .unwrap_or_else(|e| panic!("opening BOSUN_TEST_STEMCELL {}: {e}", path.display()));
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(dir.path())
        .unwrap_or_else(|e| panic!("unpacking stemcell {}: {e}", path.display()));
    let mf_path = dir.path().join("stemcell.MF");
    let mf: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(&mf_path)
            .unwrap_or_else(|e| panic!("{}: no stemcell.MF: {e}", path.display())),
    )
    .unwrap_or_else(|e| panic!("{}: invalid stemcell.MF: {e}", path.display()));
    let field = |k: &str| -> String {
        match &mf[k] {
            serde_yaml_ng::Value::String(s) => s.clone(),
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            other => panic!("stemcell.MF: {k} is {other:?}"),
        }
    };
    let image = dir.path().join("image");
    assert!(
        image.is_file(),
        "{}: no image in the stemcell",
        path.display()
    );
    let cloud_properties = serde_json::to_value(&mf["cloud_properties"]).unwrap_or_default();
    let spec = StemcellSpec {
        name: field("name"),
        os: field("operating_system"),
        version: field("version"),
        image_path: Some(image),
        cloud_properties,
    };
    Some(TestStemcell { _dir: dir, spec })
}

/// Connects with a prefix of its own; `None` (after `skip`) when Docker is unreachable.
async fn connect(root: &Path, prefix: &str) -> Option<DockerCpi> {
    match DockerCpi::connect(DockerCpiConfig {
        root: root.join("docker-cpi"),
        socket: None,
        prefix: prefix.to_string(),
    })
    .await
    {
        Ok(cpi) => Some(cpi),
        Err(e) => {
            skip(&format!("{e}"));
            None
        }
    }
}

fn docker(args: &[&str]) -> (bool, String) {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("running the docker CLI");
    let mut text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

fn lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// What is left on the engine of one prefix: containers, volumes, networks, images.
fn leftovers(prefix: &str) -> Vec<String> {
    let label = format!("label={LABEL_CPI}={prefix}");
    let mut left = Vec::new();
    for (what, args) in [
        ("container", vec!["ps", "-aq", "--filter", label.as_str()]),
        (
            "volume",
            vec!["volume", "ls", "-q", "--filter", label.as_str()],
        ),
        (
            "network",
            vec!["network", "ls", "-q", "--filter", label.as_str()],
        ),
        ("image", vec!["images", "-q", "--filter", label.as_str()]),
    ] {
        let (_, out) = docker(&args);
        left.extend(lines(&out).into_iter().map(|id| format!("{what} {id}")));
    }
    let (_, out) = docker(&["network", "ls", "--format", "{{.Name}}"]);
    left.extend(
        lines(&out)
            .into_iter()
            .filter(|n| n.starts_with(&format!("{prefix}-")))
            .map(|n| format!("network {n}")),
    );
    left
}

/// Removes whatever a test left on the engine, even when it panicked.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = format!("label={LABEL_CPI}={}", self.0);
        let (_, c) = docker(&["ps", "-aq", "--filter", &label]);
        for id in lines(&c) {
            docker(&["rm", "-f", &id]);
        }
        let (_, v) = docker(&["volume", "ls", "-q", "--filter", &label]);
        for id in lines(&v) {
            docker(&["volume", "rm", "-f", &id]);
        }
        let (_, n) = docker(&["network", "ls", "-q", "--filter", &label]);
        for id in lines(&n) {
            docker(&["network", "rm", &id]);
        }
        let (_, i) = docker(&["images", "-q", "--filter", &label]);
        for id in lines(&i) {
            docker(&["rmi", "-f", &id]);
        }
    }
}

/// A create_vm request with real keys on `<subnet>.0/24`, VM n at `<subnet>.<10 + n>`.
fn vm_request(subnet: &str, test: &str, n: usize, stemcell: &StemcellCid) -> CreateVmRequest {
    let ip = format!("{subnet}.{}", 10 + n);
    let network = NetworkSettings {
        kind: NetworkKind::Manual,
        ip: ip.clone(),
        netmask: "255.255.255.0".into(),
        range: format!("{subnet}.0/24"),
        gateway: Some(format!("{subnet}.1")),
        dns: Vec::new(),
        default: vec!["dns".into(), "gateway".into()],
        cloud_properties: serde_json::json!({}),
    };
    let networks = BTreeMap::from([("default".to_string(), network)]);
    let director = bosun_agent::keys::generate_keypair().expect("director key");
    let host = bosun_agent::keys::generate_keypair().expect("host key");
    let agent_id = format!("agent-{test}-{n}");
    CreateVmRequest {
        agent_id: agent_id.clone(),
        stemcell: stemcell.clone(),
        cloud_properties: serde_json::json!({}),
        networks: networks.clone(),
        disk_cids: Vec::new(),
        settings: AgentSettings {
            agent_id,
            director_public_key: director.public_openssh,
            host_private_key: host.private_openssh,
            listen_ip: ip,
            listen_port: AGENT_PORT,
            networks,
            disks: BTreeMap::new(),
            env: serde_json::json!({}),
        },
        metadata: Metadata::from([
            ("director".to_string(), "docker-cpi-test".to_string()),
            ("deployment".to_string(), format!("docker-{test}")),
            ("instance".to_string(), format!("{test}/{n}")),
            ("token".to_string(), uuid::Uuid::new_v4().to_string()),
        ]),
    }
}

fn records_left(cpi: &DockerCpi) -> Vec<String> {
    let mut left = Vec::new();
    for sub in ["vms", "disks", "snapshots"] {
        for e in std::fs::read_dir(cpi.root().join(sub)).unwrap() {
            left.push(format!(
                "{sub}/{}",
                e.unwrap().file_name().to_string_lossy()
            ));
        }
    }
    left
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cpi_passes_the_conformance_suite() {
    let Some(stemcell) = test_stemcell() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = format!("bosun-t{}-c", std::process::id());
    let Some(cpi) = connect(tmp.path(), &prefix).await else {
        return;
    };
    let _cleanup = Cleanup(prefix.clone());
    let started = Instant::now();
    let fixture = Fixture {
        stemcell: stemcell.spec.clone(),
        vm_request: Box::new(|n, s| vm_request("10.244.250", "conformance", n, s)),
        disk_size_mb: 64,
    };
    if let Err(failures) = conformance::run(&cpi, &fixture).await {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
    eprintln!("conformance suite passed in {:?}", started.elapsed());
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left on the Docker engine: {left:?}");
    let left = records_left(&cpi);
    assert!(left.is_empty(), "records left: {left:?}");
}

/// Runs a shell command in a VM's container.
fn exec(vm: &str, script: &str) -> (bool, String) {
    docker(&["exec", vm, "sh", "-c", script])
}

fn ip_of(vm: &str) -> String {
    let (ok, out) = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        vm,
    ]);
    assert!(ok, "docker inspect {vm}: {out}");
    out
}

/// Waits until the agent of a VM accepts TCP connections on its IP.
fn wait_for_agent(vm: &str, ip: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = format!("{ip}:{AGENT_PORT}").parse().unwrap();
    while TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err() {
        if Instant::now() > deadline {
            let (_, logs) = docker(&["logs", "--tail", "30", vm]);
            panic!("the agent of {vm} never listened on {addr}; logs:\n{logs}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_moves_between_vms_with_its_data() {
    use bosun_cpi::Cpi;
    let Some(stemcell) = test_stemcell() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let prefix = format!("bosun-t{}-d", std::process::id());
    let Some(cpi) = connect(tmp.path(), &prefix).await else {
        return;
    };
    let _cleanup = Cleanup(prefix.clone());
    let subnet = "10.244.251";

    let stemcell = cpi.create_stemcell(&stemcell.spec).await.unwrap();
    let req_a = vm_request(subnet, "move", 0, &stemcell);
    let a = cpi.create_vm(&req_a).await.unwrap();
    let req_b = vm_request(subnet, "move", 1, &stemcell);
    let b = cpi.create_vm(&req_b).await.unwrap();
    let by_token = |req: &CreateVmRequest| {
        Metadata::from([("token".to_string(), req.metadata["token"].clone())])
    };
    // A container whose record was lost (the CPI's state wiped) is still
    // found, with the metadata its labels carry.
    let record_b = cpi.root().join("vms").join(format!("{}.json", b.0));
    let aside = cpi.root().join(format!("{}.json.aside", b.0));
    std::fs::rename(&record_b, &aside).unwrap();
    assert_eq!(
        cpi.find_vms(&by_token(&req_b)).await.unwrap(),
        vec![(b.clone(), req_b.metadata.clone())]
    );
    std::fs::rename(&aside, &record_b).unwrap();
    let director = Metadata::from([("director".to_string(), "docker-cpi-test".to_string())]);
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    let found: Vec<_> = cpi
        .find_vms(&director)
        .await
        .unwrap()
        .into_iter()
        .map(|(vm, _)| vm)
        .collect();
    assert_eq!(found, both);
    let (ip_a, ip_b) = (format!("{subnet}.10"), format!("{subnet}.11"));
    assert_eq!(ip_of(&a.0), ip_a);
    assert_eq!(ip_of(&b.0), ip_b);
    // The real agent runs as PID 1 and serves on its VM's IP.
    wait_for_agent(&a.0, &ip_a);
    let (ok, mode) = exec(&a.0, "stat -c %a /var/vcap/bosh/settings.json");
    assert!(ok && mode == "600", "settings mode: {mode}");
    let (ok, pid1) = exec(&a.0, "cat /proc/1/cmdline | tr '\\0' ' '");
    assert!(ok && pid1.contains("bosun agent --settings"), "{pid1}");

    let disk = cpi
        .create_disk(&CreateDiskRequest {
            size_mb: 64,
            cloud_properties: serde_json::json!({}),
            vm_locality: Some(a.clone()),
            metadata: Metadata::from([("token".to_string(), "disk-move".to_string())]),
        })
        .await
        .unwrap();
    assert!(cpi.has_disk(&disk).await.unwrap());

    let hint = cpi.attach_disk(&a, &disk).await.unwrap();
    assert_eq!(hint.path, "/var/vcap/store");
    // Attaching again is a no-op.
    assert_eq!(cpi.attach_disk(&a, &disk).await.unwrap(), hint);
    assert!(cpi.has_vm(&a).await.unwrap());
    assert_eq!(ip_of(&a.0), ip_a, "A lost its IP when recreated");
    let (ok, out) = exec(&a.0, "echo persisted > /var/vcap/store/data.txt && sync");
    assert!(ok, "writing to the disk in {a}: {out}");
    let (ok, settings) = exec(&a.0, "cat /var/vcap/bosh/settings.json");
    assert!(ok, "{settings}");
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(settings["disks"][&disk.0]["path"], "/var/vcap/store");
    assert_eq!(cpi.get_disks(&a).await.unwrap(), vec![disk.clone()]);

    // Attached elsewhere: refused, naming both VMs; deleting it too.
    match cpi.attach_disk(&b, &disk).await {
        Err(CpiError::Fatal { message }) => {
            assert!(
                message.contains(&a.0) && message.contains(&b.0),
                "{message}"
            )
        }
        other => panic!("attaching a disk attached to {a} to {b}: {other:?}"),
    }
    assert!(cpi.delete_disk(&disk).await.is_err());

    cpi.detach_disk(&a, &disk).await.unwrap();
    cpi.detach_disk(&a, &disk).await.unwrap();
    assert!(cpi.get_disks(&a).await.unwrap().is_empty());
    assert!(cpi.has_vm(&a).await.unwrap());
    assert_eq!(ip_of(&a.0), ip_a);
    let (ok, _) = exec(&a.0, "test -e /var/vcap/store/data.txt");
    assert!(!ok, "the data is still visible in {a} after detaching");
    let (_, settings) = exec(&a.0, "cat /var/vcap/bosh/settings.json");
    let settings: serde_json::Value = serde_json::from_str(&settings).unwrap();
    assert_eq!(settings["disks"], serde_json::json!({}));

    cpi.attach_disk(&b, &disk).await.unwrap();
    assert_eq!(ip_of(&b.0), ip_b, "B lost its IP when recreated");
    let (ok, out) = exec(&b.0, "cat /var/vcap/store/data.txt");
    assert!(
        ok && out == "persisted",
        "the data did not move to {b}: {out}"
    );
    wait_for_agent(&b.0, &ip_b);

    // The stemcell image is labelled; a snapshot copies the data.
    let (ok, label) = docker(&[
        "image",
        "inspect",
        "-f",
        &format!("{{{{index .Config.Labels \"{LABEL_CPI}\"}}}}"),
        &stemcell.0,
    ]);
    assert!(ok && label == prefix, "stemcell image label: {label}");
    let disk_token = Metadata::from([("token".to_string(), "disk-move".to_string())]);
    let snap = cpi.snapshot_disk(&disk, &disk_token).await.unwrap();
    // The snapshot's volume, tagged like the disk, is not a disk.
    assert_eq!(
        cpi.find_disks(&disk_token).await.unwrap(),
        vec![(disk.clone(), disk_token.clone())]
    );
    let (ok, out) = docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--label",
        &format!("{LABEL_CPI}={prefix}"),
        "-v",
        &format!("{}:/snap:ro", snap.0),
        &stemcell.0,
        "cat",
        "/snap/data.txt",
    ]);
    assert!(ok && out == "persisted", "snapshot {snap}: {out}");
    cpi.delete_snapshot(&snap).await.unwrap();
    cpi.delete_snapshot(&snap).await.unwrap();

    // A container whose PID 1 is gone is no VM.
    let (ok, out) = docker(&["rm", "-f", &a.0]);
    assert!(ok, "{out}");
    assert!(!cpi.has_vm(&a).await.unwrap());
    // Nor is it found: only its record is left.
    assert!(cpi.find_vms(&by_token(&req_a)).await.unwrap().is_empty());
    assert!(matches!(
        cpi.reboot_vm(&a).await,
        Err(CpiError::VmNotFound(_))
    ));
    cpi.delete_vm(&a).await.unwrap();
    cpi.delete_vm(&a).await.unwrap();
    assert!(matches!(
        cpi.get_disks(&a).await,
        Err(CpiError::VmNotFound(_))
    ));

    // Deleting a VM detaches its disk (kept, with its data).
    cpi.delete_vm(&b).await.unwrap();
    assert!(!cpi.has_vm(&b).await.unwrap());
    assert!(cpi.has_disk(&disk).await.unwrap());
    cpi.delete_disk(&disk).await.unwrap();
    assert!(!cpi.has_disk(&disk).await.unwrap());
    cpi.delete_stemcell(&stemcell).await.unwrap();
    cpi.delete_stemcell(&stemcell).await.unwrap();

    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left on the Docker engine: {left:?}");
    let left = records_left(&cpi);
    assert!(left.is_empty(), "records left: {left:?}");
}

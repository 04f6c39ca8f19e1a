//! `ExternalCpi` against a fake CPI of its own: this test binary is also
//! the fake (run as `fake_cpi --fake-cpi MODE DIR`). Modes: `v1` (a whole
//! v1 CPI keeping its state in DIR, which the conformance suite drives),
//! `error TYPE RETRY` (every call but `info` fails so), `garbage`,
//! `nothing`, `hang` and `daemon` (answers, but leaves a child holding its
//! stdout).
//!
//! The harness is this file's own `main` (the binary must be able to act
//! as the CPI), so every check is a plain function listed in `TESTS`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::{
    AgentSettings, Cpi, CpiError, CreateDiskRequest, CreateVmRequest, DiskCid, Metadata,
    NetworkKind, NetworkSettings, StemcellSpec, VmCid,
};
use bosun_cpi_external::{ExternalCpi, ExternalCpiConfig};
use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--fake-cpi") {
        fake::run(&args[2..]);
        return;
    }
    let filter = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    let rt = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let mut failed = Vec::new();
    for (name, test) in TESTS {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(|| rt.block_on(test()));
        let secs = started.elapsed().as_secs_f64();
        match outcome {
            Ok(()) => println!("test {name} ... ok ({secs:.2} s)"),
            Err(_) => {
                println!("test {name} ... FAILED ({secs:.2} s)");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        println!("failed: {failed:?}");
        std::process::exit(1);
    }
}

type Test = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

const TESTS: &[(&str, Test)] = &[
    ("a_v1_cpi_passes_the_conformance_suite", || {
        Box::pin(a_v1_cpi_passes_the_conformance_suite())
    }),
    (
        "the_context_carries_ids_and_properties_and_records_hold_no_keys",
        || Box::pin(the_context_carries_ids_and_properties()),
    ),
    ("every_error_type_maps_onto_a_typed_error", || {
        Box::pin(every_error_type_maps_onto_a_typed_error())
    }),
    (
        "garbage_nothing_and_a_missing_binary_are_clear_errors",
        || Box::pin(garbage_nothing_and_a_missing_binary_are_clear_errors()),
    ),
    ("a_hanging_cpi_is_killed_at_its_time_limit", || {
        Box::pin(a_hanging_cpi_is_killed_at_its_time_limit())
    }),
    ("a_cpi_whose_child_keeps_its_stdout_still_answers", || {
        Box::pin(a_cpi_whose_child_keeps_its_stdout_still_answers())
    }),
];

fn fake_cpi(mode: &[&str], dir: &Path) -> ExternalCpi {
    let exe = std::env::current_exe().expect("the test binary");
    let mut config = ExternalCpiConfig::new("fake", exe, dir.join("records"));
    config.args = ["--fake-cpi"]
        .iter()
        .chain(mode)
        .map(|s| s.to_string())
        .chain([dir.display().to_string()])
        .collect();
    config.director_uuid = "director-1".into();
    config.properties = json!({"region": "nowhere"});
    config.timeout = Duration::from_secs(20);
    ExternalCpi::new(config)
}

fn vm_request(n: usize, stemcell: &bosun_cpi::StemcellCid) -> CreateVmRequest {
    let ip = format!("10.9.0.{}", n + 10);
    let mut networks = BTreeMap::new();
    networks.insert(
        "default".to_string(),
        NetworkSettings {
            kind: NetworkKind::Manual,
            ip: ip.clone(),
            netmask: "255.255.255.0".into(),
            range: "10.9.0.0/24".into(),
            gateway: Some("10.9.0.1".into()),
            dns: vec![],
            default: vec!["dns".into(), "gateway".into()],
            cloud_properties: json!({}),
        },
    );
    CreateVmRequest {
        agent_id: format!("agent-{n}"),
        stemcell: stemcell.clone(),
        cloud_properties: json!({}),
        networks: networks.clone(),
        disk_cids: vec![],
        settings: AgentSettings {
            agent_id: format!("agent-{n}"),
            director_public_key: "ssh-ed25519 AAAA-director".into(),
            host_private_key: "PRIVATE-HOST-KEY-SECRET".into(),
            listen_ip: ip,
            listen_port: 6868,
            networks,
            disks: BTreeMap::new(),
            env: json!({}),
        },
        metadata: Metadata::new(),
    }
}

fn fixture() -> Fixture {
    Fixture {
        stemcell: StemcellSpec {
            name: "fake-stemcell".into(),
            os: "fake-os".into(),
            version: "1".into(),
            image_path: None,
            cloud_properties: json!({}),
        },
        vm_request: Box::new(vm_request),
        disk_size_mb: 10,
    }
}

async fn a_v1_cpi_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let cpi = fake_cpi(&["v1"], dir.path());
    if let Err(failures) = conformance::run(&cpi, &fixture()).await {
        panic!("conformance failures:\n{}", failures.join("\n"));
    }
    let info = cpi.info().await.unwrap();
    assert_eq!(info.api_version, 1, "a v1 CPI is spoken to in v1");
    assert_eq!(info.stemcell_formats, vec!["fake-raw".to_string()]);
    // v1 requests carry no api_version; every request had a context.
    let requests = fake::requests(dir.path());
    assert!(requests.len() > 20, "{} requests", requests.len());
    let create = requests
        .iter()
        .find(|r| r["method"] == "create_vm")
        .unwrap();
    assert!(create.get("api_version").is_none(), "{create}");
}

async fn the_context_carries_ids_and_properties() {
    let dir = tempfile::tempdir().unwrap();
    let cpi = fake_cpi(&["v1"], dir.path());
    let stemcell = cpi.create_stemcell(&fixture().stemcell).await.unwrap();
    let mut req = vm_request(1, &stemcell);
    req.metadata.insert("deployment".into(), "d".into());
    let vm = cpi.create_vm(&req).await.unwrap();
    let requests = fake::requests(dir.path());
    let create = requests
        .iter()
        .find(|r| r["method"] == "create_vm")
        .unwrap();
    let ctx = &create["context"];
    assert_eq!(ctx["director_uuid"], "director-1");
    assert_eq!(ctx["region"], "nowhere");
    assert_eq!(ctx["vm"]["stemcell"]["api_version"], 2);
    assert!(ctx["request_id"].as_str().unwrap().starts_with("cpi-"));
    // BOSH's argument order; bosun's part of env carries the keys.
    let args = create["arguments"].as_array().unwrap();
    assert_eq!(args[0], "agent-1");
    assert_eq!(args[3]["default"]["ip"], "10.9.0.11");
    assert_eq!(
        args[5]["bosun"]["host_private_key"],
        "PRIVATE-HOST-KEY-SECRET"
    );
    // The metadata went to the CPI after create_vm, as BOSH sends it.
    let set = requests
        .iter()
        .find(|r| r["method"] == "set_vm_metadata")
        .unwrap();
    assert_eq!(set["arguments"][0], vm.0);
    assert_eq!(set["arguments"][1]["deployment"], "d");
    let found = cpi
        .find_vms(&[("deployment".to_string(), "d".to_string())].into())
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    // Records are private and hold no keys.
    for entry in walk(&dir.path().join("records")) {
        let text = std::fs::read_to_string(&entry).unwrap();
        assert!(!text.contains("PRIVATE-HOST-KEY"), "{}", entry.display());
    }
    cpi.delete_vm(&vm).await.unwrap();
    assert!(cpi.find_vms(&Metadata::new()).await.unwrap().is_empty());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

async fn every_error_type_maps_onto_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let vm = VmCid("vm-1".into());
    let disk = DiskCid("disk-1".into());
    let e = |kind: &'static str, retry: &'static str| fake_cpi(&["error", kind, retry], dir.path());

    let cpi = e("Bosh::Clouds::VMNotFound", "false");
    assert!(
        !cpi.has_vm(&vm).await.unwrap(),
        "has_vm of a missing VM is false"
    );
    cpi.delete_vm(&vm)
        .await
        .expect("deleting a missing VM succeeds");
    assert!(matches!(cpi.reboot_vm(&vm).await, Err(CpiError::VmNotFound(c)) if c == vm));

    let cpi = e("DiskNotFound", "false");
    assert!(!cpi.has_disk(&disk).await.unwrap());
    cpi.delete_disk(&disk).await.unwrap();
    let r = cpi.attach_disk(&vm, &disk).await;
    assert!(
        matches!(&r, Err(CpiError::DiskNotFound(c)) if *c == disk),
        "{r:?}"
    );

    for kind in ["Bosh::Clouds::NotImplemented", "Bosh::Clouds::NotSupported"] {
        let r = e(kind, "false").resize_disk(&disk, 20).await;
        assert!(
            matches!(&r, Err(CpiError::NotSupported { cpi, method }) if cpi == "fake" && method == "resize_disk"),
            "{kind}: {r:?}"
        );
    }

    let r = e("Bosh::Clouds::VMCreationFailed", "true")
        .create_vm(&vm_request(0, &"s".into()))
        .await;
    let err = r.unwrap_err();
    assert!(err.is_retryable(), "ok_to_retry is retryable: {err}");
    let text = err.to_string();
    assert!(
        text.starts_with("CPI 'fake' create_vm (request cpi-")
            && text.contains("Bosh::Clouds::VMCreationFailed: no VM for you"),
        "{text}"
    );
    assert!(!text.contains("PRIVATE-HOST-KEY"), "{text}");

    for kind in [
        "Bosh::Clouds::CloudError",
        "Bosh::Clouds::CpiError",
        "Weird",
    ] {
        let err = e(kind, "false")
            .create_disk(&CreateDiskRequest {
                size_mb: 1,
                cloud_properties: json!({}),
                vm_locality: None,
                metadata: Metadata::new(),
            })
            .await
            .unwrap_err();
        assert!(!err.is_retryable(), "{kind}");
        let text = err.to_string();
        assert!(
            text.contains("CPI 'fake' create_disk (request cpi-") && text.contains(kind),
            "{text}"
        );
    }
    // A not-found error for a call about something else is just an error.
    let err = e("VMNotFound", "false")
        .delete_stemcell(&"s".into())
        .await
        .unwrap_err();
    assert!(matches!(err, CpiError::Fatal { .. }), "{err:?}");
}

async fn garbage_nothing_and_a_missing_binary_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let vm = VmCid("vm-1".into());
    let err = fake_cpi(&["garbage"], dir.path())
        .has_vm(&vm)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("CPI 'fake' info (request cpi-")
            && text.contains("not a CPI response")
            && text.contains("this is not JSON"),
        "{text}"
    );
    let err = fake_cpi(&["nothing"], dir.path())
        .has_vm(&vm)
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("answered nothing on stdout (exit status: 3)")
            && text.contains("its stderr ends: ")
            && text.ends_with("fake: giving up"),
        "{text}"
    );
    let mut config = ExternalCpiConfig::new("gone", dir.path().join("no-such-cpi"), dir.path());
    config.timeout = Duration::from_secs(5);
    let err = ExternalCpi::new(config).has_vm(&vm).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("CPI 'gone' info (request cpi-") && text.contains("cannot run"),
        "{text}"
    );
}

async fn a_hanging_cpi_is_killed_at_its_time_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cpi = fake_cpi(&["hang"], dir.path());
    let mut config = cpi.config().clone();
    config.timeout = Duration::from_secs(1);
    cpi = ExternalCpi::new(config);
    let started = Instant::now();
    let err = cpi.has_vm(&VmCid("vm-1".into())).await.unwrap_err();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let text = err.to_string();
    assert!(
        text.starts_with("CPI 'fake' info (request cpi-") && text.contains("no answer within 1 s"),
        "{text}"
    );
    // The CPI and the child it started are gone.
    for name in ["pid", "child-pid"] {
        let pid: i32 = std::fs::read_to_string(dir.path().join(name))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(pid), "{name} {pid} still runs");
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for this purpose.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

async fn a_cpi_whose_child_keeps_its_stdout_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cpi = fake_cpi(&["daemon"], dir.path());
    let started = Instant::now();
    let info = cpi.info().await.unwrap();
    assert_eq!(info.api_version, 2);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
}

/// The fake CPI itself.
mod fake {
    use super::*;

    pub fn requests(dir: &Path) -> Vec<Value> {
        std::fs::read_to_string(dir.join("requests.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn answer(result: Value) {
        let r = json!({"result": result, "error": null, "log": "fake: answered"});
        println!("{r}");
    }

    fn fail(kind: &str, message: &str, retry: bool) {
        let r = json!({"result": null, "error": {"type": kind, "message": message, "ok_to_retry": retry}, "log": ""});
        println!("{r}");
    }

    // The hang and daemon modes leave children behind on purpose: the
    // client must cope with them.
    #[allow(clippy::zombie_processes)]
    pub fn run(args: &[String]) {
        let dir = PathBuf::from(args.last().expect("a state dir"));
        let mut input = String::new();
        std::io::stdin().read_to_string(&mut input).unwrap();
        let req: Value = serde_json::from_str(&input).unwrap();
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("requests.jsonl"))
            .unwrap();
        writeln!(log, "{req}").unwrap();
        eprintln!("fake: {} called", req["method"]);
        let method = req["method"].as_str().unwrap_or("").to_string();
        match args[0].as_str() {
            "v1" => v1(
                &dir,
                &method,
                req["arguments"].as_array().cloned().unwrap_or_default(),
            ),
            "error" if method == "info" => {
                answer(json!({"api_version": 2, "stemcell_formats": ["fake-raw"]}))
            }
            "error" => fail(&args[1], "no VM for you", args[2] == "true"),
            "garbage" => println!("this is not JSON at all"),
            "nothing" => {
                eprintln!("fake: giving up");
                std::process::exit(3);
            }
            "hang" => {
                std::fs::write(dir.join("pid"), std::process::id().to_string()).unwrap();
                let child = std::process::Command::new("sleep")
                    .arg("600")
                    .spawn()
                    .unwrap();
                std::fs::write(dir.join("child-pid"), child.id().to_string()).unwrap();
                std::thread::sleep(Duration::from_secs(600));
            }
            "daemon" => {
                // The child inherits stdout and outlives this process.
                std::process::Command::new("sleep")
                    .arg("30")
                    .spawn()
                    .unwrap();
                answer(json!({"api_version": 2, "stemcell_formats": ["fake-raw"]}));
            }
            other => panic!("unknown fake mode {other}"),
        }
    }

    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct State {
        next: u64,
        stemcells: Vec<String>,
        /// VM cid → attached disks.
        vms: BTreeMap<String, Vec<String>>,
        /// disk cid → size.
        disks: BTreeMap<String, u64>,
        snapshots: Vec<String>,
    }

    /// A whole v1 CPI: string cids, null attach hints, no api_version.
    fn v1(dir: &Path, method: &str, args: Vec<Value>) {
        let path = dir.join("state.json");
        let mut s: State = std::fs::read(&path)
            .ok()
            .map(|b| serde_json::from_slice(&b).unwrap())
            .unwrap_or_default();
        let arg = |i: usize| {
            args.get(i)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        fn fresh(s: &mut State, prefix: &str) -> String {
            s.next += 1;
            format!("{prefix}-{}", s.next)
        }
        let vm_missing = |s: &State, cid: &str| !s.vms.contains_key(cid);
        let result: Result<Value, (&str, String)> = match method {
            "info" => Ok(json!({"stemcell_formats": ["fake-raw"]})),
            "create_stemcell" => {
                let cid = fresh(&mut s, "stemcell");
                s.stemcells.push(cid.clone());
                Ok(json!(cid))
            }
            "delete_stemcell" => {
                s.stemcells.retain(|c| *c != arg(0));
                Ok(Value::Null)
            }
            "create_vm" => {
                if args.len() != 6 || args[5]["bosun"]["host_private_key"].as_str().is_none() {
                    Err(("Bosh::Clouds::CpiError", "bad create_vm arguments".into()))
                } else {
                    let cid = fresh(&mut s, "vm");
                    s.vms.insert(cid.clone(), vec![]);
                    Ok(json!(cid))
                }
            }
            "delete_vm" => {
                s.vms.remove(&arg(0));
                Ok(Value::Null)
            }
            "has_vm" => Ok(json!(s.vms.contains_key(&arg(0)))),
            "reboot_vm" | "set_vm_metadata" | "get_disks" if vm_missing(&s, &arg(0)) => Err((
                "Bosh::Clouds::VMNotFound",
                format!("VM {} not found", arg(0)),
            )),
            "reboot_vm" | "set_vm_metadata" => Ok(Value::Null),
            "get_disks" => Ok(json!(s.vms[&arg(0)])),
            "create_disk" => {
                let cid = fresh(&mut s, "disk");
                s.disks.insert(cid.clone(), args[0].as_u64().unwrap_or(0));
                Ok(json!(cid))
            }
            "delete_disk" => {
                let d = arg(0);
                if s.vms.values().any(|a| a.contains(&d)) {
                    Err(("Bosh::Clouds::CloudError", format!("disk {d} is attached")))
                } else {
                    s.disks.remove(&d);
                    Ok(Value::Null)
                }
            }
            "has_disk" => Ok(json!(s.disks.contains_key(&arg(0)))),
            "attach_disk" | "detach_disk" if vm_missing(&s, &arg(0)) => Err((
                "Bosh::Clouds::VMNotFound",
                format!("VM {} not found", arg(0)),
            )),
            "attach_disk" | "detach_disk" | "resize_disk" | "set_disk_metadata"
            | "snapshot_disk"
                if !s.disks.contains_key(&arg(
                    if method.ends_with("attach_disk") || method == "detach_disk" {
                        1
                    } else {
                        0
                    },
                )) =>
            {
                Err(("Bosh::Clouds::DiskNotFound", "disk not found".into()))
            }
            "attach_disk" => {
                let (vm, d) = (arg(0), arg(1));
                if s.vms.values().any(|a| a.contains(&d)) && !s.vms[&vm].contains(&d) {
                    Err((
                        "Bosh::Clouds::CloudError",
                        format!("disk {d} is attached elsewhere"),
                    ))
                } else {
                    let list = s.vms.get_mut(&vm).unwrap();
                    if !list.contains(&d) {
                        list.push(d);
                    }
                    Ok(Value::Null)
                }
            }
            "detach_disk" => {
                s.vms.get_mut(&arg(0)).unwrap().retain(|d| *d != arg(1));
                Ok(Value::Null)
            }
            "resize_disk" => {
                s.disks.insert(arg(0), args[1].as_u64().unwrap_or(0));
                Ok(Value::Null)
            }
            "set_disk_metadata" => Ok(Value::Null),
            "snapshot_disk" => {
                let cid = fresh(&mut s, "snap");
                s.snapshots.push(cid.clone());
                Ok(json!(cid))
            }
            "delete_snapshot" => {
                s.snapshots.retain(|c| *c != arg(0));
                Ok(Value::Null)
            }
            other => Err((
                "Bosh::Clouds::NotImplemented",
                format!("{other} is not implemented"),
            )),
        };
        std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
        match result {
            Ok(v) => answer(v),
            Err((kind, message)) => fail(kind, &message, false),
        }
    }
}

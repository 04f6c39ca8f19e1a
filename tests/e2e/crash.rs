//! Crash at every step: each operation (scale up, scale down, recreate, a
//! disk migration, a repair) is first run once with
//! `BOSUN_FAILPOINT_TRACE` to learn the points it passes (before and after
//! every CPI call and every agent action), then, for each point, run again
//! from the same start with `BOSUN_FAILPOINT` making the director abort
//! there. After each crash, `cloud-check --auto` and a redeploy must leave
//! the expected instances running, no VM, disk, staging directory or agent
//! process leaked, and the data written before intact.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::support::*;

const DEPLOYMENT: &str = "quickstart";

struct Crash {
    env: Env,
    port: u32,
}

impl Crash {
    fn new(octet: u8) -> Crash {
        Crash {
            env: Env::new(octet),
            port: 8080,
        }
    }

    /// A kv manifest with `n` instances and a disk of `disk_mb`.
    fn manifest(&self, n: usize, disk_mb: u64) -> PathBuf {
        let body = kv_manifest(DEPLOYMENT, self.port, "300-30000")
            .replace("instances: 3", &format!("instances: {n}"))
            .replace(
                "persistent_disk_type: default",
                &format!("persistent_disk: {disk_mb}"),
            );
        self.env.manifest(&format!("m-{n}-{disk_mb}.yml"), &body)
    }

    fn ok(&self, args: &[&str]) {
        let out = self.env.bosun(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }

    fn deploy(&self, m: &Path) {
        self.ok(&["deploy", m.to_str().unwrap(), "-n"]);
    }

    fn instances(&self) -> Vec<Value> {
        self.env.instances(DEPLOYMENT)
    }

    fn addr(i: &Value, port: u32) -> String {
        format!("{}:{port}", i["ips"][0].as_str().unwrap())
    }

    fn put(&self, key: &str, value: &str) {
        let i = &self.instances()[0];
        let (status, body) = http(
            "PUT",
            &Self::addr(i, self.port),
            &format!("/kv/{key}"),
            value,
        )
        .unwrap_or_else(|e| panic!("PUT {key}: {e}"));
        assert!(status == 201 || status == 204, "PUT {key}: {status} {body}");
    }

    /// Every instance serves `key` with `value`, from its disk.
    fn all_have(&self, key: &str, value: &str) -> bool {
        self.instances().iter().all(|i| {
            http("GET", &Self::addr(i, self.port), &format!("/kv/{key}"), "")
                .is_ok_and(|(s, b)| s == 200 && b.trim() == value)
        })
    }

    fn dir_names(&self, sub: &str) -> Vec<String> {
        std::fs::read_dir(self.env.state().join("local-cpi").join(sub))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn orphaned_disks(&self) -> BTreeSet<String> {
        let out = self.env.bosun(&["disks", "--orphaned", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let list: Value = serde_json::from_slice(&out.stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|d| d["cid"].as_str().unwrap().to_string())
            .collect()
    }

    /// The VMs that have agent processes running.
    fn vms_with_agents(&self) -> BTreeSet<String> {
        let vms = format!("{}/", self.env.state().join("local-cpi/vms").display());
        self.env
            .processes()
            .iter()
            .filter(|c| c.contains(" agent "))
            .filter_map(|c| {
                let rest = &c[c.find(&vms)? + vms.len()..];
                Some(rest.split('/').next()?.to_string())
            })
            .collect()
    }

    /// `n` instances running, each VM and disk accounted for, no staging or
    /// trash directory, one agent per VM.
    fn assert_converged(&self, n: usize, what: &str) {
        let list = self.instances();
        assert_eq!(list.len(), n, "{what}: {list:?}");
        assert!(
            list.iter().all(|i| i["process_state"] == "running"),
            "{what}: {list:?}"
        );
        let vms: BTreeSet<String> = list
            .iter()
            .map(|i| i["vm_cid"].as_str().unwrap().to_string())
            .collect();
        let on_disk: BTreeSet<String> = self.dir_names("vms").into_iter().collect();
        assert_eq!(on_disk, vms, "{what}: VMs on disk vs. recorded");
        let mut disks: BTreeSet<String> = list
            .iter()
            .flat_map(|i| i["persistent_disk_cids"].as_array().unwrap().clone())
            .map(|c| c.as_str().unwrap().to_string())
            .collect();
        assert_eq!(disks.len(), n, "{what}: one disk per instance");
        disks.extend(self.orphaned_disks());
        let disk_dirs: BTreeSet<String> = self
            .dir_names("disks")
            .into_iter()
            .filter(|d| !d.ends_with(".json"))
            .collect();
        assert_eq!(disk_dirs, disks, "{what}: disks on disk vs. recorded");
        assert!(
            wait_until(Duration::from_secs(5), || self.vms_with_agents() == vms),
            "{what}: agents run for {:?}, VMs are {vms:?}",
            self.vms_with_agents()
        );
    }
}

/// One operation to crash in.
struct Op<'a> {
    name: &'a str,
    /// Bring the deployment to where the operation starts.
    setup: &'a dyn Fn(&Crash),
    /// The operation itself (bosun's arguments).
    run: Vec<String>,
    /// After a crash and cloud-check: what converges it.
    converge: &'a dyn Fn(&Crash),
    /// Instances running afterwards.
    instances: usize,
}

/// The points `op` passes, in first-hit order.
fn trace(c: &Crash, op: &Op) -> Vec<String> {
    (op.setup)(c);
    let file = c.env.path(&format!("trace-{}.txt", op.name));
    let _ = std::fs::remove_file(&file);
    let out = c
        .env
        .command(&op.run.iter().map(String::as_str).collect::<Vec<_>>())
        .env("BOSUN_AGENT_TIMEOUT", "30")
        .env("BOSUN_FAILPOINT_TRACE", &file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}: {}", op.name, text(&out));
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    let mut seen = BTreeSet::new();
    text.lines()
        .filter(|l| seen.insert(l.to_string()))
        .map(str::to_string)
        .collect()
}

/// Crash `op` at each of its points; returns how many crashed there.
fn crash_everywhere(c: &Crash, op: &Op) -> usize {
    let points = trace(c, op);
    assert!(!points.is_empty(), "{}: no failpoint passed", op.name);
    (op.converge)(c);
    c.assert_converged(op.instances, &format!("{} (traced)", op.name));
    let mut crashed = 0;
    for point in &points {
        (op.setup)(c);
        let what = format!("{} crashed at {point}", op.name);
        let out = c
            .env
            .command(&op.run.iter().map(String::as_str).collect::<Vec<_>>())
            .env("BOSUN_AGENT_TIMEOUT", "30")
            .env("BOSUN_FAILPOINT", point)
            .output()
            .unwrap();
        if text(&out).contains(&format!("failpoint {point}: aborting")) {
            assert!(!out.status.success(), "{what}: {}", text(&out));
            crashed += 1;
        } else {
            // Not reached this time (a retry or a race took another path):
            // the run must then have worked.
            assert!(out.status.success(), "{what} (not reached): {}", text(&out));
        }
        c.ok(&["-d", DEPLOYMENT, "cloud-check", "--auto"]);
        (op.converge)(c);
        c.assert_converged(op.instances, &what);
        assert!(c.all_have("before", "precious"), "{what}: data lost");
    }
    eprintln!(
        "{}: {} points passed, {crashed} crashed and recovered",
        op.name,
        points.len()
    );
    crashed
}

fn base(c: &Crash, n: usize) -> PathBuf {
    let m = c.manifest(n, 1024);
    c.deploy(&m);
    c.put("before", "precious");
    assert!(wait_until(Duration::from_secs(10), || c.all_have("before", "precious")));
    m
}

#[test]
fn crash_at_every_step_of_a_scale_and_a_recreate() {
    let c = Crash::new(155);
    let two = base(&c, 2);
    let three = c.manifest(3, 1024);
    let (t2, t3) = (two.clone(), three.clone());
    let deploy2 = move |c: &Crash| c.deploy(&t2);
    let deploy3 = move |c: &Crash| c.deploy(&t3);
    let mut total = 0;
    total += crash_everywhere(
        &c,
        &Op {
            name: "scale up",
            setup: &deploy2,
            run: vec!["deploy".into(), three.display().to_string(), "-n".into()],
            converge: &deploy3,
            instances: 3,
        },
    );
    total += crash_everywhere(
        &c,
        &Op {
            name: "scale down",
            setup: &deploy3,
            run: vec!["deploy".into(), two.display().to_string(), "-n".into()],
            converge: &deploy2,
            instances: 2,
        },
    );
    total += crash_everywhere(
        &c,
        &Op {
            name: "recreate",
            setup: &deploy2,
            run: ["-d", DEPLOYMENT, "recreate", "-n"]
                .map(String::from)
                .to_vec(),
            converge: &deploy2,
            instances: 2,
        },
    );
    eprintln!("crash points covered (scale up, scale down, recreate): {total}");
}

#[test]
fn crash_at_every_step_of_a_disk_migration_and_a_repair() {
    let c = Crash::new(156);
    let small = base(&c, 2);
    let big = c.manifest(2, 2048);
    let (ts, tb) = (small.clone(), big.clone());
    let deploy_small = move |c: &Crash| c.deploy(&ts);
    let deploy_big = move |c: &Crash| c.deploy(&tb);
    let mut total = crash_everywhere(
        &c,
        &Op {
            name: "disk migration",
            setup: &deploy_small,
            run: vec!["deploy".into(), big.display().to_string(), "-n".into()],
            converge: &deploy_big,
            instances: 2,
        },
    );
    // A repair: instance 1's VM is lost (agent and processes killed) and
    // cloud-check recreates it with its IP and disk.
    let ts = small.clone();
    let lose_one = move |c: &Crash| {
        c.deploy(&ts);
        let lost = c
            .instances()
            .into_iter()
            .find(|i| i["index"] == 1)
            .expect("instance 1");
        let pid = c.env.vm_pid(lost["vm_cid"].as_str().unwrap());
        let mut all = vec![pid];
        all.extend(descendants(pid).into_iter().map(|(p, _)| p));
        // Processes may exit while this runs; the VM's own must be killed.
        for p in &all {
            let ok = Command::new("kill")
                .args(["-KILL", &p.to_string()])
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
            assert!(ok || *p != pid, "killed VM {lost}");
        }
        assert!(
            wait_until(Duration::from_secs(10), || {
                let out = c
                    .env
                    .bosun(&["-d", DEPLOYMENT, "cloud-check", "--report", "--json"]);
                serde_json::from_slice::<Value>(&out.stdout)
                    .is_ok_and(|s| s["problems"][0]["kind"] == "missing_vm")
            }),
            "the lost VM is seen"
        );
    };
    let ts = small.clone();
    let converge = move |c: &Crash| c.deploy(&ts);
    total += crash_everywhere(
        &c,
        &Op {
            name: "repair",
            setup: &lose_one,
            run: ["-d", DEPLOYMENT, "cloud-check", "--auto"]
                .map(String::from)
                .to_vec(),
            converge: &converge,
            instances: 2,
        },
    );
    eprintln!("crash points covered (disk migration, repair): {total}");
}

//! The quickstart on the Docker CPI: containers from a built stemcell.
//! Needs Docker and `BOSUN_TEST_STEMCELL` (scripts/test builds it once per
//! run). Without them the test fails when `CI` is set, and says it skipped
//! otherwise.

use std::process::Command;

use crate::support::{event_pos, http, repo, text, wait_until, Env};

pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "docker {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// The stemcell to use, or None (skip) outside CI.
pub fn stemcell() -> Option<String> {
    match std::env::var("BOSUN_TEST_STEMCELL") {
        Ok(p) if std::path::Path::new(&p).is_file() => Some(p),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BOSUN_TEST_STEMCELL is not set to a stemcell tarball: run scripts/test, which builds it (Docker tests must run in CI)")
        }
        _ => {
            eprintln!("skipped: BOSUN_TEST_STEMCELL is not set (scripts/test builds the stemcell)");
            None
        }
    }
}

#[test]
fn quickstart_on_docker() {
    let Some(stemcell) = stemcell() else { return };
    let env = Env::new(109);
    let net = "e2e-docker";
    let cc = env.path("cc-docker.yml");
    std::fs::write(
        &cc,
        format!(
            "azs:\n- name: z1\n  cpi: docker\nnetworks:\n- name: {net}\n  type: manual\n  subnets:\n  - range: 10.244.109.0/24\n    gateway: 10.244.109.1\n    static: [10.244.109.2 - 10.244.109.50]\n    azs: [z1]\nvm_types:\n- name: default\ndisk_types:\n- name: default\n  disk_size: 1024\ncompilation:\n  workers: 2\n  az: z1\n  network: {net}\n"
        ),
    )
    .unwrap();
    let out = env.bosun(&["update-cloud-config", cc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["upload-stemcell", &stemcell]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("to the docker CPI"),
        "{}",
        text(&out)
    );

    let quickstart = std::fs::read_to_string(repo().join("manifests/quickstart.yml")).unwrap();
    let manifest = quickstart
        .replace("../releases/kv", "{release}")
        .replace("  - name: default\n", &format!("  - name: {net}\n"));
    let m = env.manifest("quickstart-docker.yml", &manifest);
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));

    // 1. Three containers, each running, each with its own IP on the network.
    let list = env.instances("quickstart");
    assert_eq!(list.len(), 3);
    let mut ips = Vec::new();
    for i in &list {
        assert_eq!(i["process_state"], "running", "{i}");
        let cid = i["vm_cid"].as_str().unwrap();
        let ip = docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"bosun-{net}\").IPAddress}}}}"),
            cid,
        ]);
        assert_eq!(
            ip.trim(),
            i["ips"][0].as_str().unwrap(),
            "container IP is the planned one"
        );
        ips.push(ip.trim().to_string());
        // 2. The job runs inside the container.
        let top = docker(&["top", cid]);
        assert!(top.contains("server.py"), "{top}");
    }
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 3);

    // 2. A key written on one instance is read from another.
    let by_index =
        |list: &[serde_json::Value], i: u64| list.iter().find(|x| x["index"] == i).unwrap().clone();
    let i0 = by_index(&list, 0);
    let i2 = by_index(&list, 2);
    let a0 = format!("{}:8080", i0["ips"][0].as_str().unwrap());
    let a2 = format!("{}:8080", i2["ips"][0].as_str().unwrap());
    let (code, _) = http("PUT", &a0, "/kv/where", "docker").unwrap();
    assert!(code == 201 || code == 204);
    assert_eq!(
        http("GET", &a2, "/kv/where", "").unwrap(),
        (200, "docker".to_string())
    );

    // 3. `docker rm -f` of one instance: a redeploy brings it back with the same IP and data.
    docker(&["rm", "-f", i2["vm_cid"].as_str().unwrap()]);
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("VM is missing"),
        "{}",
        text(&out)
    );
    let after = env.instances("quickstart");
    let back = by_index(&after, 2);
    assert_eq!(back["process_state"], "running");
    assert_eq!(back["ips"], i2["ips"]);
    assert_eq!(back["persistent_disk_cids"], i2["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &a2, "/kv/where", "").unwrap(),
        (200, "docker".to_string())
    );

    // 5. The monitor on Docker: `docker rm -f` (a lost VM) and `docker
    //    pause` (a silent agent, fenced before its volume moves).
    let mon = env.monitor("quickstart");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let healed = |index: u64, old: &serde_json::Value| {
        wait_until(std::time::Duration::from_secs(90), || {
            let i = by_index(&env.instances("quickstart"), index);
            &i["vm_cid"] != old && !i["vm_cid"].is_null() && i["process_state"] == "running"
        })
    };
    let i1 = by_index(&after, 1);
    let a1 = format!("{}:8080", i1["ips"][0].as_str().unwrap());
    let t = std::time::Instant::now();
    docker(&["rm", "-f", i1["vm_cid"].as_str().unwrap()]);
    assert!(
        healed(1, &i1["vm_cid"]),
        "monitor did not recreate the removed container:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    eprintln!(
        "docker rm -f: recovered after {} ms",
        t.elapsed().as_millis()
    );
    let now1 = by_index(&env.instances("quickstart"), 1);
    assert_eq!(now1["ips"], i1["ips"]);
    assert_eq!(now1["persistent_disk_cids"], i1["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &a1, "/kv/where", "").unwrap(),
        (200, "docker".to_string())
    );

    let i0 = by_index(&env.instances("quickstart"), 0);
    let paused = i0["vm_cid"].as_str().unwrap().to_string();
    let t = std::time::Instant::now();
    docker(&["pause", &paused]);
    assert!(
        healed(0, &i0["vm_cid"]),
        "monitor did not replace the paused container:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    eprintln!(
        "docker pause: recovered after {} ms",
        t.elapsed().as_millis()
    );
    let gone = Command::new("docker")
        .args(["inspect", &paused])
        .output()
        .unwrap();
    assert!(
        !gone.status.success(),
        "the paused container was fenced (removed)"
    );
    let events = env.events("quickstart");
    let at = |action: &str, result: &str, object: &str| event_pos(&events, action, result, object);
    let new0 = by_index(&env.instances("quickstart"), 0)["vm_cid"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        at("fence", "deleted", &paused) < at("fence", "confirmed gone", &paused)
            && at("fence", "confirmed gone", &paused)
                < at("attach", "ok", &format!("to vm {new0}")),
        "fenced before the disk moved: {events:?}"
    );
    let a0 = format!("{}:8080", i0["ips"][0].as_str().unwrap());
    assert_eq!(
        http("GET", &a0, "/kv/where", "").unwrap(),
        (200, "docker".to_string())
    );
    drop(mon);
    let before = env.instances("quickstart");

    // 6. A bigger persistent disk: the data moves to new volumes and the
    //    old ones are orphaned; `clean-up --all` deletes those through the CPI.
    let m = env.manifest(
        "quickstart-docker-2g.yml",
        &manifest.replace("persistent_disk: 1024", "persistent_disk: 2048"),
    );
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = env.instances("quickstart");
    let mut old_volumes = Vec::new();
    for i in &after {
        let was = by_index(&before, i["index"].as_u64().unwrap());
        assert_ne!(
            i["persistent_disk_cids"], was["persistent_disk_cids"],
            "{i}"
        );
        old_volumes.push(was["persistent_disk_cids"][0].as_str().unwrap().to_string());
        let addr = format!("{}:8080", i["ips"][0].as_str().unwrap());
        assert_eq!(
            http("GET", &addr, "/kv/where", "").unwrap(),
            (200, "docker".to_string()),
            "the key moved with the disk of {i}"
        );
    }
    let out = env.bosun(&["disks", "--orphaned", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    for v in &old_volumes {
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(v.as_str()),
            "{}",
            text(&out)
        );
    }
    let out = env.bosun(&["clean-up", "--all", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let vols = docker(&["volume", "ls", "-q"]);
    for v in &old_volumes {
        assert!(!vols.lines().any(|x| x == v), "orphaned volume {v} deleted");
    }

    // A no-op redeploy changes nothing.
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no changes"),
        "{}",
        text(&out)
    );

    // 4. delete-deployment removes every container and the network; volumes stay as orphans.
    let disks: Vec<String> = after
        .iter()
        .map(|i| i["persistent_disk_cids"][0].as_str().unwrap().to_string())
        .collect();
    let out = env.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let left = docker(&["ps", "-aq", "--filter", "label=bosun.deployment=quickstart"]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    let nets = docker(&[
        "network",
        "ls",
        "-q",
        "--filter",
        &format!("name=bosun-{net}"),
    ]);
    assert!(nets.trim().is_empty(), "network left: {nets}");
    let vols = docker(&["volume", "ls", "-q"]);
    for d in &disks {
        assert!(vols.lines().any(|v| v == d), "orphaned volume {d} kept");
        docker(&["volume", "rm", d]);
    }
    // The stemcell image this test imported.
    let out = env.bosun(&["stemcells", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for s in list
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cpi"] == "docker")
    {
        docker(&["rmi", "-f", s["cid"].as_str().unwrap()]);
    }
}

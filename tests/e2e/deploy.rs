//! The quickstart lifecycle: deploy, replicate, no-op redeploy, rolling
//! update, failing canary, delete.

use crate::support::{http, kv_manifest, text, Env};

fn running_ips(env: &Env, deployment: &str) -> Vec<String> {
    let list = env.instances(deployment);
    assert_eq!(list.len(), 3, "{list:?}");
    let mut ips = Vec::new();
    for i in &list {
        assert_eq!(i["process_state"], "running", "{i}");
        assert!(i["instance"].as_str().unwrap().starts_with("kv/"));
        assert_eq!(i["persistent_disk_cids"].as_array().unwrap().len(), 1);
        assert!(i["vm_cid"].as_str().is_some());
        ips.push(i["ips"][0].as_str().unwrap().to_string());
    }
    let mut sorted = ips.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "distinct IPs: {ips:?}");
    ips
}

/// Index of the first output line containing all of `needles`.
fn line_of(out: &str, needles: &[&str]) -> usize {
    out.lines()
        .position(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no line with {needles:?} in:\n{out}"))
}

#[test]
fn quickstart_lifecycle() {
    let env = Env::new(101);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let m = m.to_str().unwrap();

    // 1. Fresh deploy: three running instances with distinct IPs.
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("compiling kv-common"), "{stdout}");
    assert!(stdout.contains("Deployed 'quickstart'"), "{stdout}");
    let ips = running_ips(&env, "quickstart");
    let list = env.instances("quickstart");
    let by_index = |i: u64| {
        list.iter().find(|x| x["index"] == i).unwrap()["ips"][0]
            .as_str()
            .unwrap()
            .to_string()
    };

    // 2. A key written on instance 0 is read from instance 2.
    let (code, _) = http("PUT", &format!("{}:8080", by_index(0)), "/kv/answer", "42").unwrap();
    assert!(code == 201 || code == 204, "PUT answered {code}");
    let (code, body) = http("GET", &format!("{}:8080", by_index(2)), "/kv/answer", "").unwrap();
    assert_eq!((code, body.as_str()), (200, "42"));

    // 3. Same manifest again: nothing changes, and it says so.
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("no changes"), "{stdout}");
    assert!(!stdout.contains("updating"), "{stdout}");
    assert_eq!(running_ips(&env, "quickstart"), ips);

    // 4. A changed property rolls one instance at a time, canary first.
    let m2 = env.manifest("m2.yml", &kv_manifest("quickstart", 8081, "300-30000"));
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n", "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert_eq!(plan.matches("job kv changed").count(), 3, "{plan}");
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stdout).to_string();
    let canary_update = line_of(&log, &["(0)", "updating (canary)"]);
    let canary_running = line_of(&log, &["(0)", "running"]);
    let second_stop = line_of(&log, &["(1)", "stopping"]);
    let second_running = line_of(&log, &["(1)", "running"]);
    let third_stop = line_of(&log, &["(2)", "stopping"]);
    assert!(canary_update < canary_running, "{log}");
    assert!(canary_running < second_stop, "canary first:\n{log}");
    assert!(second_running < third_stop, "max_in_flight 1:\n{log}");
    assert_eq!(running_ips(&env, "quickstart"), ips, "IPs kept");
    let (code, body) = http("GET", &format!("{}:8081", by_index(1)), "/kv/answer", "").unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "42"),
        "data survives the update"
    );

    // 5. Delete: no agent or job process, no VM directory.
    let out = env.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        env.processes().is_empty(),
        "left running: {:?}",
        env.processes()
    );
    assert_eq!(env.vm_dirs(), 0);
    let out = env.bosun(&["deployments"]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("quickstart"));
}

#[test]
fn failing_canary_leaves_the_rest_untouched() {
    let env = Env::new(102);
    let good = env.manifest("good.yml", &kv_manifest("canary", 8080, "300-10000"));
    let out = env.bosun(&["deploy", good.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let before = env.instances("canary");

    // A port the server cannot bind: the canary never runs.
    let bad = env.manifest("bad.yml", &kv_manifest("canary", 70000, "300-2000"));
    let out = env.bosun(&["deploy", bad.to_str().unwrap(), "-n"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("canary of instance group 'kv' failed"),
        "{err}"
    );
    assert!(err.contains("is not running after 2000 ms"), "{err}");
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        !log.contains("(1)      stopping") && !log.contains("(2)      stopping"),
        "{log}"
    );

    // Instances 1 and 2 still serve on the old port with the same VM.
    let after = env.instances("canary");
    for idx in [1u64, 2] {
        let b = before.iter().find(|x| x["index"] == idx).unwrap();
        let a = after.iter().find(|x| x["index"] == idx).unwrap();
        assert_eq!(a["vm_cid"], b["vm_cid"]);
        assert_eq!(a["process_state"], "running");
        let ip = a["ips"][0].as_str().unwrap();
        assert_eq!(
            http("GET", &format!("{ip}:8080"), "/health", "").unwrap().0,
            200
        );
    }
    // Fixing the manifest converges again.
    let out = env.bosun(&["deploy", good.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    running_ips(&env, "canary");
}

#[test]
fn a_lost_vm_comes_back_on_redeploy_with_its_ip_and_disk() {
    let env = Env::new(108);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let m = m.to_str().unwrap();
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let before = env.instances("quickstart");
    let lost = before.iter().find(|x| x["index"] == 1).unwrap().clone();
    let ip = lost["ips"][0].as_str().unwrap().to_string();
    let (code, _) = http("PUT", &format!("{ip}:8080"), "/kv/kept", "yes").unwrap();
    assert!(code == 201 || code == 204);

    // The VM dies: its agent and every process in it.
    let cid = lost["vm_cid"].as_str().unwrap();
    let pid: i32 = std::fs::read_to_string(env.state().join("local-cpi/vms").join(cid).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(300));
    let during = env.instances("quickstart");
    let i1 = during.iter().find(|x| x["index"] == 1).unwrap();
    assert_eq!(i1["process_state"], "unresponsive", "{i1}");

    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("VM is missing"), "{log}");
    assert_eq!(
        log.matches("recreate ").count(),
        1,
        "only the lost instance:\n{log}"
    );

    let after = env.instances("quickstart");
    let back = after.iter().find(|x| x["index"] == 1).unwrap();
    assert_eq!(back["process_state"], "running");
    assert_eq!(back["ips"], lost["ips"], "same IP");
    assert_eq!(
        back["persistent_disk_cids"], lost["persistent_disk_cids"],
        "same disk"
    );
    assert_ne!(back["vm_cid"], lost["vm_cid"], "a new VM");
    for idx in [0u64, 2] {
        let b = before.iter().find(|x| x["index"] == idx).unwrap();
        let a = after.iter().find(|x| x["index"] == idx).unwrap();
        assert_eq!(a["vm_cid"], b["vm_cid"], "others untouched");
    }
    let (code, body) = http("GET", &format!("{ip}:8080"), "/kv/kept", "").unwrap();
    assert_eq!((code, body.as_str()), (200, "yes"));
}

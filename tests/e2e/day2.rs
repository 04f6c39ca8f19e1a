//! Day-2 commands: vitals and details, logs as tarballs, orphaned disks
//! (list, delete, clean-up), shell completions.

use std::io::Read;

use crate::support::{http, kv_manifest, text, Env};

#[test]
fn vitals_logs_orphaned_disks_and_completions() {
    let env = Env::new(116);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    let ip = list[0]["ips"][0].as_str().unwrap();
    let (code, _) = http("PUT", &format!("{ip}:8080"), "/kv/a", "1").unwrap();
    assert!(code == 201 || code == 204);

    // Vitals and details, as text and JSON.
    for i in &list {
        assert!(i["vitals"]["mem_total_kb"].as_u64().unwrap() > 0, "{i}");
        assert!(i["agent_id"].as_str().is_some_and(|a| !a.is_empty()), "{i}");
        assert_eq!(i["persistent_disk_mb"], 1024);
    }
    let out = env.bosun(&["-d", "quickstart", "instances", "--vitals", "--details"]);
    let t = String::from_utf8_lossy(&out.stdout);
    assert_eq!(t.matches("  load ").count(), 3, "{t}");
    assert_eq!(t.matches("  agent ").count(), 3, "{t}");

    // Logs of one instance as a tarball holding the job's log files.
    let dir = env.path("logs");
    std::fs::create_dir_all(&dir).unwrap();
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "logs",
        "kv/0",
        "--dir",
        dir.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got.as_array().unwrap().len(), 1, "{got}");
    let file = got[0]["file"].as_str().unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(file).unwrap(),
    ));
    let mut logs = String::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().display().to_string();
        if path.starts_with("kv/") {
            let mut s = String::new();
            let _ = e.read_to_string(&mut s);
            logs.push_str(&format!("== {path}\n{s}"));
        }
    }
    assert!(logs.contains("listening on"), "the kv server's log: {logs}");
    let out = env.bosun(&["-d", "quickstart", "logs", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("no instance of deployment 'quickstart' matches 'nope'"),
        "{}",
        text(&out)
    );

    // Orphaned disks: listed after delete-deployment, deleted one by one or all.
    let out = env.bosun(&["-d", "quickstart", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let disks = |env: &Env| -> Vec<String> {
        let out = env.bosun(&["disks", "--orphaned", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|d| d["cid"].as_str().unwrap().to_string())
            .collect()
    };
    let orphaned = disks(&env);
    assert_eq!(orphaned.len(), 3, "{orphaned:?}");
    let out = env.bosun(&["delete-disk", &orphaned[0], "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(disks(&env).len(), 2);
    let out = env.bosun(&["delete-disk", &orphaned[0], "-n"]);
    assert!(!out.status.success(), "only orphaned disks can be deleted");
    let out = env.bosun(&["clean-up", "--all", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(disks(&env).is_empty());
    let left = std::fs::read_dir(env.state().join("local-cpi/disks"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "the local CPI deleted the disks");

    let out = env.bosun(&["completions", "bash"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("_bosun()"),
        "a bash completion function"
    );
}

#[test]
fn stop_start_restart_recreate_keep_ips_and_data() {
    let env = Env::new(117);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let m = m.to_str().unwrap();
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let before = env.instances("quickstart");
    let by =
        |list: &[serde_json::Value], i: u64| list.iter().find(|x| x["index"] == i).unwrap().clone();
    let addr = |i: &serde_json::Value| format!("{}:8080", i["ips"][0].as_str().unwrap());
    let (code, _) = http("PUT", &addr(&before[0]), "/kv/k", "v").unwrap();
    assert!(code == 201 || code == 204);
    let get = |i: &serde_json::Value| http("GET", &addr(i), "/kv/k", "").ok();
    let ok = |env: &Env, args: &[&str]| {
        let out = env.bosun(args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };

    // stop: jobs stopped, VM kept; a deploy leaves it stopped; start brings it back.
    ok(&env, &["-d", "quickstart", "stop", "kv/0", "-n"]);
    let now = env.instances("quickstart");
    assert_eq!(by(&now, 0)["process_state"], "stopped");
    assert_eq!(by(&now, 0)["vm_cid"], by(&before, 0)["vm_cid"]);
    assert_eq!(by(&now, 1)["process_state"], "running");
    assert!(get(&before[0]).is_none(), "not serving while stopped");
    assert!(ok(&env, &["deploy", m, "-n"]).contains("no changes"));
    assert_eq!(
        by(&env.instances("quickstart"), 0)["process_state"],
        "stopped"
    );
    ok(&env, &["-d", "quickstart", "start", "kv/0", "-n"]);
    assert_eq!(get(&before[0]), Some((200, "v".to_string())));

    // stop --hard: no VM, disk and IP kept; deploys leave it so; start recreates it.
    let i1 = by(&before, 1);
    ok(&env, &["-d", "quickstart", "stop", "kv/1", "--hard", "-n"]);
    let now = by(&env.instances("quickstart"), 1);
    assert!(now["vm_cid"].is_null(), "{now}");
    assert_eq!(now["ips"], i1["ips"]);
    assert_eq!(now["persistent_disk_cids"], i1["persistent_disk_cids"]);
    assert_eq!(env.vm_dirs(), 2);
    assert!(ok(&env, &["deploy", m, "-n"]).contains("no changes"));
    assert_eq!(
        env.vm_dirs(),
        2,
        "a deploy does not bring a hard-stopped instance back"
    );
    ok(&env, &["-d", "quickstart", "start", "kv/1", "-n"]);
    let now = by(&env.instances("quickstart"), 1);
    assert_eq!(now["process_state"], "running");
    assert_ne!(now["vm_cid"], i1["vm_cid"]);
    assert_eq!(now["ips"], i1["ips"]);
    assert_eq!(now["persistent_disk_cids"], i1["persistent_disk_cids"]);
    assert_eq!(
        get(&i1),
        Some((200, "v".to_string())),
        "data kept on its disk"
    );

    // restart the whole deployment: same VMs, all running.
    let vms: Vec<serde_json::Value> = env
        .instances("quickstart")
        .iter()
        .map(|i| i["vm_cid"].clone())
        .collect();
    let out = ok(&env, &["-d", "quickstart", "restart", "-n"]);
    assert!(out.contains("restart: 3 instances"), "{out}");
    let now = env.instances("quickstart");
    assert_eq!(
        now.iter().map(|i| i["vm_cid"].clone()).collect::<Vec<_>>(),
        vms
    );
    assert!(now.iter().all(|i| i["process_state"] == "running"));

    // recreate one instance: a new VM, same IP and disk, data there.
    let i2 = by(&now, 2);
    ok(&env, &["-d", "quickstart", "recreate", "kv/2", "-n"]);
    let after = by(&env.instances("quickstart"), 2);
    assert_ne!(after["vm_cid"], i2["vm_cid"]);
    assert_eq!(after["ips"], i2["ips"]);
    assert_eq!(after["persistent_disk_cids"], i2["persistent_disk_cids"]);
    assert_eq!(get(&i2), Some((200, "v".to_string())));
    assert!(
        ok(&env, &["deploy", m, "-n"]).contains("no changes"),
        "converged"
    );

    let out = env.bosun(&["-d", "quickstart", "stop", "nope/0", "-n"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no instance of deployment 'quickstart' matches 'nope/0'"));
    let events = env.events("quickstart");
    for action in ["stop", "start", "stop --hard", "restart", "recreate"] {
        assert!(
            events.iter().any(|e| e["action"] == action),
            "event {action}"
        );
    }
}

/// A release whose job `life` logs each lifecycle script it runs; its
/// post-start exits with `life.post_start_exit`.
fn lifecycle_release(env: &Env) -> std::path::PathBuf {
    let dir = env.path("life-release");
    let script =
        |name: &str| format!("#!/bin/sh\necho {name} >> /var/vcap/sys/log/life/lifecycle.log\n");
    let files: Vec<(String, String)> = vec![
        ("config/final.yml".into(), "name: life\n".into()),
        (
            "jobs/life/spec".into(),
            "---\nname: life\ntemplate_engine: tera\ntemplates:\n  bpm.yml: config/bpm.yml\n  pre-stop: bin/pre-stop\n  post-stop: bin/post-stop\n  post-start: bin/post-start\n  post-deploy: bin/post-deploy\n  drain: bin/drain\npackages: []\nproperties:\n  life.post_start_exit: {default: 0}\n  life.generation: {default: 1}\n  life.drain_s: {default: 0}\n".into(),
        ),
        ("jobs/life/monit".into(), String::new()),
        (
            "jobs/life/templates/bpm.yml".into(),
            "processes:\n- name: sleep\n  executable: /bin/sleep\n  args: ['1000{{ p(\"life.generation\") }}']\n".into(),
        ),
        (
            "jobs/life/templates/pre-stop".into(),
            format!(
                "{}echo \"$BOSH_VM_NEXT_STATE $BOSH_INSTANCE_NEXT_STATE $BOSH_DEPLOYMENT_NEXT_STATE\" >> {}\n",
                script("pre-stop"),
                env.shared_path("next-state.log").display()
            ),
        ),
        ("jobs/life/templates/post-stop".into(), script("post-stop")),
        ("jobs/life/templates/post-deploy".into(), script("post-deploy")),
        (
            "jobs/life/templates/drain".into(),
            format!(
                "{}echo \"$1 $BOSH_JOB_STATE $BOSH_JOB_NEXT_STATE\" >> {}\necho {{{{ p(\"life.drain_s\") }}}}\n",
                script("drain"),
                env.shared_path("job-state.log").display()
            ),
        ),
        (
            "jobs/life/templates/post-start".into(),
            format!("{}exit {{{{ p(\"life.post_start_exit\") }}}}\n", script("post-start")),
        ),
    ];
    for (path, content) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    std::fs::create_dir_all(dir.join("packages")).unwrap();
    dir
}

#[test]
fn lifecycle_scripts_run_in_bosh_order_and_a_failing_post_start_fails() {
    let env = Env::new(118);
    let release = lifecycle_release(&env);
    let manifest = |generation: u32, exit: u32, drain: u32| {
        format!(
            "name: e2e\nreleases:\n- name: life\n  version: latest\n  path: {}\nstemcells:\n- alias: default\n  os: {{os}}\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 1\n  canary_watch_time: 200-10000\n  update_watch_time: 200-10000\ninstance_groups:\n- name: life\n  instances: 1\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  networks:\n  - name: default\n  jobs:\n  - name: life\n    release: life\n    properties:\n      life: {{post_start_exit: {exit}, generation: {generation}, drain_s: {drain}}}\n",
            release.display()
        )
    };
    let log = |env: &Env| -> Vec<String> {
        let list = env.instances("e2e");
        let cid = list[0]["vm_cid"].as_str().unwrap().to_string();
        std::fs::read_to_string(
            env.state()
                .join("local-cpi/vms")
                .join(cid)
                .join("vcap/sys/log/life/lifecycle.log"),
        )
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
    };
    let m1 = env.manifest("m1.yml", &manifest(1, 0, 0));
    let out = env.bosun(&["deploy", m1.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(log(&env), ["post-start", "post-deploy"]);

    // An update: pre-stop, drain, post-stop, post-start, then post-deploy.
    let m2 = env.manifest("m2.yml", &manifest(2, 0, 2));
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        log(&env),
        [
            "post-start",
            "post-deploy",
            "pre-stop",
            "drain",
            "post-stop",
            "post-start",
            "post-deploy"
        ]
    );
    // The drain script now prints 2: a stop waits 2 s; --skip-drain does not.
    let t = std::time::Instant::now();
    let out = env.bosun(&["-d", "e2e", "stop", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let drained = t.elapsed();
    assert!(
        drained >= std::time::Duration::from_secs(2),
        "drain delayed the stop: {drained:?}"
    );
    assert_eq!(log(&env)[7..], ["pre-stop", "drain", "post-stop"]);
    let out = env.bosun(&["-d", "e2e", "start", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let t = std::time::Instant::now();
    let out = env.bosun(&["-d", "e2e", "stop", "--skip-drain", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        t.elapsed() < drained,
        "--skip-drain: {:?} vs {drained:?}",
        t.elapsed()
    );
    assert_eq!(
        log(&env)[10..],
        ["post-start", "pre-stop", "post-stop"],
        "no drain"
    );
    let out = env.bosun(&["-d", "e2e", "start", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    eprintln!("stop with a 2 s drain took {drained:?}");

    // A failing post-start fails the instance's update, naming the job and the exit code.
    let m3 = env.manifest("m3.yml", &manifest(3, 3, 0));
    let out = env.bosun(&["deploy", m3.to_str().unwrap(), "-n"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("post-start of job life on life/"),
        "{}",
        text(&out)
    );
    assert!(text(&out).contains("exited 3"), "{}", text(&out));
    assert!(
        !log(&env).ends_with(&["post-deploy".to_string()]),
        "no post-deploy after a failure"
    );

    // What pre-stop and drain are told comes next, as in BOSH.
    let m4 = env.manifest("m4.yml", &manifest(4, 0, 0));
    let out = env.bosun(&["deploy", m4.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    for args in [&["recreate", "-n"][..], &["delete-deployment", "-n"][..]] {
        let out = env.bosun(&[&["-d", "e2e"][..], args].concat());
        assert!(out.status.success(), "{}", text(&out));
    }
    let lines = |name: &str| -> Vec<String> {
        std::fs::read_to_string(env.shared_path(name))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let next = lines("next-state.log");
    // update, stop, stop --skip-drain: everything stays.
    assert_eq!(
        next[..3],
        ["keep keep keep", "keep keep keep", "keep keep keep"]
    );
    // recreate: the VM goes; delete-deployment: everything goes.
    assert_eq!(
        next[next.len() - 2..],
        ["delete keep keep", "delete delete delete"],
        "{next:?}"
    );
    let jobs = lines("job-state.log");
    let no_disk = r#"{"persistent_disk":0}"#;
    assert_eq!(
        jobs[0],
        format!("job_changed {no_disk} {no_disk}"),
        "{jobs:?}"
    );
    assert!(
        jobs.last().unwrap().starts_with("job_shutdown "),
        "{jobs:?}"
    );
}

#[test]
fn the_kv_smoke_errand_passes_and_a_broken_run_reports_its_exit_code() {
    let env = Env::new(119);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let smoke = crate::support::repo().join("manifests/ops/smoke-errand.yml");
    let fast = env.path("fast.yml");
    std::fs::write(
        &fast,
        "- type: replace\n  path: /instance_groups/name=smoke/jobs/name=kv-smoke/properties?/kv_smoke/timeout_s\n  value: 1\n",
    )
    .unwrap();
    let (m, smoke, fast) = (
        m.to_str().unwrap(),
        smoke.to_str().unwrap(),
        fast.to_str().unwrap(),
    );
    let out = env.bosun(&["deploy", m, "-o", smoke, "-o", fast, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    let errand = list.iter().find(|i| i["group"] == "smoke").unwrap();
    assert_eq!(errand["process_state"], "errand");
    assert!(errand["vm_cid"].is_null(), "no VM between runs");
    assert_eq!(env.vm_dirs(), 3);

    let out = env.bosun(&["-d", "quickstart", "run-errand", "smoke"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("reads matched") && log.contains("kv-smoke") && log.contains(": OK"),
        "{log}"
    );
    assert_eq!(env.vm_dirs(), 3, "the errand VM is deleted afterwards");
    let out = env.bosun(&["deploy", m, "-o", smoke, "-o", fast, "-n"]);
    assert!(text(&out).contains("no changes"), "{}", text(&out));

    // Broken: one kv instance stopped. The errand fails with its own exit code.
    let out = env.bosun(&["-d", "quickstart", "stop", "kv/1", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "run-errand",
        "smoke",
        "--keep-alive",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs[0]["exit_code"], 1);
    assert!(
        runs[0]["jobs"][0]["output_tail"]
            .as_str()
            .unwrap()
            .contains("FAILED"),
        "{runs}"
    );
    assert_eq!(env.vm_dirs(), 4, "--keep-alive keeps the errand VM");
    let out = env.bosun(&["-d", "quickstart", "start", "kv/1", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["-d", "quickstart", "run-errand", "smoke"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "the kept VM runs it again: {}",
        text(&out)
    );
    assert_eq!(env.vm_dirs(), 3);
    let out = env.bosun(&["-d", "quickstart", "run-errand", "nope"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("has no errand 'nope' (errands: smoke)"),
        "{}",
        text(&out)
    );
}

#[test]
fn resizing_the_persistent_disk_keeps_the_keys() {
    let env = Env::new(120);
    let small = kv_manifest("quickstart", 8080, "300-30000")
        .replace("persistent_disk_type: default", "persistent_disk: 1024");
    let m1 = env.manifest("m1.yml", &small);
    let out = env.bosun(&["deploy", m1.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let before = env.instances("quickstart");
    let ip = before[0]["ips"][0].as_str().unwrap();
    for k in ["a", "b", "c"] {
        let (code, _) = http("PUT", &format!("{ip}:8080"), &format!("/kv/{k}"), k).unwrap();
        assert!(code == 201 || code == 204);
    }
    let m2 = env.manifest(
        "m2.yml",
        &small.replace("persistent_disk: 1024", "persistent_disk: 2048"),
    );
    let dry = env.bosun(&["deploy", m2.to_str().unwrap(), "--dry-run"]);
    assert!(
        text(&dry).contains("persistent disk 1024 MB -> 2048 MB: data copied to a new disk"),
        "{}",
        text(&dry)
    );
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = env.instances("quickstart");
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(a["vm_cid"], b["vm_cid"], "same VM");
        assert_ne!(
            a["persistent_disk_cids"], b["persistent_disk_cids"],
            "a new disk"
        );
        assert_eq!(a["persistent_disk_mb"], 2048);
        let ip = a["ips"][0].as_str().unwrap();
        for k in ["a", "b", "c"] {
            assert_eq!(
                http("GET", &format!("{ip}:8080"), &format!("/kv/{k}"), "").unwrap(),
                (200, k.to_string()),
                "key {k} on {ip}"
            );
        }
    }
    // The old disks are orphaned, not deleted.
    let out = env.bosun(&["disks", "--orphaned", "--json"]);
    let orphans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let orphaned: Vec<&str> = orphans
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cid"].as_str().unwrap())
        .collect();
    for b in &before {
        assert!(
            orphaned.contains(&b["persistent_disk_cids"][0].as_str().unwrap()),
            "{orphans}"
        );
    }
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(text(&out).contains("no changes"), "{}", text(&out));
}

#[test]
fn tasks_keep_each_operation_and_ctrl_c_cancels_at_a_safe_point() {
    let env = Env::new(121);
    let slow =
        kv_manifest("quickstart", 8080, "1500-30000").replace("instances: 3", "instances: 4");
    let m = env.manifest("m.yml", &slow);
    let m = m.to_str().unwrap();
    let deploy = env
        .command(&["deploy", m, "-n"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ctrl-C once the canary is being updated: it finishes, nothing else starts.
    let event_log = env.state().join("tasks/1/event.log");
    assert!(crate::support::wait_until(
        std::time::Duration::from_secs(60),
        || { std::fs::read_to_string(&event_log).is_ok_and(|l| l.contains("updating (canary)")) }
    ));
    crate::support::signal(deploy.id() as i32, "INT");
    let out = deploy.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("cancelled at a safe point"),
        "{}",
        text(&out)
    );
    let list = env.instances("quickstart");
    let running = list
        .iter()
        .filter(|i| i["process_state"] == "running")
        .count();
    assert_eq!(running, 1, "only the canary was updated: {list:?}");

    // The task says so; its logs hold what was printed and every CPI call.
    let out = env.bosun(&["tasks", "--recent", "--json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == 1)
        .unwrap();
    assert_eq!(t["state"], "cancelled", "{t}");
    assert_eq!(t["description"], format!("deploy {m}"));
    let out = env.bosun(&["task", "1"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(
        log.contains("updating (canary)") && log.contains("Cancel requested"),
        "{log}"
    );
    let out = env.bosun(&["task", "1", "--cpi"]);
    let cpi = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        cpi.matches("create_vm(").count(),
        4 + 2,
        "4 instances and 2 compilation workers: {cpi}"
    );
    assert!(
        !cpi.contains("PRIVATE KEY"),
        "no request bodies in the CPI log"
    );

    // A deploy then converges, as its own task.
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(env
        .instances("quickstart")
        .iter()
        .all(|i| i["process_state"] == "running"));
    let out = env.bosun(&["tasks", "--recent", "2", "--json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tasks[0]["state"], "done", "{tasks}");
    assert_eq!(tasks.as_array().unwrap().len(), 2);
    let out = env.bosun(&["tasks", "--json"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "[]",
        "nothing running"
    );
    let out = env.bosun(&["task", "99"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("there is no task 99"));
}

#[test]
fn ssh_c_runs_on_every_instance_with_prefixes_and_exit_codes() {
    let env = Env::new(122);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");

    // Inside each VM: its own store and jobs.
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv",
        "-c",
        "ls /var/vcap/jobs; test -d /var/vcap/store/kv && echo store-ok",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    for i in &list {
        let prefix = format!("kv/{} ({}): ", i["id"].as_str().unwrap(), i["index"]);
        assert!(stdout.contains(&format!("{prefix}kv\n")), "{stdout}");
        assert!(stdout.contains(&format!("{prefix}store-ok\n")), "{stdout}");
    }

    // One instance, a failing command: its exit status and stderr come back.
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv/1",
        "-c",
        "echo oops >&2; exit 7",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["index"], 1);
    assert_eq!(runs[0]["stderr"], "oops\n");
    assert_eq!(runs[0]["exit_code"], 7);

    // An interactive shell needs one instance.
    let out = env.bosun(&["-d", "quickstart", "ssh", "kv"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("an interactive shell needs one instance; 'kv' matches 3"),
        "{}",
        text(&out)
    );

    // scp both ways: to every kv instance, back from one.
    let local = env.path("hello.sh");
    std::fs::write(&local, "#!/bin/sh\necho hello from $(hostname)\n").unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "scp",
        local.to_str().unwrap(),
        "kv:/var/vcap/data/tmp/hello.sh",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("wrote /var/vcap/data/tmp/hello.sh")
            .count(),
        3
    );
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv",
        "-c",
        "/var/vcap/data/tmp/hello.sh",
    ]);
    assert!(
        out.status.success(),
        "executable on every instance: {}",
        text(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .matches("hello from")
            .count(),
        3
    );
    let back = env.path("back.sh");
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "scp",
        "kv/1:/var/vcap/data/tmp/hello.sh",
        back.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&local).unwrap()
    );
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "scp",
        "kv:/var/vcap/data/tmp/hello.sh",
        back.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("copying from 3 instances at once"),
        "{}",
        text(&out)
    );
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "scp",
        "kv/1:/nope",
        back.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("No such file"), "{}", text(&out));
}

#[test]
fn logs_follow_shows_a_request_made_while_following() {
    let env = Env::new(123);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    let log = env.path("follow.log");
    let mut follow = env
        .command(&["-d", "quickstart", "logs", "--follow", "--job", "kv"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    // One request to each instance, made while following.
    for i in &list {
        let ip = i["ips"][0].as_str().unwrap();
        let (code, _) = http("GET", &format!("{ip}:8080"), "/kv/followed-key", "").unwrap();
        assert_eq!(code, 404);
    }
    let seen = crate::support::wait_until(std::time::Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        list.iter().all(|i| {
            let prefix = format!("kv/{} ({}): ", i["id"].as_str().unwrap(), i["index"]);
            text.lines()
                .any(|l| l.starts_with(&prefix) && l.contains("GET /kv/followed-key"))
        })
    });
    // A log file created while following is picked up from its start.
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv/0",
        "-c",
        "echo first-line-of-a-new-file >> /var/vcap/sys/log/kv/new.log",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let first = &list.iter().find(|i| i["index"] == 0).unwrap();
    let new_file = crate::support::wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains(&format!(
                "kv/{} (0): first-line-of-a-new-file",
                first["id"].as_str().unwrap()
            ))
    });
    crate::support::signal(follow.id() as i32, "INT");
    let status = follow.wait().unwrap();
    assert!(
        seen && new_file,
        "every instance's request line, with its prefix, and the new file's line:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "Ctrl-C ends --follow cleanly: {status:?}");
    // Nothing keeps following on the VMs.
    for i in &list {
        let vm = env.vm_pid(i["vm_cid"].as_str().unwrap());
        assert!(crate::support::wait_until(
            std::time::Duration::from_secs(5),
            || !crate::support::descendants(vm)
                .iter()
                .any(|(_, cmd)| cmd.contains("tail -q"))
        ));
    }
}

#[test]
fn attach_disk_gives_a_hard_stopped_instance_an_orphaned_disk() {
    let env = Env::new(124);
    let three = kv_manifest("quickstart", 8080, "300-30000");
    let m3 = env.manifest("m3.yml", &three);
    let out = env.bosun(&["deploy", m3.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    // Mark kv/2's disk, then scale down: that disk is orphaned.
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv/2",
        "-c",
        "echo from-two > /var/vcap/store/marker",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let two = env.manifest("m2.yml", &three.replace("instances: 3", "instances: 2"));
    let out = env.bosun(&["deploy", two.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["disks", "--orphaned", "--json"]);
    let orphans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d2 = orphans[0]["cid"].as_str().unwrap().to_string();

    let out = env.bosun(&["-d", "quickstart", "attach-disk", "kv/1", &d2]);
    assert!(!out.status.success(), "needs a hard stop first");
    assert!(
        text(&out).contains("must be stopped with `stop --hard`"),
        "{}",
        text(&out)
    );
    let d1 = env.instances("quickstart")[1]["persistent_disk_cids"][0]
        .as_str()
        .unwrap()
        .to_string();
    for args in [
        vec!["-d", "quickstart", "stop", "kv/1", "--hard", "-n"],
        vec!["-d", "quickstart", "attach-disk", "kv/1", &d2],
        vec!["-d", "quickstart", "start", "kv/1", "-n"],
    ] {
        let out = env.bosun(&args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    }
    let now = &env.instances("quickstart")[1];
    assert_eq!(now["process_state"], "running");
    assert_eq!(now["persistent_disk_cids"][0], d2.as_str());
    let out = env.bosun(&[
        "-d",
        "quickstart",
        "ssh",
        "kv/1",
        "-c",
        "cat /var/vcap/store/marker",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-two"),
        "{}",
        text(&out)
    );
    let out = env.bosun(&["disks", "--orphaned", "--json"]);
    let orphans: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cids: Vec<&str> = orphans
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["cid"].as_str().unwrap())
        .collect();
    assert_eq!(cids, [d1.as_str()], "kv/1's own disk is orphaned, not lost");
    let out = env.bosun(&["deploy", two.to_str().unwrap(), "-n"]);
    assert!(
        text(&out).contains("no changes"),
        "the attached disk is kept: {}",
        text(&out)
    );
}

/// Run `bosun ssh` with `input` written to its stdin after a pause (through
/// `script` when `tty`, so bosun's stdin is a terminal): (exit code, output).
fn interactive(env: &Env, instance: &str, tty: bool, input: &[&str]) -> (Option<i32>, String) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let state = env.state();
    let bosun = [
        crate::support::BOSUN,
        "--state-dir",
        state.to_str().unwrap(),
        "-d",
        "quickstart",
        "ssh",
        instance,
    ];
    let mut cmd = if tty {
        let mut c = Command::new("script");
        c.args(["-qefc", &bosun.join(" "), "/dev/null"]);
        c
    } else {
        let mut c = Command::new(bosun[0]);
        c.args(&bosun[1..]);
        c
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bosun ssh");
    let mut stdin = child.stdin.take().unwrap();
    for chunk in input {
        std::thread::sleep(std::time::Duration::from_millis(700));
        stdin.write_all(chunk.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    (out.status.code(), text(&out))
}

#[test]
fn ssh_opens_an_interactive_shell_on_a_pty_and_leaves_nothing_behind() {
    let env = Env::new(125);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    let cid = |index: u64| {
        list.iter()
            .find(|i| i["index"] == index)
            .and_then(|i| i["vm_cid"].as_str())
            .expect("an instance with a VM")
            .to_string()
    };

    // Piped input: a login shell on a pty of the default size, its exit
    // status returned.
    let (code, output) = interactive(
        &env,
        "kv/0",
        false,
        &["echo answer=$((6*7)); tty; stty size; test -d /var/vcap/jobs/kv && echo in-vm\nexit 3\n"],
    );
    assert_eq!(code, Some(3), "{output}");
    for want in [
        "answer=42",
        "/dev/pts/",
        "24 80",
        "in-vm",
        "closed (exit 3)",
    ] {
        assert!(output.contains(want), "{want} missing: {output}");
    }

    // A terminal: raw mode, so this side echoes nothing (the command shows
    // once, echoed by the remote pty) and Ctrl-C reaches the remote
    // `sleep` instead of stopping bosun.
    let started = std::time::Instant::now();
    let (code, output) = interactive(
        &env,
        "kv/1",
        true,
        &["sleep 60\n", "\x03", "echo after-$((2+3)); exit 5\n"],
    );
    assert_eq!(code, Some(5), "{output}");
    assert!(output.contains("after-5"), "{output}");
    assert_eq!(output.matches("echo after-$((2+3))").count(), 1, "{output}");
    assert!(
        started.elapsed().as_secs() < 30,
        "Ctrl-C did not reach sleep"
    );

    // A client that vanishes: its shell and the shell's jobs are hung up.
    let vm = env.vm_pid(&cid(2));
    let mut child = env
        .command(&["-d", "quickstart", "ssh", "kv/2"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin.write_all(b"sleep 313 & sleep 314\n").unwrap();
        stdin.flush().unwrap();
    }
    let running = |what: &str| {
        crate::support::descendants(vm)
            .iter()
            .any(|(_, cmd)| cmd.contains(what))
    };
    assert!(crate::support::wait_until(
        std::time::Duration::from_secs(10),
        || running("sleep 313") && running("sleep 314")
    ));
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        crate::support::wait_until(std::time::Duration::from_secs(10), || {
            !running("sleep 313") && !running("sleep 314") && !running("bash -l")
        }),
        "left behind: {:?}",
        crate::support::descendants(vm)
    );
    // No shell of the earlier sessions either.
    for index in [0, 1] {
        let left: Vec<_> = crate::support::descendants(env.vm_pid(&cid(index)))
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("bash -l") || cmd.contains("sh -l"))
            .collect();
        assert!(left.is_empty(), "kv/{index}: {left:?}");
    }

    // The sessions are events.
    let opened = env
        .events("quickstart")
        .iter()
        .filter(|e| e["action"] == "ssh")
        .count();
    assert_eq!(opened, 3);
}

#[test]
fn a_colocated_errand_streams_its_output_while_it_runs() {
    use std::io::BufRead;
    let env = Env::new(127);
    // An errand job that prints a line, then waits until the test, having
    // seen that line, lets it finish: it can only pass if output streams.
    let gate = env.shared_path("gate");
    let rel = env.path("waiter-release");
    let run = format!(
        "#!/bin/sh\necho \"waiting on $(hostname)\"\ni=0\nwhile [ ! -e {g} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n[ -e {g} ] && echo released && exit 0\necho never released\nexit 9\n",
        g = gate.display()
    );
    for (path, content) in [
        ("config/final.yml", "name: waiter\n".to_string()),
        (
            "jobs/waiter/spec",
            "---\nname: waiter\ntemplate_engine: tera\ntemplates:\n  run: bin/run\npackages: []\nproperties: {}\n".into(),
        ),
        ("jobs/waiter/monit", String::new()),
        ("jobs/waiter/templates/run", run),
    ] {
        let p = rel.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    std::fs::create_dir_all(rel.join("packages")).unwrap();
    let ops = env.path("waiter.yml");
    std::fs::write(
        &ops,
        format!(
            "- type: replace\n  path: /releases/-\n  value: {{name: waiter, version: latest, path: {}}}\n- type: replace\n  path: /instance_groups/name=kv/jobs/-\n  value: {{name: waiter, release: waiter}}\n",
            rel.display()
        ),
    )
    .unwrap();
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&[
        "deploy",
        m.to_str().unwrap(),
        "-o",
        ops.to_str().unwrap(),
        "-n",
    ]);
    assert!(out.status.success(), "{}", text(&out));

    // On one instance: the first line arrives while the errand still runs.
    let mut child = env
        .command(&[
            "-d",
            "quickstart",
            "run-errand",
            "waiter",
            "--instance",
            "kv/1",
        ])
        .env("BOSUN_AGENT_TIMEOUT", "30")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let mut seen = Vec::new();
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.contains("] waiting on") {
            assert!(!gate.exists());
            seen.push(format!("(streamed after {:?})", started.elapsed()));
            std::fs::write(&gate, "").unwrap();
        }
        seen.push(line);
    }
    let status = child.wait().unwrap();
    let all = seen.join("\n");
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(all.contains("(streamed after"), "{all}");
    assert_eq!(all.matches("] released").count(), 1, "{all}");
    assert_eq!(all.matches("Errand 'waiter' on kv/").count(), 1, "{all}");
    assert!(all.contains(" (1) waiter] released"), "{all}");

    // On every instance that has the job, at once; VMs stay.
    let out = env.bosun(&["-d", "quickstart", "run-errand", "waiter", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(runs.as_array().unwrap().len(), 3, "{runs}");
    for r in runs.as_array().unwrap() {
        assert_eq!(
            r["jobs"].as_array().unwrap().len(),
            1,
            "only the errand job: {r}"
        );
        assert!(r["jobs"][0]["output_tail"]
            .as_str()
            .unwrap()
            .contains("released"));
    }
    assert_eq!(env.vm_dirs(), 3);
    let out = env.bosun(&["-d", "quickstart", "run-errand", "nope"]);
    assert!(
        text(&out).contains("has no errand 'nope' (errands: waiter)"),
        "{}",
        text(&out)
    );
}

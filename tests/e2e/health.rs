//! Keeping a deployment alive: the health monitor's ladder on the local CPI
//! (a crashed process, a lost VM, a silent agent holding its disk) and
//! cloud-check after the director crashed in the middle of a deploy.
//! Timings are printed for the record, never asserted (see bench/heal.sh).

use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::support::{
    descendants, event_pos as pos, http, kv_manifest, signal, text, wait_until, Env,
};

fn by_index(list: &[Value], i: u64) -> Value {
    list.iter()
        .find(|x| x["index"] == i)
        .unwrap_or_else(|| panic!("no instance {i} in {list:?}"))
        .clone()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn events_after_recreate(env: &Env, inst: &Value) -> Vec<Value> {
    env.events_after_recreate("quickstart", inst)
}

fn events_of(env: &Env, inst: &Value) -> Vec<Value> {
    env.instance_events("quickstart", inst)
}

/// Where a path inside a local-CPI VM (under /var/vcap) is on the host,
/// following symlinks whose targets are VM paths.
fn host_path(env: &Env, cid: &str, vm_path: &str) -> String {
    let vcap = env.state().join("local-cpi/vms").join(cid).join("vcap");
    let mut host = vcap.clone();
    let rel = vm_path
        .strip_prefix("/var/vcap/")
        .expect("a /var/vcap path");
    for part in rel.split('/') {
        host.push(part);
        if let Ok(target) = std::fs::read_link(&host) {
            host = match target.strip_prefix("/var/vcap") {
                Ok(t) => vcap.join(t),
                Err(_) if target.is_absolute() => target,
                Err(_) => host.parent().unwrap().join(target),
            };
        }
    }
    host.display().to_string()
}

fn vm_cid_of(env: &Env, index: u64) -> Value {
    by_index(&env.instances("quickstart"), index)
}

fn replaced_and_running(env: &Env, index: u64, old_cid: &Value) -> bool {
    let i = vm_cid_of(env, index);
    &i["vm_cid"] != old_cid && !i["vm_cid"].is_null() && i["process_state"] == "running"
}

#[test]
fn the_monitor_heals_a_crashed_process_a_lost_vm_and_a_silent_agent() {
    let env = Env::new(111);
    // A short job_restart_after keeps case 1b quick; the rest are defaults.
    let manifest = kv_manifest("quickstart", 8080, "300-30000").replace(
        "instance_groups:",
        "health:\n  job_restart_after: 2\ninstance_groups:",
    );
    let m = env.manifest("m.yml", &manifest);
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let before = env.instances("quickstart");
    let mon = env.monitor("quickstart");
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            &mon.log
        )
        .is_ok_and(|l| l.contains("Monitoring"))),
        "monitor did not start"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let addr = |i: &Value| format!("{}:8080", i["ips"][0].as_str().unwrap());

    // 1. kill -9 the kv server of instance 0: the agent restarts it.
    let i0 = by_index(&before, 0);
    let agent0 = env.vm_pid(i0["vm_cid"].as_str().unwrap());
    let server_pid = |agent| {
        descendants(agent)
            .into_iter()
            .find(|(_, cmd)| cmd.contains("server.py"))
            .map(|(p, _)| p)
    };
    let server = server_pid(agent0).expect("kv server runs");
    let (code, _) = http("PUT", &addr(&i0), "/kv/one", "1").unwrap();
    assert!(code == 201 || code == 204);
    let (t, killed_at) = (Instant::now(), now_ms());
    signal(server, "KILL");
    assert!(
        wait_until(Duration::from_secs(20), || server_pid(agent0)
            .is_some_and(|p| p != server)
            && http("GET", &addr(&i0), "/kv/one", "")
                .is_ok_and(|r| r == (200, "1".into()))),
        "kv server of instance 0 did not come back"
    );
    let served = t.elapsed();
    // The monitor notices at its next heartbeat.
    assert!(wait_until(Duration::from_secs(10), || events_of(&env, &i0)
        .iter()
        .any(|e| e["action"] == "restart-process")));
    let ev = events_of(&env, &i0);
    let restart = &ev[pos(&ev, "restart-process", "restarted by the agent", "kv/kv")];
    eprintln!(
        "case 1 (process crash): seen after {} ms, serving again after {} ms",
        restart["time_ms"].as_i64().unwrap() - killed_at,
        served.as_millis()
    );
    assert_eq!(vm_cid_of(&env, 0)["vm_cid"], i0["vm_cid"], "same VM");

    // 1b. The job stays failing (its program is gone): after
    //     job_restart_after the monitor restarts the job; still failing,
    //     it alerts and stops; once the program is back it runs again.
    let server = server_pid(agent0).expect("kv server runs");
    let program = host_path(
        &env,
        i0["vm_cid"].as_str().unwrap(),
        "/var/vcap/packages/kv-server/lib/server.py",
    );
    std::fs::rename(&program, format!("{program}.off")).expect("hide server.py");
    signal(server, "KILL");
    let alerted = || {
        events_of(&env, &i0).iter().any(|e| {
            e["action"] == "alert" && e["result"].as_str().unwrap().contains("still failing")
        })
    };
    assert!(
        wait_until(Duration::from_secs(30), alerted),
        "no alert; monitor log:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    let ev = events_of(&env, &i0);
    let restarted = pos(&ev, "restart-job", "ok", "jobs kv");
    let alert = pos(&ev, "alert", "still failing", "instance");
    assert!(restarted < alert, "restart the job, then alert");
    assert_eq!(
        ev.iter().filter(|e| e["action"] == "restart-job").count(),
        1,
        "one fault, one job restart"
    );
    std::fs::rename(format!("{program}.off"), &program).expect("restore server.py");
    assert!(
        wait_until(Duration::from_secs(30), || events_of(&env, &i0)
            .iter()
            .skip(alert + 1)
            .any(|e| e["result"] == "recovered")),
        "instance 0 runs again after its program is back"
    );
    assert_eq!(
        http("GET", &addr(&i0), "/kv/one", "").unwrap(),
        (200, "1".to_string())
    );

    // 2. The VM of instance 1 is lost: its agent and every process in it.
    let i1 = by_index(&before, 1);
    let (code, _) = http("PUT", &addr(&i1), "/kv/two", "2").unwrap();
    assert!(code == 201 || code == 204);
    let agent1 = env.vm_pid(i1["vm_cid"].as_str().unwrap());
    let (t, killed_at) = (Instant::now(), now_ms());
    // Outermost first, each at once: a process may already be gone when
    // its PID namespace's init died.
    let mut all = vec![agent1];
    all.extend(descendants(agent1).into_iter().map(|(p, _)| p));
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(all.iter().map(|p| p.to_string()))
        .status();
    assert!(
        wait_until(Duration::from_secs(60), || replaced_and_running(
            &env,
            1,
            &i1["vm_cid"]
        )),
        "instance 1 was not recreated; monitor log:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    let recovered = t.elapsed();
    let back = vm_cid_of(&env, 1);
    assert_eq!(back["ips"], i1["ips"], "same IP");
    assert_eq!(
        back["persistent_disk_cids"], i1["persistent_disk_cids"],
        "same disk"
    );
    assert_eq!(
        http("GET", &addr(&i1), "/kv/two", "").unwrap(),
        (200, "2".to_string()),
        "the key written before is readable from the new VM"
    );
    let ev = events_after_recreate(&env, &i1);
    let detect = &ev[pos(&ev, "detect", "missing", "instance")];
    let done = pos(&ev, "recreate", "ok", "instance");
    eprintln!(
        "case 2 (lost VM): detected after {} ms, recovered after {} ms",
        detect["time_ms"].as_i64().unwrap() - killed_at,
        recovered.as_millis()
    );
    assert!(done > pos(&ev, "detect", "missing", "instance"));

    // 3. The agent of instance 2 goes silent (SIGSTOP) but its VM still
    //    holds the disk: fenced (deleted, confirmed gone) before the disk moves.
    let i2 = by_index(&before, 2);
    let (code, _) = http("PUT", &addr(&i2), "/kv/three", "3").unwrap();
    assert!(code == 201 || code == 204);
    let agent2 = env.vm_pid(i2["vm_cid"].as_str().unwrap());
    let inner = descendants(agent2)
        .into_iter()
        .find(|(_, cmd)| cmd.contains("agent"))
        .map(|(p, _)| p)
        .expect("the agent inside the VM");
    let (t, stopped_at) = (Instant::now(), now_ms());
    signal(inner, "STOP");
    assert!(
        wait_until(Duration::from_secs(60), || replaced_and_running(
            &env,
            2,
            &i2["vm_cid"]
        )),
        "instance 2 was not recreated; monitor log:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    let recovered = t.elapsed();
    // Gone, or a zombie nobody reaped yet: either way it no longer runs.
    let state = std::fs::read_to_string(format!("/proc/{inner}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, r)| r.trim().chars().next()))
        .flatten();
    assert!(
        matches!(state, None | Some('Z') | Some('X')),
        "the silent agent was fenced (killed with its VM), its state is {state:?}"
    );
    let back = vm_cid_of(&env, 2);
    assert_eq!(back["ips"], i2["ips"]);
    assert_eq!(back["persistent_disk_cids"], i2["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &addr(&i2), "/kv/three", "").unwrap(),
        (200, "3".to_string())
    );
    let ev = events_after_recreate(&env, &i2);
    let old = i2["vm_cid"].as_str().unwrap();
    let new = back["vm_cid"].as_str().unwrap();
    let late = pos(&ev, "wait", "unresponsive after", "instance");
    let detect = pos(&ev, "detect", "unresponsive", "instance");
    let deleted = pos(&ev, "fence", "deleted", old);
    let gone = pos(&ev, "fence", "confirmed gone", old);
    let created = pos(&ev, "create", "ok", new);
    let attached = pos(&ev, "attach", "ok", &format!("to vm {new}"));
    let done = pos(&ev, "recreate", "ok", "instance");
    assert!(
        late < detect
            && detect < deleted
            && deleted < gone
            && gone < created
            && created < attached
            && attached < done,
        "order: heartbeat missed, unresponsive, fence, confirmed gone, create, attach, done:\n{}",
        serde_json::to_string_pretty(&ev).unwrap()
    );
    assert!(
        ev[pos(&ev, "recreate", "starting", "instance")]["result"]
            .as_str()
            .unwrap()
            .contains("consistent"),
        "a group with a disk is consistent by default"
    );
    eprintln!(
        "case 3 (silent agent): first missed heartbeat after {} ms, unresponsive after {} ms, recovered after {} ms",
        ev[late]["time_ms"].as_i64().unwrap() - stopped_at,
        ev[detect]["time_ms"].as_i64().unwrap() - stopped_at,
        recovered.as_millis()
    );

    // Instance 0 kept its VM through cases 2 and 3; all serve the keys.
    let after = env.instances("quickstart");
    assert_eq!(by_index(&after, 0)["vm_cid"], i0["vm_cid"]);
    for i in &after {
        assert_eq!(i["process_state"], "running", "{i}");
    }
    // The text form of the events names what was seen and done.
    let out = env.bosun(&["-d", "quickstart", "events"]);
    let log = String::from_utf8_lossy(&out.stdout);
    assert!(log.contains("seen: agent unresponsive for"), "{log}");
    assert!(log.contains("did: fence vm"), "{log}");
    drop(mon);
}

#[test]
fn cloud_check_cleans_up_after_a_director_crash_mid_deploy() {
    let env = Env::new(112);
    let three = kv_manifest("quickstart", 8080, "300-30000");
    // Compile once with one instance, so the crash hits instance VMs.
    let one = env.manifest("one.yml", &three.replace("instances: 3", "instances: 1"));
    let out = env.bosun(&["deploy", one.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.vm_dirs(), 1);

    // The director dies right after the CPI created a VM, before recording it.
    let m3 = env.manifest("three.yml", &three);
    let out = env
        .command(&["deploy", m3.to_str().unwrap(), "-n"])
        .env("BOSUN_FAILPOINT", "after-create-vm")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the deploy crashed: {}", text(&out));
    assert!(
        text(&out).contains("failpoint after-create-vm"),
        "{}",
        text(&out)
    );
    let vms = env.vm_dirs();
    assert!(vms >= 2, "at least one VM the state does not know ({vms})");

    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--report", "--json"]);
    assert_eq!(out.status.code(), Some(1), "problems found: {}", text(&out));
    let scan: Value = serde_json::from_slice(&out.stdout).unwrap();
    let problems = scan["problems"].as_array().unwrap();
    assert_eq!(problems.len(), vms - 1, "{scan}");
    for p in problems {
        assert_eq!(p["kind"], "orphan_vm", "{p}");
        assert_eq!(p["resolutions"][0], "delete-vm", "{p}");
    }
    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--auto"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("delete-vm: deleted"), "{}", text(&out));
    assert_eq!(env.vm_dirs(), 1, "orphans removed, the known VM kept");
    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--report"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("no problems found"), "{}", text(&out));

    // Then a deploy converges.
    let out = env.bosun(&["deploy", m3.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    assert_eq!(list.len(), 3);
    assert!(
        list.iter().all(|i| i["process_state"] == "running"),
        "{list:?}"
    );
    assert_eq!(env.vm_dirs(), 3);
    let out = env.bosun(&["deploy", m3.to_str().unwrap(), "-n"]);
    assert!(text(&out).contains("no changes"), "{}", text(&out));

    // A real kill -9 while VMs are being created.
    let m6 = env.manifest("six.yml", &three.replace("instances: 3", "instances: 6"));
    let mut deploy = env
        .command(&["deploy", m6.to_str().unwrap(), "-n"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || env.vm_dirs() > 3),
        "the deploy created VMs"
    );
    let _ = deploy.kill();
    let _ = deploy.wait();
    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--auto"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--report"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = env.bosun(&["deploy", m6.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("quickstart");
    assert_eq!(list.len(), 6);
    assert!(
        list.iter().all(|i| i["process_state"] == "running"),
        "{list:?}"
    );
    assert_eq!(env.vm_dirs(), 6, "no VM left behind");
    let events = env.events("quickstart");
    assert!(
        events
            .iter()
            .any(|e| e["source"] == "cloud-check" && e["action"] == "delete-vm"),
        "cloud-check's work is in the events"
    );

    // A lost VM: reported as missing, recreated by --auto with its IP and disk.
    let lost = by_index(&list, 4);
    let agent = env.vm_pid(lost["vm_cid"].as_str().unwrap());
    let mut all = vec![agent];
    all.extend(descendants(agent).into_iter().map(|(p, _)| p));
    let _ = Command::new("kill")
        .arg("-KILL")
        .args(all.iter().map(|p| p.to_string()))
        .status();
    assert!(wait_until(Duration::from_secs(10), || {
        let out = env.bosun(&["-d", "quickstart", "cloud-check", "--report", "--json"]);
        serde_json::from_slice::<Value>(&out.stdout)
            .is_ok_and(|s| s["problems"][0]["kind"] == "missing_vm")
    }));
    let out = env.bosun(&["-d", "quickstart", "cloud-check", "--auto"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("recreate: recreated"), "{}", text(&out));
    let back = by_index(&env.instances("quickstart"), 4);
    assert_eq!(back["process_state"], "running");
    assert_eq!(back["ips"], lost["ips"]);
    assert_eq!(back["persistent_disk_cids"], lost["persistent_disk_cids"]);
    assert_ne!(back["vm_cid"], lost["vm_cid"]);
}

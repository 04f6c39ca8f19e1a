//! BOSH releases as they are: ERB templates rendered by the system's Ruby
//! with BOSH's template context, monit deciding what runs (a ctl script
//! with a pidfile, bpm's form with limits, an empty monit), spec keys BOSH
//! ignores, and problems reported before any VM changes.

use std::time::Duration;

use crate::support::*;

/// Whether Ruby is here; in CI its absence fails the test.
fn have_ruby() -> bool {
    let found = std::process::Command::new("ruby")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "ruby is required for the ERB e2e tests in CI: apt-get install ruby"
        );
        eprintln!("skipped: no ruby (apt-get install ruby)");
    }
    found
}

fn beacon() -> String {
    repo()
        .join("tests/fixtures/releases/beacon")
        .display()
        .to_string()
}

fn beacon_manifest(port: u32, instances: u32) -> String {
    format!(
        r#"name: e2e
releases:
- name: beacon
  version: latest
  path: {release}
stemcells:
- alias: default
  os: {{os}}
  version: latest
update:
  canaries: 1
  max_in_flight: 2
  canary_watch_time: 1000-20000
  update_watch_time: 1000-20000
instance_groups:
- name: keeper
  instances: {instances}
  azs: [z1]
  vm_type: default
  stemcell: default
  networks:
  - name: default
  jobs:
  - name: keeper
    release: beacon
    properties:
      keeper:
        port: {port}
        tags: [a, b]
  - name: relay
    release: beacon
  - name: banner
    release: beacon
    properties:
      banner:
        text: Authorised use only.
"#,
        release = beacon()
    )
}

fn vm_dir(env: &Env, instance: &serde_json::Value) -> std::path::PathBuf {
    env.state()
        .join("local-cpi/vms")
        .join(instance["vm_cid"].as_str().expect("a VM"))
        .join("vcap")
}

fn pid_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// A host process's pid in its innermost PID namespace.
fn ns_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

fn read_pid(path: &std::path::Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[test]
fn a_bosh_release_deploys_unchanged_and_monit_decides_what_runs() {
    if !have_ruby() {
        return;
    }
    let env = Env::new(158);
    let passwd_before = std::fs::read("/etc/passwd").expect("host /etc/passwd");
    let m = env.manifest("beacon.yml", &beacon_manifest(7000, 2));
    let m = m.to_str().unwrap();
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(
        all.contains("desription"),
        "the unknown spec key is a warning: {all}"
    );

    let list = env.instances("e2e");
    assert_eq!(list.len(), 2, "{list:?}");
    let by = |i: u64| list.iter().find(|x| x["index"] == i).unwrap().clone();
    let ips: Vec<String> = (0..2)
        .map(|i| by(i)["ips"][0].as_str().unwrap().to_string())
        .collect();
    for i in 0..2u64 {
        let inst = by(i);
        assert_eq!(inst["process_state"], "running", "{inst}");
        // The ctl script's process serves the rendered config.
        let addr = format!("{}:7000", ips[i as usize]);
        let (code, body) = http("GET", &addr, "/config.json", "").expect("keeper answers");
        assert_eq!(code, 200, "{body}");
        let cfg: serde_json::Value = serde_json::from_str(&body).expect("rendered JSON");
        assert_eq!(cfg["name"], "keeper");
        assert_eq!(cfg["index"], i);
        assert_eq!(cfg["id"], inst["id"]);
        assert_eq!(cfg["az"], "z1");
        assert_eq!(cfg["bootstrap"], i == 0);
        assert_eq!(cfg["deployment"], "e2e");
        assert_eq!(cfg["address"], ips[i as usize]);
        assert_eq!(cfg["ip"], ips[i as usize]);
        assert_eq!(cfg["network_ip"], ips[i as usize]);
        assert_eq!(cfg["netmask"], "255.255.255.0");
        assert_eq!(cfg["job"], "keeper");
        assert!(
            cfg["release"].as_str().unwrap().starts_with("beacon/"),
            "{cfg}"
        );
        assert_eq!(cfg["port"], 7000);
        assert_eq!(cfg["attr_port"], 7000);
        assert_eq!(cfg["greeting"], "hello");
        assert_eq!(cfg["first_set"], 7000);
        assert_eq!(cfg["tags"], serde_json::json!(["a", "b"]));
        assert_eq!(cfg["peers"], serde_json::json!(ips));
        assert_eq!(cfg["peer_port"], 7000);
        assert_eq!(cfg["leader"], ips[0]);
        assert_eq!(cfg["link_address"], ips[0]);
        assert_eq!(cfg["max_peers"], "unlimited");
        assert_eq!(cfg["archive"], "none");
        assert_eq!(cfg["blank"], serde_json::json!([true, true, true]));
        let (_, peers) = http("GET", &addr, "/peers.txt", "").expect("peers.txt");
        assert_eq!(
            peers,
            format!(
                "# peers of keeper/{i}\n0 keeper/0 {} bootstrap\n1 keeper/1 {}\n",
                ips[0], ips[1]
            )
        );
        let dir = vm_dir(&env, &inst);
        // pre-start used the compiled package.
        assert_eq!(
            std::fs::read_to_string(dir.join("sys/log/keeper-pre-start.txt")).unwrap(),
            format!("stamped: keeper {i} pre-start\n")
        );
        // The monit file was rendered and laid down; nothing unrendered is.
        let monit = std::fs::read_to_string(dir.join("jobs/relay/monit")).unwrap();
        assert!(monit.starts_with("check process relay\n"), "{monit}");
        for job in ["keeper", "relay", "banner"] {
            for e in walkdir(&dir.join("jobs").join(job)) {
                let t = std::fs::read_to_string(&e).unwrap_or_default();
                assert!(!t.contains("<%"), "{} is not rendered: {t}", e.display());
            }
        }
        // bpm's process has its limits and its pre_start hook ran.
        let relay = descendants(env.vm_pid(inst["vm_cid"].as_str().unwrap()))
            .into_iter()
            .find(|(_, cmd)| cmd.contains("/var/vcap/jobs/relay/bin/relay"))
            .expect("the relay process runs");
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", relay.0)).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        assert_eq!(
            line.split_whitespace().collect::<Vec<_>>()[3..5],
            ["2048", "2048"],
            "{line}"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("sys/log/relay-hook.txt")).unwrap(),
            "relay pre_start hook ran\n"
        );
    }
    // The banner job changed its VM's /etc, not the host's.
    assert!(!std::path::Path::new("/etc/beacon-banner").exists());
    assert_eq!(std::fs::read("/etc/passwd").unwrap(), passwd_before);
    let out = env.bosun(&[
        "-d",
        "e2e",
        "ssh",
        "keeper/0",
        "-c",
        "cat /etc/beacon-banner; grep -c '^beacon:' /etc/passwd; id -un vcap; id -gn vcap",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    // `ssh -c` prefixes each line with the instance. The VM has BOSH's vcap
    // user and group (the host need not).
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.split_once(": ").map_or(l, |(_, t)| t).to_string())
        .collect();
    assert_eq!(lines, ["Authorised use only.", "1", "vcap", "vcap"]);

    // kill -9 of the ctl script's process: restarted through the start
    // program. The pidfile holds the pid inside the VM's PID namespace; the
    // host's pid is found among the VM's processes and matched through
    // NSpid.
    let inst = by(1);
    let pidfile = vm_dir(&env, &inst).join("sys/run/keeper/keeper.pid");
    let vm = env.vm_pid(inst["vm_cid"].as_str().unwrap());
    let keeper = || {
        let ns = read_pid(&pidfile)?;
        descendants(vm).into_iter().find_map(|(pid, cmd)| {
            (cmd.contains("http.server") && ns_pid(pid) == Some(ns)).then_some(pid)
        })
    };
    let old = keeper().expect("the pidfile names the keeper's process");
    signal(old, "KILL");
    assert!(
        wait_until(Duration::from_secs(20), || keeper()
            .is_some_and(|p| p != old)),
        "keeper restarted with a new pid"
    );
    let addr = format!("{}:7000", ips[1]);
    assert!(wait_until(Duration::from_secs(10), || http(
        "GET",
        &addr,
        "/config.json",
        ""
    )
    .is_ok_and(|(c, _)| c == 200)));

    // stop runs the stop program: the process is gone, the pidfile too.
    let new = keeper().expect("keeper runs");
    let out = env.bosun(&["-d", "e2e", "stop", "keeper/1", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(10), || !pid_alive(new)));
    assert!(!pidfile.exists(), "ctl stop removed the pidfile");
    let after = env.instances("e2e");
    let stopped = after.iter().find(|x| x["index"] == 1).unwrap();
    assert_eq!(stopped["process_state"], "stopped", "{stopped}");
    let out = env.bosun(&["-d", "e2e", "start", "keeper/1", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(wait_until(Duration::from_secs(10), || http(
        "GET",
        &addr,
        "/config.json",
        ""
    )
    .is_ok_and(|(c, _)| c == 200)));

    // monit switched the relay off: no process, the job still deployed.
    let off = beacon_manifest(7000, 2).replace(
        "  - name: relay\n    release: beacon\n",
        "  - name: relay\n    release: beacon\n    properties: {relay: {disable: true}}\n",
    );
    let m2 = env.manifest("beacon-off.yml", &off);
    let out = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let vm = env.vm_pid(by(0)["vm_cid"].as_str().unwrap());
    assert!(wait_until(Duration::from_secs(10), || !descendants(vm)
        .iter()
        .any(|(_, c)| c.contains("jobs/relay/bin/relay"))));
    assert_eq!(env.instances("e2e")[0]["process_state"], "running");
}

/// Every file under `dir`, recursively.
fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn template_problems_of_every_instance_are_reported_before_any_vm_exists() {
    if !have_ruby() {
        return;
    }
    let env = Env::new(159);
    let m = env.manifest("bad.yml", &beacon_manifest(0, 3));
    for args in [
        vec!["deploy", m.to_str().unwrap(), "--dry-run"],
        vec!["deploy", m.to_str().unwrap(), "-n"],
    ] {
        let out = env.bosun(&args);
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains("3 template problems"), "{err}");
        assert_eq!(
            err.matches("job keeper: template config.json.erb line 22: keeper.port must be between 1 and 65535, got 0")
                .count(),
            3,
            "{err}"
        );
    }
    assert_eq!(env.vm_dirs(), 0, "no VM was created");
}

#[test]
fn a_tera_job_with_erb_tags_is_refused_with_its_file_and_line() {
    let env = Env::new(160);
    let rel = noop_release(&env);
    std::fs::write(
        rel.join("jobs/noop/templates/bpm.yml"),
        "processes:\n- name: sleep\n  executable: /bin/sleep\n  args: ['<%= p(\"x\") %>']\n",
    )
    .unwrap();
    let m = env.manifest(
        "tera.yml",
        &format!(
            "name: e2e\nreleases:\n- name: noop\n  version: latest\n  path: {}\nstemcells:\n- alias: default\n  os: {{os}}\n  version: latest\nupdate: {{canaries: 1, max_in_flight: 1, canary_watch_time: 1000, update_watch_time: 1000}}\ninstance_groups:\n- name: n\n  instances: 1\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  networks: [{{name: default}}]\n  jobs: [{{name: noop, release: noop}}]\n",
            rel.display()
        ),
    );
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "--dry-run"]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("job noop: template bpm.yml line 4") && err.contains("ERB tag"),
        "{err}"
    );
}

#[test]
fn a_bosh_release_deploys_unchanged_on_docker() {
    if !have_ruby() {
        return;
    }
    let Some(stemcell) = crate::docker::stemcell() else {
        return;
    };
    let env = Env::new(161);
    let net = "e2e-beacon";
    let cc = env.path("cc-docker.yml");
    std::fs::write(
        &cc,
        format!(
            "azs:\n- name: z1\n  cpi: docker\nnetworks:\n- name: {net}\n  type: manual\n  subnets:\n  - range: 10.244.161.0/24\n    gateway: 10.244.161.1\n    azs: [z1]\nvm_types:\n- name: default\ncompilation:\n  workers: 1\n  az: z1\n  network: {net}\n"
        ),
    )
    .unwrap();
    let out = env.bosun(&["update-cloud-config", cc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["upload-stemcell", &stemcell]);
    assert!(out.status.success(), "{}", text(&out));
    let manifest =
        beacon_manifest(7000, 2).replace("  - name: default\n", &format!("  - name: {net}\n"));
    let m = env.manifest("beacon-docker.yml", &manifest);
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let list = env.instances("e2e");
    assert_eq!(list.len(), 2);
    for i in &list {
        assert_eq!(i["process_state"], "running", "{i}");
        let ip = i["ips"][0].as_str().unwrap();
        let (code, body) = http("GET", &format!("{ip}:7000"), "/config.json", "").expect("keeper");
        assert_eq!(code, 200, "{body}");
        let cfg: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(cfg["index"], i["index"]);
        assert_eq!(cfg["address"], ip);
        let cid = i["vm_cid"].as_str().unwrap();
        // The banner job changed the container's /etc.
        let banner = crate::docker::docker(&[
            "exec",
            cid,
            "sh",
            "-c",
            "cat /etc/beacon-banner; grep -c '^beacon:' /etc/passwd; id -un vcap; id -gn vcap",
        ]);
        // ... and the stemcell has BOSH's vcap user and group.
        assert_eq!(banner, "Authorised use only.\n1\nvcap\nvcap\n");
        let limits = crate::docker::docker(&[
            "exec",
            cid,
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do if grep -q 'jobs/rela[y]/bin/relay' $p/cmdline 2>/dev/null; then grep 'Max open files' $p/limits; fi; done",
        ]);
        assert!(
            limits.split_whitespace().collect::<Vec<_>>()[3..5] == ["2048", "2048"],
            "{limits}"
        );
    }
    assert!(!std::path::Path::new("/etc/beacon-banner").exists());
    let out = env.bosun(&["-d", "e2e", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_release_tarball_as_bosh_io_serves_it_uploads_and_deploys() {
    if !have_ruby() {
        return;
    }
    let env = Env::new(162);
    // A release of one files-only job, made into a tarball, then given
    // bosh.io's shape: `./`-prefixed members and no `packages` key.
    let dir = env.path("banner-release");
    let fixture = repo().join("tests/fixtures/releases/beacon");
    for f in [
        "spec",
        "monit",
        "templates/banner.txt.erb",
        "templates/pre-start.erb",
    ] {
        let to = dir.join("jobs/banner").join(f);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(fixture.join("jobs/banner").join(f), to).unwrap();
    }
    std::fs::create_dir_all(dir.join("config")).unwrap();
    std::fs::write(dir.join("config/final.yml"), "name: banner\n").unwrap();
    let made = env.path("made.tgz");
    let out = env.bosun(&[
        "create-release",
        dir.to_str().unwrap(),
        "--tarball",
        made.to_str().unwrap(),
        "--version",
        "3",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let unpacked = env.path("unpacked");
    std::fs::create_dir_all(&unpacked).unwrap();
    let tar = |args: &[&str]| {
        let o = std::process::Command::new("tar")
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "tar {args:?}: {}", text(&o));
    };
    tar(&[
        "-xzf",
        made.to_str().unwrap(),
        "-C",
        unpacked.to_str().unwrap(),
    ]);
    let mf = std::fs::read_to_string(unpacked.join("release.MF")).unwrap();
    assert!(mf.contains("sha1: sha256:"), "{mf}");
    let bosh_io: String = mf
        .lines()
        .filter(|l| *l != "packages: []")
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        !bosh_io.contains("packages:\n") && bosh_io != mf,
        "{bosh_io}"
    );
    std::fs::write(unpacked.join("release.MF"), bosh_io).unwrap();
    let served = env.path("banner-3.tgz");
    tar(&[
        "-czf",
        served.to_str().unwrap(),
        "-C",
        unpacked.to_str().unwrap(),
        ".",
    ]);

    let out = env.bosun(&["upload-release", served.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let m = env.manifest(
        "banner.yml",
        "name: e2e\nreleases:\n- {name: banner, version: '3'}\nstemcells:\n- {alias: default, os: '{os}', version: latest}\nupdate: {canaries: 1, max_in_flight: 1, canary_watch_time: 1000-10000, update_watch_time: 1000-10000}\ninstance_groups:\n- name: b\n  instances: 1\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  networks: [{name: default}]\n  jobs:\n  - {name: banner, release: banner, properties: {banner: {text: from a tarball}}}\n",
    );
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["-d", "e2e", "ssh", "b/0", "-c", "cat /etc/beacon-banner"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).ends_with(": from a tarball\n"),
        "{}",
        text(&out)
    );
    assert!(!std::path::Path::new("/etc/beacon-banner").exists());
}

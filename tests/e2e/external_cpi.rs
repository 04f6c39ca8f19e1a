//! The quickstart through an external CPI: `manifests/cloud-config-external.yml`,
//! whose CPI is `bosun cpi --backend docker`, run once per call over BOSH's
//! process protocol. Deploy, data across a recreate, the health monitor and
//! cloud-check, and delete-deployment all go through it. Needs Docker and
//! `BOSUN_TEST_STEMCELL`, as the Docker tests do.

use bosun_cpi::conformance;

use crate::cpi_conformance::{bosun_as_external_cpi, fixture};
use crate::docker::{docker, stemcell};
use crate::support::{http, repo, text, wait_until, Env};

#[tokio::test]
async fn docker_cpi_passes_conformance_through_the_external_protocol() {
    let Some(path) = stemcell() else { return };
    let opened = bosun_director::stemcell::open_stemcell(std::path::Path::new(&path)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("e2e-extc-{}", std::process::id());
    let config = serde_json::json!({"root": dir.path().join("docker-cpi"), "prefix": prefix});
    let cpi = bosun_as_external_cpi("docker", dir.path(), config);
    let result = conformance::run(&cpi, &fixture("10.244.208", opened.spec())).await;
    let label = format!("label=bosun.cpi={prefix}");
    let left = docker(&["ps", "-aq", "--filter", &label])
        + &docker(&["volume", "ls", "-q", "--filter", &label]);
    for net in docker(&["network", "ls", "-q", "--filter", &label]).lines() {
        docker(&["network", "rm", net]);
    }
    if let Err(failures) = result {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
    assert!(left.trim().is_empty(), "left on the engine: {left}");
}

/// Not `quickstart`: the Docker test's deployment of that name runs at the
/// same time and counts its containers by that label.
const DEPLOYMENT: &str = "quickstart-external";

#[test]
fn quickstart_through_an_external_cpi() {
    let Some(stemcell) = stemcell() else { return };
    let env = Env::new(207);
    let prefix = format!("e2e-ext-{}", std::process::id());
    let _swept = Swept(prefix.clone());
    let cc = std::fs::read_to_string(repo().join("manifests/cloud-config-external.yml"))
        .unwrap()
        .replace("prefix: bosun-ext", &format!("prefix: {prefix}"))
        .replace("10.244.8.", "10.244.207.");
    let cc_path = env.manifest("cc-external.yml", &cc);
    let out = env.bosun(&["update-cloud-config", cc_path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["upload-stemcell", &stemcell]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("to the external-docker CPI"),
        "{}",
        text(&out)
    );
    // The config file bosun wrote for the CPI is private.
    let config = env.state().join("external-cpi/external-docker/config.json");
    let mode = std::fs::metadata(&config).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let quickstart = std::fs::read_to_string(repo().join("manifests/quickstart.yml")).unwrap();
    let m = env.manifest(
        "quickstart-external.yml",
        &quickstart
            .replace("../releases/kv", "{release}")
            .replace("name: quickstart\n", &format!("name: {DEPLOYMENT}\n")),
    );
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));

    // Containers of the external CPI's Docker backend, on its own network.
    let list = env.instances(DEPLOYMENT);
    assert_eq!(list.len(), 3);
    for i in &list {
        assert_eq!(i["process_state"], "running", "{i}");
        let cid = i["vm_cid"].as_str().unwrap();
        let ip = docker(&[
            "inspect",
            "-f",
            &format!("{{{{(index .NetworkSettings.Networks \"{prefix}-default\").IPAddress}}}}"),
            cid,
        ]);
        assert_eq!(ip.trim(), i["ips"][0].as_str().unwrap());
    }
    let by_index =
        |list: &[serde_json::Value], i: u64| list.iter().find(|x| x["index"] == i).unwrap().clone();
    let addr = |i: &serde_json::Value| format!("{}:8080", i["ips"][0].as_str().unwrap());
    let (code, _) = http("PUT", &addr(&by_index(&list, 0)), "/kv/through", "external").unwrap();
    assert!(code == 201 || code == 204, "{code}");
    let expect = (200, "external".to_string());
    assert_eq!(
        http("GET", &addr(&by_index(&list, 2)), "/kv/through", "").unwrap(),
        expect
    );

    // Every call went through the protocol, logged per task without keys.
    let out = env.bosun(&["tasks", "--recent", "--json"]);
    let tasks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let deploy = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| {
            t["description"]
                .as_str()
                .unwrap_or("")
                .starts_with("deploy")
        })
        .unwrap_or_else(|| panic!("no deploy task: {tasks}"));
    let id = deploy["id"].to_string();
    let out = env.bosun(&["task", &id, "--cpi"]);
    let cpi_log = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(cpi_log.contains("external-docker create_vm("), "{cpi_log}");
    assert!(!cpi_log.contains("PRIVATE KEY"), "{cpi_log}");

    // A recreate keeps the data: the disk moves to the new container.
    let i1 = by_index(&list, 1);
    let out = env.bosun(&["-d", DEPLOYMENT, "recreate", "kv/1", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let now1 = by_index(&env.instances(DEPLOYMENT), 1);
    assert_ne!(now1["vm_cid"], i1["vm_cid"]);
    assert_eq!(now1["persistent_disk_cids"], i1["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &addr(&now1), "/kv/through", "").unwrap(),
        expect
    );

    // The monitor replaces a container removed behind bosun's back.
    let mon = env.monitor(DEPLOYMENT);
    let i2 = by_index(&env.instances(DEPLOYMENT), 2);
    docker(&["rm", "-f", i2["vm_cid"].as_str().unwrap()]);
    let healed = wait_until(std::time::Duration::from_secs(90), || {
        let i = by_index(&env.instances(DEPLOYMENT), 2);
        i["vm_cid"] != i2["vm_cid"] && !i["vm_cid"].is_null() && i["process_state"] == "running"
    });
    assert!(
        healed,
        "the monitor did not recreate the removed container:\n{}",
        std::fs::read_to_string(&mon.log).unwrap_or_default()
    );
    // Stopped only once it has recorded the end of its repair.
    env.events_after_recreate(DEPLOYMENT, &i2);
    drop(mon);
    let now2 = by_index(&env.instances(DEPLOYMENT), 2);
    assert_eq!(now2["persistent_disk_cids"], i2["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &addr(&now2), "/kv/through", "").unwrap(),
        expect
    );

    // cloud-check finds a removed container and recreates it; it says
    // which orphans it cannot list through the protocol.
    let i0 = by_index(&env.instances(DEPLOYMENT), 0);
    docker(&["rm", "-f", i0["vm_cid"].as_str().unwrap()]);
    let out = env.bosun(&["-d", DEPLOYMENT, "cloud-check", "--report", "--json"]);
    let report = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "problems exit 1: {}", text(&out));
    assert!(report.contains(i0["vm_cid"].as_str().unwrap()), "{report}");
    assert!(
        report.contains("CPI 'external-docker': orphans are found only among"),
        "{report}"
    );
    let out = env.bosun(&["-d", DEPLOYMENT, "cloud-check", "--auto"]);
    assert!(out.status.success(), "{}", text(&out));
    let now0 = by_index(&env.instances(DEPLOYMENT), 0);
    assert_eq!(now0["process_state"], "running", "{now0}");
    assert_eq!(now0["persistent_disk_cids"], i0["persistent_disk_cids"]);
    assert_eq!(
        http("GET", &addr(&now0), "/kv/through", "").unwrap(),
        expect
    );

    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("no changes"),
        "{}",
        text(&out)
    );
    let out = env.bosun(&["-d", DEPLOYMENT, "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let left = docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=bosun.cpi={prefix}"),
    ]);
    assert!(left.trim().is_empty(), "containers left: {left}");
    // Orphaned disks are deleted through the protocol too.
    let out = env.bosun(&["clean-up", "--all", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let vols = docker(&[
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=bosun.cpi={prefix}"),
    ]);
    assert!(vols.trim().is_empty(), "volumes left: {vols}");
}

/// What BOSH's docker CPI does with a stemcell, by hand: `docker import`
/// of its image, a container running `exec env -i /usr/sbin/runsvdir-start`
/// (the CPI's boot entry), the agent env written into it afterwards as a
/// 0640 file. bosun's agent starts from that env, makes it private, and
/// finds a persistent disk in it when a mount request carries no hint.
#[tokio::test]
async fn the_agent_boots_from_the_agent_env_a_bosh_docker_cpi_writes() {
    use bosun_agent::client::AgentClient;
    use bosun_agent::protocol::MountDiskParams;

    let Some(path) = stemcell() else { return };
    let opened = bosun_director::stemcell::open_stemcell(std::path::Path::new(&path)).unwrap();
    assert!(
        opened
            .manifest
            .stemcell_formats
            .iter()
            .any(|f| f == "warden-tar"),
        "{:?}",
        opened.manifest.stemcell_formats
    );
    let tag = format!("bosun-e2e-warden:{}", std::process::id());
    docker(&["import", opened.image_path.to_str().unwrap(), &tag]);
    let name = format!("bosun-e2e-warden-{}", std::process::id());
    let _cleanup = Removed(name.clone(), tag.clone());
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        &tag,
        "bash",
        "-c",
        "mkdir -p /var/vcap/data/sys /var/vcap/store && exec env -i /usr/sbin/runsvdir-start",
    ]);
    let ip = docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])
        .trim()
        .to_string();

    // The agent env, as the docker CPI writes it once the container runs.
    let director = bosun_agent::keys::generate_keypair().unwrap();
    let host = bosun_agent::keys::generate_keypair().unwrap();
    let env = serde_json::json!({
        "agent_id": "warden-agent",
        "vm": {"name": name, "id": name},
        "mbus": "https://mbus:secret@0.0.0.0:6868",
        "ntp": [],
        "networks": {"default": {"type": "manual", "ip": ip, "netmask": "255.255.0.0",
            "gateway": "", "dns": [], "default": ["dns", "gateway"], "mac": "", "preconfigured": true}},
        "disks": {"system": "", "ephemeral": null, "persistent": null},
        "env": {"bosun": {"director_public_key": director.public_openssh,
                          "host_private_key": host.private_openssh}},
    });
    let write_env = |env: &serde_json::Value| {
        let body = env.to_string().into_bytes();
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(body.len() as u64);
        h.set_mode(0o640);
        h.set_cksum();
        tar.append_data(
            &mut h,
            "var/vcap/bosh/warden-cpi-agent-env.json",
            body.as_slice(),
        )
        .unwrap();
        let archive = tar.into_inner().unwrap();
        let mut child = std::process::Command::new("docker")
            .args(["exec", "-i", &name, "tar", "-x", "-f", "-", "-C", "/"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&archive).unwrap();
        assert!(child.wait().unwrap().success());
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    write_env(&env);

    let addr: std::net::SocketAddr = format!("{ip}:{}", bosun_cpi::AGENT_PORT).parse().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let client = loop {
        match AgentClient::connect(
            addr,
            &director,
            &host.public_openssh,
            std::time::Duration::from_secs(2),
        )
        .await
        {
            Ok(c) => break c,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!(
                "the agent did not come up from the agent env: {e}\n{}",
                docker(&["logs", &name])
            ),
        }
    };
    client.ping().await.unwrap();
    let mode = docker(&[
        "exec",
        &name,
        "stat",
        "-c",
        "%a",
        "/var/vcap/bosh/warden-cpi-agent-env.json",
    ]);
    assert_eq!(mode.trim(), "600", "the agent env holds a private key");

    // attach_disk rewrites the env (v1 gives no hint): the agent reads it again.
    let mut env = env;
    env["disks"]["persistent"] = serde_json::json!({"vol-1": "/var/vcap/store"});
    write_env(&env);
    let params = MountDiskParams {
        cid: "vol-1".into(),
        hint: bosun_cpi::DiskHint {
            path: String::new(),
        },
    };
    client.mount_disk(&params).await.unwrap();
    let missing = MountDiskParams {
        cid: "vol-2".into(),
        hint: bosun_cpi::DiskHint {
            path: String::new(),
        },
    };
    let e = client.mount_disk(&missing).await.unwrap_err().to_string();
    assert!(e.contains("list none for it"), "{e}");
}

/// Removes the container and image when the test ends, however it ends.
struct Removed(String, String);

impl Drop for Removed {
    fn drop(&mut self) {
        for args in [vec!["rm", "-f", &self.0], vec!["rmi", "-f", &self.1]] {
            let out = std::process::Command::new("docker").args(&args).output();
            if let Ok(o) = out {
                if !o.status.success() {
                    eprintln!("docker {args:?}: {}", String::from_utf8_lossy(&o.stderr));
                }
            }
        }
    }
}

/// Removes what a CPI prefix left on the engine when the test ends, so a
/// failed run does not break the next one (its network keeps the subnet).
struct Swept(String);

impl Drop for Swept {
    fn drop(&mut self) {
        let label = format!("label=bosun.cpi={}", self.0);
        for (list, remove) in [
            (vec!["ps", "-aq", "--filter", &label], vec!["rm", "-f"]),
            (
                vec!["volume", "ls", "-q", "--filter", &label],
                vec!["volume", "rm", "-f"],
            ),
            (
                vec!["network", "ls", "-q", "--filter", &label],
                vec!["network", "rm"],
            ),
        ] {
            let Ok(out) = std::process::Command::new("docker").args(&list).output() else {
                continue;
            };
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let mut args = remove.clone();
                args.push(id);
                let gone = std::process::Command::new("docker").args(&args).output();
                if let Ok(o) = gone {
                    if !o.status.success() {
                        eprintln!("docker {args:?}: {}", String::from_utf8_lossy(&o.stderr));
                    }
                }
            }
        }
    }
}

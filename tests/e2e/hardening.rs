//! Hostile or careless input and concurrent operators: names that would
//! become paths outside the state, two deployments deployed at once, errand
//! instances under start/stop, compilation workers that never answer.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::*;

#[test]
fn a_deployment_name_never_reaches_outside_the_state() {
    let env = Env::new(150);
    // A file beside the state that a `../` name would reach.
    let precious = env.path("Cargo.lock");
    std::fs::write(&precious, "precious\n").unwrap();
    let abs = env.path("Cargo").display().to_string();
    for name in ["../Cargo", "../../x/Cargo", abs.as_str(), "..", "a b"] {
        let out = env.bosun(&["-d", name, "stop", "-n"]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", text(&out));
        assert!(
            text(&out).contains("is not a valid name"),
            "{name}: {}",
            text(&out)
        );
    }
    // The same through a manifest's `name:`, even with --dry-run.
    let m = env.manifest(
        "evil.yml",
        &kv_manifest("quickstart", 8080, "300-30000").replace("name: quickstart", "name: ../Cargo"),
    );
    for extra in [&["--dry-run"][..], &["-n"][..]] {
        let mut args = vec!["deploy", m.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = env.bosun(&args);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("evil.yml:1: name: deployment name '../Cargo' is not a valid name"),
            "{}",
            text(&out)
        );
    }
    assert_eq!(std::fs::read_to_string(&precious).unwrap(), "precious\n");
    let locks: Vec<_> = std::fs::read_dir(env.state().join("locks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.starts_with('@'))
        .collect();
    assert!(locks.is_empty(), "no deployment lock was taken: {locks:?}");
    assert_eq!(env.vm_dirs(), 0);
}

/// (network, ip) of every instance of `deployment`.
fn ips(env: &Env, deployment: &str) -> BTreeSet<String> {
    env.instances(deployment)
        .iter()
        .flat_map(|i| i["ips"].as_array().cloned().unwrap_or_default())
        .map(|ip| ip.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn two_deployments_deployed_at_once_never_share_an_ip() {
    let env = Env::new(151);
    let body = kv_manifest("quickstart", 8080, "300-30000").replace("instances: 3", "instances: 2");
    let a = env.manifest("a.yml", &body.replace("name: quickstart", "name: alpha"));
    let b = env.manifest(
        "b.yml",
        &body
            .replace("name: quickstart", "name: beta")
            .replace("port: 8080", "port: 8081"),
    );
    // Both plan at the same moment, each with its compilation workers.
    let start = |m: &std::path::Path| {
        env.command(&["deploy", m.to_str().unwrap(), "-n"])
            .env("BOSUN_AGENT_TIMEOUT", "30")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (pa, pb) = (start(&a), start(&b));
    let (oa, ob) = (
        pa.wait_with_output().unwrap(),
        pb.wait_with_output().unwrap(),
    );
    assert!(oa.status.success(), "alpha: {}", text(&oa));
    assert!(ob.status.success(), "beta: {}", text(&ob));
    let (ia, ib) = (ips(&env, "alpha"), ips(&env, "beta"));
    assert_eq!((ia.len(), ib.len()), (2, 2), "{ia:?} {ib:?}");
    assert!(ia.is_disjoint(&ib), "shared IPs: {ia:?} {ib:?}");
    // Every compilation worker was deleted: only the four instances' VMs.
    assert_eq!(env.vm_dirs(), 4);
    for d in ["alpha", "beta"] {
        let list = env.instances(d);
        assert!(
            list.iter().all(|i| i["process_state"] == "running"),
            "{list:?}"
        );
    }
    for d in ["alpha", "beta"] {
        let out = env.bosun(&["-d", d, "delete-deployment", "-n"]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn a_compilation_worker_whose_agent_never_answers_is_deleted() {
    let env = Env::new(152);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env
        .command(&["deploy", m.to_str().unwrap(), "-n"])
        .env("BOSUN_AGENT_TIMEOUT", "0")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("compilation/") && text(&out).contains("did not answer"),
        "{}",
        text(&out)
    );
    assert_eq!(env.vm_dirs(), 0, "no compilation VM left behind");
    // And the deploy converges once agents may answer.
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(env.vm_dirs(), 3);
}

#[test]
fn start_stop_restart_and_recreate_leave_errand_instances_alone() {
    let env = Env::new(153);
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let smoke = repo().join("manifests/ops/smoke-errand.yml");
    let out = env.bosun(&[
        "deploy",
        m.to_str().unwrap(),
        "-o",
        smoke.to_str().unwrap(),
        "-n",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let errand = |env: &Env| -> Value {
        env.instances("quickstart")
            .into_iter()
            .find(|i| i["group"] == "smoke")
            .expect("the errand instance is listed")
    };
    assert!(errand(&env)["vm_cid"].is_null(), "{}", errand(&env));
    for (args, vms) in [
        (&["stop"][..], 3),
        (&["start"][..], 3),
        (&["restart"][..], 3),
        (&["recreate"][..], 3),
        (&["stop", "--hard"][..], 0),
        (&["start"][..], 3),
    ] {
        let mut a = vec!["-d", "quickstart"];
        a.extend_from_slice(args);
        a.push("-n");
        let out = env.bosun(&a);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let e = errand(&env);
        assert!(e["vm_cid"].is_null(), "{args:?} gave the errand a VM: {e}");
        assert_eq!(env.vm_dirs(), vms, "{args:?}");
    }
    // Naming the errand group alone is an error that says why.
    let out = env.bosun(&["-d", "quickstart", "start", "smoke", "-n"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("names only errand instances") && text(&out).contains("run-errand"),
        "{}",
        text(&out)
    );
    // run-errand still gives it a VM, and takes it away again.
    let out = env.bosun(&["-d", "quickstart", "run-errand", "smoke"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(errand(&env)["vm_cid"].is_null());
    assert_eq!(env.vm_dirs(), 3);
}

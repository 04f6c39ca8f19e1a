//! Addons from the runtime-config: jobs placed on matching instance groups
//! at the next deploy, and removed when the rule stops matching.

use crate::support::{kv_manifest, noop_release, text, Env};

fn jobs_running(env: &Env) -> Vec<Vec<String>> {
    let out = env.bosun(&["-d", "quickstart", "instances", "--ps", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|i| {
            assert_eq!(i["process_state"], "running", "{i}");
            i["processes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    format!(
                        "{}/{}",
                        p["job"].as_str().unwrap(),
                        p["name"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .collect()
}

#[test]
fn runtime_config_addons_are_placed_and_removed() {
    let env = Env::new(113);
    let release = noop_release(&env);
    let rc = env.path("runtime.yml");
    std::fs::write(
        &rc,
        format!(
            "releases:\n- name: noop\n  version: latest\n  path: {}\naddons:\n- name: sidecar\n  jobs:\n  - name: noop\n    release: noop\n  include:\n    jobs: [{{name: kv, release: kv}}]\n",
            release.display()
        ),
    )
    .unwrap();
    let out = env.bosun(&["update-runtime-config", rc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let m = env.manifest("m.yml", &kv_manifest("quickstart", 8080, "300-30000"));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    for procs in jobs_running(&env) {
        assert_eq!(procs, ["kv/kv", "noop/sleep"], "addon placed next to kv");
    }

    // Excluded now: the next deploy takes it away again.
    std::fs::write(
        &rc,
        format!(
            "releases:\n- name: noop\n  version: latest\n  path: {}\naddons:\n- name: sidecar\n  jobs:\n  - name: noop\n    release: noop\n  exclude:\n    instance_groups: [kv]\n",
            release.display()
        ),
    )
    .unwrap();
    let out = env.bosun(&["update-runtime-config", rc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    for procs in jobs_running(&env) {
        assert_eq!(procs, ["kv/kv"], "addon removed");
    }

    // A bad runtime-config is refused with its file, path and line.
    std::fs::write(
        &rc,
        "addons:\n- name: x\n  jobs: [{name: noop, release: missing}]\n",
    )
    .unwrap();
    let out = env.bosun(&["update-runtime-config", rc.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("runtime.yml:3: addons[0].jobs[0].release: release 'missing' is not declared in 'releases'"),
        "{}",
        text(&out)
    );
}

//! Broken manifests fail before anything is created, naming file, path and line.

use crate::support::{text, Env};

const GOOD: &str = r#"name: e2e
releases:
- name: kv
  version: latest
  path: {release}
stemcells:
- alias: default
  os: {os}
  version: latest
update:
  canaries: 1
  max_in_flight: 1
  canary_watch_time: 1000
  update_watch_time: 1000
instance_groups:
- name: kv
  instances: 2
  azs: [z1]
  vm_type: default
  stemcell: default
  networks:
  - name: default
    static_ips: [127.104.0.10, 127.104.0.11]
  jobs:
  - name: kv
    release: kv
"#;

fn fails_with(env: &Env, name: &str, body: &str, expected: &[&str]) {
    let m = env.manifest(name, body);
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(!out.status.success(), "{name} should fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for e in expected {
        assert!(err.contains(e), "{name}: expected {e:?} in:\n{err}");
    }
    assert_eq!(env.vm_dirs(), 0, "{name}: nothing may be created");
}

#[test]
fn broken_manifests_fail_before_anything_is_created() {
    let env = Env::new(104);
    fails_with(
        &env,
        "yaml.yml",
        "name: e2e\nreleases:\n  - name: kv\n   version: 1\n",
        &["yaml.yml:4", "invalid YAML"],
    );
    fails_with(
        &env,
        "unknown-key.yml",
        &GOOD.replace("  instances: 2\n", "  instances: 2\n  instnces: 2\n"),
        &[
            "unknown-key.yml:18: instance_groups[0].instnces",
            "did you mean 'instances'",
        ],
    );
    fails_with(
        &env,
        "static-ip.yml",
        &GOOD.replace("127.104.0.11]", "10.1.0.9]"),
        &[
            "static-ip.yml:23: instance_groups[0].networks[0].static_ips[1]",
            "10.1.0.9",
        ],
    );
    fails_with(
        &env,
        "unknown-job.yml",
        &GOOD.replace(
            "  - name: kv\n    release: kv",
            "  - name: kvz\n    release: kv",
        ),
        &[
            "unknown-job.yml:25: instance_groups[0].jobs[0].name",
            "no job 'kvz'",
        ],
    );
    fails_with(
        &env,
        "missing-release.yml",
        &GOOD
            .replace("  path: {release}\n", "")
            .replace("- name: kv\n  version", "- name: other\n  version")
            .replace("release: kv", "release: other"),
        &[
            "missing-release.yml:3: releases[0]",
            "release 'other' version 'latest' is not uploaded",
        ],
    );
    // All at once: three problems in one file are reported together.
    fails_with(
        &env,
        "several.yml",
        &GOOD.replace("127.104.0.11]", "10.1.0.9]").replace(
            "  - name: kv\n    release: kv",
            "  - name: kvz\n    release: kv",
        ),
        &[
            "2 problems found",
            "several.yml:23: instance_groups[0].networks[0].static_ips[1]",
            "several.yml:25: instance_groups[0].jobs[0].name",
        ],
    );
}

#[test]
fn dry_run_prints_the_plan_and_creates_nothing() {
    let env = Env::new(105);
    let m = env.manifest("m.yml", &GOOD.replace("127.104.", "127.105."));
    let out = env.bosun(&["deploy", m.to_str().unwrap(), "--dry-run"]);
    assert!(out.status.success(), "{}", text(&out));
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("compile   kv-common"), "{plan}");
    assert!(
        plan.contains("ip=127.105.0.10") && plan.contains("ip=127.105.0.11"),
        "{plan}"
    );
    assert_eq!(env.vm_dirs(), 0);
    // Staging is its own step, and a dry run only says what it would stage.
    let all = text(&out);
    assert!(all.contains("Would upload release kv/"), "{all}");
    assert!(all.contains("(dry run)"), "{all}");
    let again = env.bosun(&["deploy", m.to_str().unwrap(), "--dry-run"]);
    assert!(
        text(&again).contains("Would upload release kv/"),
        "nothing was uploaded by the first dry run: {}",
        text(&again)
    );
}

#[test]
fn interpolate_and_deploy_take_ops_files_and_variables() {
    let env = Env::new(115);
    let m = env.manifest(
        "m.yml",
        &crate::support::kv_manifest("quickstart", 8080, "300-30000")
            .replace("        port: 8080", "        port: ((port))"),
    );
    let ops = env.path("scale.yml");
    std::fs::write(
        &ops,
        "- type: replace\n  path: /instance_groups/name=kv/instances\n  value: 2\n- type: replace\n  path: /instance_groups/name=kv/env?/bosh/keep\n  value: true\n",
    )
    .unwrap();
    let (m, ops) = (m.to_str().unwrap(), ops.to_str().unwrap());

    let out = env.bosun(&[
        "interpolate",
        m,
        "-o",
        ops,
        "-v",
        "port=9090",
        "--path",
        "/instance_groups/name=kv/instances",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "2\n");
    let out = env.bosun(&["interpolate", m, "-o", ops, "-v", "port=9090"]);
    let yaml = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        yaml.contains("port: 9090") && yaml.contains("keep: true"),
        "{yaml}"
    );
    assert!(
        yaml.find("name: quickstart").unwrap() < yaml.find("instance_groups").unwrap(),
        "key order kept"
    );

    // Errors name the ops file, the operation and the path, with what was there.
    let bad = env.path("bad.yml");
    std::fs::write(
        &bad,
        "- type: remove\n  path: /instance_groups/name=kv/nope\n",
    )
    .unwrap();
    let out = env.bosun(&["interpolate", m, "-o", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("operation [0] in") && err.contains("bad.yml"),
        "{err}"
    );
    assert!(
        err.contains("Expected to find a map key 'nope' for path '/instance_groups/name=kv/nope'"),
        "{err}"
    );
    assert!(err.contains("found map keys:"), "{err}");
    let out = env.bosun(&["interpolate", m, "--var-errs"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("{m}: Expected to find variables:\n  - port")),
        "{}",
        text(&out)
    );

    // deploy takes the same arguments; a missing variable stops it first.
    let out = env.bosun(&["deploy", m, "--dry-run", "-o", ops, "-v", "port=9090"]);
    assert!(out.status.success(), "{}", text(&out));
    let log = String::from_utf8_lossy(&out.stdout);
    assert_eq!(log.matches("  create    kv/").count(), 2, "{log}");
    assert!(
        log.contains("+         port: ((port))"),
        "the diff keeps the placeholder: {log}"
    );
    let out = env.bosun(&["deploy", m, "-n"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains(&format!("{m}: Expected to find variables:\n  - port")),
        "the missing variable and its file: {}",
        text(&out)
    );
    assert_eq!(env.vm_dirs(), 0, "nothing was created");
}

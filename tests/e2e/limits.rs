//! Input limits: manifests that would make bosun allocate without bound are
//! refused before anything is planned or created, naming file, path and line.

use crate::support::{text, Env};

const MANIFEST: &str = r#"name: e2e-limits
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
  jobs:
  - name: kv
    release: kv
"#;

/// `deploy --dry-run` of `body` fails, its stderr containing each of `expected`.
fn dry_run_fails(env: &Env, name: &str, body: &str, extra: &[&str], expected: &[&str]) {
    let m = env.manifest(name, body);
    let mut args = vec!["deploy", m.to_str().expect("utf8"), "--dry-run"];
    args.extend_from_slice(extra);
    let out = env.bosun(&args);
    assert!(!out.status.success(), "{name} should fail: {}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    for e in expected {
        assert!(err.contains(e), "{name}: expected {e:?} in:\n{err}");
    }
    assert_eq!(env.vm_dirs(), 0, "{name}: nothing may be created");
}

#[test]
fn limits_huge_instance_count_is_refused_before_planning() {
    let env = Env::new(130);
    // 127.130.0.0/24: 254 addresses less the gateway and 49 static IPs.
    dry_run_fails(
        &env,
        "huge.yml",
        &MANIFEST.replace("instances: 2", "instances: 10000000"),
        &[],
        &["huge.yml:17: instance_groups[0].instances: 10000000 instances but network 'default' can hold at most 204 dynamic IPs in az z1"],
    );
}

#[test]
fn limits_billion_laughs_is_refused() {
    let env = Env::new(131);
    let mut laughs = "  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n".to_string();
    for i in 1..10 {
        let refs = vec![format!("*a{}", i - 1); 9].join(", ");
        laughs.push_str(&format!("  a{i}: &a{i} [{refs}]\n"));
    }
    let body = format!(
        "{MANIFEST}    properties:\n      kv:\n        laughs:\n{}",
        laughs
            .replace("\n  ", "\n          ")
            .replacen("  ", "          ", 1)
    );
    // Read as written (no ops files, no variables): the manifest reader.
    dry_run_fails(
        &env,
        "laughs.yml",
        &body,
        &[],
        &["laughs.yml:35: instance_groups[0].jobs[0].properties.kv.laughs.a6[0]: aliases expand to more than 1000000 nodes"],
    );
    // With an ops file: the interpolation reader.
    let ops = env.path("ops.yml");
    std::fs::write(&ops, "- {type: replace, path: /name, value: e2e-limits}\n").expect("write ops");
    dry_run_fails(
        &env,
        "laughs.yml",
        &body,
        &["-o", ops.to_str().expect("utf8")],
        &[
            "laughs.yml: invalid YAML: aliases expand to more than 1000000 nodes",
            "at line 35",
        ],
    );
}

#[test]
fn limits_nul_byte_is_refused_with_its_line() {
    let env = Env::new(132);
    dry_run_fails(
        &env,
        "nul.yml",
        &MANIFEST.replace("  azs: [z1]\n", "  azs: [z1]\0\n"),
        &[],
        &["nul.yml:18: the text contains a NUL byte"],
    );
}

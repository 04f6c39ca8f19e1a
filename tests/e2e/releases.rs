//! Releases: deterministic tarballs, upload, compilation failures and the
//! compiled-package cache.

use std::path::Path;

use crate::support::{repo, text, Env};

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn manifest(name: &str, release: &Path, octet: u8) -> String {
    format!(
        "name: {name}\nreleases:\n- name: kv\n  version: latest\n  path: {}\nstemcells:\n- alias: default\n  os: {{os}}\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 2\n  canary_watch_time: 300-30000\n  update_watch_time: 300-30000\ninstance_groups:\n- name: kv\n  instances: 1\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  networks:\n  - name: default\n    static_ips: [127.{octet}.0.{}]\n  jobs:\n  - name: kv\n    release: kv\n",
        release.display(),
        if name == "e2e" { 10 } else { 11 }
    )
}

#[test]
fn create_release_is_deterministic_and_uploads() {
    let env = Env::new(106);
    let a = env.path("a.tgz");
    let b = env.path("b.tgz");
    let kv = repo().join("releases/kv");
    for out in [&a, &b] {
        let o = env.bosun(&[
            "create-release",
            kv.to_str().unwrap(),
            "--tarball",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains("Created release kv/0+dev."));
    }
    assert_eq!(
        std::fs::read(&a).unwrap(),
        std::fs::read(&b).unwrap(),
        "same source, same tarball"
    );
    let o = env.bosun(&["upload-release", a.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Uploaded release kv/0+dev."));
    let o = env.bosun(&["upload-release", kv.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Already uploaded"),
        "{}",
        text(&o)
    );
    let o = env.bosun(&["releases", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["name"], "kv");
}

#[test]
fn compile_failure_names_the_package_and_shows_its_output_then_the_cache_holds() {
    let env = Env::new(107);
    let rel = env.path("kv-release");
    copy_dir(&repo().join("releases/kv"), &rel);
    let packaging = rel.join("packages/kv-common/packaging");
    let good = std::fs::read_to_string(&packaging).unwrap();
    std::fs::write(
        &packaging,
        "echo 'checking the frobnicator'\necho 'frobnicator missing' >&2\nexit 3\n",
    )
    .unwrap();

    let m = env.manifest("m.yml", &manifest("e2e", &rel, 107));
    let o = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("compiling package kv-common"), "{err}");
    assert!(err.contains("frobnicator missing"), "{err}");
    assert_eq!(
        env.vm_dirs(),
        0,
        "compilation VMs are deleted after a failure"
    );

    std::fs::write(&packaging, good).unwrap();
    let o = env.bosun(&["deploy", m.to_str().unwrap(), "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("compiling kv-server"));

    // Another deployment of the same release compiles nothing.
    let m2 = env.manifest("m2.yml", &manifest("e2e2", &rel, 107));
    let o = env.bosun(&["deploy", m2.to_str().unwrap(), "-n"]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains("compiling"), "{out}");
    assert!(out.contains("0 compiled, 1 created"), "{out}");
    let o = env.bosun(&["-d", "e2e2", "delete-deployment", "-n"]);
    assert!(o.status.success(), "{}", text(&o));
}

use std::fs;
use std::path::{Path, PathBuf};

use super::archive::{build_tgz, read_tgz};
use super::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bosh-releases")
}

fn kv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../releases/kv")
}

/// A copy of releases/kv in a temp dir, to modify.
fn kv_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("kv");
    for entry in walkdir::WalkDir::new(kv_dir()) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(kv_dir()).unwrap();
        let to = dest.join(rel);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&to).unwrap();
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
    (tmp, dest)
}

fn fp<'a>(r: &'a Release, pkg: &str) -> &'a str {
    &r.package(pkg).unwrap().fingerprint
}

#[test]
fn every_reference_spec_parses() {
    let mut jobs = Vec::new();
    let mut packages = Vec::new();
    for release in ["os-conf-release", "zookeeper-release"] {
        let root = fixtures().join(release);
        for kind in ["jobs", "packages"] {
            let Ok(dir) = fs::read_dir(root.join(kind)) else {
                continue;
            };
            for entry in dir {
                let spec = entry.unwrap().path().join("spec");
                if !spec.is_file() {
                    continue; // vendored package: spec.lock only
                }
                let text = fs::read_to_string(&spec).unwrap();
                let file = spec.display().to_string();
                if kind == "jobs" {
                    let s = parse_job_spec(&file, &text).unwrap_or_else(|e| panic!("{e}"));
                    assert_eq!(
                        Some(s.name.as_str()),
                        spec.parent().unwrap().file_name().unwrap().to_str()
                    );
                    jobs.push(s);
                } else {
                    packages
                        .push(parse_package_spec(&file, &text).unwrap_or_else(|e| panic!("{e}")));
                }
            }
        }
    }
    assert_eq!(jobs.len(), 22);
    assert_eq!(packages.len(), 2);

    let zk = jobs.iter().find(|j| j.name == "zookeeper").unwrap();
    assert_eq!(zk.packages, vec!["openjdk-8", "zookeeper"]);
    assert_eq!(zk.templates["zoo.cfg.erb"], "config/zoo.cfg");
    assert_eq!(zk.templates.len(), 6);
    assert_eq!(
        zk.properties["client_port"].default,
        Some(serde_json::json!(2181))
    );
    assert_eq!(
        zk.properties["leader_serves"].default,
        Some(serde_json::json!("yes"))
    );
    assert_eq!(
        zk.properties["sync_enabled"].default,
        Some(serde_json::json!(true))
    );
    assert_eq!(zk.properties.len(), 21);
    assert_eq!(zk.consumes.len(), 1);
    assert_eq!(zk.consumes[0].name, "peers");
    assert_eq!(zk.consumes[0].link_type, "zookeeper_peers");
    assert!(!zk.consumes[0].optional);
    let peers = zk.provides.iter().find(|l| l.name == "peers").unwrap();
    assert_eq!(
        peers.properties,
        vec!["client_port", "quorum_port", "leader_election_port"]
    );

    let status = jobs.iter().find(|j| j.name == "status").unwrap();
    assert!(status
        .description
        .as_deref()
        .unwrap()
        .starts_with("Prints Zookeeper"));
    let limits = jobs.iter().find(|j| j.name == "limits").unwrap();
    assert_eq!(
        limits.properties["nofile.soft"].default,
        Some(serde_json::json!(16384))
    );
    let banner = jobs.iter().find(|j| j.name == "login_banner").unwrap();
    assert_eq!(banner.properties["login_banner.text"].default, None);
    let iptables = jobs.iter().find(|j| j.name == "iptables").unwrap();
    assert_eq!(iptables.templates["bin/ctl"], "bin/ctl");
    assert!(iptables.properties["iptables"]
        .example
        .as_ref()
        .unwrap()
        .is_object());

    let smoke = packages.iter().find(|p| p.name == "smoke-tests").unwrap();
    assert_eq!(smoke.dependencies, vec!["golang-1.10-linux"]);
    assert_eq!(smoke.files, vec!["**/*.go", "zk-smoketest/**"]);
}

#[test]
fn spec_errors_name_file_and_line() {
    let e = parse_job_spec("jobs/x/spec", "name: x\ntemplates:\n  a: b\nlogs: {}\n").unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Syntax);
    assert_eq!(e.line, Some(4), "{e}");
    assert!(
        e.to_string()
            .starts_with("jobs/x/spec:4: unknown field `logs`"),
        "{e}"
    );

    let e = parse_job_spec("s", "name: x\ntemplates:\n  ../a: b\n").unwrap_err();
    assert_eq!(e.line, Some(3), "{e}");
    let e = parse_package_spec("p", "name: p\ndependencies: [q, q]\n").unwrap_err();
    assert!(e.to_string().contains("listed twice"), "{e}");
    let e = parse_package_spec("p", "name: p\nfiles: 3\n").unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Syntax);
}

#[test]
fn kv_release_reads_deterministically() {
    let a = read_release_dir(&kv_dir(), None).unwrap();
    let b = read_release_dir(&kv_dir(), None).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.manifest.name, "kv");
    assert!(a.manifest.version.starts_with("0+dev."));
    assert_eq!(a.manifest.version.len(), "0+dev.".len() + 12);

    let job = a.job("kv").unwrap();
    assert_eq!(job.spec.packages, vec!["kv-common", "kv-server"]);
    assert_eq!(job.spec.templates["drain"], "bin/drain");
    assert_eq!(
        job.spec.properties["kv.port"].default,
        Some(serde_json::json!(8080))
    );
    assert_eq!(job.spec.provides[0].properties, vec!["kv.port"]);
    assert_eq!(job.spec.consumes[0].link_type, "kv-peers");
    assert!(job.templates["bpm.yml"].contains("kv-server/bin/kv-server"));

    let order: Vec<&str> = a
        .packages_in_order()
        .iter()
        .map(|p| p.spec.name.as_str())
        .collect();
    assert_eq!(order, vec!["kv-common", "kv-server"]);
    let closure = a.package_closure(&["kv-server".to_string()]).unwrap();
    assert_eq!(closure.len(), 2);
    assert_eq!(closure[0].spec.name, "kv-common");
    let e = a.package_closure(&["nope".to_string()]).unwrap_err();
    assert!(e.to_string().contains("'nope'"), "{e}");

    let server = read_tgz(&a.package("kv-server").unwrap().archive.to_vec().unwrap()).unwrap();
    let names: Vec<&str> = server.keys().map(String::as_str).collect();
    assert_eq!(names, vec!["kv-server/server.py", "packaging"]);
    let job_files = read_tgz(&job.archive.to_vec().unwrap()).unwrap();
    assert!(job_files.contains_key("job.MF"));
    assert!(job_files.contains_key("templates/config.json"));

    let tmp = tempfile::tempdir().unwrap();
    let (t1, t2) = (tmp.path().join("1.tgz"), tmp.path().join("2.tgz"));
    write_tarball(&a, &t1).unwrap();
    write_tarball(&b, &t2).unwrap();
    assert_eq!(fs::read(&t1).unwrap(), fs::read(&t2).unwrap());

    let c = read_release_dir(&kv_dir(), Some("7")).unwrap();
    assert_eq!(c.manifest.version, "7");
}

#[test]
fn fingerprints_follow_content_and_dependencies() {
    let (_tmp, dir) = kv_copy();
    let before = read_release_dir(&dir, None).unwrap();

    // kv-server's source changes: kv-server only.
    fs::write(dir.join("src/kv-server/server.py"), "print('changed')\n").unwrap();
    let r = read_release_dir(&dir, None).unwrap();
    assert_eq!(fp(&r, "kv-common"), fp(&before, "kv-common"));
    assert_ne!(fp(&r, "kv-server"), fp(&before, "kv-server"));
    assert_eq!(r.jobs[0].fingerprint, before.jobs[0].fingerprint);
    assert_ne!(r.manifest.version, before.manifest.version);

    // kv-common changes: kv-common and its dependent kv-server.
    let (_tmp2, dir2) = kv_copy();
    fs::write(dir2.join("src/kv-common/kvstore.py"), "# changed\n").unwrap();
    let r = read_release_dir(&dir2, None).unwrap();
    assert_ne!(fp(&r, "kv-common"), fp(&before, "kv-common"));
    assert_ne!(fp(&r, "kv-server"), fp(&before, "kv-server"));
    assert_eq!(r.jobs[0].fingerprint, before.jobs[0].fingerprint);

    // A template changes: the job only.
    let (_tmp3, dir3) = kv_copy();
    fs::write(
        dir3.join("jobs/kv/templates/drain"),
        "#!/bin/bash\necho 0\n",
    )
    .unwrap();
    let r = read_release_dir(&dir3, None).unwrap();
    assert_ne!(r.jobs[0].fingerprint, before.jobs[0].fingerprint);
    assert_eq!(fp(&r, "kv-server"), fp(&before, "kv-server"));

    // The executable bit counts.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let (_tmp4, dir4) = kv_copy();
        let f = dir4.join("src/kv-common/kvstore.py");
        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
        let r = read_release_dir(&dir4, None).unwrap();
        assert_ne!(fp(&r, "kv-common"), fp(&before, "kv-common"));
    }
}

#[test]
fn globs_blobs_and_exclusions() {
    let (_tmp, dir) = kv_copy();
    fs::create_dir_all(dir.join("src/kv-common/sub/deeper")).unwrap();
    fs::write(dir.join("src/kv-common/sub/deeper/x.py"), "x").unwrap();
    fs::write(dir.join("src/kv-common/sub/skip.py"), "s").unwrap();
    fs::create_dir_all(dir.join("blobs/kv-common")).unwrap();
    fs::write(dir.join("blobs/kv-common/big.tar"), "blob").unwrap();
    fs::write(dir.join("blobs/kv-common/kvstore.py"), "shadowed by src").unwrap();
    fs::write(
        dir.join("packages/kv-common/spec"),
        "name: kv-common\nfiles:\n- kv-common/**/*.py\n- kv-common/*.tar\nexcluded_files:\n- kv-common/sub/skip.py\n",
    )
    .unwrap();
    let r = read_release_dir(&dir, None).unwrap();
    let files = read_tgz(&r.package("kv-common").unwrap().archive.to_vec().unwrap()).unwrap();
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec![
            "kv-common/big.tar",
            "kv-common/kvstore.py",
            "kv-common/sub/deeper/x.py",
            "packaging"
        ]
    );
    assert_ne!(files["kv-common/kvstore.py"].data, b"shadowed by src");
    // `*` does not cross directories.
    fs::write(
        dir.join("packages/kv-common/spec"),
        "name: kv-common\nfiles:\n- kv-common/*.py\n",
    )
    .unwrap();
    let r = read_release_dir(&dir, None).unwrap();
    assert_eq!(
        read_tgz(&r.package("kv-common").unwrap().archive.to_vec().unwrap())
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn clear_errors_for_broken_releases() {
    // Missing dependency.
    let (_tmp, dir) = kv_copy();
    fs::write(
        dir.join("packages/kv-server/spec"),
        "name: kv-server\ndependencies: [kv-common, libfoo]\nfiles: [kv-server/server.py]\n",
    )
    .unwrap();
    let e = read_release_dir(&dir, None).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("kv-server") && msg.contains("libfoo"), "{msg}");
    assert!(msg.contains("packages/kv-server/spec"), "{msg}");
    assert!(msg.contains(&dir.display().to_string()), "{msg}");

    // A glob matching nothing.
    let (_tmp, dir) = kv_copy();
    fs::write(
        dir.join("packages/kv-common/spec"),
        "name: kv-common\nfiles: [kv-common/*.rb]\n",
    )
    .unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(
        msg.contains("kv-common") && msg.contains("'kv-common/*.rb'"),
        "{msg}"
    );

    // A cycle.
    let (_tmp, dir) = kv_copy();
    fs::write(
        dir.join("packages/kv-common/spec"),
        "name: kv-common\ndependencies: [kv-server]\nfiles: [kv-common/kvstore.py]\n",
    )
    .unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(
        msg.contains("cycle") && msg.contains("kv-common -> kv-server -> kv-common"),
        "{msg}"
    );

    // A job using an unknown package; a missing template.
    let (_tmp, dir) = kv_copy();
    let spec = fs::read_to_string(dir.join("jobs/kv/spec")).unwrap();
    fs::write(
        dir.join("jobs/kv/spec"),
        spec.replace("- kv-server\n", "- kv-server\n- jdk\n"),
    )
    .unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(
        msg.contains("'jdk'") && msg.contains("jobs/kv/spec"),
        "{msg}"
    );
    fs::write(dir.join("jobs/kv/spec"), spec).unwrap();
    fs::remove_file(dir.join("jobs/kv/templates/drain")).unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(msg.contains("jobs/kv/templates/drain"), "{msg}");

    // Spec name differs from directory; missing packaging.
    let (_tmp, dir) = kv_copy();
    fs::remove_file(dir.join("packages/kv-common/packaging")).unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(msg.contains("packages/kv-common/packaging"), "{msg}");

    // Vendored packages are refused by name.
    let zk = read_release_dir(&fixtures().join("zookeeper-release"), None).unwrap_err();
    assert!(zk.to_string().contains("spec.lock"), "{zk}");
}

#[test]
fn tarball_round_trips() {
    let r = read_release_dir(&kv_dir(), Some("1.2.3")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("kv-1.2.3.tgz");
    write_tarball(&r, &path).unwrap();
    let back = read_tarball(&path).unwrap();
    assert_eq!(back.manifest, r.manifest);
    assert_eq!(back.jobs, r.jobs);
    assert_eq!(back.packages.len(), r.packages.len());
    for (a, b) in back.packages.iter().zip(&r.packages) {
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_eq!(a.archive, b.archive);
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.spec.name, b.spec.name);
        assert_eq!(a.spec.dependencies, b.spec.dependencies);
    }
    assert_eq!(
        back.package("kv-server").unwrap().spec.files,
        vec!["kv-server/server.py"]
    );
    // read_release picks the reader by looking at the path.
    assert_eq!(read_release(&path, None).unwrap(), back);
    assert_eq!(read_release(&kv_dir(), Some("1.2.3")).unwrap(), r);
    // Writing what was read gives the same bytes.
    let again = tmp.path().join("again.tgz");
    write_tarball(&back, &again).unwrap();
    assert_eq!(fs::read(&again).unwrap(), fs::read(&path).unwrap());
}

#[test]
fn tampered_tarballs_are_rejected() {
    let r = read_release_dir(&kv_dir(), None).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("kv.tgz");
    write_tarball(&r, &path).unwrap();
    let mut files = read_tgz(&fs::read(&path).unwrap()).unwrap();

    // Swap a package archive for a different one: the sha256 no longer matches.
    let mut bad = files.clone();
    let other = bad["packages/kv-common.tgz"].clone();
    bad.insert("packages/kv-server.tgz".into(), other);
    let bad_path = tmp.path().join("bad.tgz");
    fs::write(&bad_path, build_tgz(&bad).unwrap()).unwrap();
    let e = read_tarball(&bad_path).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Integrity);
    assert!(
        e.to_string().contains("packages/kv-server.tgz") && e.to_string().contains("sha256"),
        "{e}"
    );

    // Rewrite the manifest's sha256 to match tampered content: the
    // fingerprint check still catches it.
    let mut pkg = read_tgz(&files["packages/kv-common.tgz"].data).unwrap();
    pkg.get_mut("kv-common/kvstore.py").unwrap().data = b"evil".to_vec();
    let tampered = build_tgz(&pkg).unwrap();
    let mut manifest: ReleaseManifest =
        serde_yaml_ng::from_slice(&files["release.MF"].data).unwrap();
    let entry = manifest
        .packages
        .iter_mut()
        .find(|p| p.name == "kv-common")
        .unwrap();
    entry.sha256 = archive::sha256_hex(&tampered);
    files.get_mut("packages/kv-common.tgz").unwrap().data = tampered;
    files.get_mut("release.MF").unwrap().data =
        serde_yaml_ng::to_string(&manifest).unwrap().into_bytes();
    fs::write(&bad_path, build_tgz(&files).unwrap()).unwrap();
    let e = read_tarball(&bad_path).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Integrity);
    assert!(e.to_string().contains("fingerprint"), "{e}");

    // Not a tarball at all.
    fs::write(&bad_path, b"garbage").unwrap();
    assert!(read_tarball(&bad_path).is_err());
    assert!(read_release(&tmp.path().join("missing"), None).is_err());
}

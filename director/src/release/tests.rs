use std::fs;
use std::path::{Path, PathBuf};

use super::archive::{build_tgz, read_tgz};
use super::*;
use crate::archive_limits::ArchiveLimits;
use crate::test_alloc::peak_growth;

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
    // An unknown key is a warning naming the file and line, as BOSH ignores it.
    let (spec, warnings) =
        parse_job_spec_with_warnings("jobs/x/spec", "name: x\ntemplates:\n  a: b\nlogs: {}\n")
            .unwrap();
    assert_eq!(spec.templates["a"], "b");
    assert_eq!(warnings, vec!["jobs/x/spec:4: unknown key 'logs' ignored"]);
    let e = parse_job_spec("jobs/x/spec", "name: x\ntemplates: [a]\n").unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Syntax);
    assert_eq!(e.line, Some(2), "{e}");

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

    // kv-common changes: kv-common only (a BOSH fingerprint names its
    // dependencies, not their content), but kv-server's dependency key.
    let (_tmp2, dir2) = kv_copy();
    fs::write(dir2.join("src/kv-common/kvstore.py"), "# changed\n").unwrap();
    let r = read_release_dir(&dir2, None).unwrap();
    assert_ne!(fp(&r, "kv-common"), fp(&before, "kv-common"));
    assert_eq!(fp(&r, "kv-server"), fp(&before, "kv-server"));
    assert_ne!(
        r.dependency_key("kv-server").unwrap(),
        before.dependency_key("kv-server").unwrap()
    );
    assert_eq!(
        r.dependency_key("kv-server").unwrap(),
        format!("kv-common:{}", fp(&r, "kv-common"))
    );
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

    // The reference release holds specs only: its vendored packages are
    // read (their missing tarballs are tested in bosh_tests), the first
    // package with a spec lacks its packaging script.
    let zk = read_release_dir(&fixtures().join("zookeeper-release"), None).unwrap_err();
    let msg = zk.to_string();
    assert!(msg.contains("packages/smoke-tests/packaging"), "{msg}");
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

    // Rewrite the manifest's digest to match tampered content: the
    // recomputed fingerprint differs, which is reported (BOSH does not
    // recompute fingerprints; the digest is what is verified).
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
    entry.sha1 = format!("sha256:{}", archive::sha256_hex(&tampered));
    files.get_mut("packages/kv-common.tgz").unwrap().data = tampered;
    files.get_mut("release.MF").unwrap().data =
        serde_yaml_ng::to_string(&manifest).unwrap().into_bytes();
    fs::write(&bad_path, build_tgz(&files).unwrap()).unwrap();
    let read = read_tarball(&bad_path).unwrap();
    assert_eq!(read.warnings.len(), 1, "{:?}", read.warnings);
    assert!(
        read.warnings[0].contains("packages/kv-common.tgz")
            && read.warnings[0].contains("fingerprint"),
        "{:?}",
        read.warnings
    );
    assert!(read_tarball(&path).unwrap().warnings.is_empty());

    // Not a tarball at all.
    fs::write(&bad_path, b"garbage").unwrap();
    assert!(read_tarball(&bad_path).is_err());
    assert!(read_release(&tmp.path().join("missing"), None).is_err());
}

/// A tgz at `path`, streamed from (name, size, content) entries.
fn stream_tgz(path: &Path, entries: Vec<(String, u64, Box<dyn std::io::Read>)>) {
    use std::io::Write;
    let out = std::io::BufWriter::new(fs::File::create(path).unwrap());
    let gz = flate2::GzBuilder::new().write(out, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, size, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        tar.append_data(&mut h, name, content).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
}

fn zeros(n: u64) -> Box<dyn std::io::Read> {
    Box::new(std::io::Read::take(std::io::repeat(0), n))
}

fn sha256_of(mut r: impl std::io::Read) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut r, &mut h).unwrap();
    hex::encode(h.finalize())
}

#[test]
fn a_gzip_of_zeros_past_the_size_limit_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let limits = ArchiveLimits {
        max_size: 1 << 20,
        max_entries: 1000,
    };
    // One entry of 64 MiB: refused from its header, before it is read.
    let bomb = tmp.path().join("bomb.tgz");
    stream_tgz(
        &bomb,
        vec![("packages/p.tgz".into(), 64 << 20, zeros(64 << 20))],
    );
    assert!(fs::metadata(&bomb).unwrap().len() < 1 << 20, "a bomb");
    let e = read_tarball_with_limits(&bomb, &limits, None).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    let msg = e.to_string();
    for part in [
        &format!("release {}: ", bomb.display()),
        "more than 1 MiB (1048576 bytes)",
        "BOSUN_MAX_ARCHIVE_SIZE=4M",
    ] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    // read_release reads tarballs the same way.
    let e = read_release_with_limits(&bomb, None, &limits, None, &LocalOnly).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    // Within the defaults, it is refused at its first bytes: a job or
    // package archive must be gzipped.
    let (e, peak) = peak_growth(|| {
        read_tarball_with_limits(&bomb, &ArchiveLimits::default(), None).unwrap_err()
    });
    assert_eq!(e.kind, ReleaseErrorKind::Invalid, "{e}");
    assert!(
        e.to_string()
            .contains("'packages/p.tgz' is not a gzipped archive"),
        "{e}"
    );
    assert!(peak < 16 << 20, "{peak}");

    // Many entries, each under the limit: refused once they add up to it.
    let many = tmp.path().join("many.tgz");
    let entries = (0..64)
        .map(|i| (format!("junk/{i}"), 64 << 10, zeros(64 << 10)))
        .collect();
    stream_tgz(&many, entries);
    let e = read_tarball_with_limits(&many, &limits, None).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    assert!(e.to_string().contains("BOSUN_MAX_ARCHIVE_SIZE"), "{e}");
}

#[test]
fn a_tar_with_more_entries_than_allowed_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("entries.tgz");
    let entries = (0..300)
        .map(|i| (format!("junk/{i}"), 0, zeros(0)))
        .collect();
    stream_tgz(&path, entries);
    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 100,
    };
    let e = read_tarball_with_limits(&path, &limits, None).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("entries.tgz: has more than 100 entries"),
        "{msg}"
    );
    assert!(msg.contains("BOSUN_MAX_ARCHIVE_ENTRIES=400"), "{msg}");
}

#[test]
fn nested_archives_count_towards_the_limits() {
    let (_tmp, dir) = kv_copy();
    fs::write(dir.join("src/kv-common/big.bin"), vec![0u8; 8 << 20]).unwrap();
    let spec = dir.join("packages/kv-common/spec");
    let text = fs::read_to_string(&spec).unwrap();
    fs::write(&spec, format!("{text}- kv-common/big.bin\n")).unwrap();
    let r = read_release_dir(&dir, Some("1")).unwrap();
    let path = dir.parent().unwrap().join("kv-1.tgz");
    write_tarball(&r, &path).unwrap();
    assert!(fs::metadata(&path).unwrap().len() < 1 << 20);

    // The outer tar is small; kv-common's archive expands past 4 MiB.
    let limits = ArchiveLimits {
        max_size: 4 << 20,
        max_entries: 1000,
    };
    let e = read_tarball_with_limits(&path, &limits, None).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    assert_eq!(e.file, "packages/kv-common.tgz", "{e}");
    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 5,
    };
    let e = read_tarball_with_limits(&path, &limits, None).unwrap_err();
    assert!(e.to_string().contains("more than 5 entries"), "{e}");

    // Within the defaults it reads, identical to the directory.
    let scratch = dir.parent().unwrap().join("scratch");
    let back = read_tarball_with_limits(&path, &ArchiveLimits::default(), Some(&scratch)).unwrap();
    assert_eq!(back.manifest, r.manifest);
    assert_eq!(back.jobs, r.jobs);
    let (a, b) = (
        back.package("kv-common").unwrap(),
        r.package("kv-common").unwrap(),
    );
    assert_eq!((&a.fingerprint, &a.archive), (&b.fingerprint, &b.archive));
    let spooled = a.archive.path().unwrap().to_path_buf();
    assert!(spooled.starts_with(&scratch), "{}", spooled.display());
    drop(back);
    assert!(!spooled.exists(), "removed with the release");
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0);
}

#[test]
fn a_big_tarball_is_streamed_not_held() {
    const BIG: u64 = 256 << 20;
    let tmp = tempfile::tempdir().unwrap();
    // A package archive holding a 256 MiB file.
    let pkg = tmp.path().join("p.tgz");
    let packaging = b"cp -a p/* ${BOSH_INSTALL_TARGET}\n";
    stream_tgz(
        &pkg,
        vec![
            (
                "packaging".into(),
                packaging.len() as u64,
                Box::new(packaging.as_slice()),
            ),
            ("p/big.bin".into(), BIG, zeros(BIG)),
        ],
    );
    let files = BTreeMap::from([
        (
            "p/big.bin".to_string(),
            archive::FileDigest {
                executable: false,
                // Not part of a SHA-256 fingerprint.
                sha1: String::new(),
                sha256: sha256_of(zeros(BIG)),
            },
        ),
        (
            "packaging".to_string(),
            archive::FileDigest::of(packaging, false),
        ),
    ]);
    let fingerprint = archive::package_fingerprint(DigestAlgorithm::Sha256, &files, &[]);
    let manifest = ReleaseManifest {
        name: "big".into(),
        version: "1".into(),
        commit_hash: "unknown".into(),
        uncommitted_changes: false,
        jobs: vec![],
        packages: vec![PackageEntry {
            name: "p".into(),
            version: fingerprint.clone(),
            fingerprint,
            sha1: format!("sha256:{}", sha256_of(fs::File::open(&pkg).unwrap())),
            dependencies: vec![],
        }],
        compiled_packages: vec![],
        license: None,
    };
    let mf = serde_yaml_ng::to_string(&manifest).unwrap().into_bytes();
    // The release: release.MF, the package and 256 MiB of something else.
    let path = tmp.path().join("big.tgz");
    stream_tgz(
        &path,
        vec![
            (
                "release.MF".into(),
                mf.len() as u64,
                Box::new(std::io::Cursor::new(mf)),
            ),
            (
                "packages/p.tgz".into(),
                fs::metadata(&pkg).unwrap().len(),
                Box::new(fs::File::open(&pkg).unwrap()),
            ),
            ("extra/zeros".into(), BIG, zeros(BIG)),
        ],
    );

    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 100,
    };
    let (read, peak) = peak_growth(|| read_tarball_with_limits(&path, &limits, None));
    let r = read.unwrap();
    assert_eq!(r.package("p").unwrap().spec.files, ["p/big.bin"]);
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(
        peak < 16 << 20,
        "reading 512 MiB of expanded content allocated {peak} bytes at its peak"
    );
}

#[test]
fn a_huge_long_name_is_refused_before_it_is_held() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("long-name.tgz");
    // The tar writer stores a path this long in a GNU long-name entry,
    // which the tar reader reads into memory whole.
    let name = "a".repeat(8 << 20);
    stream_tgz(&path, vec![(name, 1, Box::new(b"x".as_slice()))]);
    let (e, peak) = peak_growth(|| {
        read_tarball_with_limits(&path, &ArchiveLimits::default(), None).unwrap_err()
    });
    assert_eq!(e.kind, ReleaseErrorKind::Limit, "{e}");
    assert!(
        e.to_string().contains("long-name.tgz: has an entry header (long name or extended attributes) of more than 1 MiB"),
        "{e}"
    );
    assert!(peak < 4 << 20, "{peak}");
}

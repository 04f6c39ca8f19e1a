//! Tests of the BOSH formats: v2 fingerprints, final builds, vendored
//! packages, final releases by version, bosh.io `release.MF`, lenient specs.

use std::fs;
use std::path::{Path, PathBuf};

use super::archive::{build_tgz, FileEntry};
use super::sha1::sha1_hex;
use super::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/release/testdata/fp-release")
}

/// A copy of the fixture release in a temp dir, to modify.
fn fixture_copy() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dest = tmp.path().join("fp");
    for entry in walkdir::WalkDir::new(fixture()) {
        let entry = entry.unwrap();
        let rel = entry.path().strip_prefix(fixture()).unwrap();
        let to = dest.join(rel);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&to).unwrap();
        } else {
            fs::copy(entry.path(), &to).unwrap();
        }
    }
    (tmp, dest)
}

fn text(s: &str) -> FileEntry {
    FileEntry {
        data: s.as_bytes().to_vec(),
        executable: false,
    }
}

// The expected fingerprints were computed with python3's hashlib over the
// fixture's files, independently of this crate:
//   H("v2" + for each file sorted by path: path + digest + mode
//        + the dependency names sorted and joined by ",")
// digest = sha1 hex, or "sha256:" + sha256 hex; mode "100755" / "100644",
// left out for `packaging` and for license files (which go by base name);
// a job's files are job.MF (its spec), monit and templates/<src>.
#[test]
fn fingerprints_are_the_ones_bosh_computes() {
    let r =
        read_release_dir_with(&fixture(), None, DigestAlgorithm::Sha1, &super::LocalOnly).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let web = r.job("web").unwrap();
    assert_eq!(web.fingerprint, "f4b66f7e558b931abb912220c51a829f76042923");
    assert_eq!(web.version, web.fingerprint);
    let lib = r.package("lib").unwrap();
    assert_eq!(lib.fingerprint, "c56bfbf06c7418a0fa0eba364c636ecd16d77b60");
    let app = r.package("app").unwrap();
    assert_eq!(app.fingerprint, "6369fe9a9bec31c01131312708875e6d80d9cd0d");
    assert_eq!(app.version, app.fingerprint);
    let license = r.license.as_ref().unwrap();
    assert_eq!(
        license.fingerprint,
        "04a6dc07f5a62dbbbc42a078dd8f036ef4ee56b4"
    );

    let r = read_release_dir(&fixture(), None).unwrap();
    assert_eq!(
        r.job("web").unwrap().fingerprint,
        "3b36c3c85b5672204358d1b859bbc9fdc334d743ba4c482091e651de72a155d9"
    );
    assert_eq!(
        r.package("lib").unwrap().fingerprint,
        "e1e0e1fa90e0a65ce61781dbb92b6b8711ae739ef3ce03a4d5fe6a6112579763"
    );
    assert_eq!(
        r.package("app").unwrap().fingerprint,
        "4933e90de22476760660c2ef39e6fa615362ac499ea4bb1aac926626916ceac8"
    );
    let license = r.license.as_ref().unwrap();
    assert_eq!(
        license.fingerprint,
        "be9623209f50581ff8e49218b9103e233540976461a5ba5fb9168a2d574b4dcd"
    );
    // release.MF as BOSH writes it.
    let m = &r.manifest;
    assert_eq!(m.name, "fp");
    let web = r.job("web").unwrap();
    assert_eq!(m.jobs[0].sha1, format!("sha256:{}", web.sha256));
    assert_eq!(m.jobs[0].packages, vec!["app"]);
    assert_eq!(
        m.license.as_ref().unwrap().sha1,
        format!("sha256:{}", license.sha256)
    );
    // The blob came from blobs/.
    let app = archive::read_tgz(&r.package("app").unwrap().archive.to_vec().unwrap()).unwrap();
    assert_eq!(app["app/data.bin"].data, b"BLOBDATA\x01\x02\x03");
    // The job archive: job.MF, monit, templates with their modes.
    let job = archive::read_tgz(&web.archive.to_vec().unwrap()).unwrap();
    let names: Vec<&str> = job.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        vec![
            "job.MF",
            "monit",
            "templates/config.yml.erb",
            "templates/ctl.erb"
        ]
    );
    assert!(job["templates/ctl.erb"].executable);

    // Written and read back: the same fingerprints, no warnings, license kept.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("fp.tgz");
    write_tarball(&r, &path).unwrap();
    let back = read_tarball(&path).unwrap();
    assert!(back.warnings.is_empty(), "{:?}", back.warnings);
    assert_eq!(back.manifest, r.manifest);
    assert_eq!(back.license, r.license);
    let files = archive::read_tgz(&fs::read(&path).unwrap()).unwrap();
    assert!(files.contains_key("license.tgz"));
    let mf = String::from_utf8(files["release.MF"].data.clone()).unwrap();
    assert!(mf.contains("sha1: sha256:"), "{mf}");
}

#[test]
fn vendored_packages_come_from_their_build() {
    let (_tmp, dir) = fixture_copy();
    let dev = read_release_dir(&dir, None).unwrap();
    let lib = dev.package("lib").unwrap().clone();

    // Vendor `lib`: only its spec.lock remains.
    fs::remove_dir_all(dir.join("packages/lib")).unwrap();
    fs::create_dir_all(dir.join("packages/lib")).unwrap();
    fs::write(
        dir.join("packages/lib/spec.lock"),
        format!("name: lib\nfingerprint: {}\n", lib.fingerprint),
    )
    .unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(msg.contains("package 'lib'"), "{msg}");
    assert!(msg.contains(&lib.fingerprint), "{msg}");
    for place in [
        format!(".final_builds/packages/lib/{}.tgz", lib.fingerprint),
        format!(".dev_builds/packages/lib/{}.tgz", lib.fingerprint),
    ] {
        assert!(msg.contains(&place), "{place} in {msg}");
    }

    // Its final build, in the local blobstore.
    fs::write(
        dir.join("config/final.yml"),
        "name: fp\nblobstore:\n  provider: local\n  options:\n    blobstore_path: store\n",
    )
    .unwrap();
    fs::create_dir_all(dir.join(".final_builds/packages/lib")).unwrap();
    fs::write(
        dir.join(".final_builds/packages/lib/index.yml"),
        format!(
            "builds:\n  {fp}:\n    version: \"3\"\n    blobstore_id: blob-lib\n    sha1: sha256:{sha}\nformat-version: \"2\"\n",
            fp = lib.fingerprint,
            sha = lib.sha256
        ),
    )
    .unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(msg.contains("store, object blob-lib (absent)"), "{msg}");
    fs::create_dir_all(dir.join("store")).unwrap();
    fs::write(dir.join("store/blob-lib"), lib.archive.to_vec().unwrap()).unwrap();
    let r = read_release_dir(&dir, None).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let vendored = r.package("lib").unwrap();
    assert_eq!(vendored.fingerprint, lib.fingerprint);
    assert_eq!(vendored.version, "3");
    assert_eq!(vendored.archive, lib.archive);
    assert_eq!(vendored.spec.files, vec!["lib/a.txt", "lib/sub/b.sh"]);
    assert_eq!(
        r.package("app").unwrap().fingerprint,
        dev.package("app").unwrap().fingerprint
    );

    // A tarball that does not match the recorded digest is not taken.
    fs::write(dir.join("store/blob-lib"), b"something else").unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(msg.contains("store, object blob-lib (sha256 is "), "{msg}");
}

#[test]
fn a_final_release_is_read_by_version() {
    let (_tmp, dir) = fixture_copy();
    let dev = read_release_dir(&dir, None).unwrap();
    // Record the dev release as final version 5, tarballs beside the indexes.
    let record = |kind: &str, name: &str, fp: &str, sha256: &str, data: Vec<u8>| {
        let sub = dir.join(".final_builds").join(kind).join(name);
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join("index.yml"),
            format!("builds:\n  {fp}:\n    version: {fp}\n    sha1: sha256:{sha256}\n"),
        )
        .unwrap();
        fs::write(sub.join(format!("{fp}.tgz")), data).unwrap();
    };
    for j in &dev.jobs {
        let data = j.archive.to_vec().unwrap();
        record("jobs", &j.spec.name, &j.fingerprint, &j.sha256, data);
    }
    for p in &dev.packages {
        let data = p.archive.to_vec().unwrap();
        record("packages", &p.spec.name, &p.fingerprint, &p.sha256, data);
    }
    let l = dev.license.as_ref().unwrap();
    let sub = dir.join(".final_builds/license");
    fs::create_dir_all(&sub).unwrap();
    fs::write(
        sub.join("index.yml"),
        format!(
            "builds:\n  {fp}:\n    version: {fp}\n    sha1: sha256:{sha}\n",
            fp = l.fingerprint,
            sha = l.sha256
        ),
    )
    .unwrap();
    fs::write(
        sub.join(format!("{}.tgz", l.fingerprint)),
        l.archive.to_vec().unwrap(),
    )
    .unwrap();
    let mut manifest = dev.manifest.clone();
    manifest.version = "5".into();
    fs::create_dir_all(dir.join("releases/fp")).unwrap();
    fs::write(
        dir.join("releases/fp/fp-5.yml"),
        serde_yaml_ng::to_string(&manifest).unwrap(),
    )
    .unwrap();
    // The source moves on after the final release.
    fs::write(dir.join("src/lib/a.txt"), "changed\n").unwrap();

    let r = read_release_dir(&dir, Some("5")).unwrap();
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert_eq!(r.manifest, manifest);
    assert_eq!(r.jobs, dev.jobs);
    for (a, b) in r.packages.iter().zip(&dev.packages) {
        assert_eq!((&a.fingerprint, &a.archive), (&b.fingerprint, &b.archive));
    }
    assert_eq!(r.license, dev.license);

    // Another version is a dev build of the source as it is now; `lib`,
    // changed, is no recorded build, `app` still is.
    let now = read_release_dir(&dir, Some("6")).unwrap();
    assert_eq!(now.manifest.version, "6");
    assert_ne!(
        now.package("lib").unwrap().fingerprint,
        dev.package("lib").unwrap().fingerprint
    );
    assert_eq!(
        now.package("app").unwrap().version,
        dev.package("app").unwrap().fingerprint
    );

    // A final build's tarball gone: named with its fingerprint.
    let web = dev.job("web").unwrap();
    fs::remove_file(
        dir.join(".final_builds/jobs/web")
            .join(format!("{}.tgz", web.fingerprint)),
    )
    .unwrap();
    let msg = read_release_dir(&dir, Some("5")).unwrap_err().to_string();
    assert!(
        msg.contains("job 'web'") && msg.contains(&web.fingerprint),
        "{msg}"
    );
}

#[test]
fn a_compiled_release_as_bosh_io_serves_it() {
    let job = build_tgz(&BTreeMap::from([
        (
            "job.MF".to_string(),
            text("name: web\ntemplates: {}\npackages: [app]\n"),
        ),
        ("monit".to_string(), text("")),
    ]))
    .unwrap();
    let compiled = build_tgz(&BTreeMap::from([("bin/app".to_string(), text("binary"))])).unwrap();
    let license = build_tgz(&BTreeMap::from([("LICENSE".to_string(), text("MIT"))])).unwrap();
    // Fingerprints from before v2 (they cannot be recomputed; warned about).
    let mf = format!(
        "name: web\nversion: '1.0'\ncommit_hash: abc123\nuncommitted_changes: false\n\
         jobs:\n- name: web\n  version: v1\n  fingerprint: old-web\n  sha1: {job_sha1}\n  packages: [app]\n\
         compiled_packages:\n- name: app\n  version: v1\n  fingerprint: old-app\n  sha1: {app_sha1}\n  stemcell: ubuntu-jammy/1.2\n  dependencies: []\n\
         license:\n  version: v1\n  fingerprint: old-lic\n  sha1: {lic_sha1}\n",
        job_sha1 = sha1_hex(&job),
        app_sha1 = sha1_hex(&compiled),
        lic_sha1 = sha1_hex(&license),
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("web.tgz");
    let members = |mf: &str| {
        BTreeMap::from([
            ("release.MF".to_string(), text(mf)),
            (
                "jobs/web.tgz".to_string(),
                FileEntry {
                    data: job.clone(),
                    executable: false,
                },
            ),
            (
                "compiled_packages/app.tgz".to_string(),
                FileEntry {
                    data: compiled.clone(),
                    executable: false,
                },
            ),
            (
                "license.tgz".to_string(),
                FileEntry {
                    data: license.clone(),
                    executable: false,
                },
            ),
        ])
    };
    fs::write(&path, build_tgz(&members(&mf)).unwrap()).unwrap();
    let r = read_tarball(&path).unwrap();
    assert!(r.packages.is_empty());
    assert_eq!(r.compiled_packages.len(), 1);
    let c = &r.compiled_packages[0];
    assert_eq!(
        (c.name.as_str(), c.stemcell.as_str(), c.fingerprint.as_str()),
        ("app", "ubuntu-jammy/1.2", "old-app")
    );
    assert_eq!(c.archive.to_vec().unwrap(), compiled);
    assert_eq!(r.job("web").unwrap().version, "v1");
    assert_eq!(r.license.as_ref().unwrap().fingerprint, "old-lic");
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(r
        .warnings
        .iter()
        .all(|w| w.contains("not a v2 fingerprint")));

    // Written back in BOSH's layout and read again.
    let again = tmp.path().join("again.tgz");
    write_tarball(&r, &again).unwrap();
    let back = read_tarball(&again).unwrap();
    assert_eq!(back.compiled_packages, r.compiled_packages);
    assert!(back.manifest.compiled_packages[0]
        .sha1
        .starts_with("sha256:"));

    // A wrong SHA-1 is refused.
    let bad = mf.replace(&sha1_hex(&compiled), &sha1_hex(b"other"));
    fs::write(&path, build_tgz(&members(&bad)).unwrap()).unwrap();
    let e = read_tarball(&path).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Integrity);
    assert!(
        e.to_string().contains("compiled_packages/app.tgz") && e.to_string().contains("sha1 is"),
        "{e}"
    );
}

#[test]
fn records_with_the_old_keys_still_load() {
    let sha = "ab".repeat(32);
    let old = format!(
        r#"{{"name":"kv","version":"1","commit_hash":"unknown","uncommitted_changes":false,
        "jobs":[{{"name":"kv","version":"f","fingerprint":"f","sha256":"{sha}","packages":[]}}],
        "packages":[{{"name":"p","version":"g","fingerprint":"g","sha256":"{sha}","dependencies":[]}}]}}"#
    );
    let m: ReleaseManifest = serde_json::from_str(&old).unwrap();
    assert_eq!(m.jobs[0].sha1, format!("sha256:{sha}"));
    assert_eq!(m.packages[0].sha1, format!("sha256:{sha}"));
    assert!(m.license.is_none() && m.compiled_packages.is_empty());
    let json = serde_json::to_string(&m).unwrap();
    assert!(json.contains(r#""sha1":"sha256:"#), "{json}");
    let again: ReleaseManifest = serde_json::from_str(&json).unwrap();
    assert_eq!(again, m);
}

#[test]
fn digests_are_parsed_in_both_forms() {
    let sha1 = "a".repeat(40);
    let sha256 = "B".repeat(64);
    assert_eq!(
        digest::parse(&sha1).unwrap(),
        (DigestAlgorithm::Sha1, sha1.clone())
    );
    assert_eq!(
        digest::parse(&format!("sha256:{sha256}")).unwrap(),
        (DigestAlgorithm::Sha256, sha256.to_lowercase())
    );
    assert_eq!(
        digest::parse(&format!("{sha1};sha256:{sha256}")).unwrap().0,
        DigestAlgorithm::Sha256
    );
    assert!(digest::parse("abc").is_err());
    assert!(digest::parse(&format!("md5:{sha1}")).is_err());
}

#[test]
fn template_engine_is_parsed() {
    let spec = parse_job_spec("jobs/x/spec", "name: x\n").unwrap();
    assert_eq!(spec.template_engine, TemplateEngine::Erb);
    let spec = parse_job_spec("jobs/x/spec", "name: x\ntemplate_engine: tera\n").unwrap();
    assert_eq!(spec.template_engine, TemplateEngine::Tera);
    let e = parse_job_spec("jobs/x/spec", "name: x\ntemplate_engine: jinja\n").unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Invalid);
    assert_eq!(e.line, Some(2));
    let msg = e.to_string();
    assert!(msg.starts_with("jobs/x/spec:2: "), "{msg}");
    assert!(
        msg.contains("'jinja'") && msg.contains("erb, tera"),
        "{msg}"
    );
}

#[test]
fn unknown_spec_keys_are_warnings_naming_file_and_line() {
    let (_tmp, dir) = fixture_copy();
    let spec = fs::read_to_string(dir.join("jobs/web/spec")).unwrap();
    fs::write(
        dir.join("jobs/web/spec"),
        format!("{spec}    type: integer\nlogs: {{}}\n"),
    )
    .unwrap();
    let pkg = fs::read_to_string(dir.join("packages/lib/spec")).unwrap();
    fs::write(
        dir.join("packages/lib/spec"),
        format!("{pkg}no_compression: true\nstemcell: x\n"),
    )
    .unwrap();
    let r = read_release_dir(&dir, None).unwrap();
    assert_eq!(
        r.warnings,
        vec![
            "packages/lib/spec:6: unknown key 'stemcell' ignored",
            "jobs/web/spec:13: unknown key 'logs' ignored",
            "jobs/web/spec:12: unknown key 'properties.web.port.type' ignored",
        ],
        "{:?}",
        r.warnings
    );
    // Names stay strict.
    fs::write(dir.join("packages/lib/spec"), "name: ../lib\n").unwrap();
    assert!(read_release_dir(&dir, None).is_err());
}

#[test]
fn blobs_are_checked_against_blobs_yml() {
    let (_tmp, dir) = fixture_copy();
    fs::write(dir.join("blobs/app/data.bin"), b"tampered").unwrap();
    let e = read_release_dir(&dir, None).unwrap_err();
    assert_eq!(e.kind, ReleaseErrorKind::Integrity);
    assert!(e.to_string().contains("blobs/app/data.bin"), "{e}");
    fs::remove_file(dir.join("blobs/app/data.bin")).unwrap();
    let msg = read_release_dir(&dir, None).unwrap_err().to_string();
    assert!(
        msg.contains("blob 'app/data.bin'") && msg.contains("sync-blobs"),
        "{msg}"
    );
}

#[test]
fn a_dev_build_takes_the_version_of_a_recorded_build() {
    let (_tmp, dir) = fixture_copy();
    let index = |kind: &str, name: &str, fp: &str, version: &str| {
        let sub = dir.join(kind).join("packages").join(name);
        fs::create_dir_all(&sub).unwrap();
        fs::write(
            sub.join("index.yml"),
            format!(
                "builds:\n  {fp}:\n    version: {version}\n    blobstore_id: x\n    sha1: {}\n",
                "0".repeat(40)
            ),
        )
        .unwrap();
    };
    // app's SHA-256 fingerprint is final build 7; lib's SHA-1 fingerprint
    // (see fingerprints_are_the_ones_bosh_computes) a dev build.
    index(
        ".final_builds",
        "app",
        "4933e90de22476760660c2ef39e6fa615362ac499ea4bb1aac926626916ceac8",
        "7",
    );
    index(
        ".dev_builds",
        "lib",
        "c56bfbf06c7418a0fa0eba364c636ecd16d77b60",
        "c56bfbf06c7418a0fa0eba364c636ecd16d77b60",
    );
    let r = read_release_dir(&dir, None).unwrap();
    let app = r.package("app").unwrap();
    assert_eq!(app.version, "7");
    let entry = r
        .manifest
        .packages
        .iter()
        .find(|p| p.name == "app")
        .unwrap();
    assert_eq!(entry.version, "7");
    let lib = r.package("lib").unwrap();
    assert_eq!(lib.fingerprint, "c56bfbf06c7418a0fa0eba364c636ecd16d77b60");
    assert_eq!(lib.version, lib.fingerprint);
    // The web job has no recorded build: its SHA-256 fingerprint is its version.
    let web = r.job("web").unwrap();
    assert_eq!(web.version, web.fingerprint);
    assert_eq!(web.fingerprint.len(), 64);
}

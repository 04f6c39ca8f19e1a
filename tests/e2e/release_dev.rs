//! Release authoring from the command line: blobs (add-blob, upload-blobs,
//! sync-blobs, blobs) and final releases (create-release --final), then
//! uploading a final version.

use std::path::Path;

use crate::support::{text, Env};

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}

/// A tiny release whose package takes a blob, its blobstore beside it.
fn tiny_release(root: &Path) -> std::path::PathBuf {
    let dir = root.join("tiny-release");
    write(
        &dir,
        "config/final.yml",
        "---\nfinal_name: tiny\nblobstore:\n  provider: local\n  options:\n    blobstore_path: ../tiny-blobstore\n",
    );
    write(
        &dir,
        "jobs/hello/spec",
        "---\nname: hello\ntemplates:\n  run.erb: bin/run\npackages: [greeting]\n",
    );
    write(&dir, "jobs/hello/monit", "");
    write(
        &dir,
        "jobs/hello/templates/run.erb",
        "#!/bin/sh\necho hello\n",
    );
    write(
        &dir,
        "packages/greeting/spec",
        "---\nname: greeting\nfiles:\n- greeting/*\n- vendor/words.txt\n",
    );
    write(
        &dir,
        "packages/greeting/packaging",
        "cp -r greeting vendor ${BOSH_INSTALL_TARGET}/\n",
    );
    write(&dir, "src/greeting/text.txt", "hello\n");
    write(&dir, "LICENSE", "be nice\n");
    dir
}

fn run(env: &Env, args: &[&str]) -> String {
    let o = env.bosun(args);
    assert!(o.status.success(), "bosun {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn blobs_and_final_releases_round_trip_and_upload() {
    let env = Env::new(203);
    let dir = tiny_release(env.dir.path());
    let d = dir.to_str().expect("utf8");
    let words = env.path("words.txt");
    std::fs::write(&words, "alpha beta\n").expect("write blob source");

    // add-blob: copied and recorded, not uploaded.
    let out = run(
        &env,
        &[
            "add-blob",
            words.to_str().expect("utf8"),
            "vendor/words.txt",
            d,
        ],
    );
    assert!(
        out.contains("Added blob 'vendor/words.txt' (11 bytes, sha256:"),
        "{out}"
    );
    assert_eq!(read(&dir.join("blobs/vendor/words.txt")), "alpha beta\n");
    let blobs_yml = read(&dir.join("config/blobs.yml"));
    assert!(blobs_yml.contains("vendor/words.txt:"), "{blobs_yml}");
    assert!(!blobs_yml.contains("object_id"), "{blobs_yml}");
    let listed = run(&env, &["blobs", d]);
    assert!(
        listed.contains("vendor/words.txt") && listed.contains("(not uploaded)"),
        "{listed}"
    );

    // A path that leaves blobs/ is refused.
    let o = env.bosun(&[
        "add-blob",
        words.to_str().expect("utf8"),
        "../escape.txt",
        d,
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("'..'"), "{}", text(&o));
    assert!(!env.dir.path().join("escape.txt").exists());

    // upload-blobs: into the local blobstore, object_id recorded.
    let out = run(&env, &["upload-blobs", d]);
    assert!(out.contains("Uploaded 1 blobs"), "{out}");
    assert!(read(&dir.join("config/blobs.yml")).contains("object_id:"));
    let listed: serde_json::Value =
        serde_json::from_str(&run(&env, &["--json", "blobs", d])).expect("json");
    let id = listed[0]["object_id"]
        .as_str()
        .expect("uploaded")
        .to_string();
    assert!(env.path("tiny-blobstore").join(&id).is_file());

    // Without blobs/ the release cannot be built; sync-blobs brings it back.
    std::fs::remove_dir_all(dir.join("blobs")).expect("rm blobs");
    let o = env.bosun(&[
        "create-release",
        d,
        "--tarball",
        env.path("x.tgz").to_str().expect("utf8"),
    ]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("vendor/words.txt"), "{}", text(&o));
    let out = run(&env, &["sync-blobs", d]);
    assert!(out.contains("Fetched blob 'vendor/words.txt'"), "{out}");
    assert_eq!(read(&dir.join("blobs/vendor/words.txt")), "alpha beta\n");

    // The first final release: version 1, every build new.
    let tarball = env.path("tiny-1.tgz");
    let out = run(
        &env,
        &[
            "create-release",
            "--final",
            "--tarball",
            tarball.to_str().expect("utf8"),
            d,
        ],
    );
    assert!(out.contains("Created final release tiny/1"), "{out}");
    assert!(out.contains("Added final build of job hello"), "{out}");
    assert!(tarball.is_file());
    assert!(dir.join("releases/tiny/tiny-1.yml").is_file());
    let indexes = [
        ".final_builds/jobs/hello/index.yml",
        ".final_builds/packages/greeting/index.yml",
        ".final_builds/license/index.yml",
    ];
    let before: Vec<String> = indexes.iter().map(|i| read(&dir.join(i))).collect();
    for i in &before {
        assert!(
            i.contains("blobstore_id:") && i.contains("sha1: sha256:"),
            "{i}"
        );
    }

    // Again: version 2, the unchanged builds reused, their indexes untouched.
    let out = run(&env, &["create-release", "--final", d]);
    assert!(out.contains("Created final release tiny/2"), "{out}");
    assert!(!out.contains("Added final build"), "{out}");
    let after: Vec<String> = indexes.iter().map(|i| read(&dir.join(i))).collect();
    assert_eq!(before, after);
    let rindex = read(&dir.join("releases/tiny/index.yml"));
    assert!(
        rindex.contains("version: '1'") || rindex.contains("version: \"1\""),
        "{rindex}"
    );
    assert!(
        rindex.contains("version: '2'") || rindex.contains("version: \"2\""),
        "{rindex}"
    );

    // An existing version is refused.
    let o = env.bosun(&["create-release", "--final", "--version", "2", d]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("version '2' already exists"),
        "{}",
        text(&o)
    );

    // The final release uploads by version, and is the tarball's release.
    let out = run(&env, &["upload-release", d, "--version", "1"]);
    assert!(out.contains("Uploaded release tiny/1"), "{out}");
    let out = run(&env, &["upload-release", tarball.to_str().expect("utf8")]);
    assert!(out.contains("Already uploaded: release tiny/1"), "{out}");
}

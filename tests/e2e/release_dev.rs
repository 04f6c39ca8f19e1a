//! Release authoring from the command line: blobs (add-blob, upload-blobs,
//! sync-blobs, blobs) and final releases (create-release --final), then
//! uploading a final version; with the release's blobstore a local
//! directory and an S3 bucket (moto_server's S3, started by scripts/test).

use std::path::Path;

use crate::support::{http_with, text, Env};

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, content).expect("write");
}

/// A tiny release whose package takes a blob, its blobstore beside it.
fn tiny_release(root: &Path) -> std::path::PathBuf {
    tiny_release_with(
        root,
        "---\nfinal_name: tiny\nblobstore:\n  provider: local\n  options:\n    blobstore_path: ../tiny-blobstore\n",
    )
}

/// The tiny release with `final_yml` as its `config/final.yml`.
fn tiny_release_with(root: &Path, final_yml: &str) -> std::path::PathBuf {
    let dir = root.join("tiny-release");
    write(&dir, "config/final.yml", final_yml);
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

/// One unsigned-but-accepted S3 call to moto (path style); status and body.
fn s3(endpoint: &str, method: &str, path: &str) -> (u16, String) {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let auth = [(
        "Authorization",
        "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0",
    )];
    http_with(method, addr, path, &auth, "").expect("moto answers")
}

#[test]
fn an_s3_release_blobstore_keeps_blobs_and_final_builds() {
    let Some(endpoint) = crate::aws::endpoint() else {
        return;
    };
    let env = Env::new(204);
    let bucket = format!("bosun-release-{}", std::process::id());
    let (code, body) = s3(&endpoint, "PUT", &format!("/{bucket}"));
    assert_eq!(code, 200, "creating the bucket: {body}");
    let port = endpoint
        .rsplit(':')
        .next()
        .expect("port")
        .trim_end_matches('/');
    let dir = tiny_release_with(
        env.dir.path(),
        &format!(
            "---\nfinal_name: tiny\nblobstore:\n  provider: s3\n  options:\n    bucket_name: {bucket}\n    host: 127.0.0.1\n    port: {port}\n    use_ssl: false\n    region: us-east-1\n"
        ),
    );
    // Credentials live in private.yml, as BOSH keeps them.
    let secret = "s3cr3t-never-printed";
    write(
        &dir,
        "config/private.yml",
        &format!("---\nblobstore:\n  options:\n    access_key_id: test\n    secret_access_key: {secret}\n"),
    );
    let d = dir.to_str().expect("utf8");
    let words = env.path("words.txt");
    std::fs::write(&words, "alpha beta\n").expect("write blob source");
    let mut printed = String::new();
    let mut ok = |args: &[&str]| {
        let out = run(&env, args);
        printed.push_str(&out);
        out
    };
    ok(&[
        "add-blob",
        words.to_str().expect("utf8"),
        "vendor/words.txt",
        d,
    ]);

    // upload-blobs puts the blob into the bucket under its new id.
    let out = ok(&["upload-blobs", d]);
    assert!(out.contains("Uploaded 1 blobs"), "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "blobs", d])).expect("json");
    let id = listed[0]["object_id"]
        .as_str()
        .expect("uploaded")
        .to_string();
    let (code, body) = s3(&endpoint, "GET", &format!("/{bucket}/{id}"));
    assert_eq!(
        (code, body.as_str()),
        (200, "alpha beta\n"),
        "the object in the bucket"
    );

    // sync-blobs fetches it back from the bucket.
    std::fs::remove_dir_all(dir.join("blobs")).expect("rm blobs");
    let out = ok(&["sync-blobs", d]);
    assert!(out.contains("Fetched blob 'vendor/words.txt'"), "{out}");
    assert_eq!(read(&dir.join("blobs/vendor/words.txt")), "alpha beta\n");

    // A final release: its builds go into the bucket, not the directory.
    let out = ok(&["create-release", "--final", d]);
    assert!(out.contains("Created final release tiny/1"), "{out}");
    let index = read(&dir.join(".final_builds/jobs/hello/index.yml"));
    let job_id = index
        .lines()
        .find_map(|l| l.trim().strip_prefix("blobstore_id: "))
        .expect("a blobstore id")
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    let (code, _) = s3(&endpoint, "HEAD", &format!("/{bucket}/{job_id}"));
    assert_eq!(code, 200, "the job's final build is in the bucket");
    let local_tarballs: Vec<_> = walk(&dir.join(".final_builds"))
        .into_iter()
        .filter(|p| !p.ends_with("index.yml"))
        .collect();
    assert!(local_tarballs.is_empty(), "{local_tarballs:?}");

    // Uploading the final version fetches every build from the bucket.
    let out = ok(&["upload-release", d, "--version", "1"]);
    assert!(out.contains("Uploaded release tiny/1"), "{out}");
    assert!(
        !printed.contains(secret),
        "a credential was printed: {printed}"
    );

    // A build the bucket lost: an error naming the job, its fingerprint
    // and the bucket it looked in.
    let (code, body) = s3(&endpoint, "DELETE", &format!("/{bucket}/{job_id}"));
    assert_eq!(code, 204, "deleting the object: {body}");
    let o = env.bosun(&["create-release", d, "--version", "1"]);
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains("job 'hello'"), "{said}");
    assert!(said.contains(&format!("s3 bucket '{bucket}'")), "{said}");
    assert!(
        said.contains(&format!("object {job_id} (absent)")),
        "{said}"
    );
    assert!(!said.contains(secret), "{said}");

    // Without credentials: a public object is read anonymously, a private
    // one is refused by the endpoint, and uploads are refused at once.
    std::fs::remove_file(dir.join("config/private.yml")).expect("rm private.yml");
    std::fs::remove_dir_all(dir.join("blobs")).expect("rm blobs");
    let o = env.bosun(&["sync-blobs", d]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("the endpoint answered HTTP 403"),
        "{}",
        text(&o)
    );
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let public = [
        ("x-amz-acl", "public-read"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0",
        ),
    ];
    let (code, body) =
        http_with("PUT", addr, &format!("/{bucket}/{id}?acl"), &public, "").expect("moto answers");
    assert_eq!(code, 200, "making the blob public: {body}");
    let out = run(&env, &["sync-blobs", d]);
    assert!(out.contains("Fetched blob 'vendor/words.txt'"), "{out}");
    assert_eq!(read(&dir.join("blobs/vendor/words.txt")), "alpha beta\n");
    let other = env.path("other.txt");
    std::fs::write(&other, "gamma\n").expect("write");
    run(
        &env,
        &[
            "add-blob",
            other.to_str().expect("utf8"),
            "vendor/other.txt",
            d,
        ],
    );
    let o = env.bosun(&["upload-blobs", d]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("needs credentials"), "{}", text(&o));
}

/// Every file under `root`.
fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

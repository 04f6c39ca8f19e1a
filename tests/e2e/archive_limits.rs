//! Archive limits: a release or stemcell tarball that expands past
//! BOSUN_MAX_ARCHIVE_SIZE / BOSUN_MAX_ARCHIVE_ENTRIES is refused with a
//! message that says how to raise the limit, and nothing is recorded.

use std::io::{Read, Write};
use std::path::Path;
use std::process::Output;

use crate::support::{repo, text, Env};

/// A tgz at `path`, streamed from (name, size, content) entries.
fn stream_tgz(path: &Path, entries: Vec<(String, u64, Box<dyn Read>)>) {
    let out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
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

fn zeros(n: u64) -> Box<dyn Read> {
    Box::new(std::io::repeat(0).take(n))
}

fn with_env(env: &Env, vars: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = env.command(args);
    for (k, v) in vars {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Files left in the state's scratch directory (`tmp`).
fn scratch_left(env: &Env) -> usize {
    std::fs::read_dir(env.state().join("tmp")).map_or(0, |d| d.count())
}

fn blob_count(env: &Env) -> usize {
    blobs(&env.state()).len()
}

/// Regular files under `dir` named like a sha256 (blobs).
fn blobs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(blobs(&p));
        } else {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn upload_release_refuses_a_bomb_within_the_configured_limits() {
    let env = Env::new(135);
    let bomb = env.path("bomb.tgz");
    stream_tgz(
        &bomb,
        vec![("packages/bomb.tgz".into(), 256 << 20, zeros(256 << 20))],
    );
    assert!(std::fs::metadata(&bomb).unwrap().len() < 2 << 20, "a bomb");
    let blobs_before = blob_count(&env);

    let o = with_env(
        &env,
        &[("BOSUN_MAX_ARCHIVE_SIZE", "16M")],
        &["upload-release", bomb.to_str().unwrap()],
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for part in [
        bomb.to_str().unwrap(),
        "more than 16 MiB",
        "raise the limit with BOSUN_MAX_ARCHIVE_SIZE (e.g. BOSUN_MAX_ARCHIVE_SIZE=64M)",
    ] {
        assert!(out.contains(part), "{part} in {out}");
    }
    let o = env.bosun(&["releases", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list, serde_json::json!([]), "nothing recorded");
    assert_eq!(blob_count(&env), blobs_before, "no blobs stored");
    assert_eq!(scratch_left(&env), 0, "temporary copies removed");

    // A bad setting is an error, not ignored.
    let o = with_env(
        &env,
        &[("BOSUN_MAX_ARCHIVE_SIZE", "lots")],
        &["upload-release", bomb.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).contains("BOSUN_MAX_ARCHIVE_SIZE=\"lots\""),
        "{}",
        text(&o)
    );
}

#[test]
fn a_real_release_uploads_within_small_limits_but_not_past_its_entry_count() {
    let env = Env::new(136);
    let tgz = env.path("kv.tgz");
    let kv = repo().join("releases/kv");
    let o = env.bosun(&[
        "create-release",
        kv.to_str().unwrap(),
        "--tarball",
        tgz.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let blobs_before = blob_count(&env);
    let o = with_env(
        &env,
        &[("BOSUN_MAX_ARCHIVE_ENTRIES", "3")],
        &["upload-release", tgz.to_str().unwrap()],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("has more than 3 entries")
            && text(&o).contains("BOSUN_MAX_ARCHIVE_ENTRIES=12"),
        "{}",
        text(&o)
    );

    let o = with_env(
        &env,
        &[
            ("BOSUN_MAX_ARCHIVE_SIZE", "1M"),
            ("BOSUN_MAX_ARCHIVE_ENTRIES", "100"),
        ],
        &["upload-release", tgz.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("Uploaded release kv/0+dev."),
        "{}",
        text(&o)
    );
    // Its job and package archives went from temporary files into the blob
    // store whole: two jobs and two packages, each named by its sha256.
    assert_eq!(blob_count(&env), blobs_before + 4);
    assert!(
        env.state().join("tmp").is_dir(),
        "copied through the state's tmp"
    );
    assert_eq!(scratch_left(&env), 0, "temporary copies removed");
    for blob in blobs(&env.state()) {
        let data = std::fs::read(&blob).unwrap();
        let name = blob.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            bosun_agent::blobs::sha256_hex(&data),
            name,
            "{}",
            blob.display()
        );
    }
}

#[test]
fn upload_stemcell_refuses_a_bomb_within_the_configured_limits() {
    let env = Env::new(137);
    let o = env.bosun(&["stemcells", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let before: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();

    let bomb = env.path("stemcell-bomb.tgz");
    let mf = b"name: bomb\nversion: '1'\noperating_system: debian-bookworm\nsha256: '00'\nstemcell_formats: [docker-rootfs]\n";
    stream_tgz(
        &bomb,
        vec![
            (
                "stemcell.MF".into(),
                mf.len() as u64,
                Box::new(mf.as_slice()),
            ),
            ("image".into(), 256 << 20, zeros(256 << 20)),
        ],
    );
    let o = with_env(
        &env,
        &[("BOSUN_MAX_ARCHIVE_SIZE", "16M")],
        &["upload-stemcell", bomb.to_str().unwrap()],
    );
    let out = text(&o);
    assert!(!o.status.success(), "{out}");
    for part in [
        bomb.to_str().unwrap(),
        "more than 16 MiB",
        "BOSUN_MAX_ARCHIVE_SIZE=64M",
    ] {
        assert!(out.contains(part), "{part} in {out}");
    }
    let o = env.bosun(&["stemcells", "--json"]);
    let after: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(after, before, "nothing recorded");
}

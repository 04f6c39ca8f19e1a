use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;

use super::*;

fn gz_tar(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
    let gz = GzBuilder::new().write(Vec::new(), Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (path, kind, mode, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(*mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        match kind {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                h.set_size(0);
                let target = std::str::from_utf8(data).unwrap();
                tar.append_link(&mut h, path, target).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, *data).unwrap();
            }
        }
    }
    tar.into_inner().unwrap().finish().unwrap()
}

/// Entries of a gzipped tar: path -> (kind, mode, uid, data or link target).
fn list(path: &Path) -> BTreeMap<String, (tar::EntryType, u32, u64, Vec<u8>)> {
    let mut archive = tar::Archive::new(GzDecoder::new(File::open(path).unwrap()));
    let mut out = BTreeMap::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        let h = e.header().clone();
        let mut data = Vec::new();
        match h.entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => {
                data = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes()
                    .to_vec()
            }
            _ => {
                e.read_to_end(&mut data).unwrap();
            }
        }
        let prev = out.insert(
            name.clone(),
            (h.entry_type(), h.mode().unwrap(), h.uid().unwrap(), data),
        );
        assert!(prev.is_none(), "{name} twice");
    }
    out
}

fn manifest_for(image: &[u8]) -> StemcellManifest {
    StemcellManifest {
        name: "bosun-docker-debian-bookworm".into(),
        version: "1.20240101000000".into(),
        operating_system: "debian-bookworm".into(),
        sha256: hex::encode(Sha256::digest(image)),
        stemcell_formats: vec!["docker-rootfs".into()],
        cloud_properties: serde_json::json!({"foo": "bar"}),
        api_version: 2,
    }
}

fn write_synthetic(dir: &Path, manifest: Option<&StemcellManifest>, image: &[u8]) -> PathBuf {
    let mf = manifest.map(|m| serde_yaml_ng::to_string(m).unwrap());
    let mut entries: Vec<(&str, tar::EntryType, u32, &[u8])> = Vec::new();
    if let Some(mf) = &mf {
        entries.push(("stemcell.MF", tar::EntryType::Regular, 0o644, mf.as_bytes()));
    }
    entries.push(("./image", tar::EntryType::Regular, 0o644, image));
    entries.push((
        "stemcell_dpkg_l.txt",
        tar::EntryType::Regular,
        0o644,
        b"ignored",
    ));
    let path = dir.join("stemcell.tgz");
    fs::write(&path, gz_tar(&entries)).unwrap();
    path
}

#[test]
fn open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let image = b"a tiny fake image".as_slice();
    let manifest = manifest_for(image);
    let path = write_synthetic(dir.path(), Some(&manifest), image);
    let opened = open_stemcell(&path).unwrap();
    assert_eq!(opened.manifest, manifest);
    assert_eq!(fs::read(&opened.image_path).unwrap(), image);
    let spec = opened.spec();
    assert_eq!(spec.name, "bosun-docker-debian-bookworm");
    assert_eq!(spec.os, "debian-bookworm");
    assert_eq!(spec.version, "1.20240101000000");
    assert_eq!(
        spec.image_path.as_deref(),
        Some(opened.image_path.as_path())
    );
    assert_eq!(spec.cloud_properties, serde_json::json!({"foo": "bar"}));
    // The image lives as long as the OpenedStemcell.
    let image_path = opened.image_path.clone();
    drop(opened);
    assert!(!image_path.exists());

    // write_stemcell_tarball round-trips too.
    let img = dir.path().join("img");
    fs::write(&img, image).unwrap();
    let out = dir.path().join("sub/written.tgz");
    fs::create_dir_all(out.parent().unwrap()).unwrap();
    write_stemcell_tarball(&out, &manifest, &img).unwrap();
    let again = open_stemcell(&out).unwrap();
    assert_eq!(again.manifest, manifest);
    let names: Vec<String> = list(&out).into_keys().collect();
    assert_eq!(names, ["image", "stemcell.MF"]);
}

#[test]
fn open_rejects_sha_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let mut manifest = manifest_for(b"the real image");
    manifest.sha256 = hex::encode(Sha256::digest(b"another image"));
    let path = write_synthetic(dir.path(), Some(&manifest), b"the real image");
    let err = open_stemcell(&path).unwrap_err();
    assert!(matches!(err, StemcellError::ShaMismatch { .. }), "{err}");
    assert!(err.to_string().contains("stemcell.tgz"), "{err}");
}

#[test]
fn open_rejects_missing_manifest_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_synthetic(dir.path(), None, b"image");
    let err = open_stemcell(&path).unwrap_err();
    assert!(err.to_string().contains("no stemcell.MF"), "{err}");

    let garbage = dir.path().join("garbage.tgz");
    fs::write(&garbage, b"\x1f\x8bnot really gzip").unwrap();
    let err = open_stemcell(&garbage).unwrap_err();
    assert!(matches!(err, StemcellError::Invalid { .. }), "{err}");

    let err = open_stemcell(&dir.path().join("absent.tgz")).unwrap_err();
    assert!(err.to_string().starts_with("opening stemcell"), "{err}");

    let bad_mf = dir.path().join("bad-mf");
    fs::create_dir(&bad_mf).unwrap();
    let path = bad_mf.join("s.tgz");
    fs::write(
        &path,
        gz_tar(&[
            ("stemcell.MF", tar::EntryType::Regular, 0o644, b"name: x\n"),
            ("image", tar::EntryType::Regular, 0o644, b"i"),
        ]),
    )
    .unwrap();
    let err = open_stemcell(&path).unwrap_err();
    assert!(
        err.to_string().contains("stemcell.MF: missing field"),
        "{err}"
    );
}

#[test]
fn unsupported_os_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let opts = BuildOptions::new("ubuntu-jammy", dir.path().join("out.tgz"), "/bin/true");
    let err = build_stemcell(&opts, &mut |_| {}).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported operating system 'ubuntu-jammy' (supported: debian-bookworm)"
    );
    assert!(!dir.path().join("out.tgz").exists());
}

#[test]
fn bad_options_are_rejected_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = BuildOptions::new("debian-bookworm", dir.path().join("out.tgz"), "/bin/true");
    opts.include = vec!["vim --evil".into()];
    let err = build_stemcell(&opts, &mut |_| {}).unwrap_err();
    assert!(
        err.to_string().contains("not a Debian package name"),
        "{err}"
    );

    opts.include = vec![];
    opts.version = Some("1 2".into());
    assert!(matches!(
        build_stemcell(&opts, &mut |_| {}),
        Err(StemcellError::InvalidOption(_))
    ));

    opts.version = None;
    opts.agent_binary = dir.path().join("no-such-bosun");
    let err = build_stemcell(&opts, &mut |_| {}).unwrap_err();
    assert!(err.to_string().starts_with("reading agent binary"), "{err}");
}

#[test]
fn cache_path_ignores_package_order_but_not_mirror() {
    let cache = Path::new("/cache");
    let a = base_cache_path(
        cache,
        "debian-bookworm",
        DEFAULT_MIRROR,
        &["b".into(), "a".into()],
    );
    let b = base_cache_path(
        cache,
        "debian-bookworm",
        DEFAULT_MIRROR,
        &["a".into(), "b".into(), "a".into()],
    );
    let c = base_cache_path(
        cache,
        "debian-bookworm",
        "http://mirror.example/debian",
        &["a".into(), "b".into()],
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert!(a.starts_with(cache));
    let name = a.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("base-debian-bookworm-") && name.ends_with(".tar.gz"),
        "{name}"
    );
    assert_eq!(
        base_packages(&["make".into(), "python3".into()]).unwrap(),
        ["ca-certificates", "iproute2", "make", "procps", "python3"]
    );
}

#[test]
fn default_version_is_utc_timestamp() {
    assert_eq!(default_version(UNIX_EPOCH), "1.19700101000000");
    let t = UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
    assert_eq!(default_version(t), "1.20231114221320");
    let leap = UNIX_EPOCH + std::time::Duration::from_secs(951_827_696); // 2000-02-29T12:34:56Z
    assert_eq!(default_version(leap), "1.20000229123456");
}

#[test]
fn build_from_cached_base() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    fs::create_dir(&cache).unwrap();
    let include = vec!["make".to_string()];
    let packages = base_packages(&include).unwrap();
    let base = base_cache_path(&cache, "debian-bookworm", DEFAULT_MIRROR, &packages);
    let long = format!("usr/share/{}/deep.txt", "long-directory-name".repeat(8));
    fs::write(
        &base,
        gz_tar(&[
            ("./", tar::EntryType::Directory, 0o755, b""),
            ("./bin", tar::EntryType::Directory, 0o755, b""),
            ("./bin/sh", tar::EntryType::Regular, 0o755, b"#!fake shell"),
            ("./bin/dash", tar::EntryType::Link, 0o755, b"./bin/sh"),
            ("./usr/bin/passwd", tar::EntryType::Regular, 0o4755, b"suid"),
            (
                "./etc/alternatives/sh",
                tar::EntryType::Symlink,
                0o777,
                b"/bin/sh",
            ),
            (&long, tar::EntryType::Regular, 0o644, b"deep"),
            (
                "./etc/passwd",
                tar::EntryType::Regular,
                0o644,
                b"root:x:0:0:root:/root:/bin/bash\n",
            ),
            (
                "./etc/group",
                tar::EntryType::Regular,
                0o644,
                b"root:x:0:\n",
            ),
            ("./dev/null", tar::EntryType::Char, 0o666, b""),
            ("./var/lib/apt/lists", tar::EntryType::Directory, 0o755, b""),
            (
                "./var/lib/apt/lists/deb_Packages",
                tar::EntryType::Regular,
                0o644,
                b"x",
            ),
            (
                "./var/cache/apt/pkgcache.bin",
                tar::EntryType::Regular,
                0o644,
                b"x",
            ),
            (
                "./var/lib/dpkg/status",
                tar::EntryType::Regular,
                0o644,
                b"dpkg",
            ),
        ]),
    )
    .unwrap();

    let agent = dir.path().join("bosun");
    fs::write(&agent, b"#!/bin/sh\necho bosun 0.0.0\n").unwrap();
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o700)).unwrap();
    let mut opts = BuildOptions::new(
        "debian-bookworm",
        dir.path().join("out/stemcell.tgz"),
        &agent,
    );
    opts.include = include;
    opts.cache_dir = Some(cache.clone());
    let mut lines = Vec::new();
    let manifest = build_stemcell(&opts, &mut |l| lines.push(l.to_string())).unwrap();
    assert!(
        lines[0].starts_with("using cached base rootfs"),
        "{lines:?}"
    );

    assert_eq!(manifest.name, "bosun-docker-debian-bookworm");
    assert_eq!(manifest.operating_system, "debian-bookworm");
    assert_eq!(
        manifest.stemcell_formats,
        ["docker-rootfs", "warden-tar", "general-tar"]
    );
    assert_eq!(manifest.api_version, 2);
    assert_eq!(manifest.cloud_properties, serde_json::json!({}));
    let v = manifest.version.strip_prefix("1.").unwrap();
    assert!(
        v.len() == 14 && v.chars().all(|c| c.is_ascii_digit()),
        "{}",
        manifest.version
    );

    let opened = open_stemcell(&opts.out).unwrap();
    assert_eq!(opened.manifest, manifest);
    let out_mode = fs::metadata(&opts.out).unwrap().permissions().mode();
    assert_eq!(out_mode & 0o777, 0o644);
    let image = list(&opened.image_path);
    let (kind, mode, uid, data) = &image["var/vcap/bosh/bin/bosun"];
    assert_eq!((*kind, *mode, *uid), (tar::EntryType::Regular, 0o755, 0));
    assert_eq!(data, &fs::read(&agent).unwrap());
    for d in [
        "var/vcap/data",
        "var/vcap/store",
        "var/vcap/sys/log",
        "var/vcap/sys/run",
        "var/vcap/jobs",
        "var/vcap/packages",
    ] {
        assert_eq!(image[d].0, tar::EntryType::Directory, "{d}");
    }
    let identity = String::from_utf8(image["etc/bosun-stemcell"].3.clone()).unwrap();
    assert!(
        identity.contains(&format!("version: {}", manifest.version)),
        "{identity}"
    );
    assert_eq!(image["usr/bin/passwd"].1, 0o4755);
    // The boot entry of BOSH's warden and docker CPIs starts bosun's agent.
    let (kind, mode, _, boot) = &image["usr/sbin/runsvdir-start"];
    assert_eq!((*kind, *mode), (tar::EntryType::Regular, 0o755));
    let boot = String::from_utf8_lossy(boot);
    assert!(
        boot.starts_with("#!/bin/sh\n")
            && boot.contains("exec /var/vcap/bosh/bin/bosun agent --settings /var/vcap/bosh/warden-cpi-agent-env.json"),
        "{boot}"
    );
    assert_eq!(image["warden-cpi-dev"].0, tar::EntryType::Directory);
    // BOSH's vcap user and group, after the base's own entries.
    assert_eq!(
        String::from_utf8_lossy(&image["etc/passwd"].3),
        "root:x:0:0:root:/root:/bin/bash\nvcap:x:1000:1000:BOSH System User:/home/vcap:/bin/bash\n"
    );
    assert_eq!(
        String::from_utf8_lossy(&image["etc/group"].3),
        "root:x:0:\nvcap:x:1000:\n"
    );
    assert_eq!(image["etc/passwd"].1, 0o644);
    assert_eq!(image["bin/dash"].0, tar::EntryType::Link);
    assert_eq!(image["bin/dash"].3, b"bin/sh");
    assert_eq!(image["etc/alternatives/sh"].3, b"/bin/sh");
    assert_eq!(image[long.as_str()].3, b"deep");
    assert_eq!(image["var/lib/apt/lists"].0, tar::EntryType::Directory);
    assert!(!image.contains_key("var/lib/apt/lists/deb_Packages"));
    assert!(!image.contains_key("var/cache/apt/pkgcache.bin"));
    assert!(!image.contains_key("dev/null"));
    assert!(image.contains_key("var/lib/dpkg/status"));

    // No work directories left behind; the given version is used.
    let leftovers: Vec<_> = fs::read_dir(dir.path().join("out")).unwrap().collect();
    assert_eq!(leftovers.len(), 1);
    opts.version = Some("7.1".into());
    assert_eq!(build_stemcell(&opts, &mut |_| {}).unwrap().version, "7.1");
}

#[test]
fn pack_dir_keeps_owners_modes_and_hard_links() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("usr/bin")).unwrap();
    fs::write(root.join("usr/bin/perl"), b"perl").unwrap();
    fs::hard_link(root.join("usr/bin/perl"), root.join("usr/bin/perl5")).unwrap();
    fs::set_permissions(root.join("usr/bin/perl"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("perl", root.join("usr/bin/p")).unwrap();
    let out = dir.path().join("base.tar.gz");
    let skipped = rootfs::pack_dir(&root, File::create(&out).unwrap()).unwrap();
    assert_eq!(skipped, 0);
    let entries = list(&out);
    assert_eq!(entries["usr/bin/perl"].1, 0o755);
    assert_eq!(entries["usr/bin/perl5"].0, tar::EntryType::Link);
    assert_eq!(entries["usr/bin/perl5"].3, b"usr/bin/perl");
    assert_eq!(entries["usr/bin/p"].0, tar::EntryType::Symlink);
}

/// A real build with debootstrap (root, network, ~1 min), then
/// `docker import` of the image and `bosun --version` inside it.
/// `BOSUN_STEMCELL_TEST_DIR` (default /tmp/bosun-stemcell-real) holds the
/// cache and output; `BOSUN_AGENT_BINARY` (default target/debug/bosun).
#[test]
#[ignore]
fn real_build_imports_into_docker() {
    let base = std::env::var_os("BOSUN_STEMCELL_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/bosun-stemcell-real"));
    let agent = std::env::var_os("BOSUN_AGENT_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/bosun"));
    let mut opts = BuildOptions::new("debian-bookworm", base.join("stemcell.tgz"), &agent);
    opts.cache_dir = Some(base.join("cache"));
    for round in ["first", "second (cached)"] {
        let t = Instant::now();
        let m = build_stemcell(&opts, &mut |l| eprintln!("  {l}")).unwrap();
        eprintln!(
            "{round} build: {:.1}s, {} {}",
            t.elapsed().as_secs_f64(),
            m.name,
            m.version
        );
    }
    let opened = open_stemcell(&opts.out).unwrap();
    eprintln!(
        "stemcell {} bytes, image {} bytes",
        fs::metadata(&opts.out).unwrap().len(),
        fs::metadata(&opened.image_path).unwrap().len()
    );
    let tag = format!("bosun-stemcell-test:{}", opened.manifest.version);
    let docker = |args: &[&str]| {
        let out = std::process::Command::new("docker")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let image = opened.image_path.to_string_lossy().into_owned();
    let (ok, out) = docker(&["import", &image, &tag]);
    assert!(ok, "docker import: {out}");
    let (ok, out) = docker(&["run", "--rm", &tag, "/var/vcap/bosh/bin/bosun", "--version"]);
    let (ok2, py) = docker(&["run", "--rm", &tag, "python3", "-c", "print('py ok')"]);
    docker(&["rmi", &tag]);
    assert!(
        ok && out.starts_with("bosun "),
        "bosun --version in the image: {out}"
    );
    assert!(ok2 && py.contains("py ok"), "python3 in the image: {py}");
    eprintln!("inside the image: {}", out.trim());
}

/// A tgz at `path`, streamed from (name, size, content) entries.
fn stream_tgz(path: &Path, entries: Vec<(String, u64, Box<dyn Read>)>) {
    let out = io::BufWriter::new(File::create(path).unwrap());
    let gz = GzBuilder::new().write(out, Compression::fast());
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
    Box::new(io::repeat(0).take(n))
}

/// A stemcell whose image is `image_size` zeros, plus `extra` entries.
fn zeros_stemcell(
    path: &Path,
    image_size: u64,
    extra: Vec<(String, u64, Box<dyn Read>)>,
) -> StemcellManifest {
    let mut hasher = Sha256::new();
    io::copy(&mut zeros(image_size), &mut hasher).unwrap();
    let mut manifest = manifest_for(b"");
    manifest.sha256 = hex::encode(hasher.finalize());
    let mf = serde_yaml_ng::to_string(&manifest).unwrap().into_bytes();
    let mut entries: Vec<(String, u64, Box<dyn Read>)> = vec![
        (
            "stemcell.MF".into(),
            mf.len() as u64,
            Box::new(io::Cursor::new(mf)),
        ),
        ("image".into(), image_size, zeros(image_size)),
    ];
    entries.extend(extra);
    stream_tgz(path, entries);
    manifest
}

#[test]
fn a_stemcell_expanding_past_the_size_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let limits = ArchiveLimits {
        max_size: 1 << 20,
        max_entries: 1000,
    };
    let bomb = dir.path().join("bomb.tgz");
    zeros_stemcell(&bomb, 64 << 20, vec![]);
    assert!(fs::metadata(&bomb).unwrap().len() < 1 << 20, "a bomb");
    let err = open_stemcell_with_limits(&bomb, &limits, None).unwrap_err();
    assert!(matches!(err, StemcellError::Limit { .. }), "{err}");
    let msg = err.to_string();
    for part in [
        &format!("{}: expands to more than 1 MiB", bomb.display()),
        "BOSUN_MAX_ARCHIVE_SIZE=4M",
    ] {
        assert!(msg.contains(part), "{part} in {msg}");
    }

    // Entries that are skipped count too, and the meter stops the stream
    // even when no single entry is too big.
    let skipped = dir.path().join("skipped.tgz");
    let extra = (0..64)
        .map(|i| (format!("junk/{i}"), 64 << 10, zeros(64 << 10)))
        .collect();
    zeros_stemcell(&skipped, 1024, extra);
    let err = open_stemcell_with_limits(&skipped, &limits, None).unwrap_err();
    assert!(matches!(err, StemcellError::Limit { .. }), "{err}");
}

#[test]
fn a_stemcell_with_more_entries_than_allowed_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("entries.tgz");
    let extra = (0..300)
        .map(|i| (format!("junk/{i}"), 0, zeros(0)))
        .collect();
    zeros_stemcell(&path, 1024, extra);
    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 100,
    };
    let err = open_stemcell_with_limits(&path, &limits, None).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("entries.tgz: has more than 100 entries"),
        "{msg}"
    );
    assert!(msg.contains("BOSUN_MAX_ARCHIVE_ENTRIES=400"), "{msg}");
    // Within the limits, the same stemcell opens.
    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 400,
    };
    open_stemcell_with_limits(&path, &limits, None).unwrap();
}

#[test]
fn a_big_stemcell_is_streamed_not_held() {
    const BIG: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tgz");
    let manifest = zeros_stemcell(&path, BIG, vec![("extra".into(), BIG, zeros(BIG))]);
    let limits = ArchiveLimits {
        max_size: 1 << 30,
        max_entries: 100,
    };
    let (opened, peak) = crate::test_alloc::peak_growth(|| {
        open_stemcell_with_limits(&path, &limits, Some(&dir.path().join("scratch")))
    });
    let opened = opened.unwrap();
    assert_eq!(opened.manifest, manifest);
    assert_eq!(fs::metadata(&opened.image_path).unwrap().len(), BIG);
    assert!(opened.image_path.starts_with(dir.path().join("scratch")));
    drop(opened);
    assert_eq!(fs::read_dir(dir.path().join("scratch")).unwrap().count(), 0);
    assert!(
        peak < 16 << 20,
        "opening 512 MiB of expanded content allocated {peak} bytes at its peak"
    );
}

#[test]
fn a_stemcell_with_a_huge_long_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long-name.tgz");
    zeros_stemcell(&path, 1024, vec![("a".repeat(8 << 20), 0, zeros(0))]);
    let err = open_stemcell_with_limits(&path, &ArchiveLimits::default(), None).unwrap_err();
    assert!(matches!(err, StemcellError::Limit { .. }), "{err}");
    assert!(err.to_string().contains("entry header"), "{err}");
}

//! The root filesystem: running debootstrap, packing its result into the
//! (cached) base tarball, and streaming that base into the stemcell image
//! with bosun's additions. Nothing here is ever unpacked on the host: the
//! base tarball's entries are copied header by header, so owners, modes and
//! hard links survive and no root is needed once the base is cached.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use flate2::{Compression, GzBuilder};

use super::{io_err, maybe_gunzip, HashingWriter, StemcellError, AGENT_PATH};

/// Directories added to every image (besides the agent's).
const VCAP_DIRS: &[&str] = &[
    "var/vcap",
    "var/vcap/bosh",
    "var/vcap/bosh/bin",
    "var/vcap/data",
    "var/vcap/jobs",
    "var/vcap/packages",
    "var/vcap/store",
    "var/vcap/sys",
    "var/vcap/sys/log",
    "var/vcap/sys/run",
];

/// The stemcell identity file.
const IDENTITY_PATH: &str = "etc/bosun-stemcell";
/// The boot entry BOSH's warden and docker CPIs exec in a container
/// (`exec env -i /usr/sbin/runsvdir-start`): here it starts bosun's agent
/// on the agent env those CPIs write.
pub(super) const WARDEN_BOOT_PATH: &str = "usr/sbin/runsvdir-start";
/// Where the warden and docker CPIs bind persistent disks.
const WARDEN_DISK_DIR: &str = "warden-cpi-dev";
/// The boot entry's script.
const WARDEN_BOOT: &str = "#!/bin/sh\n\
# Started by BOSH's warden and docker CPIs: bosun's agent, on the agent env\n\
# they write (it waits until the file is there).\n\
exec /var/vcap/bosh/bin/bosun agent --settings /var/vcap/bosh/warden-cpi-agent-env.json\n";
/// The user databases the image's `vcap` user is added to.
const USER_FILES: [&str; 2] = ["etc/passwd", "etc/group"];

/// Non-directory entries under these are left out of the image (apt's
/// downloaded archives, its binary caches and the package lists).
const DROPPED_UNDER: &[&str] = &["var/cache/apt/", "var/lib/apt/lists/"];

/// How many lines of a failed command's output end up in its error.
const TAIL_LINES: usize = 15;

pub(super) struct DebootstrapSpec<'a> {
    pub os: &'a str,
    pub suite: &'a str,
    pub mirror: &'a str,
    pub packages: &'a [String],
}

/// Runs debootstrap in a fresh directory under `scratch` and packs the
/// result into the base tarball `dest` (written atomically).
pub(super) fn debootstrap_base(
    spec: &DebootstrapSpec<'_>,
    scratch: &Path,
    dest: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<(), StemcellError> {
    let step = format!("running debootstrap for {}", spec.os);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(StemcellError::NotRoot { step, uid });
    }
    let program = find_program("debootstrap").ok_or(StemcellError::DebootstrapMissing)?;
    let tmp = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(scratch)
        .map_err(io_err("creating debootstrap directory in", scratch))?;
    let target = tmp.path().join("rootfs");
    log(&format!(
        "{step}: {} {} into {} (packages: {})",
        spec.suite,
        spec.mirror,
        target.display(),
        spec.packages.join(" ")
    ));
    let started = Instant::now();
    let mut cmd = Command::new(&program);
    cmd.arg("--variant=minbase")
        .arg(format!("--include={}", spec.packages.join(",")))
        .arg(spec.suite)
        .arg(&target)
        .arg(spec.mirror);
    let result = run_logged(cmd, log);
    // debootstrap mounts proc/sys in the target; never leave them behind.
    unmount_below(&target);
    let (status, tail) = result.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StemcellError::DebootstrapMissing,
        _ => StemcellError::Command {
            step: step.clone(),
            message: e.to_string(),
        },
    })?;
    if !status.success() {
        let mut lines: Vec<String> = tail.into_iter().collect();
        let debootstrap_log = target.join("debootstrap/debootstrap.log");
        if let Ok(text) = fs::read_to_string(&debootstrap_log) {
            let all: Vec<&str> = text.lines().collect();
            lines.push("debootstrap.log:".to_string());
            lines.extend(
                all[all.len().saturating_sub(TAIL_LINES)..]
                    .iter()
                    .map(|l| l.to_string()),
            );
        }
        return Err(StemcellError::Command {
            step,
            message: format!("{}: {}", describe(status), lines.join("\n")),
        });
    }
    log(&format!(
        "debootstrap finished in {:.0}s; packing base rootfs {}",
        started.elapsed().as_secs_f64(),
        dest.display()
    ));
    let dest_dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let step = "writing base rootfs";
    let out = tempfile::Builder::new()
        .prefix(".base-")
        .tempfile_in(dest_dir)
        .map_err(io_err(step, dest))?;
    let file = out.as_file().try_clone().map_err(io_err(step, dest))?;
    let skipped = pack_dir(&target, io::BufWriter::new(file)).map_err(io_err(step, dest))?;
    out.as_file()
        .set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err(step, dest))?;
    out.as_file().sync_all().map_err(io_err(step, dest))?;
    out.persist(dest)
        .map_err(|e| StemcellError::io(step, dest, e.error))?;
    if skipped > 0 {
        log(&format!(
            "left {skipped} device nodes, fifos and sockets out of the base rootfs"
        ));
    }
    Ok(())
}

/// `exit N` or `killed by signal N`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Runs `cmd` with stdout and stderr on one pipe, logging its interesting
/// lines; returns its status and last lines.
fn run_logged(
    mut cmd: Command,
    log: &mut dyn FnMut(&str),
) -> io::Result<(ExitStatus, VecDeque<String>)> {
    let (reader, writer) = io::pipe()?;
    cmd.stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
    let spawned = cmd.spawn();
    // The command holds our copies of the pipe's write end: close them, so
    // reading ends when the child (and its children) exit.
    drop(cmd);
    let mut child = spawned?;
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut reader = BufReader::new(reader);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = String::from_utf8_lossy(&buf).trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        if !is_per_package_progress(&line) {
            log(&format!("debootstrap: {line}"));
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    Ok((child.wait()?, tail))
}

/// debootstrap prints four lines per package ("I: Retrieving libc6
/// 2.36-9", "I: Unpacking libc6..."); those are not worth logging.
fn is_per_package_progress(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("I: ") else {
        return false;
    };
    [
        "Retrieving ",
        "Validating ",
        "Extracting ",
        "Unpacking ",
        "Configuring ",
    ]
    .iter()
    .filter_map(|verb| rest.strip_prefix(verb))
    .any(|what| {
        let first = what.split([' ', '.']).next().unwrap_or("");
        !what.contains(" packages")
            && !matches!(
                first,
                "" | "InRelease" | "Release" | "Packages" | "the" | "base" | "required"
            )
    })
}

/// `name` on PATH, or in the sbin directories a non-login root shell may
/// lack.
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Detaches every mount at or below `dir` (deepest first).
fn unmount_below(dir: &Path) {
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .map(|p| PathBuf::from(unescape_mount_path(p)))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    for p in points {
        use std::os::unix::ffi::OsStrExt;
        if let Ok(c) = std::ffi::CString::new(p.as_os_str().as_bytes()) {
            // SAFETY: `c` is a valid NUL-terminated path for the call's duration.
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
}

/// `/proc/self/mounts` escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(p: &str) -> String {
    let bytes = p.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4);
        if bytes[i] == b'\\' && octal.is_some_and(|o| o.iter().all(|b| (b'0'..=b'7').contains(b))) {
            let v = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Writes a gzipped tar of the tree at `root` to `w`: paths relative to
/// `root`, sorted; numeric owners, modes and mtimes kept; hard links as
/// link entries; device nodes, fifos and sockets left out (their count is
/// returned). Does not cross into other file systems.
pub(super) fn pack_dir<W: Write>(root: &Path, w: W) -> io::Result<usize> {
    let gz = GzBuilder::new().mtime(0).write(w, Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut skipped = 0;
    let mut inodes: HashMap<(u64, u64), PathBuf> = HashMap::new();
    for entry in walkdir::WalkDir::new(root)
        .follow_links(false)
        .same_file_system(true)
        .sort_by_file_name()
        .min_depth(1)
    {
        let entry = entry.map_err(io::Error::other)?;
        let rel = entry
            .path()
            .strip_prefix(root)
            .map_err(io::Error::other)?
            .to_path_buf();
        let meta = entry.metadata().map_err(io::Error::other)?;
        let ft = meta.file_type();
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_size(0);
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            tar.append_data(&mut h, &rel, io::empty())?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            let target = fs::read_link(entry.path())?;
            tar.append_link(&mut h, &rel, target)?;
        } else if ft.is_file() {
            if meta.nlink() > 1 {
                let key = (meta.dev(), meta.ino());
                if let Some(first) = inodes.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    tar.append_link(&mut h, &rel, first)?;
                    continue;
                }
                inodes.insert(key, rel.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            tar.append_data(&mut h, &rel, File::open(entry.path())?)?;
        } else if ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket() {
            skipped += 1;
        }
    }
    let gz = tar.into_inner()?;
    let mut w = gz.finish()?;
    w.flush()?;
    Ok(skipped)
}

/// What the image gets on top of the base.
pub(super) struct Additions<'a> {
    pub agent_binary: &'a Path,
    /// Contents of `/etc/bosun-stemcell`.
    pub identity: &'a [u8],
    pub mtime: u64,
}

/// `./a//b` -> `a/b`; `None` for absolute paths and `..`.
fn normalise(path: &str) -> Option<String> {
    if path.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Writes the image (a gzipped tar) to `dest`: every entry of the base
/// tarball except apt's caches and lists and device nodes (`etc/passwd` and
/// `etc/group` with BOSH's `vcap` user and group added), then the
/// `/var/vcap` directories, the agent and `/etc/bosun-stemcell`. Returns the
/// image's hex sha256 and size.
pub(super) fn write_image(
    base: &Path,
    dest: &Path,
    add: &Additions<'_>,
) -> Result<(String, u64), StemcellError> {
    let read_step = "reading base rootfs";
    let write_step = "writing image";
    let invalid = |m: String| StemcellError::invalid(base, m);
    let out = File::create(dest).map_err(io_err(write_step, dest))?;
    // Level 1: the default level makes a cached rebuild ~3x slower
    // (13 s instead of 4 s here) to save a sixth of the size.
    let gz = GzBuilder::new().mtime(0).write(
        HashingWriter::new(io::BufWriter::new(out)),
        Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);

    let ours: BTreeSet<&str> = VCAP_DIRS
        .iter()
        .copied()
        .chain([AGENT_PATH, IDENTITY_PATH, WARDEN_BOOT_PATH, WARDEN_DISK_DIR])
        .collect();
    let mut dropped: BTreeSet<String> = BTreeSet::new();
    // `etc/passwd` and `etc/group`, held back to gain BOSH's vcap user.
    let mut users: BTreeMap<&'static str, (tar::Header, Vec<u8>)> = BTreeMap::new();
    let base_file = File::open(base).map_err(io_err(read_step, base))?;
    let reader = maybe_gunzip(BufReader::new(base_file)).map_err(io_err(read_step, base))?;
    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("corrupt archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| invalid(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path =
            normalise(&raw).ok_or_else(|| invalid(format!("entry '{raw}' escapes the root")))?;
        let kind = entry.header().entry_type();
        if path.is_empty() {
            continue;
        }
        let is_dir = kind.is_dir();
        if ours.contains(path.as_str())
            || (!is_dir && DROPPED_UNDER.iter().any(|d| path.starts_with(d)))
        {
            dropped.insert(path);
            continue;
        }
        let mut header = entry.header().clone();
        if let Some(name) = USER_FILES.iter().find(|f| **f == path) {
            if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous) {
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(io_err(read_step, base))?;
                header.set_entry_type(tar::EntryType::Regular);
                users.insert(name, (header, data));
                continue;
            }
        }
        let res = match kind {
            tar::EntryType::Directory => tar.append_data(&mut header, &path, io::empty()),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                header.set_entry_type(tar::EntryType::Regular);
                tar.append_data(&mut header, &path, &mut entry)
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let target = entry
                    .link_name()
                    .map_err(|e| invalid(format!("entry '{path}': bad link target: {e}")))?
                    .ok_or_else(|| invalid(format!("entry '{path}': link without target")))?
                    .to_string_lossy()
                    .into_owned();
                let target = if kind == tar::EntryType::Link {
                    let t = normalise(&target)
                        .ok_or_else(|| invalid(format!("hard link '{path}' escapes the root")))?;
                    if dropped.contains(&t) {
                        continue;
                    }
                    t
                } else {
                    target
                };
                tar.append_link(&mut header, &path, &target)
            }
            // Device nodes, fifos, global headers: the runtime provides /dev.
            _ => continue,
        };
        res.map_err(io_err(write_step, dest))?;
    }

    // BOSH's vcap user and group, added where the base lacks them.
    let text = |name: &str| {
        users
            .get(name)
            .map(|(_, d)| String::from_utf8_lossy(d).into_owned())
    };
    if let (Some(passwd), Some(group)) = (text("etc/passwd"), text("etc/group")) {
        if let Some((p, g)) = bosun_cpi::vm_users::with_vcap(&passwd, &group) {
            if let Some(e) = users.get_mut("etc/passwd") {
                e.1 = p.into_bytes();
            }
            if let Some(e) = users.get_mut("etc/group") {
                e.1 = g.into_bytes();
            }
        }
    }
    for (name, (mut h, data)) in users {
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append_data(&mut h, name, data.as_slice())
            .map_err(io_err(write_step, dest))?;
    }

    let header = |kind: tar::EntryType, mode: u32, size: u64| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(add.mtime);
        h.set_size(size);
        h
    };
    for dir in VCAP_DIRS.iter().chain(&[WARDEN_DISK_DIR]) {
        tar.append_data(
            &mut header(tar::EntryType::Directory, 0o755, 0),
            dir,
            io::empty(),
        )
        .map_err(io_err(write_step, dest))?;
    }
    let agent_step = "reading agent binary";
    let agent = File::open(add.agent_binary).map_err(io_err(agent_step, add.agent_binary))?;
    let size = agent
        .metadata()
        .map_err(io_err(agent_step, add.agent_binary))?
        .len();
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, size),
        AGENT_PATH,
        agent,
    )
    .map_err(io_err(write_step, dest))?;
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o644, add.identity.len() as u64),
        IDENTITY_PATH,
        add.identity,
    )
    .map_err(io_err(write_step, dest))?;
    tar.append_data(
        &mut header(tar::EntryType::Regular, 0o755, WARDEN_BOOT.len() as u64),
        WARDEN_BOOT_PATH,
        WARDEN_BOOT.as_bytes(),
    )
    .map_err(io_err(write_step, dest))?;

    let gz = tar.into_inner().map_err(io_err(write_step, dest))?;
    let hashing = gz.finish().map_err(io_err(write_step, dest))?;
    let (mut buf, sha, len) = hashing.finish();
    buf.flush().map_err(io_err(write_step, dest))?;
    Ok((sha, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_rejects_escapes() {
        assert_eq!(normalise("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(normalise("./").as_deref(), Some(""));
        assert!(normalise("../x").is_none());
        assert!(normalise("/etc").is_none());
    }

    #[test]
    fn mount_paths_unescape() {
        assert_eq!(unescape_mount_path("/tmp/a\\040b"), "/tmp/a b");
        assert_eq!(unescape_mount_path("/plain"), "/plain");
        assert_eq!(unescape_mount_path("/end\\"), "/end\\");
    }

    #[test]
    fn per_package_progress_is_quiet() {
        assert!(is_per_package_progress("I: Retrieving libc6 2.36-9"));
        assert!(is_per_package_progress("I: Unpacking libc6..."));
        assert!(!is_per_package_progress("I: Retrieving InRelease"));
        assert!(!is_per_package_progress(
            "I: Unpacking required packages..."
        ));
        assert!(!is_per_package_progress("I: Unpacking the base system..."));
        assert!(!is_per_package_progress(
            "I: Base system installed successfully."
        ));
        assert!(!is_per_package_progress("W: Failure trying to run"));
    }
}

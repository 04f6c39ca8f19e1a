//! A VM's own system directories: `vms/<cid>/root/` holds what the VM
//! namespace puts over the host's `/etc`, `/tmp`, `/var/tmp`, `/root` and
//! `/home` (see [`crate::namespace`]), so a job that edits `/etc/passwd` or
//! leaves files in `/tmp` changes its VM only.
//!
//! `/etc` is an overlay: the host's `/etc` below, the VM's `root/etc.upper`
//! (with its work directory `root/etc.work`) on top, so laying it out only
//! makes two empty directories. A copy of the host's `/etc` in `root/etc` is
//! the fallback: made at creation without root (an unprivileged overlay
//! cannot write the host's root-owned files), or by the namespace when the
//! overlay mount fails. A VM that has a copy keeps using it.
//!
//! Every VM's `/etc` has BOSH's `vcap` user and group: when the host lacks
//! them, the VM's own `passwd` and `group` (in the overlay's upper
//! directory, or the copy) are the host's with them added, as of the VM's
//! creation.
//!
//! This module lays those directories out, copies `/etc` when asked, and
//! says which host path each one covers. It must not mount anything, and it
//! never writes to the host's directories: it only reads `/etc`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::files::{sweep_staging, Staging};
use crate::{io_err, LocalCpiError, Result};

/// The name of a VM's system directory inside `vms/<cid>/` (a sibling of
/// `vcap/`): `root/etc.upper` holds the VM's changes to `/etc`, `root/var/tmp`
/// is its `/var/tmp`.
pub(crate) const SYSTEM_DIR: &str = "root";

/// What a VM gets at one host path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Content {
    /// The host's directory under an overlay of the VM's own (or, as the
    /// fallback, a copy of the host's directory).
    OverlayOfHost,
    /// An empty directory of this mode.
    Empty(u32),
}

/// The host paths a VM has its own of, in the order they are laid out
/// and bound. Everything else (`/usr`, `/var` but `/var/vcap` and
/// `/var/tmp`, the network, the kernel) is the host's.
pub(crate) const COVERED: &[(&str, Content)] = &[
    ("/etc", Content::OverlayOfHost),
    ("/root", Content::Empty(0o700)),
    ("/home", Content::Empty(0o755)),
    ("/var/tmp", Content::Empty(0o1777)),
    ("/tmp", Content::Empty(0o1777)),
];

/// How many skipped files a warning names before it only counts them.
const NAMED_IN_WARNING: usize = 5;

/// The VM's system directory for its `--vm-root` (`vms/<cid>/vcap`):
/// `vms/<cid>/root`.
pub(crate) fn system_dir_of(vcap: &Path) -> Option<PathBuf> {
    vcap.parent().map(|vm| vm.join(SYSTEM_DIR))
}

/// The CPI's disks directory for a VM's `--vm-root` (`<root>/vms/<cid>/vcap`):
/// `<root>/disks`. Disk hints are paths below it.
pub(crate) fn disks_dir_of(vcap: &Path) -> Option<PathBuf> {
    vcap.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(|root| root.join("disks"))
}

/// Where the VM's own directory (or copy) for the host path `host`
/// (absolute) lives below `system_dir`.
pub(crate) fn copy_of(system_dir: &Path, host: &str) -> PathBuf {
    system_dir.join(host.trim_start_matches('/'))
}

/// The overlay's upper directory for `host` below `system_dir`
/// (`etc.upper`): the VM's changes.
pub(crate) fn upper_of(system_dir: &Path, host: &str) -> PathBuf {
    system_dir.join(format!("{}.upper", host.trim_start_matches('/')))
}

/// The overlay's work directory for `host` below `system_dir` (`etc.work`).
pub(crate) fn work_of(system_dir: &Path, host: &str) -> PathBuf {
    system_dir.join(format!("{}.work", host.trim_start_matches('/')))
}

/// How a VM's `/etc` is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EtcKind {
    /// Empty `etc.upper` and `etc.work` for an overlay over the host's.
    Overlay,
    /// A copy of the host's in `etc`.
    Copy,
}

/// Which kind a VM created by this process gets: the overlay as root, the
/// copy otherwise (in an unprivileged user namespace the host's files are
/// owned by an unmapped uid, so the overlay could not copy them up: a job
/// could add files to `/etc` but not change `/etc/passwd`).
pub(crate) fn etc_kind_for_caller() -> EtcKind {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        EtcKind::Overlay
    } else {
        EtcKind::Copy
    }
}

/// What laying out a VM's system directories did.
#[derive(Debug)]
pub(crate) struct Layout {
    pub(crate) etc: EtcKind,
    /// Files, directories and symlinks copied (0 for an overlay).
    pub(crate) entries: u64,
    /// Bytes of file content copied.
    pub(crate) bytes: u64,
    /// Host entries left out, with why (unreadable, a socket, ...).
    pub(crate) skipped: Vec<String>,
    pub(crate) elapsed: Duration,
}

impl Layout {
    fn new(etc: EtcKind) -> Layout {
        Layout {
            etc,
            entries: 0,
            bytes: 0,
            skipped: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// A one-line summary of what a copy left out, if anything.
    pub(crate) fn skipped_summary(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let named: Vec<&str> = self
            .skipped
            .iter()
            .take(NAMED_IN_WARNING)
            .map(String::as_str)
            .collect();
        Some(format!(
            "{} entries could not be copied: {}{}",
            self.skipped.len(),
            named.join("; "),
            if self.skipped.len() > NAMED_IN_WARNING {
                "; ..."
            } else {
                ""
            }
        ))
    }
}

/// Lays out a VM's system directories in `system_dir` (which must not exist)
/// from the host root `/`, with the `/etc` of [`etc_kind_for_caller`]. Logs
/// what it did and what a copy skipped.
pub(crate) fn lay_out(system_dir: &Path) -> Result<Layout> {
    let layout = lay_out_from(Path::new("/"), system_dir, etc_kind_for_caller())?;
    if let Some(summary) = layout.skipped_summary() {
        tracing::warn!(
            dir = %system_dir.display(),
            "local CPI: the VM's copy of /etc lacks what could not be copied: {summary}"
        );
        for s in &layout.skipped {
            tracing::debug!(dir = %system_dir.display(), "local CPI: not copied: {s}");
        }
    }
    match layout.etc {
        EtcKind::Overlay => tracing::debug!(
            dir = %system_dir.display(),
            us = layout.elapsed.as_micros() as u64,
            "local CPI: laid out a VM's system directories (/etc: an overlay over the host's)"
        ),
        EtcKind::Copy => tracing::info!(
            dir = %system_dir.display(),
            entries = layout.entries,
            bytes = layout.bytes,
            ms = layout.elapsed.as_millis() as u64,
            "local CPI: copied the host's /etc for a VM (not root: no overlay)"
        ),
    }
    Ok(layout)
}

/// [`lay_out`] with another host root (tests use a fixture's `etc`) and a
/// chosen kind of `/etc`.
pub(crate) fn lay_out_from(host_root: &Path, system_dir: &Path, etc: EtcKind) -> Result<Layout> {
    let start = Instant::now();
    let mut layout = Layout::new(etc);
    fs::DirBuilder::new()
        .mode(0o755)
        .create(system_dir)
        .map_err(io_err("creating", system_dir))?;
    for (host, content) in COVERED {
        let dest = copy_of(system_dir, host);
        if let Some(parent) = dest.parent() {
            fs::DirBuilder::new()
                .mode(0o755)
                .recursive(true)
                .create(parent)
                .map_err(io_err("creating", parent))?;
        }
        match content {
            Content::OverlayOfHost => {
                let src = host_dir(host_root, host)?;
                match etc {
                    EtcKind::Overlay => {
                        make_overlay_dirs(&src, system_dir, host)?;
                        add_vcap_user(&src.0, &upper_of(system_dir, host))?;
                    }
                    EtcKind::Copy => {
                        // SAFETY: geteuid has no preconditions.
                        let root = unsafe { libc::geteuid() } == 0;
                        let copied = copy_host_dir(&src, &dest, root)?;
                        layout.entries += copied.entries;
                        layout.bytes += copied.bytes;
                        layout.skipped.extend(copied.skipped);
                        add_vcap_user(&dest, &dest)?;
                    }
                }
            }
            Content::Empty(mode) => make_empty_dir(&dest, *mode)?,
        }
    }
    layout.elapsed = start.elapsed();
    Ok(layout)
}

/// The host directory `host` below `host_root`, which must be a directory.
fn host_dir(host_root: &Path, host: &str) -> Result<(PathBuf, fs::Metadata)> {
    let src = copy_of(host_root, host);
    let meta = fs::symlink_metadata(&src).map_err(io_err("inspecting", &src))?;
    if !meta.is_dir() {
        return Err(LocalCpiError::Internal(format!(
            "{} is not a directory: cannot give a VM its own",
            src.display()
        )));
    }
    Ok((src, meta))
}

fn make_empty_dir(dest: &Path, mode: u32) -> Result<()> {
    fs::DirBuilder::new()
        .mode(0o700)
        .create(dest)
        .map_err(io_err("creating", dest))?;
    // After creation: the umask does not apply, the sticky bit stays.
    fs::set_permissions(dest, fs::Permissions::from_mode(mode))
        .map_err(io_err("setting permissions of", dest))
}

/// The empty upper and work directories of an overlay over `src`. The
/// upper one has the mode and (as root) the owner of `src`: the overlay's
/// top directory takes them from it.
fn make_overlay_dirs(src: &(PathBuf, fs::Metadata), system_dir: &Path, host: &str) -> Result<()> {
    let (_, meta) = src;
    let upper = upper_of(system_dir, host);
    let work = work_of(system_dir, host);
    make_empty_dir(&work, 0o700)?;
    make_empty_dir(&upper, meta.mode() & 0o7777)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::lchown(&upper, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("setting the owner of", &upper))?;
    }
    Ok(())
}

/// Copies the host directory `src` to `dest` (which must not exist),
/// keeping modes, owners (as root), times and symlinks; unreadable entries,
/// sockets, fifos and devices are left out and listed in the result.
fn copy_host_dir(src: &(PathBuf, fs::Metadata), dest: &Path, keep_owners: bool) -> Result<Layout> {
    let start = Instant::now();
    let mut copier = Copier {
        root: keep_owners,
        layout: Layout::new(EtcKind::Copy),
    };
    copier.copy_dir(&src.0, dest, &src.1)?;
    copier.layout.elapsed = start.elapsed();
    Ok(copier.layout)
}

/// The fallback when an overlay cannot be mounted: copies the host
/// directory `host` below `host_root` into the VM's copy below
/// `system_dir`, built aside and renamed into place (a crash leaves no half
/// copy that later starts would take for a whole one). Owners are kept
/// only with `keep_owners` (root on the host; in a user namespace the
/// host's other uids are not mapped).
pub(crate) fn copy_instead_of_overlay(
    host_root: &Path,
    system_dir: &Path,
    host: &str,
    keep_owners: bool,
) -> Result<Layout> {
    let src = host_dir(host_root, host)?;
    let dest = copy_of(system_dir, host);
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = system_dir.join(format!(".{name}.copying"));
    if fs::symlink_metadata(&aside).is_ok() {
        // Left by a start that died while copying.
        fs::remove_dir_all(&aside).map_err(io_err("removing", &aside))?;
    }
    let layout = copy_host_dir(&src, &aside, keep_owners)?;
    if host == "/etc" {
        add_vcap_user(&aside, &aside)?;
    }
    fs::rename(&aside, &dest).map_err(io_err("moving into place", &aside))?;
    Ok(layout)
}

/// Gives the VM BOSH's `vcap` user and group: `passwd` and `group` of the
/// `/etc` at `src` with them added (see [`bosun_cpi::vm_users`]) are
/// written into `dest` (the overlay's upper directory, or the copy itself),
/// with the source files' modes and, as root, owners. Nothing is written
/// when `src` has them already or lacks either file. Returns whether it
/// wrote.
pub(crate) fn add_vcap_user(src: &Path, dest: &Path) -> Result<bool> {
    let read = |name: &str| -> Result<Option<(String, fs::Metadata)>> {
        let path = src.join(name);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let meta = fs::metadata(&path).map_err(io_err("inspecting", &path))?;
                Ok(Some((text, meta)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading", &path)(e)),
        }
    };
    let (Some((passwd, pmeta)), Some((group, gmeta))) = (read("passwd")?, read("group")?) else {
        return Ok(false);
    };
    let Some((new_passwd, new_group)) = bosun_cpi::vm_users::with_vcap(&passwd, &group) else {
        return Ok(false);
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    for (name, text, meta) in [("passwd", new_passwd, pmeta), ("group", new_group, gmeta)] {
        let path = dest.join(name);
        let staged = dest.join(format!(".{name}.bosun"));
        fs::write(&staged, text).map_err(io_err("writing", &staged))?;
        fs::set_permissions(&staged, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("setting permissions of", &staged))?;
        if root {
            std::os::unix::fs::lchown(&staged, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err("setting the owner of", &staged))?;
        }
        fs::rename(&staged, &path).map_err(io_err("moving into place", &staged))?;
    }
    Ok(true)
}

/// Puts a copy of the host's file `host_dir/rel` into the overlay's upper
/// directory `upper` unless the VM has its own there already: for a file
/// the host has mounted below `host_dir` (a container's `/etc/resolv.conf`,
/// `/etc/hosts`), which the overlay would otherwise hide behind what lies
/// beneath the mount. Missing parent directories get the host's modes and
/// owners. Returns whether it copied.
pub(crate) fn seed_upper(host_dir: &Path, upper: &Path, rel: &Path) -> Result<bool> {
    let dest = upper.join(rel);
    if fs::symlink_metadata(&dest).is_ok() {
        return Ok(false);
    }
    let mut made = PathBuf::new();
    if let Some(parent) = rel.parent() {
        for part in parent.components() {
            made.push(part);
            let dir = upper.join(&made);
            if fs::symlink_metadata(&dir).is_ok() {
                continue;
            }
            let src = host_dir.join(&made);
            let meta = fs::metadata(&src).map_err(io_err("inspecting", &src))?;
            make_empty_dir(&dir, meta.mode() & 0o7777)?;
            std::os::unix::fs::lchown(&dir, Some(meta.uid()), Some(meta.gid()))
                .map_err(io_err("setting the owner of", &dir))?;
        }
    }
    let src = host_dir.join(rel);
    let meta = fs::metadata(&src).map_err(io_err("inspecting", &src))?;
    fs::copy(&src, &dest).map_err(io_err("copying to", &dest))?;
    std::os::unix::fs::lchown(&dest, Some(meta.uid()), Some(meta.gid()))
        .map_err(io_err("setting the owner of", &dest))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .map_err(io_err("setting permissions of", &dest))?;
    Ok(true)
}

/// Lays out `<vm_dir>/root` if it is missing (a VM created by an older
/// version), built aside and renamed into place.
pub(crate) fn ensure_laid_out(vm_dir: &Path) -> Result<()> {
    let dest = vm_dir.join(SYSTEM_DIR);
    if dest.is_dir() {
        return Ok(());
    }
    sweep_staging(vm_dir);
    let staging = Staging::create(vm_dir, SYSTEM_DIR)?;
    // Staging made the directory 0700; lay_out wants to create it.
    fs::remove_dir(&staging.path).map_err(io_err("removing", &staging.path))?;
    lay_out(&staging.path)?;
    staging.commit(&dest)
}

struct Copier {
    /// Owners are kept only as root; otherwise everything is the caller's
    /// (uid 0 in the VM's user namespace).
    root: bool,
    layout: Layout,
}

impl Copier {
    fn skip(&mut self, path: &Path, why: impl std::fmt::Display) {
        self.layout
            .skipped
            .push(format!("{}: {why}", path.display()));
    }

    /// Copies the directory `src` (whose metadata is `meta`) to `dst`, which
    /// must not exist. Its own mode, owner and times are set last, so a
    /// read-only directory can still be filled.
    fn copy_dir(&mut self, src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<()> {
        fs::DirBuilder::new()
            .mode(0o700)
            .create(dst)
            .map_err(io_err("creating", dst))?;
        self.layout.entries += 1;
        match fs::read_dir(src) {
            Ok(entries) => {
                for entry in entries {
                    match entry {
                        Ok(entry) => {
                            self.copy_entry(&entry.path(), &dst.join(entry.file_name()))?
                        }
                        Err(e) => {
                            self.skip(src, format_args!("listing: {e}"));
                            break;
                        }
                    }
                }
            }
            Err(e) => self.skip(src, format_args!("listing: {e} (copied empty)")),
        }
        self.chown(dst, meta)?;
        let mut mode = meta.mode() & 0o7777;
        if !self.root {
            // The CPI must be able to remove the copy again.
            mode |= 0o700;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(mode))
            .map_err(io_err("setting permissions of", dst))?;
        set_times(dst, meta).map_err(io_err("setting the times of", dst))
    }

    fn copy_entry(&mut self, src: &Path, dst: &Path) -> Result<()> {
        let meta = match fs::symlink_metadata(src) {
            Ok(m) => m,
            Err(e) => {
                self.skip(src, format_args!("inspecting: {e}"));
                return Ok(());
            }
        };
        let ty = meta.file_type();
        if ty.is_dir() {
            self.copy_dir(src, dst, &meta)
        } else if ty.is_symlink() {
            let target = match fs::read_link(src) {
                Ok(t) => t,
                Err(e) => {
                    self.skip(src, format_args!("reading the link: {e}"));
                    return Ok(());
                }
            };
            std::os::unix::fs::symlink(&target, dst).map_err(io_err("creating the link", dst))?;
            self.layout.entries += 1;
            self.chown(dst, &meta)
        } else if ty.is_file() {
            self.copy_file(src, dst, &meta)
        } else {
            // Sockets, fifos and devices are no configuration.
            self.skip(src, "not a regular file, directory or symlink");
            Ok(())
        }
    }

    fn copy_file(&mut self, src: &Path, dst: &Path, meta: &fs::Metadata) -> Result<()> {
        let mut from = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(src)
        {
            Ok(f) => f,
            Err(e) => {
                self.skip(src, format_args!("opening: {e}"));
                return Ok(());
            }
        };
        let mut to = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(io_err("creating", dst))?;
        // File to file: copy_file_range(2) (a reflink where the file system can).
        let bytes = match io::copy(&mut from, &mut to) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                drop(to);
                fs::remove_file(dst).map_err(io_err("removing", dst))?;
                self.skip(src, format_args!("reading: {e}"));
                return Ok(());
            }
            Err(e) => return Err(io_err("copying to", dst)(e)),
        };
        self.layout.entries += 1;
        self.layout.bytes += bytes;
        // Owner before mode: chown clears the set-id bits.
        self.chown(dst, meta)?;
        to.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))
            .map_err(io_err("setting permissions of", dst))?;
        set_file_times(&to, meta).map_err(io_err("setting the times of", dst))
    }

    /// Gives `dst` the owner of `meta` (root only; a symlink itself, not its target).
    fn chown(&mut self, dst: &Path, meta: &fs::Metadata) -> Result<()> {
        if !self.root {
            return Ok(());
        }
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))
            .map_err(io_err("setting the owner of", dst))
    }
}

fn file_times(meta: &fs::Metadata) -> io::Result<fs::FileTimes> {
    Ok(fs::FileTimes::new()
        .set_accessed(meta.accessed()?)
        .set_modified(meta.modified()?))
}

fn set_file_times(f: &fs::File, meta: &fs::Metadata) -> io::Result<()> {
    f.set_times(file_times(meta)?)
}

fn set_times(dir: &Path, meta: &fs::Metadata) -> io::Result<()> {
    set_file_times(&fs::File::open(dir)?, meta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn euid_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// Every entry below `dir` by relative path: (kind, mode, uid, gid, content or link target).
    fn tree(dir: &Path) -> BTreeMap<PathBuf, (char, u32, u32, u32, Vec<u8>)> {
        fn walk(
            base: &Path,
            dir: &Path,
            out: &mut BTreeMap<PathBuf, (char, u32, u32, u32, Vec<u8>)>,
        ) {
            // Without root, some host directories cannot be listed.
            let Ok(entries) = fs::read_dir(dir) else {
                return;
            };
            for e in entries {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                let rel = p.strip_prefix(base).unwrap().to_path_buf();
                let mode = m.mode() & 0o7777;
                let ft = m.file_type();
                let (kind, data) = if ft.is_symlink() {
                    (
                        'l',
                        fs::read_link(&p)
                            .unwrap()
                            .into_os_string()
                            .into_encoded_bytes(),
                    )
                } else if ft.is_dir() {
                    ('d', Vec::new())
                } else if ft.is_file() {
                    match fs::read(&p) {
                        Ok(d) => ('f', d),
                        Err(_) => ('u', Vec::new()),
                    }
                } else {
                    continue;
                };
                // Symlink modes are meaningless.
                let mode = if kind == 'l' { 0 } else { mode };
                out.insert(rel, (kind, mode, m.uid(), m.gid(), data));
                if kind == 'd' {
                    walk(base, &p, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, dir, &mut out);
        out
    }

    #[test]
    fn lays_out_a_copy_of_etc_and_empty_directories() {
        let t = tempfile::tempdir().unwrap();
        let host = t.path().join("host");
        let etc = host.join("etc");
        fs::create_dir_all(etc.join("ssh/sshd_config.d")).unwrap();
        fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::write(etc.join("ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
        fs::write(etc.join("setuid-tool"), "#!/bin/sh\n").unwrap();
        fs::set_permissions(etc.join("setuid-tool"), fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(etc.join("shadow"), "root:*:1::::::\n").unwrap();
        fs::set_permissions(etc.join("shadow"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::symlink("../proc/self/mounts", etc.join("mtab")).unwrap();
        std::os::unix::fs::symlink("passwd", etc.join("passwd-link")).unwrap();
        fs::create_dir(etc.join("readonly")).unwrap();
        fs::write(etc.join("readonly/file"), "x").unwrap();
        fs::set_permissions(etc.join("readonly"), fs::Permissions::from_mode(0o555)).unwrap();
        let fifo = std::ffi::CString::new(etc.join("initctl").to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let sock = etc.join("control.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        if euid_is_root() {
            std::os::unix::fs::lchown(etc.join("shadow"), Some(0), Some(42)).unwrap();
            std::os::unix::fs::lchown(etc.join("ssh"), Some(1), Some(2)).unwrap();
            std::os::unix::fs::lchown(etc.join("passwd-link"), Some(3), Some(4)).unwrap();
        }
        let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        fs::File::options()
            .write(true)
            .open(etc.join("passwd"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let sys = t.path().join("vm/root");
        fs::create_dir(t.path().join("vm")).unwrap();
        let layout = lay_out_from(&host, &sys, EtcKind::Copy).unwrap();

        let mut want = tree(&etc);
        let got = tree(&sys.join("etc"));
        if !euid_is_root() {
            // Without root, every copy is the caller's and its directories are u+rwx.
            for (k, v) in want.iter_mut() {
                let m = fs::symlink_metadata(sys.join("etc").join(k)).unwrap();
                (v.2, v.3) = (m.uid(), m.gid());
                if v.0 == 'd' {
                    v.1 |= 0o700;
                }
            }
        }
        assert_eq!(got, want);
        assert_eq!(
            got[Path::new("setuid-tool")].1,
            0o4755,
            "set-id bits survive the chown"
        );
        assert_eq!(
            fs::read_link(sys.join("etc/mtab")).unwrap(),
            Path::new("../proc/self/mounts")
        );
        let m = fs::metadata(sys.join("etc/passwd")).unwrap();
        assert_eq!(m.modified().unwrap(), old, "times are kept");
        assert!(!sys.join("etc/initctl").exists() && !sys.join("etc/control.sock").exists());
        assert_eq!(layout.skipped.len(), 2, "{:?}", layout.skipped);
        assert!(layout.skipped.iter().any(|s| s.contains("initctl")));
        assert_eq!(layout.entries, want.len() as u64 + 1);

        for (host, mode) in [
            ("tmp", 0o1777),
            ("var/tmp", 0o1777),
            ("root", 0o700),
            ("home", 0o755),
        ] {
            let d = sys.join(host);
            let m = fs::symlink_metadata(&d).unwrap();
            assert!(m.is_dir(), "{host}");
            assert_eq!(m.mode() & 0o7777, mode, "{host}");
            assert_eq!(fs::read_dir(&d).unwrap().count(), 0, "{host} is empty");
        }
        // Writing the copy leaves the host's file alone (no hard links).
        fs::write(sys.join("etc/passwd"), "changed").unwrap();
        assert_eq!(
            fs::read_to_string(etc.join("passwd")).unwrap(),
            "root:x:0:0::/root:/bin/sh\n"
        );
        fs::set_permissions(etc.join("readonly"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn an_unreadable_file_is_skipped_with_its_reason() {
        if euid_is_root() {
            eprintln!("skipped: root reads every file");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("host/etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("secret"), "s").unwrap();
        fs::set_permissions(etc.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
        fs::write(etc.join("open"), "o").unwrap();
        let sys = t.path().join("root");
        let layout = lay_out_from(&t.path().join("host"), &sys, EtcKind::Copy).unwrap();
        assert!(!sys.join("etc/secret").exists());
        assert_eq!(fs::read_to_string(sys.join("etc/open")).unwrap(), "o");
        assert_eq!(layout.skipped.len(), 1);
        assert!(layout.skipped[0].contains("secret") && layout.skipped[0].contains("opening"));
    }

    #[test]
    fn copies_every_readable_file_of_the_hosts_etc() {
        let t = tempfile::tempdir().unwrap();
        let sys = t.path().join("root");
        let layout = lay_out_from(Path::new("/"), &sys, EtcKind::Copy).unwrap();
        eprintln!(
            "copied /etc: {} entries, {} bytes in {:?}, {} skipped",
            layout.entries,
            layout.bytes,
            layout.elapsed,
            layout.skipped.len()
        );
        // Every readable host file has an identical copy, but `passwd` and
        // `group`, which gain BOSH's vcap user and group where the host
        // lacks them.
        let host = tree(Path::new("/etc"));
        let copy = tree(&sys.join("etc"));
        for (rel, (kind, _, _, _, data)) in &host {
            if *kind == 'f' && rel != Path::new("passwd") && rel != Path::new("group") {
                assert_eq!(copy.get(rel).map(|c| &c.4), Some(data), "{}", rel.display());
            }
        }
        for name in ["passwd", "group"] {
            let host = fs::read_to_string(Path::new("/etc").join(name)).unwrap();
            let copied = fs::read_to_string(sys.join("etc").join(name)).unwrap();
            assert!(
                copied.starts_with(&host),
                "{name}: the host's lines come first"
            );
            assert!(
                copied.lines().any(|l| l.starts_with("vcap:x:")),
                "{name}: {copied}"
            );
        }
    }

    #[test]
    fn an_overlay_gets_vcap_in_its_upper_layer_and_the_host_is_untouched() {
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("host/etc");
        fs::create_dir_all(&etc).unwrap();
        let passwd = "root:x:0:0::/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let group = "root:x:0:\nalice:x:1000:\n";
        fs::write(etc.join("passwd"), passwd).unwrap();
        fs::write(etc.join("group"), group).unwrap();
        fs::set_permissions(etc.join("passwd"), fs::Permissions::from_mode(0o644)).unwrap();
        let sys = t.path().join("root");
        lay_out_from(&t.path().join("host"), &sys, EtcKind::Overlay).unwrap();
        let upper = sys.join("etc.upper");
        assert_eq!(
            fs::read_to_string(upper.join("passwd")).unwrap(),
            format!("{passwd}vcap:x:1001:1001:BOSH System User:/home/vcap:/bin/bash\n")
        );
        assert_eq!(
            fs::read_to_string(upper.join("group")).unwrap(),
            format!("{group}vcap:x:1001:\n")
        );
        let mode = fs::metadata(upper.join("passwd"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777;
        assert_eq!(mode, 0o644);
        assert_eq!(fs::read_to_string(etc.join("passwd")).unwrap(), passwd);
        assert_eq!(fs::read_to_string(etc.join("group")).unwrap(), group);
        // A host that has vcap already: the upper layer stays empty.
        let sys2 = t.path().join("root2");
        fs::write(
            etc.join("passwd"),
            format!("{passwd}vcap:x:1001:1001::/home/vcap:/bin/sh\n"),
        )
        .unwrap();
        fs::write(etc.join("group"), format!("{group}vcap:x:1001:\n")).unwrap();
        lay_out_from(&t.path().join("host"), &sys2, EtcKind::Overlay).unwrap();
        assert_eq!(fs::read_dir(sys2.join("etc.upper")).unwrap().count(), 0);
    }

    #[test]
    fn an_overlay_layout_is_two_empty_directories_and_no_copy() {
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("host/etc");
        fs::create_dir_all(&etc).unwrap();
        fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o751)).unwrap();
        let sys = t.path().join("root");
        let layout = lay_out_from(&t.path().join("host"), &sys, EtcKind::Overlay).unwrap();
        assert_eq!(
            (layout.etc, layout.entries, layout.bytes),
            (EtcKind::Overlay, 0, 0)
        );
        assert!(!sys.join("etc").exists(), "no copy");
        let upper = fs::symlink_metadata(sys.join("etc.upper")).unwrap();
        assert_eq!(
            upper.mode() & 0o7777,
            0o751,
            "the overlay's top takes the host's mode"
        );
        let host = fs::symlink_metadata(&etc).unwrap();
        assert_eq!((upper.uid(), upper.gid()), (host.uid(), host.gid()));
        for d in ["etc.upper", "etc.work", "tmp", "var/tmp", "root", "home"] {
            assert_eq!(
                fs::read_dir(sys.join(d)).unwrap().count(),
                0,
                "{d} is empty"
            );
        }
        fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_fallback_copy_replaces_a_half_copy_and_lands_in_place() {
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("host/etc");
        fs::create_dir_all(etc.join("ssh")).unwrap();
        fs::write(etc.join("ssh/sshd_config"), "PermitRootLogin no\n").unwrap();
        let sys = t.path().join("root");
        lay_out_from(&t.path().join("host"), &sys, EtcKind::Overlay).unwrap();
        // What a start killed while copying left.
        fs::create_dir_all(sys.join(".etc.copying/half")).unwrap();
        let layout =
            copy_instead_of_overlay(&t.path().join("host"), &sys, "/etc", euid_is_root()).unwrap();
        assert_eq!(layout.entries, 3, "etc, ssh, sshd_config");
        assert_eq!(
            fs::read_to_string(sys.join("etc/ssh/sshd_config")).unwrap(),
            "PermitRootLogin no\n"
        );
        assert!(!sys.join("etc/half").exists() && !sys.join(".etc.copying").exists());
    }

    #[test]
    fn a_mounted_host_file_is_seeded_into_the_upper_directory_once() {
        let t = tempfile::tempdir().unwrap();
        let etc = t.path().join("etc");
        fs::create_dir_all(etc.join("net/d")).unwrap();
        fs::set_permissions(etc.join("net"), fs::Permissions::from_mode(0o750)).unwrap();
        fs::write(etc.join("net/d/resolv.conf"), "nameserver 10.0.0.2\n").unwrap();
        fs::set_permissions(
            etc.join("net/d/resolv.conf"),
            fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let upper = t.path().join("etc.upper");
        fs::create_dir(&upper).unwrap();
        let rel = Path::new("net/d/resolv.conf");
        assert!(seed_upper(&etc, &upper, rel).unwrap());
        assert_eq!(
            fs::read_to_string(upper.join(rel)).unwrap(),
            "nameserver 10.0.0.2\n"
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&upper.join(rel)), 0o640);
        assert_eq!(mode(&upper.join("net")), 0o750);
        // The VM's own version stays.
        fs::write(upper.join(rel), "nameserver 127.0.0.1\n").unwrap();
        assert!(!seed_upper(&etc, &upper, rel).unwrap());
        assert_eq!(
            fs::read_to_string(upper.join(rel)).unwrap(),
            "nameserver 127.0.0.1\n"
        );
    }

    #[test]
    fn paths_derive_from_the_vm_root() {
        let vcap = Path::new("/s/local-cpi/vms/vm-1/vcap");
        assert_eq!(
            system_dir_of(vcap).unwrap(),
            Path::new("/s/local-cpi/vms/vm-1/root")
        );
        assert_eq!(disks_dir_of(vcap).unwrap(), Path::new("/s/local-cpi/disks"));
        assert_eq!(
            copy_of(Path::new("/r"), "/var/tmp"),
            Path::new("/r/var/tmp")
        );
        assert_eq!(upper_of(Path::new("/r"), "/etc"), Path::new("/r/etc.upper"));
        assert_eq!(work_of(Path::new("/r"), "/etc"), Path::new("/r/etc.work"));
    }
}

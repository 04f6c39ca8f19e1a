//! The local CPI's on-disk primitives: staging directories built aside
//! under a lock and swept after a crash, atomic record writes and removals,
//! tree copies, and the check that a cid is a safe file name.
//!
//! This module must not know what a VM, disk or stemcell is: it works on
//! paths only, and never recurses into a mounted file system.

use std::fs;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use bosun_cpi::records;
use serde::{Deserialize, Serialize};

use crate::{io_err, LocalCpiError, Result};

/// How old a trash (`.deleting-*`) directory, or a staging one without its
/// lock file, must be to count as left behind by a crash: each lives for
/// milliseconds.
pub(crate) const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Prefix of staging directories (and of their lock files).
pub(crate) const STAGING_PREFIX: &str = ".creating-";
/// Suffix of a staging directory's lock file.
pub(crate) const LOCK_SUFFIX: &str = ".lock";

/// A directory being built aside (`<parent>/.creating-<name>`, 0700) before
/// it is renamed into place. While it lives, its lock file
/// (`.creating-<name>.lock`, created first) is locked (flock), so a sweep
/// ([`sweep_staging`]) tells a staging directory in use from one whose
/// builder died (a crash or abort releases the lock): that one is removed at
/// once, whatever its age. Dropped without [`Staging::commit`], the
/// directory is removed.
pub(crate) struct Staging {
    pub(crate) path: PathBuf,
    pub(crate) lock_path: PathBuf,
    _lock: fs::File,
}

impl Staging {
    pub(crate) fn create(parent: &Path, name: &str) -> Result<Staging> {
        use std::os::unix::fs::DirBuilderExt;
        let path = parent.join(format!("{STAGING_PREFIX}{name}"));
        let lock_path = parent.join(format!("{STAGING_PREFIX}{name}{LOCK_SUFFIX}"));
        // The lock file is locked before it gets its name: a sweep running
        // at the same moment never finds it unlocked and takes it. (A file
        // left under the new name by a crash is swept once abandoned.)
        let fresh = parent.join(format!("{STAGING_PREFIX}{name}{LOCK_SUFFIX}-new"));
        let lock = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&fresh)
            .map_err(io_err("creating", &fresh))?;
        let locked = try_lock(&lock).map_err(io_err("locking", &fresh));
        if !matches!(locked, Ok(true)) {
            if let Err(e) = fs::remove_file(&fresh) {
                tracing::warn!(path = %fresh.display(), error = %e, "local CPI: cannot remove a staging lock file");
            }
            return Err(locked.err().unwrap_or_else(|| {
                LocalCpiError::Internal(format!("{} is locked by another process", fresh.display()))
            }));
        }
        if lock_path.exists() {
            if let Err(e) = fs::remove_file(&fresh) {
                tracing::warn!(path = %fresh.display(), error = %e, "local CPI: cannot remove a staging lock file");
            }
            return Err(LocalCpiError::Internal(format!(
                "{} exists already",
                lock_path.display()
            )));
        }
        fs::rename(&fresh, &lock_path).map_err(io_err("renaming into place", &lock_path))?;
        let staging = Staging {
            path,
            lock_path,
            _lock: lock,
        };
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging.path)
            .map_err(io_err("creating", &staging.path))?;
        Ok(staging)
    }

    /// Renames the directory into place (then the lock file goes).
    pub(crate) fn commit(self, dest: &Path) -> Result<()> {
        fs::rename(&self.path, dest).map_err(io_err("renaming into place", dest))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Committed: the directory is gone already. Otherwise a failed build.
        match fs::remove_dir_all(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %self.path.display(), error = %e, "local CPI: cannot remove a staging directory")
            }
            _ => {}
        }
        if let Err(e) = fs::remove_file(&self.lock_path) {
            tracing::warn!(path = %self.lock_path.display(), error = %e, "local CPI: cannot remove a staging lock file");
        }
    }
}

/// Takes an exclusive flock without waiting: false when another open file
/// holds it.
pub(crate) fn try_lock(file: &fs::File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Removes what a crash left in `dir`: staging directories whose builder is
/// gone (their lock file unlocked; without one, older than
/// [`ABANDONED_AFTER`]), their lock files, and trash directories older than
/// [`ABANDONED_AFTER`]. Best effort: failures are logged.
pub(crate) fn sweep_staging(dir: &Path) {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(path = %dir.display(), error = %e, "local CPI: cannot list for leftovers of a crash");
            return;
        }
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if let Some(staged) = name
            .strip_prefix(STAGING_PREFIX)
            .and_then(|n| n.strip_suffix(LOCK_SUFFIX))
        {
            remove_if_builder_gone(&dir.join(format!("{STAGING_PREFIX}{staged}")), &path);
        } else if name.starts_with(STAGING_PREFIX) {
            let lock = dir.join(format!("{name}{LOCK_SUFFIX}"));
            if !lock.exists() {
                remove_if_abandoned(&path);
            }
        } else if name.starts_with(".deleting-") {
            remove_if_abandoned(&path);
        }
    }
}

/// Removes `staging` and its lock file when no process holds the lock.
pub(crate) fn remove_if_builder_gone(staging: &Path, lock_path: &Path) {
    let lock = match fs::File::open(lock_path) {
        Ok(f) => f,
        // Committed or removed meanwhile.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot open a staging lock file");
            return;
        }
    };
    match try_lock(&lock) {
        Ok(true) => {}
        Ok(false) => return, // in use
        Err(e) => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot lock a staging lock file");
            return;
        }
    }
    match fs::remove_dir_all(staging) {
        Ok(()) => {
            tracing::info!(path = %staging.display(), "local CPI: removed a directory left by a crash")
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %staging.display(), error = %e, "local CPI: cannot remove a directory left by a crash");
            return;
        }
    }
    match fs::remove_file(lock_path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %lock_path.display(), error = %e, "local CPI: cannot remove a staging lock file")
        }
        _ => {}
    }
}

/// Remove `path` when it is older than [`ABANDONED_AFTER`] (best effort).
pub(crate) fn remove_if_abandoned(path: &Path) {
    let old = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age > ABANDONED_AFTER);
    if old {
        let removed = if path.is_dir() {
            fs::remove_dir_all(path)
        } else {
            fs::remove_file(path)
        };
        match removed {
            Ok(()) => {
                tracing::info!(path = %path.display(), "local CPI: removed a directory left by a crash")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "local CPI: cannot remove a directory left by a crash")
            }
        }
    }
}

/// A cid is used as a file name: only `[A-Za-z0-9._-]`, not starting with a dot.
pub(crate) fn valid_cid(cid: &str) -> bool {
    !cid.is_empty()
        && !cid.starts_with('.')
        && cid.len() <= 200
        && cid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    Ok(records::write_atomic(path, bytes, mode)?)
}

pub(crate) fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T, mode: u32) -> Result<()> {
    Ok(records::write_json(path, value, mode)?)
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    Ok(records::read_json(path)?)
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    Ok(records::remove_file_if_exists(path)?)
}

/// A mount point at or below `path`, as this process sees the mounts.
pub(crate) fn mount_point_under(path: &Path) -> Option<String> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let base = path.to_string_lossy().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| m.replace("\\040", " "))
        .find(|m| m == &base || m.starts_with(&format!("{base}/")))
}

/// Removes a directory tree: renamed aside first so it disappears at once.
pub(crate) fn remove_dir_atomic(path: &Path) -> Result<()> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(LocalCpiError::Internal(format!(
            "refusing to remove {}",
            path.display()
        )));
    };
    // Never recurse into a mounted persistent disk: that would delete its data.
    if let Some(mount) = mount_point_under(path) {
        return Err(LocalCpiError::Internal(format!(
            "refusing to remove {}: {} is mounted inside it (a persistent disk?); unmount it first",
            path.display(),
            mount
        )));
    }
    let trash = dir.join(format!(
        ".deleting-{}-{}",
        name.to_string_lossy(),
        uuid::Uuid::new_v4()
    ));
    match fs::rename(path, &trash) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("moving aside for removal", path)(e)),
    }
    match fs::remove_dir_all(&trash) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // Without root, a directory a VM made read-only (in its own /tmp,
            // say) is emptied once its owner (the caller) may write it again.
            open_up_dirs(&trash);
            fs::remove_dir_all(&trash).map_err(io_err("removing", &trash))
        }
        other => other.map_err(io_err("removing", &trash)),
    }
}

/// Adds u+rwx to every directory below `dir` the caller owns (best effort:
/// the removal that follows reports what still cannot go).
fn open_up_dirs(dir: &Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o700 != 0o700 {
        let mode = (meta.mode() & 0o7777) | 0o700;
        if let Err(e) = fs::set_permissions(dir, fs::Permissions::from_mode(mode)) {
            tracing::debug!(path = %dir.display(), error = %e, "local CPI: cannot open up a directory for removal");
        }
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            open_up_dirs(&entry.path());
        }
    }
}

/// Copies a directory tree (files, directories, symlinks; permissions kept).
pub(crate) fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir(to).map_err(io_err("creating", to))?;
    let perms = fs::metadata(from)
        .map_err(io_err("inspecting", from))?
        .permissions();
    for entry in fs::read_dir(from).map_err(io_err("listing", from))? {
        let entry = entry.map_err(io_err("listing", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let ty = entry.file_type().map_err(io_err("inspecting", &src))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_symlink() {
            let target = fs::read_link(&src).map_err(io_err("reading link", &src))?;
            std::os::unix::fs::symlink(&target, &dst).map_err(io_err("creating link", &dst))?;
        } else if ty.is_file() {
            fs::copy(&src, &dst).map_err(io_err("copying to", &dst))?;
        }
        // Sockets, fifos and devices are not data: skipped.
    }
    fs::set_permissions(to, perms).map_err(io_err("setting permissions of", to))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removing_a_dir_never_recurses_into_a_mounted_disk() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: this test needs root to bind-mount"
            );
            eprintln!("skipped: needs root to bind-mount (not in CI)");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let disk = t.path().join("disk");
        let vm = t.path().join("vm");
        fs::create_dir_all(&disk).unwrap();
        fs::create_dir_all(vm.join("store")).unwrap();
        fs::write(disk.join("precious"), "data").unwrap();
        let c = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        let (src, dst) = (c(&disk), c(&vm.join("store")));
        // SAFETY: valid NUL-terminated paths; a bind mount of our own temp dir.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "bind mount: {}", io::Error::last_os_error());
        let err = remove_dir_atomic(&vm).unwrap_err().to_string();
        // SAFETY: unmounting the mount made above.
        unsafe { libc::umount2(dst.as_ptr(), libc::MNT_DETACH) };
        assert!(err.contains("is mounted inside it"), "{err}");
        assert_eq!(fs::read_to_string(disk.join("precious")).unwrap(), "data");
        remove_dir_atomic(&vm).unwrap();
        assert!(!vm.exists());
    }

    #[test]
    fn removing_a_dir_opens_up_read_only_directories_first() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        let locked = vm.join("root/tmp/locked");
        fs::create_dir_all(locked.join("inner")).unwrap();
        fs::write(locked.join("inner/file"), "x").unwrap();
        for d in [locked.join("inner"), locked.clone()] {
            fs::set_permissions(&d, fs::Permissions::from_mode(0o500)).unwrap();
        }
        remove_dir_atomic(&vm).unwrap();
        assert!(!vm.exists());
        let left: Vec<_> = fs::read_dir(t.path()).unwrap().collect();
        assert!(left.is_empty(), "trash left: {left:?}");
    }

    #[test]
    fn cids_are_file_names() {
        assert!(valid_cid("vm-1234"));
        assert!(!valid_cid(""));
        assert!(!valid_cid(".."));
        assert!(!valid_cid("a/b"));
        assert!(!valid_cid(".creating-vm-1"));
    }
}

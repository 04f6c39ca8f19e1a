//! The on-VM file layout: checking an apply spec, installing package blobs
//! under `data/packages` with `packages/<name>` links, writing rendered jobs
//! to `jobs/<name>` (owner and group only) and swapping them in atomically,
//! and removing what the applied spec no longer names.
//!
//! It must not run scripts or start processes (that is `scripts` and the
//! supervisor), and must never log rendered file contents (they carry
//! secrets).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path};

use super::system::{cpath, unpack_tgz};
use super::{failure, io_fail, rand_suffix, short};
use crate::blobs::BlobStore;
use crate::protocol::{ActionFailure, ApplySpec, FetchLogsResult, RenderedJob};

/// Rendered job files (templates carry secrets): owner and group only.
const JOB_FILE_MODE: u32 = 0o640;
/// Executables of a job (`bin/` and files rendered executable).
const JOB_EXEC_MODE: u32 = 0o750;
/// A job's directories (`jobs/<name>` and below).
const JOB_DIR_MODE: u32 = 0o750;
/// The group given read access to rendered job files, where the VM has it
/// (BOSH's stemcells do); elsewhere they stay the agent's (root's) alone.
const JOB_GROUP: &str = "vcap";
/// Where [`JOB_GROUP`] is looked up.
const GROUP_FILE: &str = "/etc/group";

/// A name usable as one path component (jobs, packages, processes, scripts).
pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('.')
        && !s.contains('/')
        && !s.contains('\0')
}

/// A relative path without `..`, absolute or empty components.
fn valid_rel_path(p: &str) -> bool {
    !p.is_empty()
        && !p.contains('\0')
        && Path::new(p)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

pub(super) fn validate_spec(spec: &ApplySpec) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for p in &spec.packages {
        if !valid_name(&p.name) {
            return Err(format!("invalid package name {:?}", p.name));
        }
        if !seen.insert(&p.name) {
            return Err(format!("package {} named twice", p.name));
        }
        if p.sha256.is_empty() || !p.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("package {}: invalid sha256", p.name));
        }
    }
    let mut seen = BTreeSet::new();
    for j in &spec.jobs {
        if !valid_name(&j.name) {
            return Err(format!("invalid job name {:?}", j.name));
        }
        if !seen.insert(&j.name) {
            return Err(format!("job {} named twice", j.name));
        }
        for f in &j.files {
            if !valid_rel_path(&f.path) {
                return Err(format!("job {}: invalid file path {:?}", j.name, f.path));
            }
        }
    }
    Ok(())
}

/// Installs packages, writes changed jobs, removes what the spec no longer names.
pub(super) fn lay_down(
    root: &Path,
    blobs: &BlobStore,
    spec: &ApplySpec,
    current: Option<&ApplySpec>,
    op: &str,
) -> Result<(), ActionFailure> {
    for p in &spec.packages {
        install_package(root, blobs, &p.name, &p.sha256).map_err(io_fail(format!(
            "{op}: installing package {} blob {}",
            p.name,
            short(&p.sha256)
        )))?;
    }
    let jobs_dir = root.join("jobs");
    let group = group_id(Path::new(GROUP_FILE), JOB_GROUP).map_err(io_fail(format!(
        "{op}: looking up group {JOB_GROUP} in {GROUP_FILE}"
    )))?;
    for j in &spec.jobs {
        let unchanged = current
            .and_then(|c| c.jobs.iter().find(|o| o.name == j.name))
            .is_some_and(|o| o == j)
            && job_dir_is_current(&jobs_dir.join(&j.name), group);
        if !unchanged {
            write_job(&jobs_dir, j, group)
                .map_err(io_fail(format!("{op}: writing job {}", j.name)))?;
        }
    }

    // Jobs the spec does not name (their processes are already stopped), and
    // leftovers of interrupted swaps.
    let named_jobs: BTreeSet<&str> = spec.jobs.iter().map(|j| j.name.as_str()).collect();
    for e in fs::read_dir(&jobs_dir)
        .map_err(io_fail(format!("{op}: listing jobs")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !named_jobs.contains(name.as_str()) {
            remove_any(&e.path()).map_err(io_fail(format!("{op}: removing job {name}")))?;
        }
    }

    // Packages: keep the spec's versions (and the previous spec's, which
    // running processes of changed jobs may still use until restarted).
    let mut keep: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for p in &spec.packages {
        keep.entry(&p.name).or_default().insert(&p.sha256);
    }
    let links = root.join("packages");
    for e in fs::read_dir(&links)
        .map_err(io_fail(format!("{op}: listing packages")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.contains_key(name.as_str()) {
            remove_any(&e.path()).map_err(io_fail(format!("{op}: removing package {name}")))?;
        }
    }
    if let Some(cur) = current {
        for p in &cur.packages {
            if let Some(k) = keep.get_mut(p.name.as_str()) {
                k.insert(&p.sha256);
            }
        }
    }
    let store = root.join("data/packages");
    for e in fs::read_dir(&store)
        .map_err(io_fail(format!("{op}: listing package store")))?
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        match keep.get(name.as_str()) {
            None => {
                remove_any(&e.path()).map_err(io_fail(format!("{op}: removing package {name}")))?
            }
            Some(shas) => {
                for v in fs::read_dir(e.path())
                    .map_err(io_fail(format!("{op}: listing package {name}")))?
                    .flatten()
                {
                    let sha = v.file_name().to_string_lossy().into_owned();
                    if !shas.contains(sha.as_str()) {
                        remove_any(&v.path()).map_err(io_fail(format!(
                            "{op}: removing package {name} version {}",
                            short(&sha)
                        )))?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Unpacks a package blob to `data/packages/<name>/<sha>` (once) and points
/// `packages/<name>` at it atomically.
pub(super) fn install_package(
    root: &Path,
    blobs: &BlobStore,
    name: &str,
    sha: &str,
) -> io::Result<()> {
    let store = root.join("data/packages").join(name);
    fs::create_dir_all(&store)?;
    let target = store.join(sha);
    if !target.is_dir() {
        let tmp = store.join(format!(".tmp-{}", rand_suffix()));
        fs::create_dir_all(&tmp)?;
        if let Err(e) = unpack_tgz(&blobs.path(sha), &tmp).and_then(|()| fs::rename(&tmp, &target))
        {
            remove_leftover(&tmp);
            return Err(e);
        }
    }
    let link = root.join("packages").join(name);
    if let Ok(md) = fs::symlink_metadata(&link) {
        if md.file_type().is_symlink()
            && fs::read_link(&link).ok().as_deref() == Some(target.as_path())
        {
            return Ok(());
        }
        if !md.file_type().is_symlink() {
            // A compilation install target, or junk: make room for the link.
            remove_any(&link)?;
        }
    }
    let tmp_link = root
        .join("packages")
        .join(format!(".{name}.link-{}", rand_suffix()));
    std::os::unix::fs::symlink(&target, &tmp_link)?;
    if let Err(e) = fs::rename(&tmp_link, &link) {
        remove_leftover(&tmp_link);
        return Err(e);
    }
    Ok(())
}

/// The gid of `name` in a group file (`name:x:gid:members` lines); None
/// when the file or the group does not exist.
fn group_id(group_file: &Path, name: &str) -> io::Result<Option<u32>> {
    let text = match fs::read_to_string(group_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next() == Some(name))
            .then(|| fields.nth(1)?.trim().parse().ok())
            .flatten()
    }))
}

/// Whether a job directory exists with the mode (and group) this agent lays
/// job directories down with; one written otherwise (by an older agent)
/// is rewritten.
fn job_dir_is_current(dir: &Path, group: Option<u32>) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(dir).is_ok_and(|md| {
        md.is_dir() && md.mode() & 0o7777 == JOB_DIR_MODE && group.is_none_or(|gid| md.gid() == gid)
    })
}

/// Gives a job's file or directory to `group` (owner unchanged: the agent,
/// root) and sets its mode, in that order (chown clears set-id bits).
fn restrict(path: &Path, group: Option<u32>, mode: u32) -> io::Result<()> {
    if let Some(gid) = group {
        std::os::unix::fs::lchown(path, None, Some(gid))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// Creates the directories from `base` down to `dir` that do not exist yet,
/// each [`JOB_DIR_MODE`] and given to `group`.
fn make_job_dirs(base: &Path, dir: &Path, group: Option<u32>) -> io::Result<()> {
    let Ok(rel) = dir.strip_prefix(base) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not under {}", dir.display(), base.display()),
        ));
    };
    let mut at = base.to_path_buf();
    for part in rel.components() {
        at.push(part);
        match fs::DirBuilder::new().mode(0o700).create(&at) {
            Ok(()) => restrict(&at, group, JOB_DIR_MODE)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && at.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a job's files to a fresh dir and swaps it in as `jobs/<name>`.
/// Files are [`JOB_FILE_MODE`] ([`JOB_EXEC_MODE`] for executables) and
/// directories [`JOB_DIR_MODE`], owned by the agent with group `group`;
/// nothing is readable by others at any moment (the fresh dir is 0700 until
/// complete).
fn write_job(jobs_dir: &Path, job: &RenderedJob, group: Option<u32>) -> io::Result<()> {
    let fresh = jobs_dir.join(format!(".{}.new-{}", job.name, rand_suffix()));
    let res = (|| {
        fs::DirBuilder::new().mode(0o700).create(&fresh)?;
        for f in &job.files {
            let path = fresh.join(&f.path);
            if let Some(parent) = path.parent() {
                make_job_dirs(&fresh, parent, group)?;
            }
            let exec = f.executable || Path::new(&f.path).starts_with("bin");
            let mode = if exec { JOB_EXEC_MODE } else { JOB_FILE_MODE };
            let mut out = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            out.write_all(f.content.as_bytes())?;
            if let Some(gid) = group {
                std::os::unix::fs::fchown(&out, None, Some(gid))?;
            }
            out.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        restrict(&fresh, group, JOB_DIR_MODE)?;
        let dest = jobs_dir.join(&job.name);
        if fs::symlink_metadata(&dest).is_ok() {
            if rename_exchange(&fresh, &dest).is_ok() {
                // `fresh` now holds the old contents.
                return fs::remove_dir_all(&fresh);
            }
            let old = jobs_dir.join(format!(".{}.old-{}", job.name, rand_suffix()));
            fs::rename(&dest, &old)?;
            fs::rename(&fresh, &dest)?;
            remove_any(&old)
        } else {
            fs::rename(&fresh, &dest)
        }
    })();
    if res.is_err() {
        remove_leftover(&fresh);
    }
    res
}

/// Atomically exchanges two paths (renameat2 RENAME_EXCHANGE).
fn rename_exchange(a: &Path, b: &Path) -> io::Result<()> {
    const RENAME_EXCHANGE: libc::c_uint = 2;
    let (ca, cb) = (cpath(a)?, cpath(b)?);
    // SAFETY: renameat2 with valid NUL-terminated paths.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Removes a file, symlink (not its target) or directory tree; absent is fine.
pub(super) fn remove_any(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(md) if md.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
    }
}

/// Removes what an operation leaves behind (a temporary file, link or
/// directory); a failure is logged, not returned: the operation's own
/// result stands.
pub(super) fn remove_leftover(p: &Path) {
    if let Err(e) = remove_any(p) {
        tracing::warn!(path = %p.display(), error = %e, "removing a leftover failed");
    }
}

pub(super) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", rand_suffix()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if res.is_err() {
        remove_leftover(&tmp);
    }
    res
}

/// Have `write` make a file at `tmp`, keep it as a blob, remove `tmp`
/// whatever happened: the blob's sha256 and size.
pub(super) fn blob_from_tmp(
    blobs: &BlobStore,
    tmp: &Path,
    op: &str,
    write: impl FnOnce(&Path) -> Result<(), ActionFailure>,
) -> Result<FetchLogsResult, ActionFailure> {
    let res = (|| {
        if let Some(d) = tmp.parent() {
            fs::create_dir_all(d).map_err(io_fail(op))?;
        }
        write(tmp)?;
        let size = fs::metadata(tmp).map_err(io_fail(op))?.len();
        let sha256 = blobs.put_file(tmp).map_err(|e| {
            failure(
                "io",
                format!("{op}: storing blob: {}", bosun_cpi::chain::chain(&e)),
            )
        })?;
        Ok(FetchLogsResult { sha256, size })
    })();
    remove_leftover(tmp);
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::tests::{file, job};

    #[test]
    fn job_files_are_for_owner_and_group_only() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let jobs = tmp.path().join("jobs");
        fs::create_dir(&jobs).unwrap();
        let mut run = file("bin/run", "#!/bin/sh\n");
        run.executable = false;
        let mut tool = file("libexec/tool", "#!/bin/sh\n");
        tool.executable = true;
        let kv = job(
            "kv",
            vec![
                file("config/deep/er/secret.conf", "password=s3cr3t\n"),
                run,
                tool,
            ],
        );
        // nogroup's gid: any group the test (root) can give files to.
        let gid = 65534;
        write_job(&jobs, &kv, Some(gid)).unwrap();
        let md = |p: &str| fs::symlink_metadata(jobs.join("kv").join(p)).unwrap();
        for (p, mode) in [
            ("", 0o750),
            ("config", 0o750),
            ("config/deep", 0o750),
            ("config/deep/er", 0o750),
            ("config/deep/er/secret.conf", 0o640),
            ("bin", 0o750),
            ("bin/run", 0o750),
            ("libexec/tool", 0o750),
        ] {
            assert_eq!(md(p).mode() & 0o7777, mode, "mode of {p:?}");
            assert_eq!(md(p).gid(), gid, "group of {p:?}");
        }
        assert!(job_dir_is_current(&jobs.join("kv"), Some(gid)));
        assert!(!job_dir_is_current(&jobs.join("kv"), Some(gid + 1)));
        // Without the group, files stay the agent's own group.
        write_job(&jobs, &kv, None).unwrap();
        let own = fs::metadata(&jobs).unwrap().gid();
        assert_eq!(md("config/deep/er/secret.conf").gid(), own);
        assert_eq!(md("config/deep/er/secret.conf").mode() & 0o777, 0o640);
    }

    #[test]
    fn group_ids_from_a_group_file() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("group");
        fs::write(
            &f,
            "root:x:0:\nvcapx:x:7:\nvcap:x:1000:alice,bob\nbroken:x\n",
        )
        .unwrap();
        assert_eq!(group_id(&f, "vcap").unwrap(), Some(1000));
        assert_eq!(group_id(&f, "root").unwrap(), Some(0));
        assert_eq!(group_id(&f, "vca").unwrap(), None);
        assert_eq!(group_id(&f, "broken").unwrap(), None);
        assert_eq!(group_id(&tmp.path().join("none"), "vcap").unwrap(), None);
    }

    #[test]
    fn relative_paths() {
        assert!(valid_rel_path("bin/ctl"));
        assert!(!valid_rel_path("/etc/passwd"));
        assert!(!valid_rel_path("a/../../b"));
    }
}

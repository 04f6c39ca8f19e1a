//! The VM namespace, entered by the agent process itself before anything
//! else runs: mount and PID namespaces (plus a user namespace when not
//! root), the VM directory bound at `/var/vcap`, a fresh `/proc`, the VM's
//! own `/etc` (an overlay over the host's, or a copy) and its `/tmp`,
//! `/var/tmp`, `/root` and `/home` put over the host's (see
//! [`crate::sysdirs`]), and a parent that forwards signals to the
//! namespace's PID 1.
//!
//! This module must not be called once threads exist (it forks), and must
//! not know the CPI's records: it only gets the VM directory (and finds its
//! siblings through [`crate::sysdirs`]).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

use crate::sysdirs::{self, Content, COVERED};
use crate::{LocalCpiError, Result, VCAP_MOUNT_POINT};

/// The namespace's PID 1, for the parent's signal forwarder.
static CHILD_PID: AtomicI32 = AtomicI32::new(0);
/// How many terminating signals the parent has forwarded.
static SIGNALS_FORWARDED: AtomicI32 = AtomicI32::new(0);
/// How long PID 1 of a VM namespace gets to exit after a forwarded signal
/// before it is SIGKILLed (PID 1 ignores signals it has no handler for).
pub const SIGNAL_GRACE_SECS: u32 = 30;

/// Forwards the signal to the namespace's PID 1; escalates to SIGKILL on a
/// second signal or when the grace period (SIGALRM) runs out.
extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid <= 0 {
        return;
    }
    let forwarded = SIGNALS_FORWARDED.fetch_add(1, Ordering::SeqCst);
    // SAFETY: kill(2) and alarm(2) are async-signal-safe.
    unsafe {
        if sig == libc::SIGALRM || forwarded > 0 {
            libc::kill(pid, libc::SIGKILL);
        } else {
            libc::kill(pid, sig);
            libc::alarm(SIGNAL_GRACE_SECS);
        }
    }
}

fn last_os_error(step: &'static str, hint: impl Into<String>) -> LocalCpiError {
    LocalCpiError::Namespace {
        step,
        hint: hint.into(),
        source: io::Error::last_os_error(),
    }
}

fn cstring(p: &Path, step: &'static str) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| LocalCpiError::Namespace {
        step,
        hint: String::new(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

fn write_proc_file(path: &str, content: &str, step: &'static str) -> Result<()> {
    fs::write(path, content).map_err(|source| LocalCpiError::Namespace {
        step,
        hint: format!("; writing {path}"),
        source,
    })
}

/// Called by the `bosun agent` entry point BEFORE any threads or the tokio runtime exist,
/// when it was given `--vm-root DIR`: unshare mount+PID (+user if not root) namespaces, fork;
/// the parent waits for the child and exits the process with its status (forwarding SIGTERM/SIGINT to it);
/// the child (PID 1 of the new namespace; PR_SET_PDEATHSIG=SIGKILL so it dies with the parent)
/// makes mounts private, bind-mounts DIR at /var/vcap (as root, create /var/vcap on the host if missing;
/// not root and missing: error saying `sudo mkdir /var/vcap` once), mounts a new proc at /proc,
/// puts the VM's own system directories (laid out by the CPI in `<DIR>/../root`) over the host's,
/// and returns Ok(()) so the caller runs the agent. Errors name the step and the missing capability.
///
/// `/etc`: a copy the VM has (`root/etc`) is bound. Otherwise, as root, an overlay is mounted with
/// the host's `/etc` below and `root/etc.upper` (work directory `root/etc.work`) on top; files the
/// host has mounted below `/etc` are first copied into the upper directory (the overlay would hide
/// them). When the overlay mount fails, and always without root, the host's `/etc` is copied into
/// `root/etc` at this start and bound; later starts keep that copy. `agent.log` says which was used.
/// `/tmp`, `/var/tmp`, `/root` and `/home` are the VM's directories bound over the host's.
///
/// A covered host path that does not exist is created (empty) as root; without root it is left
/// uncovered with a warning on stderr (writes there fail: the host path's parent is root's). When the
/// CPI's `disks/` lies below a covered path (a state directory in `/tmp` or `/root`), it is bound
/// back at its own path, so the disk hints stay valid inside the VM.
///
/// PID 1 ignores signals it installs no handler for, so the parent escalates
/// to SIGKILL on a second terminating signal or [`SIGNAL_GRACE_SECS`] after the first.
pub fn enter_vm_namespace(vm_dir: &Path) -> Result<(), LocalCpiError> {
    let (vm_dir, vm_dir_c) = resolve_vm_root(vm_dir)?;
    // SAFETY: plain syscalls without memory-safety preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let root = euid == 0;
    ensure_mount_point(root)?;
    let covers = plan_covers(&vm_dir, root)?;
    unshare_namespaces(root)?;
    if !root {
        map_caller_to_root(euid, egid)?;
    }
    fork_into_pid_namespace()?;
    // The child: PID 1 of the new namespace.
    die_with_parent()?;
    make_mounts_private()?;
    bind_vm_root(&vm_dir, &vm_dir_c)?;
    mount_proc()?;
    cover_host_dirs(&covers)
}

/// A directory to put over a host path.
struct Cover {
    /// What is bound there (for an overlay: its lower directory, the host's).
    source_path: PathBuf,
    /// The host path (resolved) it covers.
    target: PathBuf,
    /// The target is created first (inside the namespace: below a cover).
    create_target: bool,
    how: How,
}

/// How a cover is put over its host path.
enum How {
    /// Bind-mounted: an empty directory of the VM's, its copy of `/etc`, or the disks.
    Bind,
    /// An overlay with the host's directory below and the VM's upper and
    /// work directories; when it cannot be mounted, a copy of the host's
    /// directory, made now and bound.
    Overlay {
        system_dir: PathBuf,
        host: &'static str,
    },
    /// No copy yet and no overlay possible: the host's directory is copied
    /// into the VM's system directory at this start, then bound.
    CopyNow {
        system_dir: PathBuf,
        host: &'static str,
        why: &'static str,
    },
}

fn open_path(p: &Path, step: &'static str) -> Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(p)
        .map_err(|source| LocalCpiError::Namespace {
            step,
            hint: format!("; {}", p.display()),
            source,
        })
}

fn missing_system_dir(path: &Path) -> LocalCpiError {
    LocalCpiError::Namespace {
        step: "finding the VM's own system directories",
        hint: format!("; {} is missing", path.display()),
        source: io::Error::from(io::ErrorKind::NotFound),
    }
}

/// How the VM gets its own `host` (the `/etc` of [`Content::OverlayOfHost`]):
/// a copy it already has is bound (it keeps its changes there); otherwise an
/// overlay as root, and a copy made now without root (the host's root-owned
/// files could not be changed through an unprivileged overlay).
fn plan_overlay(system_dir: &Path, host: &'static str, root: bool) -> Result<(PathBuf, How)> {
    let copy = sysdirs::copy_of(system_dir, host);
    if copy.is_dir() {
        return Ok((copy, How::Bind));
    }
    let upper = sysdirs::upper_of(system_dir, host);
    if !upper.is_dir() {
        return Err(missing_system_dir(&upper));
    }
    let how = if root {
        How::Overlay {
            system_dir: system_dir.to_path_buf(),
            host,
        }
    } else {
        How::CopyNow {
            system_dir: system_dir.to_path_buf(),
            host,
            why:
                "not root: an overlay in a user namespace cannot change the host's root-owned files",
        }
    };
    Ok((PathBuf::from(host), how))
}

/// The VM's system directories to put over the host's, and the CPI's disks
/// directory when a cover would hide it. Creates a missing covered host path
/// as root.
fn plan_covers(vm_dir: &Path, root: bool) -> Result<Vec<Cover>> {
    let system_dir = sysdirs::system_dir_of(vm_dir).filter(|d| d.is_dir());
    let Some(system_dir) = system_dir else {
        return Err(LocalCpiError::Namespace {
            step: "finding the VM's own system directories",
            hint: format!(
                "; {}/../{} is missing (the local CPI lays it out when it creates or starts a VM)",
                vm_dir.display(),
                sysdirs::SYSTEM_DIR
            ),
            source: io::Error::from(io::ErrorKind::NotFound),
        });
    };
    let mut covers = Vec::new();
    for (host, content) in COVERED {
        let host_path = Path::new(host);
        if fs::symlink_metadata(host_path).is_err() {
            if !root {
                eprintln!(
                    "bosun VM namespace: warning: {host} does not exist on the host and only root can create it: the VM shares the host's (absent) {host}"
                );
                continue;
            }
            let mode = match content {
                Content::Empty(mode) => *mode,
                Content::OverlayOfHost => 0o755,
            };
            create_host_dir(host_path, mode)?;
        }
        let target = fs::canonicalize(host_path).map_err(|source| LocalCpiError::Namespace {
            step: "resolving a host directory to cover",
            hint: format!("; {host}"),
            source,
        })?;
        let (source_path, how) = match content {
            Content::OverlayOfHost => plan_overlay(&system_dir, host, root)?,
            Content::Empty(_) => {
                let source_path = sysdirs::copy_of(&system_dir, host);
                if !source_path.is_dir() {
                    return Err(missing_system_dir(&source_path));
                }
                (source_path, How::Bind)
            }
        };
        covers.push(Cover {
            source_path,
            target,
            create_target: false,
            how,
        });
    }
    if let Some(disks) = sysdirs::disks_dir_of(vm_dir).filter(|d| d.is_dir()) {
        let hidden = covers.iter().any(|c| disks.starts_with(&c.target));
        if hidden {
            covers.push(Cover {
                source_path: disks.clone(),
                target: disks,
                create_target: true,
                how: How::Bind,
            });
        }
    }
    Ok(covers)
}

/// Creates a missing covered host path (root only): an empty mount point.
fn create_host_dir(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let err = |source| LocalCpiError::Namespace {
        step: "creating a missing host directory to cover",
        hint: format!("; {}", path.display()),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(err)?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(err)
}

/// Puts every cover over its host path, in order. Every directory involved
/// is opened before the first mount (its path may lie below a covered one,
/// e.g. a state directory in `/tmp`), in this mount namespace (bind(2)
/// refuses a source opened in another one), and named as
/// `/proc/self/fd/<fd>`.
fn cover_host_dirs(covers: &[Cover]) -> Result<()> {
    let sources = covers
        .iter()
        .map(|c| open_path(&c.source_path, "opening a directory to put into the VM"))
        .collect::<Result<Vec<_>>>()?;
    // The system directory of an overlay or a copy made now.
    let system_dirs = covers
        .iter()
        .map(|c| match &c.how {
            How::Bind => Ok(None),
            How::Overlay { system_dir, .. } | How::CopyNow { system_dir, .. } => {
                open_path(system_dir, "opening the VM's system directory").map(Some)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    for ((c, fd), sys) in covers.iter().zip(&sources).zip(&system_dirs) {
        if c.create_target {
            fs::create_dir_all(&c.target).map_err(|source| LocalCpiError::Namespace {
                step: "creating the mount point of the CPI's disks directory",
                hint: format!("; {}", c.target.display()),
                source,
            })?;
        }
        let source = fd_path(fd);
        match (&c.how, sys) {
            (How::Bind, _) => bind(&source, c)?,
            (How::Overlay { host, .. }, Some(sys)) => {
                let sys = fd_path(sys);
                seed_mounted_files(&c.target, &sysdirs::upper_of(&sys, host))?;
                match mount_overlay(&source, &sys, host, &c.target) {
                    Ok(()) => eprintln!(
                        "bosun VM namespace: {host} is an overlay: the host's {host} below, the VM's changes in {}",
                        sysdirs::upper_of(&c_system_dir(c), host).display()
                    ),
                    Err(e) => {
                        let why = format!("cannot mount an overlay over {host} ({e})");
                        copy_now_and_bind(c, &sys, host, &why, true)?;
                    }
                }
            }
            (How::CopyNow { host, why, .. }, Some(sys)) => {
                copy_now_and_bind(c, &fd_path(sys), host, why, false)?;
            }
            (_, None) => {
                return Err(LocalCpiError::Internal(
                    "an overlay cover without its system directory".into(),
                ))
            }
        }
    }
    Ok(())
}

fn fd_path(fd: &fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The VM's system directory of an overlay or copy cover, as the host names it.
fn c_system_dir(c: &Cover) -> PathBuf {
    match &c.how {
        How::Overlay { system_dir, .. } | How::CopyNow { system_dir, .. } => system_dir.clone(),
        How::Bind => PathBuf::new(),
    }
}

/// Binds `source` (a `/proc/self/fd/<fd>` path) over the cover's target.
fn bind(source: &Path, c: &Cover) -> Result<()> {
    let none: *const libc::c_char = std::ptr::null();
    let source = cstring(source, "binding the VM's own system directories")?;
    let target = cstring(&c.target, "binding the VM's own system directories")?;
    // SAFETY: valid NUL-terminated strings; null for unused arguments.
    if unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "binding the VM's own system directories",
            format!(
                "; {} over {} (needs CAP_SYS_ADMIN in the mount namespace)",
                c.source_path.display(),
                c.target.display()
            ),
        ));
    }
    Ok(())
}

/// Mounts an overlay at `target`: `lower` (the host's directory) below, the
/// VM's upper and work directories below `system_dir` on top. Returns the
/// kernel's refusal as is.
fn mount_overlay(lower: &Path, system_dir: &Path, host: &str, target: &Path) -> io::Result<()> {
    let upper = sysdirs::upper_of(system_dir, host);
    let work = sysdirs::work_of(system_dir, host);
    // /proc/self/fd/N/... paths: no commas, colons or backslashes to escape.
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let bad = || io::Error::new(io::ErrorKind::InvalidInput, "a path contains a NUL byte");
    let options = CString::new(options).map_err(|_| bad())?;
    let target = CString::new(target.as_os_str().as_bytes()).map_err(|_| bad())?;
    let overlay = c"overlay";
    // SAFETY: valid NUL-terminated strings; the data argument is the option string.
    if unsafe {
        libc::mount(
            overlay.as_ptr(),
            target.as_ptr(),
            overlay.as_ptr(),
            0,
            options.as_ptr().cast(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mount points strictly below `dir`, from `/proc/self/mountinfo`.
fn mount_points_below(dir: &Path) -> Result<Vec<PathBuf>> {
    let text =
        fs::read_to_string("/proc/self/mountinfo").map_err(|source| LocalCpiError::Namespace {
            step: "reading /proc/self/mountinfo",
            hint: String::new(),
            source,
        })?;
    Ok(text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .filter(|p| p != dir && p.starts_with(dir))
        .collect())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Before an overlay hides them: a file the host has mounted below `dir`
/// (a container's `/etc/resolv.conf`, `/etc/hosts`, `/etc/hostname`) is
/// copied into the VM's `upper` (at its first start; later it is the VM's
/// own). A mounted directory is left as the overlay shows it, with a warning.
fn seed_mounted_files(dir: &Path, upper: &Path) -> Result<()> {
    for mount_point in mount_points_below(dir)? {
        let Ok(rel) = mount_point.strip_prefix(dir) else {
            continue;
        };
        match fs::metadata(&mount_point) {
            Ok(m) if m.is_file() => {
                if sysdirs::seed_upper(dir, upper, rel)? {
                    eprintln!(
                        "bosun VM namespace: {} is a mount on the host: the VM got a copy of it",
                        mount_point.display()
                    );
                }
            }
            Ok(_) => eprintln!(
                "bosun VM namespace: warning: {} is a mount on the host: the VM's overlay shows what lies beneath it",
                mount_point.display()
            ),
            Err(e) => eprintln!(
                "bosun VM namespace: warning: {} is a mount on the host that cannot be inspected ({e}): the VM's overlay shows what lies beneath it",
                mount_point.display()
            ),
        }
    }
    Ok(())
}

/// The fallback for an overlay: copies the host's directory into the VM's
/// copy (kept: later starts bind it) and binds that. Owners are kept with
/// `keep_owners` (root on the host).
fn copy_now_and_bind(
    c: &Cover,
    system_dir: &Path,
    host: &'static str,
    why: &str,
    keep_owners: bool,
) -> Result<()> {
    let layout = sysdirs::copy_instead_of_overlay(Path::new("/"), system_dir, host, keep_owners)?;
    let copy = sysdirs::copy_of(&c_system_dir(c), host);
    eprintln!(
        "bosun VM namespace: warning: {why}: the VM uses a copy of the host's {host} instead, in {} ({} entries, {} bytes, copied in {} ms; later starts keep using it)",
        copy.display(),
        layout.entries,
        layout.bytes,
        layout.elapsed.as_millis()
    );
    if let Some(summary) = layout.skipped_summary() {
        eprintln!("bosun VM namespace: warning: the VM's copy of {host} lacks what could not be copied: {summary}");
    }
    let upper = sysdirs::upper_of(system_dir, host);
    let earlier = fs::read_dir(&upper).map(|mut d| d.next().is_some());
    if matches!(earlier, Ok(true)) {
        eprintln!(
            "bosun VM namespace: warning: the VM's earlier changes to {host} stay in {} and are not in its copy",
            sysdirs::upper_of(&c_system_dir(c), host).display()
        );
    }
    let copy_fd = open_path(
        &sysdirs::copy_of(system_dir, host),
        "opening the VM's copy of a host directory",
    )?;
    let bound = Cover {
        source_path: copy,
        target: c.target.clone(),
        create_target: false,
        how: How::Bind,
    };
    bind(&fd_path(&copy_fd), &bound)
}

/// The VM directory, absolute, and as a C string for mount(2).
fn resolve_vm_root(vm_dir: &Path) -> Result<(PathBuf, CString)> {
    let vm_dir = fs::canonicalize(vm_dir).map_err(|source| LocalCpiError::Namespace {
        step: "resolving the VM root",
        hint: format!("; {} must be an existing directory", vm_dir.display()),
        source,
    })?;
    if !vm_dir.is_dir() {
        return Err(LocalCpiError::Namespace {
            step: "resolving the VM root",
            hint: String::new(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", vm_dir.display()),
            ),
        });
    }
    let vm_dir_c = cstring(&vm_dir, "resolving the VM root")?;
    Ok((vm_dir, vm_dir_c))
}

/// Makes sure `/var/vcap` exists on the host: root creates it, anyone else
/// is told to create it once.
fn ensure_mount_point(root: bool) -> Result<()> {
    let mount_point = Path::new(VCAP_MOUNT_POINT);
    if mount_point.is_dir() {
        return Ok(());
    }
    if root {
        fs::create_dir_all(mount_point).map_err(|source| LocalCpiError::Namespace {
            step: "creating /var/vcap on the host",
            hint: String::new(),
            source,
        })
    } else {
        Err(LocalCpiError::Namespace {
            step: "finding the mount point /var/vcap",
            hint:
                "; it does not exist and only root can create it: run `sudo mkdir /var/vcap` once"
                    .into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        })
    }
}

/// Leaves the host's mount and PID namespaces (and, when not root, enters a
/// new user namespace); the caller becomes PID 1's parent at its next fork.
fn unshare_namespaces(root: bool) -> Result<()> {
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID;
    if !root {
        flags |= libc::CLONE_NEWUSER;
    }
    // SAFETY: unshare(2) has no memory-safety preconditions; the caller is single-threaded.
    if unsafe { libc::unshare(flags) } == 0 {
        return Ok(());
    }
    let hint = if root {
        "; needs CAP_SYS_ADMIN and a kernel with mount and PID namespaces (inside a container: --privileged or CAP_SYS_ADMIN with an unconfined seccomp profile)"
    } else {
        "; needs unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0, and for Ubuntu's AppArmor kernel.apparmor_restrict_unprivileged_userns=0) or running as root"
    };
    Err(last_os_error(
        if root {
            "unshare(mount, PID namespaces)"
        } else {
            "unshare(user, mount, PID namespaces)"
        },
        hint,
    ))
}

/// Maps the caller's uid and gid to root inside its new user namespace.
fn map_caller_to_root(euid: libc::uid_t, egid: libc::gid_t) -> Result<()> {
    write_proc_file(
        "/proc/self/setgroups",
        "deny",
        "denying setgroups in the user namespace",
    )?;
    write_proc_file(
        "/proc/self/uid_map",
        &format!("0 {euid} 1"),
        "mapping the caller's uid to 0 in the user namespace",
    )?;
    write_proc_file(
        "/proc/self/gid_map",
        &format!("0 {egid} 1"),
        "mapping the caller's gid to 0 in the user namespace",
    )
}

/// Forks: the parent never returns (it waits for the child and exits with
/// its status); the child, PID 1 of the new namespace, returns.
fn fork_into_pid_namespace() -> Result<()> {
    // SAFETY: the caller guarantees no other threads exist, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error(
            "fork into the new PID namespace",
            "; needs free PIDs (kernel.pid_max, ulimit -u)",
        ));
    }
    if pid > 0 {
        wait_and_exit(pid);
    }
    Ok(())
}

/// PR_SET_PDEATHSIG=SIGKILL: the namespace dies with its parent.
fn die_with_parent() -> Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) with an integer argument.
    if unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(last_os_error("prctl(PR_SET_PDEATHSIG)", ""));
    }
    Ok(())
}

/// `mount --make-rprivate /`: nothing mounted here propagates to the host.
fn make_mounts_private() -> Result<()> {
    let none: *const libc::c_char = std::ptr::null();
    let slash = c"/";
    // SAFETY: valid NUL-terminated strings; null for unused arguments.
    if unsafe {
        libc::mount(
            none,
            slash.as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "making all mounts private (mount --make-rprivate /)",
            "; needs CAP_SYS_ADMIN in the mount namespace",
        ));
    }
    Ok(())
}

/// Binds the VM directory at `/var/vcap`.
fn bind_vm_root(vm_dir: &Path, vm_dir_c: &CString) -> Result<()> {
    let none: *const libc::c_char = std::ptr::null();
    let target = c"/var/vcap";
    // SAFETY: valid NUL-terminated strings; null for unused arguments.
    if unsafe {
        libc::mount(
            vm_dir_c.as_ptr(),
            target.as_ptr(),
            none,
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "bind-mounting the VM root at /var/vcap",
            format!(
                "; source {} (needs CAP_SYS_ADMIN in the mount namespace)",
                vm_dir.display()
            ),
        ));
    }
    Ok(())
}

/// Mounts a proc of the new PID namespace at `/proc`.
fn mount_proc() -> Result<()> {
    let proc_ = c"proc";
    let proc_dir = c"/proc";
    // SAFETY: valid NUL-terminated strings; null for the unused data argument.
    if unsafe {
        libc::mount(
            proc_.as_ptr(),
            proc_dir.as_ptr(),
            proc_.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            std::ptr::null(),
        )
    } != 0
    {
        return Err(last_os_error(
            "mounting a new proc at /proc",
            "; needs CAP_SYS_ADMIN over the new PID namespace and a fully visible /proc on the host (no masked /proc as in unprivileged containers)",
        ));
    }
    Ok(())
}

/// The namespace parent: forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to `child`
/// (SIGKILL on a second signal or after [`SIGNAL_GRACE_SECS`]), waits for it
/// and exits with its status (128 + signal when it was killed).
fn wait_and_exit(child: libc::pid_t) -> ! {
    CHILD_PID.store(child, Ordering::SeqCst);
    // SAFETY: installing an async-signal-safe handler with a zeroed, then filled, sigaction.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = forward_signal as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for sig in [
            libc::SIGTERM,
            libc::SIGINT,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGALRM,
        ] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                continue;
            };
            std::process::exit(code);
        }
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!(
                "bosun VM namespace: waiting for pid {child}: {}",
                io::Error::last_os_error()
            );
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(
            unescape_mountinfo(r"/etc/my\040file\134x"),
            std::ffi::OsString::from(r"/etc/my file\x")
        );
        assert_eq!(
            unescape_mountinfo(r"/a\04"),
            std::ffi::OsString::from(r"/a\04")
        );
        assert_eq!(
            unescape_mountinfo(r"/a\9999"),
            std::ffi::OsString::from(r"/a\9999")
        );
    }

    #[test]
    fn mount_points_below_a_directory_exclude_it_and_its_siblings() {
        // /proc is a mount point on every Linux system running these tests.
        let below_root = mount_points_below(Path::new("/")).unwrap();
        assert!(
            below_root.iter().any(|p| p == Path::new("/proc")),
            "{below_root:?}"
        );
        assert!(!below_root.iter().any(|p| p == Path::new("/")));
        let below_proc = mount_points_below(Path::new("/proc")).unwrap();
        assert!(below_proc
            .iter()
            .all(|p| p.starts_with("/proc") && p != Path::new("/proc")));
    }
}

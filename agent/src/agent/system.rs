//! System calls and archives: mounting (bind mounts, ext4 block devices,
//! mountinfo), vitals (load, memory, disk use), the disk hint in settings,
//! and tgz packing and unpacking (deterministic packing for compiled
//! packages and logs).
//!
//! It must not know the BOSH layout or the spec: callers pass paths in.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

use crate::protocol::Vitals;

/// A disk hint from settings: `"path"` or `{"path": "..."}`.
pub(super) fn disk_hint_path(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Object(m) => m.get("path")?.as_str().map(str::to_string),
        _ => None,
    }
}

pub(super) fn cpath(p: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

pub(super) fn unpack_tgz(src: &Path, dest: &Path) -> io::Result<()> {
    let f = File::open(src)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(f)));
    ar.set_preserve_permissions(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    ar.unpack(dest)
}

/// Writes a deterministic tgz: for each `(dir, prefix, include_root)`, the
/// tree under `dir` with paths `prefix/<relative>`, sorted, mtimes and owners
/// zeroed.
pub(super) fn write_tgz(out: &Path, trees: &[(PathBuf, PathBuf, bool)]) -> io::Result<()> {
    let f = File::create(out)?;
    let gz = flate2::write::GzEncoder::new(BufWriter::new(f), flate2::Compression::default());
    let mut b = tar::Builder::new(gz);
    b.follow_symlinks(false);
    for (dir, prefix, include_root) in trees {
        if *include_root && !prefix.as_os_str().is_empty() {
            let md = fs::metadata(dir)?;
            append_dir_entry(&mut b, prefix, md.permissions().mode())?;
        }
        append_tree(&mut b, dir, prefix)?;
    }
    let gz = b.into_inner()?;
    let w = gz.finish()?;
    let f = w.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()
}

fn new_header(mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mode(mode & 0o7777);
    h
}

fn append_dir_entry<W: Write>(b: &mut tar::Builder<W>, name: &Path, mode: u32) -> io::Result<()> {
    let mut h = new_header(mode);
    h.set_entry_type(tar::EntryType::Directory);
    h.set_size(0);
    b.append_data(&mut h, name, io::empty())
}

fn append_tree<W: Write>(b: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let name = rel.join(e.file_name());
        let path = e.path();
        let md = fs::symlink_metadata(&path)?;
        let ft = md.file_type();
        let mode = md.permissions().mode();
        if ft.is_dir() {
            append_dir_entry(b, &name, mode)?;
            append_tree(b, &path, &name)?;
        } else if ft.is_symlink() {
            let target = fs::read_link(&path)?;
            let mut h = new_header(mode);
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &name, &target)?;
        } else if ft.is_file() {
            let size = md.len();
            let mut h = new_header(mode);
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(size);
            // Exactly `size` bytes even if the file grows or shrinks meanwhile
            // (logs are being written).
            let data = File::open(&path)?
                .take(size)
                .chain(io::repeat(0))
                .take(size);
            b.append_data(&mut h, &name, data)?;
        }
        // Sockets, fifos and devices are skipped.
    }
    Ok(())
}

pub(super) fn sys_mount(
    src: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let (cs, ct) = (cpath(src)?, cpath(target)?);
    let cf = fstype
        .map(|f| {
            std::ffi::CString::new(f).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
        })
        .transpose()?;
    // SAFETY: mount(2) with valid NUL-terminated strings (or NULL fstype/data).
    let rc = unsafe {
        libc::mount(
            cs.as_ptr(),
            ct.as_ptr(),
            cf.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Mounts an ext4 block device, formatting it first only when `blkid` says it
/// carries no filesystem at all.
pub(super) async fn mount_block_device(dev: &Path, target: &Path) -> Result<(), String> {
    if sys_mount(dev, target, Some("ext4"), 0).is_ok() {
        return Ok(());
    }
    let probe = Command::new("blkid")
        .arg("-p")
        .arg(dev)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("probing {} with blkid: {e}", dev.display()))?;
    if probe.code() != Some(2) {
        return Err(format!(
            "{} has a filesystem that does not mount as ext4",
            dev.display()
        ));
    }
    let mkfs = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(dev)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map_err(|e| format!("formatting {}: {e}", dev.display()))?;
    if !mkfs.success() {
        return Err(format!("formatting {} failed ({mkfs})", dev.display()));
    }
    sys_mount(dev, target, Some("ext4"), 0).map_err(|e| format!("mounting {}: {e}", dev.display()))
}

/// Whether `path` is a mount point, per /proc/self/mountinfo.
pub(super) fn is_mount_point(path: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)) == canon)
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(super) fn read_loadavg() -> Option<[f64; 3]> {
    let s = fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = s.split_whitespace().map(|x| x.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

pub(super) fn read_meminfo() -> Vitals {
    let mut total = 0;
    let mut avail = None;
    let mut free = 0;
    if let Ok(s) = fs::read_to_string("/proc/meminfo") {
        for l in s.lines() {
            let mut it = l.split_whitespace();
            let (Some(k), Some(v)) = (it.next(), it.next().and_then(|v| v.parse::<u64>().ok()))
            else {
                continue;
            };
            match k {
                "MemTotal:" => total = v,
                "MemAvailable:" => avail = Some(v),
                "MemFree:" => free = v,
                _ => {}
            }
        }
    }
    Vitals {
        mem_total_kb: total,
        mem_used_kb: total.saturating_sub(avail.unwrap_or(free)),
        ..Vitals::default()
    }
}

/// Percent used of the filesystem holding `path` (df's formula).
pub(super) fn disk_percent(path: &Path) -> Option<u8> {
    let c = cpath(path).ok()?;
    // SAFETY: statvfs fills the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path pointer and struct pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
    let denom = used + st.f_bavail as u64;
    if denom == 0 {
        return Some(0);
    }
    Some(((used * 100).div_ceil(denom)).min(100) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_and_disk_hints() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(
            disk_hint_path(&serde_json::json!({"path": "/dev/sdb"})).as_deref(),
            Some("/dev/sdb")
        );
        assert_eq!(
            disk_hint_path(&serde_json::json!("/x")).as_deref(),
            Some("/x")
        );
    }
}

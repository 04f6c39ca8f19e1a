//! VMs of the local CPI: laying out `vms/<cid>/` (its `vcap/` and, through
//! [`crate::sysdirs`], its own `/etc`, `/tmp`, ...), starting the agent
//! process (which then enters its namespace, see [`crate::namespace`]),
//! telling whether it lives, killing it, rebooting it, its metadata, and the
//! `disks` map of its settings.
//!
//! This module must not talk to the agent (it only writes its settings file
//! and starts/kills its process), and must not change disk records beyond
//! detaching the disks of a deleted VM.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bosun_cpi::{CreateVmRequest, Metadata, StemcellCid, VmCid};
use serde::{Deserialize, Serialize};

use crate::files::{
    read_json, remove_dir_atomic, sweep_staging, valid_cid, write_atomic, write_json, Staging,
};
use crate::process::{kill, process_alive_with, processes_with};
use crate::sysdirs;
use crate::{io_err, Inner, LocalCpiError, Result, SETTINGS_PATH_IN_VM};

/// How long delete_vm / reboot_vm wait for a killed agent to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// `vms/<cid>/meta.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct VmMeta {
    cid: VmCid,
    agent_id: String,
    stemcell: StemcellCid,
    #[serde(default)]
    cloud_properties: serde_json::Value,
    #[serde(default)]
    metadata: Metadata,
}

impl Inner {
    pub(crate) fn vm_exists(&self, cid: &VmCid) -> bool {
        valid_cid(&cid.0) && self.vm_dir(cid).is_dir()
    }

    pub(crate) fn require_vm(&self, cid: &VmCid) -> Result<()> {
        if self.vm_exists(cid) {
            Ok(())
        } else {
            Err(LocalCpiError::VmNotFound(cid.clone()))
        }
    }

    /// Lays out `vms/<cid>/` (built aside, then renamed into place); no process.
    pub(crate) fn prepare_vm_dir(&self, req: &CreateVmRequest) -> Result<VmCid> {
        if !valid_cid(&req.stemcell.0) || !self.stemcell_file(&req.stemcell).is_file() {
            return Err(LocalCpiError::StemcellNotFound(req.stemcell.clone()));
        }
        let cid = VmCid(format!("vm-{}", uuid::Uuid::new_v4()));
        let vms = self.root.join("vms");
        sweep_staging(&vms);
        // 0700 from the start: the settings hold the agent's host key.
        let staging = Staging::create(&vms, &cid.0)?;
        let vcap = staging.path.join("vcap");
        for sub in ["bosh", "data", "store", "sys/log", "jobs", "packages"] {
            let d = vcap.join(sub);
            fs::create_dir_all(&d).map_err(io_err("creating", &d))?;
        }
        let bosh = vcap.join("bosh");
        fs::set_permissions(&bosh, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions of", &bosh))?;
        write_json(&bosh.join("settings.json"), &req.settings, 0o600)?;
        let meta = VmMeta {
            cid: cid.clone(),
            agent_id: req.agent_id.clone(),
            stemcell: req.stemcell.clone(),
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
        };
        write_json(&staging.path.join("meta.json"), &meta, 0o644)?;
        sysdirs::lay_out(&staging.path.join(sysdirs::SYSTEM_DIR))?;
        staging.commit(&self.vm_dir(&cid))?;
        Ok(cid)
    }

    pub(crate) fn create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
        let cid = self.prepare_vm_dir(req)?;
        if let Err(e) = self.spawn_agent(&cid) {
            let _ = remove_dir_atomic(&self.vm_dir(&cid));
            return Err(e);
        }
        tracing::info!(vm = %cid, agent_id = %req.agent_id, "local CPI: created VM");
        Ok(cid)
    }

    /// Starts the agent detached (own session, stdin null, output appended to
    /// agent.log), records its pid, and reaps it from a background thread.
    pub(crate) fn spawn_agent(&self, cid: &VmCid) -> Result<()> {
        let dir = self.vm_dir(cid);
        let vcap = self.vcap_dir(cid);
        // Only root on the host may look inside (rendered secrets, host key);
        // a VM created by an older version is restricted at its next start.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err("setting permissions of", &dir))?;
        // A VM created by an older version gets its own /etc, /tmp, ... now.
        sysdirs::ensure_laid_out(&dir)?;
        let log_path = dir.join("agent.log");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o644)
            .open(&log_path)
            .map_err(io_err("opening", &log_path))?;
        let log2 = log.try_clone().map_err(io_err("opening", &log_path))?;
        let mut cmd = Command::new(&self.agent_command[0]);
        cmd.args(&self.agent_command[1..])
            .arg("--settings")
            .arg(SETTINGS_PATH_IN_VM)
            .arg("--vm-root")
            .arg(&vcap)
            .current_dir(&dir)
            // It would name a directory of the host's /tmp, which the VM covers.
            .env_remove("TMPDIR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LocalCpiError::Spawn {
            vm: cid.clone(),
            command: self.agent_command.join(" "),
            source,
        })?;
        let pid = child.id();
        let pid_file = dir.join("pid");
        let recorded = write_atomic(&pid_file, format!("{pid}\n").as_bytes(), 0o644);
        // Reap it whenever it exits, so it never lingers as a zombie.
        let name = format!("reap-{cid}");
        let reaper = std::thread::Builder::new().name(name).spawn(move || {
            let _ = child.wait();
        });
        if let Err(e) = recorded {
            kill(pid as i32, libc::SIGKILL);
            return Err(e);
        }
        if let Err(e) = reaper {
            // No reaper thread: the process is still killable by delete_vm, it
            // may just stay a zombie until this process exits.
            tracing::warn!(vm = %cid, "local CPI: cannot start reaper thread: {e}");
        }
        Ok(())
    }

    pub(crate) fn recorded_pid(&self, cid: &VmCid) -> Option<i32> {
        fs::read_to_string(self.vm_dir(cid).join("pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 0)
    }

    pub(crate) fn has_vm(&self, cid: &VmCid) -> bool {
        if !self.vm_exists(cid) {
            return false;
        }
        match self.recorded_pid(cid) {
            Some(pid) => process_alive_with(pid, &self.vm_marker(cid)),
            None => false,
        }
    }

    /// What the agent's command line contains (`--vm-root <vm>/vcap`, NUL-separated
    /// as in /proc/<pid>/cmdline), and nothing else's does (not even a host
    /// process that merely names a file of the VM).
    pub(crate) fn vm_marker(&self, cid: &VmCid) -> String {
        format!("--vm-root\0{}\0", self.vcap_dir(cid).to_string_lossy())
    }

    /// SIGKILLs the agent (its process group too, and any other process
    /// started with this VM's `--vm-root`) and waits until it is gone; its
    /// PID namespace, and so every job, dies with it.
    pub(crate) fn kill_agent(&self, cid: &VmCid) -> Result<()> {
        let marker = self.vm_marker(cid);
        let deadline = Instant::now() + KILL_TIMEOUT;
        loop {
            let mut pids = processes_with(&marker);
            if let Some(pid) = self.recorded_pid(cid) {
                if process_alive_with(pid, &marker) && !pids.contains(&pid) {
                    pids.push(pid);
                }
            }
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LocalCpiError::StillRunning(format!(
                    "the agent of VM {cid} (pids {pids:?}) is still running {}s after SIGKILL",
                    KILL_TIMEOUT.as_secs()
                )));
            }
            for pid in pids {
                // The agent leads its own session/process group (setsid).
                kill(-pid, libc::SIGKILL);
                kill(pid, libc::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn delete_vm(&self, cid: &VmCid) -> Result<()> {
        sweep_staging(&self.root.join("vms"));
        if !self.vm_exists(cid) {
            return Ok(());
        }
        self.kill_agent(cid)?;
        {
            let _g = self.guard();
            for mut disk in self.disk_records()? {
                if disk.attached_to.as_ref() == Some(cid) {
                    disk.attached_to = None;
                    write_json(&self.disk_file(&disk.cid), &disk, 0o644)?;
                }
            }
            remove_dir_atomic(&self.vm_dir(cid))?;
        }
        tracing::info!(vm = %cid, "local CPI: deleted VM");
        Ok(())
    }

    pub(crate) fn reboot_vm(&self, cid: &VmCid) -> Result<()> {
        self.require_vm(cid)?;
        self.kill_agent(cid)?;
        {
            let _g = self.guard();
            let disks: BTreeMap<String, serde_json::Value> = self
                .disk_records()?
                .into_iter()
                .filter(|d| d.attached_to.as_ref() == Some(cid))
                .map(|d| (d.cid.0.clone(), self.disk_hint_json(&d.cid)))
                .collect();
            self.update_settings_disks(cid, |map| *map = disks.into_iter().collect())?;
        }
        self.spawn_agent(cid)?;
        tracing::info!(vm = %cid, "local CPI: rebooted VM");
        Ok(())
    }

    pub(crate) fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> Result<()> {
        self.require_vm(cid)?;
        let _g = self.guard();
        let path = self.vm_dir(cid).join("meta.json");
        let mut meta: VmMeta =
            read_json(&path)?.ok_or_else(|| LocalCpiError::VmNotFound(cid.clone()))?;
        meta.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_json(&path, &meta, 0o644)
    }

    /// Every VM directory (its agent alive or not) whose recorded metadata
    /// matches `filter`, by cid. A directory without `meta.json` (never
    /// written by this CPI) counts with empty metadata; one removed while
    /// listing is skipped.
    pub(crate) fn find_vms(&self, filter: &Metadata) -> Result<Vec<(VmCid, Metadata)>> {
        let dir = self.root.join("vms");
        // Staging (.creating-*) and trash (.deleting-*) directories are not
        // VMs; those left by a crash are removed here.
        sweep_staging(&dir);
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| valid_cid(n)) else {
                continue;
            };
            let cid = VmCid(name.to_string());
            let metadata = match read_json::<VmMeta>(&self.vm_dir(&cid).join("meta.json"))? {
                Some(meta) => meta.metadata,
                None if self.vm_exists(&cid) => Metadata::new(),
                None => continue,
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                out.push((cid, metadata));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Edits the `disks` map of the VM's settings.json, keeping every other field as is.
    pub(crate) fn update_settings_disks(
        &self,
        cid: &VmCid,
        edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
    ) -> Result<()> {
        let path = self.settings_file(cid);
        let mut settings: serde_json::Value =
            read_json(&path)?.ok_or_else(|| LocalCpiError::VmNotFound(cid.clone()))?;
        let Some(obj) = settings.as_object_mut() else {
            return Err(LocalCpiError::Internal(format!(
                "{} is not a JSON object",
                path.display()
            )));
        };
        let disks = obj
            .entry("disks")
            .or_insert_with(|| serde_json::Value::Object(Default::default()));
        if !disks.is_object() {
            *disks = serde_json::Value::Object(Default::default());
        }
        if let Some(map) = disks.as_object_mut() {
            edit(map);
        }
        write_json(&path, &settings, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::ABANDONED_AFTER;
    use crate::test_support::*;
    use crate::LocalCpi;
    use bosun_cpi::{AgentSettings, Cpi, CpiError, CreateDiskRequest};
    use std::path::PathBuf;

    #[test]
    fn vm_dir_layout_and_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let vm = fake_vm(&c);
        let dir = c.vm_dir(&vm);
        for sub in ["bosh", "data", "store", "sys/log", "jobs", "packages"] {
            assert!(dir.join("vcap").join(sub).is_dir(), "{sub}");
        }
        let settings = c.inner.settings_file(&vm);
        let mode = fs::metadata(&settings).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the VM directory is root's alone");
        let s: AgentSettings = read_json(&settings).unwrap().unwrap();
        assert_eq!(s.agent_id, "agent-1");
        let meta: VmMeta = read_json(&dir.join("meta.json")).unwrap().unwrap();
        assert_eq!(meta.metadata["token"], "t");
        // No staging leftovers.
        let names: Vec<_> = fs::read_dir(c.root().join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![vm.0.clone()]);
    }

    #[test]
    fn a_vm_gets_its_own_system_directories_and_an_older_one_at_its_next_start() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let vm = fake_vm(&c);
        let sys = c.vm_dir(&vm).join(sysdirs::SYSTEM_DIR);
        match sysdirs::etc_kind_for_caller() {
            sysdirs::EtcKind::Overlay => {
                // Root: nothing copied, the namespace mounts an overlay; the
                // upper layer holds at most the VM's `vcap` user and group.
                assert!(!sys.join("etc").exists());
                assert_eq!(fs::read_dir(sys.join("etc.work")).unwrap().count(), 0);
                let upper: Vec<String> = fs::read_dir(sys.join("etc.upper"))
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                assert!(
                    upper.iter().all(|n| n == "passwd" || n == "group"),
                    "{upper:?}"
                );
            }
            sysdirs::EtcKind::Copy => {}
        }
        let passwd = match sysdirs::etc_kind_for_caller() {
            sysdirs::EtcKind::Overlay if !sys.join("etc.upper/passwd").exists() => {
                fs::read_to_string("/etc/passwd").unwrap()
            }
            sysdirs::EtcKind::Overlay => fs::read_to_string(sys.join("etc.upper/passwd")).unwrap(),
            sysdirs::EtcKind::Copy => fs::read_to_string(sys.join("etc/passwd")).unwrap(),
        };
        assert!(
            passwd.lines().any(|l| l.starts_with("vcap:x:")),
            "the VM has BOSH's vcap user: {passwd}"
        );
        for d in ["tmp", "var/tmp", "root", "home"] {
            assert!(sys.join(d).is_dir(), "{d}");
        }
        // A VM laid out before VMs had their own /etc.
        fs::remove_dir_all(&sys).unwrap();
        c.inner.spawn_agent(&vm).unwrap();
        assert!(sys.join("etc.upper").is_dir() || sys.join("etc/passwd").is_file());
        assert!(sys.join("var/tmp").is_dir());
        let names: Vec<_> = fs::read_dir(c.vm_dir(&vm))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(names.is_empty(), "staging left behind: {names:?}");
        c.inner.kill_agent(&vm).unwrap();
    }

    /// What a builder killed mid-way leaves: the lock file (unlocked, its
    /// holder dead) and a staging directory holding a host key.
    fn crashed_staging(c: &LocalCpi, name: &str) -> (PathBuf, PathBuf) {
        let vms = c.root().join("vms");
        let dir = vms.join(format!(".creating-{name}"));
        let lock = vms.join(format!(".creating-{name}.lock"));
        fs::write(&lock, "").unwrap();
        fs::create_dir_all(dir.join("vcap/bosh")).unwrap();
        fs::write(
            dir.join("vcap/bosh/settings.json"),
            "{\"host_private_key\":\"k\"}",
        )
        .unwrap();
        (dir, lock)
    }

    #[tokio::test]
    async fn a_staging_directory_left_by_a_crash_goes_at_the_next_call() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        // One still being built (its lock held), even if old, stays.
        let busy = Staging::create(&c.root().join("vms"), "vm-busy").unwrap();
        fs::File::open(&busy.path)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * ABANDONED_AFTER)
            .unwrap();
        // Deleting any VM (even one already gone) sweeps: fresh or not, a
        // staging directory whose builder died goes.
        let (dir, lock) = crashed_staging(&c, "vm-a");
        c.delete_vm(&VmCid("vm-gone".into())).await.unwrap();
        assert!(!dir.exists() && !lock.exists(), "swept by delete_vm");
        assert!(
            busy.path.exists() && busy.lock_path.exists(),
            "in use: kept"
        );
        let (dir, lock) = crashed_staging(&c, "vm-b");
        c.find_vms(&Metadata::new()).await.unwrap();
        assert!(!dir.exists() && !lock.exists(), "swept by find_vms");
        let (dir, _) = crashed_staging(&c, "vm-c");
        let vm = fake_vm(&c);
        assert!(!dir.exists(), "swept by create_vm");
        // A build that fails or is dropped uncommitted leaves nothing.
        let (path, lock_path) = (busy.path.clone(), busy.lock_path.clone());
        drop(busy);
        assert!(!path.exists() && !lock_path.exists());
        let names: Vec<_> = fs::read_dir(c.root().join("vms"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![vm.0.clone()]);
    }

    #[tokio::test]
    async fn unknown_stemcell_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let err = c
            .create_vm(&vm_request(&StemcellCid::from("stemcell-nope")))
            .await
            .unwrap_err();
        assert!(matches!(err, CpiError::StemcellNotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_vm_whose_agent_exits_is_gone_but_deletable() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let sc = c.create_stemcell(&stemcell_spec()).await.unwrap();
        let vm = c.create_vm(&vm_request(&sc)).await.unwrap();
        let pid_file = c.vm_dir(&vm).join("pid");
        assert!(pid_file.is_file());
        // /bin/false exits at once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while c.has_vm(&vm).await.unwrap() {
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
        c.delete_vm(&vm).await.unwrap();
        assert!(!c.vm_dir(&vm).exists());
        c.delete_vm(&vm).await.unwrap();
    }

    #[tokio::test]
    async fn reboot_rewrites_settings_disks_from_records() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let a = fake_vm(&c);
        let disk = c
            .create_disk(&CreateDiskRequest {
                size_mb: 1,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: Metadata::new(),
            })
            .await
            .unwrap();
        c.attach_disk(&a, &disk).await.unwrap();
        // Settings drifted (e.g. hand-edited): reboot restores them from the records.
        c.inner
            .update_settings_disks(&a, |m| {
                m.clear();
                m.insert("disk-stale".into(), serde_json::json!({}));
            })
            .unwrap();
        c.reboot_vm(&a).await.unwrap();
        let hint = c.inner.disk_hint_json(&disk);
        assert_eq!(
            settings_disks(&c, &a),
            serde_json::json!({ disk.0.clone(): hint })
        );
        c.set_vm_metadata(&a, &Metadata::from([("name".into(), "x".into())]))
            .await
            .unwrap();
        let meta: VmMeta = read_json(&c.vm_dir(&a).join("meta.json")).unwrap().unwrap();
        assert_eq!(meta.metadata.len(), 2);
        c.detach_disk(&a, &disk).await.unwrap();
        c.delete_vm(&a).await.unwrap();
    }

    #[tokio::test]
    async fn finds_vms_and_disks_by_metadata() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let tagged = |pairs: &[(&str, &str)]| -> Metadata {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        // VM directories without a running agent (dead or never started) count.
        let a = fake_vm(&c);
        let b = fake_vm(&c);
        c.set_vm_metadata(&b, &tagged(&[("token", "b"), ("director", "d")]))
            .await
            .unwrap();
        // A record of an older version, without metadata, is still readable.
        let old = c.vm_dir(&a).join("meta.json");
        let mut raw: serde_json::Value = read_json(&old).unwrap().unwrap();
        raw.as_object_mut().unwrap().remove("metadata");
        write_json(&old, &raw, 0o644).unwrap();
        // Staging and trash directories are not VMs; old ones (a crash
        // left them) are removed, fresh ones (in use) are not.
        fs::create_dir_all(c.root().join("vms/.creating-vm-x")).unwrap();
        fs::create_dir_all(c.root().join("vms/.deleting-vm-y-1")).unwrap();
        let stale = c.root().join("vms/.creating-vm-z");
        fs::create_dir_all(stale.join("vcap/bosh")).unwrap();
        fs::File::open(&stale)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - 2 * ABANDONED_AFTER)
            .unwrap();

        let all = c.find_vms(&Metadata::new()).await.unwrap();
        let mut want = vec![
            (a.clone(), Metadata::new()),
            (b.clone(), tagged(&[("token", "b"), ("director", "d")])),
        ];
        want.sort();
        assert_eq!(all, want);
        assert!(!stale.exists(), "a stale staging directory is removed");
        assert!(c.root().join("vms/.creating-vm-x").exists());
        assert_eq!(
            c.find_vms(&tagged(&[("director", "d")])).await.unwrap(),
            vec![(b.clone(), tagged(&[("token", "b"), ("director", "d")]))]
        );
        assert!(c
            .find_vms(&tagged(&[("director", "d"), ("token", "t")]))
            .await
            .unwrap()
            .is_empty());
        c.delete_vm(&b).await.unwrap();
        assert!(c
            .find_vms(&tagged(&[("director", "d")]))
            .await
            .unwrap()
            .is_empty());

        let mut disks = Vec::new();
        for token in ["x", "y"] {
            let req = CreateDiskRequest {
                size_mb: 1,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: tagged(&[("token", token), ("director", "d")]),
            };
            disks.push(c.create_disk(&req).await.unwrap());
        }
        c.set_disk_metadata(&disks[1], &tagged(&[("name", "n")]))
            .await
            .unwrap();
        assert_eq!(
            c.find_disks(&tagged(&[("token", "y")])).await.unwrap(),
            vec![(
                disks[1].clone(),
                tagged(&[("token", "y"), ("director", "d"), ("name", "n")])
            )]
        );
        let found = c.find_disks(&tagged(&[("director", "d")])).await.unwrap();
        let mut sorted = disks.clone();
        sorted.sort();
        assert_eq!(
            found.into_iter().map(|(d, _)| d).collect::<Vec<_>>(),
            sorted
        );
        // Snapshots are not disks.
        c.snapshot_disk(&disks[0], &tagged(&[("token", "x")]))
            .await
            .unwrap();
        assert_eq!(
            c.find_disks(&tagged(&[("token", "x")]))
                .await
                .unwrap()
                .len(),
            1
        );
        c.delete_disk(&disks[0]).await.unwrap();
        assert!(c
            .find_disks(&tagged(&[("token", "x")]))
            .await
            .unwrap()
            .is_empty());
    }
}

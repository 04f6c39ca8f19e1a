//! Persistent disks and snapshots of the local CPI: `disks/<cid>/` (a
//! directory) with its record, attachment bookkeeping (the record and the
//! VM's settings), resizing, metadata, and snapshots (copies of a disk).
//!
//! This module must not mount anything nor start processes: an attached
//! disk is only a record plus a path in the VM's settings.

use std::fs;

use bosun_cpi::{CreateDiskRequest, DiskCid, DiskHint, Metadata, SnapshotCid, VmCid};
use serde::{Deserialize, Serialize};

use crate::files::{
    copy_tree, read_json, remove_dir_atomic, remove_file_if_exists, valid_cid, write_json,
};
use crate::{io_err, Inner, LocalCpiError, Result};

/// `disks/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct DiskRecord {
    pub(crate) cid: DiskCid,
    pub(crate) size_mb: u64,
    #[serde(default)]
    pub(crate) cloud_properties: serde_json::Value,
    #[serde(default)]
    pub(crate) metadata: Metadata,
    pub(crate) attached_to: Option<VmCid>,
}

/// `snapshots/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct SnapshotRecord {
    pub(crate) cid: SnapshotCid,
    pub(crate) disk: DiskCid,
    #[serde(default)]
    pub(crate) metadata: Metadata,
}

impl Inner {
    pub(crate) fn disk_record(&self, cid: &DiskCid) -> Result<DiskRecord> {
        if !valid_cid(&cid.0) {
            return Err(LocalCpiError::DiskNotFound(cid.clone()));
        }
        read_json(&self.disk_file(cid))?.ok_or_else(|| LocalCpiError::DiskNotFound(cid.clone()))
    }

    pub(crate) fn disk_records(&self) -> Result<Vec<DiskRecord>> {
        let dir = self.root.join("disks");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Some(cid) = name.strip_suffix(".json") else {
                continue;
            };
            if !valid_cid(cid) {
                continue;
            }
            if let Some(rec) = read_json::<DiskRecord>(&entry.path())? {
                out.push(rec);
            }
        }
        out.sort_by(|a, b| a.cid.cmp(&b.cid));
        Ok(out)
    }

    /// Every disk record whose metadata matches `filter`, by cid.
    pub(crate) fn find_disks(&self, filter: &Metadata) -> Result<Vec<(DiskCid, Metadata)>> {
        Ok(self
            .disk_records()?
            .into_iter()
            .filter(|d| bosun_cpi::metadata_matches(&d.metadata, filter))
            .map(|d| (d.cid, d.metadata))
            .collect())
    }

    pub(crate) fn disk_hint_json(&self, cid: &DiskCid) -> serde_json::Value {
        serde_json::json!({ "path": self.disk_dir(cid).to_string_lossy() })
    }

    pub(crate) fn create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let cid = DiskCid(format!("disk-{}", uuid::Uuid::new_v4()));
        let dir = self.disk_dir(&cid);
        fs::create_dir(&dir).map_err(io_err("creating", &dir))?;
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb: req.size_mb,
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
            attached_to: None,
        };
        if let Err(e) = write_json(&self.disk_file(&cid), &rec, 0o644) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(cid)
    }

    pub(crate) fn has_disk(&self, cid: &DiskCid) -> bool {
        valid_cid(&cid.0) && self.disk_file(cid).is_file()
    }

    pub(crate) fn delete_disk(&self, cid: &DiskCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        let _g = self.guard();
        let rec = match self.disk_record(cid) {
            Ok(rec) => rec,
            Err(LocalCpiError::DiskNotFound(_)) => {
                // Gone already; remove a leftover directory if any.
                return remove_dir_atomic(&self.disk_dir(cid));
            }
            Err(e) => return Err(e),
        };
        if let Some(vm) = rec.attached_to {
            return Err(LocalCpiError::Conflict(format!(
                "cannot delete disk {cid}: it is attached to VM {vm} (detach it first)"
            )));
        }
        remove_file_if_exists(&self.disk_file(cid))?;
        remove_dir_atomic(&self.disk_dir(cid))
    }

    pub(crate) fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let _g = self.guard();
        self.require_vm(vm)?;
        let mut rec = self.disk_record(disk)?;
        match &rec.attached_to {
            Some(other) if other != vm => {
                return Err(LocalCpiError::Conflict(format!(
                    "cannot attach disk {disk} to VM {vm}: it is attached to VM {other}"
                )))
            }
            _ => {}
        }
        rec.attached_to = Some(vm.clone());
        write_json(&self.disk_file(disk), &rec, 0o644)?;
        let hint = self.disk_hint_json(disk);
        self.update_settings_disks(vm, |map| {
            map.insert(disk.0.clone(), hint);
        })?;
        Ok(DiskHint {
            path: self.disk_dir(disk).to_string_lossy().into_owned(),
        })
    }

    pub(crate) fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let _g = self.guard();
        self.require_vm(vm)?;
        let mut rec = self.disk_record(disk)?;
        match &rec.attached_to {
            Some(other) if other != vm => {
                return Err(LocalCpiError::Conflict(format!(
                    "cannot detach disk {disk} from VM {vm}: it is attached to VM {other}"
                )))
            }
            Some(_) => {
                rec.attached_to = None;
                write_json(&self.disk_file(disk), &rec, 0o644)?;
            }
            None => {}
        }
        self.update_settings_disks(vm, |map| {
            map.remove(&disk.0);
        })
    }

    pub(crate) fn get_disks(&self, vm: &VmCid) -> Result<Vec<DiskCid>> {
        self.require_vm(vm)?;
        Ok(self
            .disk_records()?
            .into_iter()
            .filter(|d| d.attached_to.as_ref() == Some(vm))
            .map(|d| d.cid)
            .collect())
    }

    pub(crate) fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> Result<()> {
        let _g = self.guard();
        let mut rec = self.disk_record(cid)?;
        if new_size_mb < rec.size_mb {
            return Err(LocalCpiError::Conflict(format!(
                "cannot shrink disk {cid} from {} MB to {new_size_mb} MB",
                rec.size_mb
            )));
        }
        rec.size_mb = new_size_mb;
        write_json(&self.disk_file(cid), &rec, 0o644)
    }

    pub(crate) fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> Result<()> {
        let _g = self.guard();
        let mut rec = self.disk_record(cid)?;
        rec.metadata
            .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())));
        write_json(&self.disk_file(cid), &rec, 0o644)
    }

    pub(crate) fn snapshot_disk(&self, disk: &DiskCid, metadata: &Metadata) -> Result<SnapshotCid> {
        self.disk_record(disk)?;
        let cid = SnapshotCid(format!("snap-{}", uuid::Uuid::new_v4()));
        let staging = self.root.join("snapshots").join(format!(".creating-{cid}"));
        let result = (|| {
            copy_tree(&self.disk_dir(disk), &staging)?;
            let dir = self.snapshot_dir(&cid);
            fs::rename(&staging, &dir).map_err(io_err("renaming into place", &dir))?;
            let rec = SnapshotRecord {
                cid: cid.clone(),
                disk: disk.clone(),
                metadata: metadata.clone(),
            };
            write_json(&self.snapshot_file(&cid), &rec, 0o644)
        })();
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            let _ = fs::remove_dir_all(self.snapshot_dir(&cid));
            return Err(e);
        }
        Ok(cid)
    }

    pub(crate) fn delete_snapshot(&self, cid: &SnapshotCid) -> Result<()> {
        if !valid_cid(&cid.0) {
            return Ok(());
        }
        remove_file_if_exists(&self.snapshot_file(cid))?;
        remove_dir_atomic(&self.snapshot_dir(cid))
    }
}

#[cfg(test)]
mod tests {
    use crate::files::read_json;
    use crate::test_support::*;
    use bosun_cpi::{AgentSettings, Cpi, CpiError, CreateDiskRequest, DiskCid, Metadata, VmCid};
    use std::fs;

    #[tokio::test]
    async fn disk_records() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let disk = c
            .create_disk(&CreateDiskRequest {
                size_mb: 100,
                cloud_properties: serde_json::json!({}),
                vm_locality: None,
                metadata: Metadata::from([("a".into(), "1".into())]),
            })
            .await
            .unwrap();
        assert!(disk.0.starts_with("disk-"));
        assert!(c.has_disk(&disk).await.unwrap());
        assert!(c.inner.disk_dir(&disk).is_dir());
        c.set_disk_metadata(&disk, &Metadata::from([("b".into(), "2".into())]))
            .await
            .unwrap();
        c.resize_disk(&disk, 200).await.unwrap();
        let err = c.resize_disk(&disk, 50).await.unwrap_err();
        assert!(err.to_string().contains("shrink"), "{err}");
        let rec = c.inner.disk_record(&disk).unwrap();
        assert_eq!(rec.size_mb, 200);
        assert_eq!(rec.metadata.len(), 2);

        fs::write(c.inner.disk_dir(&disk).join("data"), "hello").unwrap();
        let snap = c.snapshot_disk(&disk, &Metadata::new()).await.unwrap();
        let copy = c.inner.snapshot_dir(&snap).join("data");
        assert_eq!(fs::read_to_string(copy).unwrap(), "hello");
        c.delete_snapshot(&snap).await.unwrap();
        assert!(!c.inner.snapshot_dir(&snap).exists());
        c.delete_snapshot(&snap).await.unwrap();

        c.delete_disk(&disk).await.unwrap();
        assert!(!c.has_disk(&disk).await.unwrap());
        assert!(!c.inner.disk_dir(&disk).exists());
        c.delete_disk(&disk).await.unwrap();
        let err = c.resize_disk(&disk, 300).await.unwrap_err();
        assert!(matches!(err, CpiError::DiskNotFound(_)), "{err:?}");
    }

    #[tokio::test]
    async fn attach_bookkeeping() {
        let tmp = tempfile::tempdir().unwrap();
        let c = cpi(tmp.path());
        let a = fake_vm(&c);
        let b = fake_vm(&c);
        let req = CreateDiskRequest {
            size_mb: 1,
            cloud_properties: serde_json::json!({}),
            vm_locality: Some(a.clone()),
            metadata: Metadata::new(),
        };
        let disk = c.create_disk(&req).await.unwrap();

        let hint = c.attach_disk(&a, &disk).await.unwrap();
        assert_eq!(hint.path, c.inner.disk_dir(&disk).to_string_lossy());
        assert_eq!(
            settings_disks(&c, &a),
            serde_json::json!({ disk.0.clone(): { "path": hint.path } })
        );
        assert_eq!(c.get_disks(&a).await.unwrap(), vec![disk.clone()]);
        // Attaching again to the same VM is idempotent.
        c.attach_disk(&a, &disk).await.unwrap();

        // Elsewhere: refused, naming both VMs.
        let err = c.attach_disk(&b, &disk).await.unwrap_err().to_string();
        assert!(err.contains(&a.0) && err.contains(&b.0), "{err}");
        // Deleting an attached disk is refused.
        let err = c.delete_disk(&disk).await.unwrap_err().to_string();
        assert!(err.contains("attached"), "{err}");
        // Other settings survive the edit.
        let s: AgentSettings = read_json(&c.inner.settings_file(&a)).unwrap().unwrap();
        assert_eq!(s.env, serde_json::json!({"x": 1}));

        c.detach_disk(&a, &disk).await.unwrap();
        assert_eq!(settings_disks(&c, &a), serde_json::json!({}));
        assert!(c.get_disks(&a).await.unwrap().is_empty());
        c.detach_disk(&a, &disk).await.unwrap();

        c.attach_disk(&b, &disk).await.unwrap();
        assert_eq!(c.get_disks(&b).await.unwrap(), vec![disk.clone()]);
        assert!(c.get_disks(&a).await.unwrap().is_empty());

        // Not found errors.
        let nope_vm = VmCid::from("vm-nope");
        let nope_disk = DiskCid::from("disk-nope");
        assert!(matches!(
            c.attach_disk(&nope_vm, &disk).await,
            Err(CpiError::VmNotFound(_))
        ));
        assert!(matches!(
            c.attach_disk(&a, &nope_disk).await,
            Err(CpiError::DiskNotFound(_))
        ));
        assert!(matches!(
            c.attach_disk(&VmCid::from("../../etc"), &disk).await,
            Err(CpiError::VmNotFound(_))
        ));
        assert!(matches!(
            c.get_disks(&nope_vm).await,
            Err(CpiError::VmNotFound(_))
        ));

        // Deleting the VM detaches (records only) and keeps the disk's data.
        fs::write(c.inner.disk_dir(&disk).join("keep"), "x").unwrap();
        c.delete_vm(&b).await.unwrap();
        assert_eq!(c.inner.disk_record(&disk).unwrap().attached_to, None);
        assert!(c.inner.disk_dir(&disk).join("keep").is_file());
        c.delete_disk(&disk).await.unwrap();
    }
}

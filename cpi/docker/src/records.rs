//! The Docker CPI's own records (`vms/`, `disks/`, `snapshots/` under its
//! root): what it takes to recreate a container, disk sizes, metadata and
//! attachments, each file written atomically.
//!
//! This module must not talk to the daemon: records are bookkeeping, the
//! Docker objects are the truth of what exists.

use std::path::{Path, PathBuf};

use bosun_cpi::records;
use bosun_cpi::{CreateVmRequest, DiskCid, Metadata, SnapshotCid, VmCid};
use serde::{Deserialize, Serialize};

use crate::names::valid_cid;
use crate::{DockerCpi, DockerCpiError, Result};

/// `vms/<cid>.json`: what it takes to recreate the container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub cid: VmCid,
    pub request: CreateVmRequest,
    /// The request's metadata merged with every `set_vm_metadata`.
    #[serde(default)]
    pub metadata: Metadata,
    /// Attached disks, in attachment order (the first is at `/var/vcap/store`).
    #[serde(default)]
    pub disks: Vec<DiskCid>,
}

/// `disks/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub cid: DiskCid,
    pub size_mb: u64,
    #[serde(default)]
    pub cloud_properties: serde_json::Value,
    #[serde(default)]
    pub metadata: Metadata,
    pub attached_to: Option<VmCid>,
}

/// `snapshots/<cid>.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub cid: SnapshotCid,
    pub disk: DiskCid,
    #[serde(default)]
    pub metadata: Metadata,
}

pub(crate) fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    Ok(records::write_json(path, value, 0o600)?)
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    Ok(records::read_json(path)?)
}

pub(crate) fn remove_file_if_exists(path: &Path) -> Result<()> {
    Ok(records::remove_file_if_exists(path)?)
}

impl DockerCpi {
    pub(crate) fn vm_file(&self, cid: &VmCid) -> PathBuf {
        self.root.join("vms").join(format!("{}.json", cid.0))
    }

    pub(crate) fn disk_file(&self, cid: &DiskCid) -> PathBuf {
        self.root.join("disks").join(format!("{}.json", cid.0))
    }

    pub(crate) fn snapshot_file(&self, cid: &SnapshotCid) -> PathBuf {
        self.root.join("snapshots").join(format!("{}.json", cid.0))
    }

    pub(crate) fn read_vm(&self, cid: &VmCid) -> Result<Option<VmRecord>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        read_json(&self.vm_file(cid))
    }

    pub(crate) fn read_disk(&self, cid: &DiskCid) -> Result<Option<DiskRecord>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        read_json(&self.disk_file(cid))
    }

    /// Read-modify-write of a disk record (no-op when there is none).
    pub(crate) fn update_disk(&self, cid: &DiskCid, f: impl FnOnce(&mut DiskRecord)) -> Result<()> {
        let _g = self.records_guard();
        if let Some(mut rec) = self.read_disk(cid)? {
            f(&mut rec);
            write_json(&self.disk_file(cid), &rec)?;
        }
        Ok(())
    }

    /// Read-modify-write of a VM record; `VmNotFound` when there is none.
    pub(crate) fn update_vm(&self, cid: &VmCid, f: impl FnOnce(&mut VmRecord)) -> Result<VmRecord> {
        let _g = self.records_guard();
        let mut rec = self
            .read_vm(cid)?
            .ok_or_else(|| DockerCpiError::VmNotFound(cid.clone()))?;
        f(&mut rec);
        write_json(&self.vm_file(cid), &rec)?;
        Ok(rec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::request;
    use std::fs;

    #[test]
    fn records_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let rec = VmRecord {
            cid: VmCid("vm-1".into()),
            request: request(),
            metadata: request().metadata,
            disks: vec![DiskCid("disk-1".into())],
        };
        let path = dir.path().join("vm-1.json");
        write_json(&path, &rec).unwrap();
        assert_eq!(read_json::<VmRecord>(&path).unwrap(), Some(rec));
        let disk = DiskRecord {
            cid: DiskCid("disk-1".into()),
            size_mb: 64,
            cloud_properties: serde_json::json!({}),
            metadata: Metadata::from([("token".to_string(), "t".to_string())]),
            attached_to: Some(VmCid("vm-1".into())),
        };
        let path = dir.path().join("disk-1.json");
        write_json(&path, &disk).unwrap();
        assert_eq!(read_json::<DiskRecord>(&path).unwrap(), Some(disk));
        assert_eq!(
            read_json::<DiskRecord>(&dir.path().join("missing.json")).unwrap(),
            None
        );
        // Only the two records: no temporary files left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}

//! Persistent disks and snapshots of the Docker CPI: named volumes with
//! their records, attaching and detaching (which recreates the VM's
//! container), and snapshots copied by a short-lived helper container.
//!
//! This module must not delete a disk's data on detach or VM deletion, nor
//! delete a volume still attached to a recorded VM.

use std::collections::{BTreeMap, HashMap};

use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, ListImagesOptions, ListVolumesOptions, RemoveVolumeOptions,
};
use bosun_cpi::{CreateDiskRequest, DiskCid, DiskHint, Metadata, SnapshotCid, VmCid};
use futures_util::StreamExt;

use crate::container::mount_path;
use crate::names::{labels, metadata_of_labels, stemcell_repo, valid_cid};
use crate::records::{remove_file_if_exists, write_json, DiskRecord, SnapshotRecord};
use crate::{
    docker_err, is_not_found, status_of, DockerCpi, DockerCpiError, Result, Target,
    DISK_OWN_LABELS, LABEL_CPI, LABEL_DISK, LABEL_SIZE_MB, LABEL_SNAPSHOT_OF,
};

impl DockerCpi {
    pub(crate) async fn volume_exists(&self, name: &str) -> Result<bool> {
        if !valid_cid(name, false) {
            return Ok(false);
        }
        match self.docker.inspect_volume(name).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(docker_err(
                format!("inspecting volume {name}"),
                Target::None,
            )(e)),
        }
    }

    /// The disk's record; `DiskNotFound` when its volume does not exist. A
    /// volume without a record (records lost) gets one from its labels.
    pub(crate) async fn disk_record(&self, cid: &DiskCid) -> Result<DiskRecord> {
        if !valid_cid(&cid.0, false) {
            return Err(DockerCpiError::DiskNotFound(cid.clone()));
        }
        let volume = match self.docker.inspect_volume(&cid.0).await {
            Ok(v) => v,
            Err(e) if is_not_found(&e) => return Err(DockerCpiError::DiskNotFound(cid.clone())),
            Err(e) => {
                return Err(docker_err(
                    format!("inspecting volume of disk {cid}"),
                    Target::Disk(cid.clone()),
                )(e))
            }
        };
        if let Some(rec) = self.read_disk(cid)? {
            return Ok(rec);
        }
        let metadata = metadata_of_labels(&volume.labels, DISK_OWN_LABELS);
        let size_mb = volume
            .labels
            .get(LABEL_SIZE_MB)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb,
            cloud_properties: serde_json::json!({}),
            metadata,
            attached_to: None,
        };
        let _g = self.records_guard();
        write_json(&self.disk_file(cid), &rec)?;
        Ok(rec)
    }

    /// An image to run helper containers with: the disk's VM's stemcell, else
    /// any stemcell image of this CPI.
    pub(crate) async fn helper_image(&self, disk: &DiskRecord) -> Result<Option<String>> {
        if let Some(vm) = &disk.attached_to {
            if let Some(rec) = self.read_vm(vm)? {
                if self
                    .docker
                    .inspect_image(&rec.request.stemcell.0)
                    .await
                    .is_ok()
                {
                    return Ok(Some(rec.request.stemcell.0));
                }
            }
        }
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "reference".to_string(),
                vec![stemcell_repo(&self.prefix)],
            )])),
            ..Default::default()
        };
        let images = self
            .docker
            .list_images(Some(options))
            .await
            .map_err(docker_err("listing stemcell images", Target::None))?;
        Ok(images.into_iter().next().map(|i| i.id))
    }

    /// Runs `cp -a /from/. /to/` in a short-lived helper container.
    pub(crate) async fn copy_volume(
        &self,
        image: &str,
        from: &str,
        to: &str,
        what: &str,
    ) -> Result<()> {
        let name = format!("{}-copy-{}", self.prefix, uuid::Uuid::new_v4());
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(vec![
                "cp".into(),
                "-a".into(),
                "/from/.".into(),
                "/to/".into(),
            ]),
            labels: Some(labels(&self.prefix, &Metadata::new())),
            host_config: Some(HostConfig {
                binds: Some(vec![format!("{from}:/from:ro"), format!("{to}:/to")]),
                network_mode: Some("none".into()),
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.clone()),
            ..Default::default()
        };
        self.docker
            .create_container(Some(options), body)
            .await
            .map_err(docker_err(
                format!("{what}: creating helper container {name}"),
                Target::None,
            ))?;
        let result = async {
            self.docker
                .start_container(&name, None)
                .await
                .map_err(docker_err(
                    format!("{what}: starting helper container {name}"),
                    Target::None,
                ))?;
            let mut wait = self.docker.wait_container(&name, None);
            while let Some(r) = wait.next().await {
                match r {
                    Ok(r) if r.status_code == 0 => {}
                    Ok(r) => {
                        return Err(DockerCpiError::Conflict(format!(
                            "{what}: copying {from} to {to} exited with status {}",
                            r.status_code
                        )))
                    }
                    Err(BollardError::DockerContainerWaitError { error, code }) => {
                        return Err(DockerCpiError::Conflict(format!(
                            "{what}: copying {from} to {to} exited with status {code} {error}"
                        )))
                    }
                    Err(e) => {
                        return Err(docker_err(
                            format!("{what}: waiting for helper container {name}"),
                            Target::None,
                        )(e))
                    }
                }
            }
            Ok(())
        }
        .await;
        let removed = self.remove_container(&VmCid(name.clone()), what).await;
        result.and(removed)
    }

    pub(crate) async fn do_create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let cid = DiskCid(format!("disk-{}", uuid::Uuid::new_v4()));
        let rec = DiskRecord {
            cid: cid.clone(),
            size_mb: req.size_mb,
            cloud_properties: req.cloud_properties.clone(),
            metadata: req.metadata.clone(),
            attached_to: None,
        };
        {
            let _g = self.records_guard();
            write_json(&self.disk_file(&cid), &rec)?;
        }
        let mut l = labels(&self.prefix, &req.metadata);
        l.insert(LABEL_SIZE_MB.into(), req.size_mb.to_string());
        l.insert(LABEL_DISK.into(), cid.0.clone());
        let request = VolumeCreateRequest {
            name: Some(cid.0.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        };
        if let Err(e) = self.docker.create_volume(request).await {
            let _ = remove_file_if_exists(&self.disk_file(&cid));
            return Err(docker_err(
                format!("creating disk {cid} ({} MB): creating volume", req.size_mb),
                Target::None,
            )(e));
        }
        tracing::info!(disk = %cid, size_mb = req.size_mb, "created disk volume");
        Ok(cid)
    }

    pub(crate) async fn do_delete_disk(&self, cid: &DiskCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        let _l = self.lock(&cid.0).await;
        if let Some(rec) = self.read_disk(cid)? {
            if let Some(vm) = &rec.attached_to {
                if self.read_vm(vm)?.is_some() {
                    return Err(DockerCpiError::Conflict(format!(
                        "deleting disk {cid}: it is attached to VM {vm}; detach it first"
                    )));
                }
            }
        }
        let options = RemoveVolumeOptions { force: false };
        match self.docker.remove_volume(&cid.0, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) if status_of(&e) == Some(409) => {
                return Err(DockerCpiError::Conflict(format!(
                    "deleting disk {cid}: its volume is in use by a container: {e}"
                )))
            }
            Err(e) => {
                return Err(docker_err(
                    format!("deleting disk {cid}: removing volume"),
                    Target::None,
                )(e))
            }
        }
        remove_file_if_exists(&self.disk_file(cid))?;
        tracing::info!(disk = %cid, "deleted disk volume");
        Ok(())
    }

    pub(crate) async fn do_attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let _dl = self.lock(&disk.0).await;
        let _vl = self.lock(&vm.0).await;
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| DockerCpiError::VmNotFound(vm.clone()))?;
        let what = format!(
            "attaching disk {disk} to VM {}",
            Self::describe_vm(vm, &rec.metadata)
        );
        let drec = self.disk_record(disk).await?;
        if let Some(other) = &drec.attached_to {
            if other != vm && self.read_vm(other)?.is_some() {
                return Err(DockerCpiError::Conflict(format!(
                    "{what}: disk {disk} is attached to VM {other}; detach it from {other} first"
                )));
            }
        }
        let Some(container) = self.inspect_container(vm).await? else {
            return Err(DockerCpiError::VmNotFound(vm.clone()));
        };
        // Recorded before the container is recreated.
        self.update_disk(disk, |d| d.attached_to = Some(vm.clone()))?;
        let rec = self.update_vm(vm, |r| {
            if !r.disks.contains(disk) {
                r.disks.push(disk.clone());
            }
        })?;
        if !Self::container_matches(&container, &rec) {
            self.recreate(&rec, &what).await?;
            tracing::info!(vm = %vm, disk = %disk, "attached disk (container recreated)");
        }
        let index = rec.disks.iter().position(|d| d == disk).unwrap_or(0);
        Ok(DiskHint {
            path: mount_path(index, disk),
        })
    }

    pub(crate) async fn do_detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let _dl = self.lock(&disk.0).await;
        let _vl = self.lock(&vm.0).await;
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| DockerCpiError::VmNotFound(vm.clone()))?;
        let what = format!(
            "detaching disk {disk} from VM {}",
            Self::describe_vm(vm, &rec.metadata)
        );
        let rec = self.update_vm(vm, |r| r.disks.retain(|d| d != disk))?;
        if let Some(container) = self.inspect_container(vm).await? {
            let mounted = container
                .mounts
                .iter()
                .flatten()
                .any(|m| m.name.as_deref() == Some(disk.0.as_str()));
            if mounted {
                self.recreate(&rec, &what).await?;
                tracing::info!(vm = %vm, disk = %disk, "detached disk (container recreated)");
            }
        }
        self.update_disk(disk, |d| {
            if d.attached_to.as_ref() == Some(vm) {
                d.attached_to = None;
            }
        })
    }

    pub(crate) async fn do_resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        let rec = self.disk_record(cid).await?;
        if new_size_mb < rec.size_mb {
            return Err(DockerCpiError::Conflict(format!(
                "resizing disk {cid} from {} MB to {new_size_mb} MB: disks cannot shrink",
                rec.size_mb
            )));
        }
        // Local-driver volumes have no size: only the record changes.
        self.update_disk(cid, |d| d.size_mb = new_size_mb)
    }

    pub(crate) async fn do_set_disk_metadata(
        &self,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        self.disk_record(cid).await?;
        self.update_disk(cid, |d| {
            d.metadata
                .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())))
        })
    }

    pub(crate) async fn do_snapshot_disk(
        &self,
        cid: &DiskCid,
        metadata: &Metadata,
    ) -> Result<SnapshotCid> {
        let _l = self.lock(&cid.0).await;
        let rec = self.disk_record(cid).await?;
        let what = format!("snapshotting disk {cid}");
        let Some(image) = self.helper_image(&rec).await? else {
            return Err(DockerCpiError::NotSupported {
                method: "snapshot_disk",
                reason: format!(
                    "{what}: no {} image to copy the data with",
                    stemcell_repo(&self.prefix)
                ),
            });
        };
        let snap = SnapshotCid(format!("snap-{}", uuid::Uuid::new_v4()));
        let srec = SnapshotRecord {
            cid: snap.clone(),
            disk: cid.clone(),
            metadata: metadata.clone(),
        };
        {
            let _g = self.records_guard();
            write_json(&self.snapshot_file(&snap), &srec)?;
        }
        let mut l = labels(&self.prefix, metadata);
        l.insert(LABEL_SNAPSHOT_OF.into(), cid.0.clone());
        let request = VolumeCreateRequest {
            name: Some(snap.0.clone()),
            driver: Some("local".into()),
            labels: Some(l),
            ..Default::default()
        };
        let result = async {
            self.docker
                .create_volume(request)
                .await
                .map_err(docker_err(
                    format!("{what}: creating volume {snap}"),
                    Target::None,
                ))?;
            self.copy_volume(&image, &cid.0, &snap.0, &what).await
        }
        .await;
        if let Err(e) = result {
            let _ = self
                .docker
                .remove_volume(&snap.0, Some(RemoveVolumeOptions { force: true }))
                .await;
            let _ = remove_file_if_exists(&self.snapshot_file(&snap));
            return Err(e);
        }
        tracing::info!(disk = %cid, snapshot = %snap, "snapshotted disk");
        Ok(snap)
    }

    pub(crate) async fn do_delete_snapshot(&self, cid: &SnapshotCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        match self
            .docker
            .remove_volume(&cid.0, Some(RemoveVolumeOptions { force: false }))
            .await
        {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(docker_err(
                    format!("deleting snapshot {cid}: removing volume"),
                    Target::None,
                )(e))
            }
        }
        remove_file_if_exists(&self.snapshot_file(cid))
    }

    /// Every disk volume of this CPI (snapshots excluded) whose metadata
    /// matches: the record's when there is one (with set_disk_metadata's
    /// tags), else the volume's labels.
    pub(crate) async fn do_find_disks(
        &self,
        filter: &Metadata,
    ) -> Result<Vec<(DiskCid, Metadata)>> {
        let what = format!(
            "listing disks tagged {}",
            bosun_cpi::describe_filter(filter)
        );
        let options = ListVolumesOptions {
            filters: Some(self.label_filter(&[])),
        };
        let volumes = self
            .docker
            .list_volumes(Some(options))
            .await
            .map_err(docker_err(format!("{what}: listing volumes"), Target::None))?
            .volumes
            .unwrap_or_default();
        let mut found = BTreeMap::new();
        for volume in volumes {
            if volume.labels.get(LABEL_CPI) != Some(&self.prefix)
                || volume.labels.contains_key(LABEL_SNAPSHOT_OF)
                || !valid_cid(&volume.name, false)
            {
                continue;
            }
            let cid = DiskCid(volume.name.clone());
            let metadata = match self.read_disk(&cid) {
                Ok(Some(rec)) => rec.metadata,
                Ok(None) => metadata_of_labels(&volume.labels, DISK_OWN_LABELS),
                Err(e) => {
                    tracing::warn!(disk = %cid, error = %e, "{what}: unreadable record, using the volume's labels");
                    metadata_of_labels(&volume.labels, DISK_OWN_LABELS)
                }
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                found.insert(cid, metadata);
            }
        }
        Ok(found.into_iter().collect())
    }

    /// The disks attached to a VM, from its record.
    pub(crate) fn do_get_disks(&self, vm: &VmCid) -> Result<Vec<DiskCid>> {
        let rec = self
            .read_vm(vm)?
            .ok_or_else(|| DockerCpiError::VmNotFound(vm.clone()))?;
        Ok(rec.disks)
    }
}

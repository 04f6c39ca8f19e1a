//! Persistent disks and snapshots of the AWS CPI: EBS volumes (sized in
//! whole GiB, in the VM's availability zone), attached at the first free
//! device of `/dev/sdf`..`/dev/sdp`, resized, tagged, snapshotted.
//!
//! This module must not rewrite a VM's user-data (EC2 cannot change it on a
//! running instance) nor delete a volume that is still attached.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_ec2::types::{
    Filter, Instance, ResourceType, Volume, VolumeAttachmentState, VolumeState, VolumeType,
};
use bosun_cpi::{CreateDiskRequest, DiskCid, DiskHint, Metadata, SnapshotCid, VmCid};

use crate::config::{bool_prop, i32_of, str_prop, u64_prop};
use crate::ec2::{Polled, Retry};
use crate::tags::{metadata_of_tags, tag_filters, tag_spec, tags_of};
use crate::{AwsCpi, AwsCpiError, Result, Target, DEFAULT_VOLUME_TYPE};

/// ceil(size_mb / 1024) GiB, at least 1 (EBS sizes are whole GiB).
pub fn gib_of_mb(size_mb: u64) -> u64 {
    size_mb.div_ceil(1024).max(1)
}

pub(crate) fn gib_i32(size_mb: u64, what: &str) -> Result<i32> {
    i32::try_from(gib_of_mb(size_mb))
        .map_err(|_| AwsCpiError::Invalid(format!("{what}: size {size_mb} MB is too large")))
}

/// `/dev/sdX` for a device name in either the `sdX` or the `xvdX` form.
pub(crate) fn normalize_device(name: &str) -> String {
    let base = name.strip_prefix("/dev/").unwrap_or(name);
    let base = base
        .strip_prefix("xvd")
        .map(|rest| format!("sd{rest}"))
        .unwrap_or_else(|| base.to_string());
    format!("/dev/{base}")
}

/// Whether a device name is one `attach_disk` hands out (`/dev/sdf`..`/dev/sdp`, or `xvd`).
pub fn is_persistent_device(name: &str) -> bool {
    let d = normalize_device(name);
    d.strip_prefix("/dev/sd")
        .and_then(|rest| {
            let mut chars = rest.chars();
            let letter = chars.next()?;
            chars.next().is_none().then_some(letter)
        })
        .is_some_and(|l| ('f'..='p').contains(&l))
}

/// The first device name of `/dev/sdf`..`/dev/sdp` that no name in `used`
/// takes (`/dev/xvdg` takes `/dev/sdg`), or None when all are taken.
pub fn choose_device<S: AsRef<str>>(used: &[S]) -> Option<String> {
    let used: BTreeSet<String> = used.iter().map(|u| normalize_device(u.as_ref())).collect();
    ('f'..='p')
        .map(|l| format!("/dev/sd{l}"))
        .find(|d| !used.contains(d))
}

pub(crate) fn volume_state(v: &Volume) -> String {
    v.state()
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The instance a volume is attached (or attaching) to, if any.
pub(crate) fn attached_to(v: &Volume) -> Option<&str> {
    v.attachments()
        .iter()
        .filter(|a| {
            !matches!(
                a.state(),
                Some(VolumeAttachmentState::Detached | VolumeAttachmentState::Detaching)
            )
        })
        .find_map(|a| a.instance_id())
}

impl AwsCpi {
    pub(crate) async fn describe_volume(
        &self,
        disk: &DiskCid,
        retry: Retry,
    ) -> Result<Option<Volume>> {
        let r = self
            .ec2(
                format!("DescribeVolumes {disk}"),
                Target::Disk(disk.clone()),
                retry,
                || self.client.describe_volumes().volume_ids(&disk.0).send(),
            )
            .await;
        match r {
            Ok(out) => Ok(out
                .volumes()
                .iter()
                .find(|v| v.volume_id() == Some(disk.0.as_str()))
                .filter(|v| !matches!(v.state(), Some(VolumeState::Deleted)))
                .cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn volume(&self, disk: &DiskCid) -> Result<Volume> {
        self.describe_volume(disk, Retry::Transient)
            .await?
            .ok_or_else(|| AwsCpiError::DiskNotFound(disk.clone()))
    }

    /// Waits until `done` holds for the volume (unknown = not yet visible,
    /// or done when `missing_is_done`).
    pub(crate) async fn wait_volume(
        &self,
        disk: &DiskCid,
        want: &str,
        missing_is_done: bool,
        done: impl Fn(&Volume) -> bool,
    ) -> Result<Volume> {
        let what = format!("volume {disk} (waiting for {want})");
        let done = &done;
        let retry = if missing_is_done {
            Retry::Transient
        } else {
            Retry::AfterCreate
        };
        self.wait(&what, || async move {
            Ok(match self.describe_volume(disk, retry).await? {
                None if missing_is_done => Polled::Done(Volume::builder().build()),
                None => Polled::Pending("not-yet-visible".into()),
                Some(v) if done(&v) => Polled::Done(v),
                Some(v) => Polled::Pending(volume_state(&v)),
            })
        })
        .await
    }

    /// Volumes (neither deleting nor deleted) whose tags contain every entry
    /// of `filter`, with their tags, sorted by id: one DescribeVolumes
    /// `tag:<key>` filter per entry, every page.
    pub async fn find_volumes(&self, filter: &Metadata) -> Result<Vec<(DiskCid, Metadata)>> {
        let op = format!(
            "listing disks tagged {}: DescribeVolumes",
            bosun_cpi::describe_filter(filter)
        );
        let filters = tag_filters(filter);
        let mut found = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .ec2(&op, Target::None, Retry::Transient, || {
                    self.client
                        .describe_volumes()
                        .set_filters(filters.clone())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            for volume in out.volumes() {
                let Some(id) = volume.volume_id() else {
                    continue;
                };
                let gone = matches!(
                    volume.state(),
                    Some(VolumeState::Deleting | VolumeState::Deleted)
                );
                let metadata = metadata_of_tags(volume.tags());
                if !gone && bosun_cpi::metadata_matches(&metadata, filter) {
                    found.insert(DiskCid(id.to_string()), metadata);
                }
            }
            token = out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(found.into_iter().collect())
    }

    pub(crate) async fn disk_availability_zone(
        &self,
        req: &CreateDiskRequest,
        what: &str,
    ) -> Result<String> {
        if let Some(vm) = &req.vm_locality {
            let i = self.live_instance(vm).await?;
            return i
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_string)
                .ok_or_else(|| {
                    AwsCpiError::Invalid(format!(
                        "{what}: instance {vm} reports no availability zone"
                    ))
                });
        }
        if let Some(az) = str_prop(&req.cloud_properties, "availability_zone", what)? {
            return Ok(az);
        }
        // As BOSH's AWS CPI does without a VM: a zone of the region.
        let out = self
            .ec2(
                format!("DescribeAvailabilityZones ({what})"),
                Target::None,
                Retry::Transient,
                || self.client.describe_availability_zones().send(),
            )
            .await?;
        let mut zones: Vec<&str> = out
            .availability_zones()
            .iter()
            .filter(|z| z.state().map(|s| s.as_str()) != Some("unavailable"))
            .filter_map(|z| z.zone_name())
            .collect();
        zones.sort_unstable();
        zones.first().map(|z| z.to_string()).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: no vm_locality, no availability_zone cloud property, and region {} \
                 lists no availability zone",
                self.config.region
            ))
        })
    }

    pub(crate) async fn do_create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let what = format!("create_disk of {} MB", req.size_mb);
        let cp = &req.cloud_properties;
        let az = self.disk_availability_zone(req, &what).await?;
        let volume_type =
            str_prop(cp, "type", &what)?.unwrap_or_else(|| DEFAULT_VOLUME_TYPE.into());
        let mut create = self
            .client
            .create_volume()
            .availability_zone(&az)
            .size(gib_i32(req.size_mb, &what)?)
            .volume_type(VolumeType::from(volume_type.as_str()));
        if let Some(iops) = u64_prop(cp, "iops", &what)? {
            create = create.iops(i32_of(iops, "iops", &what)?);
        }
        if let Some(enc) = bool_prop(cp, "encrypted", &what)? {
            create = create.encrypted(enc);
        }
        if let Some(kms) = str_prop(cp, "kms_key_arn", &what)? {
            create = create.kms_key_id(kms);
        }
        if !req.metadata.is_empty() {
            create =
                create.tag_specifications(tag_spec(ResourceType::Volume, tags_of(&req.metadata)));
        }
        let out = self
            .ec2(
                format!("CreateVolume ({what} in {az})"),
                Target::None,
                Retry::Transient,
                || create.clone().send(),
            )
            .await?;
        let id = out.volume_id().ok_or_else(|| {
            AwsCpiError::Invalid(format!("CreateVolume ({what}) returned no volume id"))
        })?;
        let disk = DiskCid(id.to_string());
        let waited = self
            .wait_volume(&disk, "available", false, |v| {
                v.state() == Some(&VolumeState::Available)
            })
            .await;
        if let Err(e) = waited {
            let _ = self
                .ec2(
                    format!("DeleteVolume {disk}"),
                    Target::Disk(disk.clone()),
                    Retry::Transient,
                    || self.client.delete_volume().volume_id(&disk.0).send(),
                )
                .await;
            return Err(e);
        }
        tracing::info!(disk = %disk, az, "volume created");
        Ok(disk)
    }

    pub(crate) async fn do_delete_disk(&self, disk: &DiskCid) -> Result<()> {
        let Some(v) = self.describe_volume(disk, Retry::Transient).await? else {
            return Ok(());
        };
        if matches!(v.state(), Some(VolumeState::Deleting)) {
            return Ok(());
        }
        if let Some(vm) = attached_to(&v) {
            return Err(AwsCpiError::Conflict(format!(
                "delete_disk {disk}: it is attached to VM {vm}; detach it first"
            )));
        }
        let r = self
            .ec2(
                format!("DeleteVolume {disk}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || self.client.delete_volume().volume_id(&disk.0).send(),
            )
            .await;
        match r {
            Ok(_) => {
                tracing::info!(disk = %disk, "volume deleted");
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Device names taken on an instance: its block device mappings and the
    /// volumes attached to it.
    pub(crate) async fn used_devices(
        &self,
        vm: &VmCid,
        instance: &Instance,
    ) -> Result<Vec<String>> {
        let mut used: Vec<String> = instance
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name().map(str::to_string))
            .collect();
        used.extend(instance.root_device_name().map(str::to_string));
        for v in self.attached_volumes(vm).await? {
            used.extend(
                v.attachments()
                    .iter()
                    .filter(|a| a.instance_id() == Some(vm.0.as_str()))
                    .filter_map(|a| a.device().map(str::to_string)),
            );
        }
        Ok(used)
    }

    pub(crate) async fn attached_volumes(&self, vm: &VmCid) -> Result<Vec<Volume>> {
        let out = self
            .ec2(
                format!("DescribeVolumes attached to {vm}"),
                Target::Vm(vm.clone()),
                Retry::Transient,
                || {
                    self.client
                        .describe_volumes()
                        .filters(
                            Filter::builder()
                                .name("attachment.instance-id")
                                .values(&vm.0)
                                .build(),
                        )
                        .send()
                },
            )
            .await?;
        Ok(out
            .volumes()
            .iter()
            .filter(|v| attached_to(v) == Some(vm.0.as_str()))
            .cloned()
            .collect())
    }

    pub(crate) fn is_attached_to(v: &Volume, vm: &VmCid) -> bool {
        v.state() == Some(&VolumeState::InUse)
            && v.attachments().iter().any(|a| {
                a.instance_id() == Some(vm.0.as_str())
                    && matches!(a.state(), None | Some(VolumeAttachmentState::Attached))
            })
    }

    pub(crate) async fn do_attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let instance = self.live_instance(vm).await?;
        let volume = self.volume(disk).await?;
        let device = match attached_to(&volume) {
            Some(other) if other != vm.0 => {
                return Err(AwsCpiError::Conflict(format!(
                    "attach_disk {disk} to VM {vm}: it is attached to VM {other}; detach it first"
                )))
            }
            Some(_) => volume
                .attachments()
                .iter()
                .find(|a| a.instance_id() == Some(vm.0.as_str()))
                .and_then(|a| a.device())
                .map(str::to_string),
            None => None,
        };
        let device = match device {
            Some(d) => d,
            None => {
                let used = self.used_devices(vm, &instance).await?;
                let device = choose_device(&used).ok_or_else(|| {
                    AwsCpiError::Conflict(format!(
                        "attach_disk {disk} to VM {vm}: no free device among /dev/sdf../dev/sdp \
                         (used: {used:?})"
                    ))
                })?;
                self.ec2(
                    format!("AttachVolume {disk} to {vm} at {device}"),
                    Target::Disk(disk.clone()),
                    Retry::Transient,
                    || {
                        self.client
                            .attach_volume()
                            .volume_id(&disk.0)
                            .instance_id(&vm.0)
                            .device(&device)
                            .send()
                    },
                )
                .await?;
                device
            }
        };
        self.wait_volume(disk, &format!("attached to {vm}"), false, |v| {
            Self::is_attached_to(v, vm)
        })
        .await?;
        tracing::info!(vm = %vm, disk = %disk, device, "volume attached");
        Ok(DiskHint { path: device })
    }

    pub(crate) async fn do_detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let volume = self.volume(disk).await?;
        if attached_to(&volume) != Some(vm.0.as_str()) {
            return Ok(());
        }
        let r = self
            .ec2(
                format!("DetachVolume {disk} from {vm}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || {
                    self.client
                        .detach_volume()
                        .volume_id(&disk.0)
                        .instance_id(&vm.0)
                        .send()
                },
            )
            .await;
        match r {
            Ok(_) => {}
            // Detached meanwhile (IncorrectState: not attached).
            Err(e) if e.code() == Some("IncorrectState") => {}
            Err(e) => return Err(e),
        }
        self.wait_volume(disk, "available", true, |v| {
            v.state() == Some(&VolumeState::Available) || attached_to(v) != Some(vm.0.as_str())
        })
        .await?;
        tracing::info!(vm = %vm, disk = %disk, "volume detached");
        Ok(())
    }

    /// The persistent disks of a VM: volumes attached at a persistent-disk
    /// device (`/dev/sdf`..`/dev/sdp`); the root and ephemeral volumes are not.
    pub(crate) async fn do_get_disks(&self, vm: &VmCid) -> Result<Vec<DiskCid>> {
        self.live_instance(vm).await?;
        Ok(self
            .attached_volumes(vm)
            .await?
            .iter()
            .filter(|v| {
                v.attachments().iter().any(|a| {
                    a.instance_id() == Some(vm.0.as_str())
                        && a.device().is_some_and(is_persistent_device)
                })
            })
            .filter_map(|v| v.volume_id().map(|id| DiskCid(id.to_string())))
            .collect())
    }

    pub(crate) async fn do_resize_disk(&self, disk: &DiskCid, new_size_mb: u64) -> Result<()> {
        let what = format!("resize_disk {disk} to {new_size_mb} MB");
        let volume = self.volume(disk).await?;
        let want = gib_i32(new_size_mb, &what)?;
        let have = volume.size().unwrap_or(0);
        if want < have {
            return Err(AwsCpiError::Invalid(format!(
                "{what}: it is {have} GiB and cannot shrink to {want} GiB"
            )));
        }
        if want == have {
            return Ok(());
        }
        self.ec2(
            format!("ModifyVolume {disk} to {want} GiB"),
            Target::Disk(disk.clone()),
            Retry::Transient,
            || {
                self.client
                    .modify_volume()
                    .volume_id(&disk.0)
                    .size(want)
                    .send()
            },
        )
        .await?;
        self.wait_volume(disk, &format!("size {want} GiB"), false, |v| {
            v.size() == Some(want)
        })
        .await?;
        tracing::info!(disk = %disk, gib = want, "volume resized");
        Ok(())
    }

    pub(crate) async fn do_snapshot_disk(
        &self,
        disk: &DiskCid,
        metadata: &Metadata,
    ) -> Result<SnapshotCid> {
        self.volume(disk).await?;
        let mut create = self.client.create_snapshot().volume_id(&disk.0);
        let mut tags = metadata.clone();
        if let Some(name) = metadata.get("name") {
            tags.insert("Name".into(), name.clone());
        }
        if !tags.is_empty() {
            create = create.tag_specifications(tag_spec(ResourceType::Snapshot, tags_of(&tags)));
        }
        let out = self
            .ec2(
                format!("CreateSnapshot of {disk}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || create.clone().send(),
            )
            .await?;
        let id = out.snapshot_id().ok_or_else(|| {
            AwsCpiError::Invalid(format!("CreateSnapshot of {disk} returned no snapshot id"))
        })?;
        tracing::info!(disk = %disk, snapshot = id, "snapshot created");
        Ok(SnapshotCid(id.to_string()))
    }

    pub(crate) async fn do_delete_snapshot(&self, snap: &SnapshotCid) -> Result<()> {
        let r = self
            .ec2(
                format!("DeleteSnapshot {snap}"),
                Target::Snapshot(snap.clone()),
                Retry::Transient,
                || self.client.delete_snapshot().snapshot_id(&snap.0).send(),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether the volume exists and is not being deleted.
    pub(crate) async fn do_has_disk(&self, disk: &DiskCid) -> Result<bool> {
        Ok(self
            .describe_volume(disk, Retry::Transient)
            .await?
            .is_some_and(|v| !matches!(v.state(), Some(VolumeState::Deleting))))
    }

    /// Tags the volume.
    pub(crate) async fn do_set_disk_metadata(
        &self,
        disk: &DiskCid,
        metadata: &Metadata,
    ) -> Result<()> {
        self.volume(disk).await?;
        self.create_tags(
            format!("CreateTags on volume {disk}"),
            Target::Disk(disk.clone()),
            &disk.0,
            metadata,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_whole_gib() {
        assert_eq!(gib_of_mb(0), 1);
        assert_eq!(gib_of_mb(1), 1);
        assert_eq!(gib_of_mb(1024), 1);
        assert_eq!(gib_of_mb(1025), 2);
        assert_eq!(gib_of_mb(2048), 2);
        assert_eq!(gib_of_mb(10 * 1024 + 1), 11);
        assert!(gib_i32(u64::MAX, "x").is_err());
    }

    #[test]
    fn device_names_skip_used_ones_in_either_form() {
        let none: [&str; 0] = [];
        assert_eq!(choose_device(&none).as_deref(), Some("/dev/sdf"));
        assert_eq!(
            choose_device(&["/dev/sda1", "/dev/sdb"]).as_deref(),
            Some("/dev/sdf")
        );
        assert_eq!(
            choose_device(&["/dev/sdf", "/dev/xvdg", "sdh"]).as_deref(),
            Some("/dev/sdi")
        );
        let all: Vec<String> = ('f'..='p').map(|l| format!("/dev/sd{l}")).collect();
        assert_eq!(choose_device(&all), None);
        assert!(all.iter().all(|d| is_persistent_device(d)));
        assert!(is_persistent_device("/dev/xvdf") && is_persistent_device("sdp"));
        for d in [
            "/dev/sda1",
            "/dev/sdb",
            "/dev/sde",
            "/dev/sdq",
            "/dev/sdf1",
            "/dev/nvme1n1",
        ] {
            assert!(!is_persistent_device(d), "{d}");
        }
        let mut almost = all.clone();
        almost.retain(|d| d != "/dev/sdp");
        assert_eq!(choose_device(&almost).as_deref(), Some("/dev/sdp"));
    }
}

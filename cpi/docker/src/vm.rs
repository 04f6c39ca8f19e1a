//! VMs of the Docker CPI: containers whose PID 1 is the agent, created from
//! their record (networks ensured, settings uploaded, then started),
//! recreated when their disks change, restarted, deleted, and found by
//! metadata.
//!
//! This module must not talk to the agent nor give a container host bind
//! mounts or privileges; disk records change only to detach the disks of a
//! deleted VM.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::time::Duration;

use bollard::models::{ContainerInspectResponse, ContainerSummaryStateEnum, NetworkConnectRequest};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, RemoveContainerOptions, RestartContainerOptions,
    StopContainerOptions, UploadToContainerOptions,
};
use bosun_cpi::{CreateVmRequest, DiskCid, Metadata, VmCid};
use bytes::Bytes;

use crate::container::{container_config, settings_archive, settings_for, vm_networks};
use crate::names::{metadata_of_labels, valid_cid};
use crate::records::{remove_file_if_exists, write_json, VmRecord};
use crate::{
    docker_err, is_not_found, status_of, DockerCpi, DockerCpiError, Result, Target, LABEL_CPI,
    LABEL_VM, SETTINGS_PATH_IN_VM, STOP_GRACE_SECS, VM_OWN_LABELS,
};

impl DockerCpi {
    /// The container, or `None` when it does not exist.
    pub(crate) async fn inspect_container(
        &self,
        cid: &VmCid,
    ) -> Result<Option<ContainerInspectResponse>> {
        if !valid_cid(&cid.0, false) {
            return Ok(None);
        }
        match self.docker.inspect_container(&cid.0, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(docker_err(
                format!("inspecting container {cid}"),
                Target::Vm(cid.clone()),
            )(e)),
        }
    }

    /// Removes a container (force, volumes kept); already gone is fine.
    pub(crate) async fn remove_container(&self, cid: &VmCid, what: &str) -> Result<()> {
        let options = RemoveContainerOptions {
            force: true,
            v: false,
            link: false,
        };
        for _ in 0..50 {
            match self
                .docker
                .remove_container(&cid.0, Some(options.clone()))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if is_not_found(&e) => return Ok(()),
                // "removal already in progress": wait for it.
                Err(e) if status_of(&e) == Some(409) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => {
                    return Err(docker_err(
                        format!("{what}: removing container {cid}"),
                        Target::None,
                    )(e))
                }
            }
        }
        Err(DockerCpiError::Conflict(format!(
            "{what}: container {cid} is still being removed (retry)"
        )))
    }

    /// Creates (or recreates) the container of a VM from its record: removes
    /// any existing one, creates it with the record's disks, uploads the
    /// settings, starts it.
    pub(crate) async fn run_container(&self, rec: &VmRecord, what: &str) -> Result<()> {
        let cid = &rec.cid;
        let (body, extra) =
            container_config(&self.prefix, cid, &rec.request, &rec.metadata, &rec.disks)?;
        {
            let _net = self.net_lock.lock().await;
            for net in vm_networks(&self.prefix, &rec.request)? {
                self.ensure_network(&net, what).await?;
            }
            self.remove_container(cid, what).await?;
            let options = CreateContainerOptions {
                name: Some(cid.0.clone()),
                ..Default::default()
            };
            self.docker
                .create_container(Some(options), body)
                .await
                .map_err(|e| {
                    if is_not_found(&e) {
                        DockerCpiError::StemcellNotFound(rec.request.stemcell.clone())
                    } else {
                        docker_err(format!("{what}: creating container"), Target::None)(e)
                    }
                })?;
            for net in &extra {
                let request = NetworkConnectRequest {
                    container: cid.0.clone(),
                    endpoint_config: Some(net.endpoint()),
                };
                self.docker
                    .connect_network(&net.docker_name, request)
                    .await
                    .map_err(docker_err(
                        format!(
                            "{what}: connecting container to Docker network {}",
                            net.docker_name
                        ),
                        Target::None,
                    ))?;
            }
        }
        let archive = settings_archive(&settings_for(&rec.request, &rec.disks))?;
        let options = UploadToContainerOptions {
            path: "/".to_string(),
            ..Default::default()
        };
        self.docker
            .upload_to_container(
                &cid.0,
                Some(options),
                bollard::body_full(Bytes::from(archive)),
            )
            .await
            .map_err(docker_err(
                format!("{what}: uploading the agent settings to {SETTINGS_PATH_IN_VM}"),
                Target::None,
            ))?;
        self.docker
            .start_container(&cid.0, None)
            .await
            .map_err(docker_err(
                format!("{what}: starting container"),
                Target::None,
            ))?;
        Ok(())
    }

    /// Whether the container runs with exactly the record's disks mounted.
    pub(crate) fn container_matches(container: &ContainerInspectResponse, rec: &VmRecord) -> bool {
        let running = container
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let mounted: BTreeSet<&str> = container
            .mounts
            .iter()
            .flatten()
            .filter_map(|m| m.name.as_deref())
            .collect();
        let wanted: BTreeSet<&str> = rec.disks.iter().map(|d| d.0.as_str()).collect();
        running && mounted == wanted
    }

    /// Recreates the container with the record's disks (stop, remove, create, start).
    pub(crate) async fn recreate(&self, rec: &VmRecord, what: &str) -> Result<()> {
        let options = StopContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        match self.docker.stop_container(&rec.cid.0, Some(options)).await {
            Ok(()) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                return Err(docker_err(
                    format!("{what}: stopping container"),
                    Target::Vm(rec.cid.clone()),
                )(e))
            }
        }
        self.run_container(rec, what).await
    }

    /// What a VM is called in messages: `vm-... for <instance>`.
    pub(crate) fn describe_vm(cid: &VmCid, metadata: &Metadata) -> String {
        match metadata.get("instance").or_else(|| metadata.get("name")) {
            Some(i) => format!("{cid} for {i}"),
            None => cid.to_string(),
        }
    }

    pub(crate) async fn do_create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
        let cid = VmCid(format!("vm-{}", uuid::Uuid::new_v4()));
        let what = format!(
            "creating container {}",
            Self::describe_vm(&cid, &req.metadata)
        );
        // Validate before any side effect.
        vm_networks(&self.prefix, req)?;
        if !valid_cid(&req.stemcell.0, true) {
            return Err(DockerCpiError::StemcellNotFound(req.stemcell.clone()));
        }
        match self.docker.inspect_image(&req.stemcell.0).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                return Err(DockerCpiError::StemcellNotFound(req.stemcell.clone()))
            }
            Err(e) => {
                return Err(docker_err(
                    format!("{what}: inspecting stemcell image {}", req.stemcell),
                    Target::Stemcell(req.stemcell.clone()),
                )(e))
            }
        }
        let _l = self.lock(&cid.0).await;
        let rec = VmRecord {
            cid: cid.clone(),
            request: req.clone(),
            metadata: req.metadata.clone(),
            disks: Vec::new(),
        };
        // Recorded before the container exists, so a crash leaves a trace.
        {
            let _g = self.records_guard();
            write_json(&self.vm_file(&cid), &rec)?;
        }
        if let Err(e) = self.run_container(&rec, &what).await {
            if let Err(cleanup) = self.remove_container(&cid, &what).await {
                tracing::warn!(vm = %cid, error = %cleanup, "cleaning up a failed container");
            }
            let _ = remove_file_if_exists(&self.vm_file(&cid));
            let networks = vm_networks(&self.prefix, req)
                .map(|n| n.into_iter().map(|n| n.docker_name).collect())
                .unwrap_or_default();
            self.remove_unused_networks(networks).await;
            return Err(e);
        }
        tracing::info!(vm = %cid, agent = %req.agent_id, "created VM container");
        Ok(cid)
    }

    pub(crate) async fn do_delete_vm(&self, cid: &VmCid) -> Result<()> {
        if !valid_cid(&cid.0, false) {
            return Ok(());
        }
        let _l = self.lock(&cid.0).await;
        let rec = self.read_vm(cid)?;
        let what = format!(
            "deleting container {}",
            Self::describe_vm(
                cid,
                rec.as_ref()
                    .map(|r| &r.metadata)
                    .unwrap_or(&Metadata::new())
            )
        );
        let mut networks: BTreeSet<String> = BTreeSet::new();
        if let Some(rec) = &rec {
            networks.extend(
                vm_networks(&self.prefix, &rec.request)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|n| n.docker_name),
            );
        }
        if let Some(container) = self.inspect_container(cid).await? {
            let ours = format!("{}-", self.prefix);
            networks.extend(
                container
                    .network_settings
                    .and_then(|n| n.networks)
                    .unwrap_or_default()
                    .into_keys()
                    .filter(|n| n.starts_with(&ours)),
            );
        }
        self.remove_container(cid, &what).await?;
        // Its disks become detached (never deleted).
        let mut disks: BTreeSet<DiskCid> = rec.iter().flat_map(|r| r.disks.clone()).collect();
        if let Ok(dir) = fs::read_dir(self.root.join("disks")) {
            for entry in dir.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(disk) = name.strip_suffix(".json").filter(|n| !n.starts_with('.')) {
                    disks.insert(DiskCid(disk.to_string()));
                }
            }
        }
        for disk in disks {
            self.update_disk(&disk, |d| {
                if d.attached_to.as_ref() == Some(cid) {
                    d.attached_to = None;
                }
            })?;
        }
        remove_file_if_exists(&self.vm_file(cid))?;
        self.remove_unused_networks(networks).await;
        tracing::info!(vm = %cid, "deleted VM container");
        Ok(())
    }

    /// Every VM container of this CPI (running or not, but not being
    /// removed) whose metadata matches: the record's when there is one (it
    /// has set_vm_metadata's tags, which a container's labels may lack),
    /// else the container's labels (a container whose record was lost).
    pub(crate) async fn do_find_vms(&self, filter: &Metadata) -> Result<Vec<(VmCid, Metadata)>> {
        let what = format!("listing VMs tagged {}", bosun_cpi::describe_filter(filter));
        let options = ListContainersOptions {
            all: true,
            filters: Some(self.label_filter(&[LABEL_VM])),
            ..Default::default()
        };
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(docker_err(
                format!("{what}: listing containers"),
                Target::None,
            ))?;
        let mut found = BTreeMap::new();
        for container in containers {
            if container.state == Some(ContainerSummaryStateEnum::REMOVING) {
                continue;
            }
            let labels = container.labels.unwrap_or_default();
            if labels.get(LABEL_CPI) != Some(&self.prefix) {
                continue;
            }
            // Its name is its cid (`/vm-...`; link aliases have a second `/`).
            let Some(name) = container
                .names
                .iter()
                .flatten()
                .map(|n| n.trim_start_matches('/'))
                .find(|n| valid_cid(n, false))
            else {
                continue;
            };
            let cid = VmCid(name.to_string());
            let metadata = match self.read_vm(&cid) {
                Ok(Some(rec)) => rec.metadata,
                Ok(None) => metadata_of_labels(&labels, VM_OWN_LABELS),
                Err(e) => {
                    tracing::warn!(vm = %cid, error = %e, "{what}: unreadable record, using the container's labels");
                    metadata_of_labels(&labels, VM_OWN_LABELS)
                }
            };
            if bosun_cpi::metadata_matches(&metadata, filter) {
                found.insert(cid, metadata);
            }
        }
        Ok(found.into_iter().collect())
    }

    pub(crate) async fn do_reboot_vm(&self, cid: &VmCid) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        if self.inspect_container(cid).await?.is_none() {
            return Err(DockerCpiError::VmNotFound(cid.clone()));
        }
        let options = RestartContainerOptions {
            t: Some(STOP_GRACE_SECS),
            signal: None,
        };
        self.docker
            .restart_container(&cid.0, Some(options))
            .await
            .map_err(docker_err(
                format!("rebooting VM {cid}: restarting container"),
                Target::Vm(cid.clone()),
            ))
    }

    /// Whether the container runs: an exited container means its agent
    /// (PID 1) died, so the VM is gone.
    pub(crate) async fn do_has_vm(&self, cid: &VmCid) -> Result<bool> {
        Ok(self
            .inspect_container(cid)
            .await?
            .and_then(|c| c.state)
            .and_then(|s| s.running)
            .unwrap_or(false))
    }

    /// Containers cannot be relabelled: the record keeps the tags, and the
    /// next recreation (attach/detach) applies them.
    pub(crate) async fn do_set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> Result<()> {
        let _l = self.lock(&cid.0).await;
        self.update_vm(cid, |r| {
            r.metadata
                .extend(metadata.iter().map(|(k, v)| (k.clone(), v.clone())))
        })?;
        Ok(())
    }
}

//! `cloud-check`: compares a deployment's recorded state with what the CPIs
//! and agents say, lists each problem with the resolutions it allows (the
//! first is the safe default `--auto` applies), and carries out chosen
//! resolutions through [`crate::execute::repair`].
//!
//! Problems: a recorded VM the CPI no longer has; an agent that does not
//! answer; a recorded disk the CPI no longer has; a disk not attached to or
//! not mounted on its VM; a VM address that is not the instance's IP; VMs
//! and disks carrying this director's and deployment's tags but unknown to
//! the state (orphans, e.g. left by a crash between `create_vm` and
//! recording its cid).
//!
//! Safety: a VM is only recreated after it was fenced (deleted and
//! confirmed gone); an unknown disk is never deleted by default, it is kept
//! as an orphaned disk. This module must be called under the deployment lock.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use bosun_agent::protocol::ProcessState;
use bosun_cpi::chain::{chain, Chain};
use bosun_cpi::{describe_filter, Cpi, CpiError, DiskCid, Metadata, VmCid};

use crate::execute::executor::{instance_name, ExecError, Executor};
use crate::execute::repair::DEFAULT_WATCH;
use crate::plan::planner::primary_ip;
use crate::store::{now, Event, InstanceRecord, OrphanDisk, StateError};

/// A cloud-check failure (the scan itself; resolutions report per problem).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cloud-check of {deployment}: asking the {cpi} CPI for {what}")]
    Cpi {
        deployment: String,
        cpi: String,
        what: String,
        #[source]
        source: Box<CpiError>,
    },
    #[error("cloud-check: resolving problem {id} with {resolution}")]
    Resolve {
        id: usize,
        resolution: &'static str,
        #[source]
        source: Box<ExecError>,
    },
    #[error("cloud-check: '{resolution}' does not resolve problem {id} ({kind})")]
    BadResolution {
        id: usize,
        kind: String,
        resolution: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    MissingVm,
    UnresponsiveAgent,
    MissingDisk,
    UnattachedDisk,
    UnmountedDisk,
    IpMismatch,
    OrphanVm,
    OrphanDisk,
    /// Jobs stopped on an instance the operator wants running (a director
    /// that died between stopping and starting them, e.g. mid-recreate).
    StoppedJobs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Resolution {
    /// Leave it as it is.
    Skip,
    /// Fence the VM (delete, confirm gone), create a new one with the same
    /// IPs, reattach the disk, apply the last deployed spec.
    Recreate,
    /// Attach and mount the disk again, restart the jobs.
    Reattach,
    /// Forget the VM (the next deploy creates one).
    DeleteVmReference,
    /// Forget the disk (the next deploy creates an empty one).
    DeleteDiskReference,
    /// Delete the unknown VM.
    DeleteVm,
    /// Record the unknown disk as an orphaned disk (kept, deletable later).
    KeepDisk,
    /// Delete the unknown disk and its data.
    DeleteDisk,
    /// Start the jobs again and wait until they run.
    StartJobs,
}

impl Resolution {
    pub fn name(self) -> &'static str {
        match self {
            Resolution::Skip => "skip",
            Resolution::Recreate => "recreate",
            Resolution::Reattach => "reattach",
            Resolution::DeleteVmReference => "delete-vm-reference",
            Resolution::DeleteDiskReference => "delete-disk-reference",
            Resolution::DeleteVm => "delete-vm",
            Resolution::KeepDisk => "keep-disk",
            Resolution::DeleteDisk => "delete-disk",
            Resolution::StartJobs => "start-jobs",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Resolution::Skip => "skip for now",
            Resolution::Recreate => {
                "recreate the VM (fenced first), keeping its IPs and persistent disk"
            }
            Resolution::Reattach => "attach and mount the disk again, then restart the jobs",
            Resolution::DeleteVmReference => "forget the VM (the next deploy creates one)",
            Resolution::DeleteDiskReference => {
                "forget the disk (the next deploy creates an empty one)"
            }
            Resolution::DeleteVm => "delete the VM",
            Resolution::KeepDisk => "keep the disk as an orphaned disk",
            Resolution::DeleteDisk => "delete the disk and its data",
            Resolution::StartJobs => "start the jobs and wait until they run",
        }
    }

    pub fn from_name(s: &str) -> Option<Resolution> {
        [
            Resolution::Skip,
            Resolution::Recreate,
            Resolution::Reattach,
            Resolution::DeleteVmReference,
            Resolution::DeleteDiskReference,
            Resolution::DeleteVm,
            Resolution::KeepDisk,
            Resolution::DeleteDisk,
            Resolution::StartJobs,
        ]
        .into_iter()
        .find(|r| r.name() == s)
    }
}

/// One problem found.
#[derive(Clone, Debug, Serialize)]
pub struct CheckProblem {
    /// 1-based, in scan order.
    pub id: usize,
    pub kind: ProblemKind,
    /// `group/id` when it concerns a recorded instance.
    pub instance: Option<String>,
    pub cpi: String,
    /// The VM or disk cid.
    pub cid: String,
    pub description: String,
    /// Allowed resolutions, the default first.
    pub resolutions: Vec<Resolution>,
    #[serde(skip)]
    instance_id: Option<String>,
    #[serde(skip)]
    metadata: Metadata,
}

/// What a scan found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scan {
    pub problems: Vec<CheckProblem>,
    /// Things that could not be checked (a CPI that cannot list by tag...).
    pub notes: Vec<String>,
}

const AGENT_WAIT: Duration = Duration::from_secs(5);

impl Executor {
    /// Look for problems in one deployment.
    pub async fn cloud_check_scan(&self, deployment: &str) -> Result<Scan, CheckError> {
        let recs = self.store.instances(deployment)?;
        let mut scan = Scan::default();
        for rec in &recs {
            self.scan_vm(deployment, rec, &mut scan).await?;
            self.scan_disk(rec, &mut scan).await;
        }
        self.scan_orphans(deployment, &recs, &mut scan).await?;
        // Problems are resolved in the order listed: unknown VMs first, as
        // one may hold the address a VM about to be recreated needs (a
        // director that died mid-recreate leaves exactly that).
        scan.problems
            .sort_by_key(|p| p.kind != ProblemKind::OrphanVm);
        for (i, p) in scan.problems.iter_mut().enumerate() {
            p.id = i + 1;
        }
        Ok(scan)
    }

    /// Checks an instance's VM: missing from its CPI, or (for a started,
    /// deployed instance) not there at all; when it exists, what its agent
    /// reports (see [`Executor::scan_agent`]).
    async fn scan_vm(
        &self,
        deployment: &str,
        rec: &InstanceRecord,
        scan: &mut Scan,
    ) -> Result<(), CheckError> {
        use Resolution as R;
        let name = instance_name(rec);
        let Some(vm) = &rec.vm else {
            if rec.deployed.is_some() && rec.state == crate::store::InstanceState::Started {
                scan.push(
                    ProblemKind::MissingVm,
                    Some(rec),
                    "",
                    "",
                    format!("{name} has no VM"),
                    vec![R::Recreate, R::Skip],
                    Metadata::new(),
                );
            }
            return Ok(());
        };
        let cpi = self.cpis.get(&vm.cpi).map_err(|e| CheckError::Cpi {
            deployment: deployment.to_string(),
            cpi: vm.cpi.clone(),
            what: format!("VM {}", vm.cid),
            source: Box::new(CpiError::fatal(chain(&e))),
        })?;
        match cpi.has_vm(&VmCid(vm.cid.clone())).await {
            Ok(false) => scan.push(
                ProblemKind::MissingVm,
                Some(rec),
                &vm.cpi,
                &vm.cid,
                format!(
                    "VM {} of {name} is missing (the CPI no longer has it)",
                    vm.cid
                ),
                vec![R::Recreate, R::DeleteVmReference, R::Skip],
                Metadata::new(),
            ),
            Err(e) => scan.notes.push(format!(
                "could not ask the {} CPI about VM {} of {name}: {e}",
                vm.cpi,
                vm.cid,
                e = Chain(&e)
            )),
            Ok(true) => self.scan_agent(rec, vm, scan).await,
        }
        Ok(())
    }

    /// Checks an existing VM through its agent: one that does not answer;
    /// else a VM address that is not the instance's IP, its disk not
    /// attached or not mounted, and jobs stopped that should run.
    async fn scan_agent(&self, rec: &InstanceRecord, vm: &crate::store::VmRecord, scan: &mut Scan) {
        use Resolution as R;
        let name = instance_name(rec);
        let state = match self.connect(vm, AGENT_WAIT).await {
            Ok(c) => c.get_state_within(AGENT_WAIT).await.map_err(|e| chain(&e)),
            Err(e) => Err(chain(&e)),
        };
        let st = match state {
            Err(e) => {
                scan.push(
                    ProblemKind::UnresponsiveAgent,
                    Some(rec),
                    &vm.cpi,
                    &vm.cid,
                    format!("the agent of {name} on VM {} does not answer: {e}", vm.cid),
                    vec![R::Recreate, R::Skip],
                    Metadata::new(),
                );
                return;
            }
            Ok(st) => st,
        };
        let want = primary_ip(&rec.networks);
        if !want.is_empty() && vm.address != want {
            scan.push(
                ProblemKind::IpMismatch,
                Some(rec),
                &vm.cpi,
                &vm.cid,
                format!(
                    "VM {} of {name} is at {} but the instance's IP is {want}",
                    vm.cid, vm.address
                ),
                vec![R::Recreate, R::Skip],
                Metadata::new(),
            );
        }
        if let Some(d) = &rec.disk {
            let attached = match self.cpis.get(&d.cpi) {
                Ok(c) => c.get_disks(&VmCid(vm.cid.clone())).await.ok(),
                Err(_) => None,
            };
            if attached
                .as_ref()
                .is_some_and(|a| !a.iter().any(|x| x.0 == d.cid))
            {
                scan.push(
                    ProblemKind::UnattachedDisk,
                    Some(rec),
                    &d.cpi,
                    &d.cid,
                    format!(
                        "disk {} of {name} is not attached to its VM {}",
                        d.cid, vm.cid
                    ),
                    vec![R::Reattach, R::Skip],
                    Metadata::new(),
                );
            } else if st.persistent_disk.as_deref() != Some(d.cid.as_str()) {
                scan.push(
                    ProblemKind::UnmountedDisk,
                    Some(rec),
                    &d.cpi,
                    &d.cid,
                    format!(
                        "disk {} of {name} is not mounted on VM {} (the agent has {})",
                        d.cid,
                        vm.cid,
                        st.persistent_disk.as_deref().unwrap_or("none")
                    ),
                    vec![R::Reattach, R::Skip],
                    Metadata::new(),
                );
            }
        }
        if rec.state == crate::store::InstanceState::Started
            && rec.deployed.is_some()
            && st.generation > 0
            && st.job_state == ProcessState::Stopped
        {
            scan.push(
                ProblemKind::StoppedJobs,
                Some(rec),
                &vm.cpi,
                &vm.cid,
                format!("the jobs of {name} are stopped but it should be running"),
                vec![R::StartJobs, R::Skip],
                Metadata::new(),
            );
        }
    }

    /// Checks an instance's recorded disk still exists on its CPI.
    async fn scan_disk(&self, rec: &InstanceRecord, scan: &mut Scan) {
        use Resolution as R;
        let name = instance_name(rec);
        let Some(d) = &rec.disk else {
            return;
        };
        let Ok(c) = self.cpis.get(&d.cpi) else {
            return;
        };
        match c.has_disk(&DiskCid(d.cid.clone())).await {
            Ok(false) => scan.push(
                ProblemKind::MissingDisk,
                Some(rec),
                &d.cpi,
                &d.cid,
                format!(
                    "disk {} of {name} is missing (the CPI no longer has it)",
                    d.cid
                ),
                vec![R::DeleteDiskReference, R::Skip],
                Metadata::new(),
            ),
            Ok(true) => {}
            Err(e) => scan.notes.push(format!(
                "could not ask the {} CPI about disk {} of {name}: {e}",
                d.cpi,
                d.cid,
                e = Chain(&e)
            )),
        }
    }

    /// Orphans: VMs and disks tagged with this director and deployment on
    /// any CPI but unknown to the state (orphaned disks count as known).
    async fn scan_orphans(
        &self,
        deployment: &str,
        recs: &[InstanceRecord],
        scan: &mut Scan,
    ) -> Result<(), CheckError> {
        let known_vms: BTreeSet<&str> = recs
            .iter()
            .filter_map(|r| r.vm.as_ref().map(|v| v.cid.as_str()))
            .collect();
        let orphaned: BTreeSet<String> = self
            .store
            .orphan_disks()?
            .into_iter()
            .map(|d| d.cid)
            .collect();
        let known_disks: BTreeSet<&str> = recs
            .iter()
            .filter_map(|r| r.disk.as_ref().map(|d| d.cid.as_str()))
            .chain(orphaned.iter().map(String::as_str))
            .collect();
        let filter: Metadata = [
            ("director".to_string(), self.store.director_id().to_string()),
            ("deployment".to_string(), deployment.to_string()),
        ]
        .into_iter()
        .collect();
        for cpi_name in self.cpis.names().map(str::to_string).collect::<Vec<_>>() {
            let Ok(cpi) = self.cpis.get(&cpi_name) else {
                continue;
            };
            if let Some(caveat) = cpi.listing_caveat() {
                scan.notes.push(format!("CPI '{cpi_name}': {caveat}"));
            }
            scan_orphan_vms(&*cpi, &cpi_name, &filter, &known_vms, recs, scan).await;
            scan_orphan_disks(&*cpi, &cpi_name, &filter, &known_disks, scan).await;
        }
        Ok(())
    }
}

/// VMs on one CPI carrying `filter`'s tags but not in `known`; one whose
/// token matches an instance's pending VM is reported against it.
async fn scan_orphan_vms(
    cpi: &dyn Cpi,
    cpi_name: &str,
    filter: &Metadata,
    known: &BTreeSet<&str>,
    recs: &[InstanceRecord],
    scan: &mut Scan,
) {
    match cpi.find_vms(filter).await {
        Ok(vms) => {
            for (cid, md) in vms {
                if known.contains(cid.0.as_str()) {
                    continue;
                }
                let pending = recs.iter().find(|r| {
                    r.pending_vm_token.is_some() && r.pending_vm_token.as_ref() == md.get("token")
                });
                let what = md.get("instance").cloned().unwrap_or_default();
                scan.push(
                    ProblemKind::OrphanVm,
                    pending,
                    cpi_name,
                    &cid.0,
                    format!(
                        "VM {cid} ({what}) carries this deployment's tags but is unknown to its state{}",
                        if pending.is_some() {
                            " (created by a deploy that stopped before recording it)"
                        } else {
                            ""
                        }
                    ),
                    vec![Resolution::DeleteVm, Resolution::Skip],
                    md,
                );
            }
        }
        Err(CpiError::NotSupported { .. }) => scan.notes.push(format!(
            "the {cpi_name} CPI cannot list VMs by tag: orphaned VMs there are not checked"
        )),
        Err(e) => scan.notes.push(format!(
            "listing VMs tagged {} on the {cpi_name} CPI: {e}",
            describe_filter(filter),
            e = Chain(&e)
        )),
    }
}

/// Disks on one CPI carrying `filter`'s tags but not in `known`.
async fn scan_orphan_disks(
    cpi: &dyn Cpi,
    cpi_name: &str,
    filter: &Metadata,
    known: &BTreeSet<&str>,
    scan: &mut Scan,
) {
    match cpi.find_disks(filter).await {
        Ok(disks) => {
            for (cid, md) in disks {
                if known.contains(cid.0.as_str()) {
                    continue;
                }
                let what = md.get("instance").cloned().unwrap_or_default();
                scan.push(
                    ProblemKind::OrphanDisk,
                    None,
                    cpi_name,
                    &cid.0,
                    format!(
                        "disk {cid} ({what}) carries this deployment's tags but is unknown to its state"
                    ),
                    vec![Resolution::KeepDisk, Resolution::DeleteDisk, Resolution::Skip],
                    md,
                );
            }
        }
        Err(CpiError::NotSupported { .. }) => scan.notes.push(format!(
            "the {cpi_name} CPI cannot list disks by tag: orphaned disks there are not checked"
        )),
        Err(e) => scan.notes.push(format!(
            "listing disks tagged {} on the {cpi_name} CPI: {e}",
            describe_filter(filter),
            e = Chain(&e)
        )),
    }
}

impl Scan {
    /// Adds a problem, numbered in scan order.
    #[allow(clippy::too_many_arguments)]
    fn push(
        &mut self,
        kind: ProblemKind,
        rec: Option<&InstanceRecord>,
        cpi: &str,
        cid: &str,
        description: String,
        resolutions: Vec<Resolution>,
        metadata: Metadata,
    ) {
        let id = self.problems.len() + 1;
        self.problems.push(CheckProblem {
            id,
            kind,
            instance: rec.map(|r| format!("{}/{}", r.group, r.id)),
            cpi: cpi.to_string(),
            cid: cid.to_string(),
            description,
            resolutions,
            instance_id: rec.map(|r| r.id.clone()),
            metadata,
        });
    }
}

impl Executor {
    /// Apply one resolution to one problem of a scan. Returns what was done.
    pub async fn cloud_check_resolve(
        &self,
        deployment: &str,
        p: &CheckProblem,
        r: Resolution,
    ) -> Result<String, CheckError> {
        if !p.resolutions.contains(&r) {
            return Err(CheckError::BadResolution {
                id: p.id,
                kind: format!("{:?}", p.kind),
                resolution: r.name().to_string(),
            });
        }
        let event = |result: &str| {
            self.store.record_event(
                &Event::new(&self.source, deployment, p.instance.as_deref())
                    .seen(&p.description)
                    .did(r.name(), format!("{:?} {}", p.kind, p.cid).to_lowercase())
                    .result(result),
            );
        };
        let outcome = self.resolve_inner(deployment, p, r).await;
        match &outcome {
            Ok(msg) => event(msg),
            Err(e) => event(&format!("error: {e}", e = Chain(&e))),
        }
        outcome.map_err(|e| CheckError::Resolve {
            id: p.id,
            resolution: r.name(),
            source: Box::new(e),
        })
    }

    async fn resolve_inner(
        &self,
        deployment: &str,
        p: &CheckProblem,
        r: Resolution,
    ) -> Result<String, ExecError> {
        let current = match &p.instance_id {
            Some(id) => self
                .store
                .instances(deployment)?
                .into_iter()
                .find(|x| &x.id == id),
            None => None,
        };
        let need = || {
            current.clone().ok_or_else(|| {
                ExecError::Failed("the instance no longer exists; scan again".into())
            })
        };
        match r {
            Resolution::Skip => Ok("skipped".into()),
            Resolution::Recreate => {
                let mut rec = need()?;
                self.fence_vm(&mut rec, &p.description, true).await?;
                self.recreate_deployed(rec, DEFAULT_WATCH).await?;
                Ok("recreated".into())
            }
            Resolution::Reattach => {
                self.reattach_disk(need()?).await?;
                Ok("reattached and mounted".into())
            }
            Resolution::StartJobs => {
                self.start_jobs(&need()?, DEFAULT_WATCH).await?;
                Ok("jobs running".into())
            }
            Resolution::DeleteVmReference => {
                let mut rec = need()?;
                rec.vm = None;
                rec.applied = None;
                if let Some(d) = rec.disk.as_mut() {
                    d.attached = false;
                }
                self.store.save_instance(&rec)?;
                Ok("VM reference deleted".into())
            }
            Resolution::DeleteDiskReference => {
                let mut rec = need()?;
                rec.disk = None;
                self.store.save_instance(&rec)?;
                Ok("disk reference deleted".into())
            }
            Resolution::DeleteVm => {
                let cpi = self.cpis.get(&p.cpi)?;
                cpi.delete_vm(&VmCid(p.cid.clone()))
                    .await
                    .map_err(|source| ExecError::Cpi {
                        what: format!("deleting orphaned VM {}", p.cid),
                        source: Box::new(source),
                    })?;
                // The deploy that created it never recorded it: forget its token.
                if let Some(mut rec) = current {
                    if rec.pending_vm_token.as_ref() == p.metadata.get("token") {
                        rec.pending_vm_token = None;
                        self.store.save_instance(&rec)?;
                    }
                }
                Ok("deleted".into())
            }
            Resolution::KeepDisk => {
                self.store.save_orphan_disk(&OrphanDisk {
                    cid: p.cid.clone(),
                    cpi: p.cpi.clone(),
                    size_mb: 0,
                    deployment: deployment.to_string(),
                    instance: p.metadata.get("instance").cloned().unwrap_or_default(),
                    orphaned_at: now(),
                })?;
                Ok("kept as an orphaned disk".into())
            }
            Resolution::DeleteDisk => {
                let cpi = self.cpis.get(&p.cpi)?;
                cpi.delete_disk(&DiskCid(p.cid.clone()))
                    .await
                    .map_err(|source| ExecError::Cpi {
                        what: format!("deleting orphaned disk {}", p.cid),
                        source: Box::new(source),
                    })?;
                Ok("deleted".into())
            }
        }
    }
}

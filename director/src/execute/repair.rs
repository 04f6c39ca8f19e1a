//! Operations on one instance outside a deploy, shared by the health
//! monitor, cloud-check and the operator's `start`/`stop`/`restart`/
//! `recreate`: fencing a VM (delete it, and for `consistent` instances wait
//! until the CPI confirms it gone), recreating a VM from what was last
//! deployed there (same IPs, same persistent disk), restarting failing jobs,
//! reattaching a persistent disk, and starting and stopping.
//!
//! Every step is recorded as an event before the next one starts, so the
//! event log shows the order (fence, confirmed gone, create, attach). This
//! module decides nothing about *whether* to repair: its callers do.

use std::time::{Duration, Instant};

use bosun_agent::client::AgentClient;
use bosun_agent::protocol::{DrainKind, DrainParams, RestartJobsParams};
use bosun_cpi::chain::Chain;
use bosun_cpi::{DiskCid, VmCid};

use crate::execute::executor::{instance_name, job_state, ExecError, Executor, NextState};
use crate::plan::planner::{Change, DiskAction, InstancePlan, VmAction};
use crate::store::{Event, InstanceRecord, InstanceState};

/// How long fencing waits for the CPI to confirm a deleted VM gone.
const FENCE_CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Watch window (ms) of a recreated instance when the caller has none.
pub const DEFAULT_WATCH: (u64, u64) = (0, 30_000);

impl Executor {
    fn repair_event(
        &self,
        rec: &InstanceRecord,
        seen: &str,
        action: &str,
        object: &str,
        result: &str,
    ) {
        self.store.record_event(
            &Event::new(&self.source, &rec.deployment, Some(&instance_name(rec)))
                .seen(seen)
                .did(action, object)
                .result(result),
        );
    }

    /// Take an instance's VM out of service without its agent's help: delete
    /// it and, when `confirm`, wait until the CPI says it no longer exists.
    /// Only then is the persistent disk marked detached, so it can move. An
    /// unconfirmed fence fails and leaves the disk where it is.
    pub async fn fence_vm(
        &self,
        rec: &mut InstanceRecord,
        seen: &str,
        confirm: bool,
    ) -> Result<(), ExecError> {
        let Some(vm) = rec.vm.clone() else {
            return Ok(());
        };
        let name = instance_name(rec);
        let cpi = self.cpis.get(&vm.cpi)?;
        let cid = VmCid(vm.cid.clone());
        let object = format!("vm {}", vm.cid);
        self.progress.stage(&name, "fencing VM");
        match cpi.delete_vm(&cid).await {
            Ok(()) => self.repair_event(rec, seen, "fence", &object, "deleted"),
            Err(e) if confirm => {
                let msg = format!(
                    "could not delete VM {} of {name}: {e}; its persistent disk was not moved",
                    vm.cid,
                    e = Chain(&e)
                );
                self.repair_event(rec, seen, "fence", &object, &format!("error: {msg}"));
                return Err(ExecError::Failed(msg));
            }
            Err(e) => self.repair_event(
                rec,
                seen,
                "fence",
                &object,
                &format!(
                    "delete failed ({e}); restart_policy available: going on",
                    e = Chain(&e)
                ),
            ),
        }
        if confirm {
            let started = Instant::now();
            loop {
                match cpi.has_vm(&cid).await {
                    Ok(false) => break,
                    Ok(true) | Err(_) if started.elapsed() < FENCE_CONFIRM_TIMEOUT => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Ok(true) | Err(_) => {
                        let msg = format!(
                            "VM {} of {name} still exists {} s after deleting it; its persistent disk was not moved",
                            vm.cid,
                            FENCE_CONFIRM_TIMEOUT.as_secs()
                        );
                        self.repair_event(rec, seen, "fence", &object, &format!("error: {msg}"));
                        return Err(ExecError::Failed(msg));
                    }
                }
            }
            self.repair_event(rec, seen, "fence", &object, "confirmed gone");
        }
        if let Some(d) = rec.disk.clone().filter(|d| d.attached) {
            // The CPI may keep its own record of the attachment.
            if let Ok(c) = self.cpis.get(&d.cpi) {
                if let Err(e) = c.detach_disk(&cid, &DiskCid(d.cid.clone())).await {
                    // The VM is gone; the CPI may have forgotten it too.
                    tracing::info!(
                        "detaching disk {} from the fenced VM {cid}: {e}",
                        d.cid,
                        e = Chain(&e)
                    );
                }
            }
            if let Some(dr) = rec.disk.as_mut() {
                dr.attached = false;
            }
        }
        rec.vm = None;
        rec.applied = None;
        self.store.save_instance(rec)?;
        Ok(())
    }

    /// Give an instance without a VM a new one from what was last deployed
    /// there: same IPs, its persistent disk reattached, same spec. `watch`
    /// is the update watch window in ms.
    pub async fn recreate_deployed(
        &self,
        rec: InstanceRecord,
        watch: (u64, u64),
    ) -> Result<(), ExecError> {
        let name = instance_name(&rec);
        let Some(d) = rec.deployed.clone() else {
            return Err(ExecError::Failed(format!(
                "{name} has no recorded deployed spec (it never ran, or was deployed by an older bosun): deploy again"
            )));
        };
        if rec.vm.is_some() {
            return Err(ExecError::Failed(format!(
                "{name} still has a VM: fence it before recreating"
            )));
        }
        let ip = InstancePlan {
            record: rec.clone(),
            change: Change::Recreate,
            reasons: vec![],
            vm: VmAction::Create(d.vm.clone()),
            vm_target: d.vm,
            disk: if rec.disk.is_some() {
                DiskAction::Keep
            } else {
                DiskAction::None
            },
            spec: d.spec,
            applied: d.applied,
            stemcell: d.stemcell,
        };
        self.update_instance(&ip, rec, watch, "").await
    }

    /// Carry out `start`/`stop`/`restart`/`recreate` on one instance and
    /// record the state the operator asked for.
    pub async fn change_instance_state(
        &self,
        mut rec: InstanceRecord,
        change: StateChange,
        skip_drain: bool,
        watch: (u64, u64),
    ) -> Result<(), ExecError> {
        let name = instance_name(&rec);
        match change {
            StateChange::Stop { hard: false } => self.soft_stop(&mut rec, skip_drain).await?,
            StateChange::Stop { hard: true } => {
                self.progress.stage(&name, "stopping (hard)");
                let drain = (!skip_drain).then_some(DrainKind::Shutdown);
                self.teardown_vm_with(&mut rec, drain, NextState::VmDeleted)
                    .await?;
                rec.state = InstanceState::Detached;
                self.store.save_instance(&rec)?;
            }
            StateChange::Start => self.start_instance(&mut rec, watch).await?,
            StateChange::Restart => {
                self.soft_stop(&mut rec, skip_drain).await?;
                self.start_instance(&mut rec, watch).await?;
            }
            StateChange::Recreate => {
                self.progress.stage(&name, "recreating");
                let drain = (!skip_drain).then_some(DrainKind::Update);
                self.teardown_vm_with(&mut rec, drain, NextState::VmDeleted)
                    .await?;
                rec.state = InstanceState::Started;
                self.store.save_instance(&rec)?;
                self.recreate_deployed(rec.clone(), watch).await?;
            }
        }
        self.progress
            .stage(&name, &format!("{} done", change.verb()));
        self.store.record_event(
            &Event::new(&self.source, &rec.deployment, Some(&name))
                .did(change.verb(), "instance")
                .result("ok"),
        );
        Ok(())
    }

    /// Drain (unless skipped) and stop the jobs; the VM stays.
    async fn soft_stop(&self, rec: &mut InstanceRecord, skip_drain: bool) -> Result<(), ExecError> {
        let name = instance_name(rec);
        if let Some(vm) = rec.vm.clone() {
            let client = self
                .reach(&vm, &name, self.opts.existing_agent_timeout)
                .await?;
            let size = rec.disk.as_ref().map(|d| d.size_mb);
            let drain = (!skip_drain).then(|| DrainParams {
                kind: DrainKind::Shutdown,
                timeout_secs: self.opts.drain_timeout_secs,
                changed_jobs: vec![],
                job_state: Some(job_state(size)),
                next_job_state: Some(job_state(size)),
            });
            self.drain_and_stop(&client, &name, drain, NextState::Keep)
                .await?;
            rec.state = InstanceState::Stopped;
            self.store.save_instance(rec)?;
        }
        // A detached instance is already stopped (harder).
        Ok(())
    }

    /// Start an instance: a detached one gets its VM back first.
    async fn start_instance(
        &self,
        rec: &mut InstanceRecord,
        watch: (u64, u64),
    ) -> Result<(), ExecError> {
        let name = instance_name(rec);
        rec.state = InstanceState::Started;
        match rec.vm.clone() {
            None => {
                self.store.save_instance(rec)?;
                self.recreate_deployed(rec.clone(), watch).await?;
            }
            Some(vm) => {
                let client = self
                    .reach(&vm, &name, self.opts.existing_agent_timeout)
                    .await?;
                self.start_and_watch(&client, &name, watch).await?;
                self.store.save_instance(rec)?;
            }
        }
        Ok(())
    }

    /// Restart the named jobs of an instance (every job when `jobs` is
    /// empty) through its agent; returns the agent.
    pub async fn restart_jobs(
        &self,
        rec: &InstanceRecord,
        jobs: &[String],
        timeout: Duration,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let client = self.reach_instance(rec, timeout).await?;
        client
            .restart_jobs(&RestartJobsParams {
                jobs: jobs.to_vec(),
            })
            .await
            .map_err(|source| ExecError::Agent {
                what: match jobs {
                    [] => format!("restarting the jobs of {name}"),
                    _ => format!("restarting jobs {} on {name}", jobs.join(", ")),
                },
                source: Box::new(source),
            })?;
        Ok(client)
    }

    /// Start every job of an instance again and wait until they run.
    pub async fn start_jobs(
        &self,
        rec: &InstanceRecord,
        watch: (u64, u64),
    ) -> Result<(), ExecError> {
        let client = self
            .restart_jobs(rec, &[], self.opts.existing_agent_timeout)
            .await?;
        self.watch(&client, &instance_name(rec), watch).await
    }

    /// Attach and mount an instance's persistent disk again on its VM
    /// (whatever the records say), then restart its jobs so they see it.
    /// A VM with no spec applied has no jobs to restart: its disk is
    /// attached and mounted for the next deploy.
    pub async fn reattach_disk(&self, mut rec: InstanceRecord) -> Result<(), ExecError> {
        let name = instance_name(&rec);
        let (Some(vm), Some(_)) = (rec.vm.clone(), rec.disk.clone()) else {
            return Err(ExecError::Failed(format!(
                "{name} needs a VM and a disk to reattach its disk"
            )));
        };
        let client = self
            .reach(&vm, &name, self.opts.existing_agent_timeout)
            .await?;
        if let Some(dr) = rec.disk.as_mut() {
            dr.attached = false;
        }
        let client = self.attach_and_mount(&mut rec, client).await?;
        // A VM with no spec applied (it never ran, or a recreate stopped
        // before applying one) has no jobs to restart: the next deploy
        // applies the spec onto the mounted disk.
        let applied = client
            .get_state()
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("reading the state of {name}"),
                source: Box::new(source),
            })?
            .generation
            > 0;
        if rec.deployed.is_none() || !applied {
            return Ok(());
        }
        client
            .restart_jobs(&RestartJobsParams { jobs: vec![] })
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("restarting the jobs of {name} after reattaching its disk"),
                source: Box::new(source),
            })
    }
}

/// What `start`, `stop`, `restart` and `recreate` do to each instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StateChange {
    Start,
    /// `hard`: delete the VM too, keeping the persistent disk and the IPs.
    Stop {
        hard: bool,
    },
    Restart,
    /// A new VM with the same IPs, disk and spec.
    Recreate,
}

impl StateChange {
    /// The command, as the operator typed it.
    pub fn verb(self) -> &'static str {
        match self {
            StateChange::Start => "start",
            StateChange::Stop { hard: false } => "stop",
            StateChange::Stop { hard: true } => "stop --hard",
            StateChange::Restart => "restart",
            StateChange::Recreate => "recreate",
        }
    }
}

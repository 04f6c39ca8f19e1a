//! One attempt at a `Plan`: group by group in order, instances in waves of
//! `max_in_flight` (canaries first), then the post-deploy scripts and the
//! errand specs recorded; what it did is an `ExecSummary`.
//!
//! Orchestration only: the VM, disk, drain and watch primitives are in
//! `executor`; this module must not decide what to change (the planner
//! did) nor retry a failed plan (the operation above decides).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use bosun_cpi::chain::Chain;

use super::executor::{futures_join_all, instance_name, ExecError, Executor, NextState};
use crate::plan::planner::{Change, GroupPlan, InstancePlan, Plan};
use bosun_agent::protocol::DrainKind;

use crate::store::{DeployedSpec, InstanceRecord, InstanceState};

impl Executor {
    /// Carry out a plan.
    pub async fn execute(&self, plan: &Plan) -> Result<ExecSummary, ExecError> {
        let mut summary = ExecSummary::default();
        if !plan.compile.is_empty() {
            summary.compiled = crate::execute::compiler::compile(self, plan).await?;
        }
        for d in &plan.deletes {
            if self.opts.cancel.load(Ordering::SeqCst) {
                return Err(ExecError::Cancelled(
                    "before deleting the next instance".into(),
                ));
            }
            let mut rec = d.clone();
            let name = instance_name(&rec);
            self.progress.stage(&name, "deleting");
            self.teardown_vm(&mut rec, DrainKind::Shutdown, NextState::InstanceDeleted)
                .await?;
            self.orphan_disk(&mut rec).await?;
            self.store.delete_instance(&rec.id)?;
            self.event(&plan.deployment, Some(&name), "delete", "instance", "ok");
            summary.deleted += 1;
        }

        // New instances get their VMs (and disks) up front, in parallel.
        let fresh: Vec<&InstancePlan> = plan
            .groups
            .iter()
            .flat_map(|g| g.instances.iter())
            .filter(|i| i.change == Change::Create)
            .collect();
        let mut created: BTreeMap<String, InstanceRecord> = BTreeMap::new();
        {
            let sem = Arc::new(Semaphore::new(self.opts.create_parallelism.max(1)));
            let futs = fresh.iter().map(|ip| {
                let sem = sem.clone();
                async move {
                    let _permit = sem.acquire().await;
                    let mut rec = ip.record.clone();
                    self.prepare_vm(ip, &mut rec).await.map(|_| rec)
                }
            });
            let results = futures_join_all(futs).await;
            let mut first_err = None;
            for r in results {
                match r {
                    Ok(rec) => {
                        created.insert(rec.id.clone(), rec);
                    }
                    Err(e) => {
                        if first_err.is_none() {
                            first_err = Some(e);
                        }
                    }
                }
            }
            if let Some(e) = first_err {
                return Err(e);
            }
            summary.created = created.len();
        }

        // Groups in stages: a serial group starts a new stage.
        let mut stages: Vec<Vec<&GroupPlan>> = Vec::new();
        for g in &plan.groups {
            match stages.last_mut() {
                Some(stage) if !g.update.serial => stage.push(g),
                _ => stages.push(vec![g]),
            }
        }
        let created = Arc::new(tokio::sync::Mutex::new(created));
        for stage in stages {
            if self.opts.cancel.load(Ordering::SeqCst) {
                return Err(ExecError::Cancelled(format!(
                    "instance group {} was not started",
                    stage
                        .iter()
                        .map(|g| g.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let futs = stage
                .into_iter()
                .map(|g| self.update_group(&plan.deployment, g, created.clone()));
            let results = futures_join_all(futs).await;
            for r in results {
                summary.updated += r?;
            }
        }
        if summary.updated > 0 || summary.deleted > 0 {
            self.post_deploy(plan).await?;
        }
        Ok(summary)
    }

    async fn update_group(
        &self,
        deployment: &str,
        g: &GroupPlan,
        created: Arc<tokio::sync::Mutex<BTreeMap<String, InstanceRecord>>>,
    ) -> Result<usize, ExecError> {
        if g.lifecycle == crate::model::values::Lifecycle::Errand {
            return self.record_errand_specs(deployment, g);
        }
        let changing: Vec<&InstancePlan> = g
            .instances
            .iter()
            .filter(|i| i.change != Change::None)
            .collect();
        if changing.is_empty() {
            return Ok(0);
        }
        let canaries = (g.update.canaries as usize).min(changing.len());
        let max_in_flight = g
            .update
            .max_in_flight
            .resolve(g.instances.len() as u32)
            .max(1) as usize;
        let (canary, rest) = changing.split_at(canaries);
        let failed = Arc::new(AtomicBool::new(false));
        for (batch, watch, label) in [
            (canary, g.update.canary_watch_time, "canary"),
            (rest, g.update.update_watch_time, ""),
        ] {
            if batch.is_empty() {
                continue;
            }
            let width = if label == "canary" {
                canaries.max(1)
            } else {
                max_in_flight
            };
            let sem = Arc::new(Semaphore::new(width));
            let futs = batch.iter().map(|ip| {
                let sem = sem.clone();
                let failed = failed.clone();
                let created = created.clone();
                async move {
                    let _permit = sem.acquire().await;
                    if failed.load(Ordering::SeqCst) {
                        return Ok(false);
                    }
                    if self.opts.cancel.load(Ordering::SeqCst) {
                        failed.store(true, Ordering::SeqCst);
                        return Err(ExecError::Cancelled(format!(
                            "{} was not started",
                            instance_name(&ip.record)
                        )));
                    }
                    let rec = match created.lock().await.remove(&ip.record.id) {
                        Some(r) => r,
                        None => ip.record.clone(),
                    };
                    let name = instance_name(&rec);
                    let r = self
                        .update_instance(ip, rec, (watch.min_ms, watch.max_ms), label)
                        .await;
                    match &r {
                        Ok(()) => self.event(deployment, Some(&name), "update", "instance", "ok"),
                        Err(e) => {
                            failed.store(true, Ordering::SeqCst);
                            self.progress
                                .stage(&name, &format!("failed: {e}", e = Chain(&e)));
                            self.event(
                                deployment,
                                Some(&name),
                                "update",
                                "instance",
                                &format!("error: {e}", e = Chain(&e)),
                            );
                        }
                    }
                    r.map(|_| true)
                }
            });
            let results = futures_join_all(futs).await;
            let mut first_err = None;
            for r in results {
                if let Err(e) = r {
                    first_err.get_or_insert(e);
                }
            }
            if let Some(e) = first_err {
                return Err(match label {
                    _ if matches!(e, ExecError::Cancelled(_)) => e,
                    "canary" => ExecError::Failed(format!(
                        "canary of instance group '{}' failed, the remaining instances were left untouched: {e}",
                        g.name
                    , e = Chain(&e))),
                    _ => e,
                });
            }
        }
        Ok(changing.len())
    }

    /// An errand group's instances: record the spec and VM each will run
    /// with (IPs stay reserved); no VM is created.
    fn record_errand_specs(&self, deployment: &str, g: &GroupPlan) -> Result<usize, ExecError> {
        let mut n = 0;
        for ip in g.instances.iter().filter(|i| i.change != Change::None) {
            let mut rec = ip.record.clone();
            rec.state = InstanceState::Errand;
            rec.deployed = Some(DeployedSpec {
                vm: ip.vm_target.clone(),
                spec: ip.spec.clone(),
                applied: ip.applied.clone(),
                stemcell: ip.stemcell.clone(),
            });
            self.store.save_instance(&rec)?;
            self.event(
                deployment,
                Some(&instance_name(&rec)),
                "record",
                "errand spec",
                "ok",
            );
            n += 1;
        }
        Ok(n)
    }

    /// After every instance was updated: `post-deploy` on each running one.
    async fn post_deploy(&self, plan: &Plan) -> Result<(), ExecError> {
        let recs = self.store.instances(&plan.deployment)?;
        let futs = recs
            .iter()
            .filter(|r| r.state == InstanceState::Started)
            .filter_map(|r| r.vm.clone().map(|vm| (r, vm)))
            .map(|(r, vm)| async move {
                let name = instance_name(r);
                let client = self
                    .reach(&vm, &name, self.opts.existing_agent_timeout)
                    .await?;
                self.run_lifecycle(&client, &name, "post-deploy").await
            });
        for r in futures_join_all(futs).await {
            r?;
        }
        Ok(())
    }
}

/// What an execution did.
#[derive(Clone, Debug, Default)]
pub struct ExecSummary {
    pub compiled: usize,
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
}

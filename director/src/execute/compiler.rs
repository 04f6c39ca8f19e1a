//! Package compilation on compilation VMs, as BOSH does: VMs created through
//! the CPI, packages compiled by their agents in dependency order, up to one
//! package per worker at a time, results cached by (fingerprint, stemcell).
//! Workers are deleted when compilation ends, whether it succeeded or not.
//!
//! This module must not decide where workers go (the plan did) nor touch
//! instances.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{Mutex, Notify};

use bosun_agent::client::AgentClient;
use bosun_agent::protocol::{CompileRequest, PackageRef};
use bosun_cpi::chain::{chain, Chain};
use bosun_cpi::{Metadata, VmCid};

use crate::execute::executor::{futures_join_all, ExecError, Executor};
use crate::plan::planner::{CompileStep, Plan};
use crate::store::CompiledPackage;

struct Queue {
    pending: Vec<CompileStep>,
    /// Fingerprint+stemcell of packages done in this run.
    done: BTreeSet<(String, String)>,
    failed: Option<String>,
}

/// Compile every step of the plan. Returns how many were compiled.
pub async fn compile(exec: &Executor, plan: &Plan) -> Result<usize, ExecError> {
    let Some(cp) = &plan.compilation else {
        return Err(ExecError::Compile(
            "the plan has packages to compile but no compilation workers".into(),
        ));
    };
    let total = plan.compile.len();
    let queue = Arc::new(Mutex::new(Queue {
        pending: plan.compile.clone(),
        done: BTreeSet::new(),
        failed: None,
    }));
    let notify = Arc::new(Notify::new());
    let workers = cp.workers.iter().enumerate().map(|(i, networks)| {
        let queue = queue.clone();
        let notify = notify.clone();
        async move {
            let subject = format!("compilation/{i}");
            // Which stemcell: all steps of one plan share the compilation CPI;
            // pick the cid for the first step's stemcell key.
            let key = plan
                .compile
                .first()
                .map(|s| s.stemcell.clone())
                .unwrap_or_default();
            let stemcell = cp.stemcells.get(&key).cloned().ok_or_else(|| {
                ExecError::Compile(format!(
                    "no stemcell {key} on the {} CPI for compilation",
                    cp.cpi
                ))
            })?;
            let token = uuid::Uuid::new_v4().to_string();
            let metadata: Metadata = [
                ("director", exec.store.director_id().to_string()),
                ("deployment", plan.deployment.clone()),
                ("instance", subject.clone()),
                ("name", subject.clone()),
                ("token", token),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            // The cid as soon as the CPI returns it: a worker whose agent
            // never answers is deleted like any other.
            let created: std::sync::Mutex<Option<VmCid>> = std::sync::Mutex::new(None);
            let vm = exec
                .create_vm(
                    &cp.cpi,
                    &stemcell,
                    &cp.cloud_properties,
                    networks,
                    &serde_json::json!({}),
                    metadata,
                    &subject,
                    |vm| {
                        *lock(&created) = Some(vm.cid.clone());
                        Ok(())
                    },
                )
                .await;
            let result = match &vm {
                Ok(vm) => match &vm.client {
                    Some(client) => run_worker(exec, &subject, client, &queue, &notify).await,
                    None => Err(ExecError::Compile(format!(
                        "{subject}: agent did not answer"
                    ))),
                },
                Err(e) => Err(ExecError::Compile(format!("{subject}: {e}", e = Chain(&e)))),
            };
            if let Err(e) = &result {
                queue.lock().await.failed.get_or_insert(chain(&e));
                notify.notify_waiters();
            }
            drop(vm);
            let created = lock(&created).take();
            if let Some(cid) = created {
                exec.progress.stage(&subject, "deleting VM");
                let cpi = exec.cpis.get(&cp.cpi)?;
                if let Err(e) = cpi.delete_vm(&cid).await {
                    exec.progress.stage(
                        &subject,
                        &format!("deleting VM {cid} failed: {e}", e = Chain(&e)),
                    );
                    exec.event(
                        &plan.deployment,
                        Some(&subject),
                        "delete-vm",
                        &cid.0,
                        &format!("error: {e}", e = Chain(&e)),
                    );
                }
            }
            result
        }
    });
    let results = futures_join_all(workers).await;
    let failure = queue.lock().await.failed.clone();
    for r in results {
        r?;
    }
    if let Some(f) = failure {
        return Err(ExecError::Compile(f));
    }
    Ok(total)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

async fn run_worker(
    exec: &Executor,
    subject: &str,
    client: &AgentClient,
    queue: &Mutex<Queue>,
    notify: &Notify,
) -> Result<(), ExecError> {
    loop {
        // Take a step whose dependencies are all compiled.
        let step = loop {
            let notified = notify.notified();
            {
                let mut q = queue.lock().await;
                if q.failed.is_some() || q.pending.is_empty() {
                    return Ok(());
                }
                let ready = q.pending.iter().position(|s| {
                    s.dependencies.iter().all(|d| {
                        q.done.contains(&(d.clone(), s.stemcell.clone()))
                            || exec
                                .store
                                .compiled_package(d, &s.stemcell)
                                .ok()
                                .flatten()
                                .is_some()
                    })
                });
                if let Some(i) = ready {
                    break q.pending.remove(i);
                }
            }
            notified.await;
        };
        exec.progress
            .stage(subject, &format!("compiling {}", step.name));
        let r = compile_one(exec, subject, client, &step).await;
        let mut q = queue.lock().await;
        match r {
            Ok(()) => {
                q.done
                    .insert((step.fingerprint.clone(), step.stemcell.clone()));
            }
            Err(e) => {
                q.failed.get_or_insert(chain(&e));
                drop(q);
                notify.notify_waiters();
                return Err(e);
            }
        }
        drop(q);
        notify.notify_waiters();
    }
}

async fn compile_one(
    exec: &Executor,
    subject: &str,
    client: &AgentClient,
    step: &CompileStep,
) -> Result<(), ExecError> {
    let agent_err = |what: String| {
        move |source| ExecError::Agent {
            what,
            source: Box::new(source),
        }
    };
    let mut deps = Vec::new();
    for d in &step.dependencies {
        let c = exec
            .store
            .compiled_package(d, &step.stemcell)?
            .ok_or_else(|| {
                ExecError::Compile(format!(
                    "compiling {}: dependency {d} is not compiled",
                    step.name
                ))
            })?;
        deps.push(PackageRef {
            name: c.name,
            fingerprint: c.fingerprint,
            sha256: c.sha256,
        });
    }
    let mut wanted: Vec<String> = deps.iter().map(|d| d.sha256.clone()).collect();
    wanted.push(step.source_sha256.clone());
    let missing = client
        .missing_blobs(&wanted)
        .await
        .map_err(agent_err(format!("listing blobs on {subject}")))?;
    for sha in missing {
        let data =
            exec.store.blobs().read(&sha).map_err(|e| {
                ExecError::Compile(format!("reading blob {sha}: {e}", e = Chain(&e)))
            })?;
        client
            .put_blob(&sha, &data)
            .await
            .map_err(agent_err(format!("sending blob {sha} to {subject}")))?;
    }
    let result = client
        .compile_package(&CompileRequest {
            name: step.name.clone(),
            fingerprint: step.fingerprint.clone(),
            source_sha256: step.source_sha256.clone(),
            dependencies: deps,
            timeout_secs: exec.opts.compile_timeout_secs,
        })
        .await
        .map_err(|e| match e.failure() {
            Some(f) => ExecError::Compile(format!(
                "compiling package {} ({}) failed: {}{}",
                step.name,
                step.release,
                f.message,
                f.output_tail
                    .as_ref()
                    .map(|t| format!("\n--- last lines of its packaging output ---\n{t}"))
                    .unwrap_or_default()
            )),
            None => ExecError::Agent {
                what: format!("compiling package {} on {subject}", step.name),
                source: Box::new(e),
            },
        })?;
    let data = client
        .get_blob(&result.sha256)
        .await
        .map_err(agent_err(format!(
            "fetching compiled {} from {subject}",
            step.name
        )))?;
    exec.store
        .blobs()
        .put_verified(&result.sha256, &data)
        .map_err(|e| {
            ExecError::Compile(format!(
                "storing compiled {}: {e}",
                step.name,
                e = Chain(&e)
            ))
        })?;
    exec.store.save_compiled_package(&CompiledPackage {
        name: step.name.clone(),
        fingerprint: step.fingerprint.clone(),
        stemcell: step.stemcell.clone(),
        sha256: result.sha256,
        size: result.size,
    })?;
    Ok(())
}

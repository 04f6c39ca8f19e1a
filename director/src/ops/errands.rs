//! `run-errand`: an errand on its own VM (created for the run) or on a
//! running instance, with its output streamed to a sink.
//!
//! This module must not print or read the terminal.

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicU64};

use super::instances::LineBuffer;
use super::*;

/// How long after an errand's end its output is still followed when less
/// than the agent counted has arrived (a stalled stream).
const ERRAND_OUTPUT_GRACE_MS: u64 = 30_000;

impl Director {
    /// `run-errand`: give each instance of errand group `group` a VM (from
    /// the spec the last deploy recorded), run its jobs' `bin/run`, and
    /// delete the VM again unless `keep_alive`. Returns each instance's
    /// results; an instance whose run could not start is an error.
    pub async fn run_errand(
        &self,
        name: &str,
        errand: &str,
        opts: &ErrandOptions,
        report: Arc<dyn Report>,
        output: Option<LineSink>,
    ) -> Result<Vec<ErrandRun>, OpError> {
        let _lock = self.store.lock_deployment(name)?;
        let all = self.store.instances(name)?;
        let chosen = |r: &InstanceRecord| {
            opts.instances.is_empty() || opts.instances.iter().any(|f| instance_matches(r, Some(f)))
        };
        let group: Vec<InstanceRecord> = all
            .iter()
            .filter(|r| r.group == errand && r.state == crate::store::InstanceState::Errand)
            .filter(|r| chosen(r))
            .cloned()
            .collect();
        let exec = self.executor_as(Arc::new(ReportProgress(report)), "run-errand");
        if !group.is_empty() {
            // An errand group: a VM per instance, one after the other.
            let mut out = Vec::new();
            for rec in group {
                out.push(
                    self.errand_on_own_vm(&exec, rec, errand, opts.keep_alive, output.as_ref())
                        .await?,
                );
            }
            return Ok(out);
        }
        // An errand job colocated on service instances: on each at once.
        let hosts: Vec<&InstanceRecord> = all
            .iter()
            .filter(|r| r.vm.is_some() && r.state == crate::store::InstanceState::Started)
            .filter(|r| errand_jobs(r).any(|j| j == errand))
            .filter(|r| chosen(r))
            .collect();
        if hosts.is_empty() {
            let mut errands: BTreeSet<String> = all
                .iter()
                .filter(|r| r.state == crate::store::InstanceState::Errand)
                .map(|r| r.group.clone())
                .collect();
            errands.extend(
                all.iter()
                    .filter(|r| r.state != crate::store::InstanceState::Errand)
                    .flat_map(|r| errand_jobs(r).map(str::to_string).collect::<Vec<_>>()),
            );
            return Err(OpError::Stemcell(format!(
                "deployment '{name}' has no errand '{errand}'{} (errands: {})",
                if opts.instances.is_empty() {
                    String::new()
                } else {
                    format!(" on {}", opts.instances.join(", "))
                },
                if errands.is_empty() {
                    "none".to_string()
                } else {
                    errands.into_iter().collect::<Vec<_>>().join(", ")
                }
            )));
        }
        let runs = hosts.into_iter().map(|rec| {
            let (exec, output) = (&exec, output.as_ref());
            async move {
                let iname = crate::execute::executor::instance_name(rec);
                let started = Instant::now();
                let client = exec.reach_instance(rec, Duration::from_secs(30)).await?;
                exec.progress.stage(&iname, "running errand");
                let results = self
                    .errand_script(
                        &client,
                        &iname,
                        errand,
                        vec![errand.to_string()],
                        true,
                        output,
                    )
                    .await?;
                Ok::<_, OpError>(self.errand_done(name, errand, iname, results, started, false))
            }
        });
        futures_join_all(runs).await.into_iter().collect()
    }

    /// An errand group's instance: create its VM from the recorded spec,
    /// run every job's `bin/run`, delete the VM unless `keep_alive`.
    async fn errand_on_own_vm(
        &self,
        exec: &Executor,
        rec: InstanceRecord,
        group: &str,
        keep_alive: bool,
        output: Option<&LineSink>,
    ) -> Result<ErrandRun, OpError> {
        let name = rec.deployment.clone();
        let iname = crate::execute::executor::instance_name(&rec);
        let started = Instant::now();
        if rec.vm.is_none() {
            exec.recreate_deployed(rec.clone(), crate::execute::repair::DEFAULT_WATCH)
                .await?;
        }
        let mut rec = self
            .store
            .instances(&name)?
            .into_iter()
            .find(|r| r.id == rec.id)
            .ok_or_else(|| OpError::Stemcell(format!("{iname} vanished while starting")))?;
        // It was started like any instance; it stays an errand.
        rec.state = crate::store::InstanceState::Errand;
        self.store.save_instance(&rec)?;
        let vm = rec
            .vm
            .clone()
            .ok_or_else(|| OpError::Stemcell(format!("{iname} has no VM after creating it")))?;
        let client = exec.reach(&vm, &iname, Duration::from_secs(30)).await?;
        exec.progress.stage(&iname, "running errand");
        let jobs: Vec<String> = errand_jobs(&rec).map(str::to_string).collect();
        let results = self
            .errand_script(&client, &iname, group, jobs, false, output)
            .await;
        if !keep_alive {
            exec.teardown_vm_with(
                &mut rec,
                None,
                crate::execute::executor::NextState::VmDeleted,
            )
            .await?;
        }
        let results = results?;
        if results.results.is_empty() {
            return Err(OpError::Stemcell(format!(
                "errand {group}: no job of {iname} has a bin/run script"
            )));
        }
        Ok(self.errand_done(&name, group, iname, results, started, keep_alive))
    }

    /// Run `bin/run` of `jobs` (only those when `only`, else every job
    /// that has it) on an instance. With `output`, each job's output goes
    /// there line by line as it is written (labelled `instance job`).
    async fn errand_script(
        &self,
        client: &bosun_agent::client::AgentClient,
        iname: &str,
        errand: &str,
        jobs: Vec<String>,
        only: bool,
        output: Option<&LineSink>,
    ) -> Result<bosun_agent::protocol::ScriptResults, OpError> {
        let prefix = format!("errand-{}", uuid::Uuid::new_v4().simple());
        let params = bosun_agent::protocol::RunScriptParams {
            script: "run".into(),
            timeout_secs: self.opts.script_timeout_secs.max(3600),
            jobs: only.then(|| jobs.clone()),
            output_prefix: output.map(|_| prefix.clone()),
            env: BTreeMap::new(),
        };
        let what = || format!("running errand {errand} on {iname}");
        let Some(sink) = output else {
            return client.run_script(&params).await.map_err(agent_err(what()));
        };
        // Follow each job's output file while the script runs. Once it has
        // ended, each follower stops when it has read as many bytes as the
        // agent says the job wrote (however late `tail` got going), or, when
        // the run failed and no count came back, after 500 ms of quiet.
        let base = Instant::now();
        let ended = AtomicBool::new(false);
        let ended_at = AtomicU64::new(0);
        let written: std::sync::Mutex<BTreeMap<String, u64>> = Default::default();
        let followers = jobs.iter().map(|job| {
            let (ended, ended_at, written, sink, prefix) =
                (&ended, &ended_at, &written, sink.clone(), &prefix);
            async move {
                let label = format!("{iname} {job}");
                let command =
                    format!("exec tail -n +1 -F /var/vcap/data/tmp/{prefix}-{job}.out 2>/dev/null");
                let last = AtomicU64::new(0);
                let read = AtomicU64::new(0);
                let mut lines = LineBuffer::default();
                let done = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        if !ended.load(SeqCst) {
                            continue;
                        }
                        let now = base.elapsed().as_millis() as u64;
                        let since_end = now.saturating_sub(ended_at.load(SeqCst));
                        let want = written.lock().map(|w| w.get(job).copied()).unwrap_or(None);
                        match want {
                            Some(n) if read.load(SeqCst) >= n => break,
                            Some(n) if since_end >= ERRAND_OUTPUT_GRACE_MS => {
                                tracing::warn!(instance = %iname, job = %job, read = read.load(SeqCst), written = n, "errand output: stopped following before its end");
                                break;
                            }
                            Some(_) => {}
                            None => {
                                let quiet = now.saturating_sub(last.load(SeqCst).max(ended_at.load(SeqCst)));
                                if quiet >= 500 {
                                    break;
                                }
                            }
                        }
                    }
                };
                let streamed = client
                    .stream_command(
                        &command,
                        |data| {
                            last.store(base.elapsed().as_millis() as u64, SeqCst);
                            read.fetch_add(data.len() as u64, SeqCst);
                            lines.feed(data, |line| sink(&label, line));
                        },
                        done,
                    )
                    .await;
                lines.finish(|line| sink(&label, line));
                if let Err(e) = streamed {
                    tracing::warn!(instance = %iname, job = %job, error = %e, "following errand output failed");
                }
            }
        });
        let run = async {
            let r = client.run_script(&params).await;
            if let (Ok(results), Ok(mut w)) = (&r, written.lock()) {
                for res in &results.results {
                    w.insert(res.job.clone(), res.output_bytes);
                }
            }
            ended_at.store(base.elapsed().as_millis() as u64, SeqCst);
            ended.store(true, SeqCst);
            r
        };
        let (result, _) = tokio::join!(run, futures_join_all(followers));
        // The agent leaves the output files for their followers.
        let cleanup = format!("rm -f /var/vcap/data/tmp/{prefix}-*.out");
        match client.run_command(&cleanup, Duration::from_secs(30)).await {
            Ok((_, _, 0)) => {}
            Ok((_, err, code)) => {
                tracing::warn!(instance = %iname, code, stderr = %String::from_utf8_lossy(&err), "removing errand output files failed")
            }
            Err(e) => {
                tracing::warn!(instance = %iname, error = %e, "removing errand output files failed")
            }
        }
        result.map_err(agent_err(what()))
    }

    /// Record an errand's run as an event and summarize it.
    fn errand_done(
        &self,
        name: &str,
        errand: &str,
        instance: String,
        results: bosun_agent::protocol::ScriptResults,
        started: Instant,
        kept: bool,
    ) -> ErrandRun {
        let exit_code = results
            .results
            .iter()
            .map(|r| r.exit_code)
            .find(|c| *c != 0)
            .unwrap_or(0);
        self.store.record_event(
            &crate::store::Event::new("run-errand", name, Some(&instance))
                .did("run-errand", errand.to_string())
                .result(format!("exit {exit_code}")),
        );
        ErrandRun {
            instance,
            exit_code,
            jobs: results.results,
            seconds: started.elapsed().as_secs_f64(),
            kept,
        }
    }
}

/// Options of `run-errand`.
#[derive(Clone, Debug, Default)]
pub struct ErrandOptions {
    /// Keep an errand group's VMs after the run.
    pub keep_alive: bool,
    /// Only instances these `GROUP[/ID or INDEX]` filters name (all if empty).
    pub instances: Vec<String>,
}

/// Jobs of an instance's recorded spec that have a `bin/run` (errands).
fn errand_jobs(r: &InstanceRecord) -> impl Iterator<Item = &str> {
    r.deployed
        .iter()
        .flat_map(|d| &d.spec.jobs)
        .filter(|j| j.files.iter().any(|f| f.path == "bin/run"))
        .map(|j| j.name.as_str())
}

/// One instance's errand run.
#[derive(Clone, Debug, Serialize)]
pub struct ErrandRun {
    pub instance: String,
    /// The first non-zero exit code of the jobs' `bin/run`, else 0.
    pub exit_code: i32,
    /// Per job: exit code and the last lines of output.
    pub jobs: Vec<bosun_agent::protocol::ScriptResult>,
    pub seconds: f64,
    /// The VM was kept (`--keep-alive`).
    pub kept: bool,
}

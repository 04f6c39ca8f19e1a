//! Operations on running instances: listing with live state, logs (fetch
//! and follow), start/stop/restart/recreate, scp, ssh and commands.
//!
//! This module must not print or read the terminal: output goes to sinks
//! the caller supplies.

use super::*;

impl Director {
    /// `instances`: recorded instances with their live state from the agents.
    pub async fn instances(&self, name: &str) -> Result<Vec<InstanceInfo>, OpError> {
        if self.store.deployment(name)?.is_none() && self.store.instances(name)?.is_empty() {
            return Err(OpError::NoDeployment(name.to_string()));
        }
        let recs = self.store.instances(name)?;
        let futs = recs.iter().map(|r| self.live_state(r));
        let states = futures_join_all(futs).await;
        Ok(recs
            .iter()
            .zip(states)
            .map(|(r, st)| instance_info(r, st))
            .collect())
    }

    /// `logs`: each matching instance's job logs as a tarball in `dir`.
    /// Returns (instance, file, bytes) per instance.
    pub async fn fetch_logs(
        &self,
        name: &str,
        filter: Option<&str>,
        jobs: &[String],
        dir: &Path,
    ) -> Result<Vec<(String, PathBuf, u64)>, OpError> {
        let recs = self.matching_instances(name, filter, false)?;
        let exec = self.executor_as(Arc::new(QuietProgress), "logs");
        let stamp = crate::store::now();
        let mut out = Vec::new();
        for r in recs {
            let iname = crate::execute::executor::instance_name(&r);
            let vm = r
                .vm
                .as_ref()
                .ok_or_else(|| OpError::Stemcell(format!("{iname} has no VM: no logs to fetch")))?;
            let client = exec.reach(vm, &iname, Duration::from_secs(10)).await?;
            let res = client
                .fetch_logs(&bosun_agent::protocol::FetchLogsParams {
                    jobs: jobs.to_vec(),
                })
                .await
                .map_err(agent_err(format!("packing the logs of {iname}")))?;
            let data = client
                .get_blob(&res.sha256)
                .await
                .map_err(agent_err(format!("fetching the logs of {iname}")))?;
            let file = dir.join(format!("{name}.{}.{}.{stamp}.tgz", r.group, r.index));
            std::fs::write(&file, &data).map_err(|source| OpError::Read {
                path: file.clone(),
                source,
            })?;
            out.push((iname, file, data.len() as u64));
        }
        Ok(out)
    }

    /// `start`, `stop [--hard]`, `restart`, `recreate` of the instances
    /// `filter` names (every instance when `None`), group by group, canaries
    /// first, then `max_in_flight` at a time, as the deployed manifest's
    /// update policy says. Stops at the first failure. Returns how many
    /// instances were changed.
    pub async fn change_state(
        &self,
        name: &str,
        filter: Option<&str>,
        change: StateChange,
        skip_drain: bool,
        report: Arc<dyn Report>,
    ) -> Result<usize, OpError> {
        let _lock = self.store.lock_deployment(name)?;
        // Errand instances get a VM only from `run-errand`, as in BOSH.
        let (errands, recs): (Vec<_>, Vec<_>) = self
            .matching_instances(name, filter, false)?
            .into_iter()
            .partition(|r| r.state == crate::store::InstanceState::Errand);
        if recs.is_empty() {
            return Err(OpError::Stemcell(format!(
                "'{}' names only errand instances ({}) of deployment '{name}': they get a VM only from run-errand",
                filter.unwrap_or(""),
                errands
                    .iter()
                    .map(|r| format!("{}/{}", r.group, r.index))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let deployed = self.store.deployment(name)?;
        let m = deployed
            .as_ref()
            .and_then(|d| manifest::parse_manifest(name, &d.manifest, Path::new(".")).ok());
        let exec = self.executor_as(Arc::new(ReportProgress(report)), change.verb());
        let mut groups: Vec<(String, Vec<InstanceRecord>)> = Vec::new();
        for r in recs {
            match groups.iter_mut().find(|(g, _)| *g == r.group) {
                Some((_, v)) => v.push(r),
                None => groups.push((r.group.clone(), vec![r])),
            }
        }
        let mut done = 0;
        for (group, recs) in groups {
            let (canaries, max_in_flight, watch) = match m.as_ref().and_then(|m| {
                m.instance_group(&group)
                    .map(|g| (m.update_for(g), g.instances))
            }) {
                Some((u, n)) => (
                    u.canaries as usize,
                    u.max_in_flight.resolve(n).max(1) as usize,
                    (u.update_watch_time.min_ms, u.update_watch_time.max_ms),
                ),
                None => (1, 1, crate::execute::repair::DEFAULT_WATCH),
            };
            let canaries = canaries.min(recs.len());
            let (canary, rest) = recs.split_at(canaries);
            for (batch, width) in [(canary, canaries.max(1)), (rest, max_in_flight)] {
                for chunk in batch.chunks(width) {
                    let futs = chunk
                        .iter()
                        .map(|r| exec.change_instance_state(r.clone(), change, skip_drain, watch));
                    for r in futures_join_all(futs).await {
                        r?;
                        done += 1;
                    }
                }
            }
        }
        Ok(done)
    }

    /// `logs --follow`: stream new lines of the job logs of every matching
    /// instance to `sink(instance, line)` until `stop` is set or every
    /// stream ends.
    pub async fn follow_logs(
        &self,
        name: &str,
        filter: Option<&str>,
        jobs: &[String],
        stop: Arc<std::sync::atomic::AtomicBool>,
        sink: LineSink,
    ) -> Result<(), OpError> {
        if let Some(bad) = jobs.iter().find(|j| {
            j.is_empty()
                || !j
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        }) {
            return Err(OpError::Stemcell(format!("--job {bad:?}: not a job name")));
        }
        let recs = self.instances_with_vms(name, filter)?;
        let globs: Vec<String> = if jobs.is_empty() {
            vec!["/var/vcap/sys/log/*/*.log".into()]
        } else {
            jobs.iter()
                .map(|j| format!("/var/vcap/sys/log/{j}/*.log"))
                .collect()
        };
        // Follow every log file from its end, and files that appear later
        // from their start (checked every second).
        let command = format!(
            "seen=' '; first=1; while :; do for f in {}; do [ -f \"$f\" ] || continue; case \"$seen\" in *\" $f \"*) continue ;; esac; seen=\"$seen$f \"; if [ $first = 1 ]; then n=0; else n=+1; fi; tail -q -n $n -F \"$f\" 2>/dev/null & done; first=0; sleep 1; done",
            globs.join(" ")
        );
        let exec = self.executor_as(Arc::new(QuietProgress), "logs");
        let futs = recs.iter().map(|r| {
            let (exec, command, stop, sink) = (&exec, &command, stop.clone(), sink.clone());
            async move {
                let iname = crate::execute::executor::instance_name(r);
                let client = exec.reach_instance(r, Duration::from_secs(10)).await?;
                let mut lines = LineBuffer::default();
                let stopped = async {
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                };
                client
                    .stream_command(
                        command,
                        |data| lines.feed(data, |line| sink(&iname, line)),
                        stopped,
                    )
                    .await
                    .map_err(agent_err(format!("following the logs of {iname}")))?;
                Ok::<(), OpError>(())
            }
        });
        futures_join_all(futs).await.into_iter().collect()
    }

    /// `scp LOCAL INSTANCE:PATH`: copy a local file to every matching
    /// instance (mode kept). Returns the instances written.
    pub async fn scp_upload(
        &self,
        name: &str,
        filter: Option<&str>,
        local: &Path,
        remote: &str,
    ) -> Result<Vec<String>, OpError> {
        let data = std::fs::read(local).map_err(|source| OpError::Read {
            path: local.to_path_buf(),
            source,
        })?;
        let mode = std::fs::metadata(local)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .unwrap_or(0o644);
        let sha = bosun_agent::blobs::sha256_hex(&data);
        let exec = self.executor_as(Arc::new(QuietProgress), "scp");
        let recs = self.instances_with_vms(name, filter)?;
        let futs = recs.iter().map(|r| {
            let (exec, data, sha) = (&exec, &data, &sha);
            async move {
                let iname = crate::execute::executor::instance_name(r);
                let client = exec.reach_instance(r, Duration::from_secs(10)).await?;
                client
                    .put_blob(sha, data)
                    .await
                    .map_err(agent_err(format!("sending {} to {iname}", local.display())))?;
                client
                    .install_file(&bosun_agent::protocol::InstallFileParams {
                        sha256: sha.clone(),
                        path: remote.to_string(),
                        mode,
                    })
                    .await
                    .map_err(agent_err(format!("writing {remote} on {iname}")))?;
                Ok::<String, OpError>(iname)
            }
        });
        futures_join_all(futs).await.into_iter().collect()
    }

    /// `scp INSTANCE:PATH LOCAL`: copy a file from the one matching instance.
    pub async fn scp_download(
        &self,
        name: &str,
        filter: Option<&str>,
        remote: &str,
        local: &Path,
    ) -> Result<(String, usize), OpError> {
        let recs = self.instances_with_vms(name, filter)?;
        let [r] = recs.as_slice() else {
            return Err(OpError::Stemcell(format!(
                "copying from {} instances at once: name one (GROUP/ID or GROUP/INDEX)",
                recs.len()
            )));
        };
        let iname = crate::execute::executor::instance_name(r);
        let exec = self.executor_as(Arc::new(QuietProgress), "scp");
        let client = exec.reach_instance(r, Duration::from_secs(10)).await?;
        let quoted = format!("'{}'", remote.replace('\'', "'\\''"));
        let (out, err, code) = client
            .run_command(&format!("cat -- {quoted}"), Duration::from_secs(3600))
            .await
            .map_err(agent_err(format!("reading {remote} on {iname}")))?;
        if code != 0 {
            return Err(OpError::Stemcell(format!(
                "reading {remote} on {iname}: {}",
                String::from_utf8_lossy(&err).trim()
            )));
        }
        std::fs::write(local, &out).map_err(|source| OpError::Read {
            path: local.to_path_buf(),
            source,
        })?;
        Ok((iname, out.len()))
    }

    fn instances_with_vms(
        &self,
        name: &str,
        filter: Option<&str>,
    ) -> Result<Vec<InstanceRecord>, OpError> {
        self.matching_instances(name, filter, true)
    }

    /// The instances `filter` names (those with a VM when `with_vm`); none
    /// is an error naming the filter.
    fn matching_instances(
        &self,
        name: &str,
        filter: Option<&str>,
        with_vm: bool,
    ) -> Result<Vec<InstanceRecord>, OpError> {
        let recs: Vec<InstanceRecord> = self
            .store
            .instances(name)?
            .into_iter()
            .filter(|r| instance_matches(r, filter) && (!with_vm || r.vm.is_some()))
            .collect();
        if recs.is_empty() {
            return Err(OpError::Stemcell(format!(
                "no instance of deployment '{name}'{} matches '{}'",
                if with_vm { " with a VM" } else { "" },
                filter.unwrap_or("")
            )));
        }
        Ok(recs)
    }

    /// Interactive `ssh INSTANCE`: a connection to the one instance `filter`
    /// names (a group with one instance will do). The session uses the
    /// director's own key, so nothing is created on the VM. Records an
    /// `ssh` event. Returns the instance's name and its agent.
    pub async fn shell_session(
        &self,
        name: &str,
        filter: &str,
    ) -> Result<(String, bosun_agent::client::AgentClient), OpError> {
        let recs = self.instances_with_vms(name, Some(filter))?;
        let [rec] = recs.as_slice() else {
            return Err(OpError::Stemcell(format!(
                "an interactive shell needs one instance; '{filter}' matches {}: name GROUP/ID or GROUP/INDEX, or run a command on all of them with -c",
                recs.len()
            )));
        };
        let iname = crate::execute::executor::instance_name(rec);
        let exec = self.executor_as(Arc::new(QuietProgress), "ssh");
        let client = exec.reach_instance(rec, Duration::from_secs(10)).await?;
        self.store.record_event(
            &crate::store::Event::new("ssh", name, Some(&iname))
                .did("ssh", "interactive shell".to_string())
                .result("opened"),
        );
        Ok((iname, client))
    }

    /// `ssh -c`: run a shell command on every matching instance at once.
    /// Returns (instance, stdout, stderr, exit status) in instance order.
    pub async fn run_on_instances(
        &self,
        name: &str,
        filter: Option<&str>,
        command: &str,
    ) -> Result<Vec<CommandRun>, OpError> {
        let recs = self.instances_with_vms(name, filter)?;
        let exec = self.executor_as(Arc::new(QuietProgress), "ssh");
        let futs = recs.iter().map(|r| {
            let exec = &exec;
            async move {
                let iname = crate::execute::executor::instance_name(r);
                let client = exec.reach_instance(r, Duration::from_secs(10)).await?;
                let (out, err, code) = client
                    .run_command(command, Duration::from_secs(3600))
                    .await
                    .map_err(agent_err(format!("running the command on {iname}")))?;
                Ok::<_, OpError>(CommandRun {
                    instance: format!("{}/{}", r.group, r.id),
                    index: r.index,
                    stdout: String::from_utf8_lossy(&out).into_owned(),
                    stderr: String::from_utf8_lossy(&err).into_owned(),
                    exit_code: code,
                })
            }
        });
        futures_join_all(futs).await.into_iter().collect()
    }

    async fn live_state(&self, r: &InstanceRecord) -> Option<AgentState> {
        let vm = r.vm.as_ref()?;
        let addr = format!("{}:{AGENT_PORT}", vm.address).parse().ok()?;
        let client = wait_for_agent(
            addr,
            self.store.director_key(),
            &vm.host_public_key,
            Duration::from_secs(3),
        )
        .await
        .ok()?;
        client.get_state().await.ok()
    }
}

/// Where followed log lines go: `(instance, line)`.
pub type LineSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

#[derive(Clone, Debug, Serialize)]
pub struct CommandRun {
    /// `group/id`
    pub instance: String,
    pub index: u32,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: u32,
}

/// Splits streamed bytes into lines (a line may arrive in pieces).
#[derive(Default)]
pub(super) struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    pub(super) fn feed(&mut self, data: &[u8], mut line: impl FnMut(&str)) {
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = self.partial.drain(..=pos).collect();
            line(String::from_utf8_lossy(&l).trim_end());
        }
    }

    /// The last line, when it had no newline.
    pub(super) fn finish(&mut self, mut line: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            line(String::from_utf8_lossy(&self.partial).trim_end());
            self.partial.clear();
        }
    }
}

/// One row of `instances`.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceInfo {
    /// `group/id`
    pub instance: String,
    pub group: String,
    pub id: String,
    pub index: u32,
    pub bootstrap: bool,
    /// `running`, `failing`, `stopped`, `unresponsive`, or `missing` (no VM).
    pub process_state: String,
    pub ips: Vec<String>,
    pub az: String,
    pub vm_cid: Option<String>,
    pub persistent_disk_cids: Vec<String>,
    pub processes: Vec<ProcessInfo>,
    /// Load, memory and disk use, as the agent reports them.
    pub vitals: Option<bosun_agent::protocol::Vitals>,
    pub agent_id: Option<String>,
    /// Seconds since the epoch the VM was created.
    pub vm_created_at: Option<i64>,
    pub persistent_disk_mb: Option<u64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProcessInfo {
    pub job: String,
    pub name: String,
    pub state: String,
    pub uptime_secs: Option<u64>,
}

pub fn instance_matches(r: &InstanceRecord, filter: Option<&str>) -> bool {
    let Some(f) = filter else {
        return true;
    };
    match f.split_once('/') {
        None => r.group == f,
        Some((g, x)) => r.group == g && (r.id == x || r.index.to_string() == x),
    }
}

fn instance_info(r: &InstanceRecord, st: Option<AgentState>) -> InstanceInfo {
    let process_state = match (&r.vm, &st) {
        (None, _) if r.state == crate::store::InstanceState::Errand => "errand".to_string(),
        (None, _) if r.state == crate::store::InstanceState::Detached => "detached".to_string(),
        (None, _) => "missing".to_string(),
        (Some(_), None) => "unresponsive".to_string(),
        (Some(_), Some(s)) => match s.job_state {
            ProcessState::Running => "running",
            ProcessState::Failing => "failing",
            ProcessState::Stopped => "stopped",
        }
        .to_string(),
    };
    let vitals = st.as_ref().map(|s| s.vitals.clone());
    let processes = st
        .map(|s| {
            s.jobs
                .iter()
                .flat_map(|j| {
                    j.processes.iter().map(move |p| ProcessInfo {
                        job: j.name.clone(),
                        name: p.name.clone(),
                        state: format!("{:?}", p.state).to_lowercase(),
                        uptime_secs: p.uptime_secs,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    InstanceInfo {
        instance: format!("{}/{}", r.group, r.id),
        group: r.group.clone(),
        id: r.id.clone(),
        index: r.index,
        bootstrap: r.bootstrap,
        process_state,
        ips: r.networks.values().map(|n| n.ip.clone()).collect(),
        az: r.az.clone(),
        vm_cid: r.vm.as_ref().map(|v| v.cid.clone()),
        persistent_disk_cids: r.disk.iter().map(|d| d.cid.clone()).collect(),
        processes,
        vitals,
        agent_id: r.vm.as_ref().map(|v| v.agent_id.clone()),
        vm_created_at: r.vm.as_ref().map(|v| v.created_at),
        persistent_disk_mb: r.disk.as_ref().map(|d| d.size_mb),
    }
}

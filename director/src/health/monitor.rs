//! The health monitor and resurrector.
//!
//! Every `heartbeat_interval` it asks each agent of the watched deployments
//! for its state (over a session it keeps open) and classifies the instance:
//! running, failing (a process down or a probe failing), stopped (by the
//! operator), unresponsive (no answer for `agent_timeout`) or missing (the
//! CPI says the VM is gone). It then climbs a ladder, one rung per fault:
//!
//! 1. a crashed process is restarted by the agent itself (the monitor only
//!    records that it happened);
//! 2. a job failing for longer than `job_restart_after` is restarted;
//! 3. an unresponsive or missing VM is recreated with its IPs and persistent
//!    disk, fenced first when the group's restart policy is `consistent`;
//! 4. a repair that fails, a job still failing after its restart, or more
//!    than `max_repairs` repairs within `flap_window` raise an alert and the
//!    instance is left alone until it runs again.
//!
//! After a repair an instance gets `quiet_period` before it may be repaired
//! again, and when too many instances of a deployment are down at once
//! (the meltdown guard) it alerts instead of repairing. It never repairs
//! while someone else (a deploy) holds the deployment lock, and holds the
//! lock itself while repairing. Everything it sees and does is an event.
//!
//! The monitor decides; [`crate::execute::repair`] carries repairs out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bosun_agent::client::AgentClient;
use bosun_agent::protocol::{AgentState, ProcessState};
use bosun_cpi::chain::{chain, Chain};
use bosun_cpi::VmCid;

use crate::execute::executor::{
    futures_join_all, instance_name, Cpis, ExecOptions, Executor, Progress,
};
use crate::execute::repair::DEFAULT_WATCH;
use crate::model::manifest::{self, HealthPolicy};
use crate::model::values::RestartPolicy;
use crate::store::{Event, InstanceRecord, StateError, Store};

/// A monitor failure (reading state; repairs report through events).
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("deployment '{0}' does not exist")]
    NoDeployment(String),
}

/// What the monitor last made of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Not looked at yet.
    Unknown,
    Running,
    Failing,
    Stopped,
    Unresponsive,
    Missing,
}

impl Health {
    fn is_down(self) -> bool {
        matches!(self, Health::Unresponsive | Health::Missing)
    }
}

/// Per-group settings, read from the deployed manifest.
#[derive(Clone, Debug)]
struct GroupSettings {
    health: HealthPolicy,
    restart_policy: RestartPolicy,
    watch: (u64, u64),
}

#[derive(Default)]
struct DeploymentSettings {
    updated_at: i64,
    top: HealthPolicy,
    groups: BTreeMap<String, GroupSettings>,
    meltdown: bool,
}

struct Tracker {
    vm_cid: Option<String>,
    client: Option<AgentClient>,
    last_ok: Instant,
    health: Health,
    failing_since: Option<Instant>,
    job_restarted: bool,
    /// Restart counts per `job/process`, to notice the agent restarting one.
    restarts: BTreeMap<String, u32>,
    repairs: Vec<Instant>,
    last_repair: Option<Instant>,
    repairing: bool,
    /// Alerted: hands off until it runs again.
    alerted: bool,
    /// Why the last unanswered heartbeat went unanswered.
    last_error: String,
    /// A heartbeat went unanswered (said once per silence).
    late: bool,
}

impl Tracker {
    fn new(vm_cid: Option<String>) -> Tracker {
        Tracker {
            vm_cid,
            client: None,
            last_ok: Instant::now(),
            health: Health::Unknown,
            failing_since: None,
            job_restarted: false,
            restarts: BTreeMap::new(),
            repairs: Vec::new(),
            last_repair: None,
            repairing: false,
            alerted: false,
            last_error: String::new(),
            late: false,
        }
    }
}

/// What one heartbeat found.
enum Observation {
    State(Box<AgentState>),
    /// The agent did not answer; `vm_exists` is the CPI's word, if it gave one.
    Silent {
        error: String,
        vm_exists: Option<bool>,
    },
    NoVm,
}

/// A repair the monitor decided on.
enum Repair {
    RestartJobs(Vec<String>),
    Recreate { fence: bool },
}

/// The health monitor. Cheap to share; [`Monitor::tick`] runs one round,
/// [`Monitor::run`] runs rounds until told to stop.
pub struct Monitor {
    store: Arc<Store>,
    cpis: Cpis,
    opts: ExecOptions,
    progress: Arc<dyn Progress>,
    /// Watched deployments (`None`: every deployment).
    only: Option<String>,
    trackers: Mutex<BTreeMap<String, Tracker>>,
    settings: Mutex<BTreeMap<String, DeploymentSettings>>,
    /// Repairs running per deployment: they share one hold of the
    /// deployment lock and run in parallel, [`MAX_PARALLEL_REPAIRS`] at most.
    repairs: Mutex<BTreeMap<String, DeploymentRepairs>>,
}

/// How many instances of one deployment are repaired at once: independent
/// instances do not wait for each other (one repair blocked on a frozen VM
/// must not delay the next), within a bound.
pub const MAX_PARALLEL_REPAIRS: usize = 4;

/// The repairs of one deployment.
struct DeploymentRepairs {
    slots: Arc<tokio::sync::Semaphore>,
    /// The deployment lock, while any of its repairs runs.
    held: std::sync::Weak<crate::store::DeploymentLock>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl Monitor {
    pub fn new(
        store: Arc<Store>,
        cpis: Cpis,
        opts: ExecOptions,
        progress: Arc<dyn Progress>,
        only: Option<String>,
    ) -> Arc<Monitor> {
        Arc::new(Monitor {
            store,
            cpis,
            opts,
            progress,
            only,
            trackers: Mutex::new(BTreeMap::new()),
            settings: Mutex::new(BTreeMap::new()),
            repairs: Mutex::new(BTreeMap::new()),
        })
    }

    fn executor(&self) -> Executor {
        Executor {
            store: self.store.clone(),
            cpis: self.cpis.clone(),
            progress: self.progress.clone(),
            opts: self.opts.clone(),
            source: "monitor".into(),
        }
    }

    fn event(&self, rec: &InstanceRecord, seen: &str, action: &str, object: &str, result: &str) {
        self.store.record_event(
            &Event::new("monitor", &rec.deployment, Some(&instance_name(rec)))
                .seen(seen)
                .did(action, object)
                .result(result),
        );
    }

    /// The shortest heartbeat interval of the watched groups (1 s when
    /// nothing is watched yet).
    pub fn interval(&self) -> Duration {
        lock(&self.settings)
            .values()
            .flat_map(|s| s.groups.values().map(|g| g.health.heartbeat_interval))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .max(Duration::from_millis(100))
    }

    /// Run rounds every heartbeat interval until `stop` turns true.
    pub async fn run(
        self: Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), MonitorError> {
        loop {
            let started = Instant::now();
            self.clone().tick().await?;
            let wait = self.interval().saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => return Ok(()),
            }
            if *stop.borrow() {
                return Ok(());
            }
        }
    }

    fn deployments(&self) -> Result<Vec<String>, MonitorError> {
        match &self.only {
            Some(d) => {
                if self.store.deployment(d)?.is_none() && self.store.instances(d)?.is_empty() {
                    return Err(MonitorError::NoDeployment(d.clone()));
                }
                Ok(vec![d.clone()])
            }
            None => Ok(self
                .store
                .deployments()?
                .into_iter()
                .map(|d| d.name)
                .collect()),
        }
    }

    /// Read (or reuse) the settings of a deployment from its manifest.
    fn load_settings(&self, name: &str) -> Result<(), MonitorError> {
        let Some(rec) = self.store.deployment(name)? else {
            return Ok(());
        };
        let mut all = lock(&self.settings);
        if all
            .get(name)
            .is_some_and(|s| s.updated_at == rec.updated_at)
        {
            return Ok(());
        }
        let mut s = DeploymentSettings {
            updated_at: rec.updated_at,
            ..DeploymentSettings::default()
        };
        // It parsed when it was deployed; if it no longer does, defaults.
        if let Ok(m) = manifest::parse_manifest(name, &rec.manifest, Path::new(".")) {
            s.top = m.health.clone();
            for g in &m.instance_groups {
                let u = m.update_for(g);
                s.groups.insert(
                    g.name.clone(),
                    GroupSettings {
                        health: m.health_for(g),
                        restart_policy: m.restart_policy_for(g),
                        watch: (u.update_watch_time.min_ms, u.update_watch_time.max_ms),
                    },
                );
            }
        }
        let meltdown = all.get(name).is_some_and(|o| o.meltdown);
        s.meltdown = meltdown;
        all.insert(name.to_string(), s);
        Ok(())
    }

    fn group_settings(&self, rec: &InstanceRecord) -> GroupSettings {
        lock(&self.settings)
            .get(&rec.deployment)
            .and_then(|s| s.groups.get(&rec.group).cloned())
            .unwrap_or_else(|| GroupSettings {
                health: HealthPolicy::default(),
                restart_policy: if rec.disk.is_some() {
                    RestartPolicy::Consistent
                } else {
                    RestartPolicy::Available
                },
                watch: DEFAULT_WATCH,
            })
    }

    /// One round over every watched deployment.
    pub async fn tick(self: Arc<Self>) -> Result<(), MonitorError> {
        for name in self.deployments()? {
            self.load_settings(&name)?;
            // A deploy (or another repair) holds the lock: its instances
            // are expected to come and go. Look again next round.
            let busy = match self
                .store
                .try_lock_deployment(&name, "health monitor check")
            {
                Ok(lock) => {
                    drop(lock);
                    false
                }
                Err(StateError::Locked { .. }) => true,
                Err(e) => return Err(e.into()),
            };
            let recs = self.store.instances(&name)?;
            if busy && !self.repairing_in(&recs) {
                let mut t = lock(&self.trackers);
                for r in &recs {
                    if let Some(tr) = t.get_mut(&r.id) {
                        tr.last_ok = Instant::now();
                        tr.client = None;
                    }
                }
                continue;
            }
            self.clone().check_deployment(&name, recs).await;
        }
        Ok(())
    }

    fn repairing_in(&self, recs: &[InstanceRecord]) -> bool {
        let t = lock(&self.trackers);
        recs.iter()
            .any(|r| t.get(&r.id).is_some_and(|tr| tr.repairing))
    }

    async fn check_deployment(self: Arc<Self>, name: &str, recs: Vec<InstanceRecord>) {
        {
            let ids: BTreeSet<&str> = recs.iter().map(|r| r.id.as_str()).collect();
            let mut t = lock(&self.trackers);
            t.retain(|id, tr| ids.contains(id.as_str()) || tr.repairing);
            for r in &recs {
                let cid = r.vm.as_ref().map(|v| v.cid.clone());
                let tr = t
                    .entry(r.id.clone())
                    .or_insert_with(|| Tracker::new(cid.clone()));
                if tr.vm_cid != cid && !tr.repairing {
                    // A new VM (deployed or repaired): judge it afresh.
                    let repairs = std::mem::take(&mut tr.repairs);
                    let last_repair = tr.last_repair;
                    *tr = Tracker::new(cid);
                    tr.repairs = repairs;
                    tr.last_repair = last_repair;
                }
            }
        }
        // Instances the operator stopped are left alone.
        let watched: Vec<&InstanceRecord> = recs
            .iter()
            .filter(|r| r.state == crate::store::InstanceState::Started)
            .filter(|r| !lock(&self.trackers).get(&r.id).is_some_and(|t| t.repairing))
            .collect();
        let futs = watched.iter().map(|r| {
            let client = lock(&self.trackers)
                .get_mut(&r.id)
                .and_then(|t| t.client.take());
            let me = self.clone();
            async move { me.observe(r, client).await }
        });
        let observations = futures_join_all(futs).await;
        let mut decisions = Vec::new();
        for (r, (obs, client)) in watched.iter().zip(observations) {
            if let Some(t) = lock(&self.trackers).get_mut(&r.id) {
                t.client = client;
            }
            decisions.push(self.classify(r, obs));
        }

        // Meltdown guard, over the whole deployment.
        let (down, total) = {
            let t = lock(&self.trackers);
            let down = recs
                .iter()
                .filter(|r| t.get(&r.id).is_some_and(|tr| tr.health.is_down()))
                .count();
            (down, recs.len())
        };
        let top = lock(&self.settings)
            .get(name)
            .map(|s| s.top.clone())
            .unwrap_or_default();
        let meltdown = total > 0
            && down as u32 >= top.meltdown_min_down.max(1)
            && down * 100 > top.meltdown_percent as usize * total;
        let was = {
            let mut all = lock(&self.settings);
            let s = all.entry(name.to_string()).or_default();
            std::mem::replace(&mut s.meltdown, meltdown)
        };
        if meltdown != was {
            let e = Event::new("monitor", name, None)
                .seen(format!("{down} of {total} instances down"))
                .did(if meltdown { "alert" } else { "resume" }, "deployment");
            self.store.record_event(&if meltdown {
                e.result("meltdown: not repairing until fewer instances are down")
            } else {
                e.result("meltdown over: repairing again")
            });
        }

        for (r, decision) in watched.into_iter().zip(decisions) {
            let Some((repair, seen)) = decision else {
                continue;
            };
            if meltdown && matches!(repair, Repair::Recreate { .. }) {
                continue;
            }
            if let Some(t) = lock(&self.trackers).get_mut(&r.id) {
                t.repairing = true;
            }
            let me = self.clone();
            let rec = r.clone();
            tokio::spawn(async move { me.repair(rec, repair, seen).await });
        }
    }

    /// One heartbeat: the agent's state, or why there is none.
    async fn observe(
        &self,
        r: &InstanceRecord,
        client: Option<AgentClient>,
    ) -> (Observation, Option<AgentClient>) {
        let Some(vm) = &r.vm else {
            return (Observation::NoVm, None);
        };
        let interval = self.group_settings(r).health.heartbeat_interval;
        let wait = interval.max(Duration::from_secs(1));
        // A session that just closed often means the VM died: ask the CPI
        // first rather than spend the reconnect timeout.
        if client.as_ref().is_some_and(|c| c.is_closed()) && self.vm_exists(vm).await == Some(false)
        {
            return (
                Observation::Silent {
                    error: "the agent's session closed".into(),
                    vm_exists: Some(false),
                },
                None,
            );
        }
        let client = match client.filter(|c| !c.is_closed()) {
            Some(c) => Ok(c),
            None => {
                let exec = self.executor();
                exec.connect(vm, wait).await
            }
        };
        let error = match client {
            Ok(c) => match c.get_state_within(wait).await {
                Ok(st) => return (Observation::State(Box::new(st)), Some(c)),
                Err(e) => chain(&e),
            },
            Err(e) => chain(&e),
        };
        let vm_exists = self.vm_exists(vm).await;
        (Observation::Silent { error, vm_exists }, None)
    }

    /// The CPI's word on whether a VM exists (`None`: it did not say in time).
    async fn vm_exists(&self, vm: &crate::store::VmRecord) -> Option<bool> {
        let cpi = self.cpis.get(&vm.cpi).ok()?;
        tokio::time::timeout(Duration::from_secs(5), cpi.has_vm(&VmCid(vm.cid.clone())))
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    /// Update the tracker with an observation; say what to repair, if anything.
    fn classify(&self, r: &InstanceRecord, obs: Observation) -> Option<(Repair, String)> {
        let settings = self.group_settings(r);
        let h = &settings.health;
        let now = Instant::now();
        let mut all = lock(&self.trackers);
        let t = all.get_mut(&r.id)?;
        let before = t.health;
        match obs {
            Observation::State(st) => {
                t.last_ok = now;
                t.late = false;
                for j in &st.jobs {
                    for p in &j.processes {
                        let key = format!("{}/{}", j.name, p.name);
                        let old = t.restarts.insert(key.clone(), p.restarts);
                        if old.is_some_and(|o| p.restarts > o) {
                            self.event(
                                r,
                                &format!("process {key} exited"),
                                "restart-process",
                                &key,
                                &format!("restarted by the agent ({} restarts so far)", p.restarts),
                            );
                        }
                    }
                }
                match st.job_state {
                    ProcessState::Running => {
                        t.health = Health::Running;
                        if matches!(
                            before,
                            Health::Failing | Health::Unresponsive | Health::Missing
                        ) {
                            self.event(r, "running again", "none", "instance", "recovered");
                        }
                        t.failing_since = None;
                        t.job_restarted = false;
                        t.alerted = false;
                        None
                    }
                    ProcessState::Stopped => {
                        t.health = Health::Stopped;
                        t.failing_since = None;
                        None
                    }
                    ProcessState::Failing => {
                        t.health = Health::Failing;
                        let failing: Vec<String> = st
                            .jobs
                            .iter()
                            .filter(|j| {
                                j.processes.iter().any(|p| p.state == ProcessState::Failing)
                            })
                            .map(|j| j.name.clone())
                            .collect();
                        let seen = format!("job {} failing", failing.join(", "));
                        let since = *t.failing_since.get_or_insert(now);
                        if before != Health::Failing {
                            self.event(
                                r,
                                &seen,
                                "wait",
                                "instance",
                                "the agent restarts its processes",
                            );
                        }
                        if t.alerted || now.duration_since(since) < h.job_restart_after {
                            return None;
                        }
                        if t.job_restarted {
                            t.alerted = true;
                            self.event(
                                r,
                                &format!(
                                    "{seen} for {} after restarting it",
                                    secs(now.duration_since(since))
                                ),
                                "alert",
                                "instance",
                                "still failing: not repairing further until it runs again",
                            );
                            return None;
                        }
                        if !h.resurrection {
                            return None;
                        }
                        t.job_restarted = true;
                        t.failing_since = Some(now);
                        Some((
                            Repair::RestartJobs(failing),
                            format!("{seen} for {}", secs(now.duration_since(since))),
                        ))
                    }
                }
            }
            Observation::NoVm => {
                r.deployed.as_ref()?;
                t.health = Health::Missing;
                let fence = settings.restart_policy == RestartPolicy::Consistent;
                self.recreate_if_allowed(r, t, h, "no VM recorded".into(), fence, now)
            }
            Observation::Silent { error, vm_exists } => {
                t.last_error = error;
                if vm_exists == Some(false) {
                    t.health = Health::Missing;
                    let cid = r.vm.as_ref().map(|v| v.cid.as_str()).unwrap_or("");
                    let seen = format!("VM {cid} is gone (the CPI no longer has it)");
                    if before != Health::Missing {
                        self.event(r, &seen, "detect", "instance", "missing");
                    }
                    let fence = settings.restart_policy == RestartPolicy::Consistent;
                    return self.recreate_if_allowed(r, t, h, seen, fence, now);
                }
                let silent = now.duration_since(t.last_ok);
                if silent < h.agent_timeout {
                    if !matches!(before, Health::Unresponsive) && !t.late {
                        t.late = true;
                        self.event(
                            r,
                            &format!("agent did not answer a heartbeat ({})", t.last_error),
                            "wait",
                            "instance",
                            &format!("unresponsive after {} of silence", secs(h.agent_timeout)),
                        );
                    }
                    return None;
                }
                t.health = Health::Unresponsive;
                let seen = format!("agent unresponsive for {} ({})", secs(silent), t.last_error);
                if before != Health::Unresponsive {
                    self.event(r, &seen, "detect", "instance", "unresponsive");
                }
                let fence = settings.restart_policy == RestartPolicy::Consistent;
                self.recreate_if_allowed(r, t, h, seen, fence, now)
            }
        }
    }

    fn recreate_if_allowed(
        &self,
        r: &InstanceRecord,
        t: &mut Tracker,
        h: &HealthPolicy,
        seen: String,
        fence: bool,
        now: Instant,
    ) -> Option<(Repair, String)> {
        if t.alerted || !h.resurrection {
            return None;
        }
        if t.last_repair
            .is_some_and(|l| now.duration_since(l) < h.quiet_period)
        {
            return None;
        }
        t.repairs
            .retain(|at| now.duration_since(*at) < h.flap_window);
        if t.repairs.len() as u32 >= h.max_repairs {
            t.alerted = true;
            self.event(
                r,
                &seen,
                "alert",
                "instance",
                &format!(
                    "flapping: {} repairs within {}; not repairing until it runs again",
                    t.repairs.len(),
                    secs(h.flap_window)
                ),
            );
            return None;
        }
        Some((Repair::Recreate { fence }, seen))
    }

    fn repair_slots(&self, deployment: &str) -> Arc<tokio::sync::Semaphore> {
        lock(&self.repairs)
            .entry(deployment.to_string())
            .or_insert_with(|| DeploymentRepairs {
                slots: Arc::new(tokio::sync::Semaphore::new(MAX_PARALLEL_REPAIRS)),
                held: std::sync::Weak::new(),
            })
            .slots
            .clone()
    }

    /// The deployment lock for a repair of `name`: the hold a running repair
    /// already has, or a new one. `None` when someone else (a deploy) has it.
    fn repair_hold(
        &self,
        deployment: &str,
        name: &str,
    ) -> Option<Arc<crate::store::DeploymentLock>> {
        let mut all = lock(&self.repairs);
        let entry = all.get_mut(deployment)?;
        if let Some(held) = entry.held.upgrade() {
            return Some(held);
        }
        let held = Arc::new(
            self.store
                .try_lock_deployment(deployment, &format!("health monitor repairing {name}"))
                .ok()?,
        );
        entry.held = Arc::downgrade(&held);
        Some(held)
    }

    async fn repair(self: Arc<Self>, rec: InstanceRecord, repair: Repair, seen: String) {
        let slots = self.repair_slots(&rec.deployment);
        let _slot = slots.acquire_owned().await;
        let name = instance_name(&rec);
        let outcome = match self.repair_hold(&rec.deployment, &name) {
            Some(_held) => self.repair_locked(&rec, &repair, &seen).await,
            // A deploy holds the lock: it converges the instance itself.
            None => Ok(false),
        };
        let mut all = lock(&self.trackers);
        if let Some(t) = all.get_mut(&rec.id) {
            t.repairing = false;
            match &outcome {
                Ok(true) => {
                    if matches!(repair, Repair::Recreate { .. }) {
                        let now = Instant::now();
                        t.repairs.push(now);
                        t.last_repair = Some(now);
                    }
                    t.last_ok = Instant::now();
                }
                Ok(false) => {}
                Err(_) => t.alerted = true,
            }
        }
        drop(all);
        if let Err(e) = outcome {
            self.event(
                &rec,
                &seen,
                "alert",
                "instance",
                &format!(
                    "repair of {name} failed: {e}; not repairing until it runs again",
                    e = Chain(&e)
                ),
            );
        }
    }

    /// Carry out one repair; the caller holds the deployment lock.
    /// Ok(false): skipped (the instance changed meanwhile).
    async fn repair_locked(
        &self,
        rec: &InstanceRecord,
        repair: &Repair,
        seen: &str,
    ) -> Result<bool, crate::execute::executor::ExecError> {
        // Act on the instance as recorded now, and only if it is still the
        // one that was judged.
        let Some(current) = self
            .store
            .instances(&rec.deployment)?
            .into_iter()
            .find(|r| r.id == rec.id)
        else {
            return Ok(false);
        };
        if current.vm.as_ref().map(|v| &v.cid) != rec.vm.as_ref().map(|v| &v.cid) {
            return Ok(false);
        }
        let exec = self.executor();
        let settings = self.group_settings(&current);
        let started = Instant::now();
        match repair {
            Repair::RestartJobs(jobs) => {
                let object = format!("jobs {}", jobs.join(", "));
                match exec
                    .restart_jobs(
                        &current,
                        jobs,
                        settings
                            .health
                            .heartbeat_interval
                            .max(Duration::from_secs(2)),
                    )
                    .await
                {
                    Ok(_) => {
                        self.event(&current, seen, "restart-job", &object, "ok");
                        Ok(true)
                    }
                    Err(e) => {
                        self.event(
                            &current,
                            seen,
                            "restart-job",
                            &object,
                            &format!("error: {e}", e = Chain(&e)),
                        );
                        Err(e)
                    }
                }
            }
            Repair::Recreate { fence } => {
                let mut cur = current;
                let policy = if *fence { "consistent" } else { "available" };
                self.event(
                    &cur,
                    seen,
                    "recreate",
                    "instance",
                    &format!("starting (restart_policy {policy})"),
                );
                exec.fence_vm(&mut cur, seen, *fence).await?;
                let r = exec.recreate_deployed(cur.clone(), settings.watch).await;
                let took = secs(started.elapsed());
                match r {
                    Ok(()) => {
                        self.event(&cur, seen, "recreate", "instance", &format!("ok in {took}"));
                        Ok(true)
                    }
                    Err(e) => {
                        self.event(
                            &cur,
                            seen,
                            "recreate",
                            "instance",
                            &format!("error after {took}: {e}", e = Chain(&e)),
                        );
                        Err(e)
                    }
                }
            }
        }
    }

    /// The monitor's view of each watched instance (`group/id` -> health).
    pub fn health(&self) -> BTreeMap<String, Health> {
        let t = lock(&self.trackers);
        t.iter().map(|(id, tr)| (id.clone(), tr.health)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use bosun_cpi::{
        Cpi, CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint,
        Metadata, SnapshotCid, StemcellCid, StemcellSpec,
    };

    use crate::store::VmRecord;

    /// A CPI whose VMs in `gone` no longer exist; the rest exist but have
    /// no agent. Deleting a VM in `stall` waits for `release`. Everything
    /// else is unsupported.
    #[derive(Default)]
    struct FakeCpi {
        gone: Mutex<BTreeSet<String>>,
        stall: BTreeSet<String>,
        release: tokio::sync::Notify,
    }

    fn no<T>(m: &str) -> CpiResult<T> {
        Err(CpiError::NotSupported {
            cpi: "fake".into(),
            method: m.into(),
        })
    }

    #[async_trait]
    impl Cpi for FakeCpi {
        async fn info(&self) -> CpiResult<CpiInfo> {
            no("info")
        }
        async fn create_stemcell(&self, _: &StemcellSpec) -> CpiResult<StemcellCid> {
            no("create_stemcell")
        }
        async fn delete_stemcell(&self, _: &StemcellCid) -> CpiResult<()> {
            no("delete_stemcell")
        }
        async fn create_vm(&self, _: &CreateVmRequest) -> CpiResult<VmCid> {
            no("create_vm")
        }
        async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
            if self.stall.contains(&cid.0) {
                self.release.notified().await;
            }
            Ok(())
        }
        async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
            Ok(!lock(&self.gone).contains(&cid.0))
        }
        async fn reboot_vm(&self, _: &VmCid) -> CpiResult<()> {
            no("reboot_vm")
        }
        async fn set_vm_metadata(&self, _: &VmCid, _: &Metadata) -> CpiResult<()> {
            no("set_vm_metadata")
        }
        async fn find_vms(&self, _: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
            Ok(vec![])
        }
        async fn create_disk(&self, _: &CreateDiskRequest) -> CpiResult<DiskCid> {
            no("create_disk")
        }
        async fn delete_disk(&self, _: &DiskCid) -> CpiResult<()> {
            no("delete_disk")
        }
        async fn attach_disk(&self, _: &VmCid, _: &DiskCid) -> CpiResult<DiskHint> {
            no("attach_disk")
        }
        async fn detach_disk(&self, _: &VmCid, _: &DiskCid) -> CpiResult<()> {
            no("detach_disk")
        }
        async fn has_disk(&self, _: &DiskCid) -> CpiResult<bool> {
            no("has_disk")
        }
        async fn get_disks(&self, _: &VmCid) -> CpiResult<Vec<DiskCid>> {
            no("get_disks")
        }
        async fn resize_disk(&self, _: &DiskCid, _: u64) -> CpiResult<()> {
            no("resize_disk")
        }
        async fn set_disk_metadata(&self, _: &DiskCid, _: &Metadata) -> CpiResult<()> {
            no("set_disk_metadata")
        }
        async fn find_disks(&self, _: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
            Ok(vec![])
        }
        async fn snapshot_disk(&self, _: &DiskCid, _: &Metadata) -> CpiResult<SnapshotCid> {
            no("snapshot_disk")
        }
        async fn delete_snapshot(&self, _: &SnapshotCid) -> CpiResult<()> {
            no("delete_snapshot")
        }
    }

    struct Quiet;
    impl Progress for Quiet {
        fn stage(&self, _: &str, _: &str) {}
    }

    /// `n` instances of deployment `d` on the fake CPI, VMs `vm-0`..;
    /// nothing listens at their address, so no agent ever answers.
    fn setup(n: usize, gone: &[&str]) -> (tempfile::TempDir, Arc<Monitor>, Arc<Store>) {
        let cpi = FakeCpi {
            gone: Mutex::new(gone.iter().map(|s| s.to_string()).collect()),
            ..FakeCpi::default()
        };
        let (dir, m, store) = setup_on(n, Arc::new(cpi));
        (dir, m, store)
    }

    fn setup_on(n: usize, cpi: Arc<FakeCpi>) -> (tempfile::TempDir, Arc<Monitor>, Arc<Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..n {
            let mut rec = InstanceRecord::new(format!("id{i}"), "d", "g", i as u32, "z1");
            rec.vm = Some(VmRecord {
                cid: format!("vm-{i}"),
                cpi: "fake".into(),
                agent_id: format!("a{i}"),
                host_public_key: store.director_key().public_openssh.clone(),
                address: "127.0.0.1".into(),
                vm_digest: String::new(),
                generation: 1,
                created_at: 0,
            });
            store.save_instance(&rec).unwrap();
        }
        let mut cpis = Cpis::new();
        cpis.insert("fake", cpi);
        let m = Monitor::new(
            store.clone(),
            cpis,
            ExecOptions::default(),
            Arc::new(Quiet),
            Some("d".into()),
        );
        (dir, m, store)
    }

    async fn events_until(store: &Store, f: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        for _ in 0..100 {
            let ev = store.events(Some("d"), 0).unwrap();
            if f(&ev) {
                return ev;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        store.events(Some("d"), 0).unwrap()
    }

    #[tokio::test]
    async fn meltdown_alerts_instead_of_repairing() {
        let (_dir, m, store) = setup(5, &["vm-0", "vm-1", "vm-2", "vm-3", "vm-4"]);
        m.clone().tick().await.unwrap();
        let ev = store.events(Some("d"), 0).unwrap();
        let alert = ev
            .iter()
            .find(|e| e.action == "alert" && e.object == "deployment")
            .unwrap_or_else(|| panic!("no meltdown alert in {ev:?}"));
        assert!(alert.result.contains("meltdown"), "{alert:?}");
        assert_eq!(alert.seen, "5 of 5 instances down");
        assert_eq!(ev.iter().filter(|e| e.action == "detect").count(), 5);
        assert!(
            !ev.iter()
                .any(|e| e.action == "recreate" || e.action == "fence"),
            "no repair during a meltdown: {ev:?}"
        );
        assert!(m.health().values().all(|h| *h == Health::Missing));
    }

    #[tokio::test]
    async fn one_fault_one_repair_then_an_alert_when_it_fails() {
        // One of five VMs gone: below the meltdown guard, so it is repaired;
        // the repair fails (nothing was ever deployed there): an alert, and
        // no second attempt.
        let (_dir, m, store) = setup(5, &["vm-3"]);
        m.clone().tick().await.unwrap();
        let ev = events_until(&store, |ev| ev.iter().any(|e| e.action == "alert")).await;
        let of3: Vec<&Event> = ev
            .iter()
            .filter(|e| {
                e.instance
                    .as_deref()
                    .is_some_and(|i| i.starts_with("g/id3"))
            })
            .collect();
        let actions: Vec<(&str, &str)> = of3
            .iter()
            .map(|e| (e.action.as_str(), e.result.as_str()))
            .collect();
        assert_eq!(actions[0], ("detect", "missing"), "{actions:?}");
        assert_eq!(actions[1].0, "recreate");
        assert!(actions[1].1.starts_with("starting"), "{actions:?}");
        assert_eq!(actions[2], ("fence", "deleted"), "{actions:?}");
        assert!(
            of3.iter()
                .any(|e| e.action == "alert" && e.result.contains("no recorded deployed spec")),
            "{actions:?}"
        );
        assert!(
            !ev.iter().any(|e| e.object == "deployment"),
            "no meltdown for 1 of 5"
        );
        // Others: silent but present, not yet past agent_timeout: no repair.
        assert!(!ev
            .iter()
            .any(|e| e.action == "recreate"
                && !e.instance.as_deref().unwrap_or("").starts_with("g/id3")));
        m.clone().tick().await.unwrap();
        let again = store.events(Some("d"), 0).unwrap();
        assert_eq!(
            again
                .iter()
                .filter(|e| e.action == "recreate" && e.result.starts_with("starting"))
                .count(),
            1,
            "one fault, one repair"
        );
    }

    fn of<'e>(ev: &'e [Event], id: &str, action: &str) -> Vec<&'e Event> {
        let prefix = format!("g/{id} ");
        ev.iter()
            .filter(|e| e.action == action)
            .filter(|e| {
                e.instance
                    .as_deref()
                    .is_some_and(|i| i.starts_with(&prefix))
            })
            .collect()
    }

    #[tokio::test]
    async fn a_stalled_repair_does_not_delay_another_instance() {
        // vm-1 is gone and deleting it (the fence) hangs, as a frozen VM's
        // teardown can; vm-2 goes while that repair is stuck.
        let cpi = Arc::new(FakeCpi {
            gone: Mutex::new(["vm-1".to_string()].into()),
            stall: ["vm-1".to_string()].into(),
            ..FakeCpi::default()
        });
        let (_dir, m, store) = setup_on(10, cpi.clone());
        m.clone().tick().await.unwrap();
        let ev = events_until(&store, |ev| !of(ev, "id1", "recreate").is_empty()).await;
        assert_eq!(of(&ev, "id1", "recreate").len(), 1, "{ev:?}");
        lock(&cpi.gone).insert("vm-2".into());
        m.clone().tick().await.unwrap();
        // vm-2's repair runs to its end (an alert: nothing was deployed
        // there) while vm-1's is still fencing.
        let ev = events_until(&store, |ev| !of(ev, "id2", "alert").is_empty()).await;
        assert_eq!(of(&ev, "id2", "fence").len(), 1, "{ev:?}");
        assert_eq!(of(&ev, "id2", "alert").len(), 1, "{ev:?}");
        assert!(
            of(&ev, "id1", "fence").is_empty(),
            "vm-1 still fencing: {ev:?}"
        );
        cpi.release.notify_one();
        let ev = events_until(&store, |ev| !of(ev, "id1", "alert").is_empty()).await;
        assert_eq!(of(&ev, "id1", "fence").len(), 1, "{ev:?}");
    }
}

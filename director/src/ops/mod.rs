//! Operator operations, one function each, as the CLI calls them: deploy,
//! delete a deployment, list instances, upload releases and cloud-configs.
//! Each one strings the pure stages (parse, validate, resolve, plan)
//! together with the executor, and reports through a [`Report`] sink.
//!
//! This module must not print or read the terminal: the CLI does that
//! through [`Report`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use bosun_agent::client::wait_for_agent;
use bosun_agent::protocol::{AgentState, ProcessState};
use bosun_cpi::{StemcellSpec, AGENT_PORT};

use crate::cloud_config::{self, CloudConfig};
use crate::desired::{self, ResolveError};
use crate::diff::DiffLine;
use crate::executor::{
    futures_join_all, Cpis, ExecError, ExecOptions, ExecSummary, Executor, Progress,
};
use crate::manifest::{self, Manifest};
use crate::planner::{self, Actual, Plan, PlanError};
use crate::problems::Problems;
use crate::release::{self, ReleaseError};
use crate::state::{
    DeploymentRecord, InstanceRecord, ReleaseRecord, StateError, StemcellRecord, Store,
};

/// An operation failure.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Problems(#[from] Problems),
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    #[error("deployment '{0}' does not exist")]
    NoDeployment(String),
    #[error("deploy cancelled")]
    Cancelled,
    #[error("{0}")]
    Stemcell(String),
    #[error(transparent)]
    Interpolate(#[from] crate::interpolate::InterpolateError),
    #[error(transparent)]
    VarStore(#[from] crate::interpolate::StoreError),
}

/// What the CLI shows the operator.
pub trait Report: Progress {
    /// A one-off notice.
    fn notice(&self, msg: &str);
    /// Show the manifest diff and the plan, and ask whether to go on
    /// (answer true when non-interactive).
    fn confirm(&self, diff: &[Vec<DiffLine>], plan: &Plan) -> bool;
}

/// The director: the store and the CPIs.
pub struct Director {
    pub store: Arc<Store>,
    pub cpis: Cpis,
    pub opts: ExecOptions,
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

/// Turn an agent failure into an operation error naming what was done.
fn agent_err(what: String) -> impl FnOnce(bosun_agent::client::ClientError) -> OpError {
    move |source| {
        OpError::Exec(ExecError::Agent {
            what,
            source: Box::new(source),
        })
    }
}

/// Where followed log lines go: `(instance, line)`.
pub type LineSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// A command's run on one instance (`ssh -c`).
/// What `clean-up` deletes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanUpPlan {
    /// (name, version).
    pub releases: Vec<(String, String)>,
    pub stemcells: Vec<StemcellRecord>,
    pub compiled_packages: Vec<crate::state::CompiledPackage>,
    /// Blobs (sha256) only those referenced.
    pub blobs: Vec<String>,
    /// Their size.
    pub bytes: u64,
}

impl CleanUpPlan {
    pub fn is_empty(&self) -> bool {
        self.releases.is_empty() && self.stemcells.is_empty() && self.compiled_packages.is_empty()
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CommandRun {
    /// `group/id`
    pub instance: String,
    pub index: u32,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: u32,
}

/// Options of `run-errand`.
#[derive(Clone, Debug, Default)]
pub struct ErrandOptions {
    /// Keep an errand group's VMs after the run.
    pub keep_alive: bool,
    /// Only instances these `GROUP[/ID or INDEX]` filters name (all if empty).
    pub instances: Vec<String>,
}

/// Splits streamed bytes into lines (a line may arrive in pieces).
#[derive(Default)]
struct LineBuffer {
    partial: Vec<u8>,
}

impl LineBuffer {
    fn feed(&mut self, data: &[u8], mut line: impl FnMut(&str)) {
        self.partial.extend_from_slice(data);
        while let Some(pos) = self.partial.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = self.partial.drain(..=pos).collect();
            line(String::from_utf8_lossy(&l).trim_end());
        }
    }

    /// The last line, when it had no newline.
    fn finish(&mut self, mut line: impl FnMut(&str)) {
        if !self.partial.is_empty() {
            line(String::from_utf8_lossy(&self.partial).trim_end());
            self.partial.clear();
        }
    }
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

/// Options of `deploy`.
#[derive(Clone, Debug, Default)]
pub struct DeployOptions {
    pub dry_run: bool,
    /// Ops files, variables and regenerations (`vars_store` and `path` are
    /// not used: generated values live in the director's state).
    pub interpolate: crate::interpolate::InterpolateOptions,
}

/// Generated variables of one deployment, kept sealed in the state store
/// (the director's stand-in for `--vars-store`).
struct StateVars<'a> {
    store: &'a Store,
    deployment: String,
    /// Variable types by name, from the manifest's definitions.
    kinds: BTreeMap<String, String>,
}

impl crate::interpolate::VariableStore for StateVars<'_> {
    fn get(
        &self,
        name: &str,
    ) -> Result<Option<serde_yaml_ng::Value>, crate::interpolate::StoreError> {
        let be = |e: String| crate::interpolate::StoreError::Backend(e);
        match self
            .store
            .variable(&self.deployment, name)
            .map_err(|e| be(e.to_string()))?
        {
            Some((_, v)) => serde_yaml_ng::to_value(v)
                .map(Some)
                .map_err(|e| be(format!("reading variable {name}: {e}"))),
            None => Ok(None),
        }
    }

    fn put(
        &mut self,
        name: &str,
        value: serde_yaml_ng::Value,
        definition_digest: &str,
    ) -> Result<(), crate::interpolate::StoreError> {
        let be = |e: String| crate::interpolate::StoreError::Backend(e);
        let json = serde_json::to_value(&value)
            .map_err(|e| be(format!("storing variable {name}: {e}")))?;
        let rec = crate::state::VariableRecord {
            deployment: self.deployment.clone(),
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            kind: self.kinds.get(name).cloned().unwrap_or_default(),
            definition_digest: definition_digest.to_string(),
            created_at: crate::state::now(),
        };
        self.store
            .save_variable(&rec, &json)
            .map_err(|e| be(e.to_string()))
    }

    fn definition_digest(
        &self,
        name: &str,
    ) -> Result<Option<String>, crate::interpolate::StoreError> {
        Ok(self
            .store
            .variable(&self.deployment, name)
            .map_err(|e| crate::interpolate::StoreError::Backend(e.to_string()))?
            .map(|(r, _)| r.definition_digest))
    }
}

/// What a deploy did.
#[derive(Debug)]
pub struct DeployOutcome {
    /// The manifest against the one deployed last (placeholders, not values).
    pub diff: Vec<Vec<DiffLine>>,
    pub plan: Plan,
    pub summary: Option<ExecSummary>,
    pub elapsed: Duration,
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

fn read(path: &Path) -> Result<String, OpError> {
    std::fs::read_to_string(path).map_err(|source| OpError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The operating system of this host as stemcells name it
/// (`<ID>-<VERSION_CODENAME>` from /etc/os-release, e.g. `debian-bookworm`):
/// the `os` of the local CPI's built-in stemcell, which is the host itself.
pub fn host_os() -> String {
    let text = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .filter(|v| !v.is_empty())
    };
    match (
        field("ID"),
        field("VERSION_CODENAME").or_else(|| field("VERSION_ID")),
    ) {
        (Some(id), Some(v)) => format!("{id}-{v}"),
        (Some(id), None) => id,
        _ => "linux".to_string(),
    }
}

impl Director {
    pub fn executor(&self, progress: Arc<dyn Progress>) -> Executor {
        self.executor_as(progress, "deploy")
    }

    /// An executor whose events name `source` as their origin.
    pub fn executor_as(&self, progress: Arc<dyn Progress>, source: &str) -> Executor {
        Executor {
            store: self.store.clone(),
            cpis: self.cpis.clone(),
            progress,
            opts: self.opts.clone(),
            source: source.to_string(),
        }
    }

    /// The cloud-config in force: the uploaded one, else the built-in
    /// default for the local CPI (said once per command).
    pub fn cloud_config(&self, report: &dyn Report) -> Result<CloudConfig, OpError> {
        match self.store.cloud_config()? {
            Some((id, text)) => Ok(cloud_config::parse_cloud_config(
                &format!("cloud-config #{id}"),
                &text,
            )?),
            None => {
                report.notice(
                    "No cloud-config uploaded: using the built-in local one (az z1, network default 127.77.0.0/24, vm_type and disk_type default).",
                );
                Ok(cloud_config::default_local())
            }
        }
    }

    /// Validate and store a runtime-config (addons for every deployment).
    pub fn update_runtime_config(&self, path: &Path) -> Result<i64, OpError> {
        let text = read(path)?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = std::fs::canonicalize(&base).unwrap_or(base);
        crate::addons::parse_runtime_config(&path.display().to_string(), &text, &base)?;
        Ok(self.store.save_runtime_config(&text, &base)?)
    }

    /// The manifest with its own addons and the runtime-config's placed.
    fn with_addons(&self, manifest: &Manifest) -> Result<Manifest, OpError> {
        let mut m = manifest.clone();
        let own = std::mem::take(&mut m.addons);
        crate::addons::apply(&mut m, &own, &[], &manifest.source)?;
        if let Some((id, text, base)) = self.store.runtime_config()? {
            let rc = crate::addons::parse_runtime_config(
                &format!("runtime-config #{id}"),
                &text,
                &base,
            )?;
            crate::addons::apply(&mut m, &rc.addons, &rc.releases, &rc.source)?;
        }
        Ok(m)
    }

    pub fn update_cloud_config(&self, path: &Path) -> Result<i64, OpError> {
        let text = read(path)?;
        cloud_config::parse_cloud_config(&path.display().to_string(), &text)?;
        Ok(self.store.save_cloud_config(&text)?)
    }

    /// Make sure the local CPI's host stemcell is registered.
    pub async fn ensure_local_stemcell(&self) -> Result<(), OpError> {
        let Ok(cpi) = self.cpis.get("local") else {
            return Ok(());
        };
        if self.store.stemcells()?.iter().any(|s| s.cpi == "local") {
            return Ok(());
        }
        let spec = StemcellSpec {
            name: "bosun-local-host".into(),
            os: host_os(),
            version: "1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        };
        let cid = cpi
            .create_stemcell(&spec)
            .await
            .map_err(|e| OpError::Stemcell(format!("registering the local stemcell: {e}")))?;
        self.store.save_stemcell(&StemcellRecord {
            name: spec.name,
            os: spec.os,
            version: spec.version,
            cpi: "local".into(),
            cid: cid.0,
        })?;
        Ok(())
    }

    /// Upload a stemcell tarball to every configured CPI that takes its
    /// format. Returns the records (existing ones included).
    pub async fn upload_stemcell(
        &self,
        path: &Path,
    ) -> Result<Vec<(StemcellRecord, bool)>, OpError> {
        let scratch = self.store.dir().join("tmp");
        let opened = crate::stemcell::open_stemcell_in(path, Some(&scratch))
            .map_err(|e| OpError::Stemcell(format!("reading stemcell {}: {e}", path.display())))?;
        let m = &opened.manifest;
        let existing = self.store.stemcells()?;
        let mut out = Vec::new();
        for name in self.cpis.names().map(str::to_string).collect::<Vec<_>>() {
            let cpi = self.cpis.get(&name)?;
            let info = cpi.info().await.map_err(|e| {
                OpError::Stemcell(format!("asking the {name} CPI for its formats: {e}"))
            })?;
            if !info
                .stemcell_formats
                .iter()
                .any(|f| m.stemcell_formats.contains(f))
            {
                continue;
            }
            if let Some(rec) = existing
                .iter()
                .find(|s| s.cpi == name && s.name == m.name && s.version == m.version)
            {
                out.push((rec.clone(), false));
                continue;
            }
            let cid = cpi.create_stemcell(&opened.spec()).await.map_err(|e| {
                OpError::Stemcell(format!(
                    "uploading stemcell {}/{} to the {name} CPI: {e}",
                    m.name, m.version
                ))
            })?;
            let rec = StemcellRecord {
                name: m.name.clone(),
                os: m.operating_system.clone(),
                version: m.version.clone(),
                cpi: name.clone(),
                cid: cid.0,
            };
            self.store.save_stemcell(&rec)?;
            out.push((rec, true));
        }
        if out.is_empty() {
            return Err(OpError::Stemcell(format!(
                "no configured CPI takes stemcell format {} (configured: {}); the docker CPI is configured when Docker is reachable",
                m.stemcell_formats.join(", "),
                self.cpis.names().collect::<Vec<_>>().join(", ")
            )));
        }
        Ok(out)
    }

    /// Read a release (directory or tarball) and upload it. Returns the
    /// record and whether it was new.
    pub fn upload_release(
        &self,
        path: &Path,
        version: Option<&str>,
    ) -> Result<(ReleaseRecord, bool), OpError> {
        let rel = release::read_release_in(path, version, Some(&self.store.dir().join("tmp")))?;
        let new = self.store.save_release(&rel)?;
        let rec = self
            .store
            .release(&rel.manifest.name, &rel.manifest.version)?
            .ok_or_else(|| OpError::Stemcell("release vanished after upload".into()))?;
        Ok((rec, new))
    }

    /// Read and parse a manifest file.
    pub fn load_manifest(&self, manifest_path: &Path) -> Result<(Manifest, String), OpError> {
        let text = read(manifest_path)?;
        let base = manifest_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let manifest =
            manifest::parse_manifest(&manifest_path.display().to_string(), &text, &base)?;
        Ok((manifest, text))
    }

    /// Read a manifest, apply ops files and variables (generating declared
    /// ones into the state, sealed, when `persist`, under the deployment
    /// lock, which is returned), and parse the result. Returns the manifest
    /// and its text *before* variable values were filled in (what is diffed
    /// and recorded: placeholders, never secrets).
    pub fn load_interpolated(
        &self,
        manifest_path: &Path,
        opts: &crate::interpolate::InterpolateOptions,
        persist: bool,
    ) -> Result<(Manifest, String, Option<crate::state::DeploymentLock>), OpError> {
        use crate::interpolate::{self as interp, InterpolateOptions};
        let file = manifest_path.display().to_string();
        let text = read(manifest_path)?;
        let base = manifest_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        // Nothing to interpolate: parse the file as written (exact lines).
        if opts.ops_files.is_empty() && !text.contains("((") {
            let manifest = manifest::parse_manifest(&file, &text, &base)?;
            return Ok((manifest, text, None));
        }
        // Entries that are not UTF-8 cannot be variables: skip them.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        // 1. Ops files only: the placeholders stay.
        let ops_only = InterpolateOptions {
            ops_files: opts.ops_files.clone(),
            ..InterpolateOptions::default()
        };
        let pre = interp::interpolate_value_with(&file, &text, &ops_only, None, &env)?;
        let pre_text = interp::to_output(&pre, false)?;
        // 2. Variables, generated ones from (and into) the state.
        let name = pre
            .get("name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let kinds: BTreeMap<String, String> = pre
            .get("variables")
            .and_then(|v| v.as_sequence())
            .into_iter()
            .flatten()
            .filter_map(|v| {
                Some((
                    v.get("name")?.as_str()?.to_string(),
                    v.get("type")?.as_str()?.to_string(),
                ))
            })
            .collect();
        let vars_opts = InterpolateOptions {
            ops_files: vec![],
            vars_store: None,
            path: None,
            var_errs: true,
            ..opts.clone()
        };
        let lock = if persist && !name.is_empty() && !name.contains("((") {
            Some(self.store.lock_deployment(&name)?)
        } else {
            None
        };
        let final_value = if persist {
            let mut sv = StateVars {
                store: &self.store,
                deployment: name.clone(),
                kinds,
            };
            interp::interpolate_value_with(&file, &pre_text, &vars_opts, Some(&mut sv), &env)?
        } else {
            // A dry run generates into memory only, starting from what is kept.
            let mut mem = interp::MemoryStore::default();
            for r in self.store.variables(&name)? {
                if let Some((rec, v)) = self.store.variable(&name, &r.name)? {
                    let yv = serde_yaml_ng::to_value(v).map_err(|e| {
                        OpError::Stemcell(format!("reading variable {}: {e}", r.name))
                    })?;
                    interp::VariableStore::put(&mut mem, &r.name, yv, &rec.definition_digest)?;
                }
            }
            interp::interpolate_value_with(&file, &pre_text, &vars_opts, Some(&mut mem), &env)?
        };
        let final_text = interp::to_output(&final_value, false)?;
        let manifest =
            manifest::parse_manifest(&format!("{file} (interpolated)"), &final_text, &base)?;
        Ok((manifest, pre_text, lock))
    }

    /// Validate, resolve releases (uploading `path:` ones when `persist`),
    /// resolve the desired state and plan.
    pub async fn plan_manifest(
        &self,
        manifest: &Manifest,
        persist: bool,
        report: &dyn Report,
    ) -> Result<Plan, OpError> {
        let cc = self.cloud_config(report)?;
        let manifest = &self.with_addons(manifest)?;
        // Every problem at once: cloud-config checks, releases, jobs, links.
        let mut problems = match cloud_config::validate_manifest(manifest, &cc) {
            Ok(()) => Problems::default(),
            Err(p) => p,
        };
        self.ensure_local_stemcell().await?;

        // Releases: local paths are created and uploaded; others must exist.
        let mut releases = BTreeMap::new();
        for (i, r) in manifest.releases.iter().enumerate() {
            let found = match &r.path {
                Some(p) => {
                    let version = (r.version != "latest").then_some(r.version.as_str());
                    let found = if persist {
                        self.upload_release(p, version)
                    } else {
                        // A dry run stores nothing.
                        release::read_release(p, version)
                            .map(|rel| (ReleaseRecord::from_release(&rel), false))
                            .map_err(OpError::from)
                    };
                    match found {
                        Ok((rec, new)) => {
                            if new {
                                report.notice(&format!(
                                    "Uploaded release {}/{} from {}",
                                    rec.name(),
                                    rec.version(),
                                    p.display()
                                ));
                            }
                            Some(rec)
                        }
                        Err(e) => {
                            problems.push(manifest.source.problem(
                                format!("releases[{i}].path"),
                                format!("release '{}': {e}", r.name),
                            ));
                            None
                        }
                    }
                }
                None => self.store.release(&r.name, &r.version)?,
            };
            match found {
                Some(rec) if rec.name() == r.name => {
                    releases.insert(r.name.clone(), rec);
                }
                Some(rec) => problems.push(manifest.source.problem(
                    format!("releases[{i}].name"),
                    format!(
                        "the release at this path is named '{}', not '{}'",
                        rec.name(),
                        r.name
                    ),
                )),
                // Not uploaded: `desired::resolve` reports it with the rest.
                None => {}
            }
        }
        let stemcells = self.store.stemcells()?;
        let desired = match desired::resolve(manifest, &cc, &releases, &stemcells) {
            Ok(d) => d,
            Err(ResolveError::Problems(more)) => {
                problems.extend(more);
                problems.0.sort_by_key(|p| p.line.unwrap_or(0));
                problems.0.dedup();
                return Err(problems.into());
            }
            Err(e) if problems.is_empty() => return Err(e.into()),
            Err(_) => return Err(problems.into()),
        };
        problems.into_result()?;

        // IPs are picked and reserved under one director-wide lock, so two
        // deployments planned at once never share an address (a dry run
        // reserves nothing and takes no lock).
        let ip_lock = match persist {
            true => Some(self.store.lock_ips(Duration::from_secs(120))?),
            false => None,
        };
        let mine = self.store.instances(&manifest.name)?;
        let others_recorded = self
            .store
            .all_instances()?
            .into_iter()
            .filter(|i| i.deployment != manifest.name)
            .flat_map(|i| i.networks.into_iter().map(|(n, s)| (n, s.ip)));
        let others_reserved = self
            .store
            .ip_reservations()?
            .into_iter()
            .filter(|(_, _, d)| *d != manifest.name)
            .map(|(n, ip, _)| (n, ip));
        let reserved_ips = others_recorded
            .chain(others_reserved)
            .filter_map(|(n, ip)| ip.parse().ok().map(|ip| (n, ip)))
            .collect();
        let mut compiled = BTreeSet::new();
        for p in &desired.packages {
            if self
                .store
                .compiled_package(&p.fingerprint, &p.stemcell)?
                .is_some()
            {
                compiled.insert((p.fingerprint.clone(), p.stemcell.clone()));
            }
        }
        let missing_vms = self.missing_vms(&mine).await;
        let actual = Actual {
            instances: mine,
            reserved_ips,
            compiled,
            missing_vms,
        };
        let plan = planner::plan(&desired, &actual, &mut || uuid::Uuid::new_v4().to_string())?;
        if ip_lock.is_some() {
            self.store.reserve_ips(&manifest.name, &plan.ips())?;
        }
        drop(ip_lock);
        Ok(plan)
    }

    /// `deploy`: plan, confirm, execute.
    pub async fn deploy(
        &self,
        manifest_path: &Path,
        opts: &DeployOptions,
        report: Arc<dyn Report>,
    ) -> Result<DeployOutcome, OpError> {
        let started = Instant::now();
        let (manifest, text, held) =
            self.load_interpolated(manifest_path, &opts.interpolate, !opts.dry_run)?;
        // Plan under the lock, so the plan shown is the one carried out
        // (variables were generated under it too).
        let _lock = match held {
            Some(l) => Some(l),
            None if opts.dry_run => None,
            None => Some(self.store.lock_deployment(&manifest.name)?),
        };
        let plan = self
            .plan_manifest(&manifest, !opts.dry_run, report.as_ref())
            .await?;
        let deployed = self
            .store
            .deployment(&manifest.name)?
            .map(|d| d.manifest)
            .unwrap_or_default();
        let diff = crate::diff::diff_lines(&deployed, &text, 3);
        if opts.dry_run || plan.is_empty() {
            if !opts.dry_run {
                self.store.release_ips(&manifest.name)?;
                // Nothing to do on any VM, but a changed manifest (update
                // or health settings, restart_policy) is the one deployed now.
                if !diff.is_empty() && self.store.deployment(&manifest.name)?.is_some() {
                    self.store
                        .save_deployment(&deployment_record(&manifest, text, &plan))?;
                }
            }
            return Ok(DeployOutcome {
                diff,
                plan,
                summary: None,
                elapsed: started.elapsed(),
            });
        }
        if !report.confirm(&diff, &plan) {
            self.store.release_ips(&manifest.name)?;
            return Err(OpError::Cancelled);
        }
        self.store
            .save_deployment(&deployment_record(&manifest, text, &plan))?;
        let progress: Arc<dyn Progress> = Arc::new(ReportProgress(report.clone()));
        let executed = self.executor(progress).execute(&plan).await;
        // Whatever happened, the instances now record the IPs they hold;
        // the compilation workers' are free again. (A crash keeps the
        // reservation until the next deploy or delete of this deployment.)
        let released = self.store.release_ips(&manifest.name);
        let summary = executed?;
        released?;
        Ok(DeployOutcome {
            diff,
            plan,
            summary: Some(summary),
            elapsed: started.elapsed(),
        })
    }

    /// `delete-deployment`.
    pub async fn delete_deployment(
        &self,
        name: &str,
        report: Arc<dyn Report>,
    ) -> Result<usize, OpError> {
        if self.store.deployment(name)?.is_none() && self.store.instances(name)?.is_empty() {
            return Err(OpError::NoDeployment(name.to_string()));
        }
        let _lock = self.store.lock_deployment(name)?;
        let progress: Arc<dyn Progress> = Arc::new(ReportProgress(report));
        let deleted = self.executor(progress).delete_deployment(name).await?;
        self.store.release_ips(name)?;
        Ok(deleted)
    }

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
        let stamp = crate::state::now();
        let mut out = Vec::new();
        for r in recs {
            let iname = crate::executor::instance_name(&r);
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
            .partition(|r| r.state == crate::state::InstanceState::Errand);
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
                None => (1, 1, crate::repair::DEFAULT_WATCH),
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
            .filter(|r| r.group == errand && r.state == crate::state::InstanceState::Errand)
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
            .filter(|r| r.vm.is_some() && r.state == crate::state::InstanceState::Started)
            .filter(|r| errand_jobs(r).any(|j| j == errand))
            .filter(|r| chosen(r))
            .collect();
        if hosts.is_empty() {
            let mut errands: BTreeSet<String> = all
                .iter()
                .filter(|r| r.state == crate::state::InstanceState::Errand)
                .map(|r| r.group.clone())
                .collect();
            errands.extend(
                all.iter()
                    .filter(|r| r.state != crate::state::InstanceState::Errand)
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
                let iname = crate::executor::instance_name(rec);
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
        let iname = crate::executor::instance_name(&rec);
        let started = Instant::now();
        if rec.vm.is_none() {
            exec.recreate_deployed(rec.clone(), crate::repair::DEFAULT_WATCH)
                .await?;
        }
        let mut rec = self
            .store
            .instances(&name)?
            .into_iter()
            .find(|r| r.id == rec.id)
            .ok_or_else(|| OpError::Stemcell(format!("{iname} vanished while starting")))?;
        // It was started like any instance; it stays an errand.
        rec.state = crate::state::InstanceState::Errand;
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
            exec.teardown_vm_with(&mut rec, None, crate::executor::NextState::VmDeleted)
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
        // Follow each job's output file while the script runs; once it has
        // ended, stop each follower when it has been quiet for 300 ms.
        let base = Instant::now();
        let ended = std::sync::atomic::AtomicBool::new(false);
        let followers = jobs.iter().map(|job| {
            let (ended, sink, prefix) = (&ended, sink.clone(), &prefix);
            async move {
                let label = format!("{iname} {job}");
                let command =
                    format!("exec tail -n +1 -F /var/vcap/data/tmp/{prefix}-{job}.out 2>/dev/null");
                let last = std::sync::atomic::AtomicU64::new(0);
                let mut lines = LineBuffer::default();
                let quiet = async {
                    loop {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        let since = base.elapsed().as_millis() as u64
                            - last.load(std::sync::atomic::Ordering::SeqCst);
                        if ended.load(std::sync::atomic::Ordering::SeqCst) && since >= 300 {
                            break;
                        }
                    }
                };
                let streamed = client
                    .stream_command(
                        &command,
                        |data| {
                            last.store(
                                base.elapsed().as_millis() as u64,
                                std::sync::atomic::Ordering::SeqCst,
                            );
                            lines.feed(data, |line| sink(&label, line));
                        },
                        quiet,
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
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        };
        let (result, _) = tokio::join!(run, futures_join_all(followers));
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
        let _ = self.store.add_event(
            &crate::state::Event::new("run-errand", name, Some(&instance))
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
                let iname = crate::executor::instance_name(r);
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
                let iname = crate::executor::instance_name(r);
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
        let iname = crate::executor::instance_name(r);
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
        let iname = crate::executor::instance_name(rec);
        let exec = self.executor_as(Arc::new(QuietProgress), "ssh");
        let client = exec.reach_instance(rec, Duration::from_secs(10)).await?;
        let _ = self.store.add_event(
            &crate::state::Event::new("ssh", name, Some(&iname))
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
                let iname = crate::executor::instance_name(r);
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

    /// `attach-disk INSTANCE CID`: give a hard-stopped instance an orphaned
    /// disk as its persistent disk; its current disk becomes orphaned (kept).
    /// `start` then attaches and mounts it. Returns the disk orphaned, if any.
    pub fn attach_orphan_disk(
        &self,
        name: &str,
        instance: &str,
        cid: &str,
    ) -> Result<Option<String>, OpError> {
        let _lock = self.store.lock_deployment(name)?;
        let recs: Vec<InstanceRecord> = self
            .store
            .instances(name)?
            .into_iter()
            .filter(|r| instance_matches(r, Some(instance)))
            .collect();
        let [rec] = recs.as_slice() else {
            return Err(OpError::Stemcell(format!(
                "attach-disk needs exactly one instance; '{instance}' matches {}",
                recs.len()
            )));
        };
        let mut rec = rec.clone();
        let iname = crate::executor::instance_name(&rec);
        if rec.state != crate::state::InstanceState::Detached || rec.vm.is_some() {
            return Err(OpError::Stemcell(format!(
                "{iname} must be stopped with `stop --hard` before a disk is attached to it"
            )));
        }
        let orphan = self
            .store
            .orphan_disks()?
            .into_iter()
            .find(|d| d.cid == cid)
            .ok_or_else(|| {
                OpError::Stemcell(format!(
                    "disk {cid} is not an orphaned disk (see `bosun disks --orphaned`)"
                ))
            })?;
        // Keep the digest of the disk the manifest asks for, so the next
        // deploy keeps this disk instead of migrating it.
        let digest = rec
            .disk
            .as_ref()
            .map(|d| d.digest.clone())
            .unwrap_or_default();
        let previous = rec.disk.take();
        if let Some(d) = &previous {
            self.store.save_orphan_disk(&crate::state::OrphanDisk {
                cid: d.cid.clone(),
                cpi: d.cpi.clone(),
                size_mb: d.size_mb,
                deployment: rec.deployment.clone(),
                instance: format!("{}/{}", rec.group, rec.id),
                orphaned_at: crate::state::now(),
            })?;
        }
        rec.disk = Some(crate::state::DiskRecord {
            cid: orphan.cid.clone(),
            cpi: orphan.cpi.clone(),
            size_mb: orphan.size_mb,
            digest,
            attached: false,
        });
        self.store.save_instance(&rec)?;
        self.store.delete_orphan_disk(cid)?;
        let _ = self.store.add_event(
            &crate::state::Event::new("attach-disk", name, Some(&iname))
                .did("attach-disk", format!("disk {cid}"))
                .result(match &previous {
                    Some(d) => format!("ok; disk {} orphaned", d.cid),
                    None => "ok".into(),
                }),
        );
        Ok(previous.map(|d| d.cid))
    }

    /// `delete-disk`: delete an orphaned disk through its CPI and forget it.
    pub async fn delete_orphan_disk(&self, cid: &str) -> Result<crate::state::OrphanDisk, OpError> {
        let d = self
            .store
            .orphan_disks()?
            .into_iter()
            .find(|d| d.cid == cid)
            .ok_or_else(|| {
                OpError::Stemcell(format!(
                    "disk {cid} is not an orphaned disk (see `bosun disks --orphaned`); disks in use are never deleted"
                ))
            })?;
        let cpi = self.cpis.get(&d.cpi).map_err(OpError::Exec)?;
        cpi.delete_disk(&bosun_cpi::DiskCid(d.cid.clone()))
            .await
            .map_err(|source| {
                OpError::Exec(ExecError::Cpi {
                    what: format!("deleting orphaned disk {cid}"),
                    source: Box::new(source),
                })
            })?;
        self.store.delete_orphan_disk(cid)?;
        let _ = self.store.add_event(
            &crate::state::Event::new("delete-disk", &d.deployment, Some(&d.instance))
                .did("delete", format!("disk {cid}"))
                .result("ok"),
        );
        Ok(d)
    }

    /// `clean-up [--all]`: what is unused. Releases versions and stemcells
    /// no deployment uses, except the `keep` most recently uploaded unused
    /// versions of each release and stemcell name (BOSH keeps 2; `--all`
    /// keeps 0); compiled packages of neither a remaining release nor a
    /// remaining stemcell; and the blobs only those referenced. Blobs an
    /// instance's recorded spec installs are never deleted (a resurrection
    /// needs them). Nothing is changed.
    pub fn clean_up_plan(&self, keep: usize) -> Result<CleanUpPlan, OpError> {
        let deployments = self.store.deployments()?;
        let mut used_releases = BTreeSet::new();
        let mut every_version_of = BTreeSet::new();
        let mut used_stemcells = BTreeSet::new();
        let mut stemcells_unknown = false;
        for d in &deployments {
            match &d.uses {
                Some(u) => {
                    used_releases.extend(u.releases.iter().cloned());
                    used_stemcells.extend(u.stemcells.iter().cloned());
                }
                None => {
                    every_version_of.extend(d.releases.iter().cloned());
                    stemcells_unknown = true;
                }
            }
        }
        let mut installed = BTreeSet::new();
        for i in self.store.all_instances()? {
            if let Some(d) = i.deployed {
                used_stemcells.insert(d.stemcell);
                installed.extend(d.spec.packages.into_iter().map(|p| p.sha256));
            }
        }

        // Unused release versions, oldest first per name; keep the newest.
        let uploaded = self.store.releases()?;
        let mut by_name: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (name, version, _) in &uploaded {
            if !used_releases.contains(&format!("{name}/{version}"))
                && !every_version_of.contains(name)
            {
                by_name.entry(name).or_default().push(version);
            }
        }
        let mut releases = Vec::new();
        for (name, versions) in by_name {
            let n = versions.len().saturating_sub(keep);
            releases.extend(
                versions
                    .into_iter()
                    .take(n)
                    .map(|v| (name.to_string(), v.to_string())),
            );
        }

        // Unused stemcell versions (every CPI's copy), by name likewise.
        let all_stemcells = self.store.stemcells()?;
        let mut stemcells = Vec::new();
        if !stemcells_unknown {
            let mut by_name: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for s in &all_stemcells {
                let key = desired::stemcell_key(s);
                let versions = by_name.entry(&s.name).or_default();
                if !used_stemcells.contains(&key) && !versions.contains(&key) {
                    versions.push(key);
                }
            }
            let doomed: BTreeSet<String> = by_name
                .into_values()
                .flat_map(|v| {
                    let n = v.len().saturating_sub(keep);
                    v.into_iter().take(n)
                })
                .collect();
            stemcells = all_stemcells
                .iter()
                .filter(|s| doomed.contains(&desired::stemcell_key(s)))
                .cloned()
                .collect();
        }

        // What remains after those, and what it needs.
        let mut kept_fingerprints = BTreeSet::new();
        let mut kept_blobs = installed;
        let mut freed = BTreeSet::new();
        for (name, version, _) in uploaded {
            let Some(rec) = self.store.release(&name, &version)? else {
                continue;
            };
            let blobs = rec
                .jobs
                .iter()
                .map(|j| j.sha256.clone())
                .chain(rec.packages.iter().map(|p| p.sha256.clone()));
            if releases.contains(&(name, version)) {
                freed.extend(blobs);
            } else {
                kept_fingerprints.extend(rec.packages.iter().map(|p| p.fingerprint.clone()));
                kept_blobs.extend(blobs);
            }
        }
        let kept_stemcells: BTreeSet<String> = all_stemcells
            .iter()
            .filter(|s| !stemcells.contains(s))
            .map(desired::stemcell_key)
            .collect();
        let mut compiled = Vec::new();
        for c in self.store.compiled_packages()? {
            let needed =
                kept_fingerprints.contains(&c.fingerprint) && kept_stemcells.contains(&c.stemcell);
            if needed || kept_blobs.contains(&c.sha256) {
                kept_blobs.insert(c.sha256.clone());
            } else {
                freed.insert(c.sha256.clone());
                compiled.push(c);
            }
        }
        let blobs: Vec<String> = freed
            .into_iter()
            .filter(|b| !kept_blobs.contains(b) && self.store.blobs().has(b))
            .collect();
        let bytes = blobs
            .iter()
            .filter_map(|b| std::fs::metadata(self.store.blobs().path(b)).ok())
            .map(|m| m.len())
            .sum();
        Ok(CleanUpPlan {
            releases,
            stemcells,
            compiled_packages: compiled,
            blobs,
            bytes,
        })
    }

    /// Carry out `clean-up`: plan again while every deployment is locked (no
    /// deploy can start using what goes), then delete stemcells through
    /// their CPIs, the records, and last the blobs. A stemcell whose CPI
    /// fails or is not configured is kept and reported.
    pub async fn clean_up(&self, keep: usize) -> Result<(CleanUpPlan, Vec<String>), OpError> {
        let names: Vec<String> = self
            .store
            .deployments()?
            .into_iter()
            .map(|d| d.name)
            .collect();
        let _locks = names
            .iter()
            .map(|n| self.store.lock_deployment(n))
            .collect::<Result<Vec<_>, _>>()?;
        let mut plan = self.clean_up_plan(keep)?;
        let mut problems = Vec::new();
        let mut gone = Vec::new();
        for s in std::mem::take(&mut plan.stemcells) {
            let what = format!(
                "stemcell {}/{} ({}) on CPI {}",
                s.name, s.version, s.os, s.cpi
            );
            let deleted = match self.cpis.get(&s.cpi) {
                Ok(cpi) => cpi
                    .delete_stemcell(&bosun_cpi::StemcellCid(s.cid.clone()))
                    .await
                    .map_err(|e| format!("deleting {what}: {e}")),
                Err(e) => Err(format!("deleting {what}: {e}")),
            };
            match deleted {
                Ok(()) => {
                    self.store.delete_stemcell(&s.cpi, &s.cid)?;
                    gone.push(s);
                }
                Err(e) => problems.push(e),
            }
        }
        plan.stemcells = gone;
        if !problems.is_empty() {
            // A stemcell kept keeps its compiled packages: plan those again.
            let again = self.clean_up_plan(keep)?;
            plan.compiled_packages = again.compiled_packages;
            plan.blobs = again.blobs;
            plan.bytes = again.bytes;
            plan.releases = again.releases;
        }
        for (name, version) in &plan.releases {
            self.store.delete_release(name, version)?;
        }
        for c in &plan.compiled_packages {
            self.store
                .delete_compiled_package(&c.fingerprint, &c.stemcell)?;
        }
        for b in &plan.blobs {
            if let Err(e) = self.store.blobs().delete(b) {
                problems.push(format!("deleting blob {b}: {e}"));
            }
        }
        let _ = self.store.add_event(
            &crate::state::Event::new("clean-up", "", None)
                .did(
                    "clean-up",
                    format!(
                        "{} releases, {} stemcells, {} compiled packages",
                        plan.releases.len(),
                        plan.stemcells.len(),
                        plan.compiled_packages.len()
                    ),
                )
                .result(if problems.is_empty() { "ok" } else { "partial" }),
        );
        Ok((plan, problems))
    }

    /// Recorded VMs their CPI says are gone. A CPI that cannot answer
    /// counts the VM as present (the update then reports the agent).
    async fn missing_vms(&self, instances: &[InstanceRecord]) -> BTreeSet<String> {
        let futs = instances
            .iter()
            .filter_map(|r| r.vm.as_ref())
            .map(|vm| async move {
                let cpi = self.cpis.get(&vm.cpi).ok()?;
                match cpi.has_vm(&bosun_cpi::VmCid(vm.cid.clone())).await {
                    Ok(false) => Some(vm.cid.clone()),
                    _ => None,
                }
            });
        futures_join_all(futs).await.into_iter().flatten().collect()
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

/// Whether `filter` (`GROUP`, `GROUP/ID` or `GROUP/INDEX`) names this instance.
/// The record of `manifest` (its interpolated `text`) deployed as `plan` resolved it.
fn deployment_record(manifest: &Manifest, text: String, plan: &Plan) -> DeploymentRecord {
    DeploymentRecord {
        name: manifest.name.clone(),
        manifest: text,
        releases: manifest.releases.iter().map(|r| r.name.clone()).collect(),
        stemcells: manifest.stemcells.iter().map(|s| s.alias.clone()).collect(),
        updated_at: crate::state::now(),
        uses: Some(plan.uses.clone()),
    }
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
        (None, _) if r.state == crate::state::InstanceState::Errand => "errand".to_string(),
        (None, _) if r.state == crate::state::InstanceState::Detached => "detached".to_string(),
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

/// Progress nobody watches.
struct QuietProgress;

impl Progress for QuietProgress {
    fn stage(&self, _: &str, _: &str) {}
}

struct ReportProgress(Arc<dyn Report>);

impl Progress for ReportProgress {
    fn stage(&self, subject: &str, stage: &str) {
        self.0.stage(subject, stage);
    }
}

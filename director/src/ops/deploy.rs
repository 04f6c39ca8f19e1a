//! `deploy` and `delete-deployment`: staging a manifest's local inputs,
//! interpolating, planning (prepare) and carrying the plan out (apply).
//!
//! This module must not print or read the terminal: the caller shows the
//! prepared diff and plan and decides whether to apply.

use super::*;

impl Director {
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

    /// The manifest with its own addons and the runtime-config's placed.
    fn with_addons(&self, manifest: &Manifest) -> Result<Manifest, OpError> {
        let mut m = manifest.clone();
        let own = std::mem::take(&mut m.addons);
        crate::plan::addons::apply(&mut m, &own, &[], &manifest.source)?;
        if let Some((id, text, base)) = self.store.runtime_config()? {
            let rc = crate::model::addons::parse_runtime_config(
                &format!("runtime-config #{id}"),
                &text,
                &base,
            )?;
            crate::plan::addons::apply(&mut m, &rc.addons, &rc.releases, &rc.source)?;
        }
        Ok(m)
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
    ) -> Result<(Manifest, String, Option<crate::store::DeploymentLock>), OpError> {
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
                        OpError::Stemcell(format!(
                            "reading variable {}: {e}",
                            r.name,
                            e = Chain(&e)
                        ))
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

    /// Stage a manifest's local inputs: create and upload its `path:`
    /// releases and register the local stemcell. With `persist` false (a
    /// dry run) nothing is stored: releases are read, and what would be
    /// staged is only reported. Returns the manifest's releases found so
    /// far and the problems met on the way (reported with the rest).
    pub(crate) async fn stage_inputs(
        &self,
        manifest: &Manifest,
        persist: bool,
        report: &dyn Report,
    ) -> Result<Staged, OpError> {
        let mut staged = Staged {
            stemcells: self.store.stemcells()?,
            ..Staged::default()
        };
        if let Some(rec) = self.ensure_local_stemcell(persist).await? {
            let what = format!("local stemcell {}/{}", rec.name, rec.version);
            if !persist {
                report.notice(&format!("Would register the {what} (dry run)"));
            }
            staged.actions.push(what);
            staged.stemcells.push(rec);
        }
        for (i, r) in manifest.releases.iter().enumerate() {
            let found = match &r.path {
                Some(p) => self.stage_release(manifest, i, p, persist, report, &mut staged)?,
                None => self.store.release(&r.name, &r.version)?,
            };
            match found {
                Some(rec) if rec.name() == r.name => {
                    staged.releases.insert(r.name.clone(), rec);
                }
                Some(rec) => staged.problems.push(manifest.source.problem(
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
        Ok(staged)
    }

    /// One `path:` release of the manifest (index `i`): created from its
    /// directory and uploaded when `persist`, else only read.
    fn stage_release(
        &self,
        manifest: &Manifest,
        i: usize,
        path: &Path,
        persist: bool,
        report: &dyn Report,
        staged: &mut Staged,
    ) -> Result<Option<ReleaseRecord>, OpError> {
        let r = &manifest.releases[i];
        let version = (r.version != "latest").then_some(r.version.as_str());
        let found = if persist {
            self.upload_release(path, version)
        } else {
            // A dry run stores nothing.
            release::read_release_in(path, version, None, self.blobstores.as_ref())
                .map_err(OpError::from)
                .and_then(|rel| {
                    let known = self
                        .store
                        .release(&rel.manifest.name, &rel.manifest.version)?;
                    let new = known.is_none_or(|k| k.manifest != rel.manifest);
                    Ok((ReleaseRecord::from_release(&rel), new, rel.warnings))
                })
        };
        match found {
            Ok((rec, new, warnings)) => {
                for w in &warnings {
                    report.notice(&format!("Warning: release '{}': {w}", r.name));
                }
                if new {
                    let what = format!(
                        "release {}/{} from {}",
                        rec.name(),
                        rec.version(),
                        path.display()
                    );
                    report.notice(&match persist {
                        true => format!("Uploaded {what}"),
                        false => format!("Would upload {what} (dry run)"),
                    });
                    staged.actions.push(what);
                }
                Ok(Some(rec))
            }
            Err(e) => {
                staged.problems.push(manifest.source.problem(
                    format!("releases[{i}].path"),
                    format!("release '{}': {e}", r.name, e = Chain(&e)),
                ));
                Ok(None)
            }
        }
    }

    /// Validate, resolve the desired state from the staged releases and
    /// stemcells, and plan. With `persist`, the plan's IPs are reserved
    /// under the director-wide IP lock.
    pub(crate) async fn plan_manifest(
        &self,
        manifest: &Manifest,
        cc: &CloudConfig,
        staged: Staged,
        persist: bool,
    ) -> Result<Plan, OpError> {
        // Every problem at once: cloud-config checks, releases, jobs, links.
        let mut problems = match crate::plan::validate::validate_manifest(manifest, cc) {
            Ok(()) => Problems::default(),
            Err(p) => p,
        };
        problems.extend(staged.problems);
        let desired = match desired::resolve(manifest, cc, &staged.releases, &staged.stemcells) {
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
        let actual = self.actual(&manifest.name, &desired).await?;
        let plan = planner::plan(&desired, &actual, &mut || uuid::Uuid::new_v4().to_string())?;
        if ip_lock.is_some() {
            self.store.reserve_ips(&manifest.name, &plan.ips())?;
        }
        drop(ip_lock);
        Ok(plan)
    }

    /// The recorded state the planner compares `desired` with: this
    /// deployment's instances, the IPs other deployments hold or reserved,
    /// the packages already compiled and the VMs their CPI lost.
    async fn actual(&self, name: &str, desired: &desired::DesiredState) -> Result<Actual, OpError> {
        let mine = self.store.instances(name)?;
        let others_recorded = self
            .store
            .all_instances()?
            .into_iter()
            .filter(|i| i.deployment != name)
            .flat_map(|i| i.networks.into_iter().map(|(n, s)| (n, s.ip)));
        let others_reserved = self
            .store
            .ip_reservations()?
            .into_iter()
            .filter(|(_, _, d)| d != name)
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
        super::export::check_compilable(&self.store, &desired.packages, &compiled)?;
        let missing_vms = self.missing_vms(&mine).await;
        Ok(Actual {
            instances: mine,
            reserved_ips,
            compiled,
            missing_vms,
        })
    }

    /// The first half of `deploy`: interpolate, stage inputs, diff and plan
    /// under the deployment lock. Nothing happens to any VM; the caller
    /// shows the diff and plan and then calls [`Director::apply`] (or
    /// [`Director::cancel`]). The lock is held by the returned value.
    pub async fn prepare(
        &self,
        manifest_path: &Path,
        opts: &DeployOptions,
        report: &dyn Report,
    ) -> Result<Prepared, OpError> {
        let started = Instant::now();
        let (manifest, text, held) =
            self.load_interpolated(manifest_path, &opts.interpolate, !opts.dry_run)?;
        // Plan under the lock, so the plan shown is the one carried out
        // (variables were generated under it too).
        let lock = match held {
            Some(l) => Some(l),
            None if opts.dry_run => None,
            None => Some(self.store.lock_deployment(&manifest.name)?),
        };
        let cc = self.cloud_config(report)?;
        let planned = self.with_addons(&manifest)?;
        let mut staged = self.stage_inputs(&planned, !opts.dry_run, report).await?;
        let staged_actions = std::mem::take(&mut staged.actions);
        let plan = self
            .plan_manifest(&planned, &cc, staged, !opts.dry_run)
            .await?;
        let deployed = self
            .store
            .deployment(&manifest.name)?
            .map(|d| d.manifest)
            .unwrap_or_default();
        let diff = crate::plan::diff::diff_lines(&deployed, &text, 3);
        Ok(Prepared {
            manifest,
            text,
            diff,
            plan,
            staged: staged_actions,
            dry_run: opts.dry_run,
            started,
            _lock: lock,
        })
    }

    /// The second half of `deploy`: carry out a prepared plan. A dry run or
    /// an empty plan touches no VM (a changed manifest is still recorded
    /// as the one deployed).
    pub async fn apply(
        &self,
        prepared: Prepared,
        report: Arc<dyn Report>,
    ) -> Result<DeployOutcome, OpError> {
        let Prepared {
            manifest,
            text,
            diff,
            plan,
            staged,
            dry_run,
            started,
            _lock,
        } = prepared;
        let name = manifest.name.clone();
        if dry_run || plan.is_empty() {
            if !dry_run {
                self.store.release_ips(&name)?;
                // Nothing to do on any VM, but a changed manifest (update
                // or health settings, restart_policy) is the one deployed now.
                if !diff.is_empty() && self.store.deployment(&name)?.is_some() {
                    self.store
                        .save_deployment(&deployment_record(&manifest, text, &plan))?;
                }
            }
            return Ok(DeployOutcome {
                diff,
                plan,
                staged,
                summary: None,
                elapsed: started.elapsed(),
            });
        }
        self.store
            .save_deployment(&deployment_record(&manifest, text, &plan))?;
        let progress: Arc<dyn Progress> = Arc::new(ReportProgress(report.clone()));
        let executed = self.executor(progress).execute(&plan).await;
        // Whatever happened, the instances now record the IPs they hold;
        // the compilation workers' are free again. (A crash keeps the
        // reservation until the next deploy or delete of this deployment.)
        let released = self.store.release_ips(&name);
        let summary = executed?;
        released?;
        Ok(DeployOutcome {
            diff,
            plan,
            staged,
            summary: Some(summary),
            elapsed: started.elapsed(),
        })
    }

    /// Give up a prepared deploy (the operator said no): its reserved IPs
    /// are free again and its lock is released.
    pub fn cancel(&self, prepared: Prepared) -> Result<(), OpError> {
        if !prepared.dry_run {
            self.store.release_ips(&prepared.manifest.name)?;
        }
        Ok(())
    }

    /// `deploy` without a question in between: prepare, then apply.
    pub async fn deploy(
        &self,
        manifest_path: &Path,
        opts: &DeployOptions,
        report: Arc<dyn Report>,
    ) -> Result<DeployOutcome, OpError> {
        let prepared = self.prepare(manifest_path, opts, report.as_ref()).await?;
        self.apply(prepared, report).await
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
                .map_err(|e| be(format!("reading variable {name}: {e}", e = Chain(&e)))),
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
            .map_err(|e| be(format!("storing variable {name}: {e}", e = Chain(&e))))?;
        let rec = crate::store::VariableRecord {
            deployment: self.deployment.clone(),
            name: name.to_string(),
            id: uuid::Uuid::new_v4().to_string(),
            kind: self.kinds.get(name).cloned().unwrap_or_default(),
            definition_digest: definition_digest.to_string(),
            created_at: crate::store::now(),
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
    /// The inputs staged (or, in a dry run, that would be).
    pub staged: Vec<String>,
    pub summary: Option<ExecSummary>,
    pub elapsed: Duration,
}

/// The record of `manifest` (its interpolated `text`) deployed as `plan` resolved it.
fn deployment_record(manifest: &Manifest, text: String, plan: &Plan) -> DeploymentRecord {
    DeploymentRecord {
        name: manifest.name.clone(),
        manifest: text,
        releases: manifest.releases.iter().map(|r| r.name.clone()).collect(),
        stemcells: manifest.stemcells.iter().map(|s| s.alias.clone()).collect(),
        updated_at: crate::store::now(),
        uses: Some(plan.uses.clone()),
    }
}

/// A deploy planned and not yet carried out: what `prepare` found. It holds
/// the deployment lock until it is applied or dropped.
pub struct Prepared {
    manifest: Manifest,
    text: String,
    diff: Vec<Vec<DiffLine>>,
    plan: Plan,
    staged: Vec<String>,
    dry_run: bool,
    started: Instant,
    _lock: Option<crate::store::DeploymentLock>,
}

impl Prepared {
    /// The manifest against the one deployed last (placeholders, not values).
    pub fn diff(&self) -> &[Vec<DiffLine>] {
        &self.diff
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    /// The inputs staged (or, in a dry run, that would be).
    pub fn staged(&self) -> &[String] {
        &self.staged
    }
    /// Whether applying changes anything on a VM, so an operator should be
    /// asked first.
    pub fn changes_vms(&self) -> bool {
        !self.dry_run && !self.plan.is_empty()
    }
}

/// What staging a manifest's inputs found.
#[derive(Default)]
pub(crate) struct Staged {
    /// The manifest's releases by name.
    pub releases: BTreeMap<String, ReleaseRecord>,
    /// Every stemcell, the one staged included.
    pub stemcells: Vec<StemcellRecord>,
    /// What was (or, in a dry run, would be) staged, e.g.
    /// `release kv/1 from ./releases/kv`.
    pub actions: Vec<String>,
    pub problems: Problems,
}

//! `clean-up` (unused releases, stemcells, compiled packages and their blobs)
//! and the orphaned disks operators attach back or delete.
//!
//! Operations only: what a VM or disk change does is the executor's; this
//! module must not print or read the terminal.

use super::*;

/// A command's run on one instance (`ssh -c`).
/// What `clean-up` deletes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CleanUpPlan {
    /// (name, version).
    pub releases: Vec<(String, String)>,
    pub stemcells: Vec<StemcellRecord>,
    pub compiled_packages: Vec<crate::store::CompiledPackage>,
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

impl Director {
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
        let iname = crate::execute::executor::instance_name(&rec);
        if rec.state != crate::store::InstanceState::Detached || rec.vm.is_some() {
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
            self.store.save_orphan_disk(&crate::store::OrphanDisk {
                cid: d.cid.clone(),
                cpi: d.cpi.clone(),
                size_mb: d.size_mb,
                deployment: rec.deployment.clone(),
                instance: format!("{}/{}", rec.group, rec.id),
                orphaned_at: crate::store::now(),
            })?;
        }
        rec.disk = Some(crate::store::DiskRecord {
            cid: orphan.cid.clone(),
            cpi: orphan.cpi.clone(),
            size_mb: orphan.size_mb,
            digest,
            attached: false,
        });
        self.store.save_instance(&rec)?;
        self.store.delete_orphan_disk(cid)?;
        self.store.record_event(
            &crate::store::Event::new("attach-disk", name, Some(&iname))
                .did("attach-disk", format!("disk {cid}"))
                .result(match &previous {
                    Some(d) => format!("ok; disk {} orphaned", d.cid),
                    None => "ok".into(),
                }),
        );
        Ok(previous.map(|d| d.cid))
    }

    /// `delete-disk`: delete an orphaned disk through its CPI and forget it.
    pub async fn delete_orphan_disk(&self, cid: &str) -> Result<crate::store::OrphanDisk, OpError> {
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
        self.store.record_event(
            &crate::store::Event::new("delete-disk", &d.deployment, Some(&d.instance))
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
        let mut sourceless: BTreeSet<String> = BTreeSet::new();
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
                kept_fingerprints.extend(
                    rec.packages
                        .iter()
                        .filter_map(|p| rec.compile_key(&p.spec.name)),
                );
                // A package of a compiled release has no source: its
                // compiled builds are all there is, whatever the stemcell.
                sourceless.extend(
                    rec.packages
                        .iter()
                        .filter(|p| p.sha256.is_empty())
                        .filter_map(|p| rec.compile_key(&p.spec.name)),
                );
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
            let needed = sourceless.contains(&c.fingerprint)
                || kept_fingerprints.contains(&c.fingerprint)
                    && kept_stemcells.contains(&c.stemcell);
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
                    .map_err(|e| format!("deleting {what}: {e}", e = Chain(&e))),
                Err(e) => Err(format!("deleting {what}: {e}", e = Chain(&e))),
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
                problems.push(format!("deleting blob {b}: {e}", e = Chain(&e)));
            }
        }
        self.store.record_event(
            &crate::store::Event::new("clean-up", "", None)
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
}

//! The conformance suite every CPI backend runs in its own tests.
//!
//! [`run`] drives a backend through the whole CPI contract: info, stemcell,
//! VM and disk lifecycles (with `find_vms` / `find_disks` by metadata),
//! attach/detach across two VMs, not-found errors, idempotent deletes and
//! snapshots. It never panics on CPI errors: every
//! failed check becomes one line of the returned list, and every resource the
//! suite created is deleted at the end, even when a check failed.

use std::collections::BTreeSet;

use crate::{
    metadata_matches, CpiError, CreateDiskRequest, CreateVmRequest, DiskCid, Metadata, SnapshotCid,
    StemcellCid, StemcellSpec, VmCid,
};

/// Builds the create_vm request for the n-th test VM given the stemcell cid.
pub type VmRequestFn = dyn Fn(usize, &StemcellCid) -> CreateVmRequest + Send + Sync;

/// A create_vm request for a VM at `ip` on one manual network `range`
/// (netmask from the range), with the given keys, listening on
/// [`crate::AGENT_PORT`], tagged `token=<agent_id>`: what tests and
/// benchmarks of a backend create.
pub fn manual_vm_request(
    agent_id: &str,
    stemcell: &StemcellCid,
    ip: &str,
    range: &str,
    director_public_key: &str,
    host_private_key: &str,
) -> CreateVmRequest {
    let prefix = range
        .rsplit_once('/')
        .and_then(|(_, p)| p.parse::<u32>().ok())
        .unwrap_or(32)
        .min(32);
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let net = crate::NetworkSettings {
        kind: crate::NetworkKind::Manual,
        ip: ip.to_string(),
        netmask: std::net::Ipv4Addr::from(mask).to_string(),
        range: range.to_string(),
        gateway: None,
        dns: vec![],
        default: vec!["dns".into(), "gateway".into()],
        cloud_properties: serde_json::json!({}),
    };
    let networks = std::collections::BTreeMap::from([("default".to_string(), net)]);
    CreateVmRequest {
        agent_id: agent_id.to_string(),
        stemcell: stemcell.clone(),
        cloud_properties: serde_json::json!({}),
        networks: networks.clone(),
        disk_cids: vec![],
        settings: crate::AgentSettings {
            agent_id: agent_id.to_string(),
            director_public_key: director_public_key.to_string(),
            host_private_key: host_private_key.to_string(),
            listen_ip: ip.to_string(),
            listen_port: crate::AGENT_PORT,
            networks,
            disks: Default::default(),
            env: serde_json::json!({}),
        },
        metadata: filter1("token", agent_id),
    }
}

/// What a backend's test supplies.
pub struct Fixture {
    pub stemcell: StemcellSpec,
    /// Builds the create_vm request for the n-th test VM (distinct IPs, settings, metadata with a unique `token`).
    pub vm_request: Box<VmRequestFn>,
    pub disk_size_mb: u64,
}

/// Runs every check, returns Ok or the list of failed checks with reasons (never panics on CPI errors).
pub async fn run<C: crate::Cpi + ?Sized>(cpi: &C, fixture: &Fixture) -> Result<(), Vec<String>> {
    let mut suite = Suite {
        cpi,
        fixture,
        token: format!("conformance-{}", uuid::Uuid::new_v4()),
        failures: Vec::new(),
        stemcells: Vec::new(),
        vms: Vec::new(),
        disks: Vec::new(),
        snapshots: Vec::new(),
        attachments: BTreeSet::new(),
    };

    let r = suite.check_info().await;
    suite.record("info", r);
    let r = suite.check_unknown_vm().await;
    suite.record("has_vm of an unknown cid", r);
    let r = suite.check_stemcell().await;
    suite.record("stemcell lifecycle", r);
    let r = suite.check_vm_lifecycle().await;
    suite.record("VM lifecycle", r);
    let r = suite.check_disk_lifecycle().await;
    suite.record("disk lifecycle", r);
    let r = suite.check_attach().await;
    suite.record("attach/detach across VMs", r);

    suite.cleanup().await;
    if suite.failures.is_empty() {
        Ok(())
    } else {
        Err(suite.failures)
    }
}

type CheckResult = Result<(), String>;

struct Suite<'a, C: crate::Cpi + ?Sized> {
    cpi: &'a C,
    fixture: &'a Fixture,
    /// Put on every disk and snapshot the suite creates, so orphans can be found.
    token: String,
    failures: Vec<String>,
    stemcells: Vec<StemcellCid>,
    vms: Vec<VmCid>,
    disks: Vec<DiskCid>,
    snapshots: Vec<SnapshotCid>,
    attachments: BTreeSet<(VmCid, DiskCid)>,
}

/// Turns a CPI error into a check failure naming the call.
fn call<T>(what: impl std::fmt::Display, r: Result<T, CpiError>) -> Result<T, String> {
    r.map_err(|e| format!("{what} failed: {e}"))
}

fn expect(cond: bool, message: impl FnOnce() -> String) -> CheckResult {
    if cond {
        Ok(())
    } else {
        Err(message())
    }
}

/// A one-entry filter.
fn filter1(key: &str, value: &str) -> Metadata {
    Metadata::from([(key.to_string(), value.to_string())])
}

/// `a` with every entry of `b` set (what set_*_metadata does).
fn merged(a: &Metadata, b: &Metadata) -> Metadata {
    let mut m = a.clone();
    m.extend(b.iter().map(|(k, v)| (k.clone(), v.clone())));
    m
}

/// A find_vms / find_disks result: sorted by cid, no cid twice, and every
/// entry's metadata matches the filter it was asked with.
fn expect_well_formed<T: Ord + std::fmt::Display>(
    what: &str,
    filter: &Metadata,
    found: &[(T, Metadata)],
) -> CheckResult {
    expect(found.windows(2).all(|w| w[0].0 < w[1].0), || {
        let cids: Vec<String> = found.iter().map(|(c, _)| c.to_string()).collect();
        format!("{what} is not sorted by cid (or lists a cid twice): {cids:?}")
    })?;
    match found.iter().find(|(_, m)| !metadata_matches(m, filter)) {
        Some((cid, m)) => Err(format!(
            "{what} lists {cid} whose metadata {m:?} does not match the filter"
        )),
        None => Ok(()),
    }
}

/// `found` lists exactly `cid`, with metadata containing every entry of `want`.
fn expect_only<T: Ord + std::fmt::Display + std::fmt::Debug>(
    what: &str,
    found: &[(T, Metadata)],
    cid: &T,
    want: &Metadata,
) -> CheckResult {
    let cids: Vec<&T> = found.iter().map(|(c, _)| c).collect();
    expect(cids == [cid], || {
        format!("{what} returned {cids:?}, want exactly [{cid}]")
    })?;
    expect_listed(what, found, cid, want)
}

/// `found` lists `cid`, with metadata containing every entry of `want`.
fn expect_listed<T: Ord + std::fmt::Display>(
    what: &str,
    found: &[(T, Metadata)],
    cid: &T,
    want: &Metadata,
) -> CheckResult {
    match found.iter().find(|(c, _)| c == cid) {
        None => Err(format!("{what} does not list {cid}")),
        Some((_, m)) => expect(metadata_matches(m, want), || {
            format!("{what} lists {cid} with metadata {m:?}, want every entry of {want:?}")
        }),
    }
}

fn expect_not_listed<T: Ord + std::fmt::Display>(
    what: &str,
    found: &[(T, Metadata)],
    cid: &T,
) -> CheckResult {
    expect(!found.iter().any(|(c, _)| c == cid), || {
        format!("{what} still lists {cid}")
    })
}

impl<'a, C: crate::Cpi + ?Sized> Suite<'a, C> {
    fn record(&mut self, check: &str, result: CheckResult) {
        if let Err(reason) = result {
            self.failures.push(format!("{check}: {reason}"));
        }
    }

    fn metadata(&self, purpose: &str) -> Metadata {
        let mut m = Metadata::new();
        m.insert("token".into(), self.token.clone());
        m.insert("name".into(), format!("conformance-{purpose}"));
        m
    }

    async fn check_info(&mut self) -> CheckResult {
        let info = call("info()", self.cpi.info().await)?;
        expect(!info.name.trim().is_empty(), || {
            "info().name is empty".to_string()
        })?;
        expect(info.api_version >= 1, || {
            format!("info().api_version is {}", info.api_version)
        })?;
        expect(!info.stemcell_formats.is_empty(), || {
            "info().stemcell_formats is empty".to_string()
        })?;
        expect(
            info.stemcell_formats.iter().all(|f| !f.trim().is_empty()),
            || {
                format!(
                    "info().stemcell_formats has an empty entry: {:?}",
                    info.stemcell_formats
                )
            },
        )
    }

    async fn check_unknown_vm(&mut self) -> CheckResult {
        let cid = VmCid(format!("vm-conformance-unknown-{}", uuid::Uuid::new_v4()));
        let found = call(format!("has_vm({cid})"), self.cpi.has_vm(&cid).await)?;
        expect(!found, || {
            format!("has_vm({cid}) of a never-created VM returned true")
        })
    }

    /// Creates the stemcell every VM check uses, or returns the one already made.
    async fn stemcell(&mut self) -> Result<StemcellCid, String> {
        if let Some(cid) = self.stemcells.first() {
            return Ok(cid.clone());
        }
        let cid = call(
            "create_stemcell",
            self.cpi.create_stemcell(&self.fixture.stemcell).await,
        )?;
        self.stemcells.push(cid.clone());
        Ok(cid)
    }

    /// A stemcell of its own (not the shared one): create, delete, delete again.
    async fn check_stemcell(&mut self) -> CheckResult {
        let cid = call(
            "create_stemcell",
            self.cpi.create_stemcell(&self.fixture.stemcell).await,
        )?;
        expect(!cid.0.is_empty(), || {
            "create_stemcell returned an empty cid".to_string()
        })?;
        let shared = self.stemcells.contains(&cid);
        if !shared {
            self.stemcells.push(cid.clone());
        }
        call(
            format!("delete_stemcell({cid})"),
            self.cpi.delete_stemcell(&cid).await,
        )?;
        if !shared {
            self.stemcells.retain(|c| c != &cid);
        }
        call(
            format!("delete_stemcell({cid}) of a deleted stemcell"),
            self.cpi.delete_stemcell(&cid).await,
        )
    }

    async fn create_vm(&mut self, n: usize) -> Result<VmCid, String> {
        self.create_vm_with_metadata(n).await.map(|(cid, _)| cid)
    }

    /// Creates the n-th VM; returns its cid and the metadata it was created
    /// with, which always has a `token` (the suite's own, suffixed, when the
    /// fixture's request has none).
    async fn create_vm_with_metadata(&mut self, n: usize) -> Result<(VmCid, Metadata), String> {
        let stemcell = self.stemcell().await?;
        let mut req = (self.fixture.vm_request)(n, &stemcell);
        req.metadata
            .entry("token".into())
            .or_insert_with(|| format!("{}-vm-{n}", self.token));
        let cid = call(format!("create_vm(#{n})"), self.cpi.create_vm(&req).await)?;
        self.vms.push(cid.clone());
        expect(!cid.0.is_empty(), || {
            format!("create_vm(#{n}) returned an empty cid")
        })?;
        Ok((cid, req.metadata))
    }

    /// Calls find_vms; returns what it says it called too (for messages).
    async fn find_vms(
        &self,
        filter: &Metadata,
        when: &str,
    ) -> Result<(String, Vec<(VmCid, Metadata)>), String> {
        let what = format!("find_vms({filter:?}) {when}");
        let found = call(&what, self.cpi.find_vms(filter).await)?;
        expect_well_formed(&what, filter, &found)?;
        Ok((what, found))
    }

    async fn find_disks(
        &self,
        filter: &Metadata,
        when: &str,
    ) -> Result<(String, Vec<(DiskCid, Metadata)>), String> {
        let what = format!("find_disks({filter:?}) {when}");
        let found = call(&what, self.cpi.find_disks(filter).await)?;
        expect_well_formed(&what, filter, &found)?;
        Ok((what, found))
    }

    /// A token value no resource has.
    fn nobody(&self) -> String {
        format!("{}-nobody-{}", self.token, uuid::Uuid::new_v4())
    }

    async fn has_vm(&self, cid: &VmCid, want: bool, when: &str) -> CheckResult {
        let found = call(format!("has_vm({cid}) {when}"), self.cpi.has_vm(cid).await)?;
        expect(found == want, || {
            format!("has_vm({cid}) {when} returned {found}")
        })
    }

    async fn check_vm_lifecycle(&mut self) -> CheckResult {
        let (vm, created) = self.create_vm_with_metadata(0).await?;
        self.has_vm(&vm, true, "after create_vm").await?;
        let token = created.get("token").cloned().unwrap_or_default();

        // Found by its token, with the metadata it was created with.
        let when = "after create_vm";
        let (what, found) = self.find_vms(&filter1("token", &token), when).await?;
        expect_only(&what, &found, &vm, &created)?;
        let (what, found) = self.find_vms(&created, when).await?;
        expect_only(&what, &found, &vm, &created)?;
        let (what, found) = self.find_vms(&Metadata::new(), when).await?;
        expect_listed(&what, &found, &vm, &created)?;
        // Every entry of the filter must match.
        let nobody = self.nobody();
        let (what, found) = self.find_vms(&filter1("token", &nobody), when).await?;
        expect(found.is_empty(), || format!("{what} returned {found:?}"))?;
        let mut partly = filter1("token", &token);
        partly.insert("name".into(), nobody);
        let (what, found) = self.find_vms(&partly, when).await?;
        expect(found.is_empty(), || format!("{what} returned {found:?}"))?;

        let mut meta = self.metadata("vm-lifecycle");
        meta.insert("instance".into(), "conformance/0".into());
        call(
            format!("set_vm_metadata({vm})"),
            self.cpi.set_vm_metadata(&vm, &meta).await,
        )?;
        // Found by the metadata as last set (the suite's token replaced the
        // request's), merged with what it was created with.
        let when = "after set_vm_metadata";
        let want = merged(&created, &meta);
        let mut by_new = filter1("token", &self.token);
        by_new.insert("instance".into(), "conformance/0".into());
        let (what, found) = self.find_vms(&by_new, when).await?;
        expect_only(&what, &found, &vm, &want)?;
        if token != self.token {
            let (what, found) = self.find_vms(&filter1("token", &token), when).await?;
            expect_not_listed(&what, &found, &vm)?;
        }

        call(format!("reboot_vm({vm})"), self.cpi.reboot_vm(&vm).await)?;
        self.has_vm(&vm, true, "after reboot_vm").await?;
        call(format!("delete_vm({vm})"), self.cpi.delete_vm(&vm).await)?;
        self.vms.retain(|c| c != &vm);
        self.has_vm(&vm, false, "after delete_vm").await?;
        let (what, found) = self
            .find_vms(&filter1("token", &self.token), "after delete_vm")
            .await?;
        expect_not_listed(&what, &found, &vm)?;
        call(
            format!("delete_vm({vm}) of a deleted VM"),
            self.cpi.delete_vm(&vm).await,
        )
    }

    async fn create_disk(&mut self, vm_locality: Option<VmCid>) -> Result<DiskCid, String> {
        self.create_disk_with_metadata(vm_locality)
            .await
            .map(|(cid, _)| cid)
    }

    /// Creates a disk tagged with the suite's token; returns its cid and the
    /// metadata it was created with.
    async fn create_disk_with_metadata(
        &mut self,
        vm_locality: Option<VmCid>,
    ) -> Result<(DiskCid, Metadata), String> {
        let req = CreateDiskRequest {
            size_mb: self.fixture.disk_size_mb,
            cloud_properties: serde_json::json!({}),
            vm_locality,
            metadata: self.metadata("disk"),
        };
        let cid = call("create_disk", self.cpi.create_disk(&req).await)?;
        self.disks.push(cid.clone());
        expect(!cid.0.is_empty(), || {
            "create_disk returned an empty cid".to_string()
        })?;
        Ok((cid, req.metadata))
    }

    async fn has_disk(&self, cid: &DiskCid, want: bool, when: &str) -> CheckResult {
        let found = call(
            format!("has_disk({cid}) {when}"),
            self.cpi.has_disk(cid).await,
        )?;
        expect(found == want, || {
            format!("has_disk({cid}) {when} returned {found}")
        })
    }

    async fn check_disk_lifecycle(&mut self) -> CheckResult {
        // The suite's first disk: the only one with its token.
        let (disk, created) = self.create_disk_with_metadata(None).await?;
        self.has_disk(&disk, true, "after create_disk").await?;

        let when = "after create_disk";
        let by_token = filter1("token", &self.token);
        let (what, found) = self.find_disks(&by_token, when).await?;
        expect_only(&what, &found, &disk, &created)?;
        let (what, found) = self.find_disks(&created, when).await?;
        expect_only(&what, &found, &disk, &created)?;
        let (what, found) = self.find_disks(&Metadata::new(), when).await?;
        expect_listed(&what, &found, &disk, &created)?;
        let nobody = self.nobody();
        let (what, found) = self.find_disks(&filter1("token", &nobody), when).await?;
        expect(found.is_empty(), || format!("{what} returned {found:?}"))?;
        let mut partly = by_token.clone();
        partly.insert("name".into(), nobody);
        let (what, found) = self.find_disks(&partly, when).await?;
        expect(found.is_empty(), || format!("{what} returned {found:?}"))?;

        let mut meta = self.metadata("disk-lifecycle");
        meta.insert("deployment".into(), "conformance".into());
        call(
            format!("set_disk_metadata({disk})"),
            self.cpi.set_disk_metadata(&disk, &meta).await,
        )?;
        let mut by_new = by_token.clone();
        by_new.insert("deployment".into(), "conformance".into());
        let (what, found) = self.find_disks(&by_new, "after set_disk_metadata").await?;
        expect_only(&what, &found, &disk, &merged(&created, &meta))?;
        let bigger = self.fixture.disk_size_mb.saturating_mul(2).max(1);
        call(
            format!("resize_disk({disk}, {bigger})"),
            self.cpi.resize_disk(&disk, bigger).await,
        )?;
        self.has_disk(&disk, true, "after resize_disk").await?;
        call(
            format!("delete_disk({disk})"),
            self.cpi.delete_disk(&disk).await,
        )?;
        self.disks.retain(|c| c != &disk);
        self.has_disk(&disk, false, "after delete_disk").await?;
        let (what, found) = self.find_disks(&by_token, "after delete_disk").await?;
        expect_not_listed(&what, &found, &disk)?;
        call(
            format!("delete_disk({disk}) of a deleted disk"),
            self.cpi.delete_disk(&disk).await,
        )
    }

    async fn attach(&mut self, vm: &VmCid, disk: &DiskCid) -> CheckResult {
        let r = self.cpi.attach_disk(vm, disk).await;
        // Recorded even on error: the cleanup detaches what may be attached.
        self.attachments.insert((vm.clone(), disk.clone()));
        call(format!("attach_disk({vm}, {disk})"), r).map(|_| ())
    }

    async fn detach(&mut self, vm: &VmCid, disk: &DiskCid) -> CheckResult {
        call(
            format!("detach_disk({vm}, {disk})"),
            self.cpi.detach_disk(vm, disk).await,
        )?;
        self.attachments.remove(&(vm.clone(), disk.clone()));
        Ok(())
    }

    async fn disks_of(&self, vm: &VmCid) -> Result<Vec<DiskCid>, String> {
        call(format!("get_disks({vm})"), self.cpi.get_disks(vm).await)
    }

    async fn check_attach(&mut self) -> CheckResult {
        let a = self.create_vm(1).await?;
        let b = self.create_vm(2).await?;
        let disk = self.create_disk(Some(a.clone())).await?;

        self.attach(&a, &disk).await?;
        let on_a = self.disks_of(&a).await?;
        expect(on_a.contains(&disk), || {
            format!("get_disks({a}) after attaching {disk} is {on_a:?}")
        })?;
        self.detach(&a, &disk).await?;

        self.attach(&b, &disk).await?;
        let on_b = self.disks_of(&b).await?;
        expect(on_b.contains(&disk), || {
            format!("get_disks({b}) after attaching {disk} is {on_b:?}")
        })?;
        let on_a = self.disks_of(&a).await?;
        expect(!on_a.contains(&disk), || {
            format!("get_disks({a}) still lists {disk} after it moved to {b}: {on_a:?}")
        })?;
        self.detach(&b, &disk).await?;

        let mut failures = Vec::new();
        let unknown_disk = DiskCid(format!("disk-conformance-unknown-{}", uuid::Uuid::new_v4()));
        match self.cpi.attach_disk(&a, &unknown_disk).await {
            Err(CpiError::DiskNotFound(_)) => {}
            Ok(hint) => {
                self.attachments.insert((a.clone(), unknown_disk.clone()));
                failures.push(format!(
                    "attach_disk({a}, {unknown_disk}) of an unknown disk succeeded ({hint:?}), want DiskNotFound"
                ));
            }
            Err(e) => failures.push(format!(
                "attach_disk({a}, {unknown_disk}) of an unknown disk: want DiskNotFound, got {e:?}"
            )),
        }
        let unknown_vm = VmCid(format!("vm-conformance-unknown-{}", uuid::Uuid::new_v4()));
        match self.cpi.attach_disk(&unknown_vm, &disk).await {
            Err(CpiError::VmNotFound(_)) => {}
            Ok(hint) => {
                self.attachments.insert((unknown_vm.clone(), disk.clone()));
                failures.push(format!(
                    "attach_disk({unknown_vm}, {disk}) to an unknown VM succeeded ({hint:?}), want VmNotFound"
                ));
            }
            Err(e) => failures.push(format!(
                "attach_disk({unknown_vm}, {disk}) to an unknown VM: want VmNotFound, got {e:?}"
            )),
        }

        if let Err(e) = self.check_snapshot(&disk).await {
            failures.push(e);
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }

    async fn check_snapshot(&mut self, disk: &DiskCid) -> CheckResult {
        let meta = self.metadata("snapshot");
        let snap = match self.cpi.snapshot_disk(disk, &meta).await {
            Ok(snap) => snap,
            Err(CpiError::NotSupported { .. }) => return Ok(()),
            Err(e) => return Err(format!("snapshot_disk({disk}) failed: {e}")),
        };
        self.snapshots.push(snap.clone());
        // A snapshot (tagged like the disk) is not a disk.
        let (what, found) = self
            .find_disks(&filter1("token", &self.token), "after snapshot_disk")
            .await?;
        expect_listed(&what, &found, disk, &Metadata::new())?;
        expect(!found.iter().any(|(c, _)| c.0 == snap.0), || {
            format!("{what} lists snapshot {snap}")
        })?;
        match self.cpi.delete_snapshot(&snap).await {
            Ok(()) | Err(CpiError::NotSupported { .. }) => {
                self.snapshots.retain(|s| s != &snap);
                Ok(())
            }
            Err(e) => Err(format!("delete_snapshot({snap}) failed: {e}")),
        }
    }

    /// Deletes everything still recorded, reporting each failure; ends with
    /// the shared stemcell, deleted twice (the second must succeed too).
    async fn cleanup(&mut self) {
        let mut failures = Vec::new();
        for (vm, disk) in std::mem::take(&mut self.attachments) {
            match self.cpi.detach_disk(&vm, &disk).await {
                Ok(()) | Err(CpiError::VmNotFound(_)) | Err(CpiError::DiskNotFound(_)) => {}
                Err(e) => failures.push(format!("detach_disk({vm}, {disk}) failed: {e}")),
            }
        }
        for snap in std::mem::take(&mut self.snapshots) {
            match self.cpi.delete_snapshot(&snap).await {
                Ok(()) | Err(CpiError::NotSupported { .. }) => {}
                Err(e) => failures.push(format!("delete_snapshot({snap}) failed: {e}")),
            }
        }
        for disk in std::mem::take(&mut self.disks) {
            if let Err(e) = self.cpi.delete_disk(&disk).await {
                failures.push(format!("delete_disk({disk}) failed: {e}"));
            }
        }
        for vm in std::mem::take(&mut self.vms) {
            if let Err(e) = self.cpi.delete_vm(&vm).await {
                failures.push(format!("delete_vm({vm}) failed: {e}"));
            }
        }
        for stemcell in std::mem::take(&mut self.stemcells) {
            if let Err(e) = self.cpi.delete_stemcell(&stemcell).await {
                failures.push(format!("delete_stemcell({stemcell}) failed: {e}"));
            } else if let Err(e) = self.cpi.delete_stemcell(&stemcell).await {
                failures.push(format!(
                    "delete_stemcell({stemcell}) of a deleted stemcell failed: {e}"
                ));
            }
        }
        self.failures
            .extend(failures.into_iter().map(|f| format!("cleanup: {f}")));
    }
}

#[cfg(test)]
mod tests {
    //! The suite against an in-memory CPI: a correct one passes, a broken one
    //! fails with named checks and is still cleaned up.
    use super::*;
    use crate::{
        AgentSettings, CpiInfo, CpiResult, DiskHint, Metadata as Meta, SnapshotCid, StemcellCid,
        VmCid,
    };
    use async_trait::async_trait;
    use std::collections::{BTreeMap, BTreeSet};
    use std::sync::Mutex;

    #[derive(Default)]
    struct State {
        n: u64,
        stemcells: BTreeSet<String>,
        vms: BTreeSet<String>,
        disks: BTreeMap<String, Option<String>>,
        snapshots: BTreeSet<String>,
        /// Metadata of every VM and disk, by cid.
        metadata: BTreeMap<String, Meta>,
        /// Metadata of deleted VMs and disks (only listed when `stale_find`).
        deleted: BTreeMap<String, Meta>,
    }

    #[derive(Default)]
    struct MemCpi {
        state: Mutex<State>,
        /// Breaks get_disks (always empty) to check that failures are reported.
        broken_get_disks: bool,
        /// Breaks find_vms / find_disks: they still list deleted resources.
        stale_find: bool,
    }

    impl MemCpi {
        fn st(&self) -> std::sync::MutexGuard<'_, State> {
            self.state.lock().unwrap()
        }
        fn next(&self, prefix: &str) -> String {
            let mut s = self.st();
            s.n += 1;
            format!("{prefix}-{}", s.n)
        }
        fn forget(&self, cid: &str) {
            let mut s = self.st();
            if let Some(m) = s.metadata.remove(cid) {
                s.deleted.insert(cid.to_string(), m);
            }
        }
        fn set_metadata(&self, cid: &str, m: &Meta) {
            let mut s = self.st();
            let entry = s.metadata.entry(cid.to_string()).or_default();
            entry.extend(m.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        fn find(&self, prefix: &str, filter: &Meta) -> Vec<(String, Meta)> {
            let s = self.st();
            let mut all: BTreeMap<String, Meta> = s.metadata.clone();
            if self.stale_find {
                all.extend(s.deleted.clone());
            }
            all.into_iter()
                .filter(|(cid, m)| cid.starts_with(prefix) && crate::metadata_matches(m, filter))
                .collect()
        }
    }

    #[async_trait]
    impl crate::Cpi for MemCpi {
        async fn info(&self) -> CpiResult<CpiInfo> {
            Ok(CpiInfo {
                name: "mem".into(),
                api_version: 2,
                stemcell_formats: vec!["mem".into()],
            })
        }
        async fn create_stemcell(&self, _spec: &StemcellSpec) -> CpiResult<StemcellCid> {
            let cid = self.next("sc");
            self.st().stemcells.insert(cid.clone());
            Ok(StemcellCid(cid))
        }
        async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
            self.st().stemcells.remove(&cid.0);
            Ok(())
        }
        async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
            if !self.st().stemcells.contains(&req.stemcell.0) {
                return Err(CpiError::StemcellNotFound(req.stemcell.clone()));
            }
            let cid = self.next("vm");
            self.st().vms.insert(cid.clone());
            self.set_metadata(&cid, &req.metadata);
            Ok(VmCid(cid))
        }
        async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
            self.forget(&cid.0);
            let mut s = self.st();
            s.vms.remove(&cid.0);
            for a in s.disks.values_mut() {
                if a.as_deref() == Some(cid.0.as_str()) {
                    *a = None;
                }
            }
            Ok(())
        }
        async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
            Ok(self.st().vms.contains(&cid.0))
        }
        async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
            if self.st().vms.contains(&cid.0) {
                Ok(())
            } else {
                Err(CpiError::VmNotFound(cid.clone()))
            }
        }
        async fn set_vm_metadata(&self, cid: &VmCid, m: &Meta) -> CpiResult<()> {
            self.reboot_vm(cid).await?;
            self.set_metadata(&cid.0, m);
            Ok(())
        }
        async fn find_vms(&self, filter: &Meta) -> CpiResult<Vec<(VmCid, Meta)>> {
            Ok(self
                .find("vm-", filter)
                .into_iter()
                .map(|(c, m)| (VmCid(c), m))
                .collect())
        }
        async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
            let cid = self.next("disk");
            self.st().disks.insert(cid.clone(), None);
            self.set_metadata(&cid, &req.metadata);
            Ok(DiskCid(cid))
        }
        async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
            let mut s = self.st();
            if let Some(Some(vm)) = s.disks.get(&cid.0) {
                return Err(CpiError::fatal(format!("{cid} attached to {vm}")));
            }
            s.disks.remove(&cid.0);
            drop(s);
            self.forget(&cid.0);
            Ok(())
        }
        async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
            let mut s = self.st();
            if !s.vms.contains(&vm.0) {
                return Err(CpiError::VmNotFound(vm.clone()));
            }
            match s.disks.get_mut(&disk.0) {
                None => Err(CpiError::DiskNotFound(disk.clone())),
                Some(a) => {
                    *a = Some(vm.0.clone());
                    Ok(DiskHint {
                        path: disk.0.clone(),
                    })
                }
            }
        }
        async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
            let mut s = self.st();
            if !s.vms.contains(&vm.0) {
                return Err(CpiError::VmNotFound(vm.clone()));
            }
            match s.disks.get_mut(&disk.0) {
                None => Err(CpiError::DiskNotFound(disk.clone())),
                Some(a) => {
                    *a = None;
                    Ok(())
                }
            }
        }
        async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
            Ok(self.st().disks.contains_key(&cid.0))
        }
        async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
            if self.broken_get_disks {
                return Ok(Vec::new());
            }
            Ok(self
                .st()
                .disks
                .iter()
                .filter(|(_, a)| a.as_deref() == Some(vm.0.as_str()))
                .map(|(d, _)| DiskCid(d.clone()))
                .collect())
        }
        async fn resize_disk(&self, cid: &DiskCid, _size: u64) -> CpiResult<()> {
            if self.st().disks.contains_key(&cid.0) {
                Ok(())
            } else {
                Err(CpiError::DiskNotFound(cid.clone()))
            }
        }
        async fn set_disk_metadata(&self, cid: &DiskCid, m: &Meta) -> CpiResult<()> {
            self.resize_disk(cid, 0).await?;
            self.set_metadata(&cid.0, m);
            Ok(())
        }
        async fn find_disks(&self, filter: &Meta) -> CpiResult<Vec<(DiskCid, Meta)>> {
            Ok(self
                .find("disk-", filter)
                .into_iter()
                .map(|(c, m)| (DiskCid(c), m))
                .collect())
        }
        async fn snapshot_disk(&self, _cid: &DiskCid, _m: &Meta) -> CpiResult<SnapshotCid> {
            let cid = self.next("snap");
            self.st().snapshots.insert(cid.clone());
            Ok(SnapshotCid(cid))
        }
        async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
            self.st().snapshots.remove(&cid.0);
            Ok(())
        }
    }

    fn fixture() -> Fixture {
        Fixture {
            stemcell: StemcellSpec {
                name: "mem".into(),
                os: "mem".into(),
                version: "1".into(),
                image_path: None,
                cloud_properties: serde_json::json!({}),
            },
            vm_request: Box::new(|n, stemcell| CreateVmRequest {
                agent_id: format!("agent-{n}"),
                stemcell: stemcell.clone(),
                cloud_properties: serde_json::json!({}),
                networks: BTreeMap::new(),
                disk_cids: Vec::new(),
                settings: AgentSettings {
                    agent_id: format!("agent-{n}"),
                    director_public_key: String::new(),
                    host_private_key: String::new(),
                    listen_ip: format!("127.0.0.{}", n + 10),
                    listen_port: crate::AGENT_PORT,
                    networks: BTreeMap::new(),
                    disks: BTreeMap::new(),
                    env: serde_json::json!({}),
                },
                metadata: Meta::from([("token".to_string(), format!("t-{n}"))]),
            }),
            disk_size_mb: 10,
        }
    }

    fn assert_empty(cpi: &MemCpi) {
        let s = cpi.st();
        assert!(s.stemcells.is_empty(), "stemcells left: {:?}", s.stemcells);
        assert!(s.vms.is_empty(), "vms left: {:?}", s.vms);
        assert!(s.disks.is_empty(), "disks left: {:?}", s.disks);
        assert!(s.snapshots.is_empty(), "snapshots left: {:?}", s.snapshots);
        assert!(s.metadata.is_empty(), "metadata left: {:?}", s.metadata);
    }

    #[tokio::test]
    async fn a_correct_cpi_passes_and_is_left_empty() {
        let cpi = MemCpi::default();
        run(&cpi, &fixture()).await.unwrap();
        assert_empty(&cpi);
    }

    #[tokio::test]
    async fn a_broken_cpi_fails_by_name_and_is_still_cleaned_up() {
        let cpi = MemCpi {
            broken_get_disks: true,
            ..MemCpi::default()
        };
        let failures = run(&cpi, &fixture()).await.unwrap_err();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].starts_with("attach/detach across VMs: get_disks("),
            "{failures:?}"
        );
        assert_empty(&cpi);
    }

    #[tokio::test]
    async fn a_cpi_that_finds_deleted_resources_fails_by_name() {
        let cpi = MemCpi {
            stale_find: true,
            ..MemCpi::default()
        };
        let failures = run(&cpi, &fixture()).await.unwrap_err();
        assert_eq!(failures.len(), 2, "{failures:?}");
        assert!(
            failures[0].starts_with("VM lifecycle: find_vms(")
                && failures[0].contains("after delete_vm")
                && failures[0].contains("still lists vm-"),
            "{failures:?}"
        );
        assert!(
            failures[1].starts_with("disk lifecycle: find_disks(")
                && failures[1].contains("after delete_disk")
                && failures[1].contains("still lists disk-"),
            "{failures:?}"
        );
        assert_empty(&cpi);
    }

    #[test]
    fn metadata_matching() {
        let m = Meta::from([
            ("director".to_string(), "d".to_string()),
            ("token".to_string(), "t".to_string()),
        ]);
        assert!(crate::metadata_matches(&m, &Meta::new()));
        assert!(crate::metadata_matches(&m, &m));
        assert!(crate::metadata_matches(
            &m,
            &Meta::from([("token".to_string(), "t".to_string())])
        ));
        assert!(!crate::metadata_matches(
            &m,
            &Meta::from([("token".to_string(), "x".to_string())])
        ));
        assert!(!crate::metadata_matches(
            &m,
            &Meta::from([
                ("token".to_string(), "t".to_string()),
                ("name".to_string(), "t".to_string()),
            ])
        ));
    }

    #[tokio::test]
    async fn runs_against_a_trait_object() {
        let cpi: Box<dyn crate::Cpi> = Box::new(MemCpi::default());
        run(cpi.as_ref(), &fixture()).await.unwrap();
    }
}

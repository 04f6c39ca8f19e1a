//! The planner: desired state + what the director recorded → a [`Plan`]
//! value that makes every choice (instance ids, AZs, IPs, which VM to
//! recreate, which disk to keep, what each agent gets).
//!
//! Pure: no IO, no clock; ids come from the caller's generator. The executor
//! carries a plan out without deciding anything. Planning again after a
//! successful execution yields an empty plan (the fixed-point property).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};

use bosun_agent::protocol::{ApplySpec, PackageRef, RenderedJob};
use bosun_cpi::NetworkSettings;

use crate::model::cloud_config::{self, Network};
use crate::model::json::merge_json;
use crate::model::manifest::UpdatePolicy;
use crate::model::values::Lifecycle;
use crate::plan::desired::{stemcell_key, DesiredGroup, DesiredState, NeededPackage};
use crate::plan::ipam;
use crate::store::{AppliedRecord, InstanceRecord, VmCreate};
use crate::templates::{
    render_all, LinkContext, LinkInstance, NameOnly, ReleaseRef, RenderUnit, SpecContext,
    TemplateErrors,
};
use bosun_agent::protocol::RenderedFile;

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("planning {group}: network '{network}' has no free IP left in az {az}")]
    NoFreeIp {
        group: String,
        network: String,
        az: String,
    },
    #[error("planning {group}: no subnet of network '{network}' serves az {az}")]
    NoSubnet {
        group: String,
        network: String,
        az: String,
    },
    #[error("planning {group}: no stemcell for the {cpi} CPI of az {az}")]
    NoStemcell {
        group: String,
        cpi: String,
        az: String,
    },
    #[error("planning {group}: instance group has no azs")]
    NoAz { group: String },
    #[error("rendering templates")]
    Templates(#[source] TemplateErrors),
}

/// What exists, as far as planning needs it.
#[derive(Clone, Debug, Default)]
pub struct Actual {
    /// This deployment's instances.
    pub instances: Vec<InstanceRecord>,
    /// IPs reserved by other deployments, by network name.
    pub reserved_ips: BTreeSet<(String, Ipv4Addr)>,
    /// Compiled packages: (fingerprint, stemcell key).
    pub compiled: BTreeSet<(String, String)>,
    /// Recorded VMs the CPI says no longer exist (cids).
    pub missing_vms: BTreeSet<String>,
}

/// The plan.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub deployment: String,
    /// Packages to compile, dependencies first.
    pub compile: Vec<CompileStep>,
    /// Where compilation VMs go (present when `compile` is not empty).
    pub compilation: Option<CompilationPlan>,
    /// Instances that go away.
    pub deletes: Vec<InstanceRecord>,
    pub groups: Vec<GroupPlan>,
    /// The release versions and stemcells the desired state resolved to.
    #[serde(skip)]
    pub uses: crate::store::Uses,
}

/// Compilation workers: one VM per entry of `workers`, each with its networks.
#[derive(Clone, Debug, Serialize)]
pub struct CompilationPlan {
    pub cpi: String,
    pub az: String,
    pub cloud_properties: Json,
    /// Stemcell cid by stemcell key.
    pub stemcells: BTreeMap<String, String>,
    pub workers: Vec<BTreeMap<String, NetworkSettings>>,
}

/// A package to compile: the desired state's own description of it.
pub type CompileStep = NeededPackage;

#[derive(Clone, Debug, Serialize)]
pub struct GroupPlan {
    pub name: String,
    #[serde(skip)]
    pub update: UpdatePolicy,
    /// Errand groups get no VM from a deploy: their planned specs are
    /// recorded for `run-errand`.
    pub lifecycle: Lifecycle,
    pub instances: Vec<InstancePlan>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    None,
    Create,
    Recreate,
    Update,
}

#[derive(Clone, Debug, Serialize)]
pub struct InstancePlan {
    /// The instance as it will be recorded: id, index, az, IPs; `vm`,
    /// `disk`, `applied` as they are now (the executor updates them).
    pub record: InstanceRecord,
    pub change: Change,
    pub reasons: Vec<String>,
    pub vm: VmAction,
    /// The VM this instance should run on (what `vm` creates, or what the
    /// kept VM was created from): recorded so it can be recreated later.
    pub vm_target: VmCreate,
    pub disk: DiskAction,
    /// The spec the agent gets; package `sha256` is filled in from the
    /// compiled packages by the executor.
    pub spec: ApplySpec,
    pub applied: AppliedRecord,
    /// Stemcell key (`os/version`) the packages are compiled for.
    pub stemcell: String,
}

#[derive(Clone, Debug, Serialize)]
pub enum VmAction {
    Keep,
    Create(VmCreate),
    /// Delete the current VM, then create this one.
    Recreate(VmCreate),
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum DiskAction {
    None,
    Keep,
    Create {
        cpi: String,
        size_mb: u64,
        cloud_properties: Json,
        digest: String,
    },
    /// The instance keeps running without a disk; the old one is orphaned.
    Orphan,
    /// A new disk like this; the data is copied over and the old disk is
    /// orphaned (kept).
    Migrate {
        cpi: String,
        size_mb: u64,
        cloud_properties: Json,
        digest: String,
    },
}

impl Plan {
    /// Nothing to compile, create, change or delete.
    pub fn is_empty(&self) -> bool {
        self.compile.is_empty()
            && self.deletes.is_empty()
            && self
                .groups
                .iter()
                .all(|g| g.instances.iter().all(|i| i.change == Change::None))
    }

    /// Every (network, IP) the plan hands out: its instances' (errand ones
    /// included) and its compilation workers'.
    pub fn ips(&self) -> BTreeSet<(String, String)> {
        let instances = self.groups.iter().flat_map(|g| &g.instances);
        let workers = self.compilation.iter().flat_map(|c| &c.workers);
        instances
            .map(|i| &i.record.networks)
            .chain(workers)
            .flat_map(|nets| nets.iter())
            .filter(|(_, s)| !s.ip.is_empty())
            .map(|(n, s)| (n.clone(), s.ip.clone()))
            .collect()
    }

    /// Instances that change.
    pub fn changing(&self) -> impl Iterator<Item = &InstancePlan> {
        self.groups
            .iter()
            .flat_map(|g| g.instances.iter())
            .filter(|i| i.change != Change::None)
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "Deployment '{}': no changes", self.deployment);
        }
        writeln!(f, "Deployment '{}':", self.deployment)?;
        for c in &self.compile {
            writeln!(
                f,
                "  compile   {} ({}) on {}",
                c.name,
                short(&c.fingerprint),
                c.stemcell
            )?;
        }
        for d in &self.deletes {
            writeln!(f, "  delete    {}/{} ({})", d.group, d.id, d.index)?;
        }
        for g in &self.groups {
            for i in &g.instances {
                let what = match i.change {
                    Change::None => continue,
                    Change::Create => "create",
                    Change::Recreate => "recreate",
                    Change::Update => "update",
                };
                let ips: Vec<&str> = i.record.networks.values().map(|n| n.ip.as_str()).collect();
                write!(
                    f,
                    "  {what:<9} {}/{} ({}) az={} ip={}",
                    i.record.group,
                    i.record.id,
                    i.record.index,
                    i.record.az,
                    ips.join(",")
                )?;
                if !i.reasons.is_empty() {
                    write!(f, ": {}", i.reasons.join("; "))?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(12)]
}

/// A sha256 over a value's JSON.
pub fn digest<T: Serialize>(v: &T) -> String {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Plan `desired` against `actual`. `new_id` supplies ids for new instances.
pub fn plan(
    desired: &DesiredState,
    actual: &Actual,
    new_id: &mut dyn FnMut() -> String,
) -> Result<Plan, PlanError> {
    // Pass 1: identities, AZs and IPs of every instance of every group.
    let mut used: BTreeSet<(String, Ipv4Addr)> = actual.reserved_ips.clone();
    let mut placed: Vec<(usize, Vec<InstanceRecord>)> = Vec::new();
    let mut deletes = Vec::new();
    let wanted_groups: BTreeSet<&str> = desired.groups.iter().map(|g| g.name.as_str()).collect();
    for rec in &actual.instances {
        let keep = wanted_groups.contains(rec.group.as_str())
            && desired
                .groups
                .iter()
                .any(|g| g.name == rec.group && rec.index < g.instances);
        if !keep {
            deletes.push(rec.clone());
        }
    }
    // IPs of kept instances stay reserved while new ones are chosen.
    for (gi, g) in desired.groups.iter().enumerate() {
        let existing: BTreeMap<u32, &InstanceRecord> = actual
            .instances
            .iter()
            .filter(|r| r.group == g.name && r.index < g.instances)
            .map(|r| (r.index, r))
            .collect();
        let mut recs = Vec::new();
        for index in 0..g.instances {
            let az = choose_az(g, index, existing.get(&index).map(|r| r.az.as_str()))?;
            let rec = match existing.get(&index) {
                Some(r) => {
                    let mut r = (*r).clone();
                    r.az = az;
                    r.bootstrap = index == 0;
                    r
                }
                None => InstanceRecord::new(new_id(), &desired.deployment, &g.name, index, &az),
            };
            recs.push(rec);
        }
        assign_ips(g, &mut recs, &mut used)?;
        placed.push((gi, recs));
    }

    // Pass 2: render, compare, decide.
    let addresses: BTreeMap<String, Vec<LinkInstance>> = placed
        .iter()
        .map(|(gi, recs)| {
            let g = &desired.groups[*gi];
            (
                g.name.clone(),
                recs.iter()
                    .map(|r| LinkInstance {
                        name: g.name.clone(),
                        id: r.id.clone(),
                        index: r.index,
                        az: r.az.clone(),
                        address: primary_ip(&r.networks),
                        bootstrap: r.bootstrap,
                    })
                    .collect(),
            )
        })
        .collect();

    let rendered = render_groups(desired, &placed, &addresses)?;
    let mut groups = Vec::new();
    for ((gi, recs), group_files) in placed.into_iter().zip(rendered) {
        let g = &desired.groups[gi];
        let mut instances = Vec::new();
        for (rec, job_files) in recs.into_iter().zip(group_files) {
            let missing = rec
                .vm
                .as_ref()
                .is_some_and(|v| actual.missing_vms.contains(&v.cid));
            instances.push(plan_instance(g, rec, job_files, missing)?);
        }
        groups.push(GroupPlan {
            name: g.name.clone(),
            update: g.update.clone(),
            lifecycle: g.lifecycle,
            instances,
        });
    }

    let compile = compile_steps(&desired.packages, &actual.compiled);
    let compilation = if compile.is_empty() {
        None
    } else {
        // Compilation runs before deletes: their IPs are still in use.
        for d in &deletes {
            for (net, n) in &d.networks {
                if let Ok(ip) = n.ip.parse() {
                    used.insert((net.clone(), ip));
                }
            }
        }
        Some(compilation_plan(desired, compile.len(), &mut used)?)
    };
    let uses = crate::store::Uses {
        releases: desired
            .groups
            .iter()
            .flat_map(|g| &g.jobs)
            .map(|j| format!("{}/{}", j.release, j.release_version))
            .collect(),
        stemcells: desired
            .groups
            .iter()
            .flat_map(|g| g.stemcells.values())
            .map(crate::plan::desired::stemcell_key)
            .collect(),
    };
    Ok(Plan {
        deployment: desired.deployment.clone(),
        compile,
        compilation,
        deletes,
        groups,
        uses,
    })
}

fn choose_az(g: &DesiredGroup, index: u32, current: Option<&str>) -> Result<String, PlanError> {
    if let Some(c) = current {
        if g.azs.iter().any(|a| a == c) {
            return Ok(c.to_string());
        }
    }
    if g.azs.is_empty() {
        return Err(PlanError::NoAz {
            group: g.name.clone(),
        });
    }
    Ok(g.azs[index as usize % g.azs.len()].clone())
}

fn network_settings(
    network: &Network,
    az: &str,
    ip: Ipv4Addr,
    default: &[String],
) -> Option<NetworkSettings> {
    let subnet = cloud_config::subnet_for_ip(network, ip)
        .or_else(|| cloud_config::subnet_for_az(network, az))?;
    Some(NetworkSettings {
        kind: network.kind,
        ip: ip.to_string(),
        netmask: ipam::netmask(subnet).to_string(),
        range: subnet.range.to_string(),
        gateway: subnet.gateway.map(|g| g.to_string()),
        dns: subnet.dns.clone(),
        default: default.to_vec(),
        cloud_properties: if subnet.cloud_properties.is_null() {
            json!({})
        } else {
            subnet.cloud_properties.clone()
        },
    })
}

fn assign_ips(
    g: &DesiredGroup,
    recs: &mut [InstanceRecord],
    used: &mut BTreeSet<(String, Ipv4Addr)>,
) -> Result<(), PlanError> {
    let single = g.networks.len() == 1;
    for dn in &g.networks {
        let default: Vec<String> = if !dn.default.is_empty() {
            dn.default.clone()
        } else if single || g.networks.first().map(|f| &f.name) == Some(&dn.name) {
            vec!["dns".into(), "gateway".into()]
        } else {
            vec![]
        };
        // Which current assignments stay valid.
        let mut chosen: Vec<Option<Ipv4Addr>> = recs
            .iter()
            .map(|r| {
                let ip: Ipv4Addr = r.networks.get(&dn.name)?.ip.parse().ok()?;
                let valid = if dn.static_ips.is_empty() {
                    // Still in a dynamic pool of a subnet serving its az.
                    cloud_config::subnet_for_ip(&dn.network, ip).is_some_and(|s| {
                        (s.azs.is_empty() || s.azs.contains(&r.az))
                            && cloud_config::dynamic_pool(s).any(|a| a == ip)
                    })
                } else {
                    dn.static_ips.contains(&ip)
                };
                (valid && !used.contains(&(dn.name.clone(), ip))).then_some(ip)
            })
            .collect();
        for ip in chosen.iter().flatten() {
            used.insert((dn.name.clone(), *ip));
        }
        for (i, r) in recs.iter_mut().enumerate() {
            let ip = match chosen[i] {
                Some(ip) => ip,
                None if !dn.static_ips.is_empty() => {
                    match dn
                        .static_ips
                        .iter()
                        .find(|ip| !used.contains(&(dn.name.clone(), **ip)))
                    {
                        Some(ip) => *ip,
                        None => {
                            return Err(PlanError::NoFreeIp {
                                group: g.name.clone(),
                                network: dn.name.clone(),
                                az: r.az.clone(),
                            })
                        }
                    }
                }
                None => {
                    let taken: BTreeSet<Ipv4Addr> = used
                        .iter()
                        .filter(|(n, _)| n == &dn.name)
                        .map(|(_, ip)| *ip)
                        .collect();
                    if cloud_config::subnet_for_az(&dn.network, &r.az).is_none() {
                        return Err(PlanError::NoSubnet {
                            group: g.name.clone(),
                            network: dn.name.clone(),
                            az: r.az.clone(),
                        });
                    }
                    ipam::allocate_dynamic(&dn.network, &r.az, &taken).ok_or_else(|| {
                        PlanError::NoFreeIp {
                            group: g.name.clone(),
                            network: dn.name.clone(),
                            az: r.az.clone(),
                        }
                    })?
                }
            };
            chosen[i] = Some(ip);
            used.insert((dn.name.clone(), ip));
            let settings = network_settings(&dn.network, &r.az, ip, &default).ok_or_else(|| {
                PlanError::NoSubnet {
                    group: g.name.clone(),
                    network: dn.name.clone(),
                    az: r.az.clone(),
                }
            })?;
            r.networks.insert(dn.name.clone(), settings);
        }
    }
    // Networks the group no longer uses are released.
    let names: BTreeSet<&str> = g.networks.iter().map(|n| n.name.as_str()).collect();
    for r in recs.iter_mut() {
        r.networks.retain(|k, _| names.contains(k.as_str()));
    }
    Ok(())
}

/// The address of an instance: its default-gateway network's IP.
pub fn primary_ip(networks: &BTreeMap<String, NetworkSettings>) -> String {
    networks
        .values()
        .find(|n| n.default.iter().any(|d| d == "gateway"))
        .or_else(|| networks.values().next())
        .map(|n| n.ip.clone())
        .unwrap_or_default()
}

/// Plans one instance: the VM, disk and spec decisions, then the change
/// they add up to (errand and detached instances overriding it).
fn plan_instance(
    g: &DesiredGroup,
    rec: InstanceRecord,
    job_files: Vec<Vec<RenderedFile>>,
    vm_missing: bool,
) -> Result<InstancePlan, PlanError> {
    let (cpi, stemcell, vm_target) = vm_target(g, &rec)?;
    let mut reasons = Vec::new();
    let vm = vm_decision(&rec, &vm_target, vm_missing, stemcell, &cpi, &mut reasons);
    let disk = disk_decision(g, &rec, &cpi, &mut reasons);
    let (spec, applied) = spec_decision(g, &rec, job_files, stemcell);
    let change = change_decision(&rec, &vm, &disk, &applied, &mut reasons);
    let (change, vm, disk) = lifecycle_decision(
        g,
        &rec,
        &applied,
        &vm_target,
        change,
        vm,
        disk,
        &mut reasons,
    );
    Ok(InstancePlan {
        record: rec,
        change,
        reasons,
        vm,
        vm_target,
        disk,
        spec,
        applied,
        stemcell: stemcell_key(stemcell),
    })
}

/// Decides the VM an instance should run on: its AZ's CPI (`local` when
/// the AZ is unknown), that CPI's stemcell, the AZ's cloud properties
/// overlaid with the group's, and a digest over all of it.
fn vm_target<'g>(
    g: &'g DesiredGroup,
    rec: &InstanceRecord,
) -> Result<(String, &'g crate::store::StemcellRecord, VmCreate), PlanError> {
    let (cpi, az_props) = g
        .az_config
        .get(&rec.az)
        .cloned()
        .unwrap_or_else(|| ("local".to_string(), json!({})));
    let stemcell = g.stemcells.get(&cpi).ok_or_else(|| PlanError::NoStemcell {
        group: g.name.clone(),
        cpi: cpi.clone(),
        az: rec.az.clone(),
    })?;
    let mut cloud_properties = if az_props.is_null() {
        json!({})
    } else {
        az_props
    };
    merge_json(&mut cloud_properties, &g.cloud_properties);
    let vm_digest = digest(&json!({
        "cpi": cpi,
        "stemcell": stemcell.cid,
        "cloud_properties": cloud_properties,
        "networks": rec.networks,
        "env": g.env,
    }));
    let vm_create = VmCreate {
        cpi: cpi.clone(),
        stemcell_cid: stemcell.cid.clone(),
        cloud_properties,
        networks: rec.networks.clone(),
        env: g.env.clone(),
        vm_digest,
    };
    Ok((cpi, stemcell, vm_create))
}

/// Decides what happens to the instance's VM: created when it has none,
/// recreated when the CPI lost it or its target digest changed (with the
/// reason pushed), kept otherwise.
fn vm_decision(
    rec: &InstanceRecord,
    target: &VmCreate,
    vm_missing: bool,
    stemcell: &crate::store::StemcellRecord,
    cpi: &str,
    reasons: &mut Vec<String>,
) -> VmAction {
    match &rec.vm {
        None => VmAction::Create(target.clone()),
        Some(_) if vm_missing => {
            reasons.push("VM is missing (the CPI no longer has it)".into());
            VmAction::Recreate(target.clone())
        }
        Some(v) if v.vm_digest != target.vm_digest => {
            reasons.push(vm_change_reason(rec, v, stemcell, cpi));
            VmAction::Recreate(target.clone())
        }
        Some(_) => VmAction::Keep,
    }
}

/// Decides what happens to the persistent disk: none, kept, created,
/// orphaned (no longer wanted) or migrated (size or type changed), with
/// the reason pushed.
fn disk_decision(
    g: &DesiredGroup,
    rec: &InstanceRecord,
    cpi: &str,
    reasons: &mut Vec<String>,
) -> DiskAction {
    let d = match (&g.disk, &rec.disk) {
        (None, None) => return DiskAction::None,
        (None, Some(_)) => {
            reasons.push("persistent disk removed (orphaned)".into());
            return DiskAction::Orphan;
        }
        (Some(d), _) => d,
    };
    let d_digest = digest(&json!({"size_mb": d.size_mb, "cloud_properties": d.cloud_properties}));
    match &rec.disk {
        Some(e) if e.digest == d_digest => DiskAction::Keep,
        Some(e) => {
            reasons.push(if e.size_mb == d.size_mb {
                format!(
                    "persistent disk type changed ({} MB): data copied to a new disk",
                    d.size_mb
                )
            } else {
                format!(
                    "persistent disk {} MB -> {} MB: data copied to a new disk",
                    e.size_mb, d.size_mb
                )
            });
            DiskAction::Migrate {
                cpi: cpi.to_string(),
                size_mb: d.size_mb,
                cloud_properties: d.cloud_properties.clone(),
                digest: d_digest,
            }
        }
        None => {
            if rec.vm.is_some() {
                reasons.push(format!("persistent disk {} MB added", d.size_mb));
            }
            DiskAction::Create {
                cpi: cpi.to_string(),
                size_mb: d.size_mb,
                cloud_properties: d.cloud_properties.clone(),
                digest: d_digest,
            }
        }
    }
}

/// Decides what the agent gets: every job rendered for this instance, the
/// group's packages, and the applied record (digests) the spec hashes to.
fn spec_decision(
    g: &DesiredGroup,
    rec: &InstanceRecord,
    job_files: Vec<Vec<RenderedFile>>,
    stemcell: &crate::store::StemcellRecord,
) -> (ApplySpec, AppliedRecord) {
    let address = primary_ip(&rec.networks);
    let (jobs, job_digests) = rendered_jobs(g, job_files);
    let package_fingerprints: BTreeMap<String, String> = g.packages.iter().cloned().collect();
    let packages: Vec<PackageRef> = g
        .packages
        .iter()
        .map(|(n, f)| PackageRef {
            name: n.clone(),
            fingerprint: f.clone(),
            sha256: String::new(),
        })
        .collect();
    let spec = ApplySpec {
        generation: 0,
        deployment: rec.deployment.clone(),
        instance_group: g.name.clone(),
        id: rec.id.clone(),
        index: rec.index,
        az: rec.az.clone(),
        bootstrap: rec.bootstrap,
        address,
        networks: rec.networks.clone(),
        packages,
        jobs,
    };
    let spec_digest = digest(&json!({
        "jobs": job_digests,
        "packages": package_fingerprints,
        "networks": rec.networks,
        "bootstrap": rec.bootstrap,
        "stemcell": stemcell_key(stemcell),
    }));
    let applied = AppliedRecord {
        digest: spec_digest,
        job_digests,
        package_fingerprints,
    };
    (spec, applied)
}

/// Renders every job of every placed instance in one batch (one Ruby
/// process for all ERB jobs), links resolved from `addresses`: per placed
/// group, per instance, per job (in the group's order) the job's files.
/// Every template problem of the deploy is reported at once.
fn render_groups(
    desired: &DesiredState,
    placed: &[(usize, Vec<InstanceRecord>)],
    addresses: &BTreeMap<String, Vec<LinkInstance>>,
) -> Result<Vec<Vec<Vec<Vec<RenderedFile>>>>, PlanError> {
    // Links first: units borrow them.
    let mut links: Vec<BTreeMap<String, LinkContext>> = Vec::new();
    for (gi, _) in placed {
        for j in &desired.groups[*gi].jobs {
            links.push(
                j.consumes
                    .iter()
                    .map(|(lname, src)| {
                        let instances = addresses.get(&src.group).cloned().unwrap_or_default();
                        let link = LinkContext {
                            address: instances
                                .first()
                                .map(|i| i.address.clone())
                                .unwrap_or_default(),
                            instances,
                            properties: src.properties.clone(),
                        };
                        (lname.clone(), link)
                    })
                    .collect(),
            );
        }
    }
    let mut units = Vec::new();
    let mut next_links = links.iter();
    for (gi, recs) in placed {
        let g = &desired.groups[*gi];
        for j in &g.jobs {
            let Some(job_links) = next_links.next() else {
                break;
            };
            let specs = recs
                .iter()
                .map(|rec| {
                    let address = primary_ip(&rec.networks);
                    let spec = SpecContext {
                        deployment: desired.deployment.clone(),
                        name: g.name.clone(),
                        id: rec.id.clone(),
                        index: rec.index,
                        az: rec.az.clone(),
                        address: address.clone(),
                        ip: address,
                        bootstrap: rec.bootstrap,
                        networks: serde_json::to_value(&rec.networks).unwrap_or(Json::Null),
                        job: NameOnly {
                            name: j.name.clone(),
                        },
                        release: ReleaseRef {
                            name: j.release.clone(),
                            version: j.release_version.clone(),
                        },
                    };
                    (format!("{}/{} ({})", g.name, rec.id, rec.index), spec)
                })
                .collect();
            units.push(RenderUnit {
                templates: &j.templates,
                properties: &j.properties,
                defaults: &j.defaults,
                declared: &j.declared,
                links: job_links,
                specs,
            });
        }
    }
    let mut per_unit = render_all(&units)
        .map_err(PlanError::Templates)?
        .into_iter();
    let mut out = Vec::with_capacity(placed.len());
    for (gi, recs) in placed {
        let g = &desired.groups[*gi];
        let mut group: Vec<Vec<Vec<RenderedFile>>> = recs.iter().map(|_| Vec::new()).collect();
        for _ in &g.jobs {
            let files = per_unit.next().unwrap_or_default();
            for (slot, f) in group.iter_mut().zip(files) {
                slot.push(f);
            }
        }
        out.push(group);
    }
    Ok(out)
}

/// The instance's rendered jobs (files in the group's job order) with
/// each job's digest by name.
fn rendered_jobs(
    g: &DesiredGroup,
    job_files: Vec<Vec<RenderedFile>>,
) -> (Vec<RenderedJob>, BTreeMap<String, String>) {
    let mut jobs = Vec::new();
    let mut job_digests = BTreeMap::new();
    for (j, files) in g.jobs.iter().zip(job_files) {
        let d = digest(&json!({"fingerprint": j.fingerprint, "files": files}));
        job_digests.insert(j.name.clone(), d.clone());
        jobs.push(RenderedJob {
            name: j.name.clone(),
            digest: d,
            files,
        });
    }
    (jobs, job_digests)
}

/// Decides the change from the VM and disk actions and what was applied
/// last, pushing a reason per job or package that differs (or a general
/// one when nothing else explains the change).
fn change_decision(
    rec: &InstanceRecord,
    vm: &VmAction,
    disk: &DiskAction,
    applied: &AppliedRecord,
    reasons: &mut Vec<String>,
) -> Change {
    let mut change = match (vm, &rec.applied) {
        (VmAction::Create(_), _) if rec.vm.is_none() => Change::Create,
        (VmAction::Recreate(_), _) => Change::Recreate,
        _ => Change::None,
    };
    if change == Change::Create && rec.applied.is_some() {
        reasons.push("VM is missing".into());
    }
    match &rec.applied {
        Some(a) if a.digest == applied.digest => {}
        Some(a) => {
            spec_change_reasons(a, applied, reasons);
            if reasons.is_empty() {
                reasons.push("network or bootstrap changed".into());
            }
            if change == Change::None {
                change = Change::Update;
            }
        }
        None => {
            if change == Change::None {
                change = Change::Update;
                reasons.push("never applied".into());
            }
        }
    }
    if change == Change::None
        && matches!(
            disk,
            DiskAction::Create { .. } | DiskAction::Orphan | DiskAction::Migrate { .. }
        )
    {
        change = Change::Update;
    }
    change
}

/// Pushes a reason for each job added, changed or removed and each
/// package changed between what was applied (`old`) and what is planned.
fn spec_change_reasons(old: &AppliedRecord, new: &AppliedRecord, reasons: &mut Vec<String>) {
    for (jn, d) in &new.job_digests {
        match old.job_digests.get(jn) {
            None => reasons.push(format!("job {jn} added")),
            Some(o) if o != d => reasons.push(format!("job {jn} changed")),
            _ => {}
        }
    }
    for jn in old.job_digests.keys() {
        if !new.job_digests.contains_key(jn) {
            reasons.push(format!("job {jn} removed"));
        }
    }
    for (pn, f) in &new.package_fingerprints {
        if old.package_fingerprints.get(pn) != Some(f) {
            reasons.push(format!("package {pn} changed"));
        }
    }
}

/// Overrides the decisions for instances that get no VM from a deploy:
/// an errand only has its spec and VM recorded (an update when they
/// differ from what it last ran with); an instance stopped with `--hard`
/// stays without a VM, keeping its disk, until `start`.
#[allow(clippy::too_many_arguments)]
fn lifecycle_decision(
    g: &DesiredGroup,
    rec: &InstanceRecord,
    applied: &AppliedRecord,
    vm_target: &VmCreate,
    change: Change,
    vm: VmAction,
    disk: DiskAction,
    reasons: &mut Vec<String>,
) -> (Change, VmAction, DiskAction) {
    // An errand instance has no VM between runs: a deploy only records
    // the spec and VM it will run with.
    if g.lifecycle == Lifecycle::Errand {
        reasons.clear();
        let same = rec.deployed.as_ref().is_some_and(|d| {
            d.applied.digest == applied.digest && d.vm.vm_digest == vm_target.vm_digest
        });
        if !same {
            reasons.push("errand spec recorded".into());
        }
        let change = if same { Change::None } else { Change::Update };
        (change, VmAction::Keep, DiskAction::None)
    // Stopped with --hard: it stays without a VM until `start` brings back
    // the spec it last ran (a deploy after that applies newer changes).
    } else if rec.state == crate::store::InstanceState::Detached {
        reasons.clear();
        let disk = if rec.disk.is_some() {
            DiskAction::Keep
        } else {
            DiskAction::None
        };
        (Change::None, VmAction::Keep, disk)
    } else {
        (change, vm, disk)
    }
}

fn vm_change_reason(
    rec: &InstanceRecord,
    v: &crate::store::VmRecord,
    stemcell: &crate::store::StemcellRecord,
    cpi: &str,
) -> String {
    if v.cpi != cpi {
        return format!("CPI changed ({} -> {cpi})", v.cpi);
    }
    if primary_ip(&rec.networks) != v.address {
        return format!(
            "address changed ({} -> {})",
            v.address,
            primary_ip(&rec.networks)
        );
    }
    format!(
        "VM configuration changed (stemcell {}/{}, vm_type, networks or env)",
        stemcell.os, stemcell.version
    )
}

fn compilation_plan(
    desired: &DesiredState,
    steps: usize,
    used: &mut BTreeSet<(String, Ipv4Addr)>,
) -> Result<CompilationPlan, PlanError> {
    let c = &desired.compilation;
    let n = (c.workers as usize).min(steps).max(1);
    let mut workers = Vec::new();
    for _ in 0..n {
        let taken: BTreeSet<Ipv4Addr> = used
            .iter()
            .filter(|(net, _)| net == &c.network.name)
            .map(|(_, ip)| *ip)
            .collect();
        let no_ip = || PlanError::NoFreeIp {
            group: "compilation".into(),
            network: c.network.name.clone(),
            az: c.az.clone(),
        };
        let ip = ipam::allocate_dynamic(&c.network, &c.az, &taken).ok_or_else(no_ip)?;
        used.insert((c.network.name.clone(), ip));
        let defaults = vec!["dns".to_string(), "gateway".to_string()];
        let settings = network_settings(&c.network, &c.az, ip, &defaults).ok_or_else(no_ip)?;
        workers.push([(c.network.name.clone(), settings)].into_iter().collect());
    }
    Ok(CompilationPlan {
        cpi: c.cpi.clone(),
        az: c.az.clone(),
        cloud_properties: c.cloud_properties.clone(),
        stemcells: c.stemcells.clone(),
        workers,
    })
}

fn compile_steps(
    packages: &[NeededPackage],
    compiled: &BTreeSet<(String, String)>,
) -> Vec<CompileStep> {
    // `packages` is already deps-first per group; keep that order.
    packages
        .iter()
        .filter(|p| !compiled.contains(&(p.fingerprint.clone(), p.stemcell.clone())))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cloud_config::default_local;
    use crate::model::manifest::parse_manifest;
    use crate::plan::desired::resolve;
    use crate::release::read_release_dir;
    use crate::store::{DiskRecord, ReleaseRecord, StemcellRecord, VmRecord};
    use std::path::Path;

    fn kv_release() -> ReleaseRecord {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../releases/kv");
        ReleaseRecord::from_release(&read_release_dir(&dir, None).unwrap())
    }

    fn manifest(instances: u32, port: u32, disk: u32, static_ips: &[&str]) -> String {
        let ips = if static_ips.is_empty() {
            String::new()
        } else {
            format!("    static_ips: [{}]\n", static_ips.join(", "))
        };
        format!(
            "name: fp\nreleases:\n- name: kv\n  version: latest\nstemcells:\n- alias: default\n  os: local\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 2\n  canary_watch_time: 1000\n  update_watch_time: 1000\ninstance_groups:\n- name: kv\n  instances: {instances}\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  persistent_disk: {disk}\n  networks:\n  - name: default\n{ips}  jobs:\n  - name: kv\n    release: kv\n    properties:\n      kv:\n        port: {port}\n"
        )
    }

    fn desired(text: &str) -> DesiredState {
        let m = parse_manifest("m.yml", text, Path::new(".")).unwrap();
        let releases = [("kv".to_string(), kv_release())].into_iter().collect();
        let stemcells = vec![StemcellRecord {
            name: "host".into(),
            os: "local".into(),
            version: "1".into(),
            cpi: "local".into(),
            cid: "sc-1".into(),
        }];
        resolve(&m, &default_local(), &releases, &stemcells).unwrap()
    }

    /// What the executor records when a plan succeeds.
    fn execute(plan: &Plan, actual: &mut Actual) {
        for c in &plan.compile {
            actual
                .compiled
                .insert((c.fingerprint.clone(), c.stemcell.clone()));
        }
        actual
            .instances
            .retain(|r| !plan.deletes.iter().any(|d| d.id == r.id));
        for g in &plan.groups {
            for ip in &g.instances {
                if ip.change == Change::None {
                    continue;
                }
                let mut rec = ip.record.clone();
                if let VmAction::Create(v) | VmAction::Recreate(v) = &ip.vm {
                    rec.vm = Some(VmRecord {
                        cid: format!("vm-{}", rec.id),
                        cpi: v.cpi.clone(),
                        agent_id: "a".into(),
                        host_public_key: "k".into(),
                        address: primary_ip(&v.networks),
                        vm_digest: v.vm_digest.clone(),
                        generation: 1,
                        created_at: 0,
                    });
                }
                match &ip.disk {
                    DiskAction::Create {
                        cpi,
                        size_mb,
                        digest,
                        ..
                    } => {
                        rec.disk = Some(DiskRecord {
                            cid: format!("disk-{}", rec.id),
                            cpi: cpi.clone(),
                            size_mb: *size_mb,
                            digest: digest.clone(),
                            attached: true,
                        })
                    }
                    DiskAction::Orphan => rec.disk = None,
                    _ => {}
                }
                rec.applied = Some(ip.applied.clone());
                actual.instances.retain(|r| r.id != rec.id);
                actual.instances.push(rec);
            }
        }
    }

    fn ids() -> impl FnMut() -> String {
        let mut n = 0;
        move || {
            n += 1;
            format!("id-{n}")
        }
    }

    #[test]
    fn planning_after_execution_is_a_fixed_point() {
        // A sequence of manifests, each executed and then planned again.
        let steps = [
            manifest(3, 8080, 1024, &[]),
            manifest(3, 8081, 1024, &[]),
            manifest(5, 8081, 1024, &[]),
            manifest(2, 8081, 1024, &[]),
            manifest(2, 8081, 1024, &["127.77.0.10", "127.77.0.11"]),
            manifest(4, 9000, 1024, &[]),
        ];
        let mut actual = Actual::default();
        let mut new_id = ids();
        for (i, text) in steps.iter().enumerate() {
            let d = desired(text);
            let p = plan(&d, &actual, &mut new_id).unwrap();
            assert!(!p.is_empty(), "step {i} should change something");
            execute(&p, &mut actual);
            let again = plan(&d, &actual, &mut new_id).unwrap();
            assert!(again.is_empty(), "step {i} is not a fixed point:\n{again}");
            // Invariants: one record per index, distinct IPs.
            let mut ips: Vec<String> = actual
                .instances
                .iter()
                .map(|r| primary_ip(&r.networks))
                .collect();
            let n = ips.len();
            ips.sort();
            ips.dedup();
            assert_eq!(ips.len(), n, "step {i}: duplicate IPs");
        }
    }

    #[test]
    fn first_plan_compiles_in_dependency_order_and_creates_everything() {
        let d = desired(&manifest(3, 8080, 1024, &[]));
        let p = plan(&d, &Actual::default(), &mut ids()).unwrap();
        let names: Vec<&str> = p.compile.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, vec!["kv-common", "kv-server"]);
        let cp = p.compilation.as_ref().unwrap();
        assert!(!cp.workers.is_empty());
        let inst = &p.groups[0].instances;
        assert_eq!(inst.len(), 3);
        assert!(inst.iter().all(|i| i.change == Change::Create));
        assert!(inst[0].record.bootstrap && !inst[1].record.bootstrap);
        // Every peer is listed in the rendered config except the instance itself.
        let cfg = inst[1].spec.jobs[0]
            .files
            .iter()
            .find(|f| f.path == "config/config.json")
            .unwrap();
        let own = primary_ip(&inst[1].record.networks);
        assert!(
            !cfg.content.contains(&format!("\"{own}:8080\"")),
            "{}",
            cfg.content
        );
        for other in [&inst[0], &inst[2]] {
            assert!(cfg.content.contains(&primary_ip(&other.record.networks)));
        }
    }

    #[test]
    fn existing_instances_keep_ids_and_ips_on_update() {
        let mut actual = Actual::default();
        let mut new_id = ids();
        let p = plan(
            &desired(&manifest(3, 8080, 1024, &[])),
            &actual,
            &mut new_id,
        )
        .unwrap();
        execute(&p, &mut actual);
        let before: Vec<(String, String)> = actual
            .instances
            .iter()
            .map(|r| (r.id.clone(), primary_ip(&r.networks)))
            .collect();
        let p = plan(
            &desired(&manifest(3, 8081, 1024, &[])),
            &actual,
            &mut new_id,
        )
        .unwrap();
        assert!(p.compile.is_empty());
        for i in p.changing() {
            assert_eq!(i.change, Change::Update);
            assert!(matches!(i.vm, VmAction::Keep));
            assert_eq!(i.reasons, vec!["job kv changed".to_string()]);
            assert!(before.contains(&(i.record.id.clone(), primary_ip(&i.record.networks))));
        }
    }

    #[test]
    fn a_missing_vm_is_recreated_with_its_ip_and_disk() {
        let mut actual = Actual::default();
        let mut new_id = ids();
        let d = desired(&manifest(2, 8080, 1024, &[]));
        execute(&plan(&d, &actual, &mut new_id).unwrap(), &mut actual);
        let lost = actual.instances[1].clone();
        actual
            .missing_vms
            .insert(lost.vm.as_ref().unwrap().cid.clone());
        let p = plan(&d, &actual, &mut new_id).unwrap();
        let changing: Vec<&InstancePlan> = p.changing().collect();
        assert_eq!(changing.len(), 1);
        let i = changing[0];
        assert_eq!(i.record.id, lost.id);
        assert_eq!(i.change, Change::Recreate);
        assert!(matches!(i.vm, VmAction::Recreate(_)));
        assert_eq!(i.disk, DiskAction::Keep);
        assert_eq!(primary_ip(&i.record.networks), primary_ip(&lost.networks));
        assert_eq!(
            i.reasons,
            vec!["VM is missing (the CPI no longer has it)".to_string()]
        );
    }

    #[test]
    fn other_deployments_ips_are_not_reused() {
        let mut actual = Actual::default();
        actual
            .reserved_ips
            .insert(("default".into(), "127.77.0.101".parse().unwrap()));
        let p = plan(&desired(&manifest(1, 8080, 0, &[])), &actual, &mut ids()).unwrap();
        assert_eq!(
            primary_ip(&p.groups[0].instances[0].record.networks),
            "127.77.0.102"
        );
        assert!(matches!(p.groups[0].instances[0].disk, DiskAction::None));
    }

    /// One deployed instance of `manifest(1, 8080, disk, [])` and its group.
    fn deployed_one(disk: u32) -> (DesiredState, InstanceRecord) {
        let d = desired(&manifest(1, 8080, disk, &[]));
        let mut actual = Actual::default();
        execute(&plan(&d, &actual, &mut ids()).unwrap(), &mut actual);
        (d, actual.instances.remove(0))
    }

    #[test]
    fn vm_decision_recreates_a_missing_vm_and_keeps_a_matching_one() {
        let (d, rec) = deployed_one(0);
        let (cpi, stemcell, target) = vm_target(&d.groups[0], &rec).unwrap();
        let mut reasons = Vec::new();
        let vm = vm_decision(&rec, &target, false, stemcell, &cpi, &mut reasons);
        assert!(matches!(vm, VmAction::Keep));
        assert!(reasons.is_empty());
        let vm = vm_decision(&rec, &target, true, stemcell, &cpi, &mut reasons);
        assert!(matches!(vm, VmAction::Recreate(_)));
        assert_eq!(reasons, vec!["VM is missing (the CPI no longer has it)"]);
    }

    #[test]
    fn vm_target_without_a_stemcell_for_the_cpi_is_an_error() {
        let (mut d, rec) = deployed_one(0);
        d.groups[0].stemcells.clear();
        assert!(matches!(
            vm_target(&d.groups[0], &rec),
            Err(PlanError::NoStemcell { .. })
        ));
    }

    #[test]
    fn disk_decision_migrates_a_resized_disk_and_orphans_a_removed_one() {
        let (_, rec) = deployed_one(1024);
        let bigger = desired(&manifest(1, 8080, 2048, &[]));
        let mut reasons = Vec::new();
        let disk = disk_decision(&bigger.groups[0], &rec, "local", &mut reasons);
        assert!(matches!(disk, DiskAction::Migrate { size_mb: 2048, .. }));
        assert_eq!(
            reasons,
            vec!["persistent disk 1024 MB -> 2048 MB: data copied to a new disk"]
        );
        let none = desired(&manifest(1, 8080, 0, &[]));
        let mut reasons = Vec::new();
        let disk = disk_decision(&none.groups[0], &rec, "local", &mut reasons);
        assert_eq!(disk, DiskAction::Orphan);
        assert_eq!(reasons, vec!["persistent disk removed (orphaned)"]);
    }

    #[test]
    fn spec_decision_digest_follows_job_properties() {
        let (d, rec) = deployed_one(0);
        let stemcell = d.groups[0].stemcells.values().next().unwrap();
        let files = |d: &DesiredState| {
            render_groups(d, &[(0, vec![rec.clone()])], &BTreeMap::new())
                .unwrap()
                .remove(0)
                .remove(0)
        };
        let (spec, applied) = spec_decision(&d.groups[0], &rec, files(&d), stemcell);
        assert_eq!(spec.jobs.len(), 1);
        assert_eq!(Some(&applied), rec.applied.as_ref());
        let other = desired(&manifest(1, 9090, 0, &[]));
        let (_, changed) = spec_decision(&other.groups[0], &rec, files(&other), stemcell);
        assert_ne!(changed.digest, applied.digest);
    }

    #[test]
    fn spec_change_reasons_name_added_changed_and_removed_jobs() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let old = AppliedRecord {
            digest: "a".into(),
            job_digests: map(&[("a", "1"), ("b", "1"), ("c", "1")]),
            package_fingerprints: map(&[("p", "1")]),
        };
        let new = AppliedRecord {
            digest: "b".into(),
            job_digests: map(&[("a", "1"), ("b", "2"), ("d", "1")]),
            package_fingerprints: map(&[("p", "2")]),
        };
        let mut reasons = Vec::new();
        spec_change_reasons(&old, &new, &mut reasons);
        assert_eq!(
            reasons,
            vec![
                "job b changed",
                "job d added",
                "job c removed",
                "package p changed"
            ]
        );
    }

    #[test]
    fn change_decision_updates_a_never_applied_instance() {
        let (_, mut rec) = deployed_one(0);
        let applied = rec.applied.take().unwrap();
        let mut reasons = Vec::new();
        let change = change_decision(
            &rec,
            &VmAction::Keep,
            &DiskAction::None,
            &applied,
            &mut reasons,
        );
        assert_eq!(change, Change::Update);
        assert_eq!(reasons, vec!["never applied"]);
    }

    #[test]
    fn lifecycle_decision_leaves_a_detached_instance_alone_with_its_disk() {
        let (d, mut rec) = deployed_one(1024);
        rec.state = crate::store::InstanceState::Detached;
        let (_, _, target) = vm_target(&d.groups[0], &rec).unwrap();
        let applied = rec.applied.clone().unwrap();
        let mut reasons = vec!["job kv changed".to_string()];
        let (change, vm, disk) = lifecycle_decision(
            &d.groups[0],
            &rec,
            &applied,
            &target,
            Change::Update,
            VmAction::Keep,
            DiskAction::Orphan,
            &mut reasons,
        );
        assert_eq!(change, Change::None);
        assert!(matches!(vm, VmAction::Keep));
        assert_eq!(disk, DiskAction::Keep);
        assert!(reasons.is_empty());
    }
}

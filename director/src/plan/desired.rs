//! Desired state: a validated manifest, the cloud-config and the uploaded
//! releases and stemcells, resolved into what every instance group should
//! run: its VM and disk configuration, its jobs with parsed templates,
//! properties and resolved link sources, and the packages to compile.
//!
//! Pure: no IO. Instance ids, IPs and rendered templates are the planner's
//! business (they depend on what already exists).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde_json::{json, Value as Json};

use crate::model::cloud_config::{CloudConfig, Network};
use crate::model::json::{get_path, merge_json, set_path};
use crate::model::manifest::{InstanceGroup, Manifest, PersistentDisk, UpdatePolicy};
use crate::model::problems::{Problem, Problems};
use crate::model::values::Lifecycle;
use crate::store::{ReleaseRecord, StemcellRecord};
use crate::templates::{JobTemplates, TemplateError};

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Problems(#[from] Problems),
    #[error(transparent)]
    Template(#[from] TemplateError),
}

/// What the deployment should be.
#[derive(Clone)]
pub struct DesiredState {
    pub deployment: String,
    pub groups: Vec<DesiredGroup>,
    /// Every package some instance needs, per stemcell, deps first.
    pub packages: Vec<NeededPackage>,
    /// The CPI, stemcell and VM settings used for compilation VMs.
    pub compilation: CompilationTarget,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompilationTarget {
    pub cpi: String,
    pub az: String,
    pub network: Network,
    pub cloud_properties: Json,
    pub workers: u32,
    /// Stemcell cid on the compilation CPI, by stemcell key (`os/version`).
    pub stemcells: BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct DesiredGroup {
    pub name: String,
    pub instances: u32,
    pub azs: Vec<String>,
    pub update: UpdatePolicy,
    pub lifecycle: Lifecycle,
    pub networks: Vec<DesiredNetwork>,
    /// Merged cloud properties of vm_type and vm_extensions (AZ properties
    /// are merged per instance).
    pub cloud_properties: Json,
    pub env: Json,
    /// Stemcell to use per CPI name.
    pub stemcells: BTreeMap<String, StemcellRecord>,
    /// AZ name to (cpi, AZ cloud properties).
    pub az_config: BTreeMap<String, (String, Json)>,
    pub disk: Option<DiskConfig>,
    pub jobs: Vec<DesiredJob>,
    /// Packages the group's jobs need (closure, deps first): (name, fingerprint).
    pub packages: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DesiredNetwork {
    pub name: String,
    pub network: Network,
    pub static_ips: Vec<Ipv4Addr>,
    pub default: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DiskConfig {
    pub size_mb: u64,
    pub cloud_properties: Json,
}

#[derive(Clone)]
pub struct DesiredJob {
    pub name: String,
    pub release: String,
    pub release_version: String,
    pub fingerprint: String,
    pub templates: Arc<JobTemplates>,
    pub properties: Json,
    pub defaults: BTreeMap<String, Json>,
    /// Every property the job's spec declares (dotted names, sorted): an
    /// ERB template sees these only, as in BOSH.
    pub declared: Vec<String>,
    /// Consumer link name to its provider.
    pub consumes: BTreeMap<String, LinkSource>,
}

/// Where a consumed link comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSource {
    pub group: String,
    pub job: String,
    /// The provider's exported properties (nested).
    pub properties: Json,
}

/// A package to have compiled for a stemcell.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub struct NeededPackage {
    pub name: String,
    pub fingerprint: String,
    pub release: String,
    /// Blob of the source archive.
    pub source_sha256: String,
    /// Fingerprints of every (transitive) dependency.
    pub dependencies: Vec<String>,
    /// `os/version` of the stemcell.
    pub stemcell: String,
}

/// Stemcell key used for compiled packages.
pub fn stemcell_key(s: &StemcellRecord) -> String {
    format!("{}/{}", s.os, s.version)
}

/// Resolve the desired state. `releases` holds every release the manifest
/// names (by name); `stemcells` every uploaded stemcell.
pub fn resolve(
    manifest: &Manifest,
    cloud: &CloudConfig,
    releases: &BTreeMap<String, ReleaseRecord>,
    stemcells: &[StemcellRecord],
) -> Result<DesiredState, ResolveError> {
    let src = &manifest.source;
    let mut problems = Problems::default();

    let az_config: BTreeMap<String, (String, Json)> = cloud
        .azs
        .iter()
        .map(|a| (a.name.clone(), (a.cpi.clone(), a.cloud_properties.clone())))
        .collect();

    // Releases the manifest names must be uploaded.
    for (i, r) in manifest.releases.iter().enumerate() {
        if !releases.contains_key(&r.name) {
            problems.push(src.problem(
                format!("releases[{i}]"),
                format!(
                    "release '{}' version '{}' is not uploaded (run `bosun upload-release`, or give it a `path:`)",
                    r.name, r.version
                ),
            ));
        }
    }

    let mut groups = Vec::new();
    let mut cache = BTreeMap::new();
    for (gi, g) in manifest.instance_groups.iter().enumerate() {
        match resolve_group(
            manifest, cloud, releases, stemcells, &az_config, gi, g, &mut cache,
        ) {
            Ok(dg) => groups.push(dg),
            Err(ResolveError::Problems(ps)) => problems.extend(ps),
            Err(e) => return Err(e),
        }
    }
    problems.clone().into_result()?;

    // Links: every consumed link must find its provider.
    resolve_links(manifest, releases, &mut groups, &mut problems);
    problems.into_result()?;

    let mut compilation = compilation_target(cloud)?;
    for g in &groups {
        if let Some(s) = g.stemcells.get(&compilation.cpi) {
            compilation.stemcells.insert(stemcell_key(s), s.cid.clone());
        }
    }
    let packages = needed_packages(&groups, releases, &compilation);

    Ok(DesiredState {
        deployment: manifest.name.clone(),
        groups,
        packages,
        compilation,
    })
}

fn compilation_target(cloud: &CloudConfig) -> Result<CompilationTarget, Problems> {
    let c = &cloud.compilation;
    let src = &cloud.source;
    let az = cloud.azs.iter().find(|a| a.name == c.az);
    let net = cloud.networks.iter().find(|n| n.name == c.network);
    let mut problems = Problems::default();
    if az.is_none() {
        problems.push(src.problem("compilation.az", format!("unknown az '{}'", c.az)));
    }
    if net.is_none() {
        problems.push(src.problem(
            "compilation.network",
            format!("unknown network '{}'", c.network),
        ));
    }
    let mut cloud_properties = az.map(|a| a.cloud_properties.clone()).unwrap_or(json!({}));
    if let Some(vt) = &c.vm_type {
        match cloud.vm_types.iter().find(|v| &v.name == vt) {
            Some(v) => merge_json(&mut cloud_properties, &v.cloud_properties),
            None => {
                problems.push(src.problem("compilation.vm_type", format!("unknown vm_type '{vt}'")))
            }
        }
    }
    problems.into_result()?;
    match (az, net) {
        (Some(az), Some(net)) => Ok(CompilationTarget {
            cpi: az.cpi.clone(),
            az: az.name.clone(),
            network: net.clone(),
            cloud_properties,
            workers: c.workers.max(1),
            stemcells: BTreeMap::new(),
        }),
        _ => Err(Problems::default()),
    }
}

/// Resolves one instance group: its stemcells, VM cloud properties, disk,
/// networks and jobs, every problem found at once.
#[allow(clippy::too_many_arguments)]
fn resolve_group(
    manifest: &Manifest,
    cloud: &CloudConfig,
    releases: &BTreeMap<String, ReleaseRecord>,
    stemcells: &[StemcellRecord],
    az_config: &BTreeMap<String, (String, Json)>,
    gi: usize,
    g: &InstanceGroup,
    cache: &mut BTreeMap<String, Arc<JobTemplates>>,
) -> Result<DesiredGroup, ResolveError> {
    let gpath = format!("instance_groups[{gi}]");
    let mut problems = Problems::default();
    let group_stemcells = group_stemcells(manifest, stemcells, az_config, g, &gpath, &mut problems);
    let cloud_properties = group_cloud_properties(cloud, g);
    let disk = group_disk(cloud, g);
    let networks = group_networks(cloud, g);
    let (jobs, packages) = group_jobs(manifest, releases, g, &gpath, cache, &mut problems)?;
    problems.into_result()?;
    Ok(DesiredGroup {
        name: g.name.clone(),
        instances: g.instances,
        azs: g.azs.clone(),
        update: manifest.update.with_override(g.update.as_ref()),
        lifecycle: g.lifecycle,
        networks,
        cloud_properties,
        env: g.env.clone(),
        stemcells: group_stemcells,
        az_config: az_config.clone(),
        disk,
        jobs,
        packages,
    })
}

/// Picks the group's stemcell for each CPI its AZs use: the last uploaded
/// one matching the manifest's stemcell alias (os or name, and version or
/// `latest`); a CPI without one is a problem.
fn group_stemcells(
    manifest: &Manifest,
    stemcells: &[StemcellRecord],
    az_config: &BTreeMap<String, (String, Json)>,
    g: &InstanceGroup,
    gpath: &str,
    problems: &mut Problems,
) -> BTreeMap<String, StemcellRecord> {
    let mut group_stemcells = BTreeMap::new();
    let Some(sref) = manifest.stemcells.iter().find(|s| s.alias == g.stemcell) else {
        return group_stemcells;
    };
    let cpis: BTreeSet<String> = g
        .azs
        .iter()
        .filter_map(|a| az_config.get(a).map(|(cpi, _)| cpi.clone()))
        .collect();
    for cpi in cpis {
        let matching: Vec<&StemcellRecord> = stemcells
            .iter()
            .filter(|s| s.cpi == cpi)
            .filter(|s| sref.os.as_ref().is_none_or(|os| &s.os == os))
            .filter(|s| sref.name.as_ref().is_none_or(|n| &s.name == n))
            .filter(|s| sref.version == "latest" || s.version == sref.version)
            .collect();
        // latest = the last uploaded
        match matching.last() {
            Some(s) => {
                group_stemcells.insert(cpi, (*s).clone());
            }
            None => problems.push(manifest.source.problem(
                format!("{gpath}.stemcell"),
                format!(
                    "no stemcell {}/{} is known to the {cpi} CPI (the local CPI's stemcell has the host's os; others come from `bosun upload-stemcell`)",
                    sref.os.clone().or(sref.name.clone()).unwrap_or_default(),
                    sref.version
                ),
            )),
        }
    }
    group_stemcells
}

/// The group's VM cloud properties: its vm_type's, overlaid with each of
/// its vm_extensions' in order (unknown names add nothing).
fn group_cloud_properties(cloud: &CloudConfig, g: &InstanceGroup) -> Json {
    let mut cloud_properties = json!({});
    if let Some(vt) = cloud.vm_types.iter().find(|v| v.name == g.vm_type) {
        merge_json(&mut cloud_properties, &vt.cloud_properties);
    }
    for ext in &g.vm_extensions {
        if let Some(e) = cloud.vm_extensions.iter().find(|v| &v.name == ext) {
            merge_json(&mut cloud_properties, &e.cloud_properties);
        }
    }
    cloud_properties
}

/// The group's persistent disk: none for no or a zero size, a size with
/// no cloud properties, or a disk type's size and cloud properties.
fn group_disk(cloud: &CloudConfig, g: &InstanceGroup) -> Option<DiskConfig> {
    match &g.persistent_disk {
        None => None,
        Some(PersistentDisk::SizeMb(0)) => None,
        Some(PersistentDisk::SizeMb(mb)) => Some(DiskConfig {
            size_mb: *mb,
            cloud_properties: json!({}),
        }),
        Some(PersistentDisk::Type(t)) => {
            cloud
                .disk_types
                .iter()
                .find(|d| &d.name == t)
                .map(|d| DiskConfig {
                    size_mb: d.disk_size,
                    cloud_properties: d.cloud_properties.clone(),
                })
        }
    }
}

/// The group's networks, each with its cloud-config definition (names the
/// cloud-config lacks are left out: validation reports them).
fn group_networks(cloud: &CloudConfig, g: &InstanceGroup) -> Vec<DesiredNetwork> {
    g.networks
        .iter()
        .filter_map(|n| {
            cloud
                .networks
                .iter()
                .find(|cn| cn.name == n.name)
                .map(|cn| DesiredNetwork {
                    name: n.name.clone(),
                    network: cn.clone(),
                    static_ips: n.static_ips.clone(),
                    default: n.default.clone(),
                })
        })
        .collect()
}

/// A group's jobs and the packages they need: (name, fingerprint).
type GroupJobs = (Vec<DesiredJob>, Vec<(String, String)>);

/// The group's jobs from their releases, with templates (parsed once per
/// release job, through `cache`), merged properties and defaults; and the
/// packages they need, deps first, each once. A job its release lacks, or
/// a package closure that fails, is a problem.
fn group_jobs(
    manifest: &Manifest,
    releases: &BTreeMap<String, ReleaseRecord>,
    g: &InstanceGroup,
    gpath: &str,
    cache: &mut BTreeMap<String, Arc<JobTemplates>>,
    problems: &mut Problems,
) -> Result<GroupJobs, ResolveError> {
    let src = &manifest.source;
    let mut jobs = Vec::new();
    let mut packages: Vec<(String, String)> = Vec::new();
    for (ji, j) in g.jobs.iter().enumerate() {
        let jpath = format!("{gpath}.jobs[{ji}]");
        let Some(rel) = releases.get(&j.release) else {
            continue; // reported with the releases
        };
        let Some(job) = rel.job(&j.name) else {
            let names: Vec<&str> = rel.jobs.iter().map(|j| j.spec.name.as_str()).collect();
            problems.push(src.problem(
                format!("{jpath}.name"),
                format!(
                    "release '{}' has no job '{}' (it has: {})",
                    rel.name(),
                    j.name,
                    names.join(", ")
                ),
            ));
            continue;
        };
        let key = format!("{}/{}", rel.name(), job.fingerprint);
        let templates = match cache.get(&key) {
            Some(t) => t.clone(),
            None => {
                let consumes: Vec<String> =
                    job.spec.consumes.iter().map(|c| c.name.clone()).collect();
                let t = Arc::new(JobTemplates::new(
                    &job.spec.name,
                    job.spec.template_engine,
                    &job.spec.templates,
                    &job.templates,
                    job.monit.as_deref(),
                    &consumes,
                )?);
                cache.insert(key, t.clone());
                t
            }
        };
        let mut properties = json!({});
        merge_json(&mut properties, &g.properties);
        merge_json(&mut properties, &j.properties);
        let defaults = job
            .spec
            .properties
            .iter()
            .filter_map(|(k, d)| d.default.clone().map(|v| (k.clone(), v)))
            .collect();
        match package_closure(rel, &job.spec.packages) {
            Ok(list) => {
                for p in list {
                    if !packages.iter().any(|(_, f)| f == &p.1) {
                        packages.push(p);
                    }
                }
            }
            Err(msg) => problems.push(src.problem(format!("{jpath}.name"), msg)),
        }
        jobs.push(DesiredJob {
            name: j.name.clone(),
            release: rel.name().to_string(),
            release_version: rel.version().to_string(),
            fingerprint: job.fingerprint.clone(),
            templates,
            properties,
            defaults,
            declared: job.spec.properties.keys().cloned().collect(),
            consumes: BTreeMap::new(),
        });
    }
    Ok((jobs, packages))
}

/// A release's packages named, plus their transitive dependencies, deps
/// first: (name, compile key: see [`ReleaseRecord::compile_key`]).
fn package_closure(rel: &ReleaseRecord, names: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    fn visit(
        rel: &ReleaseRecord,
        name: &str,
        out: &mut Vec<(String, String)>,
        stack: &mut Vec<String>,
    ) -> Result<(), String> {
        if out.iter().any(|(n, _)| n == name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(format!(
                "package dependency cycle: {} -> {name}",
                stack.join(" -> ")
            ));
        }
        let p = rel
            .package(name)
            .ok_or_else(|| format!("release '{}' has no package '{name}'", rel.name()))?;
        stack.push(name.to_string());
        for d in &p.spec.dependencies {
            visit(rel, d, out, stack)?;
        }
        stack.pop();
        let key = rel
            .compile_key(name)
            .ok_or_else(|| format!("package '{name}': dependency cycle"))?;
        out.push((name.to_string(), key));
        Ok(())
    }
    for n in names {
        visit(rel, n, &mut out, &mut Vec::new())?;
    }
    Ok(out)
}

fn resolve_links(
    manifest: &Manifest,
    releases: &BTreeMap<String, ReleaseRecord>,
    groups: &mut [DesiredGroup],
    problems: &mut Problems,
) {
    struct Provider {
        group: String,
        job: String,
        name: String,
        link_type: String,
        properties: Json,
    }
    let src = &manifest.source;
    let mut providers = Vec::new();
    for g in &manifest.instance_groups {
        for j in &g.jobs {
            let Some(job) = releases.get(&j.release).and_then(|r| r.job(&j.name)) else {
                continue;
            };
            let dj_props = {
                let mut p = json!({});
                merge_json(&mut p, &g.properties);
                merge_json(&mut p, &j.properties);
                p
            };
            for pdef in &job.spec.provides {
                let over = j.provides.get(&pdef.name);
                if over.is_some_and(|o| o.is_null()) {
                    continue; // explicitly not provided
                }
                let name = over
                    .and_then(|o| o.get("as"))
                    .and_then(|v| v.as_str())
                    .unwrap_or(&pdef.name)
                    .to_string();
                let mut properties = json!({});
                for prop in &pdef.properties {
                    let v = get_path(&dj_props, prop).cloned().or_else(|| {
                        job.spec
                            .properties
                            .get(prop)
                            .and_then(|d| d.default.clone())
                    });
                    if let Some(v) = v {
                        set_path(&mut properties, prop, v);
                    }
                }
                providers.push(Provider {
                    group: g.name.clone(),
                    job: j.name.clone(),
                    name,
                    link_type: pdef.link_type.clone(),
                    properties,
                });
            }
        }
    }
    for (gi, g) in manifest.instance_groups.iter().enumerate() {
        for (ji, j) in g.jobs.iter().enumerate() {
            let Some(job) = releases.get(&j.release).and_then(|r| r.job(&j.name)) else {
                continue;
            };
            let dj_index = groups[gi].jobs.iter().position(|d| d.name == j.name);
            for c in &job.spec.consumes {
                let path = format!("instance_groups[{gi}].jobs[{ji}].consumes.{}", c.name);
                let over = j.consumes.get(&c.name);
                if over.is_some_and(|o| o.is_null() || o == "nil") {
                    continue;
                }
                let from = over.and_then(|o| o.get("from")).and_then(|v| v.as_str());
                let candidates: Vec<&Provider> = providers
                    .iter()
                    .filter(|p| p.link_type == c.link_type)
                    .filter(|p| from.is_none_or(|f| p.name == f))
                    .collect();
                let chosen = match candidates.len() {
                    0 => None,
                    1 => Some(candidates[0]),
                    _ => {
                        let same: Vec<&&Provider> =
                            candidates.iter().filter(|p| p.group == g.name).collect();
                        if same.len() == 1 {
                            Some(*same[0])
                        } else {
                            let names: Vec<String> = candidates
                                .iter()
                                .map(|p| format!("{}.{}.{}", p.group, p.job, p.name))
                                .collect();
                            problems.push(src.problem(
                                &path,
                                format!(
                                    "job '{}' consumes link '{}' of type '{}': several providers ({}); choose one with `consumes: {{{}: {{from: NAME}}}}`",
                                    j.name, c.name, c.link_type, names.join(", "), c.name
                                ),
                            ));
                            continue;
                        }
                    }
                };
                match chosen {
                    Some(p) => {
                        if let Some(di) = dj_index {
                            groups[gi].jobs[di].consumes.insert(
                                c.name.clone(),
                                LinkSource {
                                    group: p.group.clone(),
                                    job: p.job.clone(),
                                    properties: p.properties.clone(),
                                },
                            );
                        }
                    }
                    None if c.optional => {}
                    None => problems.push(Problem {
                        line: src.line(&format!("instance_groups[{gi}].jobs[{ji}]")),
                        file: src.file.clone(),
                        path,
                        message: format!(
                            "job '{}' consumes link '{}' of type '{}', but no job in the deployment provides one{}",
                            j.name,
                            c.name,
                            c.link_type,
                            from.map(|f| format!(" named '{f}'")).unwrap_or_default()
                        ),
                    }),
                }
            }
        }
    }
}

fn needed_packages(
    groups: &[DesiredGroup],
    releases: &BTreeMap<String, ReleaseRecord>,
    compilation: &CompilationTarget,
) -> Vec<NeededPackage> {
    let mut out: Vec<NeededPackage> = Vec::new();
    for g in groups {
        if g.lifecycle == Lifecycle::Errand && g.instances == 0 {
            continue;
        }
        // Compiled on the compilation CPI's stemcell of the same os/version.
        let Some(stemcell) = g
            .stemcells
            .get(&compilation.cpi)
            .or_else(|| g.stemcells.values().next())
        else {
            continue;
        };
        let key = stemcell_key(stemcell);
        for job in &g.jobs {
            let Some(rel) = releases.get(&job.release) else {
                continue;
            };
            let Some(jr) = rel.job(&job.name) else {
                continue;
            };
            let Ok(closure) = package_closure(rel, &jr.spec.packages) else {
                continue;
            };
            for (name, fingerprint) in closure {
                if out
                    .iter()
                    .any(|p| p.fingerprint == fingerprint && p.stemcell == key)
                {
                    continue;
                }
                let Some(pr) = rel.package(&name) else {
                    continue;
                };
                let deps = package_closure(rel, &pr.spec.dependencies)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(_, f)| f)
                    .collect();
                out.push(NeededPackage {
                    name,
                    fingerprint,
                    release: rel.name().to_string(),
                    source_sha256: pr.sha256.clone(),
                    dependencies: deps,
                    stemcell: key.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cloud_config::{default_local, DiskType, VmType};
    use crate::model::manifest::parse_manifest;
    use crate::release::read_release_dir;
    use std::path::Path;

    /// A release with a `db` job providing `conn` (type db, exporting
    /// db.port) and a `web` job consuming `conn` and, optionally, `cache`.
    fn links_release(dir: &Path) -> ReleaseRecord {
        let files = [
            ("config/final.yml", "name: links\n"),
            (
                "jobs/db/spec",
                "name: db\ntemplates: {}\npackages: []\nprovides:\n- name: conn\n  type: db\n  properties: [db.port]\nproperties:\n  db.port: {default: 5432}\n",
            ),
            ("jobs/db/monit", ""),
            (
                "jobs/web/spec",
                "name: web\ntemplates: {}\npackages: []\nconsumes:\n- name: conn\n  type: db\n- name: cache\n  type: cache\n  optional: true\nproperties: {}\n",
            ),
            ("jobs/web/monit", ""),
        ];
        for (p, c) in files {
            let p = dir.join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, c).unwrap();
        }
        std::fs::create_dir_all(dir.join("packages")).unwrap();
        ReleaseRecord::from_release(&read_release_dir(dir, None).unwrap())
    }

    fn resolve_text(text: &str) -> Result<DesiredState, ResolveError> {
        let dir = tempfile::tempdir().unwrap();
        let m = parse_manifest("m.yml", text, Path::new(".")).unwrap();
        let releases = [("links".to_string(), links_release(dir.path()))]
            .into_iter()
            .collect();
        let stemcells = vec![StemcellRecord {
            name: "host".into(),
            os: "local".into(),
            version: "1".into(),
            cpi: "local".into(),
            cid: "sc-1".into(),
        }];
        resolve(&m, &default_local(), &releases, &stemcells)
    }

    fn manifest(web_consumes: &str) -> String {
        let group = |name: &str, jobs: &str| {
            format!("- name: {name}\n  instances: 1\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  networks: [{{name: default}}]\n  jobs:\n{jobs}")
        };
        format!(
            "name: l\nreleases: [{{name: links, version: latest}}]\nstemcells: [{{alias: default, os: local}}]\nupdate: {{canaries: 1, max_in_flight: 1, canary_watch_time: 1000, update_watch_time: 1000}}\ninstance_groups:\n{}{}{}",
            group("primary", "  - name: db\n    release: links\n    provides: {conn: {as: main-db}}\n"),
            group("replica", "  - name: db\n    release: links\n    provides: {conn: {as: replica-db}}\n    properties: {db: {port: 6000}}\n"),
            group("web", &format!("  - name: web\n    release: links\n{web_consumes}")),
        )
    }

    fn consumes(d: &DesiredState, group: &str) -> BTreeMap<String, LinkSource> {
        d.groups.iter().find(|g| g.name == group).unwrap().jobs[0]
            .consumes
            .clone()
    }

    fn problems(r: Result<DesiredState, ResolveError>) -> Vec<String> {
        match r {
            Err(ResolveError::Problems(p)) => p.0.iter().map(|p| p.to_string()).collect(),
            Err(e) => vec![e.to_string()],
            Ok(_) => vec![],
        }
    }

    #[test]
    fn links_across_groups_with_from_renaming_properties_and_optional() {
        let d = resolve_text(&manifest("    consumes: {conn: {from: replica-db}}\n")).unwrap();
        let c = consumes(&d, "web");
        assert_eq!(
            c.get("conn"),
            Some(&LinkSource {
                group: "replica".into(),
                job: "db".into(),
                properties: json!({"db": {"port": 6000}}),
            }),
            "the renamed provider, with its exported property"
        );
        assert!(
            !c.contains_key("cache"),
            "an optional link nobody provides is left out"
        );

        let d = resolve_text(&manifest("    consumes: {conn: {from: main-db}}\n")).unwrap();
        assert_eq!(
            consumes(&d, "web")["conn"].properties,
            json!({"db": {"port": 5432}}),
            "the spec default is exported when the manifest sets none"
        );
        let d = resolve_text(&manifest("    consumes: {conn: nil}\n")).unwrap();
        assert!(consumes(&d, "web").is_empty(), "nil consumes nothing");
    }

    #[test]
    fn ambiguous_and_unknown_links_are_located_problems() {
        let p = problems(resolve_text(&manifest("")));
        assert!(
            p.iter()
                .any(|m| m.contains("instance_groups[2].jobs[0].consumes.conn")
                    && m.contains("several providers (primary.db.main-db, replica.db.replica-db)")),
            "{p:?}"
        );
        let p = problems(resolve_text(&manifest(
            "    consumes: {conn: {from: nope}}\n",
        )));
        assert!(
            p.iter()
                .any(|m| m.contains("no job in the deployment provides one named 'nope'")),
            "{p:?}"
        );
    }

    /// The `web` group of `manifest("")`, and its manifest.
    fn web_group() -> (Manifest, InstanceGroup) {
        let m = parse_manifest("m.yml", &manifest(""), Path::new(".")).unwrap();
        let g = m.instance_groups[2].clone();
        (m, g)
    }

    #[test]
    fn group_cloud_properties_overlay_extensions_on_the_vm_type() {
        let mut cc = default_local();
        let vt = |name: &str, p: Json| VmType {
            name: name.into(),
            cloud_properties: p,
        };
        cc.vm_types = vec![vt("default", json!({"cpu": 1, "ram": 512}))];
        cc.vm_extensions = vec![vt("big", json!({"ram": 4096}))];
        let (_, mut g) = web_group();
        g.vm_extensions = vec!["big".into(), "unknown".into()];
        assert_eq!(
            group_cloud_properties(&cc, &g),
            json!({"cpu": 1, "ram": 4096})
        );
    }

    #[test]
    fn group_disk_from_a_size_or_a_disk_type() {
        let mut cc = default_local();
        cc.disk_types = vec![DiskType {
            name: "fast".into(),
            disk_size: 2048,
            cloud_properties: json!({"ssd": true}),
        }];
        let (_, mut g) = web_group();
        g.persistent_disk = Some(PersistentDisk::SizeMb(0));
        assert_eq!(group_disk(&cc, &g), None);
        g.persistent_disk = Some(PersistentDisk::SizeMb(100));
        assert_eq!(group_disk(&cc, &g).map(|d| d.size_mb), Some(100));
        g.persistent_disk = Some(PersistentDisk::Type("fast".into()));
        assert_eq!(
            group_disk(&cc, &g),
            Some(DiskConfig {
                size_mb: 2048,
                cloud_properties: json!({"ssd": true}),
            })
        );
    }

    #[test]
    fn group_networks_leave_out_unknown_names() {
        let cc = default_local();
        let (_, mut g) = web_group();
        let mut other = g.networks[0].clone();
        other.name = "nowhere".into();
        g.networks.push(other);
        let nets = group_networks(&cc, &g);
        assert_eq!(nets.len(), 1);
        assert_eq!(nets[0].name, "default");
    }

    #[test]
    fn group_stemcells_pick_the_last_matching_one_per_cpi() {
        let (m, g) = web_group();
        let az_config: BTreeMap<String, (String, Json)> =
            [("z1".to_string(), ("local".to_string(), json!({})))]
                .into_iter()
                .collect();
        let sc = |version: &str| StemcellRecord {
            name: "host".into(),
            os: "local".into(),
            version: version.into(),
            cpi: "local".into(),
            cid: format!("sc-{version}"),
        };
        let mut problems = Problems::default();
        let got = group_stemcells(&m, &[sc("1"), sc("2")], &az_config, &g, "g", &mut problems);
        assert!(problems.0.is_empty());
        assert_eq!(got.get("local").map(|s| s.cid.as_str()), Some("sc-2"));
        let got = group_stemcells(&m, &[], &az_config, &g, "g", &mut problems);
        assert!(got.is_empty());
        assert_eq!(problems.0.len(), 1);
        assert!(
            problems.0[0].to_string().contains("g.stemcell"),
            "{}",
            problems.0[0]
        );
    }
}

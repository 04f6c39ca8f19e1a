//! The records the director keeps: the shared vocabulary of the store, the
//! planner, the executor, the health monitor and cloud-check (releases,
//! stemcells, deployments, instances, VMs, disks, events, tasks, variables).
//!
//! Plain data with serde: this module must not touch the database, the
//! filesystem, CPIs or agents; the SQLite engine (`state`) stores these.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use bosun_cpi::NetworkSettings;

use sha2::Digest;

use crate::release::{JobSpec, PackageSpec, Release, ReleaseManifest};

/// Seconds since the epoch.
pub fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An uploaded release, without its archives (they are blobs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub manifest: ReleaseManifest,
    pub jobs: Vec<JobRecord>,
    pub packages: Vec<PackageRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub spec: JobSpec,
    pub fingerprint: String,
    pub templates: BTreeMap<String, String>,
    /// The job's `monit` file (rendered with its templates for ERB jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monit: Option<String>,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub spec: PackageSpec,
    pub fingerprint: String,
    /// Blob of the source archive (`packaging` + files).
    pub sha256: String,
}

impl ReleaseRecord {
    /// The record of a release; its archives are blobs named by sha256.
    pub fn from_release(r: &Release) -> ReleaseRecord {
        ReleaseRecord {
            manifest: r.manifest.clone(),
            jobs: r
                .jobs
                .iter()
                .map(|j| JobRecord {
                    spec: j.spec.clone(),
                    fingerprint: j.fingerprint.clone(),
                    templates: j.templates.clone(),
                    monit: j.monit.clone(),
                    sha256: j.sha256.clone(),
                })
                .collect(),
            packages: r
                .packages
                .iter()
                .map(|p| PackageRecord {
                    spec: p.spec.clone(),
                    fingerprint: p.fingerprint.clone(),
                    sha256: p.sha256.clone(),
                })
                .collect(),
        }
    }

    /// The record of a compiled release: [`ReleaseRecord::from_release`],
    /// plus a package record (no source blob: `sha256` empty) for every
    /// compiled package the release has no source for, made from its name,
    /// fingerprint and dependencies.
    pub fn from_compiled_release(r: &Release) -> ReleaseRecord {
        let mut rec = ReleaseRecord::from_release(r);
        for c in &r.compiled_packages {
            if rec.package(&c.name).is_some() {
                continue;
            }
            rec.packages.push(PackageRecord {
                spec: PackageSpec {
                    name: c.name.clone(),
                    dependencies: c.dependencies.clone(),
                    files: Vec::new(),
                    excluded_files: Vec::new(),
                },
                fingerprint: c.fingerprint.clone(),
                sha256: String::new(),
            });
        }
        rec.packages.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        rec
    }

    /// The version of package `name` as the release's manifest lists it
    /// (source or compiled entry), else its fingerprint.
    pub fn package_version(&self, name: &str) -> Option<String> {
        let m = &self.manifest;
        m.packages
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.version.clone())
            .or_else(|| {
                m.compiled_packages
                    .iter()
                    .find(|e| e.name == name)
                    .map(|e| e.version.clone())
            })
            .or_else(|| self.package(name).map(|p| p.fingerprint.clone()))
    }

    pub fn name(&self) -> &str {
        &self.manifest.name
    }
    pub fn version(&self) -> &str {
        &self.manifest.version
    }
    pub fn job(&self, name: &str) -> Option<&JobRecord> {
        self.jobs.iter().find(|j| j.spec.name == name)
    }
    pub fn package(&self, name: &str) -> Option<&PackageRecord> {
        self.packages.iter().find(|p| p.spec.name == name)
    }

    /// What a compiled package of `name` is cached by (with the stemcell):
    /// its fingerprint when it has no dependencies, else a sha256 over its
    /// fingerprint and each dependency's name and compile key. BOSH's
    /// fingerprints name dependencies but not their content, so a changed
    /// dependency must change this key. `None` for an unknown package or a
    /// dependency cycle.
    pub fn compile_key(&self, name: &str) -> Option<String> {
        self.compile_key_in(name, &mut Vec::new())
    }

    fn compile_key_in(&self, name: &str, stack: &mut Vec<String>) -> Option<String> {
        if stack.iter().any(|s| s == name) {
            return None;
        }
        let p = self.package(name)?;
        if p.spec.dependencies.is_empty() {
            return Some(p.fingerprint.clone());
        }
        stack.push(name.to_string());
        let mut deps = Vec::with_capacity(p.spec.dependencies.len());
        for d in &p.spec.dependencies {
            deps.push(format!("{d}:{}", self.compile_key_in(d, stack)?));
        }
        stack.pop();
        deps.sort();
        let text = format!("{};{}", p.fingerprint, deps.join(","));
        Some(hex::encode(sha2::Sha256::digest(text.as_bytes())))
    }
}

/// A stemcell known to a CPI.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StemcellRecord {
    pub name: String,
    pub os: String,
    pub version: String,
    pub cpi: String,
    pub cid: String,
}

/// A package compiled for a stemcell.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompiledPackage {
    pub name: String,
    pub fingerprint: String,
    /// `os/version` of the stemcell it was compiled on.
    pub stemcell: String,
    pub sha256: String,
    pub size: u64,
}

/// A deployment as last deployed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub name: String,
    /// The manifest text as given (after interpolation).
    pub manifest: String,
    pub releases: Vec<String>,
    pub stemcells: Vec<String>,
    pub updated_at: i64,
    /// The release versions and stemcells the deploy resolved to (absent in
    /// records of older directors: `clean-up` then keeps every version of
    /// the deployment's releases and every stemcell).
    #[serde(default)]
    pub uses: Option<Uses>,
}

/// What a deployment's jobs and VMs were resolved to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Uses {
    /// `name/version`.
    pub releases: BTreeSet<String>,
    /// Stemcell keys, `os/version`.
    pub stemcells: BTreeSet<String>,
}

/// What the director recorded about one instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    pub deployment: String,
    pub group: String,
    pub index: u32,
    pub az: String,
    pub bootstrap: bool,
    /// IPs reserved for it, by network name.
    pub networks: BTreeMap<String, NetworkSettings>,
    pub vm: Option<VmRecord>,
    /// Set before `create_vm` is called, cleared once its cid is recorded:
    /// a crash in between leaves a VM that carries this token in its tags.
    pub pending_vm_token: Option<String>,
    pub disk: Option<DiskRecord>,
    pub applied: Option<AppliedRecord>,
    /// What was last deployed to this instance and seen running: enough to
    /// recreate its VM without the manifest or the releases (the resurrector
    /// and cloud-check use it).
    #[serde(default)]
    pub deployed: Option<DeployedSpec>,
    /// What the operator asked for (`start`, `stop`, `stop --hard`).
    #[serde(default)]
    pub state: InstanceState,
}

/// The state the operator wants an instance in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Running (the default).
    #[default]
    Started,
    /// Jobs stopped, VM kept (`stop`).
    Stopped,
    /// No VM; disk and IPs kept (`stop --hard`).
    Detached,
    /// An errand's instance: a VM only while `run-errand` runs it.
    Errand,
}

/// The VM, spec and packages an instance last ran with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployedSpec {
    pub vm: VmCreate,
    pub spec: bosun_agent::protocol::ApplySpec,
    pub applied: AppliedRecord,
    /// Stemcell key (`os/version`) the packages are compiled for.
    pub stemcell: String,
}

impl InstanceRecord {
    /// A new instance: nothing created, nothing applied, no IPs yet.
    pub fn new(id: String, deployment: &str, group: &str, index: u32, az: &str) -> InstanceRecord {
        InstanceRecord {
            id,
            deployment: deployment.to_string(),
            group: group.to_string(),
            index,
            az: az.to_string(),
            bootstrap: index == 0,
            networks: BTreeMap::new(),
            vm: None,
            pending_vm_token: None,
            disk: None,
            applied: None,
            deployed: None,
            state: InstanceState::Started,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmRecord {
    pub cid: String,
    pub cpi: String,
    pub agent_id: String,
    /// The agent's pinned SSH host key (OpenSSH public key).
    pub host_public_key: String,
    /// Address the director dials.
    pub address: String,
    /// Digest of what the VM was created from (stemcell, cloud properties, networks).
    pub vm_digest: String,
    /// Last spec generation sent to this VM's agent.
    pub generation: u64,
    pub created_at: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub cid: String,
    pub cpi: String,
    pub size_mb: u64,
    /// Digest of size and cloud properties.
    pub digest: String,
    pub attached: bool,
}

/// The spec last applied and seen running.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppliedRecord {
    pub digest: String,
    /// Digest per job, to say which job changed.
    pub job_digests: BTreeMap<String, String>,
    pub package_fingerprints: BTreeMap<String, String>,
}

/// A persistent disk no instance owns any more (kept until deleted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OrphanDisk {
    pub cid: String,
    pub cpi: String,
    pub size_mb: u64,
    pub deployment: String,
    pub instance: String,
    pub orphaned_at: i64,
}

/// One thing that happened, for `bosun events`: what was seen, what was
/// done about it, and how that went.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log (assigned by the store).
    #[serde(default)]
    pub id: i64,
    /// Seconds since the epoch.
    pub time: i64,
    /// Milliseconds since the epoch (0 in events of older versions).
    #[serde(default)]
    pub time_ms: i64,
    /// `deploy`, `monitor`, `cloud-check`, ...
    #[serde(default)]
    pub source: String,
    pub deployment: Option<String>,
    pub instance: Option<String>,
    /// What was observed (`agent unresponsive for 5.0 s`), empty when the
    /// event is an action the operator asked for.
    #[serde(default)]
    pub seen: String,
    /// What was done (`create`, `fence`, `restart-job`, `alert`, ...).
    pub action: String,
    pub object: String,
    /// `ok`, `error: ...`, or a note.
    pub result: String,
}

impl Event {
    /// An event stamped now.
    pub fn new(source: &str, deployment: &str, instance: Option<&str>) -> Event {
        let ms = now_ms();
        Event {
            id: 0,
            time: ms / 1000,
            time_ms: ms,
            source: source.to_string(),
            deployment: Some(deployment.to_string()),
            instance: instance.map(str::to_string),
            seen: String::new(),
            action: String::new(),
            object: String::new(),
            result: String::new(),
        }
    }
    pub fn seen(mut self, s: impl Into<String>) -> Event {
        self.seen = s.into();
        self
    }
    pub fn did(mut self, action: &str, object: impl Into<String>) -> Event {
        self.action = action.to_string();
        self.object = object.into();
        self
    }
    pub fn result(mut self, r: impl Into<String>) -> Event {
        self.result = r.into();
        self
    }
}

/// What the planner decided to create for an instance's VM, and what the
/// store records as the VM an instance last ran with.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmCreate {
    pub cpi: String,
    pub stemcell_cid: String,
    pub cloud_properties: Json,
    pub networks: BTreeMap<String, NetworkSettings>,
    pub env: Json,
    pub vm_digest: String,
}

/// One director operation (`deploy`, `stop`, ...) and how it ended. Its
/// logs live in `tasks/<id>/` under the state dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    #[serde(default)]
    pub id: i64,
    /// The command line, without secrets (`deploy manifest.yml`).
    pub description: String,
    pub deployment: Option<String>,
    /// `running`, `done`, `error`, `cancelled`.
    pub state: String,
    pub started_at: i64,
    pub ended_at: Option<i64>,
    /// What it did, or why it failed.
    pub result: String,
    pub pid: u32,
}

/// A generated variable of a deployment, without its value (which is kept
/// sealed beside it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariableRecord {
    pub deployment: String,
    pub name: String,
    /// Changes whenever the value is (re)generated.
    pub id: String,
    /// `password`, `certificate`, `ssh`, `rsa`.
    pub kind: String,
    /// Digest of the definition it was generated from.
    pub definition_digest: String,
    pub created_at: i64,
}

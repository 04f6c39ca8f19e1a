//! The deployment manifest (BOSH manifest v2): parsing and validating one
//! YAML file into typed values, reporting every problem at once with file,
//! path and line.
//!
//! This module owns the manifest's shape and the checks that need nothing
//! but the manifest itself. It must not look at the cloud-config (see
//! `cloud_config::validate_manifest`), read releases or touch any state.
//! Deliberate differences from BOSH: `update` is required; releases may name
//! a local `path` and no `url`; global v1 `properties` are refused.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;

use serde::Serialize;

use crate::model::names;
use crate::model::problems::{Problems, SourceMap};
use crate::model::refs::{job_ref, release_ref, JobRef, ReleaseRef};
use crate::model::values::{
    Lifecycle, MaxInFlight, RestartPolicy, Seconds, ValueError, VmStrategy, WatchTime,
};
use crate::model::yaml::{self, Decoder, Fields, Item, Node};

/// A deployment manifest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Manifest {
    pub name: String,
    pub releases: Vec<ReleaseRef>,
    pub stemcells: Vec<StemcellRef>,
    pub instance_groups: Vec<InstanceGroup>,
    pub update: UpdatePolicy,
    /// Health monitor settings for every group (`health:`; defaults when absent).
    pub health: HealthPolicy,
    pub variables: Vec<VariableDef>,
    pub tags: BTreeMap<String, String>,
    /// The manifest's own addons (placed like the runtime-config's).
    pub addons: Vec<crate::model::addons::Addon>,
    /// `{}` when absent.
    pub features: serde_json::Value,
    /// Path -> line for this file.
    #[serde(skip)]
    pub source: SourceMap,
    /// The whole document as JSON (addons included, as written).
    pub raw: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StemcellRef {
    pub alias: String,
    pub os: Option<String>,
    pub name: Option<String>,
    /// `"latest"` when absent.
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InstanceGroup {
    pub name: String,
    pub azs: Vec<String>,
    pub instances: u32,
    pub jobs: Vec<JobRef>,
    pub vm_type: String,
    pub vm_extensions: Vec<String>,
    /// A stemcell alias from [`Manifest::stemcells`].
    pub stemcell: String,
    pub persistent_disk: Option<PersistentDisk>,
    pub networks: Vec<NetworkRef>,
    pub lifecycle: Lifecycle,
    /// An object, `{}` when absent.
    pub properties: serde_json::Value,
    /// An object, `{}` when absent.
    pub env: serde_json::Value,
    pub update: Option<UpdateOverride>,
    pub health: Option<HealthOverride>,
    /// How a lost VM of this group is replaced; `None`: consistent when the
    /// group has a persistent disk, available otherwise.
    pub restart_policy: Option<RestartPolicy>,
    pub migrated_from: Vec<serde_json::Value>,
}

/// The health monitor's ladder, per instance group. Durations in the
/// manifest are seconds (`5`, `0.5`) or carry a unit (`500ms`, `2m`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HealthPolicy {
    /// Whether the monitor repairs at all (alerts are raised either way).
    pub resurrection: bool,
    /// How often each agent is asked for its state.
    pub heartbeat_interval: std::time::Duration,
    /// Silence after which an agent counts as unresponsive.
    pub agent_timeout: std::time::Duration,
    /// How long a job may stay failing (while the agent restarts its
    /// processes) before the monitor restarts the job.
    pub job_restart_after: std::time::Duration,
    /// After a repair of an instance, how long before it may be repaired again.
    pub quiet_period: std::time::Duration,
    /// More repairs than this within `flap_window`: stop and alert.
    pub max_repairs: u32,
    pub flap_window: std::time::Duration,
    /// Meltdown guard (deployment-wide, from the top-level `health`): when at
    /// least `meltdown_min_down` instances are down and they are more than
    /// `meltdown_percent`% of the deployment, alert instead of repairing.
    pub meltdown_min_down: u32,
    pub meltdown_percent: u32,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        use std::time::Duration;
        HealthPolicy {
            resurrection: true,
            heartbeat_interval: Duration::from_secs(1),
            agent_timeout: Duration::from_secs(5),
            job_restart_after: Duration::from_secs(10),
            quiet_period: Duration::from_secs(10),
            max_repairs: 3,
            flap_window: Duration::from_secs(600),
            meltdown_min_down: 5,
            meltdown_percent: 20,
        }
    }
}

/// A group's `health:` (each set field replaces the top-level one).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct HealthOverride {
    pub resurrection: Option<bool>,
    pub heartbeat_interval: Option<std::time::Duration>,
    pub agent_timeout: Option<std::time::Duration>,
    pub job_restart_after: Option<std::time::Duration>,
    pub quiet_period: Option<std::time::Duration>,
    pub max_repairs: Option<u32>,
    pub flap_window: Option<std::time::Duration>,
    pub meltdown_min_down: Option<u32>,
    pub meltdown_percent: Option<u32>,
}

impl HealthPolicy {
    /// This policy with the set fields of `o` replacing its own.
    pub fn with_override(&self, o: Option<&HealthOverride>) -> HealthPolicy {
        let Some(o) = o else {
            return self.clone();
        };
        HealthPolicy {
            resurrection: o.resurrection.unwrap_or(self.resurrection),
            heartbeat_interval: o.heartbeat_interval.unwrap_or(self.heartbeat_interval),
            agent_timeout: o.agent_timeout.unwrap_or(self.agent_timeout),
            job_restart_after: o.job_restart_after.unwrap_or(self.job_restart_after),
            quiet_period: o.quiet_period.unwrap_or(self.quiet_period),
            max_repairs: o.max_repairs.unwrap_or(self.max_repairs),
            flap_window: o.flap_window.unwrap_or(self.flap_window),
            meltdown_min_down: o.meltdown_min_down.unwrap_or(self.meltdown_min_down),
            meltdown_percent: o.meltdown_percent.unwrap_or(self.meltdown_percent),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PersistentDisk {
    /// `persistent_disk: N` (MB).
    SizeMb(u64),
    /// `persistent_disk_type: name` (a cloud-config disk type).
    Type(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetworkRef {
    pub name: String,
    pub static_ips: Vec<Ipv4Addr>,
    /// Which of `dns`, `gateway`, `addressable` this network is the default for.
    pub default: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpdatePolicy {
    pub canaries: u32,
    pub max_in_flight: MaxInFlight,
    pub canary_watch_time: WatchTime,
    pub update_watch_time: WatchTime,
    /// Default true: instance groups one after another.
    pub serial: bool,
    /// Default delete-create.
    pub vm_strategy: VmStrategy,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UpdateOverride {
    pub canaries: Option<u32>,
    pub max_in_flight: Option<MaxInFlight>,
    pub canary_watch_time: Option<WatchTime>,
    pub update_watch_time: Option<WatchTime>,
    pub serial: Option<bool>,
    pub vm_strategy: Option<VmStrategy>,
}

/// A declared variable (`type` is kept in `kind`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VariableDef {
    pub name: String,
    pub kind: String,
    /// `{}` when absent.
    pub options: serde_json::Value,
}

impl UpdatePolicy {
    /// This policy with the set fields of `o` replacing its own.
    pub fn with_override(&self, o: Option<&UpdateOverride>) -> UpdatePolicy {
        let Some(o) = o else {
            return self.clone();
        };
        UpdatePolicy {
            canaries: o.canaries.unwrap_or(self.canaries),
            max_in_flight: o.max_in_flight.unwrap_or(self.max_in_flight),
            canary_watch_time: o.canary_watch_time.unwrap_or(self.canary_watch_time),
            update_watch_time: o.update_watch_time.unwrap_or(self.update_watch_time),
            serial: o.serial.unwrap_or(self.serial),
            vm_strategy: o.vm_strategy.unwrap_or(self.vm_strategy),
        }
    }
}

impl Manifest {
    pub fn instance_group(&self, name: &str) -> Option<&InstanceGroup> {
        self.instance_groups.iter().find(|g| g.name == name)
    }

    /// The update policy for one group (top-level policy with its override).
    pub fn update_for(&self, group: &InstanceGroup) -> UpdatePolicy {
        self.update.with_override(group.update.as_ref())
    }

    /// The health policy for one group (top-level `health` with its override).
    pub fn health_for(&self, group: &InstanceGroup) -> HealthPolicy {
        self.health.with_override(group.health.as_ref())
    }

    /// The restart policy for one group: as written, else consistent for
    /// groups with a persistent disk and available for the rest.
    pub fn restart_policy_for(&self, group: &InstanceGroup) -> RestartPolicy {
        group.restart_policy.unwrap_or(match group.persistent_disk {
            Some(_) => RestartPolicy::Consistent,
            None => RestartPolicy::Available,
        })
    }
}

const TOP_KEYS: &[&str] = &[
    "releases",
    "stemcells",
    "instance_groups",
    "variables",
    "features",
    "tags",
    "addons",
    "properties",
    "health",
];
const STEMCELL_KEYS: &[&str] = &["os", "name", "version"];
const GROUP_REQUIRED: &[&str] = &[
    "name",
    "instances",
    "jobs",
    "vm_type",
    "stemcell",
    "networks",
];
const GROUP_KEYS: &[&str] = &[
    "azs",
    "vm_extensions",
    "persistent_disk",
    "persistent_disk_type",
    "lifecycle",
    "properties",
    "env",
    "update",
    "health",
    "restart_policy",
    "migrated_from",
];
const HEALTH_KEYS: &[&str] = &[
    "resurrection",
    "heartbeat_interval",
    "agent_timeout",
    "job_restart_after",
    "quiet_period",
    "max_repairs",
    "flap_window",
    "meltdown",
];
const MELTDOWN_KEYS: &[&str] = &["minimum_down", "percent"];
const UPDATE_REQUIRED: &[&str] = &[
    "canaries",
    "max_in_flight",
    "canary_watch_time",
    "update_watch_time",
];
const UPDATE_OPTIONAL: &[&str] = &["serial", "vm_strategy"];
const NETWORK_DEFAULTS: &[&str] = &["dns", "gateway", "addressable"];
const VARIABLE_TYPES: &[&str] = &["password", "certificate", "ssh", "rsa"];

/// Parse and validate a manifest. `base_dir` is the manifest's directory,
/// against which release `path`s are resolved.
pub fn parse_manifest(file: &str, text: &str, base_dir: &Path) -> Result<Manifest, Problems> {
    let root = yaml::parse(file, text).map_err(|p| Problems(vec![p]))?;
    if root.is_null() {
        let p = SourceMap::new(file).problem("", "the manifest is empty");
        return Err(Problems(vec![p]));
    }
    let mut source = SourceMap::new(file);
    let mut problems = Problems::default();
    let manifest = {
        let mut d = Decoder::new(&mut source, &mut problems);
        d.record(&root, "");
        decode(&mut d, &root, base_dir)
    };
    problems.into_result()?;
    match manifest {
        Some(mut m) => {
            m.source = source;
            Ok(m)
        }
        // Decoding gives up only after reporting why.
        None => Err(Problems(vec![source.problem("", "not a manifest")])),
    }
}

fn decode(d: &mut Decoder, root: &Node, base_dir: &Path) -> Option<Manifest> {
    let f = d.map(root, "", &["name", "update"], TOP_KEYS)?;
    if f.get("properties").is_some() {
        d.problem(
            "properties",
            "v1 global properties are not supported; put properties under jobs",
        );
    }
    let name = names::decode(d, &f, "name", "deployment name");

    // Names already listed, one set per list (lists may be long).
    let mut releases = Vec::new();
    let mut seen = HashSet::new();
    for it in d.opt_seq(&f, "releases") {
        if let Some(r) = release_ref(d, &it, base_dir) {
            if !seen.insert(r.name.clone()) {
                d.problem(
                    &yaml::child_path(&it.path, "name"),
                    format!("release '{}' is listed twice", r.name),
                );
            }
            releases.push(r);
        }
    }

    let mut stemcells = Vec::new();
    let mut seen = HashSet::new();
    for it in d.opt_seq(&f, "stemcells") {
        if let Some(s) = stemcell(d, &it) {
            if !seen.insert(s.alias.clone()) {
                d.problem(
                    &yaml::child_path(&it.path, "alias"),
                    format!("stemcell alias '{}' is used twice", s.alias),
                );
            }
            stemcells.push(s);
        }
    }

    let update = match f.get("update") {
        Some(n) => update_policy(d, n, "update"),
        None => None,
    };
    let health = match f.get("health").filter(|n| !n.is_null()) {
        Some(n) => HealthPolicy::default().with_override(health_override(d, n, "health").as_ref()),
        None => HealthPolicy::default(),
    };

    let mut groups: Vec<InstanceGroup> = Vec::new();
    let mut seen = HashSet::new();
    for it in d.opt_seq(&f, "instance_groups") {
        if let Some(g) = instance_group(d, &it, &releases, &stemcells) {
            if !seen.insert(g.name.clone()) {
                d.problem(
                    &yaml::child_path(&it.path, "name"),
                    format!("instance group name '{}' is used twice", g.name),
                );
            }
            groups.push(g);
        }
    }

    let mut variables: Vec<VariableDef> = Vec::new();
    let mut seen = HashSet::new();
    for it in d.opt_seq(&f, "variables") {
        if let Some(v) = variable(d, &it) {
            if !seen.insert(v.name.clone()) {
                d.problem(
                    &yaml::child_path(&it.path, "name"),
                    format!("variable '{}' is declared twice", v.name),
                );
            }
            variables.push(v);
        }
    }

    let mut tags = BTreeMap::new();
    if let Some(n) = f.get("tags").filter(|n| !n.is_null()) {
        let path = f.child("tags");
        if let Some(entries) = d.any_map(n, &path) {
            for (k, v) in entries.entries() {
                if let Some(v) = d.node_text(v, &entries.child(k)) {
                    tags.insert(k.clone(), v);
                }
            }
        }
    }
    let features = d.json_object(&f, "features");
    let addons = crate::model::addons::addons(d, &f, &releases);

    Some(Manifest {
        name: name?,
        releases,
        stemcells,
        instance_groups: groups,
        update: update?,
        health,
        variables,
        tags,
        features,
        addons,
        source: SourceMap::default(),
        raw: root.to_json(),
    })
}

fn stemcell(d: &mut Decoder, it: &Item) -> Option<StemcellRef> {
    let f = d.map(it.node, &it.path, &["alias"], STEMCELL_KEYS)?;
    let alias = d.str(&f, "alias");
    let os = d.opt_str(&f, "os");
    let name = d.opt_str(&f, "name");
    if !f.has("os") && !f.has("name") {
        d.problem(&it.path, "a stemcell needs 'os' or 'name'");
    }
    let version = d.opt_text(&f, "version").unwrap_or_else(|| "latest".into());
    Some(StemcellRef {
        alias: alias?,
        os,
        name,
        version,
    })
}

/// Parse a value through `FromStr`, taking numbers as their text.
fn parsed<T: FromStr<Err = ValueError>>(d: &mut Decoder, f: &Fields, key: &str) -> Option<T> {
    let n = f.get(key)?;
    let path = f.child(key);
    let text = match &n.value {
        yaml::NodeValue::Int(i) => i.to_string(),
        yaml::NodeValue::Float(x) => x.to_string(),
        yaml::NodeValue::String(s) => s.clone(),
        _ => {
            d.node_str(n, &path);
            return None;
        }
    };
    match text.parse::<T>() {
        Ok(v) => Some(v),
        Err(e) => {
            d.problem(&path, e.to_string());
            None
        }
    }
}

fn update_override(d: &mut Decoder, n: &Node, path: &str) -> Option<UpdateOverride> {
    let keys: Vec<&str> = UPDATE_REQUIRED
        .iter()
        .chain(UPDATE_OPTIONAL)
        .copied()
        .collect();
    let f = d.map(n, path, &[], &keys)?;
    Some(UpdateOverride {
        canaries: d.opt_u32(&f, "canaries"),
        max_in_flight: parsed(d, &f, "max_in_flight"),
        canary_watch_time: parsed(d, &f, "canary_watch_time"),
        update_watch_time: parsed(d, &f, "update_watch_time"),
        serial: d.opt_bool(&f, "serial"),
        vm_strategy: parsed(d, &f, "vm_strategy"),
    })
}

fn health_override(d: &mut Decoder, n: &Node, path: &str) -> Option<HealthOverride> {
    let f = d.map(n, path, &[], HEALTH_KEYS)?;
    let dur = |d: &mut Decoder, k: &str| parsed::<Seconds>(d, &f, k).map(|s| s.0);
    let mut o = HealthOverride {
        resurrection: d.opt_bool(&f, "resurrection"),
        heartbeat_interval: dur(d, "heartbeat_interval"),
        agent_timeout: dur(d, "agent_timeout"),
        job_restart_after: dur(d, "job_restart_after"),
        quiet_period: dur(d, "quiet_period"),
        max_repairs: d.opt_u32(&f, "max_repairs"),
        flap_window: dur(d, "flap_window"),
        ..HealthOverride::default()
    };
    if o.heartbeat_interval.is_some_and(|t| t.is_zero()) {
        d.problem(&f.child("heartbeat_interval"), "must be more than 0");
    }
    if let Some(m) = f.get("meltdown").filter(|n| !n.is_null()) {
        if let Some(mf) = d.map(m, &f.child("meltdown"), &[], MELTDOWN_KEYS) {
            o.meltdown_min_down = d.opt_u32(&mf, "minimum_down");
            o.meltdown_percent = d.opt_u32(&mf, "percent");
            if let Some(p) = o.meltdown_percent.filter(|p| *p > 100) {
                d.problem(
                    &mf.child("percent"),
                    ValueError::Percent(p.to_string()).to_string(),
                );
            }
        }
    }
    Some(o)
}

fn update_policy(d: &mut Decoder, n: &Node, path: &str) -> Option<UpdatePolicy> {
    // Check the required keys once, then read like an override.
    let f = d.map(n, path, UPDATE_REQUIRED, UPDATE_OPTIONAL)?;
    let o = UpdateOverride {
        canaries: d.u32(&f, "canaries"),
        max_in_flight: parsed(d, &f, "max_in_flight"),
        canary_watch_time: parsed(d, &f, "canary_watch_time"),
        update_watch_time: parsed(d, &f, "update_watch_time"),
        serial: d.opt_bool(&f, "serial"),
        vm_strategy: parsed(d, &f, "vm_strategy"),
    };
    Some(UpdatePolicy {
        canaries: o.canaries?,
        max_in_flight: o.max_in_flight?,
        canary_watch_time: o.canary_watch_time?,
        update_watch_time: o.update_watch_time?,
        serial: o.serial.unwrap_or(true),
        vm_strategy: o.vm_strategy.unwrap_or(VmStrategy::DeleteCreate),
    })
}

fn instance_group(
    d: &mut Decoder,
    it: &Item,
    releases: &[ReleaseRef],
    stemcells: &[StemcellRef],
) -> Option<InstanceGroup> {
    let f = d.map(it.node, &it.path, GROUP_REQUIRED, GROUP_KEYS)?;
    let name = names::decode(d, &f, "name", "instance group name");
    let azs = names::decode_list(d, &f, "azs", "az name");
    let instances = d.u32(&f, "instances");
    let vm_type = names::decode(d, &f, "vm_type", "vm type name");
    let vm_extensions = names::decode_list(d, &f, "vm_extensions", "vm extension name");

    let stemcell = d.str(&f, "stemcell");
    if let Some(s) = &stemcell {
        if !stemcells.iter().any(|x| &x.alias == s) {
            let aliases: Vec<&str> = stemcells.iter().map(|x| x.alias.as_str()).collect();
            let hint = yaml::did_you_mean(s, &aliases);
            d.problem(
                &f.child("stemcell"),
                format!("stemcell alias '{s}' is not declared in 'stemcells'{hint}"),
            );
        }
    }

    let persistent_disk = match (f.has("persistent_disk"), f.has("persistent_disk_type")) {
        (true, true) => {
            d.problem(
                &f.child("persistent_disk_type"),
                "use either persistent_disk (MB) or persistent_disk_type, not both",
            );
            None
        }
        (true, false) => d
            .u64(&f, "persistent_disk")
            .filter(|mb| *mb > 0)
            .map(PersistentDisk::SizeMb),
        (false, true) => {
            names::decode(d, &f, "persistent_disk_type", "disk type name").map(PersistentDisk::Type)
        }
        (false, false) => None,
    };

    let lifecycle = if f.has("lifecycle") {
        parsed(d, &f, "lifecycle").unwrap_or(Lifecycle::Service)
    } else {
        Lifecycle::Service
    };

    let mut jobs: Vec<JobRef> = Vec::new();
    let mut seen = HashSet::new();
    for j in d.seq(&f, "jobs") {
        if let Some(job) = job_ref(d, &j, releases) {
            if !seen.insert(job.name.clone()) {
                d.problem(
                    &yaml::child_path(&j.path, "name"),
                    format!("job '{}' is listed twice in this instance group", job.name),
                );
            }
            jobs.push(job);
        }
    }

    let mut networks: Vec<NetworkRef> = Vec::new();
    let mut seen = HashSet::new();
    for nit in d.seq(&f, "networks") {
        if let Some(net) = network_ref(d, &nit, instances) {
            if !seen.insert(net.name.clone()) {
                d.problem(
                    &yaml::child_path(&nit.path, "name"),
                    format!(
                        "network '{}' is listed twice in this instance group",
                        net.name
                    ),
                );
            }
            networks.push(net);
        }
    }
    if networks.len() > 1 {
        for what in ["dns", "gateway"] {
            let n = networks
                .iter()
                .filter(|x| x.default.iter().any(|d| d == what))
                .count();
            if n != 1 {
                d.problem(
                    &f.child("networks"),
                    format!(
                        "with several networks, exactly one must list '{what}' in its 'default' (found {n})"
                    ),
                );
            }
        }
    }

    let properties = d.json_object(&f, "properties");
    let env = d.json_object(&f, "env");
    let update = match f.get("update").filter(|n| !n.is_null()) {
        Some(n) => update_override(d, n, &f.child("update")),
        None => None,
    };
    let health = match f.get("health").filter(|n| !n.is_null()) {
        Some(n) => health_override(d, n, &f.child("health")),
        None => None,
    };
    let restart_policy = parsed(d, &f, "restart_policy");
    let migrated_from = d
        .opt_seq(&f, "migrated_from")
        .into_iter()
        .map(|it| it.node.to_json())
        .collect();

    Some(InstanceGroup {
        name: name?,
        azs,
        instances: instances?,
        jobs,
        vm_type: vm_type?,
        vm_extensions,
        stemcell: stemcell?,
        persistent_disk,
        networks,
        lifecycle,
        properties,
        env,
        update,
        health,
        restart_policy,
        migrated_from,
    })
}

fn network_ref(d: &mut Decoder, it: &Item, instances: Option<u32>) -> Option<NetworkRef> {
    let f = d.map(it.node, &it.path, &["name"], &["static_ips", "default"])?;
    let name = names::decode(d, &f, "name", "network name");
    let mut static_ips = Vec::new();
    let mut seen = BTreeSet::new();
    let items = d.opt_seq(&f, "static_ips");
    for ip in &items {
        let Some(text) = d.node_str(ip.node, &ip.path) else {
            continue;
        };
        match text.trim().parse::<Ipv4Addr>() {
            Ok(a) => {
                if !seen.insert(a) {
                    d.problem(&ip.path, format!("static IP {a} is listed twice"));
                }
                static_ips.push(a);
            }
            Err(_) => d.problem(&ip.path, format!("'{text}' is not an IPv4 address")),
        }
    }
    if let Some(n) = instances {
        if items.len() > n as usize {
            d.problem(
                &f.child("static_ips"),
                format!(
                    "{} static IPs for {n} instance{}: give at most one per instance",
                    items.len(),
                    if n == 1 { "" } else { "s" }
                ),
            );
        }
    }
    let default = d.str_list(&f, "default");
    for (i, v) in default.iter().enumerate() {
        if !NETWORK_DEFAULTS.contains(&v.as_str()) {
            let hint = yaml::did_you_mean(v, NETWORK_DEFAULTS);
            d.problem(
                &yaml::index_path(&f.child("default"), i),
                format!("unknown default '{v}' (expected dns, gateway or addressable){hint}"),
            );
        }
    }
    Some(NetworkRef {
        name: name?,
        static_ips,
        default,
    })
}

fn variable(d: &mut Decoder, it: &Item) -> Option<VariableDef> {
    let f = d.map(it.node, &it.path, &["name", "type"], &["options"])?;
    let name = names::decode(d, &f, "name", "variable name");
    let kind = d.str(&f, "type");
    if let Some(k) = &kind {
        if !VARIABLE_TYPES.contains(&k.as_str()) {
            let hint = yaml::did_you_mean(k, VARIABLE_TYPES);
            d.problem(
                &f.child("type"),
                format!("unknown variable type '{k}' (expected password, certificate, ssh or rsa){hint}"),
            );
        }
    }
    let options = d.json_object(&f, "options");
    Some(VariableDef {
        name: name?,
        kind: kind?,
        options,
    })
}

#[cfg(test)]
pub(crate) mod tests_support {
    //! A quickstart-like manifest, valid against `cloud_config::default_local()`.

    pub(crate) const QUICKSTART: &str = "\
name: zookeeper
releases:
- name: zookeeper
  version: latest
  path: ../releases/zookeeper
stemcells:
- alias: default
  os: ubuntu-jammy
  version: '1.0'
update:
  canaries: 1
  max_in_flight: 25%
  canary_watch_time: 1000-30000
  update_watch_time: 5000
instance_groups:
- name: zookeeper
  azs: [z1]
  instances: 3
  jobs:
  - name: zookeeper
    release: zookeeper
    properties:
      zookeeper: {port: 2181}
    consumes:
      peers: {from: zk}
  vm_type: default
  stemcell: default
  persistent_disk: 1024
  networks:
  - name: default
    static_ips: [127.77.0.10, 127.77.0.11, 127.77.0.12]
- name: smoke-tests
  azs: [z1]
  lifecycle: errand
  instances: 1
  jobs:
  - name: smoke-tests
    release: zookeeper
  vm_type: default
  stemcell: default
  persistent_disk_type: default
  networks:
  - name: default
  update:
    max_in_flight: 1
    vm_strategy: create-swap-delete
variables:
- name: admin_password
  type: password
tags:
  team: data
  cost: 12
";

    pub(crate) fn quickstart() -> String {
        QUICKSTART.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    const QUICKSTART: &str = tests_support::QUICKSTART;

    fn parse(text: &str) -> Result<Manifest, Problems> {
        parse_manifest("m.yml", text, Path::new("/deploy"))
    }

    fn messages(p: &Problems) -> Vec<String> {
        p.0.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn health_and_restart_policy_defaults_overrides_and_errors() {
        use std::time::Duration;
        let m = parse(QUICKSTART).expect("valid");
        let zk = &m.instance_groups[0];
        let smoke = &m.instance_groups[1];
        assert_eq!(m.health_for(zk), HealthPolicy::default());
        assert_eq!(m.health_for(zk).agent_timeout, Duration::from_secs(5));
        assert_eq!(
            m.restart_policy_for(zk),
            RestartPolicy::Consistent,
            "has a disk"
        );
        assert_eq!(
            m.restart_policy_for(smoke),
            RestartPolicy::Consistent,
            "disk type"
        );

        let text = QUICKSTART
            .replace(
                "instance_groups:\n",
                "health:\n  agent_timeout: 3\n  heartbeat_interval: 500ms\n  meltdown: {minimum_down: 2, percent: 50}\ninstance_groups:\n",
            )
            .replace(
                "  persistent_disk: 1024\n",
                "  persistent_disk: 1024\n  restart_policy: available\n  health: {job_restart_after: 1.5, resurrection: false}\n",
            );
        let m = parse(&text).expect("valid");
        let h = m.health_for(&m.instance_groups[0]);
        assert_eq!(
            h.agent_timeout,
            Duration::from_secs(3),
            "from the top level"
        );
        assert_eq!(h.heartbeat_interval, Duration::from_millis(500));
        assert_eq!(
            h.job_restart_after,
            Duration::from_millis(1500),
            "group override"
        );
        assert!(!h.resurrection);
        assert_eq!((h.meltdown_min_down, h.meltdown_percent), (2, 50));
        assert_eq!(
            m.restart_policy_for(&m.instance_groups[0]),
            RestartPolicy::Available
        );
        assert!(
            m.health_for(&m.instance_groups[1]).resurrection,
            "other group keeps the default"
        );

        let bad = QUICKSTART.replace(
            "  persistent_disk: 1024\n",
            "  persistent_disk: 1024\n  restart_policy: eventual\n  health: {agent_timeout: soon, heartbeat: 1}\n",
        );
        let e = parse(&bad).expect_err("invalid");
        let msgs = messages(&e);
        assert!(
            msgs.iter().any(|m| m.starts_with("m.yml:29: instance_groups[0].restart_policy: expected 'consistent' or 'available', found 'eventual'")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("instance_groups[0].health.agent_timeout: expected seconds")),
            "{msgs:?}"
        );
        assert!(
            msgs.iter()
                .any(|m| m.contains("instance_groups[0].health") && m.contains("heartbeat")),
            "unknown key named: {msgs:?}"
        );
    }

    #[test]
    fn manifest_quickstart_parses_to_exact_values() {
        let m = parse(QUICKSTART).expect("valid");
        assert_eq!(m.name, "zookeeper");
        assert_eq!(
            m.releases,
            vec![ReleaseRef {
                name: "zookeeper".into(),
                version: "latest".into(),
                path: Some(PathBuf::from("/deploy/../releases/zookeeper")),
            }]
        );
        assert_eq!(
            m.stemcells,
            vec![StemcellRef {
                alias: "default".into(),
                os: Some("ubuntu-jammy".into()),
                name: None,
                version: "1.0".into(),
            }]
        );
        assert_eq!(
            m.update,
            UpdatePolicy {
                canaries: 1,
                max_in_flight: MaxInFlight::Percent(25),
                canary_watch_time: WatchTime {
                    min_ms: 1000,
                    max_ms: 30000
                },
                update_watch_time: WatchTime {
                    min_ms: 5000,
                    max_ms: 5000
                },
                serial: true,
                vm_strategy: VmStrategy::DeleteCreate,
            }
        );
        assert_eq!(m.instance_groups.len(), 2);
        let zk = &m.instance_groups[0];
        assert_eq!(
            *zk,
            InstanceGroup {
                name: "zookeeper".into(),
                azs: vec!["z1".into()],
                instances: 3,
                jobs: vec![JobRef {
                    name: "zookeeper".into(),
                    release: "zookeeper".into(),
                    properties: json!({"zookeeper": {"port": 2181}}),
                    consumes: BTreeMap::from([("peers".to_string(), json!({"from": "zk"}))]),
                    provides: BTreeMap::new(),
                    custom_provider_definitions: vec![],
                }],
                vm_type: "default".into(),
                vm_extensions: vec![],
                stemcell: "default".into(),
                persistent_disk: Some(PersistentDisk::SizeMb(1024)),
                networks: vec![NetworkRef {
                    name: "default".into(),
                    static_ips: vec![
                        Ipv4Addr::new(127, 77, 0, 10),
                        Ipv4Addr::new(127, 77, 0, 11),
                        Ipv4Addr::new(127, 77, 0, 12)
                    ],
                    default: vec![],
                }],
                lifecycle: Lifecycle::Service,
                properties: json!({}),
                env: json!({}),
                update: None,
                health: None,
                restart_policy: None,
                migrated_from: vec![],
            }
        );
        let smoke = &m.instance_groups[1];
        assert_eq!(smoke.lifecycle, Lifecycle::Errand);
        assert_eq!(
            smoke.persistent_disk,
            Some(PersistentDisk::Type("default".into()))
        );
        let eff = m.update_for(smoke);
        assert_eq!(eff.max_in_flight, MaxInFlight::Count(1));
        assert_eq!(eff.vm_strategy, VmStrategy::CreateSwapDelete);
        assert_eq!(eff.canaries, 1);
        assert_eq!(
            m.variables,
            vec![VariableDef {
                name: "admin_password".into(),
                kind: "password".into(),
                options: json!({}),
            }]
        );
        assert_eq!(m.tags.get("cost").map(String::as_str), Some("12"));
        assert_eq!(m.features, json!({}));
        assert_eq!(m.raw["instance_groups"][0]["instances"], 3);
        assert_eq!(
            m.source
                .line("instance_groups[0].networks[0].static_ips[1]"),
            Some(31)
        );
    }

    #[test]
    fn manifest_unknown_key_gets_did_you_mean_with_line() {
        let text = QUICKSTART.replace("  instances: 3\n", "  instnces: 3\n");
        let e = parse(&text).expect_err("invalid");
        let msgs = messages(&e);
        assert_eq!(
            msgs,
            vec![
                "m.yml:18: instance_groups[0].instnces: unknown key 'instnces' (did you mean 'instances'?)",
                "m.yml:16: instance_groups[0].instances: missing required key 'instances'",
            ],
        );
    }

    #[test]
    fn manifest_reports_every_problem_with_path_and_line() {
        let text = "\
name: broken
properties: {a: 1}
releases:
- name: zookeeper
stemcells:
- alias: default
  os: ubuntu-jammy
update:
  canaries: -1
  max_in_flight: 0%
  canary_watch_time: 30000-1000
  update_watch_time: 5000
instance_groups:
- name: zk
  instances: 1
  jobs:
  - name: zookeeper
    release: zookeepr
  vm_type: default
  stemcell: ubuntu
  networks:
  - name: default
    static_ips: [10.0.0.1, 10.0.0.300]
- name: zk
  instances: 1
  jobs: []
  vm_type: default
  stemcell: default
  persistent_disk: 10
  persistent_disk_type: big
  networks: [{name: default}]
";
        let e = parse(text).expect_err("invalid");
        let got: Vec<(String, Option<usize>)> =
            e.0.iter().map(|p| (p.path.clone(), p.line)).collect();
        let want: Vec<(&str, usize)> = vec![
            ("properties", 2),
            ("update.canaries", 9),
            ("update.max_in_flight", 10),
            ("update.canary_watch_time", 11),
            ("instance_groups[0].stemcell", 20),
            ("instance_groups[0].jobs[0].release", 18),
            ("instance_groups[0].networks[0].static_ips[1]", 23),
            // More static IPs than instances.
            ("instance_groups[0].networks[0].static_ips", 23),
            ("instance_groups[1].persistent_disk_type", 30),
            ("instance_groups[1].name", 24),
        ];
        let want: Vec<(String, Option<usize>)> = want
            .into_iter()
            .map(|(p, l)| (p.to_string(), Some(l)))
            .collect();
        assert_eq!(got, want, "{}", e);
        let msgs = messages(&e);
        assert!(
            msgs[0].contains("v1 global properties are not supported; put properties under jobs")
        );
        assert!(msgs[5].contains(
            "release 'zookeepr' is not declared in 'releases' (did you mean 'zookeeper'?)"
        ));
        assert!(msgs[6].contains("'10.0.0.300' is not an IPv4 address"));
    }

    #[test]
    fn manifest_bad_yaml_reports_a_line() {
        let e = parse("name: x\nupdate:\n  canaries: [1\n  max: 2\n").expect_err("bad");
        assert_eq!(e.0.len(), 1);
        assert!(e.0[0].line.is_some());
        assert_eq!(e.0[0].file, "m.yml");
    }

    #[test]
    fn manifest_update_is_required_and_so_are_its_fields() {
        let e = parse("name: x\n").expect_err("no update");
        assert_eq!(
            messages(&e),
            vec!["m.yml: update: missing required key 'update'"]
        );
        let e = parse("name: x\nupdate: {canaries: 1}\n").expect_err("partial update");
        let paths: Vec<&str> = e.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "update.max_in_flight",
                "update.canary_watch_time",
                "update.update_watch_time"
            ]
        );
    }

    #[test]
    fn manifest_max_in_flight_and_watch_time_forms() {
        assert_eq!("3".parse(), Ok(MaxInFlight::Count(3)));
        assert_eq!("50%".parse(), Ok(MaxInFlight::Percent(50)));
        assert!("-1".parse::<MaxInFlight>().is_err());
        assert!("101%".parse::<MaxInFlight>().is_err());
        assert_eq!(MaxInFlight::Percent(25).resolve(10), 3);
        assert_eq!(MaxInFlight::Percent(1).resolve(0), 1);
        assert_eq!(MaxInFlight::Count(5).resolve(2), 2);
        assert_eq!(
            "1000 - 2000".parse(),
            Ok(WatchTime {
                min_ms: 1000,
                max_ms: 2000
            })
        );
        assert!("-5".parse::<WatchTime>().is_err());
        assert!("abc".parse::<WatchTime>().is_err());
    }

    #[test]
    fn manifest_names_listed_twice_in_long_lists() {
        let n = 5000;
        let mut text = String::from(
            "name: long\nreleases:\n- {name: r, version: '1'}\n- {name: r, version: '2'}\n\
             stemcells:\n- {alias: s, os: x}\n- {alias: s, os: y}\nupdate: {canaries: 1, \
             max_in_flight: 1, canary_watch_time: 1000, update_watch_time: 1000}\n\
             variables:\n- {name: v, type: password}\n- {name: v, type: password}\n\
             instance_groups:\n",
        );
        for i in 0..n {
            text.push_str(&format!(
                "- {{name: g{i}, instances: 0, azs: [z1], vm_type: default, stemcell: s, \
                 networks: [{{name: a}}, {{name: a}}], jobs: [{{name: j, release: r}}, {{name: j, release: r}}]}}\n"
            ));
        }
        text.push_str("- {name: g7, instances: 0, azs: [z1], vm_type: default, stemcell: s, networks: [{name: a}], jobs: [{name: j, release: r}]}\n");
        let e = parse_manifest("m.yml", &text, Path::new("/")).expect_err("duplicates");
        let msgs: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        let twice = msgs.iter().filter(|m| m.contains(" twice")).count();
        assert_eq!(twice, 3 + 2 * n + 1);
        assert_eq!(
            msgs[0],
            "m.yml:4: releases[1].name: release 'r' is listed twice"
        );
        assert!(msgs.contains(
            &"m.yml:7: stemcells[1].alias: stemcell alias 's' is used twice".to_string()
        ));
        assert!(msgs
            .contains(&"m.yml:11: variables[1].name: variable 'v' is declared twice".to_string()));
        assert!(msgs.contains(&"m.yml:13: instance_groups[0].jobs[1].name: job 'j' is listed twice in this instance group".to_string()));
        assert!(msgs.contains(&"m.yml:13: instance_groups[0].networks[1].name: network 'a' is listed twice in this instance group".to_string()));
        assert!(msgs.contains(&format!(
            "m.yml:{}: instance_groups[{n}].name: instance group name 'g7' is used twice",
            13 + n
        )));
    }
}

//! The cloud-config: AZs, networks (with subnets and IP ranges), VM types,
//! VM extensions, disk types and compilation settings. Parses and validates
//! one YAML file (every problem at once), provides the built-in default for
//! the local CPI, and cross-checks a manifest against a cloud-config.
//!
//! This module owns the cloud-config's shape and the manifest-vs-cloud-config
//! checks. It must not allocate IPs (see `ipam`), talk to a CPI or touch
//! state. bosun additions to BOSH: an az's `cpi:` (default `local`).

use std::collections::BTreeSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use bosun_cpi::NetworkKind;
use ipnet::Ipv4Net;
use serde::{Serialize, Serializer};
use serde_json::json;

use crate::model::names;
use crate::model::problems::{Problems, SourceMap};
use crate::model::yaml::{self, unknown, Decoder, Fields, Item, Node};

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CloudConfig {
    /// Configured CPIs besides the built-in `local` and `docker`.
    pub cpis: Vec<CpiConfig>,
    pub azs: Vec<Az>,
    pub networks: Vec<Network>,
    pub vm_types: Vec<VmType>,
    pub vm_extensions: Vec<VmType>,
    pub disk_types: Vec<DiskType>,
    pub compilation: Compilation,
    /// Path -> line for this file.
    #[serde(skip)]
    pub source: SourceMap,
    /// The whole document as JSON.
    pub raw: serde_json::Value,
}

/// A CPI an az can name: `cpis: [{name, type, properties}]` (BOSH keeps these
/// in a separate cpi-config; bosun keeps them in the cloud-config).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpiConfig {
    pub name: String,
    /// `aws`, `docker`, `external`, or (with `exec_path`) the cloud a BOSH
    /// CPI serves (`openstack`, `vsphere`, ...).
    pub kind: String,
    /// bosun's backends: their configuration. External CPIs: sent in every
    /// request's context, as BOSH's cpi-config `properties` are.
    pub properties: serde_json::Value,
    /// How to run an external CPI (`type: external`, or any entry with an
    /// `exec_path`, which is BOSH's cpi-config shape).
    pub external: Option<ExternalExec>,
}

/// An external CPI's process: BOSH's `exec_path`, and bosun's additions.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExternalExec {
    pub exec_path: String,
    /// Arguments before the config file's.
    pub args: Vec<String>,
    /// Written to a private file whose path is passed after `config_arg`.
    #[serde(skip)]
    pub config: Option<serde_json::Value>,
    /// The flag before the config file's path (default `-configPath`, as
    /// BOSH's Go CPIs take it).
    pub config_arg: String,
    /// Seconds one call may take (default 600).
    pub timeout_secs: Option<u64>,
}

/// CPI names every director knows without configuration.
pub const BUILTIN_CPIS: &[&str] = &["local", "docker"];
/// CPI types a `cpis` entry may have (any type with an `exec_path`).
pub const CPI_TYPES: &[&str] = &["aws", "docker", "external"];
/// Keys of a `cpis` entry only external CPIs have.
const EXTERNAL_KEYS: &[&str] = &["exec_path", "args", "config", "config_arg", "timeout"];

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Az {
    pub name: String,
    /// Which CPI serves this az (default `local`).
    pub cpi: String,
    pub cloud_properties: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Network {
    pub name: String,
    pub kind: NetworkKind,
    /// Manual networks: their subnets. Dynamic networks: their `subnets`
    /// (range `0.0.0.0/0`, only `dns`/`azs`/`cloud_properties` meaningful),
    /// or one such subnet built from the network's own `dns`. Vip: none.
    pub subnets: Vec<Subnet>,
    /// The network's own `cloud_properties` (dynamic and vip networks), `{}` otherwise.
    pub cloud_properties: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Subnet {
    #[serde(serialize_with = "ser_display")]
    pub range: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub reserved: Vec<IpRange>,
    /// The `static` key.
    pub static_ips: Vec<IpRange>,
    pub dns: Vec<String>,
    /// `az` or `azs`; empty: the subnet serves every az.
    pub azs: Vec<String>,
    pub cloud_properties: serde_json::Value,
}

/// An inclusive range of addresses: `10.0.0.5`, `10.0.0.5 - 10.0.0.20` or a CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct IpRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmType {
    pub name: String,
    pub cloud_properties: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskType {
    pub name: String,
    /// MB.
    pub disk_size: u64,
    pub cloud_properties: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Compilation {
    pub workers: u32,
    pub reuse_compilation_vms: bool,
    pub az: String,
    pub vm_type: Option<String>,
    pub network: String,
}

/// A malformed IP range or address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpRangeError {
    #[error("'{0}' is not an IPv4 address, a range like '10.0.0.5 - 10.0.0.20' or a CIDR")]
    Syntax(String),
    #[error("range '{0}' ends before it starts")]
    Backwards(String),
}

fn ser_display<T: fmt::Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl IpRange {
    pub fn single(ip: Ipv4Addr) -> IpRange {
        IpRange {
            first: ip,
            last: ip,
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.first <= ip && ip <= self.last
    }

    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// Whether the whole range lies inside `net`.
    pub fn within(&self, net: &Ipv4Net) -> bool {
        net.contains(&self.first) && net.contains(&self.last)
    }
}

impl FromStr for IpRange {
    type Err = IpRangeError;
    fn from_str(s: &str) -> Result<Self, IpRangeError> {
        let t = s.trim();
        let syntax = || IpRangeError::Syntax(s.to_string());
        let ip = |x: &str| x.trim().parse::<Ipv4Addr>().map_err(|_| syntax());
        let r = if let Some((a, b)) = t.split_once('-') {
            IpRange {
                first: ip(a)?,
                last: ip(b)?,
            }
        } else if t.contains('/') {
            let net: Ipv4Net = t.parse().map_err(|_| syntax())?;
            IpRange {
                first: net.network(),
                last: net.broadcast(),
            }
        } else {
            IpRange::single(ip(t)?)
        };
        if r.first > r.last {
            return Err(IpRangeError::Backwards(s.to_string()));
        }
        Ok(r)
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

pub(crate) fn ranges_text(r: &[IpRange]) -> String {
    if r.is_empty() {
        return "none".to_string();
    }
    r.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl CloudConfig {
    pub fn az(&self, name: &str) -> Option<&Az> {
        self.azs.iter().find(|a| a.name == name)
    }
    pub fn network(&self, name: &str) -> Option<&Network> {
        self.networks.iter().find(|n| n.name == name)
    }
    pub fn vm_type(&self, name: &str) -> Option<&VmType> {
        self.vm_types.iter().find(|n| n.name == name)
    }
    pub fn vm_extension(&self, name: &str) -> Option<&VmType> {
        self.vm_extensions.iter().find(|n| n.name == name)
    }
    pub fn disk_type(&self, name: &str) -> Option<&DiskType> {
        self.disk_types.iter().find(|n| n.name == name)
    }
}

const TOP_KEYS: &[&str] = &[
    "azs",
    "networks",
    "vm_types",
    "vm_extensions",
    "disk_types",
    "cpis",
];
const SUBNET_KEYS: &[&str] = &[
    "gateway",
    "reserved",
    "static",
    "dns",
    "az",
    "azs",
    "cloud_properties",
];
const COMPILATION_KEYS: &[&str] = &["reuse_compilation_vms", "vm_type"];

/// Parse and validate a cloud-config.
pub fn parse_cloud_config(file: &str, text: &str) -> Result<CloudConfig, Problems> {
    let root = yaml::parse(file, text).map_err(|p| Problems(vec![p]))?;
    if root.is_null() {
        let p = SourceMap::new(file).problem("", "the cloud-config is empty");
        return Err(Problems(vec![p]));
    }
    let mut source = SourceMap::new(file);
    let mut problems = Problems::default();
    let cc = {
        let mut d = Decoder::new(&mut source, &mut problems);
        d.record(&root, "");
        decode(&mut d, &root)
    };
    problems.into_result()?;
    match cc {
        Some(mut cc) => {
            cc.source = source;
            Ok(cc)
        }
        None => Err(Problems(vec![source.problem("", "not a cloud-config")])),
    }
}

/// Report names used twice among `items` (name, path of the item).
fn unique_names(d: &mut Decoder, what: &str, names: &[(String, String)]) {
    let mut seen = BTreeSet::new();
    for (name, path) in names {
        if !seen.insert(name.as_str()) {
            d.problem(
                &yaml::child_path(path, "name"),
                format!("{what} name '{name}' is used twice"),
            );
        }
    }
}

fn decode(d: &mut Decoder, root: &Node) -> Option<CloudConfig> {
    let f = d.map(root, "", &["compilation"], TOP_KEYS)?;

    let mut cpis = Vec::new();
    let mut cpi_paths = Vec::new();
    for it in d.opt_seq(&f, "cpis") {
        let optional = [&["properties", "migrated_from"][..], EXTERNAL_KEYS].concat();
        let Some(cf) = d.map(it.node, &it.path, &["name", "type"], &optional) else {
            continue;
        };
        let (name, kind) = (
            names::decode(d, &cf, "name", "cpi name"),
            d.str(&cf, "type"),
        );
        let properties = d.json_object(&cf, "properties");
        let exec_path = d.opt_str(&cf, "exec_path");
        let external = exec_path.as_ref().map(|exec_path| ExternalExec {
            exec_path: exec_path.clone(),
            args: d.str_list(&cf, "args"),
            config: d.json(&cf, "config"),
            config_arg: d
                .opt_str(&cf, "config_arg")
                .unwrap_or_else(|| "-configPath".into()),
            timeout_secs: d.opt_u64(&cf, "timeout"),
        });
        if let (Some(name), Some(kind)) = (name, kind) {
            if BUILTIN_CPIS.contains(&name.as_str()) {
                d.problem(
                    &yaml::child_path(&it.path, "name"),
                    format!("'{name}' is a built-in CPI; give this one another name"),
                );
            }
            if external.is_none() {
                if kind == "external" {
                    d.problem(
                        &yaml::child_path(&it.path, "exec_path"),
                        "an external CPI needs exec_path: the CPI executable to run",
                    );
                } else if !CPI_TYPES.contains(&kind.as_str()) {
                    d.problem(
                        &yaml::child_path(&it.path, "type"),
                        format!(
                            "unknown CPI type '{kind}' (known: {}; a BOSH CPI of \
                             another type needs exec_path)",
                            CPI_TYPES.join(", ")
                        ),
                    );
                }
                for key in EXTERNAL_KEYS.iter().filter(|k| cf.get(k).is_some()) {
                    d.problem(
                        &yaml::child_path(&it.path, key),
                        format!("{key} is only for external CPIs (those with an exec_path)"),
                    );
                }
            }
            cpi_paths.push((name.clone(), it.path.clone()));
            cpis.push(CpiConfig {
                name,
                kind,
                properties,
                external,
            });
        }
    }
    unique_names(d, "cpi", &cpi_paths);

    let mut azs = Vec::new();
    let mut az_paths = Vec::new();
    for it in d.opt_seq(&f, "azs") {
        let Some(af) = d.map(it.node, &it.path, &["name"], &["cpi", "cloud_properties"]) else {
            continue;
        };
        let name = names::decode(d, &af, "name", "az name");
        let cpi = d.opt_str(&af, "cpi").unwrap_or_else(|| "local".into());
        if !BUILTIN_CPIS.contains(&cpi.as_str()) && !cpis.iter().any(|c| c.name == cpi) {
            d.problem(
                &yaml::child_path(&it.path, "cpi"),
                format!(
                    "unknown CPI '{cpi}' (built in: {}; others are declared under `cpis`)",
                    BUILTIN_CPIS.join(", ")
                ),
            );
        }
        let cloud_properties = d.json_object(&af, "cloud_properties");
        if let Some(name) = name {
            az_paths.push((name.clone(), it.path.clone()));
            azs.push(Az {
                name,
                cpi,
                cloud_properties,
            });
        }
    }
    unique_names(d, "az", &az_paths);
    let az_names: Vec<&str> = azs.iter().map(|a| a.name.as_str()).collect();

    let mut networks = Vec::new();
    let mut net_paths = Vec::new();
    for it in d.opt_seq(&f, "networks") {
        if let Some(n) = network(d, &it, &az_names) {
            net_paths.push((n.name.clone(), it.path.clone()));
            networks.push(n);
        }
    }
    unique_names(d, "network", &net_paths);

    let vm_types = named_list(d, &f, "vm_types", "vm type");
    let vm_extensions = named_list(d, &f, "vm_extensions", "vm extension");

    let mut disk_types = Vec::new();
    let mut disk_paths = Vec::new();
    for it in d.opt_seq(&f, "disk_types") {
        let Some(df) = d.map(
            it.node,
            &it.path,
            &["name", "disk_size"],
            &["cloud_properties"],
        ) else {
            continue;
        };
        let name = names::decode(d, &df, "name", "disk type name");
        let disk_size = d.u64(&df, "disk_size");
        let cloud_properties = d.json_object(&df, "cloud_properties");
        if let (Some(name), Some(disk_size)) = (name, disk_size) {
            disk_paths.push((name.clone(), it.path.clone()));
            disk_types.push(DiskType {
                name,
                disk_size,
                cloud_properties,
            });
        }
    }
    unique_names(d, "disk type", &disk_paths);

    let compilation = match f.get("compilation") {
        Some(n) => compilation(d, n, &azs, &networks, &vm_types),
        None => None,
    };

    Some(CloudConfig {
        cpis,
        azs,
        networks,
        vm_types: vm_types.into_iter().map(|(v, _)| v).collect(),
        vm_extensions: vm_extensions.into_iter().map(|(v, _)| v).collect(),
        disk_types,
        compilation: compilation?,
        source: SourceMap::default(),
        raw: root.to_json(),
    })
}

fn named_list(d: &mut Decoder, f: &Fields, key: &str, what: &str) -> Vec<(VmType, String)> {
    let mut out = Vec::new();
    for it in d.opt_seq(f, key) {
        let Some(vf) = d.map(it.node, &it.path, &["name"], &["cloud_properties"]) else {
            continue;
        };
        let name = names::decode(d, &vf, "name", &format!("{what} name"));
        let cloud_properties = d.json_object(&vf, "cloud_properties");
        if let Some(name) = name {
            out.push((
                VmType {
                    name,
                    cloud_properties,
                },
                it.path.clone(),
            ));
        }
    }
    let names: Vec<(String, String)> = out
        .iter()
        .map(|(v, p)| (v.name.clone(), p.clone()))
        .collect();
    unique_names(d, what, &names);
    out
}

fn compilation(
    d: &mut Decoder,
    n: &Node,
    azs: &[Az],
    networks: &[Network],
    vm_types: &[(VmType, String)],
) -> Option<Compilation> {
    let f = d.map(
        n,
        "compilation",
        &["workers", "az", "network"],
        COMPILATION_KEYS,
    )?;
    let workers = d.u32(&f, "workers");
    if workers == Some(0) {
        d.problem(&f.child("workers"), "needs at least 1 worker");
    }
    let reuse_compilation_vms = d.opt_bool(&f, "reuse_compilation_vms").unwrap_or(false);
    let az = d.str(&f, "az");
    if let Some(az) = &az {
        if !azs.iter().any(|a| &a.name == az) {
            let names: Vec<&str> = azs.iter().map(|a| a.name.as_str()).collect();
            d.problem(&f.child("az"), unknown("az", az, &names));
        }
    }
    let vm_type = d.opt_str(&f, "vm_type");
    if let Some(v) = &vm_type {
        if !vm_types.iter().any(|(t, _)| &t.name == v) {
            let names: Vec<&str> = vm_types.iter().map(|(t, _)| t.name.as_str()).collect();
            d.problem(&f.child("vm_type"), unknown("vm type", v, &names));
        }
    }
    let network = d.str(&f, "network");
    if let Some(nw) = &network {
        match networks.iter().find(|x| &x.name == nw) {
            None => {
                let names: Vec<&str> = networks.iter().map(|x| x.name.as_str()).collect();
                d.problem(&f.child("network"), unknown("network", nw, &names));
            }
            Some(net) => {
                if net.kind == NetworkKind::Vip {
                    d.problem(&f.child("network"), format!("network '{nw}' is a vip network; compilation needs a manual or dynamic one"));
                } else if let Some(az) = &az {
                    if subnet_for_az(net, az).is_none() {
                        d.problem(
                            &f.child("network"),
                            format!("network '{nw}' has no subnet in az '{az}'"),
                        );
                    }
                }
            }
        }
    }
    Some(Compilation {
        workers: workers?,
        reuse_compilation_vms,
        az: az?,
        vm_type,
        network: network?,
    })
}

fn network(d: &mut Decoder, it: &Item, az_names: &[&str]) -> Option<Network> {
    let f = d.map(
        it.node,
        &it.path,
        &["name"],
        &["type", "subnets", "cloud_properties", "dns"],
    )?;
    let name = names::decode(d, &f, "name", "network name");
    let kind = match d.opt_str(&f, "type").as_deref() {
        None | Some("manual") => NetworkKind::Manual,
        Some("dynamic") => NetworkKind::Dynamic,
        Some("vip") => NetworkKind::Vip,
        Some(other) => {
            let hint = yaml::did_you_mean(other, &["manual", "dynamic", "vip"]);
            d.problem(
                &f.child("type"),
                format!("unknown network type '{other}' (expected manual, dynamic or vip){hint}"),
            );
            NetworkKind::Manual
        }
    };
    let cloud_properties = d.json_object(&f, "cloud_properties");
    let mut subnets = Vec::new();
    match kind {
        NetworkKind::Manual => {
            for k in ["dns", "cloud_properties"] {
                if f.get(k).is_some() {
                    d.problem(
                        &f.child(k),
                        format!("'{k}' of a manual network belongs in its subnets"),
                    );
                }
            }
            if !f.has("subnets") {
                d.problem(
                    &f.child("subnets"),
                    "a manual network needs at least one subnet",
                );
            }
            for s in d.opt_seq(&f, "subnets") {
                if let Some(sub) = manual_subnet(d, &s, az_names) {
                    subnets.push(sub);
                }
            }
            for (i, a) in subnets.iter().enumerate() {
                for b in &subnets[i + 1..] {
                    if a.range.contains(&b.range.network()) || b.range.contains(&a.range.network())
                    {
                        d.problem(
                            &f.child("subnets"),
                            format!("subnets {} and {} overlap", a.range, b.range),
                        );
                    }
                }
            }
        }
        NetworkKind::Dynamic => {
            let dns = d.str_list(&f, "dns");
            if f.has("subnets") {
                for s in d.opt_seq(&f, "subnets") {
                    let Some(sf) = d.map(
                        s.node,
                        &s.path,
                        &[],
                        &["dns", "az", "azs", "cloud_properties"],
                    ) else {
                        continue;
                    };
                    let azs = subnet_azs(d, &sf, az_names);
                    subnets.push(Subnet {
                        range: Ipv4Net::default(),
                        gateway: None,
                        reserved: vec![],
                        static_ips: vec![],
                        dns: d.str_list(&sf, "dns"),
                        azs,
                        cloud_properties: d.json_object(&sf, "cloud_properties"),
                    });
                }
            } else {
                subnets.push(Subnet {
                    range: Ipv4Net::default(),
                    gateway: None,
                    reserved: vec![],
                    static_ips: vec![],
                    dns,
                    azs: vec![],
                    cloud_properties: cloud_properties.clone(),
                });
            }
        }
        NetworkKind::Vip => {
            for k in ["subnets", "dns"] {
                if f.get(k).is_some() {
                    d.problem(&f.child(k), format!("a vip network has no '{k}'"));
                }
            }
        }
    }
    if !subnets.is_empty() {
        let with_azs = subnets.iter().filter(|s| !s.azs.is_empty()).count();
        if with_azs != 0 && with_azs != subnets.len() {
            d.problem(
                &f.child("subnets"),
                "either every subnet of a network names its azs or none does",
            );
        }
    }
    Some(Network {
        name: name?,
        kind,
        subnets,
        cloud_properties,
    })
}

fn subnet_azs(d: &mut Decoder, f: &Fields, az_names: &[&str]) -> Vec<String> {
    let azs = match (f.has("az"), f.has("azs")) {
        (true, true) => {
            d.problem(&f.child("azs"), "use either 'az' or 'azs', not both");
            vec![]
        }
        (true, false) => d.str(f, "az").into_iter().collect(),
        (false, true) => d.str_list(f, "azs"),
        (false, false) => vec![],
    };
    for (i, az) in azs.iter().enumerate() {
        if !az_names.contains(&az.as_str()) {
            let path = if f.has("az") {
                f.child("az")
            } else {
                yaml::index_path(&f.child("azs"), i)
            };
            d.problem(&path, unknown("az", az, az_names));
        }
    }
    azs
}

fn ip_ranges(d: &mut Decoder, f: &Fields, key: &str) -> Vec<(IpRange, String)> {
    let mut out = Vec::new();
    // A single string is accepted as a one-item list.
    let items: Vec<Item> = match f.get(key) {
        Some(n) if n.as_str().is_some() => vec![Item {
            path: f.child(key),
            node: n,
        }],
        _ => d.opt_seq(f, key),
    };
    for it in items {
        let Some(text) = d.node_str(it.node, &it.path) else {
            continue;
        };
        match text.parse::<IpRange>() {
            Ok(r) => out.push((r, it.path)),
            Err(e) => d.problem(&it.path, e.to_string()),
        }
    }
    out
}

fn manual_subnet(d: &mut Decoder, it: &Item, az_names: &[&str]) -> Option<Subnet> {
    let f = d.map(it.node, &it.path, &["range"], SUBNET_KEYS)?;
    let range = match d.str(&f, "range") {
        None => None,
        Some(t) => match t.trim().parse::<Ipv4Net>() {
            Ok(net) if net.trunc() != net => {
                d.problem(
                    &f.child("range"),
                    format!(
                        "range {net} is not a network address (did you mean {}?)",
                        net.trunc()
                    ),
                );
                None
            }
            Ok(net) => Some(net),
            Err(_) => {
                d.problem(
                    &f.child("range"),
                    format!("'{t}' is not an IPv4 CIDR range like 10.0.0.0/24"),
                );
                None
            }
        },
    };
    let gateway = match d.opt_str(&f, "gateway") {
        None => None,
        Some(t) => match t.trim().parse::<Ipv4Addr>() {
            Ok(g) => Some(g),
            Err(_) => {
                d.problem(&f.child("gateway"), format!("'{t}' is not an IPv4 address"));
                None
            }
        },
    };
    let reserved = ip_ranges(d, &f, "reserved");
    let static_ips = ip_ranges(d, &f, "static");
    let dns = d.str_list(&f, "dns");
    for (i, s) in dns.iter().enumerate() {
        if s.parse::<Ipv4Addr>().is_err() {
            d.problem(
                &yaml::index_path(&f.child("dns"), i),
                format!("'{s}' is not an IPv4 address"),
            );
        }
    }
    let azs = subnet_azs(d, &f, az_names);
    let cloud_properties = d.json_object(&f, "cloud_properties");

    let range = range?;
    if let Some(g) = gateway {
        if !range.contains(&g) {
            d.problem(
                &f.child("gateway"),
                format!("gateway {g} is outside the range {range}"),
            );
        }
    }
    for (r, path) in reserved.iter().chain(&static_ips) {
        if !r.within(&range) {
            d.problem(path, format!("{r} is outside the range {range}"));
        }
    }
    for (s, path) in &static_ips {
        if let Some((r, _)) = reserved.iter().find(|(r, _)| r.overlaps(s)) {
            d.problem(
                path,
                format!("static range {s} overlaps reserved range {r}"),
            );
        }
        if let Some(g) = gateway.filter(|g| s.contains(*g)) {
            d.problem(path, format!("static range {s} includes the gateway {g}"));
        }
    }
    Some(Subnet {
        range,
        gateway,
        reserved: reserved.into_iter().map(|(r, _)| r).collect(),
        static_ips: static_ips.into_iter().map(|(r, _)| r).collect(),
        dns,
        azs,
        cloud_properties,
    })
}

/// Built-in default for the local CPI when none was uploaded: az z1 (cpi local), manual network `default`
/// range 127.77.0.0/24 gateway 127.77.0.1, static 127.77.0.2-127.77.0.100, vm_type `default`,
/// disk_type `default` (1024 MB), compilation { workers: available_parallelism, az z1, network default, reuse true }.
pub fn default_local() -> CloudConfig {
    let workers = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let empty = || json!({});
    let range = Ipv4Net::new(Ipv4Addr::new(127, 77, 0, 0), 24).unwrap_or_default();
    let raw = json!({
        "azs": [{"name": "z1", "cpi": "local"}],
        "networks": [{
            "name": "default",
            "type": "manual",
            "subnets": [{
                "range": "127.77.0.0/24",
                "gateway": "127.77.0.1",
                "static": ["127.77.0.2 - 127.77.0.100"],
                "azs": ["z1"],
            }],
        }],
        "vm_types": [{"name": "default"}],
        "disk_types": [{"name": "default", "disk_size": 1024}],
        "compilation": {
            "workers": workers,
            "reuse_compilation_vms": true,
            "az": "z1",
            "vm_type": "default",
            "network": "default",
        },
    });
    CloudConfig {
        cpis: Vec::new(),
        azs: vec![Az {
            name: "z1".into(),
            cpi: "local".into(),
            cloud_properties: empty(),
        }],
        networks: vec![Network {
            name: "default".into(),
            kind: NetworkKind::Manual,
            subnets: vec![Subnet {
                range,
                gateway: Some(Ipv4Addr::new(127, 77, 0, 1)),
                reserved: vec![],
                static_ips: vec![IpRange {
                    first: Ipv4Addr::new(127, 77, 0, 2),
                    last: Ipv4Addr::new(127, 77, 0, 100),
                }],
                dns: vec![],
                azs: vec!["z1".into()],
                cloud_properties: empty(),
            }],
            cloud_properties: empty(),
        }],
        vm_types: vec![VmType {
            name: "default".into(),
            cloud_properties: empty(),
        }],
        vm_extensions: vec![],
        disk_types: vec![DiskType {
            name: "default".into(),
            disk_size: 1024,
            cloud_properties: empty(),
        }],
        compilation: Compilation {
            workers,
            reuse_compilation_vms: true,
            az: "z1".into(),
            vm_type: Some("default".into()),
            network: "default".into(),
        },
        source: SourceMap::new("<built-in local cloud-config>"),
        raw,
    }
}

/// Whether `ip` lies in one of the subnet's `static` ranges.
pub fn is_static(subnet: &Subnet, ip: Ipv4Addr) -> bool {
    subnet.static_ips.iter().any(|r| r.contains(ip))
}

/// The subnet of `network` whose range contains `ip`.
pub fn subnet_for_ip(network: &Network, ip: Ipv4Addr) -> Option<&Subnet> {
    network.subnets.iter().find(|s| s.range.contains(&ip))
}

/// The first subnet of `network` that serves `az`; a subnet without azs serves every az.
pub fn subnet_for_az<'a>(network: &'a Network, az: &str) -> Option<&'a Subnet> {
    network.subnets.iter().find(|s| serves_az(s, az))
}

pub(crate) fn serves_az(subnet: &Subnet, az: &str) -> bool {
    subnet.azs.is_empty() || subnet.azs.iter().any(|a| a == az)
}

/// Addresses the director may hand out dynamically in a subnet: range minus network & broadcast
/// addresses, gateway, reserved and static ranges.
pub fn dynamic_pool(subnet: &Subnet) -> impl Iterator<Item = Ipv4Addr> + '_ {
    let net = subnet.range;
    let (first, last) = (u32::from(net.network()), u32::from(net.broadcast()));
    // /31 and /32 have no network or broadcast address to skip (RFC 3021).
    let (first, last) = if net.prefix_len() >= 31 {
        (first, last)
    } else {
        (first + 1, last - 1)
    };
    (first..=last).map(Ipv4Addr::from).filter(move |ip| {
        Some(*ip) != subnet.gateway
            && !subnet.reserved.iter().any(|r| r.contains(*ip))
            && !subnet.static_ips.iter().any(|r| r.contains(*ip))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const CC: &str = "\
azs:
- name: z1
- name: z2
  cpi: docker
  cloud_properties: {zone: b}
networks:
- name: default
  type: manual
  subnets:
  - range: 10.0.0.0/24
    gateway: 10.0.0.1
    reserved: [10.0.0.2 - 10.0.0.9, 10.0.0.250-10.0.0.254]
    static: [10.0.0.10 - 10.0.0.50]
    dns: [8.8.8.8]
    az: z1
  - range: 10.0.1.0/24
    gateway: 10.0.1.1
    static: [10.0.1.10/31]
    azs: [z2]
- name: public
  type: vip
vm_types:
- name: small
  cloud_properties: {cpu: 1}
disk_types:
- name: ssd
  disk_size: 2048
compilation:
  workers: 2
  az: z1
  network: default
  vm_type: small
";

    #[test]
    fn cloud_config_parses_exact_values() {
        let cc = parse_cloud_config("cc.yml", CC).expect("valid");
        assert_eq!(cc.azs.len(), 2);
        assert_eq!(cc.azs[0].cpi, "local");
        assert_eq!(cc.azs[1].cpi, "docker");
        let net = &cc.networks[0];
        assert_eq!(net.kind, NetworkKind::Manual);
        let s = &net.subnets[0];
        assert_eq!(s.range.to_string(), "10.0.0.0/24");
        assert_eq!(s.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(
            s.reserved,
            vec![
                IpRange {
                    first: Ipv4Addr::new(10, 0, 0, 2),
                    last: Ipv4Addr::new(10, 0, 0, 9)
                },
                IpRange {
                    first: Ipv4Addr::new(10, 0, 0, 250),
                    last: Ipv4Addr::new(10, 0, 0, 254)
                },
            ]
        );
        assert_eq!(s.static_ips[0].to_string(), "10.0.0.10-10.0.0.50");
        assert_eq!(s.azs, vec!["z1"]);
        assert_eq!(
            net.subnets[1].static_ips[0].to_string(),
            "10.0.1.10-10.0.1.11"
        );
        assert_eq!(cc.networks[1].kind, NetworkKind::Vip);
        assert_eq!(cc.disk_types[0].disk_size, 2048);
        assert_eq!(
            cc.compilation,
            Compilation {
                workers: 2,
                reuse_compilation_vms: false,
                az: "z1".into(),
                vm_type: Some("small".into()),
                network: "default".into(),
            }
        );
        assert_eq!(cc.raw["vm_types"][0]["cloud_properties"]["cpu"], 1);
    }

    #[test]
    fn cloud_config_ip_range_forms() {
        let r: IpRange = " 10.0.0.5  -  10.0.0.20 ".parse().expect("range");
        assert_eq!(r.first, Ipv4Addr::new(10, 0, 0, 5));
        assert_eq!(r.last, Ipv4Addr::new(10, 0, 0, 20));
        assert_eq!(
            "10.0.0.5".parse::<IpRange>().map(|r| r.last),
            Ok(Ipv4Addr::new(10, 0, 0, 5))
        );
        assert!("10.0.0.9-10.0.0.1".parse::<IpRange>().is_err());
        assert!("nope".parse::<IpRange>().is_err());
    }

    #[test]
    fn cloud_config_reports_bad_subnets_and_references() {
        let text = "\
azs: [{name: z1}, {name: z1}]
networks:
- name: n
  subnets:
  - range: 10.0.0.5/24
  - range: 10.1.0.0/24
    gateway: 10.2.0.1
    reserved: [10.1.0.2-10.1.0.20]
    static: [10.1.0.10-10.1.0.30, 10.9.0.1]
    az: z9
vm_types: [{name: a}]
compilation: {workers: 1, az: z2, network: m, vm_type: b}
";
        let e = parse_cloud_config("cc.yml", text).expect_err("invalid");
        let got: Vec<(&str, Option<usize>)> =
            e.0.iter().map(|p| (p.path.as_str(), p.line)).collect();
        assert_eq!(
            got,
            vec![
                ("azs[1].name", Some(1)),
                ("networks[0].subnets[0].range", Some(5)),
                ("networks[0].subnets[1].az", Some(10)),
                ("networks[0].subnets[1].gateway", Some(7)),
                ("networks[0].subnets[1].static[1]", Some(9)),
                ("networks[0].subnets[1].static[0]", Some(9)),
                ("compilation.az", Some(12)),
                ("compilation.vm_type", Some(12)),
                ("compilation.network", Some(12)),
            ],
            "{e}"
        );
        assert!(e.to_string().contains("did you mean 10.0.0.0/24?"), "{e}");
    }

    #[test]
    fn cpis_are_declared_and_azs_must_name_a_known_one() {
        let text = "cpis:\n- name: ec2\n  type: aws\n  properties: {region: us-east-1}\nazs:\n- name: z1\n  cpi: ec2\n- name: z2\n  cpi: docker\n- name: z3\n  cpi: gce\nnetworks: []\ncompilation: {workers: 1, az: z1, network: n}\n";
        let e = parse_cloud_config("cc.yml", text).unwrap_err();
        let unknown: Vec<_> =
            e.0.iter()
                .filter(|p| p.message.contains("unknown CPI"))
                .collect();
        assert_eq!(unknown.len(), 1, "{e}");
        assert_eq!(unknown[0].path, "azs[2].cpi");
        assert_eq!(unknown[0].line, Some(11));
        let ok = text.replace("  cpi: gce\n", "");
        let cc = parse_cloud_config("cc.yml", &ok).err();
        // Only the compilation network is wrong now; the cpis parsed.
        assert!(cc.is_none_or(|e| e.0.iter().all(|p| !p.message.contains("CPI"))));
        let shadow = "cpis:\n- name: docker\n  type: docker\nazs: []\nnetworks: []\ncompilation: {workers: 1, az: z1, network: n}\n";
        let e = parse_cloud_config("cc.yml", shadow).unwrap_err();
        assert!(
            e.0.iter()
                .any(|p| p.path == "cpis[0].name" && p.message.contains("built-in CPI")),
            "{e}"
        );
        let bad_type = "cpis:\n- name: x\n  type: vsphere\nazs: []\nnetworks: []\ncompilation: {workers: 1, az: z1, network: n}\n";
        let e = parse_cloud_config("cc.yml", bad_type).unwrap_err();
        assert!(
            e.0.iter()
                .any(|p| p.path == "cpis[0].type"
                    && p.message.contains("unknown CPI type 'vsphere'")),
            "{e}"
        );
    }

    #[test]
    fn external_cpis_take_boshs_cpi_config_shape_and_bosuns_additions() {
        let base = "azs: [{name: z1, cpi: ext}]\nnetworks: [{name: n, type: dynamic}]\ncompilation: {workers: 1, az: z1, network: n}\n";
        // BOSH's shape: a cloud's type and the CPI's executable.
        let bosh = format!("cpis:\n- name: ext\n  type: openstack\n  exec_path: /var/vcap/jobs/openstack_cpi/bin/cpi\n  properties: {{auth_url: 'http://x'}}\n{base}");
        let cc = parse_cloud_config("cc.yml", &bosh).unwrap();
        let exec = cc.cpis[0].external.as_ref().unwrap();
        assert_eq!(exec.exec_path, "/var/vcap/jobs/openstack_cpi/bin/cpi");
        assert_eq!(exec.config_arg, "-configPath");
        assert_eq!(cc.cpis[0].properties["auth_url"], "http://x");
        // bosun's: type external, arguments, a config file, a time limit.
        let ours = format!("cpis:\n- name: ext\n  type: external\n  exec_path: bosun\n  args: [cpi, --backend, docker]\n  config_arg: --config\n  config: {{root: state}}\n  timeout: 30\n{base}");
        let cc = parse_cloud_config("cc.yml", &ours).unwrap();
        let exec = cc.cpis[0].external.as_ref().unwrap();
        assert_eq!(exec.args, ["cpi", "--backend", "docker"]);
        assert_eq!(exec.config.as_ref().unwrap()["root"], "state");
        assert_eq!(exec.timeout_secs, Some(30));
        // An external CPI needs its executable; bosun's own types take none.
        let missing = format!("cpis:\n- name: ext\n  type: external\n{base}");
        let e = parse_cloud_config("cc.yml", &missing).unwrap_err();
        assert!(
            e.0.iter()
                .any(|p| p.path == "cpis[0].exec_path" && p.line == Some(2)),
            "{e}"
        );
        let stray = format!("cpis:\n- name: ext\n  type: aws\n  timeout: 3\n{base}");
        let e = parse_cloud_config("cc.yml", &stray).unwrap_err();
        assert!(
            e.0.iter().any(
                |p| p.path == "cpis[0].timeout" && p.message.contains("only for external CPIs")
            ),
            "{e}"
        );
    }
}

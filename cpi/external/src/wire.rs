//! The protocol's shapes: one request (`method`, `arguments`, `context`,
//! `api_version`) and one response (`result`, `error`, `log`) per process,
//! and the translation of bosun's CPI types to and from BOSH's argument
//! shapes (networks, the `env` that carries bosun's agent keys under
//! `env.bosun`, disk hints, error types).
//!
//! Pure data: this module must not run processes or touch files.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use bosun_cpi::{
    AgentSettings, CpiError, DiskCid, DiskHint, Metadata, NetworkKind, NetworkSettings,
    StemcellCid, StemcellSpec, VmCid, AGENT_PORT,
};

/// The newest protocol version bosun speaks.
pub const API_VERSION: u32 = 2;

/// The key of `env` under which bosun's director passes what its agent
/// needs beyond BOSH's agent env (keys, port, the VM's metadata).
pub const BOSUN_ENV_KEY: &str = "bosun";

/// One request, as written to the CPI's stdin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    pub method: String,
    #[serde(default)]
    pub arguments: Vec<Value>,
    #[serde(default)]
    pub context: Value,
    /// Absent in v1 requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<u32>,
}

/// One response, as read from the CPI's stdout.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Response {
    #[serde(default)]
    pub result: Value,
    #[serde(default)]
    pub error: Option<WireError>,
    #[serde(default)]
    pub log: String,
}

/// A CPI's error, as BOSH's CPIs write it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WireError {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub ok_to_retry: bool,
}

/// BOSH's error type names (the `Bosh::Clouds::` prefix is optional on input).
pub mod error_type {
    pub const CLOUD_ERROR: &str = "Bosh::Clouds::CloudError";
    pub const CPI_ERROR: &str = "Bosh::Clouds::CpiError";
    pub const NOT_IMPLEMENTED: &str = "Bosh::Clouds::NotImplemented";
    pub const NOT_SUPPORTED: &str = "Bosh::Clouds::NotSupported";
    pub const VM_NOT_FOUND: &str = "Bosh::Clouds::VMNotFound";
    pub const DISK_NOT_FOUND: &str = "Bosh::Clouds::DiskNotFound";
    pub const VM_CREATION_FAILED: &str = "Bosh::Clouds::VMCreationFailed";
}

impl WireError {
    /// The error type without BOSH's module prefix (`VMNotFound`).
    pub fn short_kind(&self) -> &str {
        self.kind.rsplit("::").next().unwrap_or(&self.kind)
    }

    /// bosun's error for a server to answer with.
    pub fn from_cpi_error(e: &CpiError) -> WireError {
        let (kind, ok_to_retry) = match e {
            CpiError::VmNotFound(_) => (error_type::VM_NOT_FOUND, false),
            CpiError::DiskNotFound(_) => (error_type::DISK_NOT_FOUND, false),
            CpiError::NotSupported { .. } => (error_type::NOT_SUPPORTED, false),
            CpiError::Transient { .. } => (error_type::CLOUD_ERROR, true),
            CpiError::StemcellNotFound(_) | CpiError::Fatal { .. } => {
                (error_type::CLOUD_ERROR, false)
            }
        };
        WireError {
            kind: kind.to_string(),
            message: e.to_string(),
            ok_to_retry,
        }
    }
}

/// Converting between bosun's network settings and BOSH's network hash.
pub fn network_to_wire(n: &NetworkSettings) -> Value {
    let mut m = Map::new();
    let kind = match n.kind {
        NetworkKind::Manual => "manual",
        NetworkKind::Dynamic => "dynamic",
        NetworkKind::Vip => "vip",
    };
    m.insert("type".into(), json!(kind));
    if !n.ip.is_empty() {
        m.insert("ip".into(), json!(n.ip));
    }
    if !n.netmask.is_empty() {
        m.insert("netmask".into(), json!(n.netmask));
    }
    if let Some(g) = &n.gateway {
        m.insert("gateway".into(), json!(g));
    }
    m.insert("dns".into(), json!(n.dns));
    m.insert("default".into(), json!(n.default));
    m.insert(
        "cloud_properties".into(),
        object_or_empty(&n.cloud_properties),
    );
    Value::Object(m)
}

/// A BOSH network hash as bosun's settings; the range is derived from the
/// address and netmask (`0.0.0.0/0` when there is no address).
pub fn network_from_wire(name: &str, v: &Value) -> Result<NetworkSettings, String> {
    let field = |key: &str| -> Result<Option<String>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "networks.{name}.{key} must be a string, got {other}"
            )),
        }
    };
    let strings = |key: &str| -> Result<Vec<String>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("networks.{name}.{key} must hold strings, got {x}"))
                })
                .collect(),
            Some(other) => Err(format!("networks.{name}.{key} must be a list, got {other}")),
        }
    };
    if !v.is_object() {
        return Err(format!("networks.{name} must be a hash, got {v}"));
    }
    let kind = match field("type")?.as_deref() {
        None | Some("manual") => NetworkKind::Manual,
        Some("dynamic") => NetworkKind::Dynamic,
        Some("vip") => NetworkKind::Vip,
        Some(other) => return Err(format!("networks.{name}.type '{other}' is unknown")),
    };
    let ip = field("ip")?.unwrap_or_default();
    let netmask = field("netmask")?.unwrap_or_default();
    let range = range_of(&ip, &netmask).map_err(|e| format!("networks.{name}: {e}"))?;
    Ok(NetworkSettings {
        kind,
        ip,
        netmask,
        range,
        gateway: field("gateway")?,
        dns: strings("dns")?,
        default: strings("default")?,
        cloud_properties: object_or_empty(v.get("cloud_properties").unwrap_or(&Value::Null)),
    })
}

/// The CIDR range of `ip` under `netmask` (`10.0.0.5`, `255.255.255.0` →
/// `10.0.0.0/24`); `0.0.0.0/0` without an address.
pub fn range_of(ip: &str, netmask: &str) -> Result<String, String> {
    if ip.is_empty() {
        return Ok("0.0.0.0/0".to_string());
    }
    let addr: Ipv4Addr = ip
        .parse()
        .map_err(|_| format!("ip '{ip}' is not an IPv4 address"))?;
    if netmask.is_empty() {
        return Ok(format!("{addr}/32"));
    }
    let mask: Ipv4Addr = netmask
        .parse()
        .map_err(|_| format!("netmask '{netmask}' is not an IPv4 netmask"))?;
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 {
        return Err(format!("netmask '{netmask}' is not contiguous"));
    }
    let network = Ipv4Addr::from(u32::from(addr) & bits);
    Ok(format!("{network}/{prefix}"))
}

fn object_or_empty(v: &Value) -> Value {
    if v.is_object() {
        v.clone()
    } else {
        json!({})
    }
}

/// The networks argument of `create_vm`.
pub fn networks_to_wire(networks: &BTreeMap<String, NetworkSettings>) -> Value {
    Value::Object(
        networks
            .iter()
            .map(|(k, n)| (k.clone(), network_to_wire(n)))
            .collect(),
    )
}

/// The networks argument of `create_vm`, read.
pub fn networks_from_wire(v: &Value) -> Result<BTreeMap<String, NetworkSettings>, String> {
    let m = v
        .as_object()
        .ok_or_else(|| format!("networks must be a hash, got {v}"))?;
    m.iter()
        .map(|(k, n)| Ok((k.clone(), network_from_wire(k, n)?)))
        .collect()
}

/// What bosun's director puts under `env.bosun`: its agent's keys and port,
/// and the VM's metadata (BOSH's create_vm has no metadata argument).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BosunEnv {
    pub director_public_key: String,
    pub host_private_key: String,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

fn default_port() -> u16 {
    AGENT_PORT
}

/// The `env` argument of `create_vm`: the manifest's env with bosun's part
/// under `env.bosun` (it replaces anything the manifest put there).
pub fn env_to_wire(settings: &AgentSettings, metadata: &Metadata) -> Value {
    let mut env = match &settings.env {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    let bosun = BosunEnv {
        director_public_key: settings.director_public_key.clone(),
        host_private_key: settings.host_private_key.clone(),
        listen_port: settings.listen_port,
        listen_ip: Some(settings.listen_ip.clone()),
        metadata: metadata.clone(),
    };
    env.insert(
        BOSUN_ENV_KEY.into(),
        serde_json::to_value(bosun).unwrap_or(Value::Null),
    );
    Value::Object(env)
}

/// The `create_vm` arguments as bosun's settings: `env.bosun` is required
/// (a VM without it cannot run bosun's agent) and removed from the env the
/// agent sees as the manifest's.
pub fn settings_from_wire(
    agent_id: &str,
    networks: BTreeMap<String, NetworkSettings>,
    env: &Value,
) -> Result<(AgentSettings, Metadata), String> {
    let mut env = match env {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => return Err(format!("env must be a hash, got {other}")),
    };
    let bosun = env.remove(BOSUN_ENV_KEY).ok_or_else(|| {
        "env.bosun is missing: bosun's agent needs its keys there \
         (director_public_key, host_private_key)"
            .to_string()
    })?;
    let bosun: BosunEnv =
        serde_json::from_value(bosun).map_err(|e| format!("env.bosun is invalid: {e}"))?;
    let mut settings = AgentSettings {
        agent_id: agent_id.to_string(),
        director_public_key: bosun.director_public_key,
        host_private_key: bosun.host_private_key,
        listen_ip: String::new(),
        listen_port: bosun.listen_port,
        networks,
        disks: BTreeMap::new(),
        env: Value::Object(env),
    };
    settings.listen_ip = bosun
        .listen_ip
        .filter(|ip| !ip.is_empty())
        .or_else(|| settings.primary_ip().map(str::to_string))
        .unwrap_or_else(|| "0.0.0.0".to_string());
    Ok((settings, bosun.metadata))
}

/// The `cloud_properties` argument of `create_stemcell`: the stemcell's own,
/// with its name, version and os added where it does not set them.
pub fn stemcell_properties_to_wire(spec: &StemcellSpec) -> Value {
    let mut m = match &spec.cloud_properties {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in [
        ("name", &spec.name),
        ("version", &spec.version),
        ("os", &spec.os),
    ] {
        m.entry(k.to_string()).or_insert_with(|| json!(v));
    }
    Value::Object(m)
}

/// `create_stemcell`'s arguments as bosun's stemcell (name, version and os
/// taken out of the cloud properties again).
pub fn stemcell_from_wire(image_path: &str, cloud_properties: &Value) -> StemcellSpec {
    let text = |k: &str| {
        cloud_properties
            .get(k)
            .and_then(|v| match v {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .unwrap_or_else(|| "unknown".to_string())
    };
    let mut rest = match cloud_properties {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for k in ["name", "version", "os"] {
        rest.remove(k);
    }
    StemcellSpec {
        name: text("name"),
        os: text("os"),
        version: text("version"),
        image_path: (!image_path.is_empty()).then(|| image_path.into()),
        cloud_properties: Value::Object(rest),
    }
}

/// `attach_disk`'s answer as a hint: v2's string or hash (`path`,
/// `volume_id`, or `lun` and `host_device_id`, kept as compact JSON); v1's
/// null is an empty hint (the VM finds the disk itself).
pub fn disk_hint_from_wire(v: &Value) -> Result<DiskHint, String> {
    let path = match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Object(m) => match (m.get("path"), m.get("volume_id")) {
            (Some(Value::String(p)), _) => p.clone(),
            (_, Some(Value::String(id))) => id.clone(),
            _ if m.contains_key("lun") => v.to_string(),
            _ => return Err(format!("unknown disk hint {v}")),
        },
        other => {
            return Err(format!(
                "a disk hint must be a string or a hash, got {other}"
            ))
        }
    };
    Ok(DiskHint { path })
}

/// The argument at `i` as a string (a cid, a path).
pub fn string_arg(args: &[Value], i: usize, what: &str) -> Result<String, String> {
    match args.get(i) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!(
            "argument {i} ({what}) must be a string, got {other}"
        )),
        None => Err(format!("argument {i} ({what}) is missing")),
    }
}

/// The argument at `i` as metadata (string values; numbers and booleans
/// are written as text, as BOSH's CPIs receive tags).
pub fn metadata_arg(args: &[Value], i: usize) -> Result<Metadata, String> {
    let v = args.get(i).unwrap_or(&Value::Null);
    metadata_from_wire(v).map_err(|e| format!("argument {i} (metadata): {e}"))
}

/// A metadata hash, values as text.
pub fn metadata_from_wire(v: &Value) -> Result<Metadata, String> {
    match v {
        Value::Null => Ok(Metadata::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| {
                let text = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(_) | Value::Bool(_) => v.to_string(),
                    other => return Err(format!("{k} must be a string, got {other}")),
                };
                Ok((k.clone(), text))
            })
            .collect(),
        other => Err(format!("must be a hash, got {other}")),
    }
}

/// A list of cids, read.
pub fn cids_from_wire(v: &Value) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("a cid must be a string, got {x}"))
            })
            .collect(),
        other => Err(format!("expected a list of cids, got {other}")),
    }
}

/// Stemcell, VM and disk cids as wire strings.
pub fn vm_cid(v: &VmCid) -> Value {
    json!(v.0)
}
pub fn disk_cid(v: &DiskCid) -> Value {
    json!(v.0)
}
pub fn stemcell_cid(v: &StemcellCid) -> Value {
    json!(v.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetworkSettings {
        NetworkSettings {
            kind: NetworkKind::Manual,
            ip: "10.244.1.5".into(),
            netmask: "255.255.240.0".into(),
            range: "10.244.0.0/20".into(),
            gateway: Some("10.244.0.1".into()),
            dns: vec!["8.8.8.8".into()],
            default: vec!["dns".into(), "gateway".into()],
            cloud_properties: json!({"name": "n"}),
        }
    }

    #[test]
    fn networks_survive_the_wire_with_their_range_derived() {
        let n = net();
        let wire = network_to_wire(&n);
        assert!(wire.get("range").is_none(), "BOSH's shape has no range");
        assert_eq!(network_from_wire("default", &wire).unwrap(), n);
        let dynamic = network_from_wire("d", &json!({"type": "dynamic"})).unwrap();
        assert_eq!(dynamic.range, "0.0.0.0/0");
        assert_eq!(dynamic.kind, NetworkKind::Dynamic);
        let e = network_from_wire("x", &json!({"ip": "10.0.0.1", "netmask": "255.0.255.0"}))
            .unwrap_err();
        assert_eq!(e, "networks.x: netmask '255.0.255.0' is not contiguous");
        assert_eq!(range_of("10.0.0.9", "").unwrap(), "10.0.0.9/32");
        assert_eq!(range_of("10.0.0.9", "0.0.0.0").unwrap(), "0.0.0.0/0");
        assert!(network_from_wire("y", &json!({"ip": 3})).is_err());
    }

    #[test]
    fn bosuns_part_of_env_carries_the_keys_and_is_taken_out_again() {
        let mut networks = BTreeMap::new();
        networks.insert("default".to_string(), net());
        let settings = AgentSettings {
            agent_id: "a-1".into(),
            director_public_key: "ssh-ed25519 AAA".into(),
            host_private_key: "-----BEGIN-----".into(),
            listen_ip: "10.244.1.5".into(),
            listen_port: 7000,
            networks: networks.clone(),
            disks: BTreeMap::new(),
            env: json!({"bosh": {"password": "x"}}),
        };
        let mut meta = Metadata::new();
        meta.insert("director".into(), "d".into());
        let env = env_to_wire(&settings, &meta);
        assert_eq!(env["bosh"]["password"], "x");
        let (back, m) = settings_from_wire("a-1", networks.clone(), &env).unwrap();
        assert_eq!(back, settings);
        assert_eq!(m, meta);
        let e = settings_from_wire("a-1", networks.clone(), &json!({})).unwrap_err();
        assert!(e.contains("env.bosun is missing"), "{e}");
        // Without listen_ip the default network's address is listened on.
        let env = json!({"bosun": {"director_public_key": "k", "host_private_key": "h"}});
        let (s, _) = settings_from_wire("a-1", networks, &env).unwrap();
        assert_eq!(
            (s.listen_ip.as_str(), s.listen_port),
            ("10.244.1.5", AGENT_PORT)
        );
    }

    #[test]
    fn disk_hints_of_every_shape_are_read() {
        let hint = |v: Value| disk_hint_from_wire(&v).map(|h| h.path);
        assert_eq!(hint(json!("/dev/sdc")).unwrap(), "/dev/sdc");
        assert_eq!(hint(json!({"path": "/dev/sdd"})).unwrap(), "/dev/sdd");
        assert_eq!(hint(json!({"volume_id": "3"})).unwrap(), "3");
        assert_eq!(
            hint(json!({"lun": "0", "host_device_id": "h"})).unwrap(),
            r#"{"host_device_id":"h","lun":"0"}"#
        );
        assert_eq!(hint(Value::Null).unwrap(), "");
        assert!(hint(json!({"nope": 1})).is_err());
        assert!(hint(json!(7)).is_err());
    }

    #[test]
    fn errors_map_to_boshs_types() {
        let e = WireError::from_cpi_error(&CpiError::VmNotFound(VmCid("v".into())));
        assert_eq!(
            (e.kind.as_str(), e.short_kind()),
            (error_type::VM_NOT_FOUND, "VMNotFound")
        );
        let e = WireError::from_cpi_error(&CpiError::Transient {
            message: "busy".into(),
            retry_after: None,
        });
        assert!(e.ok_to_retry);
        let short = WireError {
            kind: "DiskNotFound".into(),
            message: String::new(),
            ok_to_retry: false,
        };
        assert_eq!(short.short_kind(), "DiskNotFound");
    }

    #[test]
    fn stemcells_keep_name_version_and_os() {
        let spec = StemcellSpec {
            name: "bosh-docker".into(),
            os: "ubuntu-jammy".into(),
            version: "1.5".into(),
            image_path: Some("/tmp/image".into()),
            cloud_properties: json!({"image_id": "i"}),
        };
        let wire = stemcell_properties_to_wire(&spec);
        assert_eq!(wire["image_id"], "i");
        assert_eq!(stemcell_from_wire("/tmp/image", &wire), spec);
    }
}

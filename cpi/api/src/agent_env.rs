//! BOSH's agent env: the settings a BOSH CPI delivers to a VM's agent
//! (`agent_id`, `vm`, `mbus`, `ntp`, `blobstore`, `networks`, `disks`,
//! `env`), in a file, user-data or a config drive, and the translation of
//! bosun's [`AgentSettings`] to and from it. bosun's director passes what
//! its agent needs beyond BOSH's env (its keys and port) under `env.bosun`;
//! the network range is derived from `ip` and `netmask`, persistent disks
//! come from `disks.persistent`.
//!
//! Pure data: this module must not read files or talk to anything.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{AgentSettings, DiskHint, Metadata, NetworkKind, NetworkSettings, AGENT_PORT};

/// The key of `env` under which bosun's director passes what its agent
/// needs beyond BOSH's agent env (keys, port, the VM's metadata).
pub const BOSUN_ENV_KEY: &str = "bosun";

/// BOSH's agent env, as the warden and docker CPIs write it to
/// `/var/vcap/bosh/warden-cpi-agent-env.json` and clouds put it in
/// user-data or on a config drive. Fields bosun does not use are kept.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BoshAgentEnv {
    pub agent_id: String,
    #[serde(default)]
    pub vm: Value,
    #[serde(default)]
    pub mbus: Value,
    #[serde(default)]
    pub ntp: Value,
    #[serde(default)]
    pub blobstore: Value,
    #[serde(default)]
    pub networks: Value,
    #[serde(default)]
    pub disks: BoshDisks,
    #[serde(default)]
    pub env: Value,
}

/// `disks` of BOSH's agent env.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BoshDisks {
    #[serde(default)]
    pub system: Value,
    #[serde(default)]
    pub ephemeral: Value,
    /// Disk cid to hint (a path, or a hash with `path`, `volume_id`, ...);
    /// the docker CPI writes null when there is none.
    #[serde(default)]
    pub persistent: Option<Map<String, Value>>,
}

impl BoshAgentEnv {
    /// bosun's settings from BOSH's agent env; `env.bosun` must be there.
    pub fn to_settings(&self) -> Result<AgentSettings, String> {
        if self.agent_id.is_empty() {
            return Err("agent_id is missing".into());
        }
        let networks = match &self.networks {
            Value::Null => BTreeMap::new(),
            v => networks_from_bosh(v)?,
        };
        let (mut settings, _metadata) = settings_from_bosh(&self.agent_id, networks, &self.env)?;
        for (cid, hint) in self.disks.persistent.iter().flatten() {
            let path = disk_hint_from_bosh(hint)
                .map_err(|e| format!("disks.persistent.{cid}: {e}"))?
                .path;
            settings.disks.insert(cid.clone(), json!({ "path": path }));
        }
        Ok(settings)
    }
}

/// Settings as the agent finds them: bosun's own JSON, or BOSH's agent env
/// (told apart by bosun's `director_public_key` at the top).
pub fn parse_settings(text: &str) -> Result<AgentSettings, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    if v.get("director_public_key").is_some() {
        return serde_json::from_value(v).map_err(|e| e.to_string());
    }
    let env: BoshAgentEnv =
        serde_json::from_value(v).map_err(|e| format!("not a BOSH agent env: {e}"))?;
    env.to_settings()
}

/// Converting between bosun's network settings and BOSH's network hash.
pub fn network_to_bosh(n: &NetworkSettings) -> Value {
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
pub fn network_from_bosh(name: &str, v: &Value) -> Result<NetworkSettings, String> {
    let field = |key: &str| -> Result<Option<String>, String> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(format!(
                "networks.{name}.{key} must be a string, got {other}"
            )),
        }
    };
    let strings = |key: &str| {
        string_list(
            v.get(key).unwrap_or(&Value::Null),
            &format!("networks.{name}.{key}"),
        )
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

/// A hash's fields; anything else has none.
pub fn fields_of(v: &Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    }
}

/// A hash as it is; anything else as an empty one.
pub fn object_or_empty(v: &Value) -> Value {
    Value::Object(fields_of(v))
}

/// A list of strings (null: empty); `what` names it in errors.
pub fn string_list(v: &Value, what: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{what} must hold strings, got {x}"))
            })
            .collect(),
        other => Err(format!("{what} must be a list, got {other}")),
    }
}

/// The networks argument of `create_vm`.
pub fn networks_to_bosh(networks: &BTreeMap<String, NetworkSettings>) -> Value {
    Value::Object(
        networks
            .iter()
            .map(|(k, n)| (k.clone(), network_to_bosh(n)))
            .collect(),
    )
}

/// The networks argument of `create_vm`, read.
pub fn networks_from_bosh(v: &Value) -> Result<BTreeMap<String, NetworkSettings>, String> {
    let m = v
        .as_object()
        .ok_or_else(|| format!("networks must be a hash, got {v}"))?;
    m.iter()
        .map(|(k, n)| Ok((k.clone(), network_from_bosh(k, n)?)))
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
pub fn env_to_bosh(settings: &AgentSettings, metadata: &Metadata) -> Value {
    let mut env = fields_of(&settings.env);
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
pub fn settings_from_bosh(
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

/// `attach_disk`'s answer as a hint: v2's string or hash (`path`,
/// `volume_id`, or `lun` and `host_device_id`, kept as compact JSON); v1's
/// null is an empty hint (the VM finds the disk itself).
pub fn disk_hint_from_bosh(v: &Value) -> Result<DiskHint, String> {
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
        let wire = network_to_bosh(&n);
        assert!(wire.get("range").is_none(), "BOSH's shape has no range");
        assert_eq!(network_from_bosh("default", &wire).unwrap(), n);
        let dynamic = network_from_bosh("d", &json!({"type": "dynamic"})).unwrap();
        assert_eq!(dynamic.range, "0.0.0.0/0");
        assert_eq!(dynamic.kind, NetworkKind::Dynamic);
        let e = network_from_bosh("x", &json!({"ip": "10.0.0.1", "netmask": "255.0.255.0"}))
            .unwrap_err();
        assert_eq!(e, "networks.x: netmask '255.0.255.0' is not contiguous");
        assert_eq!(range_of("10.0.0.9", "").unwrap(), "10.0.0.9/32");
        assert_eq!(range_of("10.0.0.9", "0.0.0.0").unwrap(), "0.0.0.0/0");
        assert!(network_from_bosh("y", &json!({"ip": 3})).is_err());
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
        let env = env_to_bosh(&settings, &meta);
        assert_eq!(env["bosh"]["password"], "x");
        let (back, m) = settings_from_bosh("a-1", networks.clone(), &env).unwrap();
        assert_eq!(back, settings);
        assert_eq!(m, meta);
        let e = settings_from_bosh("a-1", networks.clone(), &json!({})).unwrap_err();
        assert!(e.contains("env.bosun is missing"), "{e}");
        // Without listen_ip the default network's address is listened on.
        let env = json!({"bosun": {"director_public_key": "k", "host_private_key": "h"}});
        let (s, _) = settings_from_bosh("a-1", networks, &env).unwrap();
        assert_eq!(
            (s.listen_ip.as_str(), s.listen_port),
            ("10.244.1.5", AGENT_PORT)
        );
    }

    #[test]
    fn disk_hints_of_every_shape_are_read() {
        let hint = |v: Value| disk_hint_from_bosh(&v).map(|h| h.path);
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
    fn boshs_agent_env_becomes_bosuns_settings() {
        let text = r#"{
          "agent_id": "agent-7",
          "vm": {"name": "vm-7"},
          "mbus": "https://mbus:secret@0.0.0.0:6868",
          "ntp": [],
          "blobstore": {"provider": "local", "options": {"blobstore_path": "/var/vcap/micro_bosh/data/cache"}},
          "networks": {"default": {"type": "manual", "ip": "10.244.0.5", "netmask": "255.255.255.0",
                       "gateway": "10.244.0.1", "dns": ["10.244.0.1"], "default": ["dns", "gateway"],
                       "mac": "", "preconfigured": true, "cloud_properties": {}}},
          "disks": {"system": "/dev/sda", "ephemeral": null, "persistent": {"disk-1": {"path": "/warden-cpi-dev/disk-1"}}},
          "env": {"bosh": {"password": "x"}, "bosun": {"director_public_key": "ssh-ed25519 K", "host_private_key": "H"}}
        }"#;
        let s = parse_settings(text).unwrap();
        assert_eq!(s.agent_id, "agent-7");
        assert_eq!(s.networks["default"].range, "10.244.0.0/24");
        assert_eq!(
            (s.listen_ip.as_str(), s.listen_port),
            ("10.244.0.5", AGENT_PORT)
        );
        assert_eq!(s.disks["disk-1"]["path"], "/warden-cpi-dev/disk-1");
        assert_eq!(s.env["bosh"]["password"], "x");
        assert!(s.env.get("bosun").is_none());
        // Without bosun's part the agent cannot start, and says why.
        let bare = text.replace(
            r#""bosun": {"director_public_key": "ssh-ed25519 K", "host_private_key": "H"}"#,
            r#""other": 1"#,
        );
        assert!(parse_settings(&bare)
            .unwrap_err()
            .contains("env.bosun is missing"));
        // The docker CPI's env without disks says null.
        let none = text.replace(r#"{"disk-1": {"path": "/warden-cpi-dev/disk-1"}}"#, "null");
        assert!(parse_settings(&none).unwrap().disks.is_empty());
        // bosun's own settings still read as they are.
        let own = serde_json::to_string(&s).unwrap();
        assert_eq!(parse_settings(&own).unwrap(), s);
    }
}

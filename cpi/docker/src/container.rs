//! The container of a VM, as configuration: its Docker networks, volume
//! binds, DNS, command and labels, and the archive carrying its agent
//! settings.
//!
//! This module must not talk to the daemon: it is pure (the calls are in
//! [`crate::vm`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, NetworkingConfig,
};
use bosun_cpi::{
    AgentSettings, CreateVmRequest, DiskCid, Metadata, NetworkKind, NetworkSettings, VmCid,
};

use crate::names::{labels, network_name};
use crate::{
    io_err, DockerCpiError, Result, AGENT_PATH_IN_VM, LABEL_AGENT_ID, LABEL_VM,
    SETTINGS_PATH_IN_VM, STORE_PATH,
};

/// One Docker network a VM is connected to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNetwork {
    /// The BOSH network name.
    pub name: String,
    /// The Docker network name.
    pub docker_name: String,
    /// The subnet (CIDR), when known.
    pub subnet: Option<String>,
    pub gateway: Option<String>,
    /// The static IPv4 address (manual networks).
    pub ip: Option<String>,
}

impl VmNetwork {
    pub(crate) fn endpoint(&self) -> EndpointSettings {
        EndpointSettings {
            ipam_config: self.ip.as_ref().map(|ip| EndpointIpamConfig {
                ipv4_address: Some(ip.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The Docker networks of a VM, the default-gateway network first. Manual
/// networks need an IP and a range; dynamic ones get whatever Docker assigns;
/// VIP networks are not Docker networks and are skipped.
pub fn vm_networks(prefix: &str, req: &CreateVmRequest) -> Result<Vec<VmNetwork>> {
    let mut out = Vec::new();
    let mut names: Vec<(&String, &NetworkSettings)> = req.networks.iter().collect();
    // Stable sort: the network providing the default gateway first.
    names.sort_by_key(|(_, n)| !n.default.iter().any(|d| d == "gateway"));
    for (name, net) in names {
        let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_string());
        match net.kind {
            NetworkKind::Vip => continue,
            NetworkKind::Manual => {
                if net.ip.trim().is_empty() || net.range.trim().is_empty() {
                    return Err(DockerCpiError::Invalid(format!(
                        "creating VM for agent {}: manual network {name} needs an ip and a range (got ip {:?}, range {:?})",
                        req.agent_id, net.ip, net.range
                    )));
                }
            }
            NetworkKind::Dynamic => {}
        }
        out.push(VmNetwork {
            name: name.clone(),
            docker_name: network_name(prefix, name),
            subnet: non_empty(&net.range),
            gateway: net.gateway.as_deref().and_then(non_empty),
            ip: match net.kind {
                NetworkKind::Manual => non_empty(&net.ip),
                _ => None,
            },
        });
    }
    Ok(out)
}

/// Where the n-th attached disk is mounted: the first at `/var/vcap/store`,
/// any further one (a disk migration) at `/var/vcap/store-<disk cid>`.
pub(crate) fn mount_path(index: usize, disk: &DiskCid) -> String {
    if index == 0 {
        STORE_PATH.to_string()
    } else {
        format!("{STORE_PATH}-{}", disk.0)
    }
}

/// The agent settings to deliver: the request's, with `disks` set from the
/// attached disks (`{<cid>: {"path": <mount point>}}`).
pub fn settings_for(req: &CreateVmRequest, disks: &[DiskCid]) -> AgentSettings {
    let mut settings = req.settings.clone();
    settings.disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| (d.0.clone(), serde_json::json!({ "path": mount_path(i, d) })))
        .collect();
    settings
}

/// The container of a VM: its create body (with the first network attached)
/// and the further networks to connect before starting it.
pub fn container_config(
    prefix: &str,
    cid: &VmCid,
    req: &CreateVmRequest,
    metadata: &Metadata,
    disks: &[DiskCid],
) -> Result<(ContainerCreateBody, Vec<VmNetwork>)> {
    let mut networks = vm_networks(prefix, req)?;
    let first = if networks.is_empty() {
        None
    } else {
        Some(networks.remove(0))
    };
    let mut l = labels(prefix, metadata);
    l.insert(LABEL_VM.into(), cid.0.clone());
    l.insert(LABEL_AGENT_ID.into(), req.agent_id.clone());
    let binds: Vec<String> = disks
        .iter()
        .enumerate()
        .map(|(i, d)| format!("{}:{}", d.0, mount_path(i, d)))
        .collect();
    // DNS servers of the network providing DNS (else of any network).
    let dns: Vec<String> = req
        .networks
        .values()
        .find(|n| n.default.iter().any(|d| d == "dns") && !n.dns.is_empty())
        .or_else(|| req.networks.values().find(|n| !n.dns.is_empty()))
        .map(|n| n.dns.clone())
        .unwrap_or_default();
    let host_config = HostConfig {
        binds: Some(binds),
        network_mode: first.as_ref().map(|n| n.docker_name.clone()),
        privileged: Some(false),
        dns: (!dns.is_empty()).then_some(dns),
        ..Default::default()
    };
    let networking_config = first.as_ref().map(|n| NetworkingConfig {
        endpoints_config: Some(HashMap::from([(n.docker_name.clone(), n.endpoint())])),
    });
    let body = ContainerCreateBody {
        image: Some(req.stemcell.0.clone()),
        cmd: Some(vec![
            AGENT_PATH_IN_VM.to_string(),
            "agent".to_string(),
            "--settings".to_string(),
            SETTINGS_PATH_IN_VM.to_string(),
        ]),
        labels: Some(l),
        host_config: Some(host_config),
        networking_config,
        ..Default::default()
    };
    Ok((body, networks))
}

/// A tar archive holding the settings file (`var/vcap/bosh/settings.json`,
/// root-owned, mode 0600), to be extracted at `/`.
pub fn settings_archive(settings: &AgentSettings) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(settings).map_err(|source| DockerCpiError::Json {
        path: PathBuf::from(SETTINGS_PATH_IN_VM),
        source,
    })?;
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_size(json.len() as u64);
    header.set_mode(0o600);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    let in_archive = SETTINGS_PATH_IN_VM.trim_start_matches('/');
    builder
        .append_data(&mut header, in_archive, json.as_slice())
        .and_then(|()| builder.into_inner())
        .map_err(io_err("archiving", Path::new(SETTINGS_PATH_IN_VM)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::request;
    use crate::LABEL_CPI;
    use std::io;

    #[test]
    fn networks_put_the_default_gateway_first_and_skip_vips() {
        let nets = vm_networks("bosun", &request()).unwrap();
        let names: Vec<&str> = nets.iter().map(|n| n.docker_name.as_str()).collect();
        assert_eq!(names, ["bosun-z-default", "bosun-a-private"]);
        assert_eq!(nets[0].ip.as_deref(), Some("10.244.250.10"));
        assert_eq!(nets[0].subnet.as_deref(), Some("10.244.250.0/24"));
        assert_eq!(nets[0].gateway.as_deref(), Some("10.244.250.1"));

        let mut bad = request();
        bad.networks.get_mut("a-private").unwrap().ip.clear();
        let err = vm_networks("bosun", &bad).unwrap_err().to_string();
        assert!(
            err.contains("a-private") && err.contains("agent-1"),
            "{err}"
        );
    }

    #[test]
    fn container_config_from_a_request() {
        let req = request();
        let cid = VmCid("vm-1".into());
        let disks = vec![DiskCid("disk-1".into()), DiskCid("disk-2".into())];
        let (body, extra) = container_config("bosun", &cid, &req, &req.metadata, &disks).unwrap();
        assert_eq!(body.image.as_deref(), Some("sha256:abc"));
        assert_eq!(
            body.cmd.as_deref().unwrap(),
            [AGENT_PATH_IN_VM, "agent", "--settings", SETTINGS_PATH_IN_VM]
        );
        let labels = body.labels.as_ref().unwrap();
        assert_eq!(labels["bosun.token"], "t-1");
        assert_eq!(labels["bosun.instance"], "kv/0");
        assert_eq!(labels["bosun.vm"], "vm-1");
        assert_eq!(labels[LABEL_CPI], "bosun");
        let host = body.host_config.as_ref().unwrap();
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("bosun-z-default"));
        assert_eq!(
            host.binds.as_deref().unwrap(),
            ["disk-1:/var/vcap/store", "disk-2:/var/vcap/store-disk-2"]
        );
        assert_eq!(host.dns.as_deref().unwrap(), ["10.244.250.2"]);
        let endpoints = body
            .networking_config
            .as_ref()
            .and_then(|n| n.endpoints_config.as_ref())
            .unwrap();
        assert_eq!(endpoints.len(), 1);
        let ep = &endpoints["bosun-z-default"];
        assert_eq!(
            ep.ipam_config.as_ref().unwrap().ipv4_address.as_deref(),
            Some("10.244.250.10")
        );
        assert_eq!(extra.len(), 1);
        assert_eq!(extra[0].docker_name, "bosun-a-private");
        assert_eq!(
            extra[0]
                .endpoint()
                .ipam_config
                .unwrap()
                .ipv4_address
                .as_deref(),
            Some("10.244.251.10")
        );
    }

    #[test]
    fn settings_carry_the_attached_disks() {
        let req = request();
        let s = settings_for(&req, &[DiskCid("disk-1".into())]);
        assert_eq!(s.disks.len(), 1);
        assert_eq!(s.disks["disk-1"]["path"], STORE_PATH);
        assert_eq!(s.agent_id, req.settings.agent_id);
        assert!(settings_for(&req, &[]).disks.is_empty());

        let archive = settings_archive(&s).unwrap();
        let mut ar = tar::Archive::new(archive.as_slice());
        let mut entries = ar.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(
            entry.path().unwrap().to_string_lossy(),
            "var/vcap/bosh/settings.json"
        );
        assert_eq!(entry.header().mode().unwrap(), 0o600);
        assert_eq!(entry.header().uid().unwrap(), 0);
        let mut json = String::new();
        io::Read::read_to_string(&mut entry, &mut json).unwrap();
        let back: AgentSettings = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
        assert!(entries.next().is_none());
    }
}

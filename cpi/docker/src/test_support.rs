//! Fixtures shared by the Docker CPI's unit tests: a VM request with
//! manual, dynamic-free and VIP networks.
//!
//! This module must not be compiled outside tests.

use std::collections::BTreeMap;

use bosun_cpi::{
    AgentSettings, CreateVmRequest, Metadata, NetworkKind, NetworkSettings, StemcellCid,
};

pub(crate) fn net(kind: NetworkKind, ip: &str, range: &str, default: &[&str]) -> NetworkSettings {
    NetworkSettings {
        kind,
        ip: ip.into(),
        netmask: "255.255.255.0".into(),
        range: range.into(),
        gateway: Some("10.244.250.1".into()),
        dns: vec!["10.244.250.2".into()],
        default: default.iter().map(|s| s.to_string()).collect(),
        cloud_properties: serde_json::json!({}),
    }
}

pub(crate) fn request() -> CreateVmRequest {
    let networks = BTreeMap::from([
        (
            "a-private".to_string(),
            net(NetworkKind::Manual, "10.244.251.10", "10.244.251.0/24", &[]),
        ),
        (
            "z default".to_string(),
            net(
                NetworkKind::Manual,
                "10.244.250.10",
                "10.244.250.0/24",
                &["dns", "gateway"],
            ),
        ),
        (
            "public".to_string(),
            net(NetworkKind::Vip, "1.2.3.4", "", &[]),
        ),
    ]);
    CreateVmRequest {
        agent_id: "agent-1".into(),
        stemcell: StemcellCid("sha256:abc".into()),
        cloud_properties: serde_json::json!({}),
        networks: networks.clone(),
        disk_cids: Vec::new(),
        settings: AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: "ssh-ed25519 AAAA director".into(),
            host_private_key: "secret".into(),
            listen_ip: "10.244.250.10".into(),
            listen_port: bosun_cpi::AGENT_PORT,
            networks,
            disks: BTreeMap::new(),
            env: serde_json::json!({}),
        },
        metadata: Metadata::from([
            ("token".to_string(), "t-1".to_string()),
            ("instance".to_string(), "kv/0".to_string()),
        ]),
    }
}

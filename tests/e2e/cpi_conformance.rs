//! The CPI conformance suite against the local CPI, with the real agent
//! (`bosun agent`) as each VM's process.

use std::collections::BTreeMap;

use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::{
    AgentSettings, CreateVmRequest, NetworkKind, NetworkSettings, StemcellSpec, AGENT_PORT,
};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};

use crate::support::BOSUN;

#[tokio::test]
async fn local_cpi_passes_conformance_with_the_real_agent() {
    let dir = tempfile::tempdir().unwrap();
    let cpi = LocalCpi::new(LocalCpiConfig {
        root: dir.path().join("local-cpi"),
        agent_command: vec![BOSUN.to_string(), "agent".to_string()],
    })
    .unwrap();
    let director = bosun_agent::keys::generate_keypair().unwrap();
    let fixture = Fixture {
        stemcell: StemcellSpec {
            name: "bosun-local-host".into(),
            os: "local".into(),
            version: "1".into(),
            image_path: None,
            cloud_properties: serde_json::json!({}),
        },
        vm_request: Box::new(move |n, stemcell| {
            let host = bosun_agent::keys::generate_keypair().unwrap();
            let ip = format!("127.103.0.{}", 10 + n);
            let net = NetworkSettings {
                kind: NetworkKind::Manual,
                ip: ip.clone(),
                netmask: "255.255.255.0".into(),
                range: "127.103.0.0/24".into(),
                gateway: None,
                dns: vec![],
                default: vec!["dns".into(), "gateway".into()],
                cloud_properties: serde_json::json!({}),
            };
            let networks = BTreeMap::from([("default".to_string(), net)]);
            CreateVmRequest {
                agent_id: format!("agent-{n}"),
                stemcell: stemcell.clone(),
                cloud_properties: serde_json::json!({}),
                networks: networks.clone(),
                disk_cids: vec![],
                settings: AgentSettings {
                    agent_id: format!("agent-{n}"),
                    director_public_key: director.public_openssh.clone(),
                    host_private_key: host.private_openssh,
                    listen_ip: ip,
                    listen_port: AGENT_PORT,
                    networks,
                    disks: BTreeMap::new(),
                    env: serde_json::json!({}),
                },
                metadata: [("token".to_string(), format!("conformance-{n}"))]
                    .into_iter()
                    .collect(),
            }
        }),
        disk_size_mb: 64,
    };
    if let Err(failures) = conformance::run(&cpi, &fixture).await {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
}

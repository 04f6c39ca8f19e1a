//! The AWS CPI against an EC2 API emulator (`moto_server` on 127.0.0.1).
//!
//! The endpoint comes from `BOSUN_TEST_MOTO_ENDPOINT` (e.g.
//! `http://127.0.0.1:5055`). Without it the tests skip with a message, except
//! under CI (`CI` set), where they fail. Every test makes its own VPC and
//! subnet in the loopback range (127.88.0.0/16), so that no address outside
//! loopback is ever used, and removes them at the end.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{Filter, InstanceAttributeName};
use aws_sdk_ec2::Client;
use bosun_cpi::conformance::{self, Fixture};
use bosun_cpi::{
    AgentSettings, Cpi, CpiError, CreateDiskRequest, CreateVmRequest, Metadata, NetworkKind,
    NetworkSettings, StemcellCid, StemcellSpec, AGENT_PORT,
};
use bosun_cpi_aws::{decode_user_data, AwsCpi, AwsCpiConfig};
use serde_json::json;

const REGION: &str = "us-east-1";
const AZ: &str = "us-east-1a";

/// The emulator's endpoint; `None` (after printing why) when not configured.
fn endpoint() -> Option<String> {
    match std::env::var("BOSUN_TEST_MOTO_ENDPOINT") {
        Ok(e) if !e.trim().is_empty() => Some(e.trim().to_string()),
        _ => {
            let reason =
                "BOSUN_TEST_MOTO_ENDPOINT is not set: run scripts/test, which starts moto_server";
            if std::env::var_os("CI").is_some() {
                panic!("{reason}");
            }
            eprintln!("SKIPPED: {reason}");
            None
        }
    }
}

async fn cpi(endpoint: &str) -> AwsCpi {
    let mut config = AwsCpiConfig::new(REGION);
    config.endpoint = Some(endpoint.to_string());
    config.access_key_id = Some("test".into());
    config.secret_access_key = Some("test".into());
    config.poll_interval = Duration::from_millis(100);
    config.wait_timeout = Duration::from_secs(60);
    AwsCpi::new(config).await.expect("AwsCpi::new")
}

/// A VPC and a subnet `127.88.<k>.0/24` of its own, plus an AMI the emulator ships.
#[derive(Clone)]
struct Net {
    vpc: String,
    subnet: String,
    /// `127.88.<k>`
    prefix: String,
    ami: String,
}

async fn setup(client: &Client) -> Net {
    // A random third octet, so that runs against a long-lived emulator never
    // ask for an address a previous run's instance still holds.
    let k = 1 + uuid::Uuid::new_v4().as_bytes()[0] % 250;
    let vpc = client
        .create_vpc()
        .cidr_block("127.88.0.0/16")
        .send()
        .await
        .expect("CreateVpc 127.88.0.0/16");
    let vpc = vpc.vpc().and_then(|v| v.vpc_id()).unwrap().to_string();
    let subnet = client
        .create_subnet()
        .vpc_id(&vpc)
        .cidr_block(format!("127.88.{k}.0/24"))
        .availability_zone(AZ)
        .send()
        .await
        .expect("CreateSubnet");
    let subnet = subnet
        .subnet()
        .and_then(|s| s.subnet_id())
        .unwrap()
        .to_string();
    let images = client
        .describe_images()
        .send()
        .await
        .expect("DescribeImages");
    let ami = images
        .images()
        .iter()
        .filter(|i| i.platform().is_none())
        .chain(images.images())
        .find_map(|i| i.image_id())
        .expect("the emulator ships no AMI")
        .to_string();
    Net {
        vpc,
        subnet,
        prefix: format!("127.88.{k}"),
        ami,
    }
}

async fn teardown(client: &Client, net: &Net) {
    if let Err(e) = client.delete_subnet().subnet_id(&net.subnet).send().await {
        eprintln!("DeleteSubnet {}: {e:?}", net.subnet);
    }
    if let Err(e) = client.delete_vpc().vpc_id(&net.vpc).send().await {
        eprintln!("DeleteVpc {}: {e:?}", net.vpc);
    }
}

fn stemcell(ami: &str) -> StemcellSpec {
    StemcellSpec {
        name: "bosh-aws-xen-hvm-ubuntu-jammy-go_agent".into(),
        os: "ubuntu-jammy".into(),
        version: "1.0".into(),
        image_path: None,
        cloud_properties: json!({"ami": {REGION: ami}}),
    }
}

/// A create_vm request with real keys; VM n at `<prefix>.<10 + n>`.
fn vm_request(
    net: &Net,
    director: &str,
    test: &str,
    n: usize,
    stemcell: &StemcellCid,
) -> CreateVmRequest {
    let ip = format!("{}.{}", net.prefix, 10 + n);
    let network = NetworkSettings {
        kind: NetworkKind::Manual,
        ip: ip.clone(),
        netmask: "255.255.255.0".into(),
        range: format!("{}.0/24", net.prefix),
        gateway: Some(format!("{}.1", net.prefix)),
        dns: Vec::new(),
        default: vec!["dns".into(), "gateway".into()],
        cloud_properties: json!({"subnet": net.subnet}),
    };
    let networks = BTreeMap::from([("default".to_string(), network)]);
    let director_key = bosun_agent::keys::generate_keypair().expect("director key");
    let host_key = bosun_agent::keys::generate_keypair().expect("host key");
    let agent_id = format!("agent-{test}-{n}");
    CreateVmRequest {
        agent_id: agent_id.clone(),
        stemcell: stemcell.clone(),
        cloud_properties: json!({"availability_zone": AZ}),
        networks: networks.clone(),
        disk_cids: Vec::new(),
        settings: AgentSettings {
            agent_id,
            director_public_key: director_key.public_openssh,
            host_private_key: host_key.private_openssh,
            listen_ip: ip,
            listen_port: AGENT_PORT,
            networks,
            disks: BTreeMap::new(),
            env: json!({}),
        },
        metadata: Metadata::from([
            ("director".to_string(), director.to_string()),
            ("deployment".to_string(), format!("aws-{test}")),
            ("instance".to_string(), format!("{test}/{n}")),
            ("name".to_string(), format!("{test}/{n}")),
            ("token".to_string(), uuid::Uuid::new_v4().to_string()),
        ]),
    }
}

/// Volumes (not deleted) whose `token` tag was set by the conformance suite.
async fn conformance_volumes(client: &Client) -> Vec<String> {
    let out = client
        .describe_volumes()
        .filters(Filter::builder().name("tag-key").values("token").build())
        .send()
        .await
        .expect("DescribeVolumes tag-key=token");
    out.volumes()
        .iter()
        .filter(|v| {
            v.tags().iter().any(|t| {
                t.key() == Some("token") && t.value().is_some_and(|v| v.starts_with("conformance-"))
            })
        })
        .filter_map(|v| v.volume_id().map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_cpi_passes_the_conformance_suite() {
    let Some(endpoint) = endpoint() else {
        return;
    };
    let cpi = cpi(&endpoint).await;
    let net = setup(cpi.client()).await;
    let director = format!("bosun-aws-test-{}", uuid::Uuid::new_v4());
    let volumes_before = conformance_volumes(cpi.client()).await;
    let started = Instant::now();
    let fixture = Fixture {
        stemcell: stemcell(&net.ami),
        vm_request: Box::new({
            let net = net.clone();
            let director = director.clone();
            move |n, s| vm_request(&net, &director, "conformance", n, s)
        }),
        disk_size_mb: 1024,
    };
    let result = conformance::run(&cpi, &fixture).await;
    let leaked = cpi.find_tagged("director", &director).await.unwrap();
    let leaked_volumes: Vec<String> = conformance_volumes(cpi.client())
        .await
        .into_iter()
        .filter(|v| !volumes_before.contains(v))
        .collect();
    teardown(cpi.client(), &net).await;
    if let Err(failures) = result {
        panic!("conformance failures:\n  {}", failures.join("\n  "));
    }
    eprintln!("conformance suite passed in {:?}", started.elapsed());
    assert_eq!(leaked, (vec![], vec![]), "left tagged director={director}");
    assert!(
        leaked_volumes.is_empty(),
        "conformance volumes left: {leaked_volumes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_gets_its_settings_and_a_disk_goes_through_its_life() {
    let Some(endpoint) = endpoint() else {
        return;
    };
    let cpi = cpi(&endpoint).await;
    let client = cpi.client().clone();
    let net = setup(&client).await;
    let director = format!("bosun-aws-test-{}", uuid::Uuid::new_v4());

    let stemcell = cpi.create_stemcell(&stemcell(&net.ami)).await.unwrap();
    assert_eq!(stemcell.0, net.ami);
    // An AMI that does not exist is refused by name.
    match cpi
        .create_stemcell(&StemcellSpec {
            cloud_properties: json!({"ami": {REGION: "ami-00000000000000000"}}),
            ..self::stemcell(&net.ami)
        })
        .await
    {
        Err(CpiError::StemcellNotFound(c)) => assert_eq!(c.0, "ami-00000000000000000"),
        other => panic!("create_stemcell of a missing AMI: {other:?}"),
    }

    let mut req = vm_request(&net, &director, "life", 0, &stemcell);
    req.cloud_properties = json!({
        "availability_zone": AZ,
        "instance_type": "t3.small",
        "ephemeral_disk": {"size": 3000, "type": "gp3"},
        "tags": {"team": "bosun", "cost": 7},
    });
    let started = Instant::now();
    let a = cpi.create_vm(&req).await.unwrap();
    eprintln!("create_vm {a} took {:?}", started.elapsed());
    assert!(cpi.has_vm(&a).await.unwrap());

    // The instance as EC2 reports it: placement, address, type, tags, ephemeral disk.
    let out = client
        .describe_instances()
        .instance_ids(&a.0)
        .send()
        .await
        .unwrap();
    let inst = out.reservations()[0].instances()[0].clone();
    assert_eq!(inst.subnet_id(), Some(net.subnet.as_str()));
    assert_eq!(
        inst.private_ip_address(),
        Some(format!("{}.10", net.prefix).as_str())
    );
    assert_eq!(inst.instance_type().map(|t| t.as_str()), Some("t3.small"));
    assert_eq!(
        inst.placement().and_then(|p| p.availability_zone()),
        Some(AZ)
    );
    let tags: BTreeMap<&str, &str> = inst
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?, t.value()?)))
        .collect();
    assert_eq!(tags.get("director"), Some(&director.as_str()));
    assert_eq!(tags.get("Name"), Some(&"life/0"));
    assert_eq!(tags.get("team"), Some(&"bosun"));
    assert_eq!(tags.get("cost"), Some(&"7"));
    assert!(
        inst.block_device_mappings()
            .iter()
            .any(|m| m.device_name() == Some("/dev/sdb")),
        "no ephemeral disk at /dev/sdb: {:?}",
        inst.block_device_mappings()
    );

    // The user-data decodes back to the settings.
    let attr = client
        .describe_instance_attribute()
        .instance_id(&a.0)
        .attribute(InstanceAttributeName::UserData)
        .send()
        .await
        .unwrap();
    let user_data = attr
        .user_data()
        .and_then(|u| u.value())
        .expect("no user-data");
    assert_eq!(decode_user_data(user_data).unwrap(), req.settings);

    let b = cpi
        .create_vm(&vm_request(&net, &director, "life", 1, &stemcell))
        .await
        .unwrap();
    // Both found by the director's tag, with every tag as metadata.
    let by_director = Metadata::from([("director".to_string(), director.clone())]);
    let found = cpi.find_vms(&by_director).await.unwrap();
    let mut both = vec![a.clone(), b.clone()];
    both.sort();
    assert_eq!(
        found.iter().map(|(vm, _)| vm.clone()).collect::<Vec<_>>(),
        both
    );
    let meta_a = &found.iter().find(|(vm, _)| vm == &a).unwrap().1;
    assert_eq!(meta_a.get("token"), req.metadata.get("token"));
    assert_eq!(meta_a.get("Name").map(String::as_str), Some("life/0"));
    assert_eq!(meta_a.get("team").map(String::as_str), Some("bosun"));

    // A disk near A, attached at /dev/sdf.
    let disk = cpi
        .create_disk(&CreateDiskRequest {
            size_mb: 1500,
            cloud_properties: json!({"type": "gp3", "encrypted": true}),
            vm_locality: Some(a.clone()),
            metadata: Metadata::from([
                ("director".to_string(), director.clone()),
                ("token".to_string(), "life-disk".to_string()),
            ]),
        })
        .await
        .unwrap();
    let vol = client
        .describe_volumes()
        .volume_ids(&disk.0)
        .send()
        .await
        .unwrap()
        .volumes()[0]
        .clone();
    assert_eq!(vol.size(), Some(2), "1500 MB rounds up to 2 GiB");
    assert_eq!(vol.availability_zone(), Some(AZ));
    assert!(cpi.has_disk(&disk).await.unwrap());

    let hint = cpi.attach_disk(&a, &disk).await.unwrap();
    assert_eq!(hint.path, "/dev/sdf");
    assert_eq!(
        cpi.attach_disk(&a, &disk).await.unwrap(),
        hint,
        "idempotent"
    );
    assert_eq!(cpi.get_disks(&a).await.unwrap(), vec![disk.clone()]);
    assert!(cpi.get_disks(&b).await.unwrap().is_empty());

    // Attached elsewhere: refused naming both VMs; deleting it is refused too.
    match cpi.attach_disk(&b, &disk).await {
        Err(CpiError::Fatal { message }) => {
            assert!(
                message.contains(&a.0) && message.contains(&b.0),
                "{message}"
            )
        }
        other => panic!("attaching a disk attached to {a} to {b}: {other:?}"),
    }
    match cpi.delete_disk(&disk).await {
        Err(CpiError::Fatal { message }) => assert!(message.contains(&a.0), "{message}"),
        other => panic!("deleting an attached disk: {other:?}"),
    }

    // Resize (grow only), snapshot.
    cpi.resize_disk(&disk, 4096).await.unwrap();
    let vol = client
        .describe_volumes()
        .volume_ids(&disk.0)
        .send()
        .await
        .unwrap()
        .volumes()[0]
        .clone();
    assert_eq!(vol.size(), Some(4));
    assert!(matches!(
        cpi.resize_disk(&disk, 1024).await,
        Err(CpiError::Fatal { .. })
    ));
    let snap = cpi
        .snapshot_disk(
            &disk,
            &Metadata::from([("director".to_string(), director.clone())]),
        )
        .await
        .unwrap();
    assert!(snap.0.starts_with("snap-"), "{snap}");
    cpi.delete_snapshot(&snap).await.unwrap();
    cpi.delete_snapshot(&snap).await.unwrap();

    // Detach (twice), then a second attachment picks /dev/sdf again.
    cpi.detach_disk(&a, &disk).await.unwrap();
    cpi.detach_disk(&a, &disk).await.unwrap();
    assert!(cpi.get_disks(&a).await.unwrap().is_empty());
    assert_eq!(cpi.attach_disk(&b, &disk).await.unwrap().path, "/dev/sdf");
    assert_eq!(cpi.get_disks(&b).await.unwrap(), vec![disk.clone()]);
    cpi.detach_disk(&b, &disk).await.unwrap();

    cpi.delete_disk(&disk).await.unwrap();
    cpi.delete_disk(&disk).await.unwrap();
    assert!(!cpi.has_disk(&disk).await.unwrap());
    match cpi.attach_disk(&a, &disk).await {
        Err(CpiError::DiskNotFound(d)) => assert_eq!(d, disk),
        other => panic!("attaching a deleted disk: {other:?}"),
    }

    for vm in [&a, &b] {
        cpi.delete_vm(vm).await.unwrap();
        cpi.delete_vm(vm).await.unwrap();
        assert!(!cpi.has_vm(vm).await.unwrap());
        assert!(matches!(
            cpi.reboot_vm(vm).await,
            Err(CpiError::VmNotFound(_))
        ));
        assert!(matches!(
            cpi.get_disks(vm).await,
            Err(CpiError::VmNotFound(_))
        ));
    }
    cpi.delete_stemcell(&stemcell).await.unwrap();
    // The AMI is not deregistered.
    let images = client
        .describe_images()
        .image_ids(&net.ami)
        .send()
        .await
        .unwrap();
    assert_eq!(images.images().len(), 1);

    let leaked = cpi.find_tagged("director", &director).await.unwrap();
    teardown(&client, &net).await;
    assert_eq!(leaked, (vec![], vec![]), "left tagged director={director}");
}

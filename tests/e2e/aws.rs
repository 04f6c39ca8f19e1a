//! A deploy against an EC2 API emulator (`moto_server`, started by
//! scripts/test): instances are created, but no agent will ever answer, so
//! the deploy must fail clearly and leave state that `delete-deployment`
//! cleans up completely. The VPC lives in the loopback range, so nothing
//! outside this machine is ever dialed.

use std::io::Write;

use crate::support::{http_with, text, Env};

/// moto_server's address, or none (a skip, said so) outside CI.
pub fn endpoint() -> Option<String> {
    match std::env::var("BOSUN_TEST_MOTO_ENDPOINT") {
        Ok(e) if !e.is_empty() => Some(e),
        _ if std::env::var_os("CI").is_some() => {
            panic!("BOSUN_TEST_MOTO_ENDPOINT is not set: run scripts/test, which starts moto_server (AWS tests must run in CI)")
        }
        _ => {
            eprintln!(
                "skipped: BOSUN_TEST_MOTO_ENDPOINT is not set (scripts/test starts moto_server)"
            );
            None
        }
    }
}

/// One EC2 Query API call against the emulator; returns the XML answer.
fn ec2(endpoint: &str, action: &str, params: &[(&str, &str)]) -> String {
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut body = format!("Action={action}&Version=2016-11-15");
    for (k, v) in params {
        body.push_str(&format!(
            "&{k}={}",
            v.replace('/', "%2F").replace(':', "%3A")
        ));
    }
    let headers = [
        ("Content-Type", "application/x-www-form-urlencoded"),
        (
            "Authorization",
            "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=0",
        ),
    ];
    let (code, xml) = http_with("POST", addr, "/", &headers, &body).expect("emulator answers");
    assert_eq!(code, 200, "{action}: {xml}");
    xml
}

fn first_tag(xml: &str, tag: &str) -> String {
    let open = format!("<{tag}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{tag}> in {xml}"))
        + open.len();
    let end = xml[start..].find('<').unwrap() + start;
    xml[start..end].to_string()
}

/// A light stemcell naming `ami` in us-east-1.
fn light_stemcell(env: &Env, ami: &str) -> std::path::PathBuf {
    let mf = format!(
        "name: bosun-aws-light-test\nversion: '1'\noperating_system: test-os\nsha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\nstemcell_formats: [aws-light]\ncloud_properties:\n  ami:\n    us-east-1: {ami}\napi_version: 2\n"
    );
    let out = env.path("light-stemcell.tgz");
    let f = std::fs::File::create(&out).unwrap();
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    for (name, data) in [("stemcell.MF", mf.as_bytes()), ("image", &b""[..])] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, name, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    out
}

#[test]
fn deploy_to_the_emulator_fails_clearly_and_delete_leaves_nothing() {
    let Some(endpoint) = endpoint() else { return };
    let env = Env::new(110);

    let vpc = first_tag(
        &ec2(&endpoint, "CreateVpc", &[("CidrBlock", "127.89.0.0/16")]),
        "vpcId",
    );
    let subnet = first_tag(
        &ec2(
            &endpoint,
            "CreateSubnet",
            &[
                ("VpcId", &vpc),
                ("CidrBlock", "127.89.1.0/24"),
                ("AvailabilityZone", "us-east-1a"),
            ],
        ),
        "subnetId",
    );
    let ami = first_tag(&ec2(&endpoint, "DescribeImages", &[]), "imageId");

    let cc = env.path("cc-aws.yml");
    std::fs::write(
        &cc,
        format!(
            "cpis:\n- name: aws\n  type: aws\n  properties:\n    region: us-east-1\n    endpoint: {endpoint}\n    access_key_id: test\n    secret_access_key: test\n    poll_interval_ms: 100\n    wait_timeout_secs: 60\nazs:\n- name: z1\n  cpi: aws\n  cloud_properties: {{availability_zone: us-east-1a}}\nnetworks:\n- name: private\n  type: manual\n  subnets:\n  - range: 127.89.1.0/24\n    gateway: 127.89.1.1\n    reserved: [127.89.1.2 - 127.89.1.9]\n    azs: [z1]\n    cloud_properties: {{subnet: {subnet}}}\nvm_types:\n- name: default\n  cloud_properties: {{instance_type: t3.micro}}\ndisk_types:\n- name: default\n  disk_size: 1024\n  cloud_properties: {{type: gp3}}\ncompilation:\n  workers: 1\n  az: z1\n  network: private\n"
        ),
    )
    .unwrap();
    let out = env.bosun(&["update-cloud-config", cc.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let stemcell = light_stemcell(&env, &ami);
    let out = env.bosun(&["upload-stemcell", stemcell.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("to the aws CPI: {ami}")),
        "{}",
        text(&out)
    );

    let release = crate::support::noop_release(&env);
    let manifest = format!(
        "name: awsdep\nreleases:\n- name: noop\n  version: latest\n  path: {}\nstemcells:\n- alias: default\n  os: test-os\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 2\n  canary_watch_time: 1000\n  update_watch_time: 1000\ninstance_groups:\n- name: kv\n  instances: 2\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  persistent_disk_type: default\n  networks:\n  - name: private\n  jobs:\n  - name: noop\n    release: noop\n",
        release.display()
    );
    let m = env.manifest("aws.yml", &manifest);
    let started = std::time::Instant::now();
    let out = env
        .command(&["deploy", m.to_str().unwrap(), "-n"])
        .env("BOSUN_AGENT_TIMEOUT", "3")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent for kv/") && err.contains("on i-"),
        "{err}"
    );
    assert!(err.contains("did not answer within 3 s"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "failed fast enough"
    );

    // State is consistent: both instances are recorded with their EC2 instance.
    let list = env.instances("awsdep");
    assert_eq!(list.len(), 2, "{list:?}");
    for i in &list {
        assert!(i["vm_cid"].as_str().unwrap().starts_with("i-"), "{i}");
        assert_eq!(i["process_state"], "unresponsive");
    }
    let described = ec2(
        &endpoint,
        "DescribeInstances",
        &[
            ("Filter.1.Name", "tag:deployment"),
            ("Filter.1.Value.1", "awsdep"),
        ],
    );
    for i in &list {
        assert!(
            described.contains(i["vm_cid"].as_str().unwrap()),
            "tagged: {described}"
        );
    }

    // cloud-check through the AWS CPI: both agents are unresponsive, and
    // listing by tag (orphans) works against the EC2 API: nothing unknown.
    let out = env.bosun(&["-d", "awsdep", "cloud-check", "--report", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let scan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = scan["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["unresponsive_agent", "unresponsive_agent"],
        "{scan}"
    );
    assert_eq!(scan["notes"], serde_json::json!([]), "{scan}");

    // delete-deployment terminates every instance and leaves no volume.
    let out = env.bosun(&["-d", "awsdep", "delete-deployment", "-n"]);
    assert!(out.status.success(), "{}", text(&out));
    let after = ec2(
        &endpoint,
        "DescribeInstances",
        &[
            ("Filter.1.Name", "tag:deployment"),
            ("Filter.1.Value.1", "awsdep"),
        ],
    );
    for i in &list {
        let id = i["vm_cid"].as_str().unwrap();
        let pos = after.find(id).expect("still described");
        let state = first_tag(&after[pos..], "name");
        assert_eq!(state, "terminated", "{id}: {after}");
    }
    let volumes = ec2(
        &endpoint,
        "DescribeVolumes",
        &[
            ("Filter.1.Name", "tag:deployment"),
            ("Filter.1.Value.1", "awsdep"),
        ],
    );
    assert!(!volumes.contains("<volumeId>"), "volumes left: {volumes}");
}

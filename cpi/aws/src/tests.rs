//! Unit tests without a network: configuration, sizes, device names, error
//! classification and mapping, the backoff schedule, user-data encoding.

use super::*;
use serde_json::json;

#[test]
fn config_from_properties_has_defaults() {
    let c = AwsCpiConfig::from_properties(&json!({"region": "eu-west-1"})).unwrap();
    assert_eq!(c, AwsCpiConfig::new("eu-west-1"));
    assert_eq!(c.wait_timeout, Duration::from_secs(600));
    assert_eq!(c.poll_interval, Duration::from_secs(1));
    assert!(c.endpoint.is_none() && c.access_key_id.is_none());
    assert!(c.default_security_groups.is_empty());
}

#[test]
fn config_from_properties_reads_every_key() {
    let c = AwsCpiConfig::from_properties(&json!({
        "region": "us-east-1",
        "endpoint": "http://127.0.0.1:5055",
        "access_key_id": "test",
        "secret_access_key": "secret",
        "default_key_name": "bosh",
        "default_security_groups": ["sg-1", "bosh"],
        "wait_timeout_secs": 30,
        "poll_interval_ms": 100,
    }))
    .unwrap();
    assert_eq!(c.region, "us-east-1");
    assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:5055"));
    assert_eq!(c.access_key_id.as_deref(), Some("test"));
    assert_eq!(c.secret_access_key.as_deref(), Some("secret"));
    assert_eq!(c.default_key_name.as_deref(), Some("bosh"));
    assert_eq!(c.default_security_groups, vec!["sg-1", "bosh"]);
    assert_eq!(c.wait_timeout, Duration::from_secs(30));
    assert_eq!(c.poll_interval, Duration::from_millis(100));
}

#[test]
fn config_from_properties_rejects_bad_input() {
    let err = |p: Value| AwsCpiConfig::from_properties(&p).unwrap_err().to_string();
    let e = err(json!({"region": "us-east-1", "secret_key": "x"}));
    assert!(e.contains("unknown property \"secret_key\""), "{e}");
    assert!(err(json!({})).contains("region is required"));
    assert!(err(json!({"region": 3})).contains("region must be a string"));
    assert!(err(json!([])).contains("must be an object"));
    let e = err(json!({"region": "r", "wait_timeout_secs": "10"}));
    assert!(e.contains("wait_timeout_secs"), "{e}");
    let e = err(json!({"region": "r", "default_security_groups": "sg-1"}));
    assert!(e.contains("default_security_groups"), "{e}");
    let e = err(json!({"region": "r", "access_key_id": "a"}));
    assert!(e.contains("together"), "{e}");
    let e = err(json!({"region": "r", "endpoint": "http://127.0.0.1:1"}));
    assert!(e.contains("static keys"), "{e}");
    let e = err(json!({"region": "r", "poll_interval_ms": 0}));
    assert!(e.contains("poll_interval_ms"), "{e}");
}

#[test]
fn sizes_round_up_to_whole_gib() {
    assert_eq!(gib_of_mb(0), 1);
    assert_eq!(gib_of_mb(1), 1);
    assert_eq!(gib_of_mb(1024), 1);
    assert_eq!(gib_of_mb(1025), 2);
    assert_eq!(gib_of_mb(2048), 2);
    assert_eq!(gib_of_mb(10 * 1024 + 1), 11);
    assert!(gib_i32(u64::MAX, "x").is_err());
}

#[test]
fn device_names_skip_used_ones_in_either_form() {
    let none: [&str; 0] = [];
    assert_eq!(choose_device(&none).as_deref(), Some("/dev/sdf"));
    assert_eq!(
        choose_device(&["/dev/sda1", "/dev/sdb"]).as_deref(),
        Some("/dev/sdf")
    );
    assert_eq!(
        choose_device(&["/dev/sdf", "/dev/xvdg", "sdh"]).as_deref(),
        Some("/dev/sdi")
    );
    let all: Vec<String> = ('f'..='p').map(|l| format!("/dev/sd{l}")).collect();
    assert_eq!(choose_device(&all), None);
    assert!(all.iter().all(|d| is_persistent_device(d)));
    assert!(is_persistent_device("/dev/xvdf") && is_persistent_device("sdp"));
    for d in [
        "/dev/sda1",
        "/dev/sdb",
        "/dev/sde",
        "/dev/sdq",
        "/dev/sdf1",
        "/dev/nvme1n1",
    ] {
        assert!(!is_persistent_device(d), "{d}");
    }
    let mut almost = all.clone();
    almost.retain(|d| d != "/dev/sdp");
    assert_eq!(choose_device(&almost).as_deref(), Some("/dev/sdp"));
}

#[test]
fn errors_are_classified_by_code_and_status() {
    use ErrorClass::*;
    let cases = [
        (Some("InvalidInstanceID.NotFound"), Some(400), NotFound),
        (Some("InvalidVolume.NotFound"), Some(400), NotFound),
        (Some("InvalidAMIID.NotFound"), Some(400), NotFound),
        (Some("InvalidAMIID.Unavailable"), Some(400), NotFound),
        (Some("InvalidSnapshot.NotFound"), Some(400), NotFound),
        (Some("InvalidInstanceID.Malformed"), Some(400), Malformed),
        (Some("InvalidVolumeID.Malformed"), Some(400), Malformed),
        (Some("RequestLimitExceeded"), Some(503), Throttled),
        (Some("Throttling"), Some(400), Throttled),
        (None, Some(429), Throttled),
        (Some("InternalError"), Some(500), ServerError),
        (Some("Unavailable"), Some(503), ServerError),
        (None, Some(500), ServerError),
        (None, Some(502), ServerError),
        (Some("IncorrectState"), Some(400), Other),
        (Some("InvalidParameterValue"), Some(400), Other),
        (Some("UnauthorizedOperation"), Some(403), Other),
        (None, None, Other),
    ];
    for (code, status, want) in cases {
        assert_eq!(classify(code, status), want, "{code:?} {status:?}");
    }
    assert!(Throttled.is_retryable() && ServerError.is_retryable() && Network.is_retryable());
    assert!(!NotFound.is_retryable() && !Malformed.is_retryable() && !Other.is_retryable());
    assert!(NotFound.is_not_found() && Malformed.is_not_found() && !Other.is_not_found());
}

fn ec2_error(op: &str, target: Target, code: &str, status: u16) -> AwsCpiError {
    AwsCpiError::Ec2 {
        op: op.into(),
        target,
        code: code.into(),
        message: "the message".into(),
        status: Some(status),
        class: classify(Some(code), Some(status)),
    }
}

#[test]
fn errors_map_to_typed_cpi_errors() {
    let vm = VmCid::from("i-123");
    let disk = DiskCid::from("vol-123");
    let ami = StemcellCid::from("ami-123");
    let e: CpiError = ec2_error(
        "DescribeInstances i-123",
        Target::Vm(vm.clone()),
        "InvalidInstanceID.NotFound",
        400,
    )
    .into();
    assert!(
        matches!(e, CpiError::VmNotFound(ref c) if *c == vm),
        "{e:?}"
    );
    let e: CpiError = ec2_error(
        "AttachVolume",
        Target::Disk(disk.clone()),
        "InvalidVolume.NotFound",
        400,
    )
    .into();
    assert!(
        matches!(e, CpiError::DiskNotFound(ref c) if *c == disk),
        "{e:?}"
    );
    let e: CpiError = ec2_error(
        "RunInstances",
        Target::Stemcell(ami.clone()),
        "InvalidAMIID.Malformed",
        400,
    )
    .into();
    assert!(
        matches!(e, CpiError::StemcellNotFound(ref c) if *c == ami),
        "{e:?}"
    );
    // A not-found code about another kind of resource stays fatal.
    let e: CpiError = ec2_error(
        "AttachVolume vol-1 to i-1",
        Target::Disk(disk.clone()),
        "InvalidInstanceID.NotFound",
        400,
    )
    .into();
    assert!(matches!(e, CpiError::Fatal { .. }), "{e:?}");

    let e: CpiError = ec2_error(
        "DescribeVolumes vol-123",
        Target::Disk(disk.clone()),
        "RequestLimitExceeded",
        503,
    )
    .into();
    assert!(e.is_retryable(), "{e:?}");
    let e: CpiError = ec2_error("CreateVolume", Target::None, "InternalError", 500).into();
    assert!(e.is_retryable(), "{e:?}");
    let e: CpiError = AwsCpiError::Timeout {
        what: "instance i-1".into(),
        state: "pending".into(),
        secs: 600,
    }
    .into();
    assert!(e.is_retryable());
    assert_eq!(
        e.to_string(),
        "aws CPI: instance i-1 stuck in state pending after 600 s (transient, retry)"
    );

    let e: CpiError = ec2_error(
        "RunInstances (create_vm for agent a)",
        Target::Stemcell(ami),
        "InvalidParameterValue",
        400,
    )
    .into();
    assert!(!e.is_retryable());
    let text = e.to_string();
    assert!(
        text.contains("RunInstances (create_vm for agent a)")
            && text.contains("InvalidParameterValue")
            && text.contains("the message"),
        "{text}"
    );
    let e: CpiError = AwsCpiError::Conflict("x".into()).into();
    assert!(matches!(e, CpiError::Fatal { .. }));
}

#[test]
fn backoff_doubles_from_100ms_to_5s_for_8_tries() {
    let b = Backoff::default();
    let ms: Vec<u128> = b.schedule().iter().map(Duration::as_millis).collect();
    assert_eq!(ms, vec![100, 200, 400, 800, 1600, 3200, 5000]);
    assert_eq!(b.delay(0), None);
    assert_eq!(b.delay(1), Some(Duration::from_millis(100)));
    assert_eq!(b.delay(7), Some(Duration::from_secs(5)));
    assert_eq!(b.delay(8), None, "the 8th failure is the last");
    let total: Duration = b.schedule().iter().sum();
    assert!(total < Duration::from_secs(12), "{total:?}");
    let long = Backoff {
        tries: 100,
        ..Backoff::default()
    };
    assert_eq!(long.delay(64), Some(Duration::from_secs(5)), "no overflow");
}

fn settings() -> AgentSettings {
    AgentSettings {
        agent_id: "agent-1".into(),
        director_public_key: "ssh-ed25519 AAAA director".into(),
        host_private_key:
            "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n".into(),
        listen_ip: "127.88.1.10".into(),
        listen_port: bosun_cpi::AGENT_PORT,
        networks: BTreeMap::from([(
            "default".to_string(),
            NetworkSettings {
                kind: NetworkKind::Manual,
                ip: "127.88.1.10".into(),
                netmask: "255.255.255.0".into(),
                range: "127.88.1.0/24".into(),
                gateway: Some("127.88.1.1".into()),
                dns: vec![],
                default: vec!["dns".into(), "gateway".into()],
                cloud_properties: json!({"subnet": "subnet-1"}),
            },
        )]),
        disks: BTreeMap::new(),
        env: json!({"bosh": {"password": "ü"}}),
    }
}

#[test]
fn user_data_round_trips() {
    let s = settings();
    let encoded = encode_user_data(&s).unwrap();
    assert!(
        encoded
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(&b)),
        "{encoded}"
    );
    assert_eq!(decode_user_data(&encoded).unwrap(), s);
    assert_eq!(decode_user_data(&format!("{encoded}\n")).unwrap(), s);
    assert!(decode_user_data("not base64!").is_err());
    let not_settings = base64::engine::general_purpose::STANDARD.encode(b"{}");
    assert!(decode_user_data(&not_settings).is_err());
}

#[test]
fn the_default_network_provides_the_gateway() {
    let mut nets = settings().networks;
    let mut other = nets["default"].clone();
    other.default.clear();
    other.ip = "127.88.2.10".into();
    nets.insert("a-first".into(), other);
    assert_eq!(default_network(&nets).unwrap().ip, "127.88.1.10");
    for n in nets.values_mut() {
        n.default.clear();
    }
    assert_eq!(default_network(&nets).unwrap().ip, "127.88.2.10");
    assert!(default_network(&BTreeMap::new()).is_none());
}

#[tokio::test]
async fn a_light_stemcell_without_an_ami_for_the_region_is_refused() {
    let mut config = AwsCpiConfig::new("us-east-1");
    config.endpoint = Some("http://127.0.0.1:9".into());
    config.access_key_id = Some("test".into());
    config.secret_access_key = Some("test".into());
    let cpi = AwsCpi::new(config).await.unwrap();
    let spec = StemcellSpec {
        name: "bosh-aws-xen-hvm-ubuntu-jammy-go_agent".into(),
        os: "ubuntu-jammy".into(),
        version: "1.1".into(),
        image_path: None,
        cloud_properties: json!({"ami": {"eu-west-1": "ami-1"}}),
    };
    let e = bosun_cpi::Cpi::create_stemcell(&cpi, &spec)
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, CpiError::Fatal { .. }), "{e:?}");
    assert!(
        text.contains("light stemcells are supported") && text.contains("us-east-1"),
        "{text}"
    );
    let info = bosun_cpi::Cpi::info(&cpi).await.unwrap();
    assert_eq!(info.name, "aws");
    assert_eq!(info.api_version, 2);
    assert_eq!(info.stemcell_formats, vec!["aws-light"]);
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient_after_bounded_retries() {
    // Port 9 (discard) on loopback: nothing listens, the connection is refused.
    let mut config = AwsCpiConfig::new("us-east-1");
    config.endpoint = Some("http://127.0.0.1:9".into());
    config.access_key_id = Some("test".into());
    config.secret_access_key = Some("test".into());
    let cpi = AwsCpi::new(config).await.unwrap().with_backoff(Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(2),
        tries: 3,
    });
    let started = Instant::now();
    let e = bosun_cpi::Cpi::has_vm(&cpi, &VmCid::from("i-1"))
        .await
        .unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("DescribeInstances i-1"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn metadata_filters_become_one_tag_filter_per_entry() {
    assert!(tag_filters(&Metadata::new()).is_none());
    let filter = Metadata::from([
        ("director".to_string(), "d-1".to_string()),
        ("token".to_string(), "t".to_string()),
        // A wildcard for EC2: left to the exact comparison.
        ("name".to_string(), "web/*".to_string()),
    ]);
    let filters = tag_filters(&filter).unwrap();
    let pairs: Vec<(&str, Vec<&str>)> = filters
        .iter()
        .map(|f| {
            (
                f.name().unwrap(),
                f.values().iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        vec![("tag:director", vec!["d-1"]), ("tag:token", vec!["t"])]
    );
}

#[test]
fn tags_become_metadata() {
    let tags = vec![
        Tag::builder().key("director").value("d").build(),
        Tag::builder().key("empty").build(),
        Tag::builder().value("no key").build(),
    ];
    assert_eq!(
        metadata_of_tags(&tags),
        Metadata::from([
            ("director".to_string(), "d".to_string()),
            ("empty".to_string(), String::new()),
        ])
    );
}

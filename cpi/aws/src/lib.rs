//! The AWS CPI: stemcells, VMs and persistent disks on Amazon EC2 (or an
//! EC2-compatible endpoint such as `moto_server`), through `aws-sdk-ec2`.
//!
//! | CPI concept | EC2 object |
//! |---|---|
//! | stemcell | an existing AMI named by a *light* stemcell (`cloud_properties.ami.<region>`); its cid is the AMI id |
//! | VM | an instance; the agent settings travel as its user-data (base64 of their JSON) |
//! | ephemeral disk | an EBS block device mapping at `/dev/sdb`, deleted with the instance |
//! | persistent disk | an EBS volume, attached at the first free device of `/dev/sdf`..`/dev/sdp` |
//! | snapshot | an EBS snapshot |
//! | metadata | tags (plus `Name` = metadata `name` on instances) |
//!
//! Every call goes through one helper ([`AwsCpi`]'s `ec2`) that retries
//! throttling and server errors with a bounded exponential [`Backoff`] and, for
//! reads right after a create, the not-found codes (EC2 is eventually
//! consistent). Every wait polls every `poll_interval` up to `wait_timeout`
//! and fails naming the resource and the state it was stuck in.
//! `find_vms` / `find_disks` ([`AwsCpi::find_instances`] /
//! [`AwsCpi::find_volumes`]) list what carries given tags, to find orphans.
//!
//! EC2 cannot change the user-data of a running instance, so unlike the
//! local and docker CPIs, `attach_disk`/`detach_disk` do not rewrite the
//! settings' `disks` map: the user-data keeps the settings of `create_vm`.
//!
//! This crate owns nothing on disk: EC2 is its only record. It must not talk
//! to the agent (it only hands the settings over as user-data), must not call
//! the director, must not know about manifests or deployments, never
//! deregisters an AMI (light stemcells are not its own) and, with an endpoint
//! or static keys, never consults any other credential source (no
//! instance-metadata lookup).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, Filter, IamInstanceProfileSpecification, Instance,
    InstanceStateName, InstanceType, Placement, ResourceType, Tag, TagSpecification, Volume,
    VolumeAttachmentState, VolumeState, VolumeType,
};
use aws_sdk_ec2::Client;
use base64::Engine as _;
use bosun_cpi::{
    AgentSettings, CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid,
    DiskHint, Metadata, NetworkKind, NetworkSettings, SnapshotCid, StemcellCid, StemcellSpec,
    VmCid,
};
use serde_json::Value;

/// The stemcell format this CPI accepts.
pub const STEMCELL_FORMAT: &str = "aws-light";
/// Instance type when the cloud properties name none.
pub const DEFAULT_INSTANCE_TYPE: &str = "t3.micro";
/// Volume type of persistent disks when the cloud properties name none.
pub const DEFAULT_VOLUME_TYPE: &str = "gp3";
/// Device of the ephemeral disk.
pub const EPHEMERAL_DEVICE: &str = "/dev/sdb";
/// Default `wait_timeout`.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default `poll_interval`.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Configuration of the AWS CPI.
#[derive(Clone, Debug, PartialEq)]
pub struct AwsCpiConfig {
    pub region: String,
    /// EC2-compatible endpoint (the emulator in tests); None = AWS.
    pub endpoint: Option<String>,
    /// Static keys; when both are given (and always when an endpoint is), no
    /// other credential source is consulted (no instance-metadata lookup).
    /// Otherwise the standard chain (env, profile).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub default_key_name: Option<String>,
    pub default_security_groups: Vec<String>,
    /// How long a wait (instance running, volume available, ...) may take.
    pub wait_timeout: Duration,
    /// How often a wait polls.
    pub poll_interval: Duration,
}

impl AwsCpiConfig {
    /// A configuration for `region` with every other setting at its default.
    pub fn new(region: impl Into<String>) -> AwsCpiConfig {
        AwsCpiConfig {
            region: region.into(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            default_key_name: None,
            default_security_groups: Vec::new(),
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// From a cloud-config `cpis[].properties` object: region (required),
    /// endpoint, access_key_id, secret_access_key, default_key_name,
    /// default_security_groups, wait_timeout_secs, poll_interval_ms.
    /// Unknown keys are an error naming the key.
    pub fn from_properties(p: &Value) -> Result<AwsCpiConfig> {
        let obj = p
            .as_object()
            .ok_or_else(|| AwsCpiError::Config(format!("properties must be an object, got {p}")))?;
        let mut config = AwsCpiConfig::new("");
        let mut region = None;
        for (key, value) in obj {
            let string = || -> Result<String> {
                value.as_str().map(str::to_string).ok_or_else(|| {
                    AwsCpiError::Config(format!("{key} must be a string, got {value}"))
                })
            };
            let number = || -> Result<u64> {
                value.as_u64().ok_or_else(|| {
                    AwsCpiError::Config(format!(
                        "{key} must be a non-negative integer, got {value}"
                    ))
                })
            };
            match key.as_str() {
                "region" => region = Some(string()?),
                "endpoint" => config.endpoint = Some(string()?),
                "access_key_id" => config.access_key_id = Some(string()?),
                "secret_access_key" => config.secret_access_key = Some(string()?),
                "default_key_name" => config.default_key_name = Some(string()?),
                "default_security_groups" => {
                    config.default_security_groups = string_list(value).ok_or_else(|| {
                        AwsCpiError::Config(format!("{key} must be a list of strings, got {value}"))
                    })?
                }
                "wait_timeout_secs" => config.wait_timeout = Duration::from_secs(number()?),
                "poll_interval_ms" => config.poll_interval = Duration::from_millis(number()?),
                other => {
                    return Err(AwsCpiError::Config(format!(
                        "unknown property {other:?} (known: region, endpoint, access_key_id, \
                         secret_access_key, default_key_name, default_security_groups, \
                         wait_timeout_secs, poll_interval_ms)"
                    )))
                }
            }
        }
        config.region = region
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| AwsCpiError::Config("region is required".into()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.region.trim().is_empty() {
            return Err(AwsCpiError::Config("region is required".into()));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(AwsCpiError::Config(
                "access_key_id and secret_access_key must be given together".into(),
            ));
        }
        if self.endpoint.is_some() && self.access_key_id.is_none() {
            return Err(AwsCpiError::Config(
                "an endpoint needs static keys (access_key_id and secret_access_key): \
                 no other credential source is consulted"
                    .into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(AwsCpiError::Config("poll_interval_ms must be > 0".into()));
        }
        Ok(())
    }
}

fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// Which CPI object an EC2 call was about, so that a not-found code becomes
/// the right typed not-found error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    None,
    Vm(VmCid),
    Disk(DiskCid),
    Stemcell(StemcellCid),
    Snapshot(SnapshotCid),
}

/// What kind of failure an EC2 error is, which decides retries and the
/// [`CpiError`] it becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// `*.NotFound`: absent (or not yet visible right after a create).
    NotFound,
    /// `*.Malformed`: an id that cannot exist; never retried.
    Malformed,
    /// `RequestLimitExceeded` and other throttling.
    Throttled,
    /// HTTP 5xx, `InternalError`, `Unavailable`...
    ServerError,
    /// No answer: connection failure or timeout.
    Network,
    /// Anything else (a refused request): fatal.
    Other,
}

impl ErrorClass {
    /// Whether the same request may succeed when sent again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Throttled | ErrorClass::ServerError | ErrorClass::Network
        )
    }

    /// Whether the resource the request named does not exist.
    pub fn is_not_found(self) -> bool {
        matches!(self, ErrorClass::NotFound | ErrorClass::Malformed)
    }
}

const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "EC2ThrottledException",
];

const SERVER_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Classifies an EC2 error by its code and HTTP status.
pub fn classify(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    if let Some(code) = code {
        if code.ends_with(".NotFound")
            || code.ends_with(".Unavailable") && code.starts_with("InvalidAMIID")
        {
            return ErrorClass::NotFound;
        }
        if code.ends_with(".Malformed") || code == "InvalidVolumeID.Malformed" {
            return ErrorClass::Malformed;
        }
        if THROTTLING_CODES.contains(&code) {
            return ErrorClass::Throttled;
        }
        if SERVER_CODES.contains(&code) {
            return ErrorClass::ServerError;
        }
    }
    match status {
        Some(429) => ErrorClass::Throttled,
        Some(s) if s >= 500 => ErrorClass::ServerError,
        _ => ErrorClass::Other,
    }
}

/// Which kind of resource a not-found code is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Instance,
    Volume,
    Image,
    Snapshot,
}

fn resource_of_code(code: &str) -> Option<Resource> {
    if code.starts_with("InvalidInstanceID") {
        Some(Resource::Instance)
    } else if code.starts_with("InvalidVolume") {
        Some(Resource::Volume)
    } else if code.starts_with("InvalidAMIID") {
        Some(Resource::Image)
    } else if code.starts_with("InvalidSnapshot") {
        Some(Resource::Snapshot)
    } else {
        None
    }
}

/// Bounded exponential backoff: `first`, doubling up to `max`, for at most `tries` tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub tries: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            tries: 8,
        }
    }
}

impl Backoff {
    /// The pause after `tries_done` failed tries (1-based), or None when no try is left.
    pub fn delay(&self, tries_done: u32) -> Option<Duration> {
        if tries_done == 0 || tries_done >= self.tries {
            return None;
        }
        let factor = 1u32.checked_shl(tries_done - 1).unwrap_or(u32::MAX);
        Some(self.first.saturating_mul(factor).min(self.max))
    }

    /// Every pause, in order.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..self.tries).filter_map(|n| self.delay(n)).collect()
    }
}

/// Which errors the call helper retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Retry {
    /// Throttling, server errors, no answer.
    Transient,
    /// Those and the not-found codes: a read right after a create.
    AfterCreate,
}

/// Everything that can go wrong in the AWS CPI.
#[derive(Debug, thiserror::Error)]
pub enum AwsCpiError {
    #[error("aws CPI: invalid configuration: {0}")]
    Config(String),
    #[error("aws CPI: {op}: {code}: {message}")]
    Ec2 {
        /// The operation and the resource, e.g. `DescribeVolumes vol-1234`.
        op: String,
        target: Target,
        /// The EC2 error code (`(no code)` when there was no answer).
        code: String,
        message: String,
        status: Option<u16>,
        class: ErrorClass,
    },
    #[error("VM {0} not found")]
    VmNotFound(VmCid),
    #[error("disk {0} not found")]
    DiskNotFound(DiskCid),
    #[error("stemcell {0} not found")]
    StemcellNotFound(StemcellCid),
    #[error("aws CPI: {what} stuck in state {state} after {secs} s")]
    Timeout {
        what: String,
        state: String,
        secs: u64,
    },
    #[error("aws CPI: {0}")]
    Invalid(String),
    #[error("aws CPI: {0}")]
    Conflict(String),
    #[error("aws CPI: {what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl AwsCpiError {
    /// Whether this is an EC2 answer saying the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        match self {
            AwsCpiError::Ec2 { class, .. } => class.is_not_found(),
            AwsCpiError::VmNotFound(_)
            | AwsCpiError::DiskNotFound(_)
            | AwsCpiError::StemcellNotFound(_) => true,
            _ => false,
        }
    }

    /// The EC2 error code, if this is an EC2 error.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsCpiError::Ec2 { code, .. } => Some(code),
            _ => None,
        }
    }
}

impl From<AwsCpiError> for CpiError {
    fn from(e: AwsCpiError) -> Self {
        match e {
            AwsCpiError::VmNotFound(cid) => CpiError::VmNotFound(cid),
            AwsCpiError::DiskNotFound(cid) => CpiError::DiskNotFound(cid),
            AwsCpiError::StemcellNotFound(cid) => CpiError::StemcellNotFound(cid),
            AwsCpiError::Ec2 {
                ref target,
                ref code,
                class,
                ..
            } => {
                if class.is_not_found() {
                    match (resource_of_code(code), target) {
                        (Some(Resource::Instance), Target::Vm(cid)) => {
                            return CpiError::VmNotFound(cid.clone())
                        }
                        (Some(Resource::Volume), Target::Disk(cid)) => {
                            return CpiError::DiskNotFound(cid.clone())
                        }
                        (Some(Resource::Image), Target::Stemcell(cid)) => {
                            return CpiError::StemcellNotFound(cid.clone())
                        }
                        _ => {}
                    }
                }
                if class.is_retryable() {
                    CpiError::Transient {
                        message: e.to_string(),
                        retry_after: Some(Duration::from_secs(5)),
                    }
                } else {
                    CpiError::fatal(e.to_string())
                }
            }
            AwsCpiError::Timeout { .. } => CpiError::Transient {
                message: e.to_string(),
                retry_after: None,
            },
            other => CpiError::fatal(other.to_string()),
        }
    }
}

type Result<T, E = AwsCpiError> = std::result::Result<T, E>;

/// An SDK error reduced to what the CPI decides on.
#[derive(Debug)]
struct Failure {
    code: Option<String>,
    message: String,
    status: Option<u16>,
    class: ErrorClass,
}

impl Failure {
    fn from_sdk<E, R>(e: &SdkError<E, R>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let status = e.raw_response().and_then(HasStatus::status_code);
        match e {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Failure {
                code: None,
                message: DisplayErrorContext(e).to_string(),
                status,
                class: ErrorClass::Network,
            },
            _ => {
                let code = e.code().map(str::to_string);
                let message = e
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| DisplayErrorContext(e).to_string());
                let class = classify(code.as_deref(), status);
                Failure {
                    code,
                    message,
                    status,
                    class,
                }
            }
        }
    }

    fn into_error(self, op: String, target: Target) -> AwsCpiError {
        AwsCpiError::Ec2 {
            op,
            target,
            code: self.code.unwrap_or_else(|| match self.status {
                Some(s) => format!("HTTP {s}"),
                None => "(no answer)".into(),
            }),
            message: self.message,
            status: self.status,
            class: self.class,
        }
    }
}

/// The HTTP status of a raw response.
trait HasStatus {
    fn status_code(&self) -> Option<u16>;
}

impl HasStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

/// ceil(size_mb / 1024) GiB, at least 1 (EBS sizes are whole GiB).
pub fn gib_of_mb(size_mb: u64) -> u64 {
    size_mb.div_ceil(1024).max(1)
}

fn gib_i32(size_mb: u64, what: &str) -> Result<i32> {
    i32::try_from(gib_of_mb(size_mb))
        .map_err(|_| AwsCpiError::Invalid(format!("{what}: size {size_mb} MB is too large")))
}

/// `/dev/sdX` for a device name in either the `sdX` or the `xvdX` form.
fn normalize_device(name: &str) -> String {
    let base = name.strip_prefix("/dev/").unwrap_or(name);
    let base = base
        .strip_prefix("xvd")
        .map(|rest| format!("sd{rest}"))
        .unwrap_or_else(|| base.to_string());
    format!("/dev/{base}")
}

/// Whether a device name is one `attach_disk` hands out (`/dev/sdf`..`/dev/sdp`, or `xvd`).
pub fn is_persistent_device(name: &str) -> bool {
    let d = normalize_device(name);
    d.strip_prefix("/dev/sd")
        .and_then(|rest| {
            let mut chars = rest.chars();
            let letter = chars.next()?;
            chars.next().is_none().then_some(letter)
        })
        .is_some_and(|l| ('f'..='p').contains(&l))
}

/// The first device name of `/dev/sdf`..`/dev/sdp` that no name in `used`
/// takes (`/dev/xvdg` takes `/dev/sdg`), or None when all are taken.
pub fn choose_device<S: AsRef<str>>(used: &[S]) -> Option<String> {
    let used: BTreeSet<String> = used.iter().map(|u| normalize_device(u.as_ref())).collect();
    ('f'..='p')
        .map(|l| format!("/dev/sd{l}"))
        .find(|d| !used.contains(d))
}

/// The user-data of a VM: base64 of the JSON of its agent settings.
pub fn encode_user_data(settings: &AgentSettings) -> Result<String> {
    let json = serde_json::to_vec(settings).map_err(|source| AwsCpiError::Json {
        what: format!("encoding the settings of agent {}", settings.agent_id),
        source,
    })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(json))
}

/// The agent settings in a VM's user-data (the inverse of [`encode_user_data`]).
pub fn decode_user_data(user_data: &str) -> Result<AgentSettings> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(user_data.trim())
        .map_err(|e| AwsCpiError::Invalid(format!("user-data is not base64: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|source| AwsCpiError::Json {
        what: "decoding user-data as agent settings".into(),
        source,
    })
}

fn tags_of(metadata: &Metadata) -> Vec<Tag> {
    metadata
        .iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// A resource's tags as metadata (a tag without a key is skipped, one
/// without a value is empty).
pub fn metadata_of_tags(tags: &[Tag]) -> Metadata {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

/// The EC2 filters of a metadata filter: `tag:<key>` = value, one per entry;
/// `None` when there is none. EC2 reads `*`, `?` and `\` in filter values as
/// wildcards and escapes, so entries with those are left to the exact
/// comparison every caller makes on the tags it gets back.
pub fn tag_filters(filter: &Metadata) -> Option<Vec<Filter>> {
    let filters: Vec<Filter> = filter
        .iter()
        .filter(|(_, v)| !v.contains(['*', '?', '\\']))
        .map(|(k, v)| Filter::builder().name(format!("tag:{k}")).values(v).build())
        .collect();
    (!filters.is_empty()).then_some(filters)
}

fn tag_spec(kind: ResourceType, tags: Vec<Tag>) -> TagSpecification {
    TagSpecification::builder()
        .resource_type(kind)
        .set_tags(Some(tags))
        .build()
}

/// A string cloud property; absent or null is None, another type an error.
fn str_prop(cp: &Value, key: &str, what: &str) -> Result<Option<String>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(AwsCpiError::Invalid(format!(
            "{what}: cloud property {key} must be a string, got {other}"
        ))),
    }
}

fn u64_prop(cp: &Value, key: &str, what: &str) -> Result<Option<u64>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: cloud property {key} must be a non-negative integer, got {v}"
            ))
        }),
    }
}

fn bool_prop(cp: &Value, key: &str, what: &str) -> Result<Option<bool>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: cloud property {key} must be a boolean, got {v}"
            ))
        }),
    }
}

fn i32_of(n: u64, key: &str, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| AwsCpiError::Invalid(format!("{what}: {key} {n} is too large")))
}

/// The network that places the VM: the one providing the gateway, else the first.
fn default_network(networks: &BTreeMap<String, NetworkSettings>) -> Option<&NetworkSettings> {
    networks
        .values()
        .find(|n| n.default.iter().any(|d| d == "gateway"))
        .or_else(|| networks.values().next())
}

/// The name of an instance's state (`pending`, `running`, ...).
fn instance_state(i: &Instance) -> String {
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn is_gone(i: &Instance) -> bool {
    matches!(
        i.state().and_then(|s| s.name()),
        Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
    )
}

fn volume_state(v: &Volume) -> String {
    v.state()
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// The instance a volume is attached (or attaching) to, if any.
fn attached_to(v: &Volume) -> Option<&str> {
    v.attachments()
        .iter()
        .filter(|a| {
            !matches!(
                a.state(),
                Some(VolumeAttachmentState::Detached | VolumeAttachmentState::Detaching)
            )
        })
        .find_map(|a| a.instance_id())
}

/// The result of one poll of a wait.
enum Polled<T> {
    Done(T),
    /// Not there yet; the state it is in.
    Pending(String),
}

/// The AWS CPI. See the crate documentation.
pub struct AwsCpi {
    client: Client,
    config: AwsCpiConfig,
    backoff: Backoff,
}

impl AwsCpi {
    pub async fn new(config: AwsCpiConfig) -> Result<AwsCpi> {
        config.validate()?;
        let mut builder = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            // The CPI retries itself (see `ec2`): one attempt per SDK call.
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            );
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(id), Some(secret)) => {
                builder = builder.credentials_provider(Credentials::new(
                    id.clone(),
                    secret.clone(),
                    None,
                    None,
                    "bosun-aws-cpi-static",
                ));
            }
            _ => {
                let chain = CredentialsProviderChain::first_try(
                    "Environment",
                    EnvironmentVariableCredentialsProvider::new(),
                )
                .or_else("Profile", ProfileFileCredentialsProvider::builder().build());
                builder = builder.credentials_provider(chain);
            }
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        Ok(AwsCpi {
            client: Client::from_conf(builder.build()),
            config,
            backoff: Backoff::default(),
        })
    }

    /// Replaces the retry schedule of every EC2 call (default: [`Backoff::default`]).
    pub fn with_backoff(mut self, backoff: Backoff) -> AwsCpi {
        self.backoff = backoff;
        self
    }

    /// The configuration it was made with.
    pub fn config(&self) -> &AwsCpiConfig {
        &self.config
    }

    /// The EC2 client (for tests and tools).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs one EC2 request, retrying what `retry` allows with the backoff.
    async fn ec2<T, E, R, F, Fut>(
        &self,
        op: impl Into<String>,
        target: Target,
        retry: Retry,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let op = op.into();
        let mut tries = 0;
        loop {
            tries += 1;
            let failure = match send().await {
                Ok(v) => return Ok(v),
                Err(e) => Failure::from_sdk(&e),
            };
            let retryable = failure.class.is_retryable()
                || (retry == Retry::AfterCreate && failure.class == ErrorClass::NotFound);
            match self.backoff.delay(tries).filter(|_| retryable) {
                Some(pause) => {
                    tracing::debug!(
                        op = %op,
                        code = ?failure.code,
                        try_ = tries,
                        ?pause,
                        "EC2 request failed, retrying"
                    );
                    tokio::time::sleep(pause).await;
                }
                None => return Err(failure.into_error(op, target)),
            }
        }
    }

    /// Polls until `poll` is done or `wait_timeout` passes.
    async fn wait<T, F, Fut>(&self, what: &str, mut poll: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Polled<T>>>,
    {
        let started = Instant::now();
        loop {
            let state = match poll().await? {
                Polled::Done(v) => return Ok(v),
                Polled::Pending(state) => state,
            };
            if started.elapsed() >= self.config.wait_timeout {
                return Err(AwsCpiError::Timeout {
                    what: what.to_string(),
                    state,
                    secs: self.config.wait_timeout.as_secs(),
                });
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }

    async fn describe_instance(&self, vm: &VmCid, retry: Retry) -> Result<Option<Instance>> {
        let r = self
            .ec2(
                format!("DescribeInstances {vm}"),
                Target::Vm(vm.clone()),
                retry,
                || self.client.describe_instances().instance_ids(&vm.0).send(),
            )
            .await;
        match r {
            Ok(out) => Ok(out
                .reservations()
                .iter()
                .flat_map(|r| r.instances())
                .find(|i| i.instance_id() == Some(vm.0.as_str()))
                .cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The instance, unless it is unknown or terminated/shutting down.
    async fn live_instance(&self, vm: &VmCid) -> Result<Instance> {
        self.describe_instance(vm, Retry::Transient)
            .await?
            .filter(|i| !is_gone(i))
            .ok_or_else(|| AwsCpiError::VmNotFound(vm.clone()))
    }

    async fn describe_volume(&self, disk: &DiskCid, retry: Retry) -> Result<Option<Volume>> {
        let r = self
            .ec2(
                format!("DescribeVolumes {disk}"),
                Target::Disk(disk.clone()),
                retry,
                || self.client.describe_volumes().volume_ids(&disk.0).send(),
            )
            .await;
        match r {
            Ok(out) => Ok(out
                .volumes()
                .iter()
                .find(|v| v.volume_id() == Some(disk.0.as_str()))
                .filter(|v| !matches!(v.state(), Some(VolumeState::Deleted)))
                .cloned()),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn volume(&self, disk: &DiskCid) -> Result<Volume> {
        self.describe_volume(disk, Retry::Transient)
            .await?
            .ok_or_else(|| AwsCpiError::DiskNotFound(disk.clone()))
    }

    /// Waits until the instance is in `want`; unknown counts as `missing_ok`
    /// (done) or as not yet visible.
    async fn wait_instance(
        &self,
        vm: &VmCid,
        want: InstanceStateName,
        missing_is_done: bool,
    ) -> Result<()> {
        let what = format!("instance {vm}");
        let want = &want;
        self.wait(&what, || async move {
            let retry = if missing_is_done {
                Retry::Transient
            } else {
                Retry::AfterCreate
            };
            Ok(match self.describe_instance(vm, retry).await? {
                None if missing_is_done => Polled::Done(()),
                None => Polled::Pending("not-yet-visible".into()),
                Some(i) if i.state().and_then(|s| s.name()) == Some(want) => Polled::Done(()),
                Some(i) => {
                    let state = instance_state(&i);
                    if *want == InstanceStateName::Running && is_gone(&i) {
                        let reason = i
                            .state_reason()
                            .and_then(|r| r.message())
                            .unwrap_or("no reason given");
                        return Err(AwsCpiError::Conflict(format!(
                            "instance {vm} went to state {state} while starting: {reason}"
                        )));
                    }
                    Polled::Pending(state)
                }
            })
        })
        .await
    }

    /// Waits until `done` holds for the volume (unknown = not yet visible,
    /// or done when `missing_is_done`).
    async fn wait_volume(
        &self,
        disk: &DiskCid,
        want: &str,
        missing_is_done: bool,
        done: impl Fn(&Volume) -> bool,
    ) -> Result<Volume> {
        let what = format!("volume {disk} (waiting for {want})");
        let done = &done;
        let retry = if missing_is_done {
            Retry::Transient
        } else {
            Retry::AfterCreate
        };
        self.wait(&what, || async move {
            Ok(match self.describe_volume(disk, retry).await? {
                None if missing_is_done => Polled::Done(Volume::builder().build()),
                None => Polled::Pending("not-yet-visible".into()),
                Some(v) if done(&v) => Polled::Done(v),
                Some(v) => Polled::Pending(volume_state(&v)),
            })
        })
        .await
    }

    /// Non-terminated instances and volumes (not deleted) carrying tag
    /// `key=value` (e.g. director=<id>): for tests that prove nothing leaked.
    /// Returns (instance ids, volume ids), each sorted. See
    /// [`AwsCpi::find_instances`] and [`AwsCpi::find_volumes`].
    pub async fn find_tagged(&self, key: &str, value: &str) -> Result<(Vec<String>, Vec<String>)> {
        let filter = Metadata::from([(key.to_string(), value.to_string())]);
        let instances = self.find_instances(&filter).await?;
        let volumes = self.find_volumes(&filter).await?;
        Ok((
            instances.into_iter().map(|(vm, _)| vm.0).collect(),
            volumes.into_iter().map(|(disk, _)| disk.0).collect(),
        ))
    }

    /// Instances (neither terminated nor shutting down) whose tags contain
    /// every entry of `filter`, with their tags, sorted by id: one
    /// DescribeInstances `tag:<key>` filter per entry, every page.
    pub async fn find_instances(&self, filter: &Metadata) -> Result<Vec<(VmCid, Metadata)>> {
        let op = format!(
            "listing VMs tagged {}: DescribeInstances",
            bosun_cpi::describe_filter(filter)
        );
        let filters = tag_filters(filter);
        let mut found = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .ec2(&op, Target::None, Retry::Transient, || {
                    self.client
                        .describe_instances()
                        .set_filters(filters.clone())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let metadata = metadata_of_tags(instance.tags());
                if !is_gone(instance) && bosun_cpi::metadata_matches(&metadata, filter) {
                    found.insert(VmCid(id.to_string()), metadata);
                }
            }
            token = out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Volumes (neither deleting nor deleted) whose tags contain every entry
    /// of `filter`, with their tags, sorted by id: one DescribeVolumes
    /// `tag:<key>` filter per entry, every page.
    pub async fn find_volumes(&self, filter: &Metadata) -> Result<Vec<(DiskCid, Metadata)>> {
        let op = format!(
            "listing disks tagged {}: DescribeVolumes",
            bosun_cpi::describe_filter(filter)
        );
        let filters = tag_filters(filter);
        let mut found = BTreeMap::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .ec2(&op, Target::None, Retry::Transient, || {
                    self.client
                        .describe_volumes()
                        .set_filters(filters.clone())
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            for volume in out.volumes() {
                let Some(id) = volume.volume_id() else {
                    continue;
                };
                let gone = matches!(
                    volume.state(),
                    Some(VolumeState::Deleting | VolumeState::Deleted)
                );
                let metadata = metadata_of_tags(volume.tags());
                if !gone && bosun_cpi::metadata_matches(&metadata, filter) {
                    found.insert(DiskCid(id.to_string()), metadata);
                }
            }
            token = out
                .next_token()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(found.into_iter().collect())
    }

    async fn create_tags(
        &self,
        what: String,
        target: Target,
        id: &str,
        metadata: &Metadata,
    ) -> Result<()> {
        if metadata.is_empty() {
            return Ok(());
        }
        let tags = tags_of(metadata);
        self.ec2(what, target, Retry::AfterCreate, || {
            self.client
                .create_tags()
                .resources(id)
                .set_tags(Some(tags.clone()))
                .send()
        })
        .await?;
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Stemcells

    async fn do_create_stemcell(&self, spec: &StemcellSpec) -> Result<StemcellCid> {
        let region = &self.config.region;
        let ami = spec
            .cloud_properties
            .get("ami")
            .and_then(|a| a.get(region))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                AwsCpiError::Invalid(format!(
                    "create_stemcell {}/{}: its cloud_properties name no AMI for region {region} \
                     (ami.{region}): only light stemcells are supported, uploading a full \
                     image is not (yet)",
                    spec.name, spec.version
                ))
            })?;
        let cid = StemcellCid(ami.to_string());
        let out = self
            .ec2(
                format!(
                    "DescribeImages {ami} (stemcell {}/{})",
                    spec.name, spec.version
                ),
                Target::Stemcell(cid.clone()),
                Retry::Transient,
                || self.client.describe_images().image_ids(ami).send(),
            )
            .await?;
        let found = out.images().iter().any(|i| i.image_id() == Some(ami));
        if !found {
            return Err(AwsCpiError::StemcellNotFound(cid));
        }
        tracing::info!(ami, stemcell = %spec.name, version = %spec.version, "light stemcell registered");
        Ok(cid)
    }

    // -----------------------------------------------------------------------
    // VMs

    async fn do_create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
        let what = format!("create_vm for agent {}", req.agent_id);
        let cp = &req.cloud_properties;
        let instance_type =
            str_prop(cp, "instance_type", &what)?.unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.into());
        let mut run = self
            .client
            .run_instances()
            .image_id(&req.stemcell.0)
            .min_count(1)
            .max_count(1)
            .instance_type(InstanceType::from(instance_type.as_str()))
            .user_data(encode_user_data(&req.settings)?);
        if let Some(az) = str_prop(cp, "availability_zone", &what)? {
            run = run.placement(Placement::builder().availability_zone(az).build());
        }
        if let Some(key) = str_prop(cp, "key_name", &what)?.or(self.config.default_key_name.clone())
        {
            run = run.key_name(key);
        }
        let groups = match cp.get("security_groups") {
            None | Some(Value::Null) => self.config.default_security_groups.clone(),
            Some(v) => string_list(v).ok_or_else(|| {
                AwsCpiError::Invalid(format!(
                    "{what}: cloud property security_groups must be a list of strings, got {v}"
                ))
            })?,
        };
        for g in groups {
            run = if g.starts_with("sg-") {
                run.security_group_ids(g)
            } else {
                run.security_groups(g)
            };
        }
        if let Some(profile) = str_prop(cp, "iam_instance_profile", &what)? {
            run = run.iam_instance_profile(
                IamInstanceProfileSpecification::builder()
                    .name(profile)
                    .build(),
            );
        }
        if let Some(eph) = cp.get("ephemeral_disk").filter(|v| !v.is_null()) {
            let size = u64_prop(eph, "size", &what)?.ok_or_else(|| {
                AwsCpiError::Invalid(format!("{what}: ephemeral_disk needs a size (MB)"))
            })?;
            let mut ebs = EbsBlockDevice::builder()
                .volume_size(gib_i32(size, &what)?)
                .delete_on_termination(true);
            if let Some(t) = str_prop(eph, "type", &what)? {
                ebs = ebs.volume_type(VolumeType::from(t.as_str()));
            }
            run = run.block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name(EPHEMERAL_DEVICE)
                    .ebs(ebs.build())
                    .build(),
            );
        }
        if let Some(net) = default_network(&req.networks) {
            let subnet = match str_prop(&net.cloud_properties, "subnet", &what)? {
                Some(s) => Some(s),
                None => str_prop(&net.cloud_properties, "subnet_id", &what)?,
            };
            if let Some(subnet) = subnet {
                run = run.subnet_id(subnet);
            }
            if net.kind == NetworkKind::Manual && !net.ip.is_empty() {
                run = run.private_ip_address(&net.ip);
            }
        }
        let mut tags: Metadata = Metadata::new();
        if let Some(extra) = cp.get("tags").filter(|v| !v.is_null()) {
            let map = extra.as_object().ok_or_else(|| {
                AwsCpiError::Invalid(format!(
                    "{what}: cloud property tags must be a map, got {extra}"
                ))
            })?;
            for (k, v) in map {
                let v = match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                tags.insert(k.clone(), v);
            }
        }
        tags.extend(req.metadata.clone());
        if let Some(name) = req.metadata.get("name") {
            tags.insert("Name".into(), name.clone());
        }
        if !tags.is_empty() {
            run = run.tag_specifications(tag_spec(ResourceType::Instance, tags_of(&tags)));
        }

        let out = self
            .ec2(
                format!("RunInstances ({what}, image {})", req.stemcell),
                Target::Stemcell(req.stemcell.clone()),
                Retry::Transient,
                || run.clone().send(),
            )
            .await?;
        let id = out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .ok_or_else(|| {
                AwsCpiError::Invalid(format!("RunInstances ({what}) returned no instance"))
            })?;
        let vm = VmCid(id.to_string());
        tracing::info!(vm = %vm, agent = %req.agent_id, "instance launched, waiting for running");
        if let Err(e) = self
            .wait_instance(&vm, InstanceStateName::Running, false)
            .await
        {
            // Do not leak a VM the caller never learns about.
            if let Err(te) = self.terminate(&vm).await {
                tracing::warn!(vm = %vm, error = %te, "terminating the failed instance");
            }
            return Err(e);
        }
        Ok(vm)
    }

    async fn terminate(&self, vm: &VmCid) -> Result<()> {
        let r = self
            .ec2(
                format!("TerminateInstances {vm}"),
                Target::Vm(vm.clone()),
                Retry::Transient,
                || self.client.terminate_instances().instance_ids(&vm.0).send(),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn do_delete_vm(&self, vm: &VmCid) -> Result<()> {
        match self.describe_instance(vm, Retry::Transient).await? {
            None => return Ok(()),
            Some(i) if i.state().and_then(|s| s.name()) == Some(&InstanceStateName::Terminated) => {
                return Ok(())
            }
            Some(_) => {}
        }
        self.terminate(vm).await?;
        self.wait_instance(vm, InstanceStateName::Terminated, true)
            .await?;
        tracing::info!(vm = %vm, "instance terminated");
        Ok(())
    }

    async fn do_reboot_vm(&self, vm: &VmCid) -> Result<()> {
        self.live_instance(vm).await?;
        self.ec2(
            format!("RebootInstances {vm}"),
            Target::Vm(vm.clone()),
            Retry::Transient,
            || self.client.reboot_instances().instance_ids(&vm.0).send(),
        )
        .await?;
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Disks

    async fn disk_availability_zone(&self, req: &CreateDiskRequest, what: &str) -> Result<String> {
        if let Some(vm) = &req.vm_locality {
            let i = self.live_instance(vm).await?;
            return i
                .placement()
                .and_then(|p| p.availability_zone())
                .map(str::to_string)
                .ok_or_else(|| {
                    AwsCpiError::Invalid(format!(
                        "{what}: instance {vm} reports no availability zone"
                    ))
                });
        }
        if let Some(az) = str_prop(&req.cloud_properties, "availability_zone", what)? {
            return Ok(az);
        }
        // As BOSH's AWS CPI does without a VM: a zone of the region.
        let out = self
            .ec2(
                format!("DescribeAvailabilityZones ({what})"),
                Target::None,
                Retry::Transient,
                || self.client.describe_availability_zones().send(),
            )
            .await?;
        let mut zones: Vec<&str> = out
            .availability_zones()
            .iter()
            .filter(|z| z.state().map(|s| s.as_str()) != Some("unavailable"))
            .filter_map(|z| z.zone_name())
            .collect();
        zones.sort_unstable();
        zones.first().map(|z| z.to_string()).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: no vm_locality, no availability_zone cloud property, and region {} \
                 lists no availability zone",
                self.config.region
            ))
        })
    }

    async fn do_create_disk(&self, req: &CreateDiskRequest) -> Result<DiskCid> {
        let what = format!("create_disk of {} MB", req.size_mb);
        let cp = &req.cloud_properties;
        let az = self.disk_availability_zone(req, &what).await?;
        let volume_type =
            str_prop(cp, "type", &what)?.unwrap_or_else(|| DEFAULT_VOLUME_TYPE.into());
        let mut create = self
            .client
            .create_volume()
            .availability_zone(&az)
            .size(gib_i32(req.size_mb, &what)?)
            .volume_type(VolumeType::from(volume_type.as_str()));
        if let Some(iops) = u64_prop(cp, "iops", &what)? {
            create = create.iops(i32_of(iops, "iops", &what)?);
        }
        if let Some(enc) = bool_prop(cp, "encrypted", &what)? {
            create = create.encrypted(enc);
        }
        if let Some(kms) = str_prop(cp, "kms_key_arn", &what)? {
            create = create.kms_key_id(kms);
        }
        if !req.metadata.is_empty() {
            create =
                create.tag_specifications(tag_spec(ResourceType::Volume, tags_of(&req.metadata)));
        }
        let out = self
            .ec2(
                format!("CreateVolume ({what} in {az})"),
                Target::None,
                Retry::Transient,
                || create.clone().send(),
            )
            .await?;
        let id = out.volume_id().ok_or_else(|| {
            AwsCpiError::Invalid(format!("CreateVolume ({what}) returned no volume id"))
        })?;
        let disk = DiskCid(id.to_string());
        let waited = self
            .wait_volume(&disk, "available", false, |v| {
                v.state() == Some(&VolumeState::Available)
            })
            .await;
        if let Err(e) = waited {
            let _ = self
                .ec2(
                    format!("DeleteVolume {disk}"),
                    Target::Disk(disk.clone()),
                    Retry::Transient,
                    || self.client.delete_volume().volume_id(&disk.0).send(),
                )
                .await;
            return Err(e);
        }
        tracing::info!(disk = %disk, az, "volume created");
        Ok(disk)
    }

    async fn do_delete_disk(&self, disk: &DiskCid) -> Result<()> {
        let Some(v) = self.describe_volume(disk, Retry::Transient).await? else {
            return Ok(());
        };
        if matches!(v.state(), Some(VolumeState::Deleting)) {
            return Ok(());
        }
        if let Some(vm) = attached_to(&v) {
            return Err(AwsCpiError::Conflict(format!(
                "delete_disk {disk}: it is attached to VM {vm}; detach it first"
            )));
        }
        let r = self
            .ec2(
                format!("DeleteVolume {disk}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || self.client.delete_volume().volume_id(&disk.0).send(),
            )
            .await;
        match r {
            Ok(_) => {
                tracing::info!(disk = %disk, "volume deleted");
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Device names taken on an instance: its block device mappings and the
    /// volumes attached to it.
    async fn used_devices(&self, vm: &VmCid, instance: &Instance) -> Result<Vec<String>> {
        let mut used: Vec<String> = instance
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.device_name().map(str::to_string))
            .collect();
        used.extend(instance.root_device_name().map(str::to_string));
        for v in self.attached_volumes(vm).await? {
            used.extend(
                v.attachments()
                    .iter()
                    .filter(|a| a.instance_id() == Some(vm.0.as_str()))
                    .filter_map(|a| a.device().map(str::to_string)),
            );
        }
        Ok(used)
    }

    async fn attached_volumes(&self, vm: &VmCid) -> Result<Vec<Volume>> {
        let out = self
            .ec2(
                format!("DescribeVolumes attached to {vm}"),
                Target::Vm(vm.clone()),
                Retry::Transient,
                || {
                    self.client
                        .describe_volumes()
                        .filters(
                            Filter::builder()
                                .name("attachment.instance-id")
                                .values(&vm.0)
                                .build(),
                        )
                        .send()
                },
            )
            .await?;
        Ok(out
            .volumes()
            .iter()
            .filter(|v| attached_to(v) == Some(vm.0.as_str()))
            .cloned()
            .collect())
    }

    fn is_attached_to(v: &Volume, vm: &VmCid) -> bool {
        v.state() == Some(&VolumeState::InUse)
            && v.attachments().iter().any(|a| {
                a.instance_id() == Some(vm.0.as_str())
                    && matches!(a.state(), None | Some(VolumeAttachmentState::Attached))
            })
    }

    async fn do_attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<DiskHint> {
        let instance = self.live_instance(vm).await?;
        let volume = self.volume(disk).await?;
        let device = match attached_to(&volume) {
            Some(other) if other != vm.0 => {
                return Err(AwsCpiError::Conflict(format!(
                    "attach_disk {disk} to VM {vm}: it is attached to VM {other}; detach it first"
                )))
            }
            Some(_) => volume
                .attachments()
                .iter()
                .find(|a| a.instance_id() == Some(vm.0.as_str()))
                .and_then(|a| a.device())
                .map(str::to_string),
            None => None,
        };
        let device = match device {
            Some(d) => d,
            None => {
                let used = self.used_devices(vm, &instance).await?;
                let device = choose_device(&used).ok_or_else(|| {
                    AwsCpiError::Conflict(format!(
                        "attach_disk {disk} to VM {vm}: no free device among /dev/sdf../dev/sdp \
                         (used: {used:?})"
                    ))
                })?;
                self.ec2(
                    format!("AttachVolume {disk} to {vm} at {device}"),
                    Target::Disk(disk.clone()),
                    Retry::Transient,
                    || {
                        self.client
                            .attach_volume()
                            .volume_id(&disk.0)
                            .instance_id(&vm.0)
                            .device(&device)
                            .send()
                    },
                )
                .await?;
                device
            }
        };
        self.wait_volume(disk, &format!("attached to {vm}"), false, |v| {
            Self::is_attached_to(v, vm)
        })
        .await?;
        tracing::info!(vm = %vm, disk = %disk, device, "volume attached");
        Ok(DiskHint { path: device })
    }

    async fn do_detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> Result<()> {
        let volume = self.volume(disk).await?;
        if attached_to(&volume) != Some(vm.0.as_str()) {
            return Ok(());
        }
        let r = self
            .ec2(
                format!("DetachVolume {disk} from {vm}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || {
                    self.client
                        .detach_volume()
                        .volume_id(&disk.0)
                        .instance_id(&vm.0)
                        .send()
                },
            )
            .await;
        match r {
            Ok(_) => {}
            // Detached meanwhile (IncorrectState: not attached).
            Err(e) if e.code() == Some("IncorrectState") => {}
            Err(e) => return Err(e),
        }
        self.wait_volume(disk, "available", true, |v| {
            v.state() == Some(&VolumeState::Available) || attached_to(v) != Some(vm.0.as_str())
        })
        .await?;
        tracing::info!(vm = %vm, disk = %disk, "volume detached");
        Ok(())
    }

    /// The persistent disks of a VM: volumes attached at a persistent-disk
    /// device (`/dev/sdf`..`/dev/sdp`); the root and ephemeral volumes are not.
    async fn do_get_disks(&self, vm: &VmCid) -> Result<Vec<DiskCid>> {
        self.live_instance(vm).await?;
        Ok(self
            .attached_volumes(vm)
            .await?
            .iter()
            .filter(|v| {
                v.attachments().iter().any(|a| {
                    a.instance_id() == Some(vm.0.as_str())
                        && a.device().is_some_and(is_persistent_device)
                })
            })
            .filter_map(|v| v.volume_id().map(|id| DiskCid(id.to_string())))
            .collect())
    }

    async fn do_resize_disk(&self, disk: &DiskCid, new_size_mb: u64) -> Result<()> {
        let what = format!("resize_disk {disk} to {new_size_mb} MB");
        let volume = self.volume(disk).await?;
        let want = gib_i32(new_size_mb, &what)?;
        let have = volume.size().unwrap_or(0);
        if want < have {
            return Err(AwsCpiError::Invalid(format!(
                "{what}: it is {have} GiB and cannot shrink to {want} GiB"
            )));
        }
        if want == have {
            return Ok(());
        }
        self.ec2(
            format!("ModifyVolume {disk} to {want} GiB"),
            Target::Disk(disk.clone()),
            Retry::Transient,
            || {
                self.client
                    .modify_volume()
                    .volume_id(&disk.0)
                    .size(want)
                    .send()
            },
        )
        .await?;
        self.wait_volume(disk, &format!("size {want} GiB"), false, |v| {
            v.size() == Some(want)
        })
        .await?;
        tracing::info!(disk = %disk, gib = want, "volume resized");
        Ok(())
    }

    async fn do_snapshot_disk(&self, disk: &DiskCid, metadata: &Metadata) -> Result<SnapshotCid> {
        self.volume(disk).await?;
        let mut create = self.client.create_snapshot().volume_id(&disk.0);
        let mut tags = metadata.clone();
        if let Some(name) = metadata.get("name") {
            tags.insert("Name".into(), name.clone());
        }
        if !tags.is_empty() {
            create = create.tag_specifications(tag_spec(ResourceType::Snapshot, tags_of(&tags)));
        }
        let out = self
            .ec2(
                format!("CreateSnapshot of {disk}"),
                Target::Disk(disk.clone()),
                Retry::Transient,
                || create.clone().send(),
            )
            .await?;
        let id = out.snapshot_id().ok_or_else(|| {
            AwsCpiError::Invalid(format!("CreateSnapshot of {disk} returned no snapshot id"))
        })?;
        tracing::info!(disk = %disk, snapshot = id, "snapshot created");
        Ok(SnapshotCid(id.to_string()))
    }

    async fn do_delete_snapshot(&self, snap: &SnapshotCid) -> Result<()> {
        let r = self
            .ec2(
                format!("DeleteSnapshot {snap}"),
                Target::Snapshot(snap.clone()),
                Retry::Transient,
                || self.client.delete_snapshot().snapshot_id(&snap.0).send(),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl bosun_cpi::Cpi for AwsCpi {
    async fn info(&self) -> CpiResult<CpiInfo> {
        Ok(CpiInfo {
            name: "aws".into(),
            api_version: 2,
            stemcell_formats: vec![STEMCELL_FORMAT.into()],
        })
    }

    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid> {
        Ok(self.do_create_stemcell(spec).await?)
    }

    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        // A light stemcell's AMI is not ours: forget it, never deregister it.
        tracing::info!(ami = %cid, "light stemcell forgotten (AMI kept)");
        Ok(())
    }

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        Ok(self.do_create_vm(req).await?)
    }

    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_delete_vm(cid).await?)
    }

    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        Ok(self
            .describe_instance(cid, Retry::Transient)
            .await?
            .is_some_and(|i| !is_gone(&i)))
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_reboot_vm(cid).await?)
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        self.live_instance(cid).await?;
        let mut tags = metadata.clone();
        if let Some(name) = metadata.get("name") {
            tags.insert("Name".into(), name.clone());
        }
        Ok(self
            .create_tags(
                format!("CreateTags on instance {cid}"),
                Target::Vm(cid.clone()),
                &cid.0,
                &tags,
            )
            .await?)
    }

    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
        Ok(self.find_instances(filter).await?)
    }

    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
        Ok(self.do_create_disk(req).await?)
    }

    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        Ok(self.do_delete_disk(cid).await?)
    }

    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        Ok(self.do_attach_disk(vm, disk).await?)
    }

    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        Ok(self.do_detach_disk(vm, disk).await?)
    }

    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        Ok(self
            .describe_volume(cid, Retry::Transient)
            .await?
            .is_some_and(|v| !matches!(v.state(), Some(VolumeState::Deleting))))
    }

    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        Ok(self.do_get_disks(vm).await?)
    }

    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        Ok(self.do_resize_disk(cid, new_size_mb).await?)
    }

    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        self.volume(cid).await?;
        Ok(self
            .create_tags(
                format!("CreateTags on volume {cid}"),
                Target::Disk(cid.clone()),
                &cid.0,
                metadata,
            )
            .await?)
    }

    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
        Ok(self.find_volumes(filter).await?)
    }

    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid> {
        Ok(self.do_snapshot_disk(cid, metadata).await?)
    }

    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
        Ok(self.do_delete_snapshot(cid).await?)
    }
}

#[cfg(test)]
mod tests;

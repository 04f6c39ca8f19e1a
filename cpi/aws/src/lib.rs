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

mod config;
mod disk;
mod ec2;
mod stemcell;
mod tags;
mod vm;

use std::time::Duration;

use async_trait::async_trait;
use aws_config::environment::credentials::EnvironmentVariableCredentialsProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::config::timeout::TimeoutConfig;
use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::Client;
use bosun_cpi::{
    CpiError, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint, Metadata,
    SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};

pub use config::AwsCpiConfig;
pub use disk::{choose_device, gib_of_mb, is_persistent_device};
pub use ec2::{classify, Backoff, ErrorClass};
pub use tags::{metadata_of_tags, tag_filters};
pub use vm::{decode_user_data, encode_user_data};

use ec2::{resource_of_code, Resource};

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
    #[error("aws CPI: {what}")]
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
                // The CPI error ends the chain: its message carries the causes.
                if class.is_retryable() {
                    CpiError::Transient {
                        message: bosun_cpi::chain::chain(&e),
                        retry_after: Some(Duration::from_secs(5)),
                    }
                } else {
                    CpiError::fatal(bosun_cpi::chain::chain(&e))
                }
            }
            AwsCpiError::Timeout { .. } => CpiError::Transient {
                message: bosun_cpi::chain::chain(&e),
                retry_after: None,
            },
            other => CpiError::fatal(bosun_cpi::chain::chain(&other)),
        }
    }
}

type Result<T, E = AwsCpiError> = std::result::Result<T, E>;

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
        self.do_delete_stemcell(cid);
        Ok(())
    }

    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        Ok(self.do_create_vm(req).await?)
    }

    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_delete_vm(cid).await?)
    }

    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        Ok(self.do_has_vm(cid).await?)
    }

    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        Ok(self.do_reboot_vm(cid).await?)
    }

    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        Ok(self.do_set_vm_metadata(cid, metadata).await?)
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
        Ok(self.do_has_disk(cid).await?)
    }

    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        Ok(self.do_get_disks(vm).await?)
    }

    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        Ok(self.do_resize_disk(cid, new_size_mb).await?)
    }

    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        Ok(self.do_set_disk_metadata(cid, metadata).await?)
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
mod tests {
    use super::*;

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
}

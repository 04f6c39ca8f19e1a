//! VMs of the AWS CPI: EC2 instances launched from a light stemcell's AMI
//! with the agent settings as user-data, waited for, rebooted, terminated,
//! tagged and found by tags.
//!
//! This module must not talk to the agent (the settings travel only as
//! user-data) nor touch volumes beyond the ephemeral disk of the launch.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, IamInstanceProfileSpecification, Instance,
    InstanceStateName, InstanceType, Placement, ResourceType, VolumeType,
};
use base64::Engine as _;
use bosun_cpi::{AgentSettings, CreateVmRequest, Metadata, NetworkKind, NetworkSettings, VmCid};
use serde_json::Value;

use crate::config::{str_prop, string_list, u64_prop};
use crate::disk::gib_i32;
use crate::ec2::{Polled, Retry};
use crate::tags::{metadata_of_tags, tag_filters, tag_spec, tags_of};
use crate::{AwsCpi, AwsCpiError, Result, Target, DEFAULT_INSTANCE_TYPE, EPHEMERAL_DEVICE};

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

/// The network that places the VM: the one providing the gateway, else the first.
pub(crate) fn default_network(
    networks: &BTreeMap<String, NetworkSettings>,
) -> Option<&NetworkSettings> {
    networks
        .values()
        .find(|n| n.default.iter().any(|d| d == "gateway"))
        .or_else(|| networks.values().next())
}

/// The name of an instance's state (`pending`, `running`, ...).
pub(crate) fn instance_state(i: &Instance) -> String {
    i.state()
        .and_then(|s| s.name())
        .map(|n| n.as_str().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(crate) fn is_gone(i: &Instance) -> bool {
    matches!(
        i.state().and_then(|s| s.name()),
        Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)
    )
}

impl AwsCpi {
    pub(crate) async fn describe_instance(
        &self,
        vm: &VmCid,
        retry: Retry,
    ) -> Result<Option<Instance>> {
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
    pub(crate) async fn live_instance(&self, vm: &VmCid) -> Result<Instance> {
        self.describe_instance(vm, Retry::Transient)
            .await?
            .filter(|i| !is_gone(i))
            .ok_or_else(|| AwsCpiError::VmNotFound(vm.clone()))
    }

    /// Waits until the instance is in `want`; unknown counts as `missing_ok`
    /// (done) or as not yet visible.
    pub(crate) async fn wait_instance(
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

    pub(crate) async fn do_create_vm(&self, req: &CreateVmRequest) -> Result<VmCid> {
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

    pub(crate) async fn terminate(&self, vm: &VmCid) -> Result<()> {
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

    pub(crate) async fn do_delete_vm(&self, vm: &VmCid) -> Result<()> {
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

    pub(crate) async fn do_reboot_vm(&self, vm: &VmCid) -> Result<()> {
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

    /// Whether the instance exists and is neither terminated nor shutting down.
    pub(crate) async fn do_has_vm(&self, vm: &VmCid) -> Result<bool> {
        Ok(self
            .describe_instance(vm, Retry::Transient)
            .await?
            .is_some_and(|i| !is_gone(&i)))
    }

    /// Tags the instance (plus `Name` = metadata `name`).
    pub(crate) async fn do_set_vm_metadata(&self, vm: &VmCid, metadata: &Metadata) -> Result<()> {
        self.live_instance(vm).await?;
        let mut tags = metadata.clone();
        if let Some(name) = metadata.get("name") {
            tags.insert("Name".into(), name.clone());
        }
        self.create_tags(
            format!("CreateTags on instance {vm}"),
            Target::Vm(vm.clone()),
            &vm.0,
            &tags,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn settings() -> AgentSettings {
        AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: "ssh-ed25519 AAAA director".into(),
            host_private_key:
                "-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n-----END OPENSSH PRIVATE KEY-----\n"
                    .into(),
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
}

//! The executor: carries out a [`Plan`] through the CPIs and the agents,
//! recording every side effect in the state store before and after it
//! happens. One attempt: on the first failure it stops launching work, lets
//! work in flight finish, and returns the error; the caller may plan again.
//!
//! Order (BOSH's): compile packages; delete instances that went away; create
//! missing VMs and disks for new instances (in parallel); then each instance
//! group in turn (or together where `serial: false`), canaries first, then
//! the rest at most `max_in_flight` at a time. A failed canary stops the
//! deploy before any other instance of the group is touched.
//!
//! The executor decides nothing the plan did not decide. It must not talk to
//! an IaaS except through `bosun_cpi::Cpi`, nor to a VM except through the
//! agent client.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use bosun_agent::client::{wait_for_agent, AgentClient, ClientError};
use bosun_agent::keys::generate_keypair;
use bosun_agent::protocol::{
    ApplySpec, DrainKind, DrainParams, MountDiskParams, ProcessState, RunScriptParams,
    UnmountDiskParams,
};
use bosun_cpi::chain::Chain;
use bosun_cpi::{
    AgentSettings, Cpi, CpiError, CreateDiskRequest, CreateVmRequest, DiskCid, Metadata,
    NetworkSettings, StemcellCid, VmCid, AGENT_PORT,
};

use crate::plan::planner::{primary_ip, DiskAction, InstancePlan, VmAction};
use crate::store::{
    now, AppliedRecord, DeployedSpec, DiskRecord, Event, InstanceRecord, InstanceState, OrphanDisk,
    StateError, Store, VmCreate, VmRecord,
};

/// An execution failure, naming the instance and the step.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("{what}")]
    Cpi {
        what: String,
        #[source]
        source: Box<CpiError>,
    },
    #[error("{what}")]
    Agent {
        what: String,
        #[source]
        source: Box<ClientError>,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("no CPI named '{0}' is configured (this build has: local)")]
    UnknownCpi(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Compile(String),
    #[error("cancelled at a safe point: {0}")]
    Cancelled(String),
}

/// Where progress goes (the CLI prints it).
pub trait Progress: Send + Sync {
    /// `subject` is an instance (`kv/<id> (0)`), `compilation` or `deployment`.
    fn stage(&self, subject: &str, stage: &str);
}

/// What follows a stop, as BOSH tells the scripts: `pre-stop` gets
/// `BOSH_VM_NEXT_STATE`, `BOSH_INSTANCE_NEXT_STATE` and
/// `BOSH_DEPLOYMENT_NEXT_STATE` (`keep` or `delete`); drain's
/// `BOSH_JOB_NEXT_STATE` has no persistent disk when the instance goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextState {
    /// The jobs stop; VM, instance and deployment stay (update, `stop`).
    Keep,
    /// The VM goes, the instance stays (recreate, `stop --hard`, errands).
    VmDeleted,
    /// The instance goes (scale-down, removed group).
    InstanceDeleted,
    /// The deployment goes (`delete-deployment`).
    DeploymentDeleted,
}

impl NextState {
    fn instance_goes(self) -> bool {
        matches!(
            self,
            NextState::InstanceDeleted | NextState::DeploymentDeleted
        )
    }

    /// The `pre-stop` environment.
    pub fn env(self) -> BTreeMap<String, String> {
        let word = |gone: bool| if gone { "delete" } else { "keep" }.to_string();
        BTreeMap::from([
            ("BOSH_VM_NEXT_STATE".into(), word(self != NextState::Keep)),
            (
                "BOSH_INSTANCE_NEXT_STATE".into(),
                word(self.instance_goes()),
            ),
            (
                "BOSH_DEPLOYMENT_NEXT_STATE".into(),
                word(self == NextState::DeploymentDeleted),
            ),
        ])
    }
}

/// A job state for drain scripts (`BOSH_JOB_STATE`): its persistent disk
/// size in MB, 0 for none.
pub fn job_state(persistent_disk_mb: Option<u64>) -> String {
    serde_json::json!({ "persistent_disk": persistent_disk_mb.unwrap_or(0) }).to_string()
}

/// The CPIs this director drives, by name.
#[derive(Clone, Default)]
pub struct Cpis {
    map: BTreeMap<String, Arc<dyn Cpi>>,
}

impl Cpis {
    pub fn new() -> Cpis {
        Cpis::default()
    }
    pub fn insert(&mut self, name: &str, cpi: Arc<dyn Cpi>) {
        self.map.insert(name.to_string(), cpi);
    }
    pub fn get(&self, name: &str) -> Result<Arc<dyn Cpi>, ExecError> {
        self.map
            .get(name)
            .cloned()
            .ok_or_else(|| ExecError::UnknownCpi(name.to_string()))
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(|s| s.as_str())
    }
}

/// Tunables.
#[derive(Clone, Debug)]
pub struct ExecOptions {
    /// How long a new VM's agent may take to answer.
    pub agent_timeout: Duration,
    /// How long an existing VM's agent may take to answer before the
    /// instance counts as unresponsive.
    pub existing_agent_timeout: Duration,
    pub compile_timeout_secs: u64,
    pub drain_timeout_secs: u64,
    pub script_timeout_secs: u64,
    /// Parallel VM creations for new instances.
    pub create_parallelism: usize,
    /// Set (e.g. on Ctrl-C) to stop at the next safe point: no new instance
    /// is started; work in flight finishes.
    pub cancel: Arc<AtomicBool>,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            agent_timeout: Duration::from_secs(60),
            existing_agent_timeout: Duration::from_secs(10),
            compile_timeout_secs: 1800,
            drain_timeout_secs: 300,
            script_timeout_secs: 300,
            create_parallelism: 32,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }
}

pub struct Executor {
    pub store: Arc<Store>,
    pub cpis: Cpis,
    pub progress: Arc<dyn Progress>,
    pub opts: ExecOptions,
    /// Who drives it, as events name it (`deploy`, `monitor`, `cloud-check`).
    pub source: String,
}

/// The display name of an instance: `group/id (index)`.
pub fn instance_name(r: &InstanceRecord) -> String {
    format!("{}/{} ({})", r.group, r.id, r.index)
}

fn agent_addr(ip: &str) -> Result<SocketAddr, ExecError> {
    format!("{ip}:{AGENT_PORT}")
        .parse()
        .map_err(|_| ExecError::Failed(format!("VM address '{ip}' is not an IPv4 address")))
}

/// A VM just created, with its agent answering.
pub struct NewVm {
    pub cid: VmCid,
    pub agent_id: String,
    pub host_public_key: String,
    pub address: String,
    pub client: Option<AgentClient>,
}

impl Executor {
    pub(crate) fn event(
        &self,
        deployment: &str,
        instance: Option<&str>,
        action: &str,
        object: &str,
        result: &str,
    ) {
        self.store.record_event(
            &Event::new(&self.source, deployment, instance)
                .did(action, object)
                .result(result),
        );
    }

    /// Move an instance's data to a new persistent disk (jobs stopped, the
    /// old disk mounted): the agent packs the old disk, the director keeps
    /// that blob until the new disk holds it, the old disk is detached and
    /// orphaned (kept, never deleted here), the new one created, attached,
    /// mounted and filled. Returns a client to the agent.
    async fn migrate_disk(
        &self,
        ip: &InstancePlan,
        rec: &mut InstanceRecord,
        client: AgentClient,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let DiskAction::Migrate {
            cpi,
            size_mb,
            cloud_properties,
            digest,
        } = &ip.disk
        else {
            return Ok(client);
        };
        let agent = |what: String| {
            move |source| ExecError::Agent {
                what,
                source: Box::new(source),
            }
        };
        self.progress.stage(&name, "copying disk data");
        let packed = client
            .pack_disk()
            .await
            .map_err(agent(format!("packing the persistent disk of {name}")))?;
        let data = client
            .get_blob(&packed.sha256)
            .await
            .map_err(agent(format!("fetching the packed disk of {name}")))?;
        self.store
            .blobs()
            .put_verified(&packed.sha256, &data)
            .map_err(|e| {
                ExecError::Failed(format!(
                    "keeping the disk data of {name}: {e}",
                    e = Chain(&e)
                ))
            })?;
        if let Some(d) = &rec.disk {
            client
                .unmount_disk(&UnmountDiskParams { cid: d.cid.clone() })
                .await
                .map_err(agent(format!("unmounting the old disk of {name}")))?;
        }
        self.orphan_disk(rec).await?;
        let create = InstancePlan {
            disk: DiskAction::Create {
                cpi: cpi.clone(),
                size_mb: *size_mb,
                cloud_properties: cloud_properties.clone(),
                digest: digest.clone(),
            },
            ..ip.clone()
        };
        let client = self.ensure_disk(&create, rec, client).await?;
        client
            .put_blob(&packed.sha256, &data)
            .await
            .map_err(agent(format!("sending the disk data to {name}")))?;
        client
            .unpack_disk(&packed.sha256)
            .await
            .map_err(agent(format!("filling the new disk of {name}")))?;
        // The new disk holds the data now (and the old disk still does).
        if let Err(e) = self.store.blobs().delete(&packed.sha256) {
            tracing::warn!(
                "removing the copied disk data {}: {e}",
                packed.sha256,
                e = Chain(&e)
            );
        }
        self.event(
            &rec.deployment,
            Some(&name),
            "migrate",
            &format!(
                "disk data ({} bytes packed) to {}",
                packed.size,
                rec.disk.as_ref().map(|d| d.cid.as_str()).unwrap_or("?")
            ),
            "ok",
        );
        Ok(client)
    }

    /// Create a VM through a CPI and wait for its agent.
    #[allow(clippy::too_many_arguments)]
    pub async fn create_vm(
        &self,
        cpi_name: &str,
        stemcell: &str,
        cloud_properties: &serde_json::Value,
        networks: &BTreeMap<String, NetworkSettings>,
        env: &serde_json::Value,
        metadata: Metadata,
        subject: &str,
        on_created: impl FnOnce(&NewVm) -> Result<(), ExecError>,
    ) -> Result<NewVm, ExecError> {
        let cpi = self.cpis.get(cpi_name)?;
        let host = generate_keypair().map_err(|e| {
            ExecError::Failed(format!(
                "generating host key for {subject}: {e}",
                e = Chain(&e)
            ))
        })?;
        let agent_id = uuid::Uuid::new_v4().to_string();
        let address = primary_ip(networks);
        let settings = AgentSettings {
            agent_id: agent_id.clone(),
            director_public_key: self.store.director_key().public_openssh.clone(),
            host_private_key: host.private_openssh.clone(),
            listen_ip: if address.is_empty() {
                "0.0.0.0".into()
            } else {
                address.clone()
            },
            listen_port: AGENT_PORT,
            networks: networks.clone(),
            disks: BTreeMap::new(),
            env: env.clone(),
        };
        let req = CreateVmRequest {
            agent_id: agent_id.clone(),
            stemcell: StemcellCid(stemcell.to_string()),
            cloud_properties: cloud_properties.clone(),
            networks: networks.clone(),
            disk_cids: vec![],
            settings,
            metadata,
        };
        self.progress.stage(subject, "creating VM");
        let cid = cpi.create_vm(&req).await.map_err(|source| ExecError::Cpi {
            what: format!("creating VM for {subject}"),
            source: Box::new(source),
        })?;
        bosun_cpi::failpoint::hit("after-create-vm");
        let mut vm = NewVm {
            cid,
            agent_id,
            host_public_key: host.public_openssh,
            address,
            client: None,
        };
        on_created(&vm)?;
        self.progress.stage(subject, "waiting for agent");
        let started = Instant::now();
        let client = wait_for_agent(
            agent_addr(&vm.address)?,
            self.store.director_key(),
            &vm.host_public_key,
            self.opts.agent_timeout,
        )
        .await
        .map_err(|e| {
            ExecError::Failed(format!(
                "agent for {subject} on {} did not answer within {} s (waited {:.1} s): {e}",
                vm.cid,
                self.opts.agent_timeout.as_secs(),
                started.elapsed().as_secs_f64(),
                e = Chain(&e)
            ))
        })?;
        vm.client = Some(client);
        Ok(vm)
    }

    fn metadata(&self, rec: &InstanceRecord, token: &str) -> Metadata {
        [
            ("director", self.store.director_id().to_string()),
            ("deployment", rec.deployment.clone()),
            ("instance_group", rec.group.clone()),
            ("instance", format!("{}/{}", rec.group, rec.id)),
            ("index", rec.index.to_string()),
            ("name", format!("{}/{}", rec.group, rec.index)),
            ("token", token.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Create the VM (and disk) of an instance that has none, recording each step.
    async fn create_instance_vm(
        &self,
        rec: &mut InstanceRecord,
        vc: &VmCreate,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let token = uuid::Uuid::new_v4().to_string();
        rec.pending_vm_token = Some(token.clone());
        self.store.save_instance(rec)?;
        let store = self.store.clone();
        let cpi_name = vc.cpi.clone();
        let vm_digest = vc.vm_digest.clone();
        let rec_for_record = std::sync::Mutex::new(rec.clone());
        let vm = self
            .create_vm(
                &vc.cpi,
                &vc.stemcell_cid,
                &vc.cloud_properties,
                &vc.networks,
                &vc.env,
                self.metadata(rec, &token),
                &name,
                |vm| {
                    let mut r = match rec_for_record.lock() {
                        Ok(g) => g,
                        Err(p) => p.into_inner(),
                    };
                    r.vm = Some(VmRecord {
                        cid: vm.cid.0.clone(),
                        cpi: cpi_name.clone(),
                        agent_id: vm.agent_id.clone(),
                        host_public_key: vm.host_public_key.clone(),
                        address: vm.address.clone(),
                        vm_digest: vm_digest.clone(),
                        generation: 0,
                        created_at: now(),
                    });
                    r.pending_vm_token = None;
                    store.save_instance(&r)?;
                    Ok(())
                },
            )
            .await;
        if let Ok(r) = rec_for_record.into_inner() {
            *rec = r;
        }
        let vm = vm?;
        self.event(
            &rec.deployment,
            Some(&name),
            "create",
            &format!("vm {}", vm.cid),
            "ok",
        );
        vm.client
            .ok_or_else(|| ExecError::Failed(format!("agent for {name} did not answer")))
    }

    /// For a new instance: VM, disk, attach and mount.
    pub(super) async fn prepare_vm(
        &self,
        ip: &InstancePlan,
        rec: &mut InstanceRecord,
    ) -> Result<(), ExecError> {
        let vc = match &ip.vm {
            VmAction::Create(vc) | VmAction::Recreate(vc) => vc,
            VmAction::Keep => return Ok(()),
        };
        let client = self.create_instance_vm(rec, vc).await?;
        self.ensure_disk(ip, rec, client).await.map(|_| ())
    }

    pub(crate) async fn ensure_disk(
        &self,
        ip: &InstancePlan,
        rec: &mut InstanceRecord,
        client: AgentClient,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let Some(vm) = rec.vm.clone() else {
            return Ok(client);
        };
        if let DiskAction::Create {
            cpi,
            size_mb,
            cloud_properties,
            digest,
        } = &ip.disk
        {
            if rec.disk.is_none() {
                self.progress.stage(&name, "creating disk");
                let c = self.cpis.get(cpi)?;
                let cid = c
                    .create_disk(&CreateDiskRequest {
                        size_mb: *size_mb,
                        cloud_properties: cloud_properties.clone(),
                        vm_locality: Some(VmCid(vm.cid.clone())),
                        metadata: self.metadata(rec, &uuid::Uuid::new_v4().to_string()),
                    })
                    .await
                    .map_err(|source| ExecError::Cpi {
                        what: format!("creating disk for {name}"),
                        source: Box::new(source),
                    })?;
                rec.disk = Some(DiskRecord {
                    cid: cid.0.clone(),
                    cpi: cpi.clone(),
                    size_mb: *size_mb,
                    digest: digest.clone(),
                    attached: false,
                });
                self.store.save_instance(rec)?;
                self.event(
                    &rec.deployment,
                    Some(&name),
                    "create",
                    &format!("disk {cid}"),
                    "ok",
                );
            }
        }
        if matches!(ip.disk, DiskAction::Orphan) {
            self.unmount_before_detach(&client, rec, &name).await;
            self.detach_disk(rec).await?;
            self.orphan_disk(rec).await?;
            return Ok(client);
        }
        self.attach_and_mount(rec, client).await
    }

    /// Attach the instance's persistent disk to its VM unless the record
    /// says it is attached, and have the agent mount it. Returns the agent
    /// to talk to from now on (attaching may restart the VM).
    pub(crate) async fn attach_and_mount(
        &self,
        rec: &mut InstanceRecord,
        client: AgentClient,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let (Some(vm), Some(d)) = (rec.vm.clone(), rec.disk.clone()) else {
            return Ok(client);
        };
        let c = self.cpis.get(&d.cpi)?;
        let hint = if d.attached {
            None
        } else {
            self.progress.stage(&name, "attaching disk");
            let hint = c
                .attach_disk(&VmCid(vm.cid.clone()), &DiskCid(d.cid.clone()))
                .await
                .map_err(|source| ExecError::Cpi {
                    what: format!("attaching disk {} to {name}", d.cid),
                    source: Box::new(source),
                })?;
            if let Some(dr) = rec.disk.as_mut() {
                dr.attached = true;
            }
            self.store.save_instance(rec)?;
            self.event(
                &rec.deployment,
                Some(&name),
                "attach",
                &format!("disk {} to vm {}", d.cid, vm.cid),
                "ok",
            );
            Some(hint)
        };
        if let Some(hint) = hint {
            // Attaching may have restarted the VM (Docker recreates the
            // container to add a volume): talk to its agent afresh.
            let client = self
                .connect(&vm, self.opts.agent_timeout)
                .await
                .map_err(|source| ExecError::Agent {
                    what: format!("reaching the agent of {name} after attaching its disk"),
                    source: Box::new(source),
                })?;
            client
                .mount_disk(&MountDiskParams {
                    cid: d.cid.clone(),
                    hint,
                })
                .await
                .map_err(|source| ExecError::Agent {
                    what: format!("mounting disk {} on {name}", d.cid),
                    source: Box::new(source),
                })?;
            return Ok(client);
        }
        Ok(client)
    }

    pub(crate) async fn detach_disk(&self, rec: &mut InstanceRecord) -> Result<(), ExecError> {
        let (Some(vm), Some(d)) = (rec.vm.clone(), rec.disk.clone()) else {
            return Ok(());
        };
        if !d.attached {
            return Ok(());
        }
        let c = self.cpis.get(&d.cpi)?;
        match c
            .detach_disk(&VmCid(vm.cid.clone()), &DiskCid(d.cid.clone()))
            .await
        {
            Ok(()) | Err(CpiError::VmNotFound(_)) => {}
            Err(source) => {
                return Err(ExecError::Cpi {
                    what: format!("detaching disk {} from {}", d.cid, instance_name(rec)),
                    source: Box::new(source),
                })
            }
        }
        if let Some(dr) = rec.disk.as_mut() {
            dr.attached = false;
        }
        self.store.save_instance(rec)?;
        Ok(())
    }

    pub(super) async fn orphan_disk(&self, rec: &mut InstanceRecord) -> Result<(), ExecError> {
        self.detach_disk(rec).await?;
        if let Some(d) = rec.disk.take() {
            self.store.save_orphan_disk(&OrphanDisk {
                cid: d.cid.clone(),
                cpi: d.cpi.clone(),
                size_mb: d.size_mb,
                deployment: rec.deployment.clone(),
                instance: format!("{}/{}", rec.group, rec.id),
                orphaned_at: now(),
            })?;
            self.store.save_instance(rec)?;
            self.event(
                &rec.deployment,
                Some(&instance_name(rec)),
                "orphan",
                &format!("disk {}", d.cid),
                "ok",
            );
        }
        Ok(())
    }

    /// Connect to the agent of instance `name`'s VM, the error naming both.
    pub(crate) async fn reach(
        &self,
        vm: &VmRecord,
        name: &str,
        timeout: Duration,
    ) -> Result<AgentClient, ExecError> {
        self.connect(vm, timeout)
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("reaching the agent of {name} on {}", vm.cid),
                source: Box::new(source),
            })
    }

    /// Connect to the agent of an instance's VM; an instance without one is
    /// an error naming it.
    pub(crate) async fn reach_instance(
        &self,
        rec: &InstanceRecord,
        timeout: Duration,
    ) -> Result<AgentClient, ExecError> {
        let name = instance_name(rec);
        let vm = rec
            .vm
            .as_ref()
            .ok_or_else(|| ExecError::Failed(format!("{name} has no VM")))?;
        self.reach(vm, &name, timeout).await
    }

    /// Connect to the agent of an existing VM.
    pub(crate) async fn connect(
        &self,
        vm: &VmRecord,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let addr = format!("{}:{AGENT_PORT}", vm.address)
            .parse()
            .map_err(|_| ClientError::Protocol(format!("bad VM address {}", vm.address)))?;
        wait_for_agent(
            addr,
            self.store.director_key(),
            &vm.host_public_key,
            timeout,
        )
        .await
    }

    /// Stop an instance's VM and delete it (drain and stop when its agent
    /// answers; the disk is detached and kept).
    pub async fn teardown_vm(
        &self,
        rec: &mut InstanceRecord,
        kind: DrainKind,
        next: NextState,
    ) -> Result<(), ExecError> {
        self.teardown_vm_with(rec, Some(kind), next).await
    }

    /// Unmount the instance's disk before it is detached; the detach goes
    /// ahead whatever the agent says, so a failure is only reported.
    async fn unmount_before_detach(&self, client: &AgentClient, rec: &InstanceRecord, name: &str) {
        let Some(d) = &rec.disk else {
            return;
        };
        if let Err(e) = client
            .unmount_disk(&UnmountDiskParams { cid: d.cid.clone() })
            .await
        {
            self.progress.stage(
                name,
                &format!("unmounting disk {} anyway: {e}", d.cid, e = Chain(&e)),
            );
        }
    }

    /// [`Executor::teardown_vm`], draining with `drain` (`None`: no drain).
    pub async fn teardown_vm_with(
        &self,
        rec: &mut InstanceRecord,
        drain: Option<DrainKind>,
        next: NextState,
    ) -> Result<(), ExecError> {
        let Some(vm) = rec.vm.clone() else {
            return Ok(());
        };
        let name = instance_name(rec);
        let cpi = self.cpis.get(&vm.cpi)?;
        // A CPI that cannot say counts the VM as alive: it is drained first.
        let alive = match cpi.has_vm(&VmCid(vm.cid.clone())).await {
            Ok(alive) => alive,
            Err(e) => {
                self.progress.stage(
                    &name,
                    &format!(
                        "asking the CPI about VM {}: {e}; draining it",
                        vm.cid,
                        e = Chain(&e)
                    ),
                );
                true
            }
        };
        if alive {
            if let Ok(client) = self.connect(&vm, Duration::from_secs(5)).await {
                // Best effort: the VM goes away whatever its scripts say.
                let size = rec.disk.as_ref().map(|d| d.size_mb);
                let next_size = if next.instance_goes() { None } else { size };
                let drain = drain.map(|kind| DrainParams {
                    kind,
                    timeout_secs: self.opts.drain_timeout_secs,
                    changed_jobs: vec![],
                    job_state: Some(job_state(size)),
                    next_job_state: Some(job_state(next_size)),
                });
                if let Err(e) = self.drain_and_stop(&client, &name, drain, next).await {
                    self.progress
                        .stage(&name, &format!("stopping anyway: {e}", e = Chain(&e)));
                    if let Err(e) = client.stop().await {
                        self.progress
                            .stage(&name, &format!("stopping jobs: {e}", e = Chain(&e)));
                    }
                }
                self.unmount_before_detach(&client, rec, &name).await;
            }
        }
        self.detach_disk(rec).await?;
        self.progress.stage(&name, "deleting VM");
        cpi.delete_vm(&VmCid(vm.cid.clone()))
            .await
            .map_err(|source| ExecError::Cpi {
                what: format!("deleting VM {} of {name}", vm.cid),
                source: Box::new(source),
            })?;
        rec.vm = None;
        rec.applied = None;
        self.store.save_instance(rec)?;
        self.event(
            &rec.deployment,
            Some(&name),
            "delete",
            &format!("vm {}", vm.cid),
            "ok",
        );
        Ok(())
    }

    /// Bring one instance to its planned state: recreate or create its VM
    /// as planned, drain and stop what runs, attach and mount its disk,
    /// apply the spec, start, watch, run post-start. Records the result.
    pub(crate) async fn update_instance(
        &self,
        ip: &InstancePlan,
        mut rec: InstanceRecord,
        watch: (u64, u64),
        label: &str,
    ) -> Result<(), ExecError> {
        let name = instance_name(&rec);
        // Keep the planned identity (az, IPs, bootstrap) on the record.
        rec.az = ip.record.az.clone();
        rec.bootstrap = ip.record.bootstrap;
        rec.networks = ip.record.networks.clone();

        if matches!(ip.vm, VmAction::Recreate(_)) && rec.vm.is_some() {
            self.progress.stage(&name, "recreating");
            self.teardown_vm(&mut rec, DrainKind::Update, NextState::VmDeleted)
                .await?;
        }

        let client = match &rec.vm {
            None => {
                let vc = match &ip.vm {
                    VmAction::Create(vc) | VmAction::Recreate(vc) => vc.clone(),
                    VmAction::Keep => {
                        return Err(ExecError::Failed(format!(
                            "{name} has no VM but the plan keeps it; plan again"
                        )))
                    }
                };
                let client = self.create_instance_vm(&mut rec, &vc).await?;
                self.ensure_disk(ip, &mut rec, client).await?
            }
            Some(vm) => {
                let vm = vm.clone();
                let client = self
                    .reach(&vm, &name, self.opts.existing_agent_timeout)
                    .await?;
                if rec.applied.is_some() {
                    let size = rec.disk.as_ref().map(|d| d.size_mb);
                    let next_size = match &ip.disk {
                        DiskAction::Create { size_mb, .. }
                        | DiskAction::Migrate { size_mb, .. } => Some(*size_mb),
                        DiskAction::Keep => size,
                        DiskAction::None | DiskAction::Orphan => None,
                    };
                    let drain = DrainParams {
                        kind: DrainKind::Update,
                        timeout_secs: self.opts.drain_timeout_secs,
                        changed_jobs: changed_jobs(rec.applied.as_ref(), &ip.applied),
                        job_state: Some(job_state(size)),
                        next_job_state: Some(job_state(next_size)),
                    };
                    self.drain_and_stop(&client, &name, Some(drain), NextState::Keep)
                        .await?;
                }
                self.ensure_disk(ip, &mut rec, client).await?
            }
        };

        let client = match &ip.disk {
            DiskAction::Migrate { .. } => self.migrate_disk(ip, &mut rec, client).await?,
            _ => client,
        };

        self.progress.stage(
            &name,
            if label == "canary" {
                "updating (canary)"
            } else {
                "updating"
            },
        );
        let mut spec = ip.spec.clone();
        self.fill_packages(&mut spec, &name, &ip.stemcell, &client)
            .await?;
        let generation = rec.vm.as_ref().map(|v| v.generation + 1).unwrap_or(1);
        spec.generation = generation;
        // Until the new spec is seen running, what runs there is unknown:
        // a failed update must be planned again.
        rec.applied = None;
        if let Some(vm) = rec.vm.as_mut() {
            vm.generation = generation;
        }
        self.store.save_instance(&rec)?;
        client
            .apply(&spec)
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("applying spec to {name}"),
                source: Box::new(source),
            })?;

        // An instance stopped by the operator gets its new spec but stays stopped.
        if rec.state != InstanceState::Stopped {
            self.start_and_watch(&client, &name, watch).await?;
        }
        rec.applied = Some(ip.applied.clone());
        rec.deployed = Some(DeployedSpec {
            vm: ip.vm_target.clone(),
            spec,
            applied: ip.applied.clone(),
            stemcell: ip.stemcell.clone(),
        });
        self.store.save_instance(&rec)?;
        self.progress.stage(&name, "running");
        Ok(())
    }

    /// Start the applied jobs, wait until they run, run post-start (a
    /// failing post-start fails the start).
    pub(crate) async fn start_and_watch(
        &self,
        client: &AgentClient,
        name: &str,
        watch: (u64, u64),
    ) -> Result<(), ExecError> {
        self.progress.stage(name, "starting");
        client.start().await.map_err(|source| ExecError::Agent {
            what: format!("starting {name}"),
            source: Box::new(source),
        })?;
        self.watch(client, name, watch).await?;
        self.run_lifecycle(client, name, "post-start").await
    }

    /// Run a lifecycle script (`bin/<script>` of every job that has one);
    /// any non-zero exit fails with the job's name and output.
    pub(crate) async fn run_lifecycle(
        &self,
        client: &AgentClient,
        name: &str,
        script: &str,
    ) -> Result<(), ExecError> {
        self.run_lifecycle_with(client, name, script, BTreeMap::new())
            .await
    }

    /// [`Executor::run_lifecycle`] with extra `BOSH_*` environment.
    async fn run_lifecycle_with(
        &self,
        client: &AgentClient,
        name: &str,
        script: &str,
        env: BTreeMap<String, String>,
    ) -> Result<(), ExecError> {
        let scripts = client
            .run_script(&RunScriptParams {
                script: script.into(),
                timeout_secs: self.opts.script_timeout_secs,
                jobs: None,
                output_prefix: None,
                env,
            })
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("running {script} on {name}"),
                source: Box::new(source),
            })?;
        if let Some(bad) = scripts.results.iter().find(|r| r.exit_code != 0) {
            return Err(ExecError::Failed(format!(
                "{script} of job {} on {name} exited {}:\n{}",
                bad.job, bad.exit_code, bad.output_tail
            )));
        }
        Ok(())
    }

    /// Drain (when asked), stop the jobs, with `pre-stop` before and
    /// `post-stop` after, as BOSH orders them.
    pub(crate) async fn drain_and_stop(
        &self,
        client: &AgentClient,
        name: &str,
        drain: Option<DrainParams>,
        next: NextState,
    ) -> Result<(), ExecError> {
        self.run_lifecycle_with(client, name, "pre-stop", next.env())
            .await?;
        if let Some(p) = drain {
            self.progress.stage(name, "draining");
            client.drain(&p).await.map_err(|source| ExecError::Agent {
                what: format!("draining {name}"),
                source: Box::new(source),
            })?;
        }
        self.progress.stage(name, "stopping");
        client.stop().await.map_err(|source| ExecError::Agent {
            what: format!("stopping {name}"),
            source: Box::new(source),
        })?;
        self.run_lifecycle(client, name, "post-stop").await
    }

    /// Fill compiled package blobs into the spec and make sure the agent has them.
    async fn fill_packages(
        &self,
        spec: &mut ApplySpec,
        name: &str,
        stemcell_key: &str,
        client: &AgentClient,
    ) -> Result<(), ExecError> {
        for p in spec.packages.iter_mut() {
            let c = self
                .store
                .compiled_package(&p.fingerprint, stemcell_key)?
                .ok_or_else(|| {
                    ExecError::Failed(format!(
                        "package {} ({}) is not compiled for {stemcell_key}; plan again",
                        p.name, p.fingerprint
                    ))
                })?;
            p.sha256 = c.sha256;
        }
        let wanted: Vec<String> = spec.packages.iter().map(|p| p.sha256.clone()).collect();
        let missing = client
            .missing_blobs(&wanted)
            .await
            .map_err(|source| ExecError::Agent {
                what: format!("listing blobs on {name}"),
                source: Box::new(source),
            })?;
        for sha in missing {
            let data = self.store.blobs().read(&sha).map_err(|e| {
                ExecError::Failed(format!("reading blob {sha} for {name}: {e}", e = Chain(&e)))
            })?;
            client
                .put_blob(&sha, &data)
                .await
                .map_err(|source| ExecError::Agent {
                    what: format!("sending package blob {sha} to {name}"),
                    source: Box::new(source),
                })?;
        }
        Ok(())
    }

    /// Poll the agent until every job runs: first check after `min_ms`,
    /// then until `max_ms`.
    pub(crate) async fn watch(
        &self,
        client: &AgentClient,
        name: &str,
        (min_ms, max_ms): (u64, u64),
    ) -> Result<(), ExecError> {
        let start = Instant::now();
        tokio::time::sleep(Duration::from_millis(min_ms.min(max_ms))).await;
        loop {
            let state = client
                .get_state()
                .await
                .map_err(|source| ExecError::Agent {
                    what: format!("reading the state of {name}"),
                    source: Box::new(source),
                })?;
            if state.job_state == ProcessState::Running {
                return Ok(());
            }
            if start.elapsed() >= Duration::from_millis(max_ms) {
                let bad: Vec<String> = state
                    .jobs
                    .iter()
                    .flat_map(|j| {
                        j.processes
                            .iter()
                            .filter(|p| p.state != ProcessState::Running)
                            .map(move |p| {
                                format!("{}/{} {:?}", j.name, p.name, p.state).to_lowercase()
                            })
                    })
                    .collect();
                return Err(ExecError::Failed(format!(
                    "{name} is not running after {} ms ({}); see its logs under /var/vcap/sys/log",
                    max_ms,
                    if bad.is_empty() {
                        "no processes".to_string()
                    } else {
                        bad.join(", ")
                    }
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Delete every instance of a deployment: VMs deleted, disks orphaned,
    /// IPs released, the deployment record removed.
    pub async fn delete_deployment(&self, name: &str) -> Result<usize, ExecError> {
        let instances = self.store.instances(name)?;
        let n = instances.len();
        let sem = Arc::new(Semaphore::new(self.opts.create_parallelism.max(1)));
        let futs = instances.into_iter().map(|mut rec| {
            let sem = sem.clone();
            async move {
                let _permit = sem.acquire().await;
                let iname = instance_name(&rec);
                self.teardown_vm(&mut rec, DrainKind::Shutdown, NextState::DeploymentDeleted)
                    .await?;
                self.orphan_disk(&mut rec).await?;
                self.store.delete_instance(&rec.id)?;
                self.progress.stage(&iname, "deleted");
                Ok::<(), ExecError>(())
            }
        });
        for r in futures_join_all(futs).await {
            r?;
        }
        self.store.delete_deployment_record(name)?;
        self.event(name, None, "delete", "deployment", "ok");
        Ok(n)
    }
}

/// Jobs whose digest differs between what is applied and what comes.
fn changed_jobs(old: Option<&AppliedRecord>, new: &AppliedRecord) -> Vec<String> {
    new.job_digests
        .iter()
        .filter(|(job, d)| old.and_then(|o| o.job_digests.get(*job)) != Some(*d))
        .map(|(job, _)| job.clone())
        .collect()
}

/// Run futures concurrently, results in order.
pub async fn futures_join_all<F, T>(futs: impl IntoIterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let futs: Vec<_> = futs.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> = futs.into_iter().enumerate().collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(i, f)| match f.as_mut().poll(cx) {
            std::task::Poll::Ready(v) => {
                results[*i] = Some(v);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_state_tells_pre_stop_what_goes() {
        let env = |n: NextState| {
            let e = n.env();
            format!(
                "{} {} {}",
                e["BOSH_VM_NEXT_STATE"],
                e["BOSH_INSTANCE_NEXT_STATE"],
                e["BOSH_DEPLOYMENT_NEXT_STATE"]
            )
        };
        assert_eq!(env(NextState::Keep), "keep keep keep");
        assert_eq!(env(NextState::VmDeleted), "delete keep keep");
        assert_eq!(env(NextState::InstanceDeleted), "delete delete keep");
        assert_eq!(env(NextState::DeploymentDeleted), "delete delete delete");
        assert_eq!(job_state(Some(2048)), r#"{"persistent_disk":2048}"#);
        assert_eq!(job_state(None), r#"{"persistent_disk":0}"#);
    }
}

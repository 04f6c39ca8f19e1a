//! A CPI that logs every call it passes on: method, the cids and sizes
//! involved, how long it took and how it ended, as `tracing` events with
//! target `bosun_cpi::calls` (the director's task logs collect them for
//! `bosun task ID --cpi`).
//!
//! Every call is also a pair of [`crate::failpoint`]s, `before-cpi-METHOD`
//! and `after-cpi-METHOD`.
//!
//! It must not log request bodies: agent settings carry the VM's private
//! host key, and metadata and cloud properties may carry secrets.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;

use crate::{
    Cpi, CpiInfo, CpiResult, CreateDiskRequest, CreateVmRequest, DiskCid, DiskHint, Metadata,
    SnapshotCid, StemcellCid, StemcellSpec, VmCid,
};

/// Wraps a CPI, logging each call.
pub struct LoggedCpi {
    name: String,
    inner: Arc<dyn Cpi>,
}

impl LoggedCpi {
    pub fn new(name: &str, inner: Arc<dyn Cpi>) -> LoggedCpi {
        LoggedCpi {
            name: name.to_string(),
            inner,
        }
    }

    async fn logged<T: std::fmt::Debug>(
        &self,
        method: &str,
        args: String,
        call: impl std::future::Future<Output = CpiResult<T>>,
    ) -> CpiResult<T> {
        crate::failpoint::hit_with(|| format!("before-cpi-{method}"));
        let started = Instant::now();
        let r = call.await;
        let ms = started.elapsed().as_millis();
        crate::failpoint::hit_with(|| format!("after-cpi-{method}"));
        match &r {
            Ok(v) => tracing::info!(
                target: "bosun_cpi::calls",
                "{} {method}({args}) -> {v:?} in {ms} ms",
                self.name
            ),
            Err(e) => tracing::info!(
                target: "bosun_cpi::calls",
                "{} {method}({args}) failed in {ms} ms: {e}",
                self.name
            ),
        }
        r
    }
}

#[async_trait]
impl Cpi for LoggedCpi {
    async fn info(&self) -> CpiResult<CpiInfo> {
        self.logged("info", String::new(), self.inner.info()).await
    }
    async fn create_stemcell(&self, spec: &StemcellSpec) -> CpiResult<StemcellCid> {
        let args = format!("{}/{}", spec.name, spec.version);
        self.logged("create_stemcell", args, self.inner.create_stemcell(spec))
            .await
    }
    async fn delete_stemcell(&self, cid: &StemcellCid) -> CpiResult<()> {
        self.logged(
            "delete_stemcell",
            cid.to_string(),
            self.inner.delete_stemcell(cid),
        )
        .await
    }
    async fn create_vm(&self, req: &CreateVmRequest) -> CpiResult<VmCid> {
        let args = format!("agent {}, stemcell {}", req.agent_id, req.stemcell);
        self.logged("create_vm", args, self.inner.create_vm(req))
            .await
    }
    async fn delete_vm(&self, cid: &VmCid) -> CpiResult<()> {
        self.logged("delete_vm", cid.to_string(), self.inner.delete_vm(cid))
            .await
    }
    async fn has_vm(&self, cid: &VmCid) -> CpiResult<bool> {
        self.logged("has_vm", cid.to_string(), self.inner.has_vm(cid))
            .await
    }
    async fn reboot_vm(&self, cid: &VmCid) -> CpiResult<()> {
        self.logged("reboot_vm", cid.to_string(), self.inner.reboot_vm(cid))
            .await
    }
    async fn set_vm_metadata(&self, cid: &VmCid, metadata: &Metadata) -> CpiResult<()> {
        self.logged(
            "set_vm_metadata",
            cid.to_string(),
            self.inner.set_vm_metadata(cid, metadata),
        )
        .await
    }
    async fn find_vms(&self, filter: &Metadata) -> CpiResult<Vec<(VmCid, Metadata)>> {
        let r = self
            .logged("find_vms", crate::describe_filter(filter), async {
                self.inner.find_vms(filter).await.map(Found)
            })
            .await?;
        Ok(r.0)
    }
    async fn create_disk(&self, req: &CreateDiskRequest) -> CpiResult<DiskCid> {
        let args = format!("{} MB", req.size_mb);
        self.logged("create_disk", args, self.inner.create_disk(req))
            .await
    }
    async fn delete_disk(&self, cid: &DiskCid) -> CpiResult<()> {
        self.logged("delete_disk", cid.to_string(), self.inner.delete_disk(cid))
            .await
    }
    async fn attach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<DiskHint> {
        self.logged(
            "attach_disk",
            format!("{vm}, {disk}"),
            self.inner.attach_disk(vm, disk),
        )
        .await
    }
    async fn detach_disk(&self, vm: &VmCid, disk: &DiskCid) -> CpiResult<()> {
        self.logged(
            "detach_disk",
            format!("{vm}, {disk}"),
            self.inner.detach_disk(vm, disk),
        )
        .await
    }
    async fn has_disk(&self, cid: &DiskCid) -> CpiResult<bool> {
        self.logged("has_disk", cid.to_string(), self.inner.has_disk(cid))
            .await
    }
    async fn get_disks(&self, vm: &VmCid) -> CpiResult<Vec<DiskCid>> {
        self.logged("get_disks", vm.to_string(), self.inner.get_disks(vm))
            .await
    }
    async fn resize_disk(&self, cid: &DiskCid, new_size_mb: u64) -> CpiResult<()> {
        self.logged(
            "resize_disk",
            format!("{cid}, {new_size_mb} MB"),
            self.inner.resize_disk(cid, new_size_mb),
        )
        .await
    }
    async fn set_disk_metadata(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<()> {
        self.logged(
            "set_disk_metadata",
            cid.to_string(),
            self.inner.set_disk_metadata(cid, metadata),
        )
        .await
    }
    async fn find_disks(&self, filter: &Metadata) -> CpiResult<Vec<(DiskCid, Metadata)>> {
        let r = self
            .logged("find_disks", crate::describe_filter(filter), async {
                self.inner.find_disks(filter).await.map(Found)
            })
            .await?;
        Ok(r.0)
    }
    async fn snapshot_disk(&self, cid: &DiskCid, metadata: &Metadata) -> CpiResult<SnapshotCid> {
        self.logged(
            "snapshot_disk",
            cid.to_string(),
            self.inner.snapshot_disk(cid, metadata),
        )
        .await
    }
    async fn delete_snapshot(&self, cid: &SnapshotCid) -> CpiResult<()> {
        self.logged(
            "delete_snapshot",
            cid.to_string(),
            self.inner.delete_snapshot(cid),
        )
        .await
    }
    fn listing_caveat(&self) -> Option<String> {
        self.inner.listing_caveat()
    }
    async fn calculate_vm_cloud_properties(
        &self,
        vm_resources: &serde_json::Value,
    ) -> CpiResult<serde_json::Value> {
        self.logged(
            "calculate_vm_cloud_properties",
            String::new(),
            self.inner.calculate_vm_cloud_properties(vm_resources),
        )
        .await
    }
    async fn update_disk(
        &self,
        cid: &DiskCid,
        new_size_mb: u64,
        cloud_properties: &serde_json::Value,
    ) -> CpiResult<()> {
        self.logged(
            "update_disk",
            format!("{cid}, {new_size_mb} MB"),
            self.inner.update_disk(cid, new_size_mb, cloud_properties),
        )
        .await
    }
}

/// Found resources, logged by cid only (their metadata may hold anything).
struct Found<C>(Vec<(C, Metadata)>);

impl<C: std::fmt::Display> std::fmt::Debug for Found<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cids: Vec<String> = self.0.iter().map(|(c, _)| c.to_string()).collect();
        write!(f, "[{}]", cids.join(", "))
    }
}

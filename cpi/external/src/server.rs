//! Serving a [`Cpi`] as an external CPI: one request read, dispatched to
//! the backend, one response written, so a BOSH director (or bosun's own
//! [`crate::ExternalCpi`]) can use bosun's backends. v1 and v2 answers
//! follow the request's `api_version`.
//!
//! It must not print anything but the response on stdout (the caller's
//! logs go to stderr), nor echo request bodies into errors or logs.

use serde_json::{json, Value};

use bosun_cpi::{
    Cpi, CpiError, CreateDiskRequest, CreateVmRequest, DiskCid, Metadata, SnapshotCid, StemcellCid,
    VmCid,
};

use crate::wire::{self, error_type, Request, Response, WireError, API_VERSION};

/// Answers one request (its raw bytes); never fails: every problem is an
/// error response.
pub async fn serve(cpi: &dyn Cpi, request: &[u8]) -> Response {
    let request: Request = match serde_json::from_slice(request) {
        Ok(r) => r,
        Err(e) => return failure(error_type::CPI_ERROR, format!("invalid request: {e}")),
    };
    let version = request.api_version.unwrap_or(1).min(API_VERSION);
    match dispatch(cpi, &request.method, &request.arguments, version).await {
        Ok(result) => Response {
            result,
            error: None,
            log: String::new(),
        },
        Err(Failure::Cpi(e)) => Response {
            result: Value::Null,
            error: Some(WireError::from_cpi_error(&e)),
            log: String::new(),
        },
        Err(Failure::Args(msg)) => failure(
            error_type::CPI_ERROR,
            format!("{}: invalid arguments: {msg}", request.method),
        ),
        Err(Failure::Unknown) => failure(
            error_type::NOT_IMPLEMENTED,
            format!("method '{}' is not implemented", request.method),
        ),
    }
}

fn failure(kind: &str, message: String) -> Response {
    Response {
        result: Value::Null,
        error: Some(WireError {
            kind: kind.to_string(),
            message,
            ok_to_retry: false,
        }),
        log: String::new(),
    }
}

enum Failure {
    Cpi(CpiError),
    Args(String),
    Unknown,
}

impl From<CpiError> for Failure {
    fn from(e: CpiError) -> Self {
        Failure::Cpi(e)
    }
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Args(e)
    }
}

fn u64_arg(args: &[Value], i: usize, what: &str) -> Result<u64, String> {
    args.get(i)
        .and_then(Value::as_u64)
        .ok_or_else(|| format!("argument {i} ({what}) must be a non-negative integer"))
}

async fn dispatch(
    cpi: &dyn Cpi,
    method: &str,
    args: &[Value],
    version: u32,
) -> Result<Value, Failure> {
    let vm = |i: usize| wire::string_arg(args, i, "vm cid").map(VmCid);
    let disk = |i: usize| wire::string_arg(args, i, "disk cid").map(DiskCid);
    let null = |()| Value::Null;
    Ok(match method {
        "info" => {
            let info = cpi.info().await?;
            json!({
                "api_version": info.api_version.min(API_VERSION),
                "stemcell_formats": info.stemcell_formats,
            })
        }
        "create_stemcell" => {
            let image = wire::string_arg(args, 0, "image path")?;
            let props = args.get(1).cloned().unwrap_or(Value::Null);
            let spec = wire::stemcell_from_wire(&image, &props);
            json!(cpi.create_stemcell(&spec).await?.0)
        }
        "delete_stemcell" => {
            let cid = StemcellCid(wire::string_arg(args, 0, "stemcell cid")?);
            cpi.delete_stemcell(&cid).await.map(null)?
        }
        "create_vm" => {
            let agent_id = wire::string_arg(args, 0, "agent id")?;
            let stemcell = StemcellCid(wire::string_arg(args, 1, "stemcell cid")?);
            let cloud_properties = args.get(2).cloned().unwrap_or(json!({}));
            let networks_arg = args.get(3).cloned().unwrap_or(json!({}));
            let networks = wire::networks_from_bosh(&networks_arg)?;
            let disk_cids = wire::cids_from_wire(args.get(4).unwrap_or(&Value::Null))?
                .into_iter()
                .map(DiskCid)
                .collect();
            let env = args.get(5).unwrap_or(&Value::Null);
            let (settings, metadata) = wire::settings_from_bosh(&agent_id, networks.clone(), env)?;
            let req = CreateVmRequest {
                agent_id,
                stemcell,
                cloud_properties,
                networks,
                disk_cids,
                settings,
                metadata,
            };
            let cid = cpi.create_vm(&req).await?;
            if version >= 2 {
                json!([cid.0, networks_arg])
            } else {
                json!(cid.0)
            }
        }
        "delete_vm" => cpi.delete_vm(&vm(0)?).await.map(null)?,
        "has_vm" => json!(cpi.has_vm(&vm(0)?).await?),
        "reboot_vm" => cpi.reboot_vm(&vm(0)?).await.map(null)?,
        "set_vm_metadata" => {
            let m: Metadata = wire::metadata_arg(args, 1)?;
            cpi.set_vm_metadata(&vm(0)?, &m).await.map(null)?
        }
        "create_disk" => {
            let size_mb = u64_arg(args, 0, "size")?;
            let cloud_properties = args.get(1).cloned().unwrap_or(json!({}));
            let vm_locality = match args.get(2) {
                None | Some(Value::Null) => None,
                Some(_) => Some(vm(2)?),
            };
            let req = CreateDiskRequest {
                size_mb,
                cloud_properties,
                vm_locality,
                metadata: Metadata::new(),
            };
            json!(cpi.create_disk(&req).await?.0)
        }
        "delete_disk" => cpi.delete_disk(&disk(0)?).await.map(null)?,
        "attach_disk" => {
            let hint = cpi.attach_disk(&vm(0)?, &disk(1)?).await?;
            if version >= 2 {
                json!(hint.path)
            } else {
                Value::Null
            }
        }
        "detach_disk" => cpi.detach_disk(&vm(0)?, &disk(1)?).await.map(null)?,
        "has_disk" => json!(cpi.has_disk(&disk(0)?).await?),
        "get_disks" => {
            let disks = cpi.get_disks(&vm(0)?).await?;
            json!(disks.into_iter().map(|d| d.0).collect::<Vec<_>>())
        }
        "resize_disk" => {
            let size = u64_arg(args, 1, "new size")?;
            cpi.resize_disk(&disk(0)?, size).await.map(null)?
        }
        "update_disk" => {
            let size = u64_arg(args, 1, "new size")?;
            let props = args.get(2).cloned().unwrap_or(json!({}));
            cpi.update_disk(&disk(0)?, size, &props).await.map(null)?
        }
        "set_disk_metadata" => {
            let m = wire::metadata_arg(args, 1)?;
            cpi.set_disk_metadata(&disk(0)?, &m).await.map(null)?
        }
        "snapshot_disk" => {
            let m = wire::metadata_arg(args, 1)?;
            json!(cpi.snapshot_disk(&disk(0)?, &m).await?.0)
        }
        "delete_snapshot" => {
            let cid = SnapshotCid(wire::string_arg(args, 0, "snapshot cid")?);
            cpi.delete_snapshot(&cid).await.map(null)?
        }
        "calculate_vm_cloud_properties" => {
            let resources = args.first().cloned().unwrap_or(Value::Null);
            cpi.calculate_vm_cloud_properties(&resources).await?
        }
        _ => return Err(Failure::Unknown),
    })
}

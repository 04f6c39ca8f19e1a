//! `bosun cpi --backend local|docker|aws --config FILE`: one of bosun's CPI
//! backends as an external CPI. Reads one request on stdin, answers it on
//! stdout (BOSH's protocol, via `bosun_cpi_external::serve`), and exits;
//! VMs outlive the call (local VMs' agents are detached, containers and
//! instances are the cloud's). A configuration problem is an error response
//! too, so the caller sees why.
//!
//! It must not write anything but the response to stdout: logs go to
//! stderr, which the calling director keeps in its task's CPI log.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use bosun_cpi::Cpi;
use bosun_cpi_external::wire::{error_type, Response, WireError};

use crate::cli::CpiBackend;
use crate::wiring;

/// Answers one request; exits 0 when the backend answered, 1 when it could
/// not be set up (the response says why in both cases).
pub async fn serve(backend: CpiBackend, config: &Path) -> Result<i32> {
    let mut request = Vec::new();
    std::io::stdin()
        .read_to_end(&mut request)
        .context("reading the CPI request from stdin")?;
    let (response, code) = match open(backend, config).await {
        Ok(cpi) => (bosun_cpi_external::serve(cpi.as_ref(), &request).await, 0),
        Err(e) => {
            eprintln!("bosun cpi: {e:#}");
            let error = WireError {
                kind: error_type::CLOUD_ERROR.into(),
                message: format!("{e:#}"),
                ok_to_retry: false,
            };
            let response = Response {
                error: Some(error),
                ..Response::default()
            };
            (response, 1)
        }
    };
    let mut out = serde_json::to_vec(&response).context("encoding the CPI response")?;
    out.push(b'\n');
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&out)
        .and_then(|()| stdout.flush())
        .context("writing the CPI response to stdout")?;
    Ok(code)
}

/// The backend, configured from the file.
async fn open(backend: CpiBackend, path: &Path) -> Result<Arc<dyn Cpi>> {
    let what = || {
        format!(
            "configuring the {backend:?} backend from {}",
            path.display()
        )
    };
    let text = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let config: Value = serde_json::from_slice(&text)
        .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let Some(fields) = config.as_object() else {
        bail!("{}: expected a JSON object", path.display());
    };
    Ok(match backend {
        CpiBackend::Local => {
            known_keys(path, fields, &["root"])?;
            let root = root(path, &config)?;
            Arc::new(wiring::local_cpi(root).with_context(what)?)
        }
        CpiBackend::Docker => {
            known_keys(path, fields, &["root", "socket", "prefix"])?;
            let root = root(path, &config)?;
            let socket = optional_str(path, &config, "socket")?;
            let prefix = optional_str(path, &config, "prefix")?;
            let docker = wiring::docker_cpi(root, socket, prefix.as_deref().unwrap_or("bosun"))
                .await
                .with_context(what)?;
            Arc::new(docker)
        }
        CpiBackend::Aws => Arc::new(wiring::aws_cpi("aws", &config).await.with_context(what)?),
    })
}

fn known_keys(path: &Path, fields: &serde_json::Map<String, Value>, known: &[&str]) -> Result<()> {
    if let Some(k) = fields.keys().find(|k| !known.contains(&k.as_str())) {
        bail!(
            "{}: unknown key '{k}' (known: {})",
            path.display(),
            known.join(", ")
        );
    }
    Ok(())
}

fn optional_str(path: &Path, config: &Value, key: &str) -> Result<Option<String>> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("{}: {key} must be a string, got {other}", path.display()),
    }
}

/// `root`: the directory for the backend's state; a relative one is
/// relative to the config file's directory.
fn root(path: &Path, config: &Value) -> Result<PathBuf> {
    let Some(root) = optional_str(path, config, "root")? else {
        bail!(
            "{}: root is missing (the directory where the backend keeps its state)",
            path.display()
        );
    };
    let root = PathBuf::from(root);
    if root.is_absolute() {
        return Ok(root);
    }
    let base =
        std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    Ok(base.parent().unwrap_or(Path::new("/")).join(root))
}

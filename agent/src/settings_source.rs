//! Where the agent finds its settings, as BOSH's CPIs deliver them:
//!
//! - a file (`/var/vcap/bosh/settings.json` from bosun's CPIs, or BOSH's
//!   agent env `/var/vcap/bosh/warden-cpi-agent-env.json` from the warden
//!   and docker CPIs, which write it after the container started: the agent
//!   waits for it);
//! - `config-drive:DIR`: a mounted OpenStack config drive, whose
//!   `ec2/latest/user-data` (or `openstack/latest/user_data`) holds the
//!   settings;
//! - `http://HOST[:PORT]`: an EC2-style metadata service, whose
//!   `/latest/user-data` holds them (IMDSv2's token first, when offered).
//!
//! Either format is read: bosun's settings or BOSH's agent env with bosun's
//! keys under `env.bosun`; user-data may be base64. A settings file that
//! others could read is made 0600 (it holds the agent's private host key).
//!
//! It must not interpret the settings beyond parsing them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine;
use bosun_cpi::AgentSettings;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How often an absent source is looked at again.
const POLL: Duration = Duration::from_millis(250);
/// How often waiting for it is logged.
const WAIT_LOG: Duration = Duration::from_secs(60);
/// How long unusable settings are read again before the agent gives up (a
/// CPI extracting the file with tar is seen half-written for a moment).
const SETTLE: Duration = Duration::from_secs(5);
/// One metadata request's limit.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the settings come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettingsSource {
    File(PathBuf),
    ConfigDrive(PathBuf),
    Metadata(String),
}

/// Why settings could not be read (yet).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Not there yet: worth waiting for.
    #[error("{0}")]
    Absent(String),
    /// There, but unusable.
    #[error("{0}")]
    Invalid(String),
}

impl std::fmt::Display for SettingsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingsSource::File(p) => write!(f, "{}", p.display()),
            SettingsSource::ConfigDrive(p) => write!(f, "config-drive:{}", p.display()),
            SettingsSource::Metadata(u) => f.write_str(u),
        }
    }
}

impl SettingsSource {
    /// `config-drive:DIR`, `http://...`, or a file path.
    pub fn parse(spec: &str) -> SettingsSource {
        if let Some(dir) = spec.strip_prefix("config-drive:") {
            SettingsSource::ConfigDrive(PathBuf::from(dir))
        } else if spec.starts_with("http://") {
            SettingsSource::Metadata(spec.trim_end_matches('/').to_string())
        } else {
            SettingsSource::File(PathBuf::from(spec))
        }
    }

    /// The settings, once: `Absent` when the source has none yet (saying
    /// where it looked); `Invalid` says what is wrong, and the caller where.
    pub async fn read(&self) -> Result<AgentSettings, SourceError> {
        let text = match self {
            SettingsSource::File(path) => read_file(path)?,
            SettingsSource::ConfigDrive(dir) => read_config_drive(dir)?,
            SettingsSource::Metadata(url) => read_metadata(url).await?,
        };
        parse(&text).map_err(SourceError::Invalid)
    }

    /// The settings, waiting while the source has none yet (a CPI may
    /// write them after the VM started).
    pub async fn wait(&self) -> Result<AgentSettings, SourceError> {
        let mut logged: Option<Instant> = None;
        let mut invalid_since: Option<Instant> = None;
        loop {
            match self.read().await {
                Err(SourceError::Absent(why)) => {
                    invalid_since = None;
                    if logged.is_none_or(|t| t.elapsed() >= WAIT_LOG) {
                        tracing::info!("waiting for the agent's settings: {why}");
                        logged = Some(Instant::now());
                    }
                }
                Err(SourceError::Invalid(why))
                    if invalid_since.get_or_insert_with(Instant::now).elapsed() < SETTLE =>
                {
                    tracing::debug!("the settings at {self} are not usable yet: {why}");
                }
                other => return other,
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// bosun's settings or BOSH's agent env, as JSON or base64 of JSON.
fn parse(text: &str) -> Result<AgentSettings, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        return bosun_cpi::agent_env::parse_settings(trimmed);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(trimmed))
        .map_err(|_| "neither JSON nor base64 of JSON".to_string())?;
    let json = String::from_utf8(bytes).map_err(|_| "base64 of something not UTF-8".to_string())?;
    bosun_cpi::agent_env::parse_settings(&json)
}

fn read_file(path: &Path) -> Result<String, SourceError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SourceError::Absent(format!(
                "{} does not exist yet",
                path.display()
            )))
        }
        Err(e) => return Err(SourceError::Invalid(format!("reading it: {e}"))),
    };
    // A CPI may write it 0640 or 0644; it holds the agent's private key.
    match std::fs::metadata(path) {
        Ok(m) if m.permissions().mode() & 0o077 != 0 => {
            if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                tracing::warn!(
                    "{} is readable by others and cannot be made 0600: {e}",
                    path.display()
                );
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("checking the mode of {}: {e}", path.display()),
    }
    if text.trim().is_empty() {
        // Being written: the CPI truncates, then fills it.
        return Err(SourceError::Absent(format!("{} is empty", path.display())));
    }
    Ok(text)
}

/// The user-data file of a config drive (BOSH's stemcells read
/// `ec2/latest/user-data`; OpenStack's own is `openstack/latest/user_data`).
fn read_config_drive(dir: &Path) -> Result<String, SourceError> {
    for rel in ["ec2/latest/user-data", "openstack/latest/user_data"] {
        let path = dir.join(rel);
        if path.is_file() {
            return std::fs::read_to_string(&path)
                .map_err(|e| SourceError::Invalid(format!("reading {rel}: {e}")));
        }
    }
    Err(SourceError::Absent(format!(
        "config drive {} has no ec2/latest/user-data or openstack/latest/user_data (not mounted yet?)",
        dir.display()
    )))
}

/// user-data from an EC2-style metadata service: an IMDSv2 token when the
/// service gives one, then `GET /latest/user-data`.
async fn read_metadata(base: &str) -> Result<String, SourceError> {
    let token = match http(
        base,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
    )
    .await
    {
        Ok((200, body)) => Some(body.trim().to_string()),
        Ok(_) => None,
        Err(e) => return Err(SourceError::Absent(format!("{base}: {e}"))),
    };
    let headers: Vec<(&str, &str)> = token
        .as_deref()
        .map(|t| vec![("X-aws-ec2-metadata-token", t)])
        .unwrap_or_default();
    match http(base, "GET", "/latest/user-data", &headers).await {
        Ok((200, body)) if !body.trim().is_empty() => Ok(body),
        Ok((200, _)) => Err(SourceError::Absent(format!(
            "{base}/latest/user-data is empty"
        ))),
        Ok((404, _)) => Err(SourceError::Absent(format!("{base}/latest/user-data: 404"))),
        Ok((code, _)) => Err(SourceError::Invalid(format!(
            "/latest/user-data answered HTTP {code}"
        ))),
        Err(e) => Err(SourceError::Absent(format!("{base}: {e}"))),
    }
}

/// One HTTP/1.0 request to `http://host[:port]`; the status and the body.
async fn http(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let host = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("{base} is not an http:// URL"))?;
    let addr = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connecting to {addr}: {e}"))?;
        let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("Content-Length: 0\r\n\r\n");
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| format!("writing to {addr}: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("reading from {addr}: {e}"))?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{addr} did not answer within {} s", HTTP_TIMEOUT.as_secs()))??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("{addr} answered something that is not HTTP"))?;
    Ok((code, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bosh_env() -> serde_json::Value {
        json!({
            "agent_id": "agent-1",
            "vm": {"name": "c-1", "id": "c-1"},
            "mbus": "nats://x",
            "ntp": [],
            "networks": {"default": {"type": "manual", "ip": "10.0.0.5", "netmask": "255.255.255.0",
                         "gateway": "10.0.0.1", "default": ["dns", "gateway"], "preconfigured": true}},
            "disks": {"system": "", "ephemeral": null, "persistent": {"vol-1": "/warden-cpi-dev/vol-1"}},
            "env": {"bosun": {"director_public_key": "ssh-ed25519 D", "host_private_key": "H"}}
        })
    }

    #[tokio::test]
    async fn a_file_is_waited_for_read_in_either_format_and_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warden-cpi-agent-env.json");
        let source = SettingsSource::parse(path.to_str().unwrap());
        assert!(matches!(source.read().await, Err(SourceError::Absent(_))));
        let writer = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                std::fs::write(&path, bosh_env().to_string()).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            })
        };
        let s = source.wait().await.unwrap();
        writer.await.unwrap();
        assert_eq!(s.agent_id, "agent-1");
        assert_eq!(s.networks["default"].range, "10.0.0.0/24");
        assert_eq!(s.disks["vol-1"]["path"], "/warden-cpi-dev/vol-1");
        // Read again (the CPI rewrote it 0640): private again.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        source.read().await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Half-written, then whole: waited for; garbage for good: an error.
        std::fs::write(&path, "{").unwrap();
        let e = source.read().await.unwrap_err();
        assert!(matches!(e, SourceError::Invalid(_)), "{e}");
        assert!(e.to_string().contains("invalid JSON"), "{e}");
        let finisher = {
            let path = path.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                std::fs::write(&path, bosh_env().to_string()).unwrap();
            })
        };
        assert_eq!(source.wait().await.unwrap().agent_id, "agent-1");
        finisher.await.unwrap();
        std::fs::write(&path, "{").unwrap();
        let started = Instant::now();
        assert!(source.wait().await.is_err());
        assert!(started.elapsed() >= SETTLE);
    }

    #[tokio::test]
    async fn a_config_drive_holds_the_settings_in_its_user_data() {
        let dir = tempfile::tempdir().unwrap();
        let source = SettingsSource::parse(&format!("config-drive:{}", dir.path().display()));
        assert!(matches!(source.read().await, Err(SourceError::Absent(_))));
        std::fs::create_dir_all(dir.path().join("ec2/latest")).unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(bosh_env().to_string());
        std::fs::write(dir.path().join("ec2/latest/user-data"), b64).unwrap();
        assert_eq!(source.read().await.unwrap().agent_id, "agent-1");
    }

    /// A metadata service on loopback that wants an IMDSv2 token.
    async fn metadata_service(user_data: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let (code, body) = if req.starts_with("PUT /latest/api/token") {
                    (200, "tok-1".to_string())
                } else if req.starts_with("GET /latest/user-data")
                    && req.contains("X-aws-ec2-metadata-token: tok-1")
                {
                    (200, user_data.clone())
                } else {
                    (401, String::new())
                };
                let resp = format!(
                    "HTTP/1.0 {code} X\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                s.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_metadata_service_gives_the_settings_as_user_data() {
        let url = metadata_service(bosh_env().to_string()).await;
        let source = SettingsSource::parse(&url);
        assert_eq!(source, SettingsSource::Metadata(url.clone()));
        assert_eq!(source.read().await.unwrap().agent_id, "agent-1");
        // Nobody there: worth waiting for.
        let gone = SettingsSource::parse("http://127.0.0.1:1");
        assert!(matches!(gone.read().await, Err(SourceError::Absent(_))));
    }
}

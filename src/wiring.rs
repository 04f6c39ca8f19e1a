//! Wiring: the CPI backends a command's director gets (local always, those
//! the stored cloud-config declares — bosun's own or external CPI
//! processes —, Docker when wanted), the release blobstore providers it can
//! open (`local`, `s3`), the execution options from the environment, and
//! the default state and cache directories. It must not run director operations or print anything but
//! warnings.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use bosun_cpi::logged::LoggedCpi;
use bosun_cpi::Cpi;
use bosun_cpi_aws::{AwsCpi, AwsCpiConfig};
use bosun_cpi_docker::{DockerCpi, DockerCpiConfig};
use bosun_cpi_external::{ExternalCpi, ExternalCpiConfig};
use bosun_cpi_local::{LocalCpi, LocalCpiConfig};
use bosun_director::model::cloud_config::{
    parse_cloud_config, CloudConfig, CpiConfig, ExternalExec,
};
use bosun_director::Director;
use bosun_director::Store;
use bosun_director::{Cpis, ExecOptions};

/// What a command needs of the wiring.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wants {
    /// The command offers Docker a stemcell: connect to it when it is reachable.
    pub try_docker: bool,
    /// The command prints or replaces the stored cloud-config, so an invalid
    /// one is only warned about (it must not lock the operator out of fixing it).
    pub invalid_cloud_config_ok: bool,
}

/// The CPIs: local always; those the cloud-config declares under `cpis`;
/// Docker when the cloud-config names it (then it must be reachable), when
/// stemcells were uploaded to it, or when the command offers it a stemcell.
pub async fn director(store: Arc<Store>, wants: Wants) -> Result<Director> {
    let local = local_cpi(store.dir().join("local-cpi"))?;
    let mut cpis = Cpis::new();
    cpis.insert("local", logged("local", Arc::new(local)));
    let cc = stored_cloud_config(&store, wants.invalid_cloud_config_ok)?;
    let cloud_wants_docker = cc
        .as_ref()
        .is_some_and(|cc| cc.azs.iter().any(|a| a.cpi == "docker"));
    // CPIs the cloud-config declares under `cpis`.
    for c in cc.iter().flat_map(|cc| cc.cpis.iter()) {
        let cpi = declared_cpi(&store, c).await?;
        cpis.insert(&c.name, logged(&c.name, cpi));
    }
    let has_docker_stemcells = store.stemcells()?.iter().any(|s| s.cpi == "docker");
    if wants.try_docker || cloud_wants_docker || has_docker_stemcells {
        match docker_cpi(store.dir().join("docker-cpi"), None, "bosun").await {
            Ok(docker) => cpis.insert("docker", logged("docker", Arc::new(docker))),
            Err(e) if cloud_wants_docker => {
                return Err(anyhow::Error::new(e).context("the docker CPI is needed"))
            }
            Err(e) => eprintln!(
                "warning: the docker CPI is unavailable: {:#}",
                anyhow::Error::new(e)
            ),
        }
    }
    let opts = exec_options()?;
    Ok(Director {
        store,
        cpis,
        opts,
        blobstores: Arc::new(bosun_blobstore_s3::WithS3),
    })
}

/// The cloud-config in force, parsed. An invalid one is an error, or with
/// `invalid_ok` a warning (and no cloud-config).
fn stored_cloud_config(store: &Store, invalid_ok: bool) -> Result<Option<CloudConfig>> {
    let Some((id, text)) = store.cloud_config()? else {
        return Ok(None);
    };
    let parsed = parse_cloud_config(&format!("cloud-config #{id}"), &text).with_context(|| {
        format!(
            "the stored cloud-config #{id} is invalid \
             (upload a valid one with `bosun update-cloud-config`)"
        )
    });
    match parsed {
        Ok(cc) => Ok(Some(cc)),
        Err(e) if invalid_ok => {
            eprintln!("warning: {e:#}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A CPI the cloud-config declares under `cpis`, started.
async fn declared_cpi(store: &Store, c: &CpiConfig) -> Result<Arc<dyn Cpi>> {
    if let Some(exec) = &c.external {
        return external_cpi(store, c, exec);
    }
    match c.kind.as_str() {
        "aws" => Ok(Arc::new(aws_cpi(&c.name, &c.properties).await?)),
        "docker" => {
            let root = store.dir().join(format!("docker-cpi-{}", c.name));
            let socket = c.properties["socket"].as_str().map(str::to_string);
            let prefix = c.properties["prefix"].as_str().unwrap_or("bosun");
            let docker = docker_cpi(root, socket, prefix)
                .await
                .with_context(|| format!("starting CPI '{}' (type docker)", c.name))?;
            Ok(Arc::new(docker))
        }
        other => bail!("CPI '{}' has an unknown type '{other}'", c.name),
    }
}

/// The local CPI keeping its VMs under `root`, starting this executable's
/// `agent` in each.
pub fn local_cpi(root: PathBuf) -> Result<LocalCpi> {
    let exe = std::env::current_exe().context("finding the bosun executable")?;
    Ok(LocalCpi::new(LocalCpiConfig {
        root,
        agent_command: vec![exe.display().to_string(), "agent".into()],
    })?)
}

/// The Docker CPI, connected.
pub async fn docker_cpi(
    root: PathBuf,
    socket: Option<String>,
    prefix: &str,
) -> Result<DockerCpi, bosun_cpi_docker::DockerCpiError> {
    DockerCpi::connect(DockerCpiConfig {
        root,
        socket,
        prefix: prefix.to_string(),
    })
    .await
}

/// The AWS CPI configured from `properties`, started.
pub async fn aws_cpi(name: &str, properties: &serde_json::Value) -> Result<AwsCpi> {
    let config = AwsCpiConfig::from_properties(properties)
        .with_context(|| format!("configuring CPI '{name}' (type aws)"))?;
    AwsCpi::new(config)
        .await
        .with_context(|| format!("starting CPI '{name}' (type aws)"))
}

/// An external CPI: its process, its config file written under
/// `<state>/external-cpi/<name>/`, and that directory for its records.
fn external_cpi(store: &Store, c: &CpiConfig, exec: &ExternalExec) -> Result<Arc<dyn Cpi>> {
    let root = store.dir().join("external-cpi").join(&c.name);
    // `bosun` is this executable, as a VM's agent is: director and CPI
    // then never disagree on the protocol.
    let exec_path = if exec.exec_path == "bosun" {
        std::env::current_exe().context("finding the bosun executable")?
    } else {
        PathBuf::from(&exec.exec_path)
    };
    let mut config = ExternalCpiConfig::new(&c.name, exec_path, root);
    config.args = exec.args.clone();
    config.properties = c.properties.clone();
    config.director_uuid = store.director_id().to_string();
    if let Some(secs) = exec.timeout_secs {
        config.timeout = Duration::from_secs(secs);
    }
    if let Some(file) = &exec.config {
        config = config
            .with_config_file(file, &exec.config_arg)
            .with_context(|| format!("configuring CPI '{}' (type {})", c.name, c.kind))?;
    }
    Ok(Arc::new(ExternalCpi::new(config)))
}

/// Execution options: defaults, and `BOSUN_AGENT_TIMEOUT` (whole seconds)
/// when set.
fn exec_options() -> Result<ExecOptions> {
    let mut opts = ExecOptions::default();
    if let Some(secs) = std::env::var_os("BOSUN_AGENT_TIMEOUT") {
        opts.agent_timeout = agent_timeout(&secs.to_string_lossy())?;
    }
    Ok(opts)
}

fn agent_timeout(secs: &str) -> Result<Duration> {
    let secs = secs
        .parse::<u64>()
        .ok()
        .with_context(|| format!("BOSUN_AGENT_TIMEOUT={secs}: expected whole seconds"))?;
    Ok(Duration::from_secs(secs))
}

/// A CPI whose every call goes to the running task's CPI log.
pub fn logged(name: &str, cpi: Arc<dyn Cpi>) -> Arc<dyn Cpi> {
    Arc::new(LoggedCpi::new(name, cpi))
}

/// Where the director keeps its state unless told: `$XDG_DATA_HOME/bosun`,
/// `~/.local/share/bosun`, or `.bosun-state`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("bosun");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/bosun");
    }
    PathBuf::from(".bosun-state")
}

/// Where downloads and built root filesystems are cached:
/// `$XDG_CACHE_HOME/bosun`, `~/.cache/bosun`, or a temporary directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("bosun");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".cache/bosun");
    }
    std::env::temp_dir().join("bosun-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_timeout_is_whole_seconds() {
        assert_eq!(agent_timeout("30").unwrap(), Duration::from_secs(30));
        assert_eq!(agent_timeout("0").unwrap(), Duration::ZERO);
        let e = agent_timeout("3s").unwrap_err();
        assert_eq!(
            e.to_string(),
            "BOSUN_AGENT_TIMEOUT=3s: expected whole seconds"
        );
    }

    #[test]
    fn an_invalid_stored_cloud_config_is_an_error_that_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(stored_cloud_config(&store, false).unwrap().is_none());
        let id = store.save_cloud_config("azs: 3\n").unwrap();
        let e = stored_cloud_config(&store, false).unwrap_err();
        let chain = format!("{e:#}");
        let head = format!(
            "the stored cloud-config #{id} is invalid \
             (upload a valid one with `bosun update-cloud-config`): "
        );
        assert!(chain.starts_with(&head), "{chain}");
        assert!(chain.contains("problem"), "{chain}");
        // Commands that print or replace it only warn.
        assert!(stored_cloud_config(&store, true).unwrap().is_none());
    }
}

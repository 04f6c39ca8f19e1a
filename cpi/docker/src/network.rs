//! The Docker networks of VM networks: created on demand (a bridge with the
//! network's subnet and gateway, labelled as this CPI's), checked when they
//! exist, and removed once no container uses them.
//!
//! This module must not remove a network it did not create (one without
//! this CPI's `bosun.managed` and `bosun.cpi` labels).

use std::collections::{BTreeSet, HashMap};

use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{InspectNetworkOptions, ListContainersOptions};
use bosun_cpi::Metadata;

use crate::container::VmNetwork;
use crate::names::labels;
use crate::{
    docker_err, is_not_found, status_of, DockerCpi, DockerCpiError, Result, Target, LABEL_CPI,
    LABEL_MANAGED,
};

impl DockerCpi {
    /// Creates the Docker network of a VM network, or checks the existing one
    /// has the same subnet. Called with `net_lock` held.
    pub(crate) async fn ensure_network(&self, net: &VmNetwork, what: &str) -> Result<()> {
        // Another process creating the same network makes Docker answer 409
        // (its name) or 403 (its subnet's pool, reserved before the network
        // can be inspected): look again, a little later.
        const ATTEMPTS: usize = 20;
        for attempt in 0..ATTEMPTS {
            match self
                .docker
                .inspect_network(&net.docker_name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(existing) => {
                    let subnets: Vec<String> = existing
                        .ipam
                        .as_ref()
                        .and_then(|i| i.config.as_ref())
                        .map(|c| c.iter().filter_map(|c| c.subnet.clone()).collect())
                        .unwrap_or_default();
                    if let Some(want) = &net.subnet {
                        if !subnets.iter().any(|s| s == want) {
                            return Err(DockerCpiError::Conflict(format!(
                                "{what}: Docker network {} already exists with subnet {}, but network {} wants {want}; remove it or rename the network",
                                net.docker_name,
                                if subnets.is_empty() { "(none)".to_string() } else { subnets.join(", ") },
                                net.name
                            )));
                        }
                    }
                    return Ok(());
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    return Err(docker_err(
                        format!("{what}: inspecting Docker network {}", net.docker_name),
                        Target::None,
                    )(e))
                }
            }
            let mut l = labels(&self.prefix, &Metadata::new());
            l.insert(LABEL_MANAGED.into(), "true".into());
            l.insert("bosun.network".into(), net.name.clone());
            let request = NetworkCreateRequest {
                name: net.docker_name.clone(),
                driver: Some("bridge".into()),
                ipam: net.subnet.as_ref().map(|subnet| Ipam {
                    driver: Some("default".into()),
                    config: Some(vec![IpamConfig {
                        subnet: Some(subnet.clone()),
                        gateway: net.gateway.clone(),
                        ..Default::default()
                    }]),
                    options: None,
                }),
                labels: Some(l),
                ..Default::default()
            };
            match self.docker.create_network(request).await {
                Ok(_) => {
                    tracing::info!(network = %net.docker_name, subnet = ?net.subnet, "created Docker network");
                    return Ok(());
                }
                Err(e) if matches!(status_of(&e), Some(409 | 403)) && attempt + 1 < ATTEMPTS => {
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    continue;
                }
                Err(e) => {
                    return Err(docker_err(
                        format!(
                            "{what}: creating Docker network {} (subnet {}) for network {}",
                            net.docker_name,
                            net.subnet.as_deref().unwrap_or("assigned by Docker"),
                            net.name
                        ),
                        Target::None,
                    )(e))
                }
            }
        }
        Err(DockerCpiError::Conflict(format!(
            "{what}: Docker network {} keeps appearing and disappearing",
            net.docker_name
        )))
    }

    /// Removes the given Docker networks of this CPI that no container uses
    /// any more (errors are logged: a leftover network is harmless).
    pub(crate) async fn remove_unused_networks(&self, names: BTreeSet<String>) {
        let _net = self.net_lock.lock().await;
        for name in names {
            let network = match self
                .docker
                .inspect_network(&name, None::<InspectNetworkOptions>)
                .await
            {
                Ok(n) => n,
                Err(e) if is_not_found(&e) => continue,
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "inspecting Docker network");
                    continue;
                }
            };
            let ours = network.labels.as_ref().is_some_and(|l| {
                l.get(LABEL_MANAGED).map(String::as_str) == Some("true")
                    && l.get(LABEL_CPI) == Some(&self.prefix)
            });
            let attached = network.containers.as_ref().is_some_and(|c| !c.is_empty());
            if !ours || attached {
                continue;
            }
            // Stopped containers have no endpoint but still name the network.
            let options = ListContainersOptions {
                all: true,
                filters: Some(HashMap::from([("network".to_string(), vec![name.clone()])])),
                ..Default::default()
            };
            match self.docker.list_containers(Some(options)).await {
                Ok(c) if c.is_empty() => {}
                Ok(_) => continue,
                Err(e) => {
                    tracing::warn!(network = %name, error = %e, "listing containers of Docker network");
                    continue;
                }
            }
            match self.docker.remove_network(&name).await {
                Ok(()) => tracing::info!(network = %name, "removed Docker network"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => tracing::warn!(network = %name, error = %e, "removing Docker network"),
            }
        }
    }
}

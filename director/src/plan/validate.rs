//! Checking a manifest against a cloud-config: every az, network, vm type,
//! vm extension, disk type and stemcell the manifest names must exist, static
//! IPs must sit in their subnets and fit the instances, with problems at
//! `file:line: path`.
//!
//! Checks only: this module must not plan, allocate or touch the store.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use bosun_cpi::NetworkKind;

use crate::model::cloud_config::{
    dynamic_pool, is_static, ranges_text, subnet_for_az, CloudConfig, Network, Subnet,
};
use crate::model::manifest::{InstanceGroup, Manifest, NetworkRef, PersistentDisk};
use crate::model::problems::Problems;
use crate::model::yaml::unknown;

/// Cross-checks of a manifest against a cloud-config, every problem at once, pointing into the MANIFEST
/// (file/path/line from manifest.source): unknown az/vm_type/vm_extension/disk type/network;
/// static IP not inside any subnet of that network whose azs intersect the group's azs, or not in a
/// `static` range ("static IP 10.1.0.9 is outside the subnet's static ranges (127.77.0.2-127.77.0.100)");
/// same static IP used twice; a manual network used by a group must have a subnet in each of the group's azs;
/// number of static_ips, if any, must equal instances; a group's instances must fit in the
/// dynamic IPs of its manual networks and never be more than [`MAX_INSTANCES`]. These checks
/// come before anything is made per instance.
pub fn validate_manifest(manifest: &Manifest, cc: &CloudConfig) -> Result<(), Problems> {
    let src = &manifest.source;
    let mut problems = Problems::default();
    let mut push = |path: String, msg: String| problems.push(src.problem(path, msg));
    let names = Names::of(cc);
    // Static IP -> where it was first used.
    let mut used: BTreeMap<Ipv4Addr, String> = BTreeMap::new();

    for (gi, g) in manifest.instance_groups.iter().enumerate() {
        let gp = format!("instance_groups[{gi}]");
        check_group_names(cc, &names, g, &gp, &mut push);
        // Whether `instances` was found too many for a network.
        let mut too_many = false;
        for (ni, nr) in g.networks.iter().enumerate() {
            let np = format!("{gp}.networks[{ni}]");
            let Some(net) = cc.network(&nr.name) else {
                push(
                    format!("{np}.name"),
                    unknown("network", &nr.name, &names.networks),
                );
                continue;
            };
            too_many |= check_network(cc, g, &gp, &np, nr, net, &mut push);
            check_static_ips(g, &np, nr, net, &mut used, &mut push);
        }
        check_group_size(g, &gp, too_many, &mut push);
    }
    problems.into_result()
}

/// The names the cloud-config defines, for "unknown ..." messages.
struct Names<'c> {
    azs: Vec<&'c str>,
    vm_types: Vec<&'c str>,
    vm_extensions: Vec<&'c str>,
    disk_types: Vec<&'c str>,
    networks: Vec<&'c str>,
}

impl<'c> Names<'c> {
    fn of(cc: &'c CloudConfig) -> Self {
        Names {
            azs: cc.azs.iter().map(|a| a.name.as_str()).collect(),
            vm_types: cc.vm_types.iter().map(|a| a.name.as_str()).collect(),
            vm_extensions: cc.vm_extensions.iter().map(|a| a.name.as_str()).collect(),
            disk_types: cc.disk_types.iter().map(|a| a.name.as_str()).collect(),
            networks: cc.networks.iter().map(|a| a.name.as_str()).collect(),
        }
    }
}

/// Checks that the group's azs (present when the cloud-config has any), vm
/// type, vm extensions and disk type exist in the cloud-config.
fn check_group_names(
    cc: &CloudConfig,
    names: &Names,
    g: &InstanceGroup,
    gp: &str,
    push: &mut impl FnMut(String, String),
) {
    for (i, az) in g.azs.iter().enumerate() {
        if cc.az(az).is_none() {
            push(format!("{gp}.azs[{i}]"), unknown("az", az, &names.azs));
        }
    }
    if g.azs.is_empty() && !cc.azs.is_empty() {
        push(
            format!("{gp}.azs"),
            format!(
                "missing 'azs': the cloud-config defines azs ({})",
                names.azs.join(", ")
            ),
        );
    }
    if cc.vm_type(&g.vm_type).is_none() {
        push(
            format!("{gp}.vm_type"),
            unknown("vm type", &g.vm_type, &names.vm_types),
        );
    }
    for (i, e) in g.vm_extensions.iter().enumerate() {
        if cc.vm_extension(e).is_none() {
            push(
                format!("{gp}.vm_extensions[{i}]"),
                unknown("vm extension", e, &names.vm_extensions),
            );
        }
    }
    if let Some(PersistentDisk::Type(t)) = &g.persistent_disk {
        if cc.disk_type(t).is_none() {
            push(
                format!("{gp}.persistent_disk_type"),
                unknown("disk type", t, &names.disk_types),
            );
        }
    }
}

/// Checks one of the group's networks: one static IP per instance when it
/// has any; a manual network has a subnet in each az and room for the
/// instances' dynamic IPs; a dynamic one has no static IPs. Returns whether
/// the instances were found too many for the network.
fn check_network(
    cc: &CloudConfig,
    g: &InstanceGroup,
    gp: &str,
    np: &str,
    nr: &NetworkRef,
    net: &Network,
    push: &mut impl FnMut(String, String),
) -> bool {
    let mut too_many = false;
    if !nr.static_ips.is_empty() && nr.static_ips.len() != g.instances as usize {
        push(
            format!("{np}.static_ips"),
            format!(
                "{} static IPs for {} instances: give one per instance",
                nr.static_ips.len(),
                g.instances
            ),
        );
    }
    match net.kind {
        NetworkKind::Manual => {
            for az in &g.azs {
                if cc.az(az).is_some() && subnet_for_az(net, az).is_none() {
                    push(
                        format!("{np}.name"),
                        format!("network '{}' has no subnet in az '{az}'", net.name),
                    );
                }
            }
            if nr.static_ips.is_empty() {
                // Counting stops past MAX_INSTANCES: a /8 costs no more than a /24.
                let wanted = g.instances as usize;
                let limit = wanted.min(MAX_INSTANCES as usize + 1);
                let room = dynamic_room(net, &g.azs, limit);
                if room < limit {
                    too_many = true;
                    push(
                        format!("{gp}.instances"),
                        format!(
                            "{} instances but network '{}' can hold at most {room} dynamic IPs{}",
                            g.instances,
                            net.name,
                            if g.azs.is_empty() {
                                String::new()
                            } else {
                                format!(" in az {}", g.azs.join(", "))
                            }
                        ),
                    );
                }
            }
        }
        NetworkKind::Dynamic => {
            if !nr.static_ips.is_empty() {
                push(
                    format!("{np}.static_ips"),
                    format!(
                        "network '{}' is dynamic and cannot have static IPs",
                        net.name
                    ),
                );
            }
        }
        NetworkKind::Vip => {}
    }
    too_many
}

/// Checks the group's static IPs on one network: none used twice (`used`
/// records where each was first seen); on a manual network, each inside
/// the static ranges of a subnet that serves the group's azs.
fn check_static_ips(
    g: &InstanceGroup,
    np: &str,
    nr: &NetworkRef,
    net: &Network,
    used: &mut BTreeMap<Ipv4Addr, String>,
    push: &mut impl FnMut(String, String),
) {
    // Subnets that may serve this group.
    let serves = |s: &Subnet| {
        s.azs.is_empty() || g.azs.is_empty() || s.azs.iter().any(|a| g.azs.contains(a))
    };
    for (i, ip) in nr.static_ips.iter().enumerate() {
        let ipp = format!("{np}.static_ips[{i}]");
        if let Some(first) = used.get(ip) {
            push(
                ipp.clone(),
                format!("static IP {ip} is already used at {first}"),
            );
        } else {
            used.insert(*ip, ipp.clone());
        }
        if net.kind != NetworkKind::Manual {
            continue;
        }
        let candidates: Vec<&Subnet> = net.subnets.iter().filter(|s| serves(s)).collect();
        if let Some(msg) = static_ip_problem(*ip, net, &candidates) {
            push(ipp, msg);
        }
    }
}

/// What is wrong with a static IP of manual network `net`, given the
/// subnets that serve the group: outside a subnet's static ranges, or in
/// no serving subnet at all; `None` when it is fine.
fn static_ip_problem(ip: Ipv4Addr, net: &Network, candidates: &[&Subnet]) -> Option<String> {
    match candidates.iter().find(|s| s.range.contains(&ip)) {
        Some(s) if !is_static(s, ip) => Some(format!(
            "static IP {ip} is outside the subnet's static ranges ({})",
            ranges_text(&s.static_ips)
        )),
        Some(_) => None,
        None => {
            let desc: Vec<String> = candidates
                .iter()
                .map(|s| format!("{} static {}", s.range, ranges_text(&s.static_ips)))
                .collect();
            let desc = if desc.is_empty() {
                "none serves the group's azs".to_string()
            } else {
                desc.join("; ")
            };
            let only = candidates.first().filter(|_| candidates.len() == 1);
            Some(match only {
                Some(s) => format!(
                    "static IP {ip} is outside the subnet's static ranges ({}); the subnet is {}",
                    ranges_text(&s.static_ips),
                    s.range
                ),
                None => format!(
                    "static IP {ip} is not inside any subnet of network '{}' for this group ({desc})",
                    net.name
                ),
            })
        }
    }
}

/// Checks the group has no more than [`MAX_INSTANCES`] instances, unless a
/// network already said they are too many.
fn check_group_size(
    g: &InstanceGroup,
    gp: &str,
    too_many: bool,
    push: &mut impl FnMut(String, String),
) {
    if g.instances > MAX_INSTANCES && !too_many {
        push(
            format!("{gp}.instances"),
            format!(
                "{} instances: an instance group may have at most {MAX_INSTANCES}",
                g.instances
            ),
        );
    }
}

/// Most instances one instance group may have, whatever its networks.
pub const MAX_INSTANCES: u32 = 10_000;

/// How many dynamic IPs the subnets of `net` that serve `azs` (all of them
/// when `azs` is empty) hold, counting no further than `limit`.
fn dynamic_room(net: &Network, azs: &[String], limit: usize) -> usize {
    let serving = net
        .subnets
        .iter()
        .filter(|s| s.azs.is_empty() || azs.is_empty() || s.azs.iter().any(|a| azs.contains(a)));
    let mut room = 0;
    for s in serving {
        if room >= limit {
            break;
        }
        room += dynamic_pool(s).take(limit - room).count();
    }
    room
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cloud_config::{default_local, parse_cloud_config};
    use crate::model::manifest::parse_manifest;
    use std::path::Path;

    /// A manifest with one group of `instances` on `network`, without static
    /// IPs; `instances` is on line 16.
    fn one_group(instances: u32, network: &str) -> String {
        format!(
            "name: big\nreleases:\n- name: kv\n  version: latest\nstemcells:\n- alias: default\n  \
             os: x\n  version: latest\nupdate:\n  canaries: 1\n  max_in_flight: 1\n  \
             canary_watch_time: 1000\n  update_watch_time: 1000\ninstance_groups:\n- name: kv\n  \
             instances: {instances}\n  azs: [z1]\n  vm_type: default\n  stemcell: default\n  \
             networks:\n  - name: {network}\n  jobs:\n  - name: kv\n    release: kv\n"
        )
    }

    /// Parse and cross-check, as `deploy` does before planning.
    fn check(instances: u32, network: &str, cc: &CloudConfig) -> Result<(), Vec<String>> {
        let m = parse_manifest("m.yml", &one_group(instances, network), Path::new("/"))
            .map_err(|p| p.0.iter().map(|p| p.to_string()).collect::<Vec<_>>())?;
        validate_manifest(&m, cc).map_err(|p| p.0.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn cloud_config_instances_must_fit_the_manual_network() {
        let cc = default_local();
        // 127.77.0.0/24 less network, broadcast, gateway and 99 static IPs.
        assert_eq!(check(154, "default", &cc), Ok(()));
        let msg = |n: u32| {
            format!(
                "m.yml:16: instance_groups[0].instances: {n} instances but network 'default' \
                 can hold at most 154 dynamic IPs in az z1"
            )
        };
        assert_eq!(check(155, "default", &cc), Err(vec![msg(155)]));
        assert_eq!(
            check(10_000_000, "default", &cc),
            Err(vec![msg(10_000_000)])
        );
        assert_eq!(check(u32::MAX, "default", &cc), Err(vec![msg(u32::MAX)]));
    }

    #[test]
    fn cloud_config_instances_have_a_cap_on_any_network() {
        let cc = parse_cloud_config(
            "cc.yml",
            "azs: [{name: z1}]
networks:
- name: dyn
  type: dynamic
- name: wide
  type: manual
  subnets: [{range: 10.0.0.0/8, gateway: 10.0.0.1, azs: [z1]}]
vm_types: [{name: default}]
compilation: {workers: 1, az: z1, network: wide}
",
        )
        .expect("cc");
        let cap = |n: u32| {
            vec![format!(
                "m.yml:16: instance_groups[0].instances: {n} instances: \
                 an instance group may have at most 10000"
            )]
        };
        for net in ["dyn", "wide"] {
            assert_eq!(check(MAX_INSTANCES, net, &cc), Ok(()), "{net}");
            assert_eq!(
                check(MAX_INSTANCES + 1, net, &cc),
                Err(cap(MAX_INSTANCES + 1))
            );
            assert_eq!(check(10_000_000, net, &cc), Err(cap(10_000_000)), "{net}");
        }
    }

    #[test]
    fn cloud_config_default_local_validates_quickstart() {
        let cc = default_local();
        assert!(cc.compilation.workers >= 1);
        let m = parse_manifest(
            "m.yml",
            &crate::model::manifest::tests_support::quickstart(),
            Path::new("/"),
        )
        .expect("manifest");
        validate_manifest(&m, &cc).expect("valid against default");
    }

    #[test]
    fn cloud_config_static_ip_outside_subnet_points_into_manifest() {
        let text = crate::model::manifest::tests_support::quickstart().replace(
            "static_ips: [127.77.0.10, 127.77.0.11, 127.77.0.12]",
            "static_ips:\n    - 127.77.0.10\n    - 10.1.0.9\n    - 127.77.0.200",
        );
        let m = parse_manifest("m.yml", &text, Path::new("/")).expect("manifest");
        let e = validate_manifest(&m, &default_local()).expect_err("invalid");
        let msgs: Vec<String> = e.0.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            vec![
                "m.yml:33: instance_groups[0].networks[0].static_ips[1]: static IP 10.1.0.9 is outside the subnet's static ranges (127.77.0.2-127.77.0.100); the subnet is 127.77.0.0/24",
                "m.yml:34: instance_groups[0].networks[0].static_ips[2]: static IP 127.77.0.200 is outside the subnet's static ranges (127.77.0.2-127.77.0.100)",
            ]
        );
    }

    #[test]
    fn cloud_config_cross_checks_names_azs_and_duplicates() {
        let text = crate::model::manifest::tests_support::quickstart()
            .replace("azs: [z1]\n  instances: 3", "azs: [z1, z7]\n  instances: 3")
            .replace(
                "vm_type: default\n  stemcell: default\n  persistent_disk: 1024",
                "vm_type: big\n  stemcell: default\n  persistent_disk: 1024",
            )
            .replace(
                "persistent_disk_type: default",
                "persistent_disk_type: fast",
            )
            .replace(
                "  - name: default\n  update:",
                "  - name: default\n    static_ips: [127.77.0.10]\n  update:",
            );
        let m = parse_manifest("m.yml", &text, Path::new("/")).expect("manifest");
        let e = validate_manifest(&m, &default_local()).expect_err("invalid");
        let got: Vec<&str> = e.0.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            got,
            vec![
                "instance_groups[0].azs[1]",
                "instance_groups[0].vm_type",
                "instance_groups[1].persistent_disk_type",
                "instance_groups[1].networks[0].static_ips[0]",
            ],
            "{e}"
        );
        assert!(e.0[3]
            .message
            .contains("already used at instance_groups[0].networks[0].static_ips[0]"));
    }

    /// The one group of `one_group(instances, "default")`.
    fn group(instances: u32) -> InstanceGroup {
        let m = parse_manifest("m.yml", &one_group(instances, "default"), Path::new("/")).unwrap();
        m.instance_groups.into_iter().next().unwrap()
    }

    /// Runs a check, collecting what it pushes as `path: message`.
    fn pushed(f: impl FnOnce(&mut dyn FnMut(String, String))) -> Vec<String> {
        let mut out = Vec::new();
        f(&mut |p, m| out.push(format!("{p}: {m}")));
        out
    }

    #[test]
    fn check_group_names_reports_an_unknown_vm_type() {
        let cc = default_local();
        let mut g = group(1);
        assert!(
            pushed(|push| check_group_names(&cc, &Names::of(&cc), &g, "g", &mut &mut *push))
                .is_empty()
        );
        g.vm_type = "huge".into();
        let out = pushed(|push| check_group_names(&cc, &Names::of(&cc), &g, "g", &mut &mut *push));
        assert_eq!(out.len(), 1);
        assert!(out[0].starts_with("g.vm_type: "), "{out:?}");
    }

    #[test]
    fn check_network_wants_one_static_ip_per_instance() {
        let cc = default_local();
        let mut g = group(2);
        g.networks[0].static_ips = vec!["127.77.0.10".parse().unwrap()];
        let (nr, net) = (&g.networks[0], cc.network("default").unwrap());
        let out = pushed(|push| {
            assert!(!check_network(&cc, &g, "g", "n", nr, net, &mut &mut *push));
        });
        assert_eq!(
            out,
            vec!["n.static_ips: 1 static IPs for 2 instances: give one per instance"]
        );
    }

    #[test]
    fn check_static_ips_reports_an_ip_used_twice() {
        let cc = default_local();
        let mut g = group(1);
        g.networks[0].static_ips = vec!["127.77.0.10".parse().unwrap()];
        let (nr, net) = (&g.networks[0], cc.network("default").unwrap());
        let mut used = BTreeMap::new();
        let first = pushed(|push| check_static_ips(&g, "a", nr, net, &mut used, &mut &mut *push));
        assert!(first.is_empty());
        let again = pushed(|push| check_static_ips(&g, "b", nr, net, &mut used, &mut &mut *push));
        assert_eq!(
            again,
            vec!["b.static_ips[0]: static IP 127.77.0.10 is already used at a.static_ips[0]"]
        );
    }

    #[test]
    fn static_ip_problem_tells_static_range_from_subnet() {
        let cc = default_local();
        let net = cc.network("default").unwrap();
        let subnets: Vec<&Subnet> = net.subnets.iter().collect();
        let at = |ip: &str| static_ip_problem(ip.parse().unwrap(), net, &subnets);
        assert_eq!(at("127.77.0.10"), None);
        assert_eq!(
            at("127.77.0.150").as_deref(),
            Some("static IP 127.77.0.150 is outside the subnet's static ranges (127.77.0.2-127.77.0.100)")
        );
        assert!(at("10.0.0.1")
            .unwrap()
            .ends_with("; the subnet is 127.77.0.0/24"));
        assert!(static_ip_problem("10.0.0.1".parse().unwrap(), net, &[])
            .unwrap()
            .ends_with("(none serves the group's azs)"));
    }

    #[test]
    fn check_group_size_is_quiet_when_a_network_already_said_too_many() {
        let g = group(MAX_INSTANCES + 1);
        assert_eq!(
            pushed(|push| check_group_size(&g, "g", false, &mut &mut *push)).len(),
            1
        );
        assert!(pushed(|push| check_group_size(&g, "g", true, &mut &mut *push)).is_empty());
    }
}

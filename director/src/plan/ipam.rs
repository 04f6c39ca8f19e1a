//! IP address management over cloud-config networks: which addresses of a
//! subnet are static, which the director may hand out dynamically, and
//! which subnet serves an IP or an az.
//!
//! Pure functions only: this module must not read or record state, talk to
//! a CPI or validate input (the cloud-config parser does that); callers pass
//! in the addresses already in use.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use crate::model::cloud_config::{dynamic_pool, serves_az, Network, Subnet};

/// First free dynamic address in the network's subnet for `az`, skipping `used`.
/// When several subnets serve `az`, they are tried in order.
pub fn allocate_dynamic(
    network: &Network,
    az: &str,
    used: &BTreeSet<Ipv4Addr>,
) -> Option<Ipv4Addr> {
    network
        .subnets
        .iter()
        .filter(|s| serves_az(s, az))
        .find_map(|s| dynamic_pool(s).find(|ip| !used.contains(ip)))
}

/// The subnet's netmask, e.g. 255.255.255.0 for a /24.
pub fn netmask(subnet: &Subnet) -> Ipv4Addr {
    subnet.range.netmask()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cloud_config::{default_local, parse_cloud_config, IpRange};
    use crate::model::cloud_config::{is_static, subnet_for_az, subnet_for_ip};
    use bosun_cpi::NetworkKind;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("ip")
    }

    fn subnet(range: &str) -> Subnet {
        Subnet {
            range: range.parse().expect("cidr"),
            gateway: None,
            reserved: vec![],
            static_ips: vec![],
            dns: vec![],
            azs: vec![],
            cloud_properties: serde_json::json!({}),
        }
    }

    #[test]
    fn ipam_pool_excludes_network_broadcast_gateway_reserved_static() {
        let mut s = subnet("10.0.0.0/28");
        s.gateway = Some(ip("10.0.0.1"));
        s.reserved = vec!["10.0.0.2 - 10.0.0.4".parse().expect("r")];
        s.static_ips = vec![
            "10.0.0.5-10.0.0.8".parse().expect("r"),
            IpRange::single(ip("10.0.0.12")),
        ];
        let pool: Vec<String> = dynamic_pool(&s).map(|a| a.to_string()).collect();
        assert_eq!(
            pool,
            vec![
                "10.0.0.9",
                "10.0.0.10",
                "10.0.0.11",
                "10.0.0.13",
                "10.0.0.14"
            ]
        );
        assert!(is_static(&s, ip("10.0.0.6")));
        assert!(!is_static(&s, ip("10.0.0.9")));
        assert_eq!(netmask(&s), ip("255.255.255.240"));
    }

    #[test]
    fn ipam_small_prefixes() {
        assert_eq!(dynamic_pool(&subnet("10.0.0.4/31")).count(), 2);
        assert_eq!(
            dynamic_pool(&subnet("10.0.0.4/32")).collect::<Vec<_>>(),
            vec![ip("10.0.0.4")]
        );
        assert_eq!(dynamic_pool(&subnet("10.0.0.4/30")).count(), 2);
    }

    #[test]
    fn ipam_allocate_skips_used_and_picks_the_az_subnet() {
        let cc = parse_cloud_config(
            "cc.yml",
            "azs: [{name: z1}, {name: z2}]
networks:
- name: n
  subnets:
  - {range: 10.0.0.0/29, gateway: 10.0.0.1, reserved: ['10.0.0.2 - 10.0.0.3'], az: z1}
  - {range: 10.0.1.0/29, gateway: 10.0.1.1, static: [10.0.1.2], az: z2}
compilation: {workers: 1, az: z1, network: n}
",
        )
        .expect("cc");
        let net = &cc.networks[0];
        assert_eq!(net.kind, NetworkKind::Manual);
        let mut used = BTreeSet::new();
        assert_eq!(allocate_dynamic(net, "z1", &used), Some(ip("10.0.0.4")));
        used.insert(ip("10.0.0.4"));
        used.insert(ip("10.0.0.5"));
        assert_eq!(allocate_dynamic(net, "z1", &used), Some(ip("10.0.0.6")));
        used.insert(ip("10.0.0.6"));
        assert_eq!(allocate_dynamic(net, "z1", &used), None);
        assert_eq!(allocate_dynamic(net, "z2", &used), Some(ip("10.0.1.3")));
        assert_eq!(allocate_dynamic(net, "z3", &used), None);
        assert_eq!(
            subnet_for_ip(net, ip("10.0.1.5")).map(|s| s.azs.clone()),
            Some(vec!["z2".to_string()])
        );
        assert!(subnet_for_ip(net, ip("10.0.2.5")).is_none());
    }

    #[test]
    fn ipam_default_local_network() {
        let cc = default_local();
        let net = &cc.networks[0];
        let s = subnet_for_az(net, "z1").expect("subnet");
        assert_eq!(dynamic_pool(s).next(), Some(ip("127.77.0.101")));
        assert_eq!(dynamic_pool(s).last(), Some(ip("127.77.0.254")));
        assert!(is_static(s, ip("127.77.0.2")));
        assert_eq!(netmask(s), ip("255.255.255.0"));
    }
}

//! The AWS CPI's configuration ([`AwsCpiConfig`]: region, endpoint,
//! credentials, defaults, wait timing) read from a cloud-config's
//! `cpis[].properties`, and the readers of typed cloud properties.
//!
//! This module must not call EC2 nor look up credentials: it only parses and
//! validates.

use std::time::Duration;

use serde_json::Value;

use crate::{AwsCpiError, Result, DEFAULT_POLL_INTERVAL, DEFAULT_WAIT_TIMEOUT};

/// Configuration of the AWS CPI.
#[derive(Clone, Debug, PartialEq)]
pub struct AwsCpiConfig {
    pub region: String,
    /// EC2-compatible endpoint (the emulator in tests); None = AWS.
    pub endpoint: Option<String>,
    /// Static keys; when both are given (and always when an endpoint is), no
    /// other credential source is consulted (no instance-metadata lookup).
    /// Otherwise the standard chain (env, profile).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub default_key_name: Option<String>,
    pub default_security_groups: Vec<String>,
    /// How long a wait (instance running, volume available, ...) may take.
    pub wait_timeout: Duration,
    /// How often a wait polls.
    pub poll_interval: Duration,
}

impl AwsCpiConfig {
    /// A configuration for `region` with every other setting at its default.
    pub fn new(region: impl Into<String>) -> AwsCpiConfig {
        AwsCpiConfig {
            region: region.into(),
            endpoint: None,
            access_key_id: None,
            secret_access_key: None,
            default_key_name: None,
            default_security_groups: Vec::new(),
            wait_timeout: DEFAULT_WAIT_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }

    /// From a cloud-config `cpis[].properties` object: region (required),
    /// endpoint, access_key_id, secret_access_key, default_key_name,
    /// default_security_groups, wait_timeout_secs, poll_interval_ms.
    /// Unknown keys are an error naming the key.
    pub fn from_properties(p: &Value) -> Result<AwsCpiConfig> {
        let obj = p
            .as_object()
            .ok_or_else(|| AwsCpiError::Config(format!("properties must be an object, got {p}")))?;
        let mut config = AwsCpiConfig::new("");
        let mut region = None;
        for (key, value) in obj {
            let string = || -> Result<String> {
                value.as_str().map(str::to_string).ok_or_else(|| {
                    AwsCpiError::Config(format!("{key} must be a string, got {value}"))
                })
            };
            let number = || -> Result<u64> {
                value.as_u64().ok_or_else(|| {
                    AwsCpiError::Config(format!(
                        "{key} must be a non-negative integer, got {value}"
                    ))
                })
            };
            match key.as_str() {
                "region" => region = Some(string()?),
                "endpoint" => config.endpoint = Some(string()?),
                "access_key_id" => config.access_key_id = Some(string()?),
                "secret_access_key" => config.secret_access_key = Some(string()?),
                "default_key_name" => config.default_key_name = Some(string()?),
                "default_security_groups" => {
                    config.default_security_groups = string_list(value).ok_or_else(|| {
                        AwsCpiError::Config(format!("{key} must be a list of strings, got {value}"))
                    })?
                }
                "wait_timeout_secs" => config.wait_timeout = Duration::from_secs(number()?),
                "poll_interval_ms" => config.poll_interval = Duration::from_millis(number()?),
                other => {
                    return Err(AwsCpiError::Config(format!(
                        "unknown property {other:?} (known: region, endpoint, access_key_id, \
                         secret_access_key, default_key_name, default_security_groups, \
                         wait_timeout_secs, poll_interval_ms)"
                    )))
                }
            }
        }
        config.region = region
            .filter(|r| !r.trim().is_empty())
            .ok_or_else(|| AwsCpiError::Config("region is required".into()))?;
        config.validate()?;
        Ok(config)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.region.trim().is_empty() {
            return Err(AwsCpiError::Config("region is required".into()));
        }
        if self.access_key_id.is_some() != self.secret_access_key.is_some() {
            return Err(AwsCpiError::Config(
                "access_key_id and secret_access_key must be given together".into(),
            ));
        }
        if self.endpoint.is_some() && self.access_key_id.is_none() {
            return Err(AwsCpiError::Config(
                "an endpoint needs static keys (access_key_id and secret_access_key): \
                 no other credential source is consulted"
                    .into(),
            ));
        }
        if self.poll_interval.is_zero() {
            return Err(AwsCpiError::Config("poll_interval_ms must be > 0".into()));
        }
        Ok(())
    }
}

pub(crate) fn string_list(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// A string cloud property; absent or null is None, another type an error.
pub(crate) fn str_prop(cp: &Value, key: &str, what: &str) -> Result<Option<String>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(AwsCpiError::Invalid(format!(
            "{what}: cloud property {key} must be a string, got {other}"
        ))),
    }
}

pub(crate) fn u64_prop(cp: &Value, key: &str, what: &str) -> Result<Option<u64>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: cloud property {key} must be a non-negative integer, got {v}"
            ))
        }),
    }
}

pub(crate) fn bool_prop(cp: &Value, key: &str, what: &str) -> Result<Option<bool>> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_bool().map(Some).ok_or_else(|| {
            AwsCpiError::Invalid(format!(
                "{what}: cloud property {key} must be a boolean, got {v}"
            ))
        }),
    }
}

pub(crate) fn i32_of(n: u64, key: &str, what: &str) -> Result<i32> {
    i32::try_from(n).map_err(|_| AwsCpiError::Invalid(format!("{what}: {key} {n} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn config_from_properties_has_defaults() {
        let c = AwsCpiConfig::from_properties(&json!({"region": "eu-west-1"})).unwrap();
        assert_eq!(c, AwsCpiConfig::new("eu-west-1"));
        assert_eq!(c.wait_timeout, Duration::from_secs(600));
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert!(c.endpoint.is_none() && c.access_key_id.is_none());
        assert!(c.default_security_groups.is_empty());
    }

    #[test]
    fn config_from_properties_reads_every_key() {
        let c = AwsCpiConfig::from_properties(&json!({
            "region": "us-east-1",
            "endpoint": "http://127.0.0.1:5055",
            "access_key_id": "test",
            "secret_access_key": "secret",
            "default_key_name": "bosh",
            "default_security_groups": ["sg-1", "bosh"],
            "wait_timeout_secs": 30,
            "poll_interval_ms": 100,
        }))
        .unwrap();
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:5055"));
        assert_eq!(c.access_key_id.as_deref(), Some("test"));
        assert_eq!(c.secret_access_key.as_deref(), Some("secret"));
        assert_eq!(c.default_key_name.as_deref(), Some("bosh"));
        assert_eq!(c.default_security_groups, vec!["sg-1", "bosh"]);
        assert_eq!(c.wait_timeout, Duration::from_secs(30));
        assert_eq!(c.poll_interval, Duration::from_millis(100));
    }

    #[test]
    fn config_from_properties_rejects_bad_input() {
        let err = |p: Value| AwsCpiConfig::from_properties(&p).unwrap_err().to_string();
        let e = err(json!({"region": "us-east-1", "secret_key": "x"}));
        assert!(e.contains("unknown property \"secret_key\""), "{e}");
        assert!(err(json!({})).contains("region is required"));
        assert!(err(json!({"region": 3})).contains("region must be a string"));
        assert!(err(json!([])).contains("must be an object"));
        let e = err(json!({"region": "r", "wait_timeout_secs": "10"}));
        assert!(e.contains("wait_timeout_secs"), "{e}");
        let e = err(json!({"region": "r", "default_security_groups": "sg-1"}));
        assert!(e.contains("default_security_groups"), "{e}");
        let e = err(json!({"region": "r", "access_key_id": "a"}));
        assert!(e.contains("together"), "{e}");
        let e = err(json!({"region": "r", "endpoint": "http://127.0.0.1:1"}));
        assert!(e.contains("static keys"), "{e}");
        let e = err(json!({"region": "r", "poll_interval_ms": 0}));
        assert!(e.contains("poll_interval_ms"), "{e}");
    }
}

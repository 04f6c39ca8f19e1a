//! Generating variable values the way BOSH's vars store (config-server
//! generators) does: `password`, `certificate`, `ssh`, `rsa`.
//!
//! - `password`: 20 random characters from `a-z0-9`.
//! - `certificate`: RSA-2048 key, subject `C=USA, O=<organization, default
//!   "Cloud Foundry">, CN=<common_name>`, valid from now for `duration`
//!   days (default 365). A CA (`is_ca: true`) gets `keyCertSign, cRLSign`
//!   and is self-signed unless `ca` names a CA to sign it (intermediate). A
//!   leaf needs `ca`, gets `digitalSignature, keyEncipherment`, the
//!   `extended_key_usage` given (`server_auth`, `client_auth`; default
//!   `server_auth`) and `alternative_names` (IPs become IP SANs). The value
//!   is `{ca, certificate, private_key}` in PEM (`ca` is the signing CA's
//!   certificate, or the certificate itself for a root CA; the key is PKCS#1).
//! - `ssh`: an ed25519 key (bosun's agent keys): `{private_key (OpenSSH),
//!   public_key ("ssh-ed25519 AAAA..."), public_key_fingerprint (MD5, as
//!   BOSH prints it: "aa:bb:...")}`.
//! - `rsa`: an RSA-2048 key: `{private_key (PKCS#1 PEM), public_key (PKIX
//!   PEM)}`.
//!
//! This module only makes key material and certificates. It must not read
//! or write any store, must never log a value, and must not touch the
//! director's state, CPIs or the network.

use std::net::IpAddr;
use std::str::FromStr;

use rand::Rng;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
use serde_yaml_ng::{Mapping, Value};

use super::patch::kind_of;

/// Why a value could not be generated.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("unsupported variable type '{0}' (supported: password, certificate, ssh, rsa)")]
    UnsupportedType(String),
    #[error("option '{option}': {message}")]
    Option {
        option: &'static str,
        message: String,
    },
    #[error("Missing required CA name: a certificate that is not a CA (is_ca: true) needs 'ca', the name of the certificate variable that signs it")]
    MissingCa,
    #[error("Unsupported extended key usage value: {0} (supported: server_auth, client_auth)")]
    ExtKeyUsage(String),
    #[error("certificate authority '{name}': {message}")]
    BadCa { name: String, message: String },
    #[error("generating a key: {0}")]
    Key(String),
    #[error("generating a certificate: {0}")]
    Certificate(String),
}

/// The generated value kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarType {
    Password,
    Certificate,
    Ssh,
    Rsa,
}

impl VarType {
    pub fn parse(s: &str) -> Result<VarType, GenerateError> {
        match s {
            "password" => Ok(VarType::Password),
            "certificate" => Ok(VarType::Certificate),
            "ssh" => Ok(VarType::Ssh),
            "rsa" => Ok(VarType::Rsa),
            other => Err(GenerateError::UnsupportedType(other.to_string())),
        }
    }
}

/// Length of generated passwords (BOSH's).
pub const PASSWORD_LENGTH: usize = 20;
const PASSWORD_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// RSA modulus size for certificates and `rsa` keys.
pub const RSA_BITS: usize = 2048;

/// A random password: [`PASSWORD_LENGTH`] characters from `a-z0-9`.
pub fn password() -> Value {
    let mut rng = rand::rngs::OsRng;
    let s: String = (0..PASSWORD_LENGTH)
        .map(|_| PASSWORD_CHARS[rng.gen_range(0..PASSWORD_CHARS.len())] as char)
        .collect();
    Value::String(s)
}

/// Options of a `certificate` variable.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CertOptions {
    pub is_ca: bool,
    /// Name of the CA variable that signs this certificate.
    pub ca: Option<String>,
    pub common_name: String,
    pub alternative_names: Vec<String>,
    pub extended_key_usage: Vec<String>,
    /// Validity in days.
    pub duration: u32,
    pub organization: Option<String>,
}

impl CertOptions {
    /// Read the options of a definition (unknown options are ignored, as
    /// BOSH does).
    pub fn from_value(options: &Value) -> Result<CertOptions, GenerateError> {
        let mut o = CertOptions {
            duration: 365,
            ..CertOptions::default()
        };
        let map = match options {
            Value::Null => return Ok(o),
            Value::Mapping(m) => m,
            other => {
                return Err(GenerateError::Option {
                    option: "options",
                    message: format!("expected a map but found {}", kind_of(other)),
                })
            }
        };
        let string = |option: &'static str, v: &Value| match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(GenerateError::Option {
                option,
                message: format!("expected a string but found {}", kind_of(other)),
            }),
        };
        let strings = |option: &'static str, v: &Value| match v {
            Value::Null => Ok(Vec::new()),
            Value::Sequence(items) => items.iter().map(|i| string(option, i)).collect(),
            other => Err(GenerateError::Option {
                option,
                message: format!("expected a list of strings but found {}", kind_of(other)),
            }),
        };
        if let Some(v) = map.get("is_ca") {
            o.is_ca = match v {
                Value::Bool(b) => *b,
                Value::Null => false,
                other => {
                    return Err(GenerateError::Option {
                        option: "is_ca",
                        message: format!("expected true or false but found {}", kind_of(other)),
                    })
                }
            };
        }
        if let Some(v) = map.get("ca").filter(|v| !v.is_null()) {
            let ca = string("ca", v)?;
            o.ca = (!ca.is_empty()).then_some(ca);
        }
        if let Some(v) = map.get("common_name").filter(|v| !v.is_null()) {
            o.common_name = string("common_name", v)?;
        }
        if let Some(v) = map.get("organization").filter(|v| !v.is_null()) {
            o.organization = Some(string("organization", v)?);
        }
        if let Some(v) = map.get("alternative_names") {
            o.alternative_names = strings("alternative_names", v)?;
        }
        if let Some(v) = map.get("extended_key_usage") {
            o.extended_key_usage = strings("extended_key_usage", v)?;
        }
        if let Some(v) = map.get("duration").filter(|v| !v.is_null()) {
            o.duration = v
                .as_u64()
                .filter(|d| *d > 0 && *d <= 365 * 1000)
                .map(|d| d as u32)
                .ok_or_else(|| GenerateError::Option {
                    option: "duration",
                    message: "expected a positive number of days".to_string(),
                })?;
        }
        Ok(o)
    }
}

/// A CA's certificate and private key, as stored (PEM).
#[derive(Clone, Debug)]
pub struct CaMaterial {
    pub name: String,
    pub certificate: String,
    pub private_key: String,
}

impl CaMaterial {
    /// Read a CA variable's value: a map with `certificate` and `private_key`.
    pub fn from_value(name: &str, value: &Value) -> Result<CaMaterial, GenerateError> {
        let bad = |message: String| GenerateError::BadCa {
            name: name.to_string(),
            message,
        };
        let field = |key: &str| {
            value
                .get(key)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(format!("expected a certificate value with '{key}'")))
        };
        Ok(CaMaterial {
            name: name.to_string(),
            certificate: field("certificate")?,
            private_key: field("private_key")?,
        })
    }
}

fn new_rsa_key() -> Result<rsa::PrivateKey, GenerateError> {
    rsa::PrivateKey::new(&mut getrandom::SysRng, RSA_BITS)
        .map_err(|e| GenerateError::Key(e.to_string()))
}

fn pkcs1_pem(key: &rsa::PrivateKey) -> Result<String, GenerateError> {
    key.to_pkcs1_pem(LineEnding::LF)
        .map(|pem| pem.to_string())
        .map_err(|e| GenerateError::Key(e.to_string()))
}

fn signing_key(key: &rsa::PrivateKey) -> Result<rcgen::KeyPair, GenerateError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| GenerateError::Key(e.to_string()))?;
    rcgen::KeyPair::try_from(der.as_bytes()).map_err(|e| GenerateError::Key(e.to_string()))
}

/// Load a CA's private key: PKCS#1 (`RSA PRIVATE KEY`, what BOSH writes) or
/// PKCS#8 (`PRIVATE KEY`).
fn ca_signing_key(ca: &CaMaterial) -> Result<rcgen::KeyPair, GenerateError> {
    let bad = |message: String| GenerateError::BadCa {
        name: ca.name.clone(),
        message,
    };
    if ca.private_key.contains("BEGIN RSA PRIVATE KEY") {
        let key = rsa::PrivateKey::from_pkcs1_pem(ca.private_key.trim())
            .map_err(|e| bad(format!("reading its private key: {e}")))?;
        signing_key(&key).map_err(|e| bad(e.to_string()))
    } else {
        rcgen::KeyPair::from_pem(&ca.private_key)
            .map_err(|e| bad(format!("reading its private key: {e}")))
    }
}

fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill(&mut bytes);
    // Positive, and 16 bytes long.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    rcgen::SerialNumber::from(bytes.to_vec())
}

fn cert_error(e: rcgen::Error) -> GenerateError {
    GenerateError::Certificate(e.to_string())
}

/// Generate a certificate. `ca` is the signing CA, required unless
/// `options.is_ca` (a root CA signs itself).
pub fn certificate(options: &CertOptions, ca: Option<&CaMaterial>) -> Result<Value, GenerateError> {
    if !options.is_ca && ca.is_none() {
        return Err(GenerateError::MissingCa);
    }
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CountryName,
        rcgen::DnValue::PrintableString(
            rcgen::string::PrintableString::try_from("USA").map_err(cert_error)?,
        ),
    );
    dn.push(
        rcgen::DnType::OrganizationName,
        options
            .organization
            .clone()
            .unwrap_or_else(|| "Cloud Foundry".to_string()),
    );
    if !options.common_name.is_empty() {
        dn.push(rcgen::DnType::CommonName, options.common_name.clone());
    }
    params.distinguished_name = dn;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(i64::from(options.duration));
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = ca.is_some();
    if options.is_ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
    } else {
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        let mut ekus = Vec::new();
        for usage in &options.extended_key_usage {
            ekus.push(match usage.as_str() {
                "server_auth" => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                "client_auth" => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
                other => return Err(GenerateError::ExtKeyUsage(other.to_string())),
            });
        }
        if ekus.is_empty() {
            ekus.push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        }
        params.extended_key_usages = ekus;
        for name in &options.alternative_names {
            params.subject_alt_names.push(match IpAddr::from_str(name) {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(
                    rcgen::string::Ia5String::try_from(name.as_str()).map_err(|e| {
                        GenerateError::Option {
                            option: "alternative_names",
                            message: format!("'{name}': {e}"),
                        }
                    })?,
                ),
            });
        }
    }

    let key = new_rsa_key()?;
    let key_pair = signing_key(&key)?;
    let (cert_pem, ca_pem) = match ca {
        None => {
            let cert = params.self_signed(&key_pair).map_err(cert_error)?;
            let pem = cert.pem();
            (pem.clone(), pem)
        }
        Some(ca) => {
            let ca_key = ca_signing_key(ca)?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.certificate, ca_key).map_err(|e| {
                GenerateError::BadCa {
                    name: ca.name.clone(),
                    message: format!("reading its certificate: {e}"),
                }
            })?;
            let cert = params.signed_by(&key_pair, &issuer).map_err(cert_error)?;
            (cert.pem(), ca.certificate.clone())
        }
    };
    let mut m = Mapping::with_capacity(3);
    m.insert(Value::from("ca"), Value::String(ca_pem));
    m.insert(Value::from("certificate"), Value::String(cert_pem));
    m.insert(Value::from("private_key"), Value::String(pkcs1_pem(&key)?));
    Ok(Value::Mapping(m))
}

/// Generate an `ssh` value (ed25519).
pub fn ssh() -> Result<Value, GenerateError> {
    let pair =
        bosun_agent::keys::generate_keypair().map_err(|e| GenerateError::Key(e.to_string()))?;
    let mut fields = pair.public_openssh.split_whitespace();
    let (Some(algo), Some(blob)) = (fields.next(), fields.next()) else {
        return Err(GenerateError::Key(
            "unexpected OpenSSH public key encoding".to_string(),
        ));
    };
    let public_key = format!("{algo} {blob}");
    let fingerprint = md5_fingerprint(blob)?;
    let mut m = Mapping::with_capacity(3);
    m.insert(
        Value::from("private_key"),
        Value::String(pair.private_openssh.clone()),
    );
    m.insert(Value::from("public_key"), Value::String(public_key));
    m.insert(
        Value::from("public_key_fingerprint"),
        Value::String(fingerprint),
    );
    Ok(Value::Mapping(m))
}

/// The legacy MD5 fingerprint of an OpenSSH public key blob (base64), as
/// BOSH prints it: lowercase hex pairs joined by `:`.
pub fn md5_fingerprint(blob_base64: &str) -> Result<String, GenerateError> {
    use base64::Engine;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(blob_base64)
        .map_err(|e| GenerateError::Key(format!("decoding the public key: {e}")))?;
    let digest = md5::compute(&blob);
    Ok(digest
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// Generate an `rsa` value.
pub fn rsa_key() -> Result<Value, GenerateError> {
    let key = new_rsa_key()?;
    let public = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| GenerateError::Key(e.to_string()))?;
    let mut m = Mapping::with_capacity(2);
    m.insert(Value::from("private_key"), Value::String(pkcs1_pem(&key)?));
    m.insert(Value::from("public_key"), Value::String(public));
    Ok(Value::Mapping(m))
}

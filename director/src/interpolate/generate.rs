//! Generating variable values as bosh-cli's vars store (the config-server
//! generators it embeds) makes them: `password`, `certificate`, `ssh`,
//! `rsa`. The values are meant to be interchangeable with bosh-cli's: a
//! store either tool wrote can be used by the other.
//!
//! - `password`: `length` (default 20) random characters from `a-z0-9`.
//! - `certificate`: an RSA key of `key_length` bits (2048, 3072 or 4096;
//!   default 3072), subject `C=US, O=<organization, default "Cloud
//!   Foundry">, CN=<common_name>` in that order, a random positive serial
//!   of at most 128 bits, valid from now for `duration` days (default 365).
//!   A CA (`is_ca: true`) gets `keyCertSign, cRLSign` and is self-signed
//!   unless `ca` names a CA to sign it (intermediate). A leaf needs `ca`,
//!   gets `digitalSignature, keyEncipherment`, the `extended_key_usage`
//!   given (`server_auth`, `client_auth`; default `server_auth`) and
//!   `alternative_names` as SANs: the DNS names first, then the IP
//!   addresses, each group in the order given (bosh-cli's order); the
//!   common name is not added to them. The value is `{ca, certificate,
//!   private_key}` in PEM (`ca` is the signing CA's certificate, or the
//!   certificate itself for a root CA; the key is PKCS#1, `BEGIN RSA
//!   PRIVATE KEY`). Subject strings are PrintableString where their
//!   characters allow it, UTF8String otherwise. Deliberate differences:
//!   the subject key identifier is RFC 7093's (truncated SHA-256 of the
//!   public key) where bosh-cli hashes the modulus with SHA-1, and a root
//!   CA carries no authority key identifier; both are opaque to consumers.
//!   A wildcard common name (`*.example.com`) is a UTF8String, since `*`
//!   is not a PrintableString character.
//! - `ssh`: an RSA-2048 key: `{private_key (PKCS#1 PEM), public_key
//!   ("ssh-rsa AAAA...\n", the authorized_keys line), public_key_fingerprint
//!   (MD5 of the key blob, lowercase hex pairs joined by ':')}`.
//! - `rsa`: an RSA-2048 key: `{private_key (PKCS#1 PEM), public_key (PKIX
//!   PEM)}`.
//!
//! `password` and `certificate` reject options they do not know (a typo
//! would otherwise go unnoticed); `ssh` and `rsa` take none and ignore any.
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
    #[error("unsupported option '{option}' (supported: {})", .supported.join(", "))]
    UnsupportedOption {
        option: String,
        supported: &'static [&'static str],
    },
    #[error(
        "option 'key_length': {0} is not a supported key length (supported: 2048, 3072, 4096)"
    )]
    KeyLength(String),
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

/// Default length of generated passwords (bosh-cli's).
pub const PASSWORD_LENGTH: usize = 20;
/// The longest password `length` accepted.
pub const PASSWORD_MAX_LENGTH: usize = 65536;
const PASSWORD_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
const PASSWORD_OPTIONS: &[&str] = &["length"];
/// Default RSA modulus size of certificate keys (bosh-cli's).
pub const CERTIFICATE_KEY_BITS: usize = 3072;
/// The `key_length` values a certificate accepts.
pub const CERTIFICATE_KEY_LENGTHS: [usize; 3] = [2048, 3072, 4096];
const CERTIFICATE_OPTIONS: &[&str] = &[
    "common_name",
    "organization",
    "alternative_names",
    "is_ca",
    "ca",
    "extended_key_usage",
    "duration",
    "key_length",
];
/// RSA modulus size of `rsa` and `ssh` keys (bosh-cli's).
pub const RSA_BITS: usize = 2048;

/// The options of a definition as a map (`None` when there are none),
/// refusing keys outside `supported`.
fn option_map<'a>(
    options: &'a Value,
    supported: &'static [&'static str],
) -> Result<Option<&'a Mapping>, GenerateError> {
    let map = match options {
        Value::Null => return Ok(None),
        Value::Mapping(m) => m,
        other => {
            return Err(GenerateError::Option {
                option: "options",
                message: format!("expected a map but found {}", kind_of(other)),
            })
        }
    };
    for key in map.keys() {
        let known = key.as_str().is_some_and(|k| supported.contains(&k));
        if !known {
            let option = match key {
                Value::String(k) => k.clone(),
                other => format!("{other:?}"),
            };
            return Err(GenerateError::UnsupportedOption { option, supported });
        }
    }
    Ok(Some(map))
}

/// The `length` of a `password` definition's options ([`PASSWORD_LENGTH`]
/// when absent, null or 0, as bosh-cli does).
pub fn password_length(options: &Value) -> Result<usize, GenerateError> {
    let Some(map) = option_map(options, PASSWORD_OPTIONS)? else {
        return Ok(PASSWORD_LENGTH);
    };
    match map.get("length") {
        None | Some(Value::Null) => Ok(PASSWORD_LENGTH),
        Some(v) => match v.as_u64() {
            Some(0) => Ok(PASSWORD_LENGTH),
            Some(n) if n <= PASSWORD_MAX_LENGTH as u64 => Ok(n as usize),
            _ => Err(GenerateError::Option {
                option: "length",
                message: format!(
                    "expected a number of characters from 1 to {PASSWORD_MAX_LENGTH} but found {}",
                    describe(v)
                ),
            }),
        },
    }
}

/// A short description of an option's value for an error (numbers and
/// short strings as they are; options are not secrets).
fn describe(v: &Value) -> String {
    match v {
        Value::Number(n) => n.to_string(),
        other => kind_of(other).to_string(),
    }
}

/// A random password: `length` characters from `a-z0-9`.
pub fn password(length: usize) -> Value {
    let mut rng = rand::rngs::OsRng;
    let s: String = (0..length)
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
    /// RSA modulus size, one of [`CERTIFICATE_KEY_LENGTHS`].
    pub key_length: usize,
}

impl CertOptions {
    /// Read the options of a definition (unknown options are refused, as
    /// bosh-cli does).
    pub fn from_value(options: &Value) -> Result<CertOptions, GenerateError> {
        let mut o = CertOptions {
            duration: 365,
            key_length: CERTIFICATE_KEY_BITS,
            ..CertOptions::default()
        };
        let Some(map) = option_map(options, CERTIFICATE_OPTIONS)? else {
            return Ok(o);
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
            let organization = string("organization", v)?;
            o.organization = (!organization.is_empty()).then_some(organization);
        }
        if let Some(v) = map.get("key_length").filter(|v| !v.is_null()) {
            o.key_length = v
                .as_u64()
                .and_then(|n| CERTIFICATE_KEY_LENGTHS.into_iter().find(|l| *l as u64 == n))
                .ok_or_else(|| GenerateError::KeyLength(describe(v)))?;
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

fn new_rsa_key(bits: usize) -> Result<rsa::PrivateKey, GenerateError> {
    rsa::PrivateKey::new(&mut getrandom::SysRng, bits)
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

/// A subject attribute: PrintableString when its characters allow it (as
/// bosh-cli encodes them), UTF8String otherwise.
fn dn_text(text: &str) -> rcgen::DnValue {
    match rcgen::string::PrintableString::try_from(text) {
        Ok(printable) => rcgen::DnValue::PrintableString(printable),
        Err(_) => rcgen::DnValue::Utf8String(text.to_string()),
    }
}

/// The SANs of `alternative_names` in bosh-cli's order: every DNS name,
/// then every IP address, each in the order given.
fn subject_alt_names(names: &[String]) -> Result<Vec<rcgen::SanType>, GenerateError> {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in names {
        match IpAddr::from_str(name) {
            Ok(ip) => ips.push(rcgen::SanType::IpAddress(ip)),
            Err(_) => dns.push(rcgen::SanType::DnsName(
                rcgen::string::Ia5String::try_from(name.as_str()).map_err(|e| {
                    GenerateError::Option {
                        option: "alternative_names",
                        message: format!("'{name}': {e}"),
                    }
                })?,
            )),
        }
    }
    dns.append(&mut ips);
    Ok(dns)
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
    dn.push(rcgen::DnType::CountryName, dn_text("US"));
    dn.push(
        rcgen::DnType::OrganizationName,
        dn_text(options.organization.as_deref().unwrap_or("Cloud Foundry")),
    );
    if !options.common_name.is_empty() {
        dn.push(rcgen::DnType::CommonName, dn_text(&options.common_name));
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
        params.subject_alt_names = subject_alt_names(&options.alternative_names)?;
    }

    let key = new_rsa_key(options.key_length)?;
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

/// Generate an `ssh` value: an RSA key whose public half is given as an
/// authorized_keys line, with its MD5 fingerprint.
pub fn ssh() -> Result<Value, GenerateError> {
    use base64::Engine;
    let key = new_rsa_key(RSA_BITS)?;
    let blob = ssh_rsa_blob(&key.to_public_key());
    let public_key = format!(
        "ssh-rsa {}\n",
        base64::engine::general_purpose::STANDARD.encode(&blob)
    );
    let mut m = Mapping::with_capacity(3);
    m.insert(Value::from("private_key"), Value::String(pkcs1_pem(&key)?));
    m.insert(Value::from("public_key"), Value::String(public_key));
    m.insert(
        Value::from("public_key_fingerprint"),
        Value::String(md5_fingerprint(&blob)),
    );
    Ok(Value::Mapping(m))
}

/// The SSH wire encoding of an RSA public key (RFC 4253 section 6.6):
/// the string "ssh-rsa", then the exponent and the modulus as mpints.
fn ssh_rsa_blob(key: &rsa::PublicKey) -> Vec<u8> {
    use rsa::traits::PublicKeyParts;
    fn string(out: &mut Vec<u8>, bytes: &[u8]) {
        // An RSA key's parts are far below 4 GiB.
        out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    fn mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
        let trimmed: &[u8] = match magnitude.iter().position(|b| *b != 0) {
            Some(first) => &magnitude[first..],
            None => &[],
        };
        // A set top bit would read as negative: prefix a zero byte.
        if trimmed.first().is_some_and(|b| b & 0x80 != 0) {
            let mut padded = Vec::with_capacity(trimmed.len() + 1);
            padded.push(0);
            padded.extend_from_slice(trimmed);
            string(out, &padded);
        } else {
            string(out, trimmed);
        }
    }
    let mut out = Vec::new();
    string(&mut out, b"ssh-rsa");
    mpint(&mut out, &key.e_bytes());
    mpint(&mut out, &key.n_bytes());
    out
}

/// The legacy MD5 fingerprint of an SSH public key blob (its wire
/// encoding), as bosh-cli writes it: lowercase hex pairs joined by `:`.
pub fn md5_fingerprint(blob: &[u8]) -> String {
    md5::compute(blob)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Generate an `rsa` value.
pub fn rsa_key() -> Result<Value, GenerateError> {
    let key = new_rsa_key(RSA_BITS)?;
    let public = key
        .to_public_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|e| GenerateError::Key(e.to_string()))?;
    let mut m = Mapping::with_capacity(2);
    m.insert(Value::from("private_key"), Value::String(pkcs1_pem(&key)?));
    m.insert(Value::from("public_key"), Value::String(public));
    Ok(Value::Mapping(m))
}

//! The `s3` provider of a release's blobstore (`config/final.yml`
//! `blobstore.provider: s3`, credentials usually in `config/private.yml`):
//! any S3-compatible endpoint (AWS, MinIO, Ceph, moto).
//!
//! This crate owns turning the provider's options into an S3 client and
//! putting and getting objects with it. It must not know what the objects
//! are (the director's `release` module records ids and digests), and it
//! must never print credentials: [`S3Blobstore::describe`] names the bucket
//! and endpoint only.
//!
//! Options, as BOSH's s3 blobstore has them: `bucket_name` (required),
//! `region` (default `us-east-1`), `host`, `port`, `use_ssl` (default
//! true), `s3_force_path_style` (default: true when `host` is set, so
//! MinIO-style endpoints work), `credentials_source` (`static`: the
//! `access_key_id` and `secret_access_key` options, with an optional
//! `session_token`; `env_or_profile`: the AWS SDK's default chain;
//! `none`: anonymous requests, for public buckets; default `static` when
//! keys are given, else `none`). `ssl_verify_peer: false` is refused:
//! bosun does not turn off certificate checks. Other options (BOSH's
//! `signature_version`, `server_side_encryption`, ...) are ignored.
//!
//! The AWS SDK is asynchronous and the [`Blobstore`] interface is not: each
//! store runs its requests on a thread of its own with its own runtime, so
//! it can be used from any thread, inside a runtime or not.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::sync::Mutex;

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bosun_director::release::{
    check_id, copy_hashed, Blobstore, BlobstoreConfig, BlobstoreError, BlobstoreProviders,
    LocalOnly,
};

/// The providers a bosun binary with this crate knows: `local` and `s3`.
#[derive(Clone, Copy, Debug, Default)]
pub struct WithS3;

impl BlobstoreProviders for WithS3 {
    fn open(&self, config: &BlobstoreConfig) -> Result<Box<dyn Blobstore>, BlobstoreError> {
        match config.provider.as_str() {
            "s3" => Ok(Box::new(S3Blobstore::from_config(config)?)),
            "local" => LocalOnly.open(config),
            other => Err(BlobstoreError::UnsupportedProvider {
                provider: other.to_string(),
                supported: "only 'local' and 's3' are".into(),
            }),
        }
    }
}

/// How requests are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Credentials {
    Static {
        access_key_id: String,
        secret_access_key: String,
        session_token: Option<String>,
    },
    EnvOrProfile,
    Anonymous,
}

/// The settings of an s3 blobstore, from its options.
#[derive(Clone, PartialEq, Eq)]
struct Settings {
    bucket: String,
    region: String,
    /// `http(s)://host[:port]`, when not AWS's own endpoint.
    endpoint: Option<String>,
    path_style: bool,
    credentials: Credentials,
}

fn bad(option: &str, message: impl Into<String>) -> BlobstoreError {
    BlobstoreError::BadOption {
        option: option.to_string(),
        message: message.into(),
    }
}

impl Settings {
    fn from_config(c: &BlobstoreConfig) -> Result<Self, BlobstoreError> {
        let bucket = c.required("bucket_name")?;
        let region = c.option("region")?.unwrap_or_else(|| "us-east-1".into());
        let host = c.option("host")?;
        let use_ssl = c.flag("use_ssl", true)?;
        if !c.flag("ssl_verify_peer", true)? {
            return Err(bad(
                "ssl_verify_peer",
                "false is not supported: bosun always verifies the endpoint's certificate",
            ));
        }
        let port = match c.option("port")? {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .map_err(|_| bad("port", format!("'{p}' is not a port number")))?,
            ),
        };
        let endpoint = match (&host, port) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad("port", "a port needs a host")),
            (Some(h), port) => {
                if h.contains('/') || h.contains(char::is_whitespace) {
                    return Err(bad("host", format!("'{h}' is not a host name")));
                }
                let scheme = if use_ssl { "https" } else { "http" };
                Some(match port {
                    Some(p) => format!("{scheme}://{h}:{p}"),
                    None => format!("{scheme}://{h}"),
                })
            }
        };
        let path_style = c.flag("s3_force_path_style", host.is_some())?;
        let key_id = c.option("access_key_id")?;
        let secret = c.option("secret_access_key")?;
        let source = c.option("credentials_source")?;
        let credentials = match (source.as_deref(), key_id, secret) {
            (None | Some("static"), Some(access_key_id), Some(secret_access_key)) => {
                Credentials::Static {
                    access_key_id,
                    secret_access_key,
                    session_token: c.option("session_token")?,
                }
            }
            (Some("static"), _, _) | (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(bad(
                    "credentials_source",
                    "static credentials need both access_key_id and secret_access_key (usually in config/private.yml)",
                ))
            }
            (Some("env_or_profile"), _, _) => Credentials::EnvOrProfile,
            (Some("none") | None, _, _) => Credentials::Anonymous,
            (Some(other), _, _) => {
                return Err(bad(
                    "credentials_source",
                    format!("'{other}' is not static, env_or_profile or none"),
                ))
            }
        };
        Ok(Settings {
            bucket,
            region,
            endpoint,
            path_style,
            credentials,
        })
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("s3 bucket '{}' at {e}", self.bucket),
            None => format!("s3 bucket '{}' ({})", self.bucket, self.region),
        }
    }

    async fn client(&self) -> aws_sdk_s3::Client {
        use aws_sdk_s3::config::{BehaviorVersion, Region};
        let mut b = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .force_path_style(self.path_style);
        if let Some(e) = &self.endpoint {
            b = b.endpoint_url(e);
        }
        b = match &self.credentials {
            Credentials::Static {
                access_key_id,
                secret_access_key,
                session_token,
            } => b.credentials_provider(aws_credential_types::Credentials::new(
                access_key_id,
                secret_access_key,
                session_token.clone(),
                None,
                "release-blobstore-options",
            )),
            Credentials::EnvOrProfile => {
                let shared = aws_config::defaults(BehaviorVersion::latest())
                    .region(Region::new(self.region.clone()))
                    .load()
                    .await;
                match shared.credentials_provider() {
                    Some(p) => b.credentials_provider(p),
                    None => b,
                }
            }
            Credentials::Anonymous => b.allow_no_auth(),
        };
        aws_sdk_s3::Client::from_conf(b.build())
    }
}

/// What an SDK failure says: for an answer of the endpoint, its HTTP status
/// and error code; otherwise the whole cause chain.
fn sdk_error<E>(e: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(ctx) => {
            let err = ctx.err();
            let status = ctx.raw().status().as_u16();
            let code = err.code().map(|c| format!(" {c}")).unwrap_or_default();
            match err.message() {
                Some(m) => format!("the endpoint answered HTTP {status}{code}: {m}"),
                None => format!("the endpoint answered HTTP {status}{code}"),
            }
        }
        other => DisplayErrorContext(other).to_string(),
    }
}

/// Work for the store's thread: run on its runtime.
type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// A bucket of an S3-compatible endpoint, as a release's blobstore.
pub struct S3Blobstore {
    settings: Settings,
    client: aws_sdk_s3::Client,
    jobs: Mutex<mpsc::Sender<Job>>,
}

fn remote(
    operation: impl Into<String>,
    store: &Settings,
    detail: impl std::fmt::Display,
) -> BlobstoreError {
    BlobstoreError::Remote {
        operation: operation.into(),
        store: store.describe(),
        source: Box::new(io::Error::other(detail.to_string())),
    }
}

impl S3Blobstore {
    /// The store `config` (provider `s3`) describes. Nothing is sent yet.
    pub fn from_config(config: &BlobstoreConfig) -> Result<Self, BlobstoreError> {
        let settings = Settings::from_config(config)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let s = settings.clone();
        std::thread::Builder::new()
            .name("s3-blobstore".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        if ready_tx.send(Err(e.to_string())).is_err() {
                            tracing::debug!("s3 blobstore: its opener is gone");
                        }
                        return;
                    }
                };
                let client = rt.block_on(s.client());
                if ready_tx.send(Ok(client)).is_err() {
                    return;
                }
                for job in rx {
                    job(&rt);
                }
            })
            .map_err(|e| remote("starting the s3 client thread", &settings, e))?;
        let client = ready_rx
            .recv()
            .map_err(|e| remote("starting the s3 client", &settings, e))?
            .map_err(|e| remote("starting the s3 client's runtime", &settings, e))?;
        Ok(S3Blobstore {
            settings,
            client,
            jobs: Mutex::new(tx),
        })
    }

    /// Hand `job` to the store's thread.
    fn submit(&self, what: &str, job: Job) -> Result<(), BlobstoreError> {
        let sent = match self.jobs.lock() {
            Ok(jobs) => jobs.send(job).is_ok(),
            Err(_) => false,
        };
        if sent {
            Ok(())
        } else {
            Err(remote(
                what,
                &self.settings,
                "the s3 client thread has stopped",
            ))
        }
    }

    /// Run `f` on the store's thread; what it returns.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce(&tokio::runtime::Runtime) -> T + Send + 'static,
    ) -> Result<T, BlobstoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(
            what,
            Box::new(move |rt| {
                if tx.send(f(rt)).is_err() {
                    tracing::debug!("s3 blobstore: a request's caller is gone");
                }
            }),
        )?;
        rx.recv()
            .map_err(|_| remote(what, &self.settings, "the s3 client thread has stopped"))
    }
}

/// What a download sends back, piece by piece.
enum Piece {
    Data(Vec<u8>),
    End,
    Missing,
    Failed(String),
}

impl Blobstore for S3Blobstore {
    fn describe(&self) -> String {
        self.settings.describe()
    }

    fn put(&self, content: &mut dyn Read) -> Result<(String, String), BlobstoreError> {
        if self.settings.credentials == Credentials::Anonymous {
            return Err(bad(
                "credentials_source",
                format!(
                    "uploading to {} needs credentials: access_key_id and secret_access_key (in config/private.yml), or credentials_source: env_or_profile",
                    self.describe()
                ),
            ));
        }
        // Spooled to a file first: the upload needs its length, and the
        // digest is of exactly what is sent.
        let spool_err = |e: io::Error| remote("spooling a blob for upload", &self.settings, e);
        let mut spool = tempfile::NamedTempFile::new().map_err(spool_err)?;
        let sha256 = copy_hashed(content, spool.as_file_mut()).map_err(spool_err)?;
        spool.flush().map_err(spool_err)?;
        let id = uuid::Uuid::new_v4().to_string();
        let path = spool.into_temp_path();
        let (client, bucket, key) = (
            self.client.clone(),
            self.settings.bucket.clone(),
            id.clone(),
        );
        let sent = self.run("uploading a blob", move |rt| {
            rt.block_on(async move {
                let body = ByteStream::from_path(&path)
                    .await
                    .map_err(|e| e.to_string())?;
                let out = client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(body)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| sdk_error(&e));
                drop(path);
                out
            })
        })?;
        sent.map_err(|e| remote(format!("uploading blob {id}"), &self.settings, e))?;
        Ok((id, sha256))
    }

    fn get(&self, id: &str, out: &mut dyn Write) -> Result<(), BlobstoreError> {
        check_id(id)?;
        let (tx, rx) = mpsc::sync_channel::<Piece>(8);
        let (client, bucket, key) = (
            self.client.clone(),
            self.settings.bucket.clone(),
            id.to_string(),
        );
        // The thread streams the body while this one writes it out.
        self.submit(
            "downloading a blob",
            Box::new(move |rt| {
                rt.block_on(async move {
                    let send = |p: Piece| tx.send(p).is_ok();
                    let resp = match client.get_object().bucket(bucket).key(key).send().await {
                        Ok(r) => r,
                        Err(e) => {
                            let missing = e.as_service_error().is_some_and(|s| s.is_no_such_key());
                            send(if missing {
                                Piece::Missing
                            } else {
                                Piece::Failed(sdk_error(&e))
                            });
                            return;
                        }
                    };
                    let mut body = resp.body;
                    loop {
                        let piece = match body.next().await {
                            None => Piece::End,
                            Some(Ok(bytes)) => Piece::Data(bytes.to_vec()),
                            Some(Err(e)) => Piece::Failed(DisplayErrorContext(e).to_string()),
                        };
                        let last = !matches!(piece, Piece::Data(_));
                        if !send(piece) || last {
                            return;
                        }
                    }
                })
            }),
        )?;
        let failed =
            |e: &dyn std::fmt::Display| remote(format!("downloading blob {id}"), &self.settings, e);
        for piece in rx {
            match piece {
                Piece::Data(d) => out
                    .write_all(&d)
                    .map_err(|e| remote(format!("writing blob {id}"), &self.settings, e))?,
                Piece::End => return Ok(()),
                Piece::Missing => {
                    return Err(BlobstoreError::Missing {
                        id: id.to_string(),
                        store: self.describe(),
                    })
                }
                Piece::Failed(e) => return Err(failed(&e)),
            }
        }
        Err(failed(
            &"the s3 client thread stopped before the download ended",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(options: &str) -> BlobstoreConfig {
        let options: serde_yaml_ng::Mapping =
            serde_yaml_ng::from_str(options).expect("options yaml");
        BlobstoreConfig {
            release_dir: "/nowhere".into(),
            provider: "s3".into(),
            options,
        }
    }

    #[test]
    fn a_host_gives_a_path_style_endpoint_and_keys_are_static_credentials() {
        let s = Settings::from_config(&config(
            "{bucket_name: b, host: 127.0.0.1, port: 9000, use_ssl: false, access_key_id: k, secret_access_key: hush}",
        ))
        .expect("settings");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert!(s.path_style);
        assert_eq!(s.region, "us-east-1");
        assert!(
            matches!(&s.credentials, Credentials::Static { access_key_id, .. } if access_key_id == "k")
        );
        assert_eq!(s.describe(), "s3 bucket 'b' at http://127.0.0.1:9000");
        assert!(!s.describe().contains("hush"));
    }

    #[test]
    fn aws_itself_is_virtual_host_style_and_no_keys_is_anonymous() {
        let s = Settings::from_config(&config("{bucket_name: b, region: eu-west-1}"))
            .expect("settings");
        assert_eq!(s.endpoint, None);
        assert!(!s.path_style);
        assert_eq!(s.credentials, Credentials::Anonymous);
        assert_eq!(s.describe(), "s3 bucket 'b' (eu-west-1)");
        let s = Settings::from_config(&config(
            "{bucket_name: b, credentials_source: env_or_profile, host: s3.example, s3_force_path_style: false}",
        ))
        .expect("settings");
        assert_eq!(s.credentials, Credentials::EnvOrProfile);
        assert_eq!(s.endpoint.as_deref(), Some("https://s3.example"));
        assert!(!s.path_style);
    }

    #[test]
    fn bad_options_are_errors_that_name_them() {
        let cases = [
            ("{host: h}", "options.bucket_name"),
            ("{bucket_name: b, port: 9000}", "'port'"),
            (
                "{bucket_name: b, host: h, port: x}",
                "'x' is not a port number",
            ),
            (
                "{bucket_name: b, access_key_id: k}",
                "need both access_key_id",
            ),
            ("{bucket_name: b, credentials_source: static}", "need both"),
            ("{bucket_name: b, credentials_source: magic}", "'magic'"),
            (
                "{bucket_name: b, ssl_verify_peer: false}",
                "ssl_verify_peer",
            ),
            (
                "{bucket_name: b, use_ssl: maybe}",
                "'maybe' is not true or false",
            ),
            ("{bucket_name: b, host: 'h/x'}", "not a host name"),
        ];
        for (options, want) in cases {
            let err = match Settings::from_config(&config(options)) {
                Ok(_) => panic!("{options}: accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(want), "{options}: {err}");
        }
    }

    #[test]
    fn with_s3_opens_local_and_s3_and_names_what_it_knows() {
        let err = WithS3
            .open(&BlobstoreConfig {
                provider: "gcs".into(),
                ..config("{}")
            })
            .err()
            .expect("gcs");
        assert_eq!(
            err.to_string(),
            "the release blobstore provider 'gcs' (config/final.yml) is not supported: only 'local' and 's3' are"
        );
        let store = WithS3
            .open(&config(
                "{bucket_name: b, host: 127.0.0.1, port: 1, use_ssl: false}",
            ))
            .expect("s3 opens without a request");
        assert_eq!(store.describe(), "s3 bucket 'b' at http://127.0.0.1:1");
        // Nothing listens on port 1: a request fails, naming the store.
        let err = store.get("x", &mut Vec::new()).expect_err("no server");
        assert!(err.to_string().contains("s3 bucket 'b'"), "{err}");
        // Anonymous requests can read a public bucket, never write to one.
        let err = store.put(&mut &b"x"[..]).expect_err("anonymous upload");
        assert!(err.to_string().contains("needs credentials"), "{err}");
        let local = WithS3
            .open(&BlobstoreConfig {
                provider: "local".into(),
                ..config("{blobstore_path: store}")
            })
            .expect("local");
        assert_eq!(local.describe(), "the local blobstore /nowhere/store");
    }
}

//! Calling EC2: the one helper every request goes through (retrying
//! throttling, server errors and, right after a create, not-found codes with
//! a bounded exponential [`Backoff`]), the classification of EC2 errors, and
//! polling waits bounded by `wait_timeout`.
//!
//! This module must not know what a VM, disk or stemcell is: callers name
//! the operation and the resource.

use std::future::Future;
use std::time::{Duration, Instant};

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::{AwsCpi, AwsCpiError, Result, Target};

/// What kind of failure an EC2 error is, which decides retries and the
/// [`CpiError`] it becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// `*.NotFound`: absent (or not yet visible right after a create).
    NotFound,
    /// `*.Malformed`: an id that cannot exist; never retried.
    Malformed,
    /// `RequestLimitExceeded` and other throttling.
    Throttled,
    /// HTTP 5xx, `InternalError`, `Unavailable`...
    ServerError,
    /// No answer: connection failure or timeout.
    Network,
    /// Anything else (a refused request): fatal.
    Other,
}

impl ErrorClass {
    /// Whether the same request may succeed when sent again.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorClass::Throttled | ErrorClass::ServerError | ErrorClass::Network
        )
    }

    /// Whether the resource the request named does not exist.
    pub fn is_not_found(self) -> bool {
        matches!(self, ErrorClass::NotFound | ErrorClass::Malformed)
    }
}

pub(crate) const THROTTLING_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
    "EC2ThrottledException",
];

pub(crate) const SERVER_CODES: &[&str] = &[
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    "RequestTimeout",
    "RequestTimeoutException",
];

/// Classifies an EC2 error by its code and HTTP status.
pub fn classify(code: Option<&str>, status: Option<u16>) -> ErrorClass {
    if let Some(code) = code {
        if code.ends_with(".NotFound")
            || code.ends_with(".Unavailable") && code.starts_with("InvalidAMIID")
        {
            return ErrorClass::NotFound;
        }
        if code.ends_with(".Malformed") || code == "InvalidVolumeID.Malformed" {
            return ErrorClass::Malformed;
        }
        if THROTTLING_CODES.contains(&code) {
            return ErrorClass::Throttled;
        }
        if SERVER_CODES.contains(&code) {
            return ErrorClass::ServerError;
        }
    }
    match status {
        Some(429) => ErrorClass::Throttled,
        Some(s) if s >= 500 => ErrorClass::ServerError,
        _ => ErrorClass::Other,
    }
}

/// Which kind of resource a not-found code is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resource {
    Instance,
    Volume,
    Image,
    Snapshot,
}

pub(crate) fn resource_of_code(code: &str) -> Option<Resource> {
    if code.starts_with("InvalidInstanceID") {
        Some(Resource::Instance)
    } else if code.starts_with("InvalidVolume") {
        Some(Resource::Volume)
    } else if code.starts_with("InvalidAMIID") {
        Some(Resource::Image)
    } else if code.starts_with("InvalidSnapshot") {
        Some(Resource::Snapshot)
    } else {
        None
    }
}

/// Bounded exponential backoff: `first`, doubling up to `max`, for at most `tries` tries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub tries: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_secs(5),
            tries: 8,
        }
    }
}

impl Backoff {
    /// The pause after `tries_done` failed tries (1-based), or None when no try is left.
    pub fn delay(&self, tries_done: u32) -> Option<Duration> {
        if tries_done == 0 || tries_done >= self.tries {
            return None;
        }
        let factor = 1u32.checked_shl(tries_done - 1).unwrap_or(u32::MAX);
        Some(self.first.saturating_mul(factor).min(self.max))
    }

    /// Every pause, in order.
    pub fn schedule(&self) -> Vec<Duration> {
        (1..self.tries).filter_map(|n| self.delay(n)).collect()
    }
}

/// Which errors the call helper retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Retry {
    /// Throttling, server errors, no answer.
    Transient,
    /// Those and the not-found codes: a read right after a create.
    AfterCreate,
}

/// An SDK error reduced to what the CPI decides on.
#[derive(Debug)]
pub(crate) struct Failure {
    code: Option<String>,
    message: String,
    status: Option<u16>,
    class: ErrorClass,
}

impl Failure {
    pub(crate) fn from_sdk<E, R>(e: &SdkError<E, R>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let status = e.raw_response().and_then(HasStatus::status_code);
        match e {
            SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => Failure {
                code: None,
                message: DisplayErrorContext(e).to_string(),
                status,
                class: ErrorClass::Network,
            },
            _ => {
                let code = e.code().map(str::to_string);
                let message = e
                    .message()
                    .map(str::to_string)
                    .unwrap_or_else(|| DisplayErrorContext(e).to_string());
                let class = classify(code.as_deref(), status);
                Failure {
                    code,
                    message,
                    status,
                    class,
                }
            }
        }
    }

    pub(crate) fn into_error(self, op: String, target: Target) -> AwsCpiError {
        AwsCpiError::Ec2 {
            op,
            target,
            code: self.code.unwrap_or_else(|| match self.status {
                Some(s) => format!("HTTP {s}"),
                None => "(no answer)".into(),
            }),
            message: self.message,
            status: self.status,
            class: self.class,
        }
    }
}

/// The HTTP status of a raw response.
pub(crate) trait HasStatus {
    fn status_code(&self) -> Option<u16>;
}

impl HasStatus for aws_sdk_ec2::config::http::HttpResponse {
    fn status_code(&self) -> Option<u16> {
        Some(self.status().as_u16())
    }
}

/// The result of one poll of a wait.
pub(crate) enum Polled<T> {
    Done(T),
    /// Not there yet; the state it is in.
    Pending(String),
}

impl AwsCpi {
    /// Runs one EC2 request, retrying what `retry` allows with the backoff.
    pub(crate) async fn ec2<T, E, R, F, Fut>(
        &self,
        op: impl Into<String>,
        target: Target,
        retry: Retry,
        mut send: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, SdkError<E, R>>>,
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + HasStatus,
    {
        let op = op.into();
        let mut tries = 0;
        loop {
            tries += 1;
            let failure = match send().await {
                Ok(v) => return Ok(v),
                Err(e) => Failure::from_sdk(&e),
            };
            let retryable = failure.class.is_retryable()
                || (retry == Retry::AfterCreate && failure.class == ErrorClass::NotFound);
            match self.backoff.delay(tries).filter(|_| retryable) {
                Some(pause) => {
                    tracing::debug!(
                        op = %op,
                        code = ?failure.code,
                        try_ = tries,
                        ?pause,
                        "EC2 request failed, retrying"
                    );
                    tokio::time::sleep(pause).await;
                }
                None => return Err(failure.into_error(op, target)),
            }
        }
    }

    /// Polls until `poll` is done or `wait_timeout` passes.
    pub(crate) async fn wait<T, F, Fut>(&self, what: &str, mut poll: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Polled<T>>>,
    {
        let started = Instant::now();
        loop {
            let state = match poll().await? {
                Polled::Done(v) => return Ok(v),
                Polled::Pending(state) => state,
            };
            if started.elapsed() >= self.config.wait_timeout {
                return Err(AwsCpiError::Timeout {
                    what: what.to_string(),
                    state,
                    secs: self.config.wait_timeout.as_secs(),
                });
            }
            tokio::time::sleep(self.config.poll_interval).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AwsCpiConfig;
    use bosun_cpi::VmCid;

    #[test]
    fn errors_are_classified_by_code_and_status() {
        use ErrorClass::*;
        let cases = [
            (Some("InvalidInstanceID.NotFound"), Some(400), NotFound),
            (Some("InvalidVolume.NotFound"), Some(400), NotFound),
            (Some("InvalidAMIID.NotFound"), Some(400), NotFound),
            (Some("InvalidAMIID.Unavailable"), Some(400), NotFound),
            (Some("InvalidSnapshot.NotFound"), Some(400), NotFound),
            (Some("InvalidInstanceID.Malformed"), Some(400), Malformed),
            (Some("InvalidVolumeID.Malformed"), Some(400), Malformed),
            (Some("RequestLimitExceeded"), Some(503), Throttled),
            (Some("Throttling"), Some(400), Throttled),
            (None, Some(429), Throttled),
            (Some("InternalError"), Some(500), ServerError),
            (Some("Unavailable"), Some(503), ServerError),
            (None, Some(500), ServerError),
            (None, Some(502), ServerError),
            (Some("IncorrectState"), Some(400), Other),
            (Some("InvalidParameterValue"), Some(400), Other),
            (Some("UnauthorizedOperation"), Some(403), Other),
            (None, None, Other),
        ];
        for (code, status, want) in cases {
            assert_eq!(classify(code, status), want, "{code:?} {status:?}");
        }
        assert!(Throttled.is_retryable() && ServerError.is_retryable() && Network.is_retryable());
        assert!(!NotFound.is_retryable() && !Malformed.is_retryable() && !Other.is_retryable());
        assert!(NotFound.is_not_found() && Malformed.is_not_found() && !Other.is_not_found());
    }

    #[test]
    fn backoff_doubles_from_100ms_to_5s_for_8_tries() {
        let b = Backoff::default();
        let ms: Vec<u128> = b.schedule().iter().map(Duration::as_millis).collect();
        assert_eq!(ms, vec![100, 200, 400, 800, 1600, 3200, 5000]);
        assert_eq!(b.delay(0), None);
        assert_eq!(b.delay(1), Some(Duration::from_millis(100)));
        assert_eq!(b.delay(7), Some(Duration::from_secs(5)));
        assert_eq!(b.delay(8), None, "the 8th failure is the last");
        let total: Duration = b.schedule().iter().sum();
        assert!(total < Duration::from_secs(12), "{total:?}");
        let long = Backoff {
            tries: 100,
            ..Backoff::default()
        };
        assert_eq!(long.delay(64), Some(Duration::from_secs(5)), "no overflow");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_transient_after_bounded_retries() {
        // Port 9 (discard) on loopback: nothing listens, the connection is refused.
        let mut config = AwsCpiConfig::new("us-east-1");
        config.endpoint = Some("http://127.0.0.1:9".into());
        config.access_key_id = Some("test".into());
        config.secret_access_key = Some("test".into());
        let cpi = AwsCpi::new(config).await.unwrap().with_backoff(Backoff {
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
            tries: 3,
        });
        let started = Instant::now();
        let e = bosun_cpi::Cpi::has_vm(&cpi, &VmCid::from("i-1"))
            .await
            .unwrap_err();
        assert!(e.is_retryable(), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("DescribeInstances i-1"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}

//! The director's side of the director ↔ agent transport: a typed SSH client
//! (russh) that authenticates with the director's key, pins the agent's host
//! key (no trust-on-first-use), calls actions over the RPC subsystem and moves
//! blobs over `put-blob` / `get-blob` exec channels.
//!
//! It must not decide anything about deployments (the director does), must
//! never accept a host key other than the pinned one, and must verify the
//! sha256 of every blob it receives.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use russh::client;
use russh::keys::{PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::{ChannelMsg, Disconnect};
use serde::de::DeserializeOwned;

use crate::blobs::{is_valid_name, sha256_hex};
use crate::keys::{parse_public_key, same_key, KeyError, KeyPair};
use crate::protocol::{
    self, Action, ActionFailure, AgentState, ApplySpec, CompileRequest, CompileResult, DrainParams,
    DrainResult, FetchLogsParams, FetchLogsResult, MissingBlobsParams, MountDiskParams, PingResult,
    RestartJobsParams, RpcRequest, RpcResponse, RunScriptParams, ScriptResults, UnmountDiskParams,
};

/// SSH user name the director logs in as (the agent ignores it).
const SSH_USER: &str = "bosun";
/// Largest RPC response the client accepts.
const MAX_RESPONSE_BYTES: usize = 256 * 1024 * 1024;
/// Bound for a whole `get_blob` (size unknown in advance).
const GET_BLOB_TIMEOUT: Duration = Duration::from_secs(1800);

/// Errors talking to an agent. Every message names the operation and the
/// agent's address.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent {addr} unreachable: no answer to ping after {secs} s")]
    Unreachable { addr: SocketAddr, secs: u64 },
    #[error("connecting to agent {addr}: its SSH host key is not the one pinned for this VM (possible man-in-the-middle or a different VM at this address)")]
    HostKeyMismatch { addr: SocketAddr },
    #[error("connecting to agent {addr}: the agent rejected the director's SSH key")]
    AuthRejected { addr: SocketAddr },
    #[error("calling {action} on agent {addr}: timed out after {secs} s")]
    Timeout {
        action: String,
        addr: SocketAddr,
        secs: u64,
    },
    /// The agent answered with a failure.
    #[error("{}", display_failure(.0))]
    Action(ActionFailure),
    /// The agent refused a blob transfer (bad sha256, missing blob, ...).
    #[error("{op} on agent {addr}: {message}")]
    Blob {
        op: String,
        addr: SocketAddr,
        message: String,
    },
    #[error("{0}")]
    Protocol(String),
    #[error("{op} on agent {addr}: SSH")]
    Ssh {
        op: String,
        addr: SocketAddr,
        #[source]
        source: russh::Error,
    },
    #[error("{op} on agent {addr}")]
    Io {
        op: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on agent {addr}")]
    Key {
        op: String,
        addr: SocketAddr,
        #[source]
        source: KeyError,
    },
}

fn display_failure(f: &ActionFailure) -> String {
    match f.output_tail.as_deref().map(str::trim_end) {
        Some(tail) if !tail.is_empty() => {
            format!("{}\n--- output (last lines) ---\n{tail}", f.message)
        }
        _ => f.message.clone(),
    }
}

impl ClientError {
    /// The agent's own failure report, if this is one.
    pub fn failure(&self) -> Option<&ActionFailure> {
        match self {
            ClientError::Action(f) => Some(f),
            _ => None,
        }
    }
}

/// russh client callbacks: pins the host key.
struct PinnedHostKey {
    expected: PublicKey,
    mismatch: Arc<AtomicBool>,
}

impl client::Handler for PinnedHostKey {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let ok = match server_public_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => same_key(key, &self.expected),
            PublicKeyOrCertificate::Certificate(_) => false,
        };
        if !ok {
            self.mismatch.store(true, Ordering::SeqCst);
        }
        Ok(ok)
    }
}

/// An authenticated SSH connection to one agent. Cheap to clone; clones share
/// the connection, and calls on it may run concurrently (one channel each).
#[derive(Clone)]
pub struct AgentClient {
    addr: SocketAddr,
    handle: Arc<client::Handle<PinnedHostKey>>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("addr", &self.addr)
            .finish()
    }
}

fn client_config() -> client::Config {
    client::Config {
        // Actions can keep a connection quiet for minutes; keepalives (every
        // 30 s, give up after 8 unanswered) detect a dead agent instead.
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(30)),
        keepalive_max: 8,
        nodelay: true,
        ..Default::default()
    }
}

/// Name of an action as on the wire (`apply`, `get_state`, ...).
fn action_name(action: &Action) -> String {
    serde_json::to_value(action)
        .ok()
        .and_then(|v| v.get("method").and_then(|m| m.as_str()).map(String::from))
        .unwrap_or_else(|| "action".to_string())
}

fn secs_of(d: Duration) -> u64 {
    d.as_secs_f64().ceil() as u64
}

impl AgentClient {
    /// Connect and authenticate; the server's host key must equal
    /// `host_public_key` (OpenSSH) or this fails with
    /// [`ClientError::HostKeyMismatch`].
    pub async fn connect(
        addr: SocketAddr,
        director_key: &KeyPair,
        host_public_key: &str,
        timeout: Duration,
    ) -> Result<AgentClient, ClientError> {
        let key_err = |op: &str, source| ClientError::Key {
            op: op.to_string(),
            addr,
            source,
        };
        let expected = parse_public_key(host_public_key)
            .map_err(|e| key_err("reading the pinned host key", e))?;
        let private = director_key
            .private_key()
            .map_err(|e| key_err("reading the director's private key", e))?;
        let mismatch = Arc::new(AtomicBool::new(false));
        let handler = PinnedHostKey {
            expected,
            mismatch: mismatch.clone(),
        };
        let attempt = async {
            let mut handle = match client::connect(Arc::new(client_config()), addr, handler).await {
                Ok(h) => h,
                Err(_) if mismatch.load(Ordering::SeqCst) => {
                    return Err(ClientError::HostKeyMismatch { addr })
                }
                Err(russh::Error::IO(source)) => {
                    return Err(ClientError::Io {
                        op: "connecting".into(),
                        addr,
                        source,
                    })
                }
                Err(source) => {
                    return Err(ClientError::Ssh {
                        op: "connecting".into(),
                        addr,
                        source,
                    })
                }
            };
            let auth = handle
                .authenticate_publickey(
                    SSH_USER,
                    PrivateKeyWithHashAlg::new(Arc::new(private), None),
                )
                .await
                .map_err(|source| ClientError::Ssh {
                    op: "authenticating".into(),
                    addr,
                    source,
                })?;
            if !auth.success() {
                return Err(ClientError::AuthRejected { addr });
            }
            Ok(handle)
        };
        let handle = match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    action: "connect".into(),
                    addr,
                    secs: secs_of(timeout),
                })
            }
        };
        Ok(AgentClient {
            addr,
            handle: Arc::new(handle),
            next_id: Arc::new(AtomicU64::new(1)),
        })
    }

    /// The agent's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether the underlying SSH connection is gone (reconnect if so).
    pub fn is_closed(&self) -> bool {
        self.handle.is_closed()
    }

    /// Politely end the connection (other clones become unusable).
    pub async fn disconnect(&self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "bye", "en")
            .await;
    }

    fn ssh(&self, op: &str) -> impl FnOnce(russh::Error) -> ClientError + '_ {
        let op = op.to_string();
        move |source| ClientError::Ssh {
            op,
            addr: self.addr,
            source,
        }
    }

    /// Generic call: opens a channel, starts the RPC subsystem, sends one
    /// request and reads one response. `timeout` bounds the whole call.
    pub async fn call(
        &self,
        action: &Action,
        timeout: Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let name = action_name(action);
        // Actions that change the VM are crash-test points; queries are not.
        let changes = !matches!(
            action,
            Action::Ping | Action::GetState | Action::MissingBlobs(_) | Action::FetchLogs(_)
        );
        if changes {
            bosun_cpi::failpoint::hit_with(|| format!("before-agent-{name}"));
        }
        let r = match tokio::time::timeout(timeout, self.call_inner(&name, action)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                action: name.clone(),
                addr: self.addr,
                secs: secs_of(timeout),
            }),
        };
        if changes {
            bosun_cpi::failpoint::hit_with(|| format!("after-agent-{name}"));
        }
        r
    }

    async fn call_inner(
        &self,
        name: &str,
        action: &Action,
    ) -> Result<serde_json::Value, ClientError> {
        let op = format!("calling {name}");
        let protocol_err =
            |what: String| ClientError::Protocol(format!("{op} on agent {}: {what}", self.addr));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let request = RpcRequest {
            id,
            protocol_version: protocol::PROTOCOL_VERSION,
            action: action.clone(),
        };
        let mut line = serde_json::to_vec(&request)
            .map_err(|e| protocol_err(format!("encoding the request: {e}")))?;
        line.push(b'\n');

        let mut channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(self.ssh(&op))?;
        channel
            .request_subsystem(true, protocol::RPC_SUBSYSTEM)
            .await
            .map_err(self.ssh(&op))?;
        channel.data_bytes(line).await.map_err(self.ssh(&op))?;
        channel.eof().await.map_err(self.ssh(&op))?;

        let mut out = Vec::new();
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Failure => {
                    return Err(protocol_err(format!(
                        "the agent refused the RPC subsystem {:?}",
                        protocol::RPC_SUBSYSTEM
                    )))
                }
                ChannelMsg::Data { data } => {
                    out.extend_from_slice(&data);
                    if out.len() > MAX_RESPONSE_BYTES {
                        return Err(protocol_err(format!(
                            "response larger than {MAX_RESPONSE_BYTES} bytes"
                        )));
                    }
                    // One response line is all there is.
                    if out.contains(&b'\n') {
                        break;
                    }
                }
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = channel.close().await;
        let end = out.iter().position(|b| *b == b'\n').unwrap_or(out.len());
        if out[..end].iter().all(|b| b.is_ascii_whitespace()) {
            return Err(protocol_err(
                "the channel closed without a response (agent crashed or restarted?)".into(),
            ));
        }
        let response: RpcResponse = serde_json::from_slice(&out[..end])
            .map_err(|e| protocol_err(format!("decoding the response: {e}")))?;
        if response.id != id && response.id != 0 {
            return Err(protocol_err(format!(
                "response id {} does not match request id {id}",
                response.id
            )));
        }
        match response.error {
            Some(f) => Err(ClientError::Action(f)),
            None => Ok(response.result.unwrap_or(serde_json::Value::Null)),
        }
    }

    async fn call_typed<T: DeserializeOwned>(
        &self,
        action: &Action,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let value = self.call(action, timeout).await?;
        serde_json::from_value(value).map_err(|e| {
            ClientError::Protocol(format!(
                "calling {} on agent {}: decoding the result: {e}",
                action_name(action),
                self.addr
            ))
        })
    }

    async fn call_unit(&self, action: &Action, timeout: Duration) -> Result<(), ClientError> {
        self.call(action, timeout).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<PingResult, ClientError> {
        self.call_typed(&Action::Ping, Duration::from_secs(10))
            .await
    }

    pub async fn get_state(&self) -> Result<AgentState, ClientError> {
        self.call_typed(&Action::GetState, Duration::from_secs(30))
            .await
    }

    pub async fn apply(&self, spec: &ApplySpec) -> Result<(), ClientError> {
        self.call_unit(&Action::Apply(spec.clone()), Duration::from_secs(120))
            .await
    }

    pub async fn start(&self) -> Result<(), ClientError> {
        self.call_unit(&Action::Start, Duration::from_secs(300))
            .await
    }

    /// `get_state` that gives up after `timeout` (the health monitor's heartbeat).
    pub async fn get_state_within(&self, timeout: Duration) -> Result<AgentState, ClientError> {
        self.call_typed(&Action::GetState, timeout).await
    }

    pub async fn install_file(&self, p: &protocol::InstallFileParams) -> Result<(), ClientError> {
        self.call_unit(&Action::InstallFile(p.clone()), Duration::from_secs(300))
            .await
    }

    pub async fn pack_disk(&self) -> Result<FetchLogsResult, ClientError> {
        self.call_typed(&Action::PackDisk, Duration::from_secs(3600))
            .await
    }

    pub async fn unpack_disk(&self, sha256: &str) -> Result<(), ClientError> {
        self.call_unit(
            &Action::UnpackDisk(protocol::UnpackDiskParams {
                sha256: sha256.to_string(),
            }),
            Duration::from_secs(3600),
        )
        .await
    }

    pub async fn restart_jobs(&self, p: &RestartJobsParams) -> Result<(), ClientError> {
        self.call_unit(&Action::RestartJobs(p.clone()), Duration::from_secs(300))
            .await
    }

    pub async fn stop(&self) -> Result<(), ClientError> {
        self.call_unit(&Action::Stop, Duration::from_secs(300))
            .await
    }

    pub async fn drain(&self, p: &DrainParams) -> Result<DrainResult, ClientError> {
        let t = Duration::from_secs(p.timeout_secs.saturating_add(30));
        self.call_typed(&Action::Drain(p.clone()), t).await
    }

    pub async fn run_script(&self, p: &RunScriptParams) -> Result<ScriptResults, ClientError> {
        let t = Duration::from_secs(p.timeout_secs.saturating_add(30));
        self.call_typed(&Action::RunScript(p.clone()), t).await
    }

    pub async fn compile_package(&self, r: &CompileRequest) -> Result<CompileResult, ClientError> {
        let t = Duration::from_secs(r.timeout_secs.saturating_add(30));
        self.call_typed(&Action::CompilePackage(r.clone()), t).await
    }

    pub async fn fetch_logs(&self, p: &FetchLogsParams) -> Result<FetchLogsResult, ClientError> {
        self.call_typed(&Action::FetchLogs(p.clone()), Duration::from_secs(300))
            .await
    }

    pub async fn mount_disk(&self, p: &MountDiskParams) -> Result<(), ClientError> {
        self.call_unit(&Action::MountDisk(p.clone()), Duration::from_secs(300))
            .await
    }

    pub async fn unmount_disk(&self, p: &UnmountDiskParams) -> Result<(), ClientError> {
        self.call_unit(&Action::UnmountDisk(p.clone()), Duration::from_secs(300))
            .await
    }

    pub async fn missing_blobs(&self, sha256s: &[String]) -> Result<Vec<String>, ClientError> {
        let action = Action::MissingBlobs(MissingBlobsParams {
            sha256s: sha256s.to_vec(),
        });
        self.call_typed(&action, Duration::from_secs(30)).await
    }

    /// Upload a blob; the agent verifies its sha256 before keeping it.
    pub async fn put_blob(&self, sha256: &str, data: &[u8]) -> Result<(), ClientError> {
        let op = format!("putting blob {sha256}");
        if !is_valid_name(sha256) {
            return Err(self.blob_err(&op, "not a sha256 (64 lowercase hex characters)".into()));
        }
        // 60 s plus 1 s per 512 KiB (a slow link still gets ~0.5 MB/s).
        let timeout = Duration::from_secs(60 + (data.len() as u64) / (512 * 1024));
        let transfer = async {
            let mut channel = self.open_exec(&op, format!("put-blob {sha256}")).await?;
            channel
                .data_bytes(data.to_vec())
                .await
                .map_err(self.ssh(&op))?;
            channel.eof().await.map_err(self.ssh(&op))?;
            let (_, stderr, status) = self.collect(&mut channel, &op, false).await?;
            match status {
                Some(0) => Ok(()),
                _ => Err(self.blob_err(&op, stderr_message(&stderr, status))),
            }
        };
        self.bounded(&op, timeout, transfer).await
    }

    /// Run a shell command on the VM (as `bosun ssh -c`): (stdout, stderr,
    /// exit status).
    pub async fn run_command(
        &self,
        command: &str,
        timeout: Duration,
    ) -> Result<(Vec<u8>, Vec<u8>, u32), ClientError> {
        let op = format!("running {command:?}");
        let run = async {
            let mut channel = self.open_exec(&op, format!("run {command}")).await?;
            channel.eof().await.map_err(self.ssh(&op))?;
            let (out, err, status) = self.collect(&mut channel, &op, true).await?;
            Ok((out, err, status.unwrap_or(255)))
        };
        self.bounded(&op, timeout, run).await
    }

    /// Run a shell command on the VM and hand its output to `sink` as it
    /// comes, until it ends (returns its exit status) or `stop` resolves
    /// (returns `None`; the command is stopped).
    pub async fn stream_command(
        &self,
        command: &str,
        mut sink: impl FnMut(&[u8]),
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Option<u32>, ClientError> {
        let op = format!("streaming {command:?}");
        let mut channel = self.open_exec(&op, format!("stream {command}")).await?;
        tokio::pin!(stop);
        let mut status = None;
        loop {
            tokio::select! {
                msg = channel.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => sink(&data),
                    Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                    Some(ChannelMsg::Failure) => {
                        return Err(self.blob_err(&op, "the agent refused the command".into()))
                    }
                    None | Some(ChannelMsg::Close) => return Ok(status),
                    Some(_) => {}
                },
                () = &mut stop => {
                    let _ = channel.close().await;
                    return Ok(None);
                }
            }
        }
    }

    /// An interactive login shell on a pty of `size` (cols, rows): bytes
    /// from `input` go to it, its output goes to `output`, sizes from
    /// `resize` resize it. Ends when the shell exits (its exit status) or
    /// `input` closes and the shell then exits.
    pub async fn interactive_shell(
        &self,
        term: &str,
        size: (u16, u16),
        mut input: tokio::sync::mpsc::Receiver<Vec<u8>>,
        mut resize: tokio::sync::mpsc::Receiver<(u16, u16)>,
        mut output: impl FnMut(&[u8]),
    ) -> Result<u32, ClientError> {
        let op = "opening an interactive shell".to_string();
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(self.ssh(&op))?;
        channel
            .request_pty(true, term, u32::from(size.0), u32::from(size.1), 0, 0, &[])
            .await
            .map_err(self.ssh(&op))?;
        channel.request_shell(true).await.map_err(self.ssh(&op))?;
        let (mut read, write) = channel.split();
        let mut input_open = true;
        let mut status = None;
        loop {
            tokio::select! {
                msg = read.wait() => match msg {
                    Some(ChannelMsg::Data { data }) => output(&data),
                    Some(ChannelMsg::ExtendedData { data, .. }) => output(&data),
                    Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
                    Some(ChannelMsg::Failure) => {
                        return Err(self.blob_err(&op, "the agent refused a shell".into()))
                    }
                    None | Some(ChannelMsg::Close) => break,
                    Some(_) => {}
                },
                data = input.recv(), if input_open => match data {
                    Some(data) => write.data(&data[..]).await.map_err(self.ssh(&op))?,
                    None => {
                        input_open = false;
                        write.eof().await.map_err(self.ssh(&op))?;
                    }
                },
                Some((cols, rows)) = resize.recv() => {
                    write
                        .window_change(u32::from(cols), u32::from(rows), 0, 0)
                        .await
                        .map_err(self.ssh(&op))?;
                }
            }
        }
        status.ok_or_else(|| self.blob_err(&op, "the shell ended without an exit status".into()))
    }

    /// Download a blob and verify its sha256.
    pub async fn get_blob(&self, sha256: &str) -> Result<Vec<u8>, ClientError> {
        let op = format!("getting blob {sha256}");
        if !is_valid_name(sha256) {
            return Err(self.blob_err(&op, "not a sha256 (64 lowercase hex characters)".into()));
        }
        let transfer = async {
            let mut channel = self.open_exec(&op, format!("get-blob {sha256}")).await?;
            channel.eof().await.map_err(self.ssh(&op))?;
            let (data, stderr, status) = self.collect(&mut channel, &op, true).await?;
            if status != Some(0) {
                return Err(self.blob_err(&op, stderr_message(&stderr, status)));
            }
            let actual = sha256_hex(&data);
            if actual != sha256 {
                return Err(self.blob_err(
                    &op,
                    format!(
                        "received {} bytes with sha256 {actual}; discarded",
                        data.len()
                    ),
                ));
            }
            Ok(data)
        };
        self.bounded(&op, GET_BLOB_TIMEOUT, transfer).await
    }

    fn blob_err(&self, op: &str, message: String) -> ClientError {
        ClientError::Blob {
            op: op.to_string(),
            addr: self.addr,
            message,
        }
    }

    async fn bounded<T>(
        &self,
        op: &str,
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                action: op.to_string(),
                addr: self.addr,
                secs: secs_of(timeout),
            }),
        }
    }

    /// Open a session channel and start `command` on it.
    async fn open_exec(
        &self,
        op: &str,
        command: String,
    ) -> Result<russh::Channel<client::Msg>, ClientError> {
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(self.ssh(op))?;
        channel.exec(true, command).await.map_err(self.ssh(op))?;
        Ok(channel)
    }

    /// Read an exec channel to its end: (stdout, stderr, exit status).
    async fn collect(
        &self,
        channel: &mut russh::Channel<client::Msg>,
        op: &str,
        keep_stdout: bool,
    ) -> Result<(Vec<u8>, Vec<u8>, Option<u32>), ClientError> {
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let mut status = None;
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Failure => {
                    return Err(self.blob_err(op, "the agent refused the command".into()))
                }
                ChannelMsg::Data { data } if keep_stdout => stdout.extend_from_slice(&data),
                ChannelMsg::ExtendedData { data, .. } if stderr.len() < 64 * 1024 => {
                    stderr.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        Ok((stdout, stderr, status))
    }
}

fn stderr_message(stderr: &[u8], status: Option<u32>) -> String {
    let text = String::from_utf8_lossy(stderr).trim().to_string();
    match (text.is_empty(), status) {
        (false, _) => text,
        (true, Some(s)) => format!("failed with exit status {s} and no message"),
        (true, None) => "the channel closed without an exit status".into(),
    }
}

/// Retry connect+ping (every ~100 ms, doubling to 1 s) until the agent
/// answers or `timeout` passes, then [`ClientError::Unreachable`].
/// A live SSH server that presents the wrong host key or rejects the
/// director's key is a definitive answer: those errors return at once.
pub async fn wait_for_agent(
    addr: SocketAddr,
    director_key: &KeyPair,
    host_public_key: &str,
    timeout: Duration,
) -> Result<AgentClient, ClientError> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut delay = Duration::from_millis(100);
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let remaining = deadline - now;
        let attempt = async {
            let client = AgentClient::connect(
                addr,
                director_key,
                host_public_key,
                remaining.min(Duration::from_secs(10)),
            )
            .await?;
            client.ping().await?;
            Ok::<_, ClientError>(client)
        };
        match tokio::time::timeout(remaining, attempt).await {
            Ok(Ok(client)) => return Ok(client),
            Ok(Err(
                e @ (ClientError::HostKeyMismatch { .. } | ClientError::AuthRejected { .. }),
            ))
            | Ok(Err(e @ ClientError::Key { .. })) => return Err(e),
            Ok(Err(e)) => tracing::debug!(%addr, error = %e, "agent not answering yet"),
            Err(_) => break,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(delay.min(deadline - now)).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
    Err(ClientError::Unreachable {
        addr,
        secs: secs_of(started.elapsed()),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::blobs::BlobStore;
    use crate::keys::generate_keypair;
    use crate::protocol::{ProcessState, Vitals};
    use crate::server::{serve_on, ActionHandler};

    struct TestHandler {
        /// Start waits here: it completes only when two Starts run at once.
        barrier: Arc<tokio::sync::Barrier>,
    }

    fn fixed_state() -> AgentState {
        AgentState {
            agent_id: "agent-1".into(),
            protocol_version: protocol::PROTOCOL_VERSION,
            generation: 3,
            spec: None,
            job_state: ProcessState::Running,
            jobs: vec![],
            persistent_disk: Some("disk-9".into()),
            vitals: Vitals::default(),
        }
    }

    #[async_trait::async_trait]
    impl ActionHandler for TestHandler {
        async fn handle(&self, action: Action) -> Result<serde_json::Value, ActionFailure> {
            match action {
                Action::Ping => Ok(serde_json::to_value(PingResult {
                    agent_id: "agent-1".into(),
                    protocol_version: protocol::PROTOCOL_VERSION,
                })
                .unwrap()),
                Action::GetState => Ok(serde_json::to_value(fixed_state()).unwrap()),
                Action::Start => {
                    self.barrier.wait().await;
                    Ok(serde_json::Value::Null)
                }
                Action::Stop => Err(ActionFailure {
                    kind: "script_failed".into(),
                    message: "stopping job web: bin/pre-stop exited 3".into(),
                    output_tail: Some("disk full".into()),
                }),
                other => Err(ActionFailure {
                    kind: "invalid".into(),
                    message: format!("test handler does not do {other:?}"),
                    output_tail: None,
                }),
            }
        }
    }

    struct Fixture {
        addr: SocketAddr,
        director: KeyPair,
        host: KeyPair,
        blobs: Arc<BlobStore>,
        _dir: tempfile::TempDir,
    }

    async fn start_agent() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let director = generate_keypair().unwrap();
        let host = generate_keypair().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = bosun_cpi::AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: director.public_openssh.clone(),
            host_private_key: host.private_openssh.clone(),
            listen_ip: "127.0.0.1".into(),
            listen_port: addr.port(),
            networks: BTreeMap::new(),
            disks: BTreeMap::new(),
            env: serde_json::Value::Null,
        };
        let blobs = Arc::new(BlobStore::open(dir.path().join("blobs")).unwrap());
        let handler = Arc::new(TestHandler {
            barrier: Arc::new(tokio::sync::Barrier::new(2)),
        });
        let served = blobs.clone();
        tokio::spawn(async move {
            serve_on(listener, &settings, served, handler)
                .await
                .unwrap();
        });
        Fixture {
            addr,
            director,
            host,
            blobs,
            _dir: dir,
        }
    }

    const T: Duration = Duration::from_secs(20);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn end_to_end_transport() {
        let f = start_agent().await;
        let client = AgentClient::connect(f.addr, &f.director, &f.host.public_openssh, T)
            .await
            .unwrap();

        // ping and typed results
        let ping = client.ping().await.unwrap();
        assert_eq!(ping.agent_id, "agent-1");
        assert_eq!(client.get_state().await.unwrap(), fixed_state());

        // the handler's failure surfaces as ClientError::Action
        let err = client.stop().await.unwrap_err();
        let failure = err.failure().expect("an action failure");
        assert_eq!(failure.kind, "script_failed");
        let shown = err.to_string();
        assert!(
            shown.contains("bin/pre-stop exited 3") && shown.contains("disk full"),
            "{shown}"
        );

        // blobs: 5 MB round trip
        let data: Vec<u8> = (0..5 * 1024 * 1024u32)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let sha = sha256_hex(&data);
        client.put_blob(&sha, &data).await.unwrap();
        assert!(f.blobs.has(&sha));
        assert_eq!(client.get_blob(&sha).await.unwrap(), data);

        // wrong sha on put is rejected and nothing is kept
        let wrong = sha256_hex(b"something else");
        let err = client.put_blob(&wrong, b"payload").await.unwrap_err();
        assert!(matches!(err, ClientError::Blob { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(!f.blobs.has(&wrong));

        // a missing blob cannot be fetched
        let err = client.get_blob(&wrong).await.unwrap_err();
        assert!(err.to_string().contains("not found"), "{err}");

        // two concurrent calls both succeed (each Start waits for the other)
        let other = client.clone();
        let (a, b) = tokio::join!(
            client.call(&Action::Start, T),
            other.call(&Action::Start, T)
        );
        a.unwrap();
        b.unwrap();

        // the connection still works afterwards
        client.ping().await.unwrap();
        client.disconnect().await;
    }

    #[tokio::test]
    async fn wrong_director_key_is_rejected() {
        let f = start_agent().await;
        let intruder = generate_keypair().unwrap();
        let err = AgentClient::connect(f.addr, &intruder, &f.host.public_openssh, T)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::AuthRejected { .. }), "{err}");
        assert!(err.to_string().contains(&f.addr.to_string()));

        // neither "none" nor password authentication is accepted
        let handler = PinnedHostKey {
            expected: parse_public_key(&f.host.public_openssh).unwrap(),
            mismatch: Arc::new(AtomicBool::new(false)),
        };
        let mut raw = client::connect(Arc::new(client_config()), f.addr, handler)
            .await
            .unwrap();
        assert!(!raw.authenticate_none("bosun").await.unwrap().success());
        assert!(!raw
            .authenticate_password("bosun", "bosun")
            .await
            .unwrap()
            .success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn large_blob_round_trip() {
        let f = start_agent().await;
        let client = AgentClient::connect(f.addr, &f.director, &f.host.public_openssh, T)
            .await
            .unwrap();
        let data: Vec<u8> = (0..50 * 1024 * 1024u32)
            .map(|i| (i ^ (i >> 9)) as u8)
            .collect();
        let sha = sha256_hex(&data);
        let started = Instant::now();
        client.put_blob(&sha, &data).await.unwrap();
        let back = client.get_blob(&sha).await.unwrap();
        assert!(back == data);
        eprintln!("50 MB up and down in {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn wrong_host_key_is_refused() {
        let f = start_agent().await;
        let other = generate_keypair().unwrap();
        let err = AgentClient::connect(f.addr, &f.director, &other.public_openssh, T)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::HostKeyMismatch { .. }), "{err}");
        // wait_for_agent does not keep retrying a definitive answer
        let err = wait_for_agent(f.addr, &f.director, &other.public_openssh, T)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::HostKeyMismatch { .. }), "{err}");
    }

    #[tokio::test]
    async fn wait_for_agent_finds_a_live_agent_and_gives_up_on_a_dead_one() {
        let f = start_agent().await;
        let client = wait_for_agent(f.addr, &f.director, &f.host.public_openssh, T)
            .await
            .unwrap();
        client.ping().await.unwrap();

        let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = unused.local_addr().unwrap();
        drop(unused);
        let started = Instant::now();
        let err = wait_for_agent(
            dead,
            &f.director,
            &f.host.public_openssh,
            Duration::from_millis(700),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err}");
        assert!(err.to_string().contains(&dead.to_string()), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

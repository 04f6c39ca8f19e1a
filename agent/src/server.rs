//! The agent's embedded SSH server (russh): the transport of the director ↔
//! agent protocol.
//!
//! Owns: the host key (from the agent settings), authentication (only the
//! director's public key, nothing else), the RPC subsystem
//! ([`protocol::RPC_SUBSYSTEM`]: one JSON request line in, one JSON response
//! line out per channel) and the blob channels (`exec put-blob <sha256>` /
//! `exec get-blob <sha256>`), which it serves from the [`BlobStore`].
//!
//! It also serves the operator's `bosun ssh`: `exec run <cmd>` and
//! `exec stream <cmd>` run a command, and a `pty-req` followed by `shell`
//! starts an interactive login shell on a pseudo-terminal (resized by
//! `window-change`). Only the director's key gets in, so a session creates
//! no user or key on the VM and leaves nothing behind.
//!
//! Unauthenticated connections are bounded so that a flood of idle TCP
//! connections cannot take the agent down: each must authenticate within
//! [`AUTH_DEADLINE`]; at most [`Limits::max_unauthenticated`] wait at once
//! (and [`Limits::max_unauthenticated_per_source`] from one address), the
//! one that sent the fewest bytes (the oldest of those) being closed to make
//! room for a new one: an idle flood never pushes out a client in the middle
//! of its handshake, which the director is for milliseconds; the
//! descriptor limit is raised to its hard limit at start and the caps keep
//! [`FD_RESERVE`] descriptors for authenticated sessions.
//!
//! It must not interpret actions: every action goes to the [`ActionHandler`]
//! (the agent proper). It must not offer port forwarding, agent forwarding
//! or any other SSH service, and it keeps no blob it has not verified.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use russh::server::{Auth, ChannelOpenHandle, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;

use crate::blobs::{is_valid_name, BlobError, BlobStore};
use crate::keys::{parse_private_key, parse_public_key, same_key, KeyError};
use crate::protocol::{self, Action, ActionFailure, RpcRequest, RpcResponse};
use bosun_cpi::chain::chain;

/// Largest RPC request line the server accepts (an apply spec carries every
/// rendered template, so this is generous).
const MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;
/// Chunk size when streaming a blob to the client.
const BLOB_CHUNK: usize = 32 * 1024;
/// SSH extended-data code of stderr.
const STDERR: u32 = 1;
/// How long a connection may take from TCP accept to a successful
/// authentication (the director needs milliseconds).
pub const AUTH_DEADLINE: Duration = Duration::from_secs(5);
/// Descriptors never handed to unauthenticated connections: authenticated
/// sessions, their channels, job processes' pipes and blob files use them.
pub const FD_RESERVE: u64 = 512;
/// Upper bound of [`Limits::max_unauthenticated`].
const MAX_UNAUTHENTICATED: usize = 256;
/// At most one warning about closed unauthenticated connections per this.
const FLOOD_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The agent proper: answers one action.
#[async_trait::async_trait]
pub trait ActionHandler: Send + Sync + 'static {
    async fn handle(&self, action: Action) -> Result<serde_json::Value, ActionFailure>;
}

/// Why the server could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("agent SSH server: host_private_key in agent settings")]
    HostKey(#[source] KeyError),
    #[error("agent SSH server: director_public_key in agent settings")]
    DirectorKey(#[source] KeyError),
    #[error("agent SSH server: binding {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// Bounds on connections that have not authenticated yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// From accept to successful authentication.
    pub auth_deadline: Duration,
    /// Unauthenticated connections at once, from all sources.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections at once from one IP address.
    pub max_unauthenticated_per_source: usize,
}

impl Limits {
    /// The limits for a process allowed `nofile` open descriptors: what is
    /// left after [`FD_RESERVE`], halved (the agent opens descriptors of its
    /// own), at most [`MAX_UNAUTHENTICATED`]; a quarter of that per source.
    pub fn for_descriptors(nofile: u64) -> Limits {
        let spare = nofile.saturating_sub(FD_RESERVE) / 2;
        let total = usize::try_from(spare)
            .unwrap_or(MAX_UNAUTHENTICATED)
            .clamp(8, MAX_UNAUTHENTICATED);
        Limits {
            auth_deadline: AUTH_DEADLINE,
            max_unauthenticated: total,
            max_unauthenticated_per_source: (total / 4).max(2),
        }
    }
}

/// Raise this process's soft RLIMIT_NOFILE to its hard limit; the soft
/// limit in force afterwards.
pub fn raise_descriptor_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim = raised;
    }
    Ok(lim.rlim_cur)
}

/// Bind `settings.listen_ip:settings.listen_port` and serve forever.
pub async fn serve(
    settings: &bosun_cpi::AgentSettings,
    blobs: Arc<BlobStore>,
    handler: Arc<dyn ActionHandler>,
) -> Result<(), ServerError> {
    let ip = settings.listen_ip.trim();
    let ip = if ip.is_empty() { "0.0.0.0" } else { ip };
    let listener = TcpListener::bind((ip, settings.listen_port))
        .await
        .map_err(|source| ServerError::Bind {
            addr: format!("{ip}:{}", settings.listen_port),
            source,
        })?;
    let nofile = match raise_descriptor_limit() {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "raising the open-files limit (RLIMIT_NOFILE) failed; keeping it");
            1024
        }
    };
    let limits = Limits::for_descriptors(nofile);
    tracing::info!(
        nofile,
        max_unauthenticated = limits.max_unauthenticated,
        per_source = limits.max_unauthenticated_per_source,
        "connection limits"
    );
    serve_with_limits(listener, settings, blobs, handler, limits).await
}

/// Same as [`serve`], on an already bound listener (tests bind 127.0.0.1:0),
/// with the limits of a 1024-descriptor process.
pub async fn serve_on(
    listener: TcpListener,
    settings: &bosun_cpi::AgentSettings,
    blobs: Arc<BlobStore>,
    handler: Arc<dyn ActionHandler>,
) -> Result<(), ServerError> {
    serve_with_limits(
        listener,
        settings,
        blobs,
        handler,
        Limits::for_descriptors(1024),
    )
    .await
}

/// [`serve_on`] with explicit limits on unauthenticated connections.
pub async fn serve_with_limits(
    listener: TcpListener,
    settings: &bosun_cpi::AgentSettings,
    blobs: Arc<BlobStore>,
    handler: Arc<dyn ActionHandler>,
    limits: Limits,
) -> Result<(), ServerError> {
    let host_key = parse_private_key(&settings.host_private_key).map_err(ServerError::HostKey)?;
    let director_key =
        parse_public_key(&settings.director_public_key).map_err(ServerError::DirectorKey)?;
    let config = Arc::new(server_config(host_key));
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    tracing::info!(addr = %local, "agent SSH server listening");
    let gate = Arc::new(Gate::new(limits));

    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Typically EMFILE: back off a little and keep serving.
                tracing::warn!(addr = %local, error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (stream, admission) = gate.admit(stream, peer.ip());
        let conn = Connection {
            admission,
            director_key: director_key.clone(),
            blobs: blobs.clone(),
            actions: handler.clone(),
            channels: HashMap::new(),
            ptys: HashMap::new(),
            resizers: HashMap::new(),
            peer,
        };
        let config = config.clone();
        tokio::spawn(async move {
            tracing::debug!(%peer, "SSH connection");
            let result = match russh::server::run_stream(config, stream, conn).await {
                Ok(session) => session.await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => tracing::debug!(%peer, "SSH connection closed"),
                Err(e) => tracing::debug!(%peer, error = %e, "SSH connection ended"),
            }
        });
    }
}

fn server_config(host_key: russh::keys::PrivateKey) -> russh::server::Config {
    let mut methods = russh::MethodSet::empty();
    methods.push(russh::MethodKind::PublicKey);
    russh::server::Config {
        methods,
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 3,
        // Actions may run for many minutes without a byte on the wire
        // (compilation, drain): never drop a connection for being quiet;
        // keepalives detect dead peers instead (~5 minutes).
        inactivity_timeout: None,
        keepalive_interval: Some(Duration::from_secs(60)),
        keepalive_max: 5,
        nodelay: true,
        ..Default::default()
    }
}

/// Why an unauthenticated connection is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Closed {
    Deadline,
    Evicted,
}

impl Closed {
    fn message(self) -> &'static str {
        match self {
            Closed::Deadline => "no successful authentication within the deadline",
            Closed::Evicted => "closed to make room: too many connections waiting to authenticate",
        }
    }
}

/// The unauthenticated connections waiting, oldest first.
struct Gate {
    limits: Limits,
    inner: Mutex<GateInner>,
}

struct GateInner {
    next_id: u64,
    /// By admission order (ids only grow), so the first is the oldest.
    waiting: BTreeMap<u64, Waiting>,
    /// Connections closed (deadline or eviction) since the last warning.
    closed_since_warning: u64,
    last_warning: Option<Instant>,
}

struct Waiting {
    source: IpAddr,
    /// Sending (or dropping) it closes the connection if still unauthenticated.
    evict: tokio::sync::oneshot::Sender<()>,
    /// Bytes the client sent so far: a real client is mid-handshake, an
    /// idle flood has sent nothing.
    received: Arc<AtomicU64>,
}

impl Gate {
    fn new(limits: Limits) -> Gate {
        Gate {
            limits,
            inner: Mutex::new(GateInner {
                next_id: 0,
                waiting: BTreeMap::new(),
                closed_since_warning: 0,
                last_warning: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a new connection, first closing a waiting one from the same
    /// source (or from any) when a cap is reached: the one that sent the
    /// fewest bytes, the oldest of those (so an idle flood makes room for a
    /// client in the middle of its handshake, never the other way round).
    fn admit<S>(self: &Arc<Self>, stream: S, source: IpAddr) -> (Guarded<S>, Admission) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let received = Arc::new(AtomicU64::new(0));
        let mut inner = self.lock();
        let same_source = inner
            .waiting
            .values()
            .filter(|w| w.source == source)
            .count();
        if same_source >= self.limits.max_unauthenticated_per_source {
            if let Some(id) = inner.least_advanced(|w| w.source == source) {
                inner.evict(id);
            }
        }
        if inner.waiting.len() >= self.limits.max_unauthenticated {
            if let Some(id) = inner.least_advanced(|_| true) {
                inner.evict(id);
            }
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.waiting.insert(
            id,
            Waiting {
                source,
                evict: tx,
                received: received.clone(),
            },
        );
        drop(inner);
        let authenticated = Arc::new(AtomicBool::new(false));
        let deadline = self.limits.auth_deadline;
        let kill = Box::pin(async move {
            tokio::select! {
                () = tokio::time::sleep(deadline) => Closed::Deadline,
                _ = rx => Closed::Evicted,
            }
        });
        let admission = Admission {
            gate: self.clone(),
            id,
            authenticated: authenticated.clone(),
        };
        let guarded = Guarded {
            inner: stream,
            authenticated,
            received,
            kill: Some(kill),
            closed: None,
            ticket: Ticket {
                gate: self.clone(),
                id,
            },
        };
        (guarded, admission)
    }

    /// Forget a connection (authenticated or gone).
    fn forget(&self, id: u64) {
        self.lock().waiting.remove(&id);
    }

    /// Count a connection closed by the deadline or the cap; warn now and then.
    fn closed(&self, why: Closed) {
        let mut inner = self.lock();
        inner.closed_since_warning += 1;
        let due = inner
            .last_warning
            .is_none_or(|t| t.elapsed() >= FLOOD_WARNING_EVERY);
        if due {
            tracing::warn!(
                closed = inner.closed_since_warning,
                waiting = inner.waiting.len(),
                last_reason = why.message(),
                "closed unauthenticated SSH connections"
            );
            inner.closed_since_warning = 0;
            inner.last_warning = Some(Instant::now());
        }
    }

    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }
}

impl GateInner {
    /// Of the waiting connections `which` selects, the one that sent the
    /// fewest bytes (the oldest of those).
    fn least_advanced(&self, which: impl Fn(&Waiting) -> bool) -> Option<u64> {
        self.waiting
            .iter()
            .filter(|(_, w)| which(w))
            .min_by_key(|(id, w)| (w.received.load(Ordering::Relaxed), **id))
            .map(|(id, _)| *id)
    }

    fn evict(&mut self, id: u64) {
        if let Some(w) = self.waiting.remove(&id) {
            // An error means the connection already ended: nothing to close.
            let _ = w.evict.send(());
        }
    }
}

/// A connection's place in the [`Gate`] until it authenticates.
struct Admission {
    gate: Arc<Gate>,
    id: u64,
    authenticated: Arc<AtomicBool>,
}

impl Admission {
    /// The connection authenticated: no deadline, no eviction any more.
    fn authenticated(&self) {
        self.authenticated.store(true, Ordering::Release);
        self.gate.forget(self.id);
    }
}

/// Removes its connection from the [`Gate`] when the connection ends.
struct Ticket {
    gate: Arc<Gate>,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.gate.forget(self.id);
    }
}

/// A connection's stream that fails (and so ends the SSH session, which
/// closes the socket) once the deadline passes or the gate evicts it, unless
/// it authenticated first.
struct Guarded<S> {
    inner: S,
    authenticated: Arc<AtomicBool>,
    /// Bytes read so far (counted until authentication).
    received: Arc<AtomicU64>,
    kill: Option<Pin<Box<dyn Future<Output = Closed> + Send>>>,
    /// Set once `kill` completed (it must not be polled again).
    closed: Option<Closed>,
    ticket: Ticket,
}

impl<S> Guarded<S> {
    /// Ok while the stream may be used; registers the waker on the deadline.
    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if let Some(why) = self.closed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                why.message(),
            ));
        }
        if self.authenticated.load(Ordering::Acquire) {
            self.kill = None;
            return Ok(());
        }
        if let Some(kill) = self.kill.as_mut() {
            if let Poll::Ready(why) = kill.as_mut().poll(cx) {
                self.kill = None;
                self.closed = Some(why);
                self.ticket.gate.closed(why);
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    why.message(),
                ));
            }
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if this.kill.is_some() {
            let n = buf.filled().len().saturating_sub(before);
            this.received.fetch_add(n as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One SSH connection from the director.
struct Connection {
    /// Until authentication succeeds: subject to the deadline and the caps.
    admission: Admission,
    director_key: russh::keys::PublicKey,
    blobs: Arc<BlobStore>,
    actions: Arc<dyn ActionHandler>,
    /// Session channels opened but not yet given a request.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// Terminals requested (`pty-req`) on channels not yet given a shell.
    ptys: HashMap<ChannelId, PtyRequest>,
    /// Running shells' resize inboxes (`window-change`).
    resizers: HashMap<ChannelId, tokio::sync::mpsc::UnboundedSender<(u16, u16)>>,
    peer: SocketAddr,
}

/// What a `pty-req` asked for.
struct PtyRequest {
    term: String,
    cols: u16,
    rows: u16,
}

/// A terminal dimension as the pty takes it (0, meaning unknown, and
/// absurd values become a sane default).
fn dimension(v: u32, default: u16) -> u16 {
    match u16::try_from(v) {
        Ok(0) | Err(_) => default,
        Ok(v) => v,
    }
}

impl Connection {
    fn key_auth(&self, key: &russh::keys::PublicKey) -> Auth {
        if same_key(key, &self.director_key) {
            Auth::Accept
        } else {
            tracing::warn!(peer = %self.peer, "rejected SSH key that is not the director's");
            Auth::reject()
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    // auth_none, auth_password, auth_keyboard_interactive and
    // auth_openssh_certificate keep russh's defaults: reject.

    async fn auth_succeeded(&mut self, _session: &mut Session) -> Result<(), Self::Error> {
        self.admission.authenticated();
        Ok(())
    }

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.key_auth(offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.key_auth(key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    // Other channel types (direct-tcpip, x11, ...) keep russh's default:
    // the open handle is dropped, which rejects them.

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        self.ptys.remove(&channel);
        self.resizers.remove(&channel);
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel_id: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name != protocol::RPC_SUBSYSTEM {
            tracing::warn!(peer = %self.peer, subsystem = name, "unknown subsystem requested");
            return session.channel_failure(channel_id);
        }
        let Some(channel) = self.channels.remove(&channel_id) else {
            return session.channel_failure(channel_id);
        };
        session.channel_success(channel_id)?;
        let actions = self.actions.clone();
        tokio::spawn(serve_rpc(channel, actions));
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel_id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.channels.remove(&channel_id) else {
            return session.channel_failure(channel_id);
        };
        session.channel_success(channel_id)?;
        let command = String::from_utf8_lossy(data).into_owned();
        tokio::spawn(serve_exec(channel, command, self.blobs.clone()));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel_id: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self.channels.contains_key(&channel_id) {
            return session.channel_failure(channel_id);
        }
        let term = if term.is_empty() || term.len() > 64 {
            "xterm".to_string()
        } else {
            term.to_string()
        };
        self.ptys.insert(
            channel_id,
            PtyRequest {
                term,
                cols: dimension(col_width, 80),
                rows: dimension(row_height, 24),
            },
        );
        session.channel_success(channel_id)
    }

    async fn shell_request(
        &mut self,
        channel_id: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.channels.remove(&channel_id) else {
            return session.channel_failure(channel_id);
        };
        // A shell needs a terminal: commands without one go through `exec`.
        let Some(pty) = self.ptys.remove(&channel_id) else {
            tracing::warn!(peer = %self.peer, "shell requested without a pty");
            return session.channel_failure(channel_id);
        };
        session.channel_success(channel_id)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.resizers.insert(channel_id, tx);
        tracing::info!(peer = %self.peer, term = %pty.term, "interactive shell opened");
        tokio::spawn(serve_shell(channel, pty, rx));
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel_id: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.resizers.get(&channel_id) {
            let _ = tx.send((dimension(col_width, 80), dimension(row_height, 24)));
        }
        Ok(())
    }
}

/// The shell an interactive session runs: bash where the stemcell has it.
fn login_shell() -> &'static str {
    if std::path::Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    }
}

/// One interactive shell: a login shell on a fresh pty, its output to the
/// channel, the channel's data to it, until it exits (its status is sent)
/// or the client goes away (it is killed).
async fn serve_shell(
    channel: Channel<Msg>,
    pty: PtyRequest,
    mut resize: tokio::sync::mpsc::UnboundedReceiver<(u16, u16)>,
) {
    use tokio::io::AsyncWriteExt;
    let (mut read, write) = channel.split();
    let started = (|| {
        let (master, pts) = pty_process::open()?;
        master.resize(pty_process::Size::new(pty.rows, pty.cols))?;
        let cwd = if std::path::Path::new("/var/vcap").is_dir() {
            "/var/vcap"
        } else {
            "/"
        };
        let child = pty_process::Command::new(login_shell())
            .arg("-l")
            .env("TERM", &pty.term)
            .current_dir(cwd)
            .kill_on_drop(true)
            .spawn(pts)?;
        Ok::<_, pty_process::Error>((master, child))
    })();
    let (master, mut child) = match started {
        Ok(s) => s,
        Err(e) => {
            let message = format!("starting a shell on a pty: {e}");
            tracing::warn!(error = %message, "interactive shell failed");
            let _ = finish(&write, None, Some(message), 127).await;
            return;
        }
    };
    let (mut from_shell, mut to_shell) = master.into_split();
    let mut buf = vec![0u8; 16 * 1024];
    let mut client_gone = false;
    let status = loop {
        tokio::select! {
            n = from_shell.read(&mut buf) => match n {
                // EIO once the shell and everything it started closed the pty.
                Ok(0) | Err(_) => break child.wait().await.ok(),
                Ok(n) => {
                    if write.data_bytes(buf[..n].to_vec()).await.is_err() {
                        client_gone = true;
                        break None;
                    }
                }
            },
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if to_shell.write_all(&data).await.is_err() {
                        break child.wait().await.ok();
                    }
                }
                // The client's input ended (`echo cmd | bosun ssh`): end
                // of input on a terminal is Ctrl-D.
                Some(ChannelMsg::Eof) => {
                    let _ = to_shell.write_all(b"\x04").await;
                }
                None | Some(ChannelMsg::Close) => {
                    client_gone = true;
                    break None;
                }
                Some(_) => {}
            },
            Some((cols, rows)) = resize.recv() => {
                let _ = to_shell.resize(pty_process::Size::new(rows, cols));
            }
            status = child.wait() => {
                // Send what the shell wrote last, then its status.
                while let Ok(Ok(n)) = tokio::time::timeout(
                    Duration::from_millis(100),
                    from_shell.read(&mut buf),
                ).await {
                    if n == 0 || write.data_bytes(buf[..n].to_vec()).await.is_err() {
                        break;
                    }
                }
                break status.ok();
            }
        }
    };
    if client_gone {
        // As a terminal hangup does: SIGHUP to every process of the shell's
        // session (background jobs too; `nohup` ones survive, as with any
        // SSH server), the terminal closed, and SIGKILL if the shell lingers.
        if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
            for member in session_members(pid) {
                // SAFETY: kill(2) with a pid and a signal; no memory involved.
                unsafe { libc::kill(member, libc::SIGHUP) };
            }
        }
        drop((from_shell, to_shell));
        if tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
        tracing::info!("interactive shell closed by the client");
        return;
    }
    let code = status.map_or(255, |s| exit_code(&s));
    tracing::info!(code, "interactive shell exited");
    if let Err(e) = finish(&write, None, None, code).await {
        tracing::debug!(error = %e, "finishing a shell channel failed (client gone?)");
    }
}

/// Every process whose session is `sid` (the shell is its session leader),
/// read from /proc.
fn session_members(sid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![sid];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid pgrp session ..."; comm
            // may hold spaces and parentheses, so split after the last ')'.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                return false;
            };
            rest.split_whitespace().nth(3).and_then(|s| s.parse().ok()) == Some(sid)
        })
        .collect()
}

/// A process's exit status as SSH reports it: its code, or 128+N for a signal.
fn exit_code(status: &std::process::ExitStatus) -> u32 {
    use std::os::unix::process::ExitStatusExt;
    match status.code() {
        Some(c) => c as u32,
        None => 128 + status.signal().unwrap_or(0) as u32,
    }
}

/// Read one request line (up to `\n` or EOF).
async fn read_request(read: &mut ChannelReadHalf) -> Result<Vec<u8>, String> {
    let mut buf = Vec::new();
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                buf.extend_from_slice(&data);
                if let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    buf.truncate(pos);
                    return Ok(buf);
                }
                if buf.len() > MAX_REQUEST_BYTES {
                    return Err(format!("RPC request larger than {MAX_REQUEST_BYTES} bytes"));
                }
            }
            ChannelMsg::Eof | ChannelMsg::Close => break,
            _ => {}
        }
    }
    if buf.iter().all(|b| b.is_ascii_whitespace()) {
        Err("connection closed before an RPC request was sent".into())
    } else {
        Ok(buf)
    }
}

fn failure(kind: &str, message: String) -> ActionFailure {
    ActionFailure {
        kind: kind.into(),
        message,
        output_tail: None,
    }
}

/// Decode and run one request; always produces a response.
async fn answer(line: Result<Vec<u8>, String>, actions: &Arc<dyn ActionHandler>) -> RpcResponse {
    let error = |id, f| RpcResponse {
        id,
        result: None,
        error: Some(f),
    };
    let line = match line {
        Ok(l) => l,
        Err(m) => return error(0, failure("invalid", format!("reading RPC request: {m}"))),
    };
    let value: serde_json::Value = match serde_json::from_slice(&line) {
        Ok(v) => v,
        Err(e) => {
            return error(
                0,
                failure("invalid", format!("RPC request is not JSON: {e}")),
            )
        }
    };
    let id = value.get("id").and_then(|v| v.as_u64()).unwrap_or(0);
    let version = value.get("protocol_version").and_then(|v| v.as_u64());
    if version != Some(u64::from(protocol::PROTOCOL_VERSION)) {
        let shown = version.map_or_else(|| "none".to_string(), |v| v.to_string());
        return error(
            id,
            failure(
                "unsupported_version",
                format!(
                    "RPC request has protocol version {shown}; this agent speaks version {}",
                    protocol::PROTOCOL_VERSION
                ),
            ),
        );
    }
    let request: RpcRequest = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => return error(id, failure("invalid", format!("decoding RPC request: {e}"))),
    };
    match actions.handle(request.action).await {
        Ok(result) => RpcResponse {
            id,
            result: Some(result),
            error: None,
        },
        Err(f) => error(id, f),
    }
}

/// One RPC channel: request line in, response line out, exit 0, EOF, close.
async fn serve_rpc(channel: Channel<Msg>, actions: Arc<dyn ActionHandler>) {
    let (mut read, write) = channel.split();
    let line = read_request(&mut read).await;
    // Keep draining (and so noticing a close) while the action runs.
    let drain = tokio::spawn(async move { while read.wait().await.is_some() {} });
    let response = answer(line, &actions).await;
    let mut out = match serde_json::to_vec(&response) {
        Ok(v) => v,
        Err(e) => {
            let fallback = RpcResponse {
                id: response.id,
                result: None,
                error: Some(failure(
                    "io",
                    format!("encoding the RPC response failed: {e}"),
                )),
            };
            serde_json::to_vec(&fallback).unwrap_or_default()
        }
    };
    out.push(b'\n');
    if let Err(e) = finish(&write, Some(out), None, 0).await {
        tracing::debug!(error = %e, "sending RPC response failed (director gone?)");
    }
    drain.abort();
}

/// Send optional stdout/stderr, then exit status, EOF and close.
async fn finish(
    write: &ChannelWriteHalf<Msg>,
    stdout: Option<Vec<u8>>,
    stderr: Option<String>,
    status: u32,
) -> Result<(), russh::Error> {
    if let Some(out) = stdout {
        write.data_bytes(out).await?;
    }
    if let Some(err) = stderr {
        let mut err = err.into_bytes();
        err.push(b'\n');
        write.extended_data_bytes(STDERR, err).await?;
    }
    write.exit_status(status).await?;
    write.eof().await?;
    write.close().await
}

/// One exec channel: `put-blob <sha>` or `get-blob <sha>`.
async fn serve_exec(channel: Channel<Msg>, command: String, blobs: Arc<BlobStore>) {
    let (mut read, write) = channel.split();
    // `stream <shell command>`: its output as it comes (`bosun logs --follow`),
    // until it ends or the director closes the channel.
    if let Some(cmd) = command.strip_prefix("stream ") {
        if let Err(e) = stream_shell(cmd, &mut read, &write).await {
            tracing::debug!(error = %e, "stream channel ended (director gone?)");
        }
        return;
    }
    // `run <shell command>`: the operator's `bosun ssh -c`.
    if let Some(cmd) = command.strip_prefix("run ") {
        drain_until_eof(&mut read).await;
        let result = run_shell(cmd).await;
        let sent = match result {
            Ok((out, err, code)) => {
                let sent_err = if err.is_empty() {
                    Ok(())
                } else {
                    write.extended_data_bytes(STDERR, err).await
                };
                match sent_err {
                    Ok(()) => finish(&write, Some(out), None, code).await,
                    Err(e) => Err(e),
                }
            }
            Err(message) => finish(&write, None, Some(message), 127).await,
        };
        if let Err(e) = sent {
            tracing::debug!(error = %e, "finishing a run channel failed (director gone?)");
        }
        return;
    }
    let words: Vec<&str> = command.split_whitespace().collect();
    let outcome = match words.as_slice() {
        ["put-blob", sha] => put_blob(&mut read, sha, &blobs).await,
        ["get-blob", sha] => {
            // Stream while watching for the client going away, so a dead
            // client cannot park this task on a closed window forever.
            let watch = async {
                loop {
                    match read.wait().await {
                        None | Some(ChannelMsg::Close) => break,
                        Some(_) => {}
                    }
                }
            };
            tokio::select! {
                r = get_blob(&write, sha, &blobs) => r,
                () = watch => return,
            }
        }
        _ => {
            // Still read until EOF so a client that streams data is not stuck.
            drain_until_eof(&mut read).await;
            Err(format!(
                "unknown command {:?}: this agent only runs `put-blob <sha256>`, `get-blob <sha256>` and `run <command>`",
                command
            ))
        }
    };
    let result = match outcome {
        Ok(()) => finish(&write, None, None, 0).await,
        Err(message) => {
            tracing::warn!(command = %command, error = %message, "blob channel failed");
            finish(&write, None, Some(message), 1).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "finishing exec channel failed (director gone?)");
    }
}

/// Run a shell command, sending its stdout as it is written; stop it when
/// the channel closes.
async fn stream_shell(
    cmd: &str,
    read: &mut ChannelReadHalf,
    write: &ChannelWriteHalf<Msg>,
) -> Result<(), russh::Error> {
    use tokio::io::AsyncReadExt;
    // Its own process group, so whatever it starts (`tail &` per file)
    // ends with it.
    let mut child = match tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return finish(write, None, Some(format!("starting /bin/sh: {e}")), 127).await,
    };
    let Some(mut out) = child.stdout.take() else {
        return finish(write, None, Some("no stdout".into()), 127).await;
    };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = out.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => write.data_bytes(buf[..n].to_vec()).await?,
            },
            msg = read.wait() => match msg {
                None | Some(ChannelMsg::Close) => {
                    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                        // SAFETY: kill(2) on our child's process group.
                        unsafe { libc::kill(-pid, libc::SIGKILL) };
                    }
                    let _ = child.kill().await;
                    return Ok(());
                }
                Some(_) => {}
            },
        }
    }
    let code = child.wait().await.map_or(255, |s| exit_code(&s));
    finish(write, None, None, code).await
}

/// Run a shell command on this VM: (stdout, stderr, exit status; 128+N
/// for a signal). Stdin is empty.
async fn run_shell(cmd: &str) -> Result<(Vec<u8>, Vec<u8>, u32), String> {
    let out = tokio::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("starting /bin/sh: {e}"))?;
    Ok((out.stdout, out.stderr, exit_code(&out.status)))
}

async fn drain_until_eof(read: &mut ChannelReadHalf) {
    while let Some(msg) = read.wait().await {
        if matches!(msg, ChannelMsg::Eof | ChannelMsg::Close) {
            break;
        }
    }
}

/// Receive a blob until EOF, verify it and keep it.
async fn put_blob(read: &mut ChannelReadHalf, sha: &str, blobs: &BlobStore) -> Result<(), String> {
    let mut writer = if is_valid_name(sha) {
        Some(
            blobs
                .writer()
                .map_err(|e| format!("put-blob {sha}: {}", chain(&e))),
        )
    } else {
        None
    };
    let mut write_error: Option<String> = None;
    let mut got_eof = false;
    while let Some(msg) = read.wait().await {
        match msg {
            ChannelMsg::Data { data } => {
                if let Some(Ok(w)) = writer.as_mut() {
                    if let Err(e) = w.write(&data) {
                        write_error = Some(format!("put-blob {sha}: {}", chain(&e)));
                        writer = None;
                    }
                }
            }
            ChannelMsg::Eof => {
                got_eof = true;
                break;
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    if let Some(e) = write_error {
        return Err(e);
    }
    let writer = match writer {
        None => return Err(format!("put-blob: {}", BlobError::BadName(sha.to_string()))),
        Some(Err(e)) => return Err(e),
        Some(Ok(w)) => w,
    };
    if !got_eof {
        return Err(format!(
            "put-blob {sha}: channel closed before EOF after {} bytes; nothing kept",
            writer.len()
        ));
    }
    let expected = sha.to_string();
    let committed = tokio::task::spawn_blocking(move || writer.finish(&expected)).await;
    match committed {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("put-blob {sha}: {}", chain(&e))),
        Err(e) => Err(format!("put-blob {sha}: storing task failed: {e}")),
    }
}

/// Stream a blob file to the client in window-respecting chunks.
async fn get_blob(
    write: &ChannelWriteHalf<Msg>,
    sha: &str,
    blobs: &BlobStore,
) -> Result<(), String> {
    if !is_valid_name(sha) {
        return Err(format!("get-blob: {}", BlobError::BadName(sha.to_string())));
    }
    let path = blobs.path(sha);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(format!(
                "get-blob: {}",
                BlobError::NotFound(sha.to_string())
            ))
        }
        Err(e) => return Err(format!("get-blob {sha}: opening {}: {e}", path.display())),
    };
    loop {
        let mut chunk = vec![0u8; BLOB_CHUNK];
        let n = file
            .read(&mut chunk)
            .await
            .map_err(|e| format!("get-blob {sha}: reading {}: {e}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        chunk.truncate(n);
        write
            .data_bytes(chunk)
            .await
            .map_err(|e| format!("get-blob {sha}: sending: {e}"))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::AgentClient;
    use crate::keys::{generate_keypair, KeyPair};

    struct Echo;

    #[async_trait::async_trait]
    impl ActionHandler for Echo {
        async fn handle(&self, action: Action) -> Result<serde_json::Value, ActionFailure> {
            Ok(serde_json::to_value(action).unwrap())
        }
    }

    #[tokio::test]
    async fn answer_checks_version_and_shape() {
        let h: Arc<dyn ActionHandler> = Arc::new(Echo);
        let r = answer(
            Ok(br#"{"id":4,"protocol_version":99,"method":"ping"}"#.to_vec()),
            &h,
        )
        .await;
        assert_eq!(r.id, 4);
        assert_eq!(r.error.unwrap().kind, "unsupported_version");

        let r = answer(
            Ok(br#"{"id":5,"protocol_version":1,"method":"nope"}"#.to_vec()),
            &h,
        )
        .await;
        assert_eq!(r.error.unwrap().kind, "invalid");

        let r = answer(Ok(b"not json".to_vec()), &h).await;
        assert_eq!(r.error.unwrap().kind, "invalid");

        let r = answer(
            Ok(br#"{"id":6,"protocol_version":1,"method":"ping"}"#.to_vec()),
            &h,
        )
        .await;
        assert_eq!(r.id, 6);
        assert_eq!(r.result.unwrap()["method"], "ping");
    }

    /// Answers ping as an agent does.
    struct Pong;

    #[async_trait::async_trait]
    impl ActionHandler for Pong {
        async fn handle(&self, _action: Action) -> Result<serde_json::Value, ActionFailure> {
            Ok(serde_json::to_value(protocol::PingResult {
                agent_id: "agent-1".into(),
                protocol_version: protocol::PROTOCOL_VERSION,
            })
            .unwrap())
        }
    }

    fn limits(deadline: Duration, total: usize, per_source: usize) -> Limits {
        Limits {
            auth_deadline: deadline,
            max_unauthenticated: total,
            max_unauthenticated_per_source: per_source,
        }
    }

    /// A bound on how long a test waits for something that must happen.
    const PATIENCE: Duration = Duration::from_secs(20);

    struct Served {
        addr: SocketAddr,
        director: KeyPair,
        host: KeyPair,
        _dir: tempfile::TempDir,
    }

    async fn serve_test(limits: Limits) -> Served {
        let dir = tempfile::tempdir().unwrap();
        let director = generate_keypair().unwrap();
        let host = generate_keypair().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let settings = bosun_cpi::AgentSettings {
            agent_id: "agent-1".into(),
            director_public_key: director.public_openssh.clone(),
            host_private_key: host.private_openssh.clone(),
            listen_ip: "127.0.0.1".into(),
            listen_port: addr.port(),
            networks: Default::default(),
            disks: Default::default(),
            env: serde_json::Value::Null,
        };
        let blobs = Arc::new(BlobStore::open(dir.path().join("blobs")).unwrap());
        tokio::spawn(async move {
            serve_with_limits(listener, &settings, blobs, Arc::new(Pong), limits)
                .await
                .unwrap();
        });
        Served {
            addr,
            director,
            host,
            _dir: dir,
        }
    }

    /// Read until the server closes the connection (the SSH id line comes
    /// first); panics if it stays open past [`PATIENCE`].
    async fn closed_by_server(stream: &mut tokio::net::TcpStream) {
        let mut buf = [0u8; 4096];
        let read_all = async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(PATIENCE, read_all)
            .await
            .expect("the server closes the idle connection");
    }

    /// True when the server has sent its id and not closed the connection
    /// within `wait`.
    async fn still_open(stream: &mut tokio::net::TcpStream, wait: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Err(_) => return true,
                Ok(Ok(0)) | Ok(Err(_)) => return false,
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_at_the_auth_deadline() {
        let s = serve_test(limits(Duration::from_millis(200), 64, 64)).await;
        let mut idle = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        closed_by_server(&mut idle).await;
        // One that sent its id and stalled in the key exchange too.
        let mut stalled = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stalled, b"SSH-2.0-idle\r\n")
            .await
            .unwrap();
        closed_by_server(&mut stalled).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_authenticated_session_outlives_the_deadline() {
        let deadline = Duration::from_millis(200);
        let s = serve_test(limits(deadline, 64, 64)).await;
        let client = AgentClient::connect(s.addr, &s.director, &s.host.public_openssh, PATIENCE)
            .await
            .unwrap();
        tokio::time::sleep(deadline * 5).await;
        assert_eq!(client.ping().await.unwrap().agent_id, "agent-1");
    }

    #[tokio::test]
    async fn the_cap_closes_the_oldest_waiting_connection_of_the_source() {
        let s = serve_test(limits(Duration::from_secs(3600), 8, 2)).await;
        let mut first = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        let mut second = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        // Both admitted before the third arrives.
        assert!(still_open(&mut first, Duration::from_millis(200)).await);
        assert!(still_open(&mut second, Duration::from_millis(200)).await);
        let mut third = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        closed_by_server(&mut first).await;
        assert!(still_open(&mut second, Duration::from_millis(300)).await);
        assert!(still_open(&mut third, Duration::from_millis(300)).await);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_director_gets_in_while_a_flood_fills_the_cap() {
        let s = serve_test(limits(Duration::from_secs(3600), 16, 4)).await;
        let mut flood = Vec::new();
        for _ in 0..200 {
            flood.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
        }
        // Same source as the flood (loopback), as on the local CPI.
        let client = AgentClient::connect(s.addr, &s.director, &s.host.public_openssh, PATIENCE)
            .await
            .unwrap();
        assert_eq!(client.ping().await.unwrap().agent_id, "agent-1");
        // The flood keeps coming: the authenticated session is not evicted.
        for _ in 0..50 {
            flood.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
        }
        assert_eq!(client.ping().await.unwrap().agent_id, "agent-1");
        // Of the flood, at most the cap is still waiting.
        let mut open = 0;
        for stream in flood.iter_mut().rev().take(40) {
            if still_open(stream, Duration::from_millis(20)).await {
                open += 1;
            }
        }
        assert!(open <= 4, "{open} flood connections still open");
    }

    /// `f`'s output; panics if it takes longer than [`PATIENCE`].
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(PATIENCE, f)
            .await
            .expect("finished in time")
    }

    #[tokio::test]
    async fn the_gate_caps_per_source_and_in_total() {
        let gate = Arc::new(Gate::new(limits(Duration::from_secs(3600), 3, 2)));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let conn = |ip| {
            let (near, far) = tokio::io::duplex(64);
            let (guarded, admission) = gate.admit(near, ip);
            (guarded, admission, far)
        };
        let mut a1 = conn(a);
        let mut a2 = conn(a);
        let mut b1 = conn(b);
        assert_eq!(gate.waiting(), 3);
        // A third from `a`: a's oldest goes (per-source cap); b1 stays.
        let mut a3 = conn(a);
        let mut buf = [0u8; 8];
        let err = within(a1.0.read(&mut buf)).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("too many"), "{err}");
        assert_eq!(gate.waiting(), 3);
        // An authenticated connection leaves the gate and is never evicted.
        a2.1.authenticated();
        assert_eq!(gate.waiting(), 2);
        let mut b2 = conn(b);
        let mut b3 = conn(b);
        // b's cap evicted b1, the total cap had room for the rest.
        assert!(within(b1.0.read(&mut buf)).await.is_err());
        tokio::io::AsyncWriteExt::write_all(&mut a2.2, b"hi")
            .await
            .unwrap();
        assert_eq!(within(a2.0.read(&mut buf)).await.unwrap(), 2);
        tokio::io::AsyncWriteExt::write_all(&mut a3.2, b"hi")
            .await
            .unwrap();
        assert_eq!(within(a3.0.read(&mut buf)).await.unwrap(), 2);
        // A connection that ends leaves the gate.
        drop(a3);
        assert_eq!(gate.waiting(), 2);
        // The total cap: a new source's connection evicts the oldest of all.
        let c: IpAddr = "127.0.0.3".parse().unwrap();
        let _c1 = conn(c);
        assert_eq!(gate.waiting(), 3);
        let _c2 = conn(c);
        assert_eq!(gate.waiting(), 3);
        assert!(
            within(b2.0.read(&mut buf)).await.is_err(),
            "b2 was the oldest"
        );
        tokio::io::AsyncWriteExt::write_all(&mut b3.2, b"hi")
            .await
            .unwrap();
        assert_eq!(within(b3.0.read(&mut buf)).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn the_gate_evicts_idle_connections_before_talking_ones() {
        let gate = Arc::new(Gate::new(limits(Duration::from_secs(3600), 8, 2)));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let conn = || {
            let (near, far) = tokio::io::duplex(64);
            let (guarded, admission) = gate.admit(near, ip);
            (guarded, admission, far)
        };
        let mut buf = [0u8; 8];
        let mut talking = conn();
        tokio::io::AsyncWriteExt::write_all(&mut talking.2, b"SSH-2.0")
            .await
            .unwrap();
        assert_eq!(within(talking.0.read(&mut buf)).await.unwrap(), 7);
        let mut idle = conn();
        let _newcomer = conn();
        // The idle one goes although the talking one is older.
        assert!(within(idle.0.read(&mut buf)).await.is_err());
        tokio::io::AsyncWriteExt::write_all(&mut talking.2, b"x")
            .await
            .unwrap();
        assert_eq!(within(talking.0.read(&mut buf)).await.unwrap(), 1);
    }

    #[test]
    fn limits_keep_a_reserve_of_descriptors() {
        let small = Limits::for_descriptors(1024);
        assert_eq!(small.max_unauthenticated, 256);
        assert_eq!(small.max_unauthenticated_per_source, 64);
        let tiny = Limits::for_descriptors(600);
        assert_eq!(tiny.max_unauthenticated, 44);
        assert!(tiny.max_unauthenticated as u64 + FD_RESERVE <= 600);
        assert_eq!(Limits::for_descriptors(100).max_unauthenticated, 8);
        assert_eq!(Limits::for_descriptors(1 << 20).max_unauthenticated, 256);
    }
}

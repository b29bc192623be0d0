//! Support for RabbitMQ fault tests.
//!
//! Fault tests must leave the shared broker (127.0.0.1:5672, guest/guest) alone. Three tools:
//!
//! - [`Vhost`]: a vhost of its own on the shared broker, so a test can close *its*
//!   connections (`rabbitmqctl close_all_connections --vhost`) and look into *its* queues
//!   without touching other tests. Deleted on drop.
//! - [`TcpProxy`]: a loopback TCP proxy in front of a broker, to stall the network silently
//!   ([`TcpProxy::stall`]) or cut every connection ([`TcpProxy::cut`]).
//! - [`ThrowawayNode`]: a RabbitMQ node of its own (own ports, own data directory), for
//!   broker restarts and crashes, or for settings the shared broker lacks (extra
//!   `rabbitmq.conf` lines via [`ThrowawayNode::start_with_config`], e.g. a TLS listener on a
//!   port from [`free_port`]). Stopped and removed on drop.
//!
//! Everything here shells out to `rabbitmqctl` / `rabbitmq-server` and so needs root (the
//! Debian wrappers switch to the `rabbitmq` user themselves). Every wait is bounded.

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The AMQP port of the shared broker.
pub const SHARED_PORT: u16 = 5672;

/// How long one `rabbitmqctl` call may take before it is killed and counted as failed.
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a throwaway node may take to boot (it takes about 5 s on an idle machine).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `rabbitmq-server -detached` itself may take (it returns at once).
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a port may take to open or close after `start_app` / `stop_app` / a kill.
const PORT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often waits on external processes poll.
const POLL: Duration = Duration::from_millis(200);

/// How long the proxy waits for the upstream to accept a connection.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared broker's AMQP address.
pub fn shared_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, SHARED_PORT))
}

// ---------------------------------------------------------------------------------------
// Running commands with a bound
// ---------------------------------------------------------------------------------------

/// Runs `rabbitmqctl` with `args` against the shared node and returns its stdout.
///
/// # Panics
///
/// If the command cannot start, fails, or takes longer than 60 s; the message carries its
/// stderr and stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    try_rabbitmqctl(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `rabbitmqctl` with `args` and returns its stdout, or a message with its stderr if
/// it fails or takes longer than 60 s.
pub fn try_rabbitmqctl(args: &[&str]) -> Result<String, String> {
    run_captured("rabbitmqctl", args, CTL_TIMEOUT)
}

/// Runs `program args` and returns its stdout, or a message with its stderr if it cannot
/// start, fails, or takes longer than `timeout` (then it is killed). Blocks: call it from
/// `tokio::task::spawn_blocking` in async tests.
pub fn run_command(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    run_captured(program, args, timeout)
}

/// Runs `rabbitmqctl` on a blocking thread, so async tests keep running meanwhile.
async fn rabbitmqctl_async(args: Vec<String>, timeout: Duration) -> Result<String, String> {
    blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_captured("rabbitmqctl", &args, timeout)
    })
    .await
}

/// Runs `f` on tokio's blocking pool.
async fn blocking<T, F>(f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.expect("blocking helper task panicked")
}

/// Runs `program args`, capturing its output, killing it after `timeout`.
fn run_captured(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let command = format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let stdout = child.stdout.take().map(spawn_reader);
    let stderr = child.stderr.take().map(spawn_reader);
    match wait_child(child, timeout) {
        Ok(status) => {
            let stdout = collect(stdout);
            let stderr = collect(stderr);
            if status.success() {
                Ok(stdout)
            } else {
                Err(format!("`{command}` failed ({status}):\n{stderr}{stdout}"))
            }
        }
        // A grandchild may still hold the pipes: leave the reader threads behind rather
        // than wait for them without a bound.
        Err(e) => Err(format!("`{command}`: {e}")),
    }
}

/// Reads `source` to its end on a thread of its own.
fn spawn_reader<R: Read + Send + 'static>(mut source: R) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = source.read_to_end(&mut buf);
        buf
    })
}

/// What a reader thread read, as text.
fn collect(reader: Option<std::thread::JoinHandle<Vec<u8>>>) -> String {
    reader
        .and_then(|reader| reader.join().ok())
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// Waits for `child` to exit (on a thread of its own, woken by the exit), killing it after
/// `timeout`.
fn wait_child(child: Child, timeout: Duration) -> Result<ExitStatus, String> {
    let pid = child.id().to_string();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        let _ = exited.send(child.wait());
    });
    match exit.recv_timeout(timeout) {
        Ok(Ok(status)) => Ok(status),
        Ok(Err(e)) => Err(format!("cannot wait for the process: {e}")),
        Err(_) => {
            // The waiting thread reaps it once killed.
            let _ = Command::new("kill").args(["-9", &pid]).status();
            Err(format!("timed out after {timeout:?}"))
        }
    }
}

/// A short random suffix for names (lowercase hex, safe in vhost and Erlang node names).
fn short_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..10].to_owned()
}

/// The first `N` tab-separated fields of a `rabbitmqctl` output line (missing ones empty).
fn fields<const N: usize>(line: &str) -> [String; N] {
    let mut parts = line.splitn(N, '\t');
    std::array::from_fn(|_| parts.next().unwrap_or_default().to_owned())
}

/// The data lines of `rabbitmqctl ... --quiet --no-table-headers` output.
///
/// Lines are not trimmed: the default exchange's name is empty, so its line starts with a tab.
fn data_lines(out: &str) -> impl Iterator<Item = &str> {
    out.lines().filter(|line| !line.is_empty())
}

// ---------------------------------------------------------------------------------------
// Vhost
// ---------------------------------------------------------------------------------------

/// A vhost of its own on the shared broker, with full permissions for `guest`.
///
/// Dropping it deletes the vhost (and so its queues, exchanges and connections).
#[derive(Debug)]
pub struct Vhost {
    /// The vhost's name: the prefix given to [`Vhost::create`] and a random suffix.
    pub name: String,
}

impl Vhost {
    /// Creates a vhost named `{prefix}-{random}` and gives `guest` full permissions on it.
    ///
    /// `prefix` should be plain ASCII (letters, digits, `-`, `_`): the name goes into URIs
    /// unescaped.
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails (the message carries its stderr).
    pub fn create(prefix: &str) -> Vhost {
        // Built first so that Drop deletes the vhost if the permissions step fails.
        let vhost = Vhost { name: format!("{prefix}-{}", short_id()) };
        rabbitmqctl(&["add_vhost", &vhost.name]);
        rabbitmqctl(&["set_permissions", "-p", &vhost.name, "guest", ".*", ".*", ".*"]);
        vhost
    }

    /// The AMQP URI for this vhost through `port` on 127.0.0.1 (the shared broker's
    /// [`SHARED_PORT`], or a [`TcpProxy`]'s port).
    pub fn uri(&self, port: u16) -> String {
        let name = &self.name;
        format!("amqp://guest:guest@127.0.0.1:{port}/{name}")
    }

    /// [`Vhost::uri`] with `?heartbeat={secs}`, so the client notices a stalled network
    /// within about two heartbeats.
    pub fn uri_with_heartbeat(&self, port: u16, secs: u16) -> String {
        format!("{}?heartbeat={secs}", self.uri(port))
    }

    /// Closes every client connection to this vhost (the broker sends `connection.close`
    /// with 320 CONNECTION_FORCED, reason "fault test"). Other vhosts are untouched.
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails.
    pub fn close_all_connections(&self) {
        rabbitmqctl(&["close_all_connections", "--vhost", &self.name, "fault test"]);
    }

    /// The vhost's queues as `(name, messages)`, where messages counts ready and
    /// unacknowledged messages.
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails or reports a message count that is not a number (for
    /// example while a queue is unavailable).
    pub fn list_queues(&self) -> Vec<(String, u64)> {
        let out = rabbitmqctl(&["list_queues", "-p", &self.name, "name", "messages", "--quiet", "--no-table-headers"]);
        data_lines(&out)
            .map(|line| {
                let [name, messages] = fields::<2>(line);
                let messages = messages.trim().parse::<u64>().unwrap_or_else(|e| {
                    panic!("queue {name:?} in vhost {}: bad message count {messages:?}: {e}", self.name)
                });
                (name, messages)
            })
            .collect()
    }

    /// The vhost's exchanges as `(name, type)`, including the built-in ones (`amq.*`, and
    /// the default exchange, whose name is the empty string).
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails.
    pub fn list_exchanges(&self) -> Vec<(String, String)> {
        let out = rabbitmqctl(&["list_exchanges", "-p", &self.name, "name", "type", "--quiet", "--no-table-headers"]);
        data_lines(&out)
            .map(|line| {
                let [name, kind] = fields::<2>(line);
                (name, kind)
            })
            .collect()
    }

    /// The vhost's bindings as `(source_name, source_kind, destination_name,
    /// destination_kind)`; kinds are `exchange` or `queue`. Every queue's implicit binding
    /// from the default exchange is listed too, with an empty source name.
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails.
    pub fn list_bindings(&self) -> Vec<(String, String, String, String)> {
        let out = rabbitmqctl(&[
            "list_bindings",
            "-p",
            &self.name,
            "source_name",
            "source_kind",
            "destination_name",
            "destination_kind",
            "--quiet",
            "--no-table-headers",
        ]);
        data_lines(&out)
            .map(|line| {
                let [source, source_kind, destination, destination_kind] = fields::<4>(line);
                (source, source_kind, destination, destination_kind)
            })
            .collect()
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = try_rabbitmqctl(&["delete_vhost", &self.name]);
    }
}

// ---------------------------------------------------------------------------------------
// TcpProxy
// ---------------------------------------------------------------------------------------

/// Counters of a [`TcpProxy`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Client connections open now.
    pub open: usize,
    /// Client connections accepted since the proxy started.
    pub accepted: u64,
}

/// Counts a client connection as open while it lives.
struct ConnectionGuard(Arc<watch::Sender<ProxyStats>>);

impl ConnectionGuard {
    fn new(stats: Arc<watch::Sender<ProxyStats>>) -> Self {
        stats.send_modify(|s| {
            s.open += 1;
            s.accepted += 1;
        });
        ConnectionGuard(stats)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.send_modify(|s| s.open = s.open.saturating_sub(1));
    }
}

/// A loopback TCP proxy in front of an upstream (a broker), to simulate network faults.
///
/// Point the client at `127.0.0.1:`[`port`](TcpProxy::port). Every accepted connection gets
/// a connection of its own to the upstream, and bytes are copied both ways until either side
/// closes. Dropping the proxy stops accepting and closes every connection.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    /// `true` while stalled.
    paused: watch::Sender<bool>,
    /// Bumped by [`TcpProxy::cut`]; connections accepted before a bump close.
    generation: watch::Sender<u64>,
    stats: Arc<watch::Sender<ProxyStats>>,
    accept: JoinHandle<()>,
}

impl TcpProxy {
    /// Binds 127.0.0.1 on a free port and starts forwarding connections to `upstream`.
    ///
    /// # Panics
    ///
    /// If the listening socket cannot be bound.
    pub async fn start(upstream: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("tcp proxy: cannot bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("tcp proxy: no local address");
        let (paused, _) = watch::channel(false);
        let (generation, _) = watch::channel(0u64);
        let (stats, _) = watch::channel(ProxyStats::default());
        let stats = Arc::new(stats);
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            paused.subscribe(),
            generation.subscribe(),
            Arc::clone(&stats),
        ));
        TcpProxy { addr, upstream, paused, generation, stats, accept }
    }

    /// The port clients should connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The upstream this proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Stops forwarding in both directions, on current and future connections, without
    /// closing anything: the proxy stops reading its sockets, so both peers see silence
    /// (then TCP back-pressure), as with a dead network. New connections are still accepted
    /// (and connected upstream) but carry no bytes.
    pub fn stall(&self) {
        self.paused.send_replace(true);
    }

    /// Forwards again after [`TcpProxy::stall`]; bytes held meanwhile are delivered.
    pub fn resume(&self) {
        self.paused.send_replace(false);
    }

    /// Whether the proxy is stalled.
    pub fn is_stalled(&self) -> bool {
        *self.paused.borrow()
    }

    /// Closes every current connection, both the client's and the upstream side, and keeps
    /// accepting new ones. The closing happens on the connections' tasks, just after this
    /// returns; use [`TcpProxy::wait_until`] to wait for it.
    pub fn cut(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The number of client connections open now.
    pub fn connections(&self) -> usize {
        self.stats.borrow().open
    }

    /// The proxy's counters now.
    pub fn stats(&self) -> ProxyStats {
        *self.stats.borrow()
    }

    /// Waits until `done` holds for the counters (checked now and on every change), for at
    /// most `timeout`. Returns the counters that satisfied it, or `None` on timeout.
    ///
    /// Changes may be coalesced, so a brief state (say `open == 0` between a cut and a
    /// reconnect) can be missed: to wait for a reconnection, compare `accepted` instead.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&ProxyStats) -> bool + Send,
    ) -> Option<ProxyStats> {
        let mut stats = self.stats.subscribe();
        let waited = tokio::time::timeout(timeout, async { stats.wait_for(|s| done(s)).await.map(|s| *s) }).await;
        match waited {
            Ok(Ok(stats)) => Some(stats),
            _ => None,
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task;
        // dropping the watch senders also ends any copy loop still running.
        self.accept.abort();
    }
}

/// Accepts clients and spawns a connection task for each; owns those tasks.
async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    paused: watch::Receiver<bool>,
    generation: watch::Receiver<u64>,
    stats: Arc<watch::Sender<ProxyStats>>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, _)) => {
                    let guard = ConnectionGuard::new(Arc::clone(&stats));
                    let born = *generation.borrow();
                    let mut generation = generation.clone();
                    let paused = paused.clone();
                    tasks.spawn(async move {
                        let _guard = guard;
                        tokio::select! {
                            // A cut (generation moved on) or the proxy dropped (Err).
                            _ = generation.wait_for(|g| *g != born) => {}
                            () = proxy_connection(client, upstream, paused) => {}
                        }
                        // The sockets were owned by the dropped future: both are closed now.
                    });
                }
                Err(e) => {
                    eprintln!("tcp proxy: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

/// Connects `client` to `upstream` and copies bytes both ways until both directions end or
/// one fails.
async fn proxy_connection(mut client: TcpStream, upstream: SocketAddr, paused: watch::Receiver<bool>) {
    let mut server = match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(upstream)).await {
        Ok(Ok(server)) => server,
        // Upstream down: close the client, as a refused connection would.
        _ => return,
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.split();
    let (server_read, server_write) = server.split();
    let _ = tokio::try_join!(pump(client_read, server_write, paused.clone()), pump(server_read, client_write, paused),);
}

/// Waits until the stall flag equals `stalled`; `false` if the proxy is gone.
async fn wait_stalled(paused: &mut watch::Receiver<bool>, stalled: bool) -> bool {
    paused.wait_for(|p| *p == stalled).await.is_ok()
}

/// Copies `from` to `to`, not reading at all while stalled. At end of stream, shuts `to`
/// down for writing (a half-close) and returns; the other direction carries on.
async fn pump<R, W>(mut from: R, mut to: W, mut paused: watch::Receiver<bool>) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While stalled, do not read: the sender sees silence, then back-pressure.
        if !wait_stalled(&mut paused, false).await {
            return Ok(());
        }
        let n = tokio::select! {
            biased;
            stalled = wait_stalled(&mut paused, true) => {
                if !stalled {
                    return Ok(());
                }
                // Stalled while waiting to read (reads are cancel-safe): go back and wait.
                continue;
            }
            read = from.read(&mut buf) => read?,
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        // Bytes read just as a stall began are held until resume, not forwarded.
        if !wait_stalled(&mut paused, false).await {
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
    }
}

// ---------------------------------------------------------------------------------------
// ThrowawayNode
// ---------------------------------------------------------------------------------------

/// A RabbitMQ node of its own, for broker restart and crash tests.
///
/// It has its own node name (`throwaway{random}@localhost`), free AMQP and distribution
/// ports, and its own directory under `/tmp` (data, logs, pid file, config). Dropping it
/// stops the node (`rabbitmqctl stop`, with `kill -9` as a fallback) and removes the
/// directory.
///
/// The node gets its own `rabbitmq.conf` (`RABBITMQ_CONFIG_FILE`) with the listener on its
/// port: on this machine `/etc/rabbitmq/rabbitmq.conf` pins `listeners.tcp.local` to 5672,
/// which overrides `RABBITMQ_NODE_PORT`, so without it the node would crash on
/// `eaddrinuse`. [`ThrowawayNode::start_with_config`] appends lines of its own to that file.
#[derive(Debug)]
pub struct ThrowawayNode {
    node: String,
    port: u16,
    dist_port: u16,
    dir: PathBuf,
}

impl ThrowawayNode {
    /// Starts a node and waits (at most 60 s) until its AMQP port accepts connections and
    /// `rabbitmqctl await_startup` succeeds. Takes about 5 s on an idle machine.
    ///
    /// # Panics
    ///
    /// If the directory cannot be prepared, `rabbitmq-server` fails, the node crashes while
    /// booting, or it is not up within 60 s; the message carries the end of its log.
    pub async fn start() -> ThrowawayNode {
        ThrowawayNode::start_with_config("").await
    }

    /// Starts a node as [`start`](Self::start) does, with `extra_conf` appended to its
    /// `rabbitmq.conf` after the AMQP listener line: new-style `key = value` lines, one per
    /// line, for example a TLS listener:
    ///
    /// ```text
    /// listeners.ssl.default = 127.0.0.1:{port from free_port()}
    /// ssl_options.cacertfile = /path/ca.pem
    /// ```
    ///
    /// Files the lines name must be readable by the `rabbitmq` user. The node is ready once
    /// its AMQP (TCP) port accepts; the other listeners start with it.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start); a setting the node rejects shows in the log in the message.
    pub async fn start_with_config(extra_conf: &str) -> ThrowawayNode {
        ThrowawayNode::start_with_configs(extra_conf, "[].").await
    }

    /// Starts a node as [`start_with_config`](Self::start_with_config) does, with `advanced`
    /// as its `advanced.config` (Erlang terms, for settings `rabbitmq.conf` cannot name, such
    /// as `[{rabbit, [{channel_tick_interval, 500}]}].`).
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with_configs(extra_conf: &str, advanced: &str) -> ThrowawayNode {
        ThrowawayNode::start_with_plugins(extra_conf, advanced, "[].").await
    }

    /// Starts a node with the management plugin (its HTTP API) enabled, listening on
    /// 127.0.0.1 on a port of its own; returns the node and that port. The shared broker
    /// never gets the plugin.
    ///
    /// # Panics
    ///
    /// As [`start`](Self::start).
    pub async fn start_with_management() -> (ThrowawayNode, u16) {
        let management = free_port();
        let conf = format!("management.tcp.port = {management}\nmanagement.tcp.ip = 127.0.0.1");
        let node = ThrowawayNode::start_with_plugins(&conf, "[].", "[rabbitmq_management].").await;
        assert!(
            wait_port(management, true, PORT_TIMEOUT).await,
            "the management listener on {management} never opened"
        );
        (node, management)
    }

    async fn start_with_plugins(extra_conf: &str, advanced: &str, plugins: &str) -> ThrowawayNode {
        let (port, dist_port) = free_ports();
        let short = short_id();
        let dir = PathBuf::from(format!("/tmp/rabbit-throwaway-{short}"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // Built before anything can fail so that Drop cleans up.
        let node = ThrowawayNode { node: format!("throwaway{short}@localhost"), port, dist_port, dir };
        write_file(&node.dir.join("enabled_plugins"), &format!("{plugins}\n"));
        let mut conf = format!("listeners.tcp.local = 127.0.0.1:{port}\n");
        for line in extra_conf.lines() {
            conf.push_str(line.trim());
            conf.push('\n');
        }
        write_file(&node.dir.join("rabbitmq.conf"), &conf);
        write_file(&node.dir.join("advanced.config"), &format!("{advanced}\n"));
        let dir = node.dir.display().to_string();
        run_captured("chown", &["-R", "rabbitmq:rabbitmq", &dir], CTL_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot hand {dir} to the rabbitmq user: {e}"));
        node.boot().await;
        node
    }

    /// The node's name, for `rabbitmqctl -n`.
    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// The node's AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The node's AMQP address (for [`TcpProxy::start`]).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// The node's directory (data, logs, pid file, config).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The AMQP URI of the node's default vhost `/`, as guest.
    pub fn uri(&self) -> String {
        let port = self.port;
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f")
    }

    /// Runs `rabbitmqctl -n NODE args` (on a blocking thread) and returns its stdout.
    ///
    /// # Panics
    ///
    /// If the command fails or takes longer than 60 s.
    pub async fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args, CTL_TIMEOUT).await.unwrap_or_else(|e| panic!("{e}"))
    }

    /// The queues of the node's vhost `/` as `(name, messages)`.
    ///
    /// # Panics
    ///
    /// If `rabbitmqctl` fails or reports a message count that is not a number.
    pub async fn list_queues(&self) -> Vec<(String, u64)> {
        let out = self.ctl(&["list_queues", "-p", "/", "name", "messages", "--quiet", "--no-table-headers"]).await;
        data_lines(&out)
            .map(|line| {
                let [name, messages] = fields::<2>(line);
                let messages = messages
                    .trim()
                    .parse::<u64>()
                    .unwrap_or_else(|e| panic!("queue {name:?}: bad message count {messages:?}: {e}"));
                (name, messages)
            })
            .collect()
    }

    /// Stops the RabbitMQ application (`rabbitmqctl stop_app`; the Erlang node stays up),
    /// closing every client connection, and waits until the AMQP port refuses connections.
    ///
    /// # Panics
    ///
    /// If `stop_app` fails or the port still accepts after 30 s.
    pub async fn stop_app(&self) {
        self.ctl(&["stop_app"]).await;
        let node = &self.node;
        assert!(
            wait_port(self.port, false, PORT_TIMEOUT).await,
            "{node}: port still accepting {PORT_TIMEOUT:?} after stop_app"
        );
    }

    /// Starts the RabbitMQ application again (`rabbitmqctl start_app`, about 1.3 s) and
    /// waits until the AMQP port accepts connections.
    ///
    /// # Panics
    ///
    /// If `start_app` fails or the port does not accept within 30 s.
    pub async fn start_app(&self) {
        self.ctl(&["start_app"]).await;
        let node = &self.node;
        assert!(
            wait_port(self.port, true, PORT_TIMEOUT).await,
            "{node}: port not accepting {PORT_TIMEOUT:?} after start_app\n{}",
            self.log_tail()
        );
    }

    /// A broker restart under running clients: [`stop_app`](Self::stop_app) then
    /// [`start_app`](Self::start_app). Durable queues and their persistent messages survive.
    pub async fn restart_app(&self) {
        self.stop_app().await;
        self.start_app().await;
    }

    /// A broker crash: `kill -9` of the node's Erlang VM, then waits until the port refuses
    /// connections. Bring it back with [`relaunch`](Self::relaunch).
    ///
    /// # Panics
    ///
    /// If the VM's pid cannot be found, or the port still accepts after 30 s.
    pub async fn kill(&self) {
        let node = &self.node;
        let pid = self.beam_pid().unwrap_or_else(|| panic!("{node}: no running beam.smp in its pid file"));
        let pid = pid.to_string();
        run_captured("kill", &["-9", &pid], CTL_TIMEOUT).unwrap_or_else(|e| panic!("{node}: {e}"));
        assert!(
            wait_port(self.port, false, PORT_TIMEOUT).await,
            "{node}: port still accepting {PORT_TIMEOUT:?} after kill -9"
        );
    }

    /// Starts the node again after [`kill`](Self::kill), with the same name, ports and data,
    /// and waits until it is up (as [`start`](Self::start) does).
    pub async fn relaunch(&self) {
        self.boot().await;
    }

    /// `rabbitmq-server -detached` with this node's variables, then waits until it is up.
    async fn boot(&self) {
        let started = Instant::now();
        // A crash dump marks a failed boot; clear any earlier one.
        let _ = std::fs::remove_file(self.crash_dump());
        let envs = self.env();
        let out_path = self.dir.join("launch.out");
        blocking(move || launch(envs, &out_path)).await.unwrap_or_else(|e| panic!("rabbitmq-server -detached: {e}"));
        self.wait_ready(started + BOOT_TIMEOUT).await;
        let node = &self.node;
        let took = started.elapsed();
        eprintln!("throwaway RabbitMQ node {node} up in {took:?}");
    }

    /// Polls until the port accepts and `await_startup` succeeds, a crash, or `deadline`.
    async fn wait_ready(&self, deadline: Instant) {
        let node = &self.node;
        loop {
            if self.crash_dump().exists() {
                panic!("{node} crashed while booting:\n{}", self.log_tail());
            }
            if port_accepts(self.port).await {
                let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(5));
                if self.try_ctl(&["await_startup"], left).await.is_ok() {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!("{node} not up within {BOOT_TIMEOUT:?}:\n{}", self.log_tail());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `rabbitmqctl -n NODE args` on a blocking thread.
    async fn try_ctl(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut all = vec!["-n".to_owned(), self.node.clone()];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        rabbitmqctl_async(all, timeout).await
    }

    /// The environment for `rabbitmq-server`, after /work/shared/reference/local-services.md
    /// plus `RABBITMQ_CONFIG_FILE`.
    fn env(&self) -> Vec<(&'static str, String)> {
        let dir = self.dir.display();
        vec![
            ("RABBITMQ_NODENAME", self.node.clone()),
            ("RABBITMQ_NODE_PORT", self.port.to_string()),
            ("RABBITMQ_DIST_PORT", self.dist_port.to_string()),
            ("RABBITMQ_CONFIG_FILE", format!("{dir}/rabbitmq.conf")),
            ("RABBITMQ_ADVANCED_CONFIG_FILE", format!("{dir}/advanced.config")),
            ("RABBITMQ_MNESIA_BASE", format!("{dir}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{dir}/log")),
            ("RABBITMQ_PID_FILE", format!("{dir}/pid")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", format!("{dir}/enabled_plugins")),
        ]
    }

    /// Where the Erlang VM writes its crash dump (it does when the boot fails).
    fn crash_dump(&self) -> PathBuf {
        self.dir.join("log").join("erl_crash.dump")
    }

    /// The pid in the pid file, if that process is alive and is an Erlang VM.
    fn beam_pid(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join("pid")).ok()?.trim().parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "beam.smp").then_some(pid)
    }

    /// The last lines of the node's log and of `rabbitmq-server`'s output, for panics.
    fn log_tail(&self) -> String {
        let log = self.dir.join("log").join(format!("{}.log", self.node));
        let launch = self.dir.join("launch.out");
        format!(
            "--- {} (last 40 lines)\n{}\n--- {}\n{}",
            log.display(),
            tail(&log, 40),
            launch.display(),
            tail(&launch, 20)
        )
    }
}

impl Drop for ThrowawayNode {
    fn drop(&mut self) {
        let _ = run_captured("rabbitmqctl", &["-n", &self.node, "stop"], CTL_TIMEOUT);
        if let Some(pid) = self.beam_pid() {
            let pid = pid.to_string();
            let _ = run_captured("kill", &["-9", &pid], CTL_TIMEOUT);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port on 127.0.0.1 (held while asked for, then released), for a listener a test
/// configures itself, such as a [`ThrowawayNode`]'s TLS listener.
///
/// # Panics
///
/// If 127.0.0.1:0 cannot be bound.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind 127.0.0.1:0");
    listener.local_addr().expect("bound listener has no address").port()
}

/// Two distinct free ports on 127.0.0.1 (both held while asked for, then released).
fn free_ports() -> (u16, u16) {
    let first = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind 127.0.0.1:0");
    let second = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind 127.0.0.1:0");
    let port = |l: &std::net::TcpListener| l.local_addr().expect("bound listener has no address").port();
    (port(&first), port(&second))
}

/// Writes `contents` to `path`, panicking with the path on failure.
fn write_file(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The last `n` lines of the file at `path` (or why it cannot be read).
fn tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n)..].join("\n")
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}

/// Runs `rabbitmq-server -detached` with `envs`, its output going to `out_path`.
fn launch(envs: Vec<(&'static str, String)>, out_path: &Path) -> Result<(), String> {
    let out = std::fs::File::create(out_path).map_err(|e| format!("cannot create {}: {e}", out_path.display()))?;
    let err = out.try_clone().map_err(|e| format!("cannot clone {}: {e}", out_path.display()))?;
    // Output goes to a file, not a pipe: the detached VM must not hold our pipe open.
    let child = Command::new("rabbitmq-server")
        .arg("-detached")
        .envs(envs)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let status = wait_child(child, LAUNCH_TIMEOUT)?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("failed ({status}):\n{}", tail(out_path, 20)))
    }
}

/// Whether 127.0.0.1:`port` accepts a TCP connection (within 1 s).
async fn port_accepts(port: u16) -> bool {
    matches!(
        tokio::time::timeout(Duration::from_secs(1), TcpStream::connect((Ipv4Addr::LOCALHOST, port))).await,
        Ok(Ok(_))
    )
}

/// Polls until 127.0.0.1:`port` accepts (`open`) or refuses (`!open`) connections, for at
/// most `timeout`. Returns whether it got there.
async fn wait_port(port: u16, open: bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if port_accepts(port).await == open {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------------------
// RabbitCluster
// ---------------------------------------------------------------------------------------

/// A RabbitMQ cluster of throwaway nodes ([`ThrowawayNode`]), each on its own ports: the
/// first started alone, the others joined to it (`join_cluster`). They share the Erlang
/// cookie of the `rabbitmq` user they run as. Dropping the cluster stops every node.
#[derive(Debug)]
pub struct RabbitCluster {
    nodes: Vec<ThrowawayNode>,
}

impl RabbitCluster {
    /// Starts `size` nodes (side by side), joins them into one cluster and waits until
    /// `cluster_status` shows them all running.
    ///
    /// # Panics
    ///
    /// If a node does not start, refuses to join, or the cluster is not whole within 60 s.
    pub async fn start(size: usize) -> RabbitCluster {
        let started = Instant::now();
        let nodes = futures::future::join_all((0..size).map(|_| ThrowawayNode::start())).await;
        let cluster = RabbitCluster { nodes };
        let seed = cluster.nodes[0].node_name().to_owned();
        for node in &cluster.nodes[1..] {
            node.stop_app().await;
            node.ctl(&["join_cluster", &seed]).await;
            node.start_app().await;
        }
        crate::poll_until("the cluster's nodes all running", Duration::from_secs(60), POLL, || async {
            let running = cluster.running_nodes().await?;
            if running.len() == size {
                Ok(())
            } else {
                Err(format!("running: {running:?}"))
            }
        })
        .await;
        eprintln!("throwaway RabbitMQ cluster of {size} up in {:?}", started.elapsed());
        cluster
    }

    /// Node `index` (0 is the one the others joined).
    pub fn node(&self, index: usize) -> &ThrowawayNode {
        &self.nodes[index]
    }

    /// Every node.
    pub fn nodes(&self) -> &[ThrowawayNode] {
        &self.nodes
    }

    /// The AMQP address that lists every node, first `first` then the others in order, as
    /// guest on vhost `/`: `amqp://guest:guest@127.0.0.1:p1,127.0.0.1:p2,.../%2f`.
    pub fn uri_from(&self, first: usize) -> String {
        let count = self.nodes.len();
        let hosts: Vec<String> =
            (0..count).map(|i| format!("127.0.0.1:{}", self.nodes[(first + i) % count].port())).collect();
        format!("amqp://guest:guest@{}/%2f", hosts.join(","))
    }

    /// The names of the nodes running, as a node that answers sees them.
    async fn running_nodes(&self) -> Result<Vec<String>, String> {
        let mut last = String::from("no node answered");
        for node in &self.nodes {
            match node.try_ctl(&["cluster_status", "--formatter", "json"], CTL_TIMEOUT).await {
                Ok(out) => {
                    let status: serde_json::Value =
                        serde_json::from_str(out.trim()).map_err(|e| format!("cluster_status: {e}: {out}"))?;
                    let running = status["running_nodes"].as_array().cloned().unwrap_or_default();
                    return Ok(running.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect());
                }
                Err(error) => last = error,
            }
        }
        Err(last)
    }

    /// The node that leads quorum queue `queue` now, asked of a node that answers
    /// (`list_queues name leader`); `None` while it has none.
    pub async fn leader(&self, queue: &str) -> Option<String> {
        self.queue_column(queue, "leader").await.filter(|leader| leader.contains('@'))
    }

    /// How many messages `queue` holds, asked of a node that answers.
    pub async fn messages(&self, queue: &str) -> Option<u64> {
        self.queue_column(queue, "messages").await.and_then(|messages| messages.parse().ok())
    }

    /// `column` of `queue` in `list_queues` on vhost `/`, asked of the first node that answers.
    async fn queue_column(&self, queue: &str, column: &str) -> Option<String> {
        for node in &self.nodes {
            let listing = ["list_queues", "-p", "/", "name", column, "--quiet", "--no-table-headers"];
            let Ok(out) = node.try_ctl(&listing, CTL_TIMEOUT).await else {
                continue;
            };
            return data_lines(&out)
                .map(fields::<2>)
                .find(|[name, _]| name == queue)
                .map(|[_, value]| value.trim().to_owned());
        }
        None
    }
}

//! A Redis server of a test's own, for fault tests that stop and restart it; the shared
//! server on 6379 is left alone.

use std::time::Duration;

use crate::unique;

/// A Redis server of the test's own, on its own port, with its data in a temporary folder
/// so that it comes back with its data after a stop.
#[derive(Debug)]
pub struct ThrowawayRedis {
    port: u16,
    dir: std::path::PathBuf,
}

impl ThrowawayRedis {
    /// Starts a server on a free port (it answers before this returns).
    pub fn start() -> ThrowawayRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let dir = std::env::temp_dir().join(unique("redis"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let redis = ThrowawayRedis { port, dir };
        redis.launch();
        redis
    }

    /// Starts the server again (after [`stop`](Self::stop)), with the data it saved.
    pub fn launch(&self) {
        let status = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--daemonize", "yes", "--appendonly", "no"])
            .args(["--save", "", "--dir", &self.dir.to_string_lossy(), "--dbfilename", "dump.rdb"])
            .args(["--pidfile", &self.dir.join("redis.pid").to_string_lossy()])
            .status()
            .expect("redis-server runs");
        assert!(status.success(), "redis-server started");
        self.wait_port(true);
    }

    fn wait_port(&self, open: bool) {
        let what = format!("redis on port {} to {}", self.port, if open { "start" } else { "stop" });
        wait_for(&what, || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() == open);
    }

    /// The server's URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Saves to disk and stops, as an operator restarting Redis would.
    pub fn stop(&self) {
        let _ =
            std::process::Command::new("redis-cli").args(["-p", &self.port.to_string(), "shutdown", "save"]).status();
        self.wait_port(false);
    }
}

impl Drop for ThrowawayRedis {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new("redis-cli").args(["-p", &self.port.to_string(), "shutdown", "nosave"]).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free port on 127.0.0.1 whose port + 10000 is free too (a cluster node's bus port).
fn free_cluster_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        let port = listener.local_addr().expect("bound").port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// Runs `redis-cli -p port args` and returns its output.
fn redis_cli(port: u16, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map_err(|e| format!("redis-cli: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("redis-cli -p {port} {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// The arguments of a data server on `port` keeping its files in `dir`, nothing on disk.
fn data_server_args(port: u16, dir: &std::path::Path) -> Vec<String> {
    let port_text = port.to_string();
    let pidfile = dir.join(format!("{port}.pid"));
    let dbfilename = format!("{port}.rdb");
    let logfile = dir.join(format!("{port}.log"));
    let args: [&str; 18] = [
        "--port",
        &port_text,
        "--bind",
        "127.0.0.1",
        "--daemonize",
        "yes",
        "--save",
        "",
        "--appendonly",
        "no",
        "--pidfile",
        &pidfile.to_string_lossy(),
        "--dir",
        &dir.to_string_lossy(),
        "--dbfilename",
        &dbfilename,
        "--logfile",
        &logfile.to_string_lossy(),
    ];
    args.iter().map(|a| (*a).to_owned()).collect()
}

/// One server of a [`RedisCluster`] or a [`RedisSentinel`] set-up.
#[derive(Debug)]
struct Server {
    port: u16,
    args: Vec<String>,
}

impl Server {
    fn launch(&self) {
        self.try_launch(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the server and waits until it answers, for at most `within`; on failure, why,
    /// with the end of its log when it keeps one.
    fn try_launch(&self, within: Duration) -> Result<(), String> {
        let status = std::process::Command::new("redis-server")
            .args(&self.args)
            .status()
            .map_err(|e| format!("redis-server does not run: {e}"))?;
        if !status.success() {
            return Err(format!("redis-server on {} did not start: {status}", self.port));
        }
        if answers_within(within, || redis_cli(self.port, &["ping"]).is_ok()) {
            return Ok(());
        }
        let log = self.args.iter().position(|a| a == "--logfile").and_then(|i| self.args.get(i + 1));
        let tail = log.and_then(|l| std::fs::read_to_string(l).ok()).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(5).collect();
        Err(format!("redis on {} did not answer within {within:?}; its log ends: {tail:?}", self.port))
    }

    /// `kill -9`, and waits until its port refuses connections.
    fn kill(&self, dir: &std::path::Path) {
        let pidfile = dir.join(format!("{}.pid", self.port));
        let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
        let status = std::process::Command::new("kill").args(["-9", pid.trim()]).status().expect("kill runs");
        assert!(status.success(), "kill -9 {pid}");
        wait_for(&format!("redis on {} to stop", self.port), || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
    }
}

/// Waits (at most 60 s) until `done` says so: for servers, which notify no one.
fn wait_for(what: &str, done: impl FnMut() -> bool) {
    assert!(answers_within(Duration::from_secs(60), done), "{what}: not within 60 s");
}

/// Asks `done` every 50 ms until it says so, for at most `within`; whether it did.
fn answers_within(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + within;
    while !done() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A Redis Cluster of the test's own: `masters` masters with one replica each, on free ports,
/// made with `redis-cli --cluster create`. A replica takes over from a master that stops
/// answering for a second (`cluster-node-timeout 1000`). Dropping it stops every server.
#[derive(Debug)]
pub struct RedisCluster {
    servers: Vec<Server>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts the servers, creates the cluster and waits until every node says it is `ok`.
    pub fn start(masters: usize) -> RedisCluster {
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut servers = Vec::new();
        for _ in 0..masters * 2 {
            // A port found free can be taken before the server binds it (its cluster bus port
            // too, ten thousand above): a server that does not come up is tried on another.
            let mut failures = Vec::new();
            let server = loop {
                let port = free_cluster_port();
                let mut args = data_server_args(port, &dir);
                let config = dir.join(format!("{port}.conf")).to_string_lossy().into_owned();
                let cluster = ["--cluster-enabled", "yes", "--cluster-node-timeout", "1000", "--cluster-config-file"];
                args.extend(cluster.iter().map(|a| (*a).to_owned()));
                args.push(config);
                let server = Server { port, args };
                match server.try_launch(Duration::from_secs(20)) {
                    Ok(()) => break server,
                    Err(failure) if failures.len() < 2 => {
                        // In case it is up after all, answering too late.
                        let _ = redis_cli(port, &["shutdown", "nosave"]);
                        failures.push(failure);
                    }
                    Err(failure) => panic!("no cluster node came up in 3 tries: {failures:?}, {failure}"),
                }
            };
            servers.push(server);
        }
        let cluster = RedisCluster { servers, dir };
        let mut create = vec!["--cluster".to_owned(), "create".to_owned()];
        create.extend(cluster.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)));
        create.extend(["--cluster-replicas", "1", "--cluster-yes"].map(str::to_owned));
        let create: Vec<&str> = create.iter().map(String::as_str).collect();
        redis_cli(cluster.servers[0].port, &create).unwrap_or_else(|e| panic!("cluster create: {e}"));
        for server in &cluster.servers {
            wait_for("the cluster's state ok on every node", || {
                redis_cli(server.port, &["cluster", "info"]).is_ok_and(|info| info.contains("cluster_state:ok"))
            });
        }
        cluster
    }

    /// The address of the whole cluster, for `RedisConfig::parse`.
    pub fn address(&self) -> String {
        let nodes: Vec<String> = self.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis-cluster://{}", nodes.join(","))
    }

    /// The port of the master serving `key`'s slot now.
    ///
    /// # Panics
    ///
    /// When no master serves it (during a failover: use [`master_serving`](Self::master_serving)).
    pub fn master_of(&self, key: &str) -> u16 {
        self.master_serving(key).unwrap_or_else(|| panic!("no master serves the slot of {key:?}"))
    }

    /// The port of the master serving `key`'s slot now, if one does and is not failing.
    pub fn master_serving(&self, key: &str) -> Option<u16> {
        let slot: u16 = self
            .servers
            .iter()
            .find_map(|s| redis_cli(s.port, &["cluster", "keyslot", key]).ok())
            .and_then(|out| out.trim().parse().ok())?;
        let nodes = self.servers.iter().find_map(|s| redis_cli(s.port, &["cluster", "nodes"]).ok())?;
        nodes.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                return None;
            }
            let covers = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                matches!((low.parse::<u16>(), high.parse::<u16>()), (Ok(low), Ok(high)) if (low..=high).contains(&slot))
            });
            let address = fields[1].split('@').next().unwrap_or("");
            covers.then(|| address.rsplit(':').next().and_then(|p| p.parse().ok())).flatten()
        })
    }

    /// Kills (`kill -9`) the master on `port` and waits until its replica has taken over:
    /// every surviving node says the cluster is `ok` and another master serves its slots.
    pub fn fail_over(&self, port: u16, key: &str) {
        let server = self.servers.iter().find(|s| s.port == port).expect("a server of the cluster");
        server.kill(&self.dir);
        wait_for("a replica to take over", || {
            self.servers
                .iter()
                .filter(|s| s.port != port)
                .all(|s| redis_cli(s.port, &["cluster", "info"]).is_ok_and(|info| info.contains("cluster_state:ok")))
                && self.master_serving(key).is_some_and(|master| master != port)
        });
    }
}

impl RedisCluster {
    /// Each master's port with how many keys it holds.
    pub fn keys_per_master(&self) -> Vec<(u16, u64)> {
        self.servers
            .iter()
            .filter(|s| redis_cli(s.port, &["role"]).is_ok_and(|role| role.starts_with("master")))
            .map(|s| {
                let keys = redis_cli(s.port, &["dbsize"]).ok().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
                (s.port, keys)
            })
            .collect()
    }

    /// Starts the server on `port` again (after [`fail_over`](Self::fail_over)): it rejoins
    /// the cluster as a replica of the master that took over, and this waits until that
    /// master sees it as a connected replica.
    pub fn restart(&self, port: u16) {
        let server = self.servers.iter().find(|s| s.port == port).expect("a server of the cluster");
        server.launch();
        wait_for("the restarted node to replicate again", || {
            redis_cli(port, &["role"]).is_ok_and(|role| {
                let mut lines = role.lines();
                lines.next() == Some("slave") && role.contains("connected")
            })
        });
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for server in &self.servers {
            let _ = redis_cli(server.port, &["shutdown", "nosave"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A master with one replica and three Sentinels watching it as `service`, on free ports.
/// A Sentinel declares the master down after one second without an answer. Dropping it
/// stops every server.
#[derive(Debug)]
pub struct RedisSentinel {
    master: Server,
    replica: Server,
    sentinels: Vec<Server>,
    dir: std::path::PathBuf,
}

impl RedisSentinel {
    /// The name the Sentinels know the master by.
    pub const SERVICE: &'static str = "busmaster";

    /// Starts the master, its replica and the Sentinels, and waits until the Sentinels know
    /// the replica.
    pub fn start() -> RedisSentinel {
        let dir = std::env::temp_dir().join(unique("redis-sentinel"));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let data = |port: u16| data_server_args(port, &dir);
        let master_port = free_cluster_port();
        let master = Server { port: master_port, args: data(master_port) };
        let replica_port = free_cluster_port();
        let mut replica_args = data(replica_port);
        replica_args.extend(["--replicaof".to_owned(), "127.0.0.1".to_owned(), master_port.to_string()]);
        let replica = Server { port: replica_port, args: replica_args };
        master.launch();
        replica.launch();
        let sentinels = (0..3)
            .map(|_| {
                let port = free_cluster_port();
                let conf = dir.join(format!("sentinel-{port}.conf"));
                let service = Self::SERVICE;
                std::fs::write(
                    &conf,
                    format!(
                        "port {port}\nbind 127.0.0.1\ndaemonize yes\npidfile {}\ndir {}\n\
                         sentinel monitor {service} 127.0.0.1 {master_port} 2\n\
                         sentinel down-after-milliseconds {service} 1000\n\
                         sentinel failover-timeout {service} 5000\n",
                        dir.join(format!("{port}.pid")).display(),
                        dir.display()
                    ),
                )
                .expect("sentinel config");
                Server { port, args: vec![conf.to_string_lossy().into_owned(), "--sentinel".to_owned()] }
            })
            .collect::<Vec<_>>();
        for sentinel in &sentinels {
            sentinel.launch();
        }
        let setup = RedisSentinel { master, replica, sentinels, dir };
        for sentinel in &setup.sentinels {
            wait_for("the Sentinels to know the replica", || {
                redis_cli(sentinel.port, &["sentinel", "replicas", Self::SERVICE])
                    .is_ok_and(|out| out.contains(&setup.replica.port.to_string()))
            });
        }
        setup
    }

    /// The address for `RedisConfig::parse`.
    pub fn address(&self) -> String {
        let nodes: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis-sentinel://{}/{}", nodes.join(","), Self::SERVICE)
    }

    /// The master's port as the Sentinels name it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = redis_cli(self.sentinels[0].port, &["sentinel", "get-master-addr-by-name", Self::SERVICE]).ok()?;
        out.lines().nth(1)?.trim().parse().ok()
    }

    /// Kills (`kill -9`) the master and waits until the Sentinels have promoted the replica
    /// and it takes writes.
    pub fn fail_over(&self) {
        self.master.kill(&self.dir);
        wait_for("the Sentinels to promote the replica", || {
            self.master_port() == Some(self.replica.port)
                && redis_cli(self.replica.port, &["role"]).is_ok_and(|role| role.starts_with("master"))
        });
    }
}

impl RedisSentinel {
    /// Starts the master killed by [`fail_over`](Self::fail_over) again: the Sentinels make
    /// it a replica of the new master; this waits until the new master sees it connected.
    pub fn restart_old_master(&self) {
        self.master.launch();
        wait_for("the old master to replicate the new one", || {
            redis_cli(self.replica.port, &["info", "replication"]).is_ok_and(|info| info.contains("connected_slaves:1"))
        });
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        for server in self.sentinels.iter().chain([&self.master, &self.replica]) {
            let _ = redis_cli(server.port, &["shutdown", "nosave"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

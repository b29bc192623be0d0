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
        for _ in 0..100 {
            let answers = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if answers == open {
                return;
            }
            // Waiting on an external process: there is nothing to subscribe to.
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis on port {} did not {}", self.port, if open { "start" } else { "stop" });
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

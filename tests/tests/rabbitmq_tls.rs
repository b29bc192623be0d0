//! The RabbitMQ transport over TLS (`amqps://`): it verifies the broker's certificate against
//! the CA it is given, and presents a client certificate (mutual TLS).
//!
//! Runs against a throwaway node whose TLS listener requires a client certificate signed by a
//! test CA. The CA, the server certificate (for `localhost` and 127.0.0.1) and the client
//! certificate are made afresh for each run with the `openssl` CLI. Needs root, like every
//! throwaway node, and `openssl` on the PATH.

use std::path::PathBuf;
use std::time::Duration;

use bus_core::testing::MessageLog;
use bus_core::{Bus, ConsumeContext, Endpoint, Message};
use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport, TlsOptions};
use serde::{Deserialize, Serialize};
use tests::rabbit_support::{free_port, run_command, ThrowawayNode};
use tests::unique;

/// How long one `openssl` or `chown` call may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a connection attempt that is meant to fail may take.
const REFUSED_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Bound on a whole `connect_with` call, above its own connect timeout.
const CONNECT_BOUND: Duration = Duration::from_secs(30);

/// How long the round trip may take.
const WAIT: Duration = Duration::from_secs(15);

/// The client certificate's subject, as `rabbitmqctl list_connections peer_cert_subject`
/// shows it.
const CLIENT_SUBJECT: &str = "CN=bus test client";

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Tls:Ping")]
struct Ping {
    n: u32,
}

/// A test PKI in a directory of its own under /tmp, removed on drop.
#[derive(Debug)]
struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// Makes a CA, a server certificate for `localhost` and 127.0.0.1 and a client
    /// certificate, both signed by the CA, and the client key as PKCS#8 DER; then hands the
    /// directory to the `rabbitmq` user, which the node runs as. Blocks.
    fn create() -> Pki {
        run_command("openssl", &["version"], TOOL_TIMEOUT)
            .unwrap_or_else(|e| panic!("this test needs the openssl CLI: {e}"));
        let dir = PathBuf::from("/tmp").join(unique("bus-tls-pki"));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // Built before anything can fail so that Drop cleans up.
        let pki = Pki { dir };
        let ca_key = pki.path("ca.key");
        let ca_pem = pki.path("ca.pem");
        pki.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "2",
            "-subj",
            "/CN=bus test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        // rustls (webpki) wants v3 end-entity certificates with CA:FALSE, and the host name
        // of the URI (localhost) in subjectAltName.
        pki.sign(
            "server",
            "/CN=localhost",
            2,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        );
        pki.sign(
            "client",
            &format!("/{CLIENT_SUBJECT}"),
            3,
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\n\
             extendedKeyUsage = clientAuth\n",
        );
        let client_key = pki.path("client.key");
        let client_key_pem = pki.path("client.key.pk8");
        pki.openssl(&["pkcs8", "-topk8", "-nocrypt", "-in", &client_key, "-out", &client_key_pem]);
        let dir = pki.dir.display().to_string();
        run_command("chown", &["-R", "rabbitmq:rabbitmq", &dir], TOOL_TIMEOUT)
            .unwrap_or_else(|e| panic!("cannot hand {dir} to the rabbitmq user: {e}"));
        pki
    }

    /// Makes `{name}.key` and `{name}.pem`: a fresh RSA key and a certificate for it with
    /// `subject` and the extensions `ext` (openssl config lines), signed by the CA.
    fn sign(&self, name: &str, subject: &str, serial: u32, ext: &str) {
        let key = self.path(&format!("{name}.key"));
        let csr = self.path(&format!("{name}.csr"));
        let pem = self.path(&format!("{name}.pem"));
        let ext_path = self.path(&format!("{name}.ext"));
        std::fs::write(&ext_path, ext).unwrap_or_else(|e| panic!("cannot write {ext_path}: {e}"));
        self.openssl(&[
            "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject,
        ]);
        let ca_pem = self.path("ca.pem");
        let ca_key = self.path("ca.key");
        let serial = serial.to_string();
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "2",
            "-extfile",
            &ext_path,
            "-out",
            &pem,
        ]);
    }

    /// Runs `openssl args`, panicking with its output if it fails.
    fn openssl(&self, args: &[&str]) {
        if let Err(e) = run_command("openssl", args, TOOL_TIMEOUT) {
            panic!("{e}");
        }
    }

    /// The path of the file `name` in the PKI directory.
    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// The text of the file `name`.
    fn read_text(&self, name: &str) -> String {
        let path = self.path(name);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"))
    }

    /// `rabbitmq.conf` lines for a TLS listener on 127.0.0.1:`port` that presents the server
    /// certificate and requires a client certificate signed by the CA.
    fn broker_conf(&self, port: u16) -> String {
        let ca = self.path("ca.pem");
        let cert = self.path("server.pem");
        let key = self.path("server.key");
        format!(
            "listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {ca}\n\
             ssl_options.certfile = {cert}\n\
             ssl_options.keyfile = {key}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n"
        )
    }

    /// Client TLS options: the CA to trust (`trust_ca`) and the client certificate with its
    /// PKCS#8 PEM key (`present_client_cert`).
    fn client_tls(&self, trust_ca: bool, present_client_cert: bool) -> TlsOptions {
        TlsOptions {
            ca_pem: trust_ca.then(|| self.read_text("ca.pem")),
            client_cert_pem: present_client_cert.then(|| self.read_text("client.pem")),
            client_key_pem: present_client_cert.then(|| self.read_text("client.key.pk8")),
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Connects with `options`, bounded even if the transport's own timeout does not fire.
async fn connect(address: &str, options: RabbitMqOptions) -> Result<RabbitMqTransport, bus_rabbitmq::Error> {
    tokio::time::timeout(CONNECT_BOUND, RabbitMqTransport::connect_with(address, options))
        .await
        .unwrap_or_else(|_| panic!("connect_with to {address} took longer than {CONNECT_BOUND:?}"))
}

/// Asserts that connecting with `tls` fails, and returns the error's text.
async fn assert_refused(address: &str, tls: TlsOptions, what: &str) -> String {
    let options = RabbitMqOptions { tls, connect_timeout: REFUSED_CONNECT_TIMEOUT, ..RabbitMqOptions::default() };
    match connect(address, options).await {
        Ok(transport) => {
            transport.close().await;
            panic!("connected {what}");
        }
        Err(error) => error.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls_with_server_verification_and_a_client_certificate() {
    let pki = tokio::task::spawn_blocking(Pki::create).await.expect("the PKI is made");
    let tls_port = free_port();
    let node = ThrowawayNode::start_with_config(&pki.broker_conf(tls_port)).await;
    let address = format!("amqps://guest:guest@localhost:{tls_port}/%2f");

    // Mutual TLS: the broker's certificate verified against the CA, the client certificate
    // presented and accepted.
    let options = RabbitMqOptions { tls: pki.client_tls(true, true), ..RabbitMqOptions::default() };
    let transport = connect(&address, options)
        .await
        .expect("connects over TLS, verifying the broker against the CA and presenting the client certificate");
    let connections =
        node.ctl(&["list_connections", "ssl", "peer_cert_subject", "--quiet", "--no-table-headers"]).await;
    let expected = format!("true\t{CLIENT_SUBJECT}");
    assert!(
        connections.lines().any(|line| line.trim_end() == expected),
        "the broker sees a TLS connection with the client certificate:\n{connections}"
    );

    let queue = unique("tls");
    let log = MessageLog::default();
    let bus = Bus::builder(transport.clone())
        .stop_timeout(Duration::from_secs(5))
        .endpoint(Endpoint::new(&queue).handler_with_state(log.clone(), |ctx: ConsumeContext<Ping>, log| async move {
            log.record(ctx.envelope());
            Ok(())
        }))
        .build();
    bus.start().await.expect("the bus starts over TLS");
    bus.publish(Ping { n: 7 }).await.expect("publish over TLS is confirmed");
    let received = log.wait_for::<Ping>(1, WAIT).await.expect("the message round-trips over TLS");
    assert_eq!(received.iter().map(|p| p.n).collect::<Vec<_>>(), vec![7]);
    bus.stop().await.expect("the bus stops");
    transport.close().await;

    // Without a client certificate the broker refuses (fail_if_no_peer_cert). With TLS 1.3
    // the client's handshake completes first; the refusal arrives as an alert on the first
    // read, so the AMQP handshake fails.
    let error = assert_refused(&address, pki.client_tls(true, false), "without a client certificate").await;
    println!("without a client certificate: {error}");

    // Without the CA the broker's certificate does not verify against the system roots.
    let error = assert_refused(&address, pki.client_tls(false, true), "without trusting the test CA").await;
    println!("without the CA: {error}");

    drop(node);
    drop(pki);
}

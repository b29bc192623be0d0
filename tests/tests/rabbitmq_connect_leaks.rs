//! Connection attempts that fail leave nothing behind. A test binary of its own: it counts
//! the whole process's threads and file descriptors, which other tests would move.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_rabbitmq::{RabbitMqOptions, RabbitMqTransport};

fn threads_and_descriptors() -> (usize, usize) {
    let count =
        |dir: &str| std::fs::read_dir(dir).map(|entries| entries.count()).unwrap_or_else(|e| panic!("{dir}: {e}"));
    (count("/proc/self/task"), count("/proc/self/fd"))
}

/// Breaks: 50 connection attempts against a listener that accepts and never speaks AMQP,
/// each cut short by the connect timeout. Proves: no thread and no socket is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_connects_leave_no_thread_or_socket_behind() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listens");
    let port = listener.local_addr().expect("address").port();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let server = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                accepted.lock().expect("lock").push(socket);
            }
        })
    };
    let options = RabbitMqOptions { connect_timeout: Duration::from_millis(200), ..RabbitMqOptions::default() };
    let uri = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let attempt = || RabbitMqTransport::connect_with(&uri, options.clone());
    // A few first, so that what is made once per process (runtime threads, TLS roots, the
    // I/O reactor lapin starts on its first connection) is there.
    for _ in 0..5 {
        assert!(attempt().await.is_err(), "a listener that never speaks is no broker");
    }
    let settle = |accepted: &Arc<Mutex<Vec<tokio::net::TcpStream>>>| accepted.lock().expect("lock").clear();
    settle(&accepted);
    let (threads, descriptors) = threads_and_descriptors();
    for _ in 0..50 {
        let error = attempt().await.expect_err("no broker there");
        assert!(
            error.to_string().contains("no connection to 127.0.0.1:") && error.to_string().contains("within"),
            "{error}"
        );
    }
    settle(&accepted);
    // Closing is asynchronous in the runtime: give dropped sockets a moment, bounded.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    let (threads_after, descriptors_after) = loop {
        poll.tick().await;
        let now = threads_and_descriptors();
        if (now.0 <= threads && now.1 <= descriptors) || tokio::time::Instant::now() > deadline {
            break now;
        }
    };
    server.abort();
    println!("threads {threads} -> {threads_after}, descriptors {descriptors} -> {descriptors_after}");
    assert!(threads_after <= threads, "threads left behind: {threads} before, {threads_after} after");
    assert!(
        descriptors_after <= descriptors,
        "descriptors left behind: {descriptors} before, {descriptors_after} after"
    );
}

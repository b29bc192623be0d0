//! The dashboard in a real headless Chromium (Debian's `chromium`, driven through
//! `chromedriver`'s WebDriver protocol): it lists the endpoints, shows an `_error` message's
//! reason, and its redrive button (confirmed in the browser's dialog) moves the message back,
//! as the broker then shows.

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bus_core::testing::Log;
use bus_core::{BoxError, Bus, ConsumeContext, Endpoint, Message};
use bus_rabbitmq::RabbitMqTransport;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tests::poll_until;
use tests::rabbit_fixture::require_broker;
use tests::rabbit_support::{free_port, Vhost};
use tokio::io::{AsyncBufReadExt, BufReader};

const WAIT: Duration = Duration::from_secs(30);
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(urn = "urn:message:Dashboard:Order")]
struct Order {
    n: u32,
}

/// A WebDriver session on chromedriver.
struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.base);
        let mut request = self.http.request(method, &url);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        let value: Value = response.json().await.unwrap_or_else(|e| panic!("{url}: {e}"));
        value["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url }))).await;
    }

    async fn source(&self) -> String {
        self.call(reqwest::Method::GET, "/source", None).await.as_str().unwrap_or_default().to_owned()
    }
}

/// Starts chromedriver on a port of its own and a headless Chromium session on it.
async fn browser() -> (tokio::process::Child, Browser) {
    let port = free_port();
    let driver = tokio::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver runs: scripts/test.sh installs Debian's chromium and chromium-driver");
    let http = reqwest::Client::new();
    let root = format!("http://127.0.0.1:{port}");
    poll_until("chromedriver answers", WAIT, Duration::from_millis(100), || async {
        http.get(format!("{root}/status")).send().await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    let capabilities = json!({ "capabilities": { "alwaysMatch": {
        "browserName": "chrome",
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        }
    }}});
    let session: Value = http
        .post(format!("{root}/session"))
        .json(&capabilities)
        .send()
        .await
        .expect("session")
        .json()
        .await
        .expect("json");
    let id = session["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {session}")).to_owned();
    (driver, Browser { http, base: format!("{root}/session/{id}") })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_lists_endpoints_shows_reasons_and_redrives_in_a_real_browser() {
    require_broker();
    let vhost = Arc::new(tokio::task::spawn_blocking(|| Vhost::create("dashboard")).await.expect("vhost"));
    let failing = Arc::new(AtomicBool::new(true));
    let consumed = Log::<u32>::default();
    let (f, c) = (failing.clone(), consumed.clone());
    let transport = RabbitMqTransport::connect(&vhost.uri(5672)).await.expect("connects");
    let bus = Bus::builder(transport)
        .endpoint(Endpoint::new("orders").handler(move |ctx: ConsumeContext<Order>| {
            let (failing, consumed, n) = (f.load(Ordering::SeqCst), c.clone(), ctx.message().n);
            async move {
                if failing {
                    return Err::<(), BoxError>("warehouse offline".into());
                }
                consumed.push(n);
                Ok(())
            }
        }))
        .build();
    bus.start().await.expect("bus starts");
    for n in 0..2 {
        bus.send("queue:orders", Order { n }).await.expect("send");
    }

    let mut serve = tokio::process::Command::new(env!("CARGO_BIN_EXE_busctl"))
        .args(["--addr", &vhost.uri(5672), "serve", "--listen", "127.0.0.1:0", "orders"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("busctl serve runs");
    let mut lines = BufReader::new(serve.stdout.take().expect("stdout")).lines();
    let first =
        tokio::time::timeout(WAIT, lines.next_line()).await.expect("started").expect("a line").unwrap_or_default();
    let dashboard = first.strip_prefix("dashboard on ").expect("its address").to_owned();

    let (_driver, browser) = browser().await;
    // The endpoints page, until both failures are in `orders_error`.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        browser.open(&format!("{dashboard}/")).await;
        let source = browser.source().await;
        if source.contains("<a href=\"/errors/orders\">2</a>") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the endpoints page never showed 2 errors:\n{source}");
    }
    browser.open(&format!("{dashboard}/errors/orders")).await;
    let source = browser.source().await;
    assert!(source.contains("2 messages in orders_error"), "{source}");
    // For the docs: `DASHBOARD_SCREENSHOT=docs/dashboard.png cargo test -p busctl --test dashboard`.
    if let Ok(path) = std::env::var("DASHBOARD_SCREENSHOT") {
        browser.call(reqwest::Method::POST, "/window/rect", Some(json!({ "width": 1100, "height": 700 }))).await;
        let png = browser.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, png.as_str().unwrap_or_default())
            .expect("a PNG");
        std::fs::write(&path, png).expect("screenshot written");
    }
    assert!(source.contains("warehouse offline"), "the reason is shown:\n{source}");

    // The first message's redrive button, confirmed in the browser's dialog.
    failing.store(false, Ordering::SeqCst);
    let button = browser
        .call(reqwest::Method::POST, "/element", Some(json!({ "using": "css selector", "value": ".message .redrive" })))
        .await;
    let element = button[ELEMENT].as_str().unwrap_or_else(|| panic!("no redrive button: {button}")).to_owned();
    browser.call(reqwest::Method::POST, &format!("/element/{element}/click"), Some(json!({}))).await;
    let dialog = browser.call(reqwest::Method::GET, "/alert/text", None).await;
    assert!(dialog.as_str().unwrap_or_default().starts_with("Redrive "), "asked first: {dialog}");
    browser.call(reqwest::Method::POST, "/alert/accept", Some(json!({}))).await;

    consumed.wait_until("the redriven order", WAIT, |c| c.len() == 1).await.expect("back in its queue and consumed");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let source = browser.source().await;
        if source.contains("1 messages in orders_error") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the page never showed one left:\n{source}");
        browser.open(&format!("{dashboard}/errors/orders")).await;
    }
    // Another site's page cannot make the operator's browser purge.
    let forged = reqwest::Client::new()
        .post(format!("{dashboard}/errors/orders/purge"))
        .header("Origin", "http://evil.example")
        .header("Sec-Fetch-Site", "cross-site")
        .send()
        .await
        .expect("answered");
    assert_eq!(forged.status(), reqwest::StatusCode::FORBIDDEN);
    browser.call(reqwest::Method::DELETE, "", None).await;
    serve.start_kill().expect("stop serving");
    bus.stop().await.expect("stop");
    let listed = vhost.clone();
    let queues = tokio::task::spawn_blocking(move || listed.list_queues()).await.expect("queues");
    let in_error = queues.iter().find(|(name, _)| name == "orders_error").map(|(_, n)| *n);
    assert_eq!(in_error, Some(1), "the broker holds the other one still");
}

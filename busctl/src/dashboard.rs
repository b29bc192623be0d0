//! The dashboard (`busctl serve`): the endpoints with their depths and rates, refreshed every
//! few seconds; each error queue's messages with their reasons, headers and bodies; redrive
//! and purge buttons that ask before they act. Plain server-rendered pages: no front-end
//! build. Mount [`router`] in a service's own axum router, or serve it with `busctl serve`.
//! It has no login of its own: serve it only where its users may redrive and purge
//! (loopback, an operators' network). Changes refuse requests from other sites' pages.

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use lapin::{Connection, ConnectionProperties};

use crate::management::Management;
use crate::{faulted, path_segment, Error, Redrive, Result};

/// What the dashboard shows: the broker, and the endpoints to show when its management API
/// does not list them.
#[derive(Debug)]
struct Served {
    addr: String,
    management: Option<String>,
    endpoints: Vec<String>,
}

/// The dashboard's routes: `/`, `/errors/{endpoint}`, and the redrive and purge actions.
///
/// ```
/// let dashboard = busctl::dashboard::router("amqp://guest:guest@127.0.0.1:5672/%2f".into(), None, vec!["orders".into()]);
/// # drop(dashboard);
/// ```
pub fn router(addr: String, management: Option<String>, endpoints: Vec<String>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/errors/{endpoint}", get(errors))
        .route("/errors/{endpoint}/redrive", post(redrive))
        .route("/errors/{endpoint}/purge", post(purge))
        .layer(axum::middleware::from_fn(same_origin_only))
        .with_state(Arc::new(Served { addr, management, endpoints }))
}

async fn connect(served: &Served) -> Result<Connection> {
    Ok(Connection::connect(&served.addr, ConnectionProperties::default()).await?)
}

/// Refuses a change (redrive, purge) asked for by another site's page: a form another site
/// submits in the operator's browser comes with that site's `Origin`, or `Sec-Fetch-Site:
/// cross-site`.
async fn same_origin_only(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let headers = request.headers();
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let fetch_site_ok = text("sec-fetch-site").is_none_or(|site| site == "same-origin" || site == "none");
    let origin_ok = match (text("origin"), text("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
        (None, _) => true,
    };
    if request.method() != axum::http::Method::GET && !(fetch_site_ok && origin_ok) {
        return (StatusCode::FORBIDDEN, "refused: the request did not come from this dashboard").into_response();
    }
    next.run(request).await
}

/// Text made safe for HTML.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(title: &str, refresh: bool, body: &str) -> Html<String> {
    let refresh = if refresh { r#"<meta http-equiv="refresh" content="3">"# } else { "" };
    Html(format!(
        r#"<!doctype html><html><head><meta charset="utf-8">{refresh}<title>{title}</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
td.n{{text-align:right}}pre{{background:#f4f4f4;padding:8px;max-width:100em;overflow:auto}}form{{display:inline}}</style></head>
<body><h1>{title}</h1>{body}</body></html>"#,
        title = escape(title)
    ))
}

fn failure(error: Error) -> Response {
    let body =
        format!("<p>{}</p><p><a href=\"/\">endpoints</a></p>", escape(&bus_core::logged::chain(&error).to_string()));
    (StatusCode::BAD_GATEWAY, page("busctl: error", false, &body)).into_response()
}

async fn index(State(served): State<Arc<Served>>) -> Response {
    let shown = async {
        let connection = connect(&served).await?;
        let management = Management::detect(&served.addr, served.management.as_deref()).await;
        let rows = crate::endpoint_rows(&connection, management.as_ref(), &served.endpoints).await;
        let _ = connection.close(200, "shown".into()).await;
        rows
    };
    let rows = match shown.await {
        Ok(rows) => rows,
        Err(error) => return failure(error),
    };
    let number = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
    let mut body = String::from(
        "<table><tr><th>endpoint</th><th>ready</th><th>unacked</th><th>consumers</th><th>in/s</th><th>out/s</th><th>error</th><th>skipped</th></tr>",
    );
    for row in rows {
        let name = escape(&row.name);
        let Some((ready, unacked, consumers)) = row.counts else {
            let _ = write!(body, "<tr><td>{name}</td><td colspan=\"7\">no such queue</td></tr>");
            continue;
        };
        let (rate_in, rate_out) =
            row.rates.map_or_else(|| ("-".to_owned(), "-".to_owned()), |(i, o)| (format!("{i:.1}"), format!("{o:.1}")));
        let error = match row.error {
            Some(n) => format!("<a href=\"/errors/{}\">{n}</a>", escape(&path_segment(&row.name))),
            None => "-".to_owned(),
        };
        let _ = write!(
            body,
            "<tr class=\"endpoint\"><td>{name}</td><td class=\"n\">{ready}</td><td class=\"n\">{}</td><td class=\"n\">{consumers}</td>\
             <td class=\"n\">{rate_in}</td><td class=\"n\">{rate_out}</td><td class=\"n\">{error}</td><td class=\"n\">{}</td></tr>",
            number(unacked),
            number(row.skipped)
        );
    }
    body.push_str("</table><p>Refreshed every 3 s.</p>");
    page("Endpoints", true, &body).into_response()
}

async fn errors(State(served): State<Arc<Served>>, Path(endpoint): Path<String>) -> Response {
    let read = async {
        let connection = connect(&served).await?;
        let found = faulted::read_all(&connection, &format!("{endpoint}_error")).await;
        let _ = connection.close(200, "shown".into()).await;
        found
    };
    let found = match read.await {
        Ok(found) => found,
        Err(error) => return failure(error),
    };
    let name = escape(&endpoint);
    let path = escape(&path_segment(&endpoint));
    let mut body = format!(
        "<p><a href=\"/\">endpoints</a></p><p>{} messages in {name}_error</p>\
         <form method=\"post\" action=\"/errors/{path}/redrive\" data-ask=\"Redrive every message of {name}_error to {name}?\" onsubmit=\"return confirm(this.dataset.ask)\">\
         <input type=\"hidden\" name=\"all\" value=\"1\"><button id=\"redrive-all\">Redrive all</button></form> \
         <form method=\"post\" action=\"/errors/{path}/purge\" data-ask=\"Purge every message of {name}_error? They are gone for good.\" onsubmit=\"return confirm(this.dataset.ask)\">\
         <button id=\"purge\">Purge</button></form>",
        found.len()
    );
    for (f, message) in &found {
        let id = escape(&f.message_id);
        let mut headers = String::new();
        for (header, value) in message.headers.iter() {
            let text = value.as_str().map_or_else(|| value.to_string(), str::to_owned);
            let _ = writeln!(headers, "{}: {}", escape(header), escape(&text));
        }
        let pretty = serde_json::from_slice::<serde_json::Value>(&message.body)
            .ok()
            .and_then(|json| serde_json::to_string_pretty(&json).ok())
            .unwrap_or_else(|| String::from_utf8_lossy(&message.body).into_owned());
        let _ = write!(
            body,
            "<div class=\"message\" data-id=\"{id}\"><h3>{id}</h3><p>{} &middot; <span class=\"reason\">{}: {}</span> &middot; {}</p>\
             <form method=\"post\" action=\"/errors/{path}/redrive\" data-ask=\"Redrive {id} to {name}?\" onsubmit=\"return confirm(this.dataset.ask)\">\
             <input type=\"hidden\" name=\"id\" value=\"{id}\"><button class=\"redrive\">Redrive</button></form>\
             <details><summary>headers and body</summary><pre>{headers}</pre><pre>{}</pre></details></div>",
            escape(&f.message_type),
            escape(&f.exception_type),
            escape(&f.exception_message),
            escape(&f.fault_time),
            escape(&pretty)
        );
    }
    page(&format!("{endpoint}_error"), false, &body).into_response()
}

/// What a redrive button sends: one message's id, or all.
#[derive(Debug, serde::Deserialize)]
struct RedriveForm {
    id: Option<String>,
    all: Option<String>,
}

async fn redrive(
    State(served): State<Arc<Served>>,
    Path(endpoint): Path<String>,
    Form(form): Form<RedriveForm>,
) -> Response {
    let redrive = Redrive {
        endpoint: endpoint.clone(),
        ids: form.id.into_iter().collect(),
        all: form.all.is_some(),
        message_type: None,
        older_than: None,
        skipped: false,
        dry_run: false,
    };
    let done = async {
        let connection = connect(&served).await?;
        let mut report = Vec::new();
        let result = redrive.run(&connection, &mut report).await;
        let _ = connection.close(200, "redriven".into()).await;
        result
    };
    match done.await {
        Ok(()) => Redirect::to(&format!("/errors/{}", path_segment(&endpoint))).into_response(),
        Err(error) => failure(error),
    }
}

async fn purge(State(served): State<Arc<Served>>, Path(endpoint): Path<String>) -> Response {
    let done = async {
        let connection = connect(&served).await?;
        let mut report = Vec::new();
        let result = crate::purge(&connection, &format!("{endpoint}_error"), true, &mut report).await;
        let _ = connection.close(200, "purged".into()).await;
        result
    };
    match done.await {
        Ok(()) => Redirect::to(&format!("/errors/{}", path_segment(&endpoint))).into_response(),
        Err(error) => failure(error),
    }
}

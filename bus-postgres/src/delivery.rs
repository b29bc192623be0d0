//! The delivery service: committed outbox rows to the transport, and the cleanup.
//!
//! A batch is claimed in a database transaction: the writing transactions with rows not yet
//! delivered, oldest first, that no other delivery service holds (`pg_try_advisory_xact_lock`
//! on each), then their rows, read once the locks are held. The messages of one writing
//! transaction leave one after another, in order, each confirmed before the next; those of
//! different transactions leave concurrently. Delivered rows are marked in the same
//! transaction, which commits after the transport took them: a service that dies before
//! commits nothing, and its rows are claimed again (at least once, with their message ids).

use std::collections::BTreeMap;
use std::time::Duration;

use bus_core::logged::chain;
use bus_core::{Headers, PreparedDestination, PreparedMessage, TransportMessage};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::Row;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{database, Error, Result};
use crate::PostgresOutbox;

/// The first pause after a failed batch; it doubles up to the options' `max_backoff`.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The running delivery service and cleanup of an outbox; see [`PostgresOutbox::start`].
#[derive(Debug)]
pub struct DeliveryService {
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

impl DeliveryService {
    /// Stops delivering (a batch under way finishes first) and cleaning up.
    pub async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

pub(crate) fn start(outbox: PostgresOutbox) -> DeliveryService {
    let stop = CancellationToken::new();
    let tasks = vec![
        tokio::spawn(deliver_loop(outbox.clone(), stop.clone())),
        tokio::spawn(cleanup_loop(outbox, stop.clone())),
    ];
    DeliveryService { stop, tasks }
}

/// Delivers until stopped: woken by the outbox's notifications, or by the poll interval.
async fn deliver_loop(outbox: PostgresOutbox, stop: CancellationToken) {
    let inner = &outbox.store;
    let mut listener: Option<PgListener> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        if listener.is_none() {
            listener = listen(&outbox).await;
        }
        let pause = match deliver_batch(&outbox).await {
            // A full batch: more may be waiting.
            Ok(count) if count as i64 >= inner.options.batch_size && !stop.is_cancelled() => {
                backoff = FIRST_BACKOFF;
                continue;
            }
            Ok(_) => {
                backoff = FIRST_BACKOFF;
                None
            }
            Err(error) => {
                tracing::warn!(error = %chain(&error), pause = ?backoff, "outbox delivery failed; trying again after a pause");
                let pause = backoff;
                backoff = (backoff * 2).min(inner.options.max_backoff);
                Some(pause)
            }
        };
        let woken = async {
            match (pause, listener.as_mut()) {
                (Some(pause), _) => tokio::time::sleep(pause).await,
                (None, Some(active)) => {
                    if let Ok(Err(error)) = tokio::time::timeout(inner.options.poll_interval, active.recv()).await {
                        // Listened for again after a poll interval; polling meanwhile.
                        tracing::debug!(error = %chain(&error), "outbox notifications interrupted");
                        listener = None;
                        tokio::time::sleep(inner.options.poll_interval).await;
                    }
                }
                (None, None) => tokio::time::sleep(inner.options.poll_interval).await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = woken => {}
        }
    }
}

async fn listen(outbox: &PostgresOutbox) -> Option<PgListener> {
    let inner = &outbox.store;
    let listening = async {
        let mut listener = PgListener::connect_with(&inner.pool).await?;
        listener.listen(&inner.tables.channel).await?;
        Ok::<_, sqlx::Error>(listener)
    };
    match listening.await {
        Ok(listener) => Some(listener),
        Err(error) => {
            tracing::warn!(error = %chain(&error), "cannot listen for outbox notifications; polling");
            None
        }
    }
}

/// One stored message, claimed.
struct Claimed {
    sequence_number: i64,
    transaction_id: i64,
    message: Result<PreparedMessage>,
}

/// Claims a batch, delivers it and marks what was delivered; returns how many rows it settled.
pub(crate) async fn deliver_batch(outbox: &PostgresOutbox) -> Result<usize> {
    let inner = &outbox.store;
    let outbox_table = &inner.tables.outbox;
    let mut tx = inner.pool.begin().await.map_err(database("begin a delivery"))?;
    // The writing transactions first, each locked before its rows are read: the rows are
    // then read by a statement that starts after the lock is held, so that it sees what
    // the lock's last holder delivered (a statement that took its snapshot before, and the
    // lock after, would see delivered rows as waiting, and deliver later rows before them).
    // Each statement must see what committed before it began (`READ COMMITTED`), whatever
    // the pool's default.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
        .execute(&mut *tx)
        .await
        .map_err(database("set the delivery's isolation"))?;
    // The transactions of the oldest waiting rows (a bounded read of the pending index, not
    // the whole backlog); twice as many as one batch locks, so that a second service finds
    // transactions the first did not take.
    let candidates = format!(
        "SELECT transaction_id FROM (
             SELECT transaction_id, sequence_number FROM {outbox_table}
             WHERE delivered_at IS NULL ORDER BY sequence_number LIMIT $1
         ) AS oldest
         GROUP BY transaction_id ORDER BY min(sequence_number) LIMIT $1"
    );
    let candidates: Vec<i64> = sqlx::query_scalar(&candidates)
        .bind(inner.options.batch_size.saturating_mul(2))
        .fetch_all(&mut *tx)
        .await
        .map_err(database("find waiting outbox transactions"))?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let locked: Vec<i64> = sqlx::query_scalar(
        "SELECT t FROM unnest($2::bigint[]) AS t
         WHERE pg_try_advisory_xact_lock(hashtext($1), (t % 2147483647)::int4) LIMIT $3",
    )
    .bind(outbox_table)
    .bind(&candidates)
    .bind(inner.options.batch_size)
    .fetch_all(&mut *tx)
    .await
    .map_err(database("lock outbox transactions"))?;
    if locked.is_empty() {
        return Ok(0);
    }
    let claim = format!(
        "SELECT sequence_number, transaction_id, message_id, destination_kind, destination, content_type, headers,
                body, correlation_id, expires_at, priority, routing_key
         FROM {outbox_table}
         WHERE delivered_at IS NULL AND transaction_id = ANY($1)
         ORDER BY sequence_number
         LIMIT $2
         FOR UPDATE"
    );
    let rows = sqlx::query(&claim)
        .bind(&locked)
        .bind(inner.options.batch_size)
        .fetch_all(&mut *tx)
        .await
        .map_err(database("claim outbox messages"))?;
    if rows.is_empty() {
        return Ok(0);
    }
    // Grouped by writing transaction, each group in its order.
    let mut groups: BTreeMap<i64, Vec<Claimed>> = BTreeMap::new();
    for row in &rows {
        let claimed = claimed(row);
        groups.entry(claimed.transaction_id).or_default().push(claimed);
    }
    let results = futures::future::join_all(groups.into_values().map(|group| deliver_group(outbox, group))).await;
    let mut delivered = Vec::new();
    let mut failed = Vec::new();
    let mut transient = None;
    for result in results {
        delivered.extend(result.delivered);
        failed.extend(result.failed);
        transient = transient.or(result.transient);
    }
    let settled = delivered.len() + failed.len();
    if !delivered.is_empty() {
        let mark = format!("UPDATE {outbox_table} SET delivered_at = now() WHERE sequence_number = ANY($1)");
        sqlx::query(&mark).bind(&delivered).execute(&mut *tx).await.map_err(database("mark messages delivered"))?;
    }
    for (sequence_number, reason) in &failed {
        let mark = format!("UPDATE {outbox_table} SET delivered_at = now(), failure = $2 WHERE sequence_number = $1");
        sqlx::query(&mark)
            .bind(sequence_number)
            .bind(reason)
            .execute(&mut *tx)
            .await
            .map_err(database("mark a message undeliverable"))?;
    }
    tx.commit().await.map_err(database("commit a delivery"))?;
    match transient {
        Some(error) if settled == 0 => Err(error),
        Some(error) => {
            tracing::warn!(error = %chain(&error), settled, "part of an outbox batch could not be delivered; trying again after a pause");
            Err(error)
        }
        None => Ok(settled),
    }
}

/// What came of one writing transaction's messages.
#[derive(Default)]
struct GroupResult {
    delivered: Vec<i64>,
    /// Refused for good: marked with the reason, never tried again.
    failed: Vec<(i64, String)>,
    /// Stopped at a message that may go later: it and those after it stay in the outbox.
    transient: Option<Error>,
}

async fn deliver_group(outbox: &PostgresOutbox, group: Vec<Claimed>) -> GroupResult {
    let mut result = GroupResult::default();
    for claimed in group {
        let prepared = match claimed.message {
            Ok(prepared) => prepared,
            Err(error) => {
                tracing::error!(sequence_number = claimed.sequence_number, error = %chain(&error), "outbox row is not a message; marked failed");
                result.failed.push((claimed.sequence_number, chain(&error).to_string()));
                continue;
            }
        };
        match outbox.bus.deliver(prepared).await {
            Ok(()) => result.delivered.push(claimed.sequence_number),
            // The bus stopped (or its transport closed under it): not the message's fault.
            Err(error) if error.is_transient() || matches!(error, bus_core::Error::Stopped) => {
                result.transient = Some(Error::Bus { operation: "deliver an outbox message", source: error });
                break;
            }
            Err(error) => {
                // Refused for good (sent to an endpoint that does not exist, say): kept with
                // the reason, so that it is neither lost silently nor tried for ever.
                let reason = chain(&error).to_string();
                tracing::error!(sequence_number = claimed.sequence_number, %reason, "outbox message refused by the transport; marked failed");
                result.failed.push((claimed.sequence_number, reason));
            }
        }
    }
    result
}

fn claimed(row: &PgRow) -> Claimed {
    let sequence_number: i64 = row.try_get("sequence_number").unwrap_or_default();
    let transaction_id: i64 = row.try_get("transaction_id").unwrap_or_default();
    Claimed { sequence_number, transaction_id, message: prepared(row, sequence_number) }
}

/// A stored row back as the message it was.
pub(crate) fn prepared(row: &PgRow, sequence_number: i64) -> Result<PreparedMessage> {
    let invalid = |reason: String| Error::InvalidRow { sequence_number, reason };
    let kind: String = row.try_get("destination_kind").map_err(|e| invalid(e.to_string()))?;
    let destination: String = row.try_get("destination").map_err(|e| invalid(e.to_string()))?;
    let destination = match kind.as_str() {
        "publish" => PreparedDestination::Publish(destination.split('\n').map(str::to_owned).collect()),
        "send" => PreparedDestination::Send(destination),
        other => return Err(invalid(format!("unknown destination kind `{other}`"))),
    };
    let headers: serde_json::Value = row.try_get("headers").map_err(|e| invalid(e.to_string()))?;
    let headers: Headers = serde_json::from_value(headers).map_err(|e| invalid(e.to_string()))?;
    let body: Vec<u8> = row.try_get("body").map_err(|e| invalid(e.to_string()))?;
    let content_type: Option<String> = row.try_get("content_type").map_err(|e| invalid(e.to_string()))?;
    let expires_at: Option<chrono::DateTime<chrono::Utc>> =
        row.try_get("expires_at").map_err(|e| invalid(e.to_string()))?;
    // What is left of its time to live; at least a moment, so that the broker expires it.
    let time_to_live = expires_at.map(|at| (at - chrono::Utc::now()).to_std().unwrap_or(Duration::from_millis(1)));
    let message = TransportMessage {
        body: body.into(),
        content_type: content_type.map(Into::into),
        headers,
        message_id: row.try_get("message_id").map_err(|e| invalid(e.to_string()))?,
        correlation_id: row.try_get("correlation_id").map_err(|e| invalid(e.to_string()))?,
        time_to_live,
        priority: row
            .try_get::<Option<i16>, _>("priority")
            .map_err(|e| invalid(e.to_string()))?
            .and_then(|p| u8::try_from(p).ok()),
        routing_key: row.try_get("routing_key").map_err(|e| invalid(e.to_string()))?,
    };
    Ok(PreparedMessage { destination, message })
}

/// Removes, every cleanup interval, delivered outbox rows and inbox rows older than the
/// duplicate window.
async fn cleanup_loop(outbox: PostgresOutbox, stop: CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(outbox.store.options.cleanup_interval) => {}
        }
        match cleanup(&outbox).await {
            Ok((0, 0)) => {}
            Ok((outbox_rows, inbox_rows)) => tracing::debug!(outbox_rows, inbox_rows, "outbox and inbox cleaned up"),
            Err(error) => tracing::warn!(error = %chain(&error), "outbox cleanup failed; trying again later"),
        }
    }
}

/// Removes delivered outbox rows and inbox rows older than the duplicate window; returns how
/// many of each.
pub(crate) async fn cleanup(outbox: &PostgresOutbox) -> Result<(u64, u64)> {
    let inner = &outbox.store;
    let window = inner.options.duplicate_window.as_secs_f64();
    let older =
        |table: &str, column: &str| format!("DELETE FROM {table} WHERE {column} < now() - make_interval(secs => $1)");
    let outbox_rows = sqlx::query(&older(&inner.tables.outbox, "delivered_at"))
        .bind(window)
        .execute(&inner.pool)
        .await
        .map_err(database("clean up the outbox"))?
        .rows_affected();
    let inbox_rows = sqlx::query(&older(&inner.tables.inbox, "consumed_at"))
        .bind(window)
        .execute(&inner.pool)
        .await
        .map_err(database("clean up the inbox"))?
        .rows_affected();
    // Finalized instances kept for messages that never left, past their keeping time.
    sqlx::query(&format!("DELETE FROM {} WHERE expires_at <= now()", inner.tables.sagas))
        .execute(&inner.pool)
        .await
        .map_err(database("clean up expired saga instances"))?;
    Ok((outbox_rows, inbox_rows))
}

//! Moves that could not complete: a message bound for `_error`, `_skipped` or a delay queue
//! that the transport could not put there (the queue refuses it, or the broker is out of
//! reach) goes back to its own queue. When it comes back, it is not consumed again (no second
//! run of its consumers, no second fault): the same move is tried again, after a pause that
//! doubles each time, and the endpoint reports itself degraded meanwhile.

use crate::sync::MutexExt;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::{Settlement, TransportMessage};

/// The first pause before a failed move is tried again; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const MAX_PAUSE: Duration = Duration::from_secs(30);
/// How many stalled moves are remembered; past that, a message whose move fails is
/// consumed again when it comes back, as if nothing were remembered.
const CAPACITY: usize = 10_000;
/// How long a stalled move is remembered after its latest attempt (another instance may have
/// taken the message meanwhile), and how long the endpoint reports a failure.
const FORGET_AFTER: Duration = Duration::from_secs(600);
const REPORT_FOR: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Stalled {
    settlement: Settlement,
    failures: u32,
    /// When the latest attempt began.
    since: Instant,
    /// When the message, back in its queue, may be moved again.
    retry_at: Instant,
    /// The last failure and why; `None` while the first attempt is under way.
    failed: Option<(Instant, String)>,
}

/// The stalled moves of one endpoint.
#[derive(Debug, Default)]
pub(crate) struct StalledMoves {
    entries: Mutex<HashMap<u64, Stalled>>,
    /// Entries, readable without the lock: the common case is none.
    count: AtomicUsize,
}

/// A move to try again: what it was, and when it may be tried.
#[derive(Debug)]
pub(crate) struct MoveRetry {
    pub(crate) key: u64,
    pub(crate) settlement: Settlement,
    pub(crate) retry_at: Instant,
}

impl StalledMoves {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Stalled>> {
        self.entries.locked()
    }

    /// Identifies a message across its deliveries: its id and its bytes.
    pub(crate) fn key(message: &TransportMessage) -> u64 {
        let mut hasher = foldhash::fast::FixedState::with_seed(0x6d6f766573).build_hasher();
        message.message_id.hash(&mut hasher);
        message.body.hash(&mut hasher);
        hasher.finish()
    }

    /// The stalled move of `message`, if its move failed before.
    pub(crate) fn find(&self, message: &TransportMessage) -> Option<MoveRetry> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let key = Self::key(message);
        let mut entries = self.entries();
        let found = entries.get(&key)?;
        if found.since.elapsed() >= FORGET_AFTER {
            entries.remove(&key);
            self.count.store(entries.len(), Ordering::Release);
            return None;
        }
        Some(MoveRetry { key, settlement: found.settlement.clone(), retry_at: found.retry_at })
    }

    /// A move of the message `key` is about to be tried. Remembered before it is tried: when
    /// it fails, the transport puts the message back in its queue, and it may be delivered
    /// again before the failure is known here.
    pub(crate) fn moving(&self, key: u64, settlement: Settlement) {
        let now = Instant::now();
        let mut entries = self.entries();
        if entries.len() >= CAPACITY {
            entries.retain(|_, s| now.duration_since(s.since) < FORGET_AFTER);
            if entries.len() >= CAPACITY && !entries.contains_key(&key) {
                return;
            }
        }
        let failures = entries.get(&key).map_or(0, |s| s.failures);
        let failed = entries.remove(&key).and_then(|s| s.failed);
        let retry_at = now + FIRST_PAUSE.saturating_mul(1 << failures.min(16)).min(MAX_PAUSE);
        entries.insert(key, Stalled { settlement, failures, since: now, retry_at, failed });
        self.count.store(entries.len(), Ordering::Release);
    }

    /// The move of the message `key` failed with `reason`.
    pub(crate) fn failed(&self, key: u64, reason: String) {
        if let Some(stalled) = self.entries().get_mut(&key) {
            stalled.failures += 1;
            stalled.failed = Some((Instant::now(), reason));
        }
    }

    /// The move of `key` went through (or the message went elsewhere).
    pub(crate) fn done(&self, key: u64) {
        let mut entries = self.entries();
        if entries.remove(&key).is_some() {
            self.count.store(entries.len(), Ordering::Release);
        }
    }

    /// Why the endpoint is degraded: a move failed lately.
    pub(crate) fn health_reason(&self) -> Option<String> {
        if self.count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let now = Instant::now();
        let entries = self.entries();
        let recent: Vec<(&Instant, &String, &Settlement)> = entries
            .values()
            .filter_map(|s| s.failed.as_ref().map(|(at, reason)| (at, reason, &s.settlement)))
            .filter(|(at, _, _)| now.duration_since(**at) < REPORT_FOR)
            .collect();
        let (_, reason, settlement) = recent.iter().max_by_key(|(at, _, _)| **at)?;
        let target = match settlement {
            Settlement::MoveTo { queue, .. } => format!("`{queue}`"),
            _ => "a delay queue".to_owned(),
        };
        Some(format!("{} message(s) cannot be moved; latest to {target}: {reason}", recent.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(body: &'static str) -> TransportMessage {
        TransportMessage { body: bytes::Bytes::from_static(body.as_bytes()), ..TransportMessage::default() }
    }

    fn to_error() -> Settlement {
        Settlement::MoveTo { queue: "orders_error".into(), headers: crate::Headers::new() }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_move_is_retried_after_a_pause_that_doubles() {
        let moves = StalledMoves::default();
        let poison = message("poison");
        assert!(moves.find(&poison).is_none());
        let key = StalledMoves::key(&poison);
        let start = Instant::now();
        moves.moving(key, to_error());
        assert!(moves.find(&poison).is_some(), "remembered while the move is under way");
        assert!(moves.health_reason().is_none(), "not degraded before anything failed");
        moves.failed(key, "queue full".into());
        let retry = moves.find(&poison).expect("remembered");
        assert_eq!(retry.retry_at - start, Duration::from_secs(1));
        assert!(matches!(retry.settlement, Settlement::MoveTo { ref queue, .. } if queue == "orders_error"));
        for _ in 0..2 {
            moves.moving(key, to_error());
            moves.failed(key, "queue full".into());
        }
        assert_eq!(moves.find(&poison).expect("remembered").retry_at - start, Duration::from_secs(4));
        for _ in 0..20 {
            moves.moving(key, to_error());
            moves.failed(key, "queue full".into());
        }
        assert_eq!(moves.find(&poison).expect("remembered").retry_at - start, MAX_PAUSE);
        let reason = moves.health_reason().expect("degraded");
        assert!(reason.contains("`orders_error`") && reason.contains("queue full"), "{reason}");
        assert!(moves.find(&message("other")).is_none(), "another message is consumed as usual");
        moves.done(key);
        assert!(moves.find(&poison).is_none());
        assert!(moves.health_reason().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn an_old_failure_no_longer_degrades_the_endpoint() {
        let moves = StalledMoves::default();
        let key = StalledMoves::key(&message("poison"));
        moves.moving(key, to_error());
        moves.failed(key, "queue full".into());
        assert!(moves.health_reason().is_some());
        tokio::time::advance(REPORT_FOR).await;
        assert!(moves.health_reason().is_none());
    }
}

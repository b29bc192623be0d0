//! Acknowledgements of one consumer channel, coalesced.
//!
//! Deliveries settled with an ack are acknowledged by a flush task rather than one
//! `basic.ack` frame each: every ack due below the oldest delivery still in progress is
//! covered by a single `basic.ack` with `multiple` set; an ack due above it is sent on its
//! own, so a slow message never holds back the others' acks (and, through the prefetch
//! window, the others' deliveries). A delivery in progress, being requeued or being moved to
//! another queue is never below that line, so a `multiple` ack can only cover deliveries
//! whose consumers succeeded. Under load this turns a hundred acks into a few frames, for the
//! broker as much as for the client.

use bus_core::logged::chain;
use bus_core::sync::MutexExt;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;

/// Counts deliveries handed out and not yet settled, so a stopping consumer can wait for them.
#[derive(Debug, Default)]
pub(crate) struct Outstanding {
    count: AtomicUsize,
    settled: Notify,
}

impl Outstanding {
    fn add(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
    }

    fn done(&self, n: usize) {
        if n == 0 {
            return;
        }
        let before = self.count.fetch_sub(n, Ordering::AcqRel);
        debug_assert!(before >= n, "a delivery settled twice");
        if before == n {
            self.settled.notify_waiters();
        }
    }

    /// Waits until every delivery handed out is settled, at most `bound`.
    pub(crate) async fn wait_zero(&self, bound: Duration) {
        let wait = async {
            loop {
                let notified = self.settled.notified();
                if self.count.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(bound, wait).await;
    }
}

/// The deliveries of one channel, and the acks due on it.
#[derive(Debug, Default)]
struct Ledger {
    /// Delivery tags handed out and neither acked nor otherwise settled yet.
    open: BTreeSet<u64>,
    /// Tags whose consumers succeeded, waiting for their ack to be sent.
    due: Vec<u64>,
    /// Whether a flush task is running; it takes every ack due before it stops.
    flushing: bool,
}

/// The frames one flush sends.
#[derive(Debug, Default, PartialEq, Eq)]
struct Frames {
    /// The newest tag of those due below the oldest open delivery, and how many it covers.
    multiple: Option<(u64, usize)>,
    /// Acks due above an open delivery, each sent on its own.
    single: Vec<u64>,
}

impl Ledger {
    /// Takes the acks due and decides their frames; `None` (and no flush running) when
    /// nothing is due.
    fn take(&mut self) -> Option<Frames> {
        if self.due.is_empty() {
            self.flushing = false;
            return None;
        }
        // Everything below the oldest open tag is settled: a multiple ack up to any due tag
        // under it acknowledges only deliveries that are due or already settled.
        let line = self.open.first().copied().unwrap_or(u64::MAX);
        let mut frames = Frames::default();
        for tag in self.due.drain(..) {
            if tag < line {
                let (newest, covered) = frames.multiple.get_or_insert((tag, 0));
                *newest = (*newest).max(tag);
                *covered += 1;
            } else {
                frames.single.push(tag);
            }
        }
        Some(frames)
    }
}

/// Acknowledgements of one consumer channel (see the module's documentation).
#[derive(Debug)]
pub(crate) struct Acks {
    channel: lapin::Channel,
    ledger: Mutex<Ledger>,
    outstanding: Arc<Outstanding>,
}

impl Acks {
    pub(crate) fn new(channel: lapin::Channel, outstanding: Arc<Outstanding>) -> Arc<Acks> {
        Arc::new(Acks { channel, ledger: Mutex::default(), outstanding })
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.locked()
    }

    /// Whether the channel is still open: its deliveries can be settled on it. Once it has
    /// closed, the broker has returned them to their queue.
    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Records a delivery before it is handed out.
    pub(crate) fn delivered(&self, tag: u64) {
        // Tag 0 with `multiple` would mean every delivery on the channel; brokers start at 1.
        debug_assert!(tag != 0, "delivery tags start at 1");
        self.outstanding.add();
        self.ledger().open.insert(tag);
    }

    /// The delivery's consumers succeeded: acknowledge it with the next flush.
    pub(crate) fn ack(self: &Arc<Self>, tag: u64) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to send it on: it stays open, and the broker delivers it again
            // when the channel closes, as any unacknowledged delivery.
            self.leave_open();
            return;
        };
        let start_flush = {
            let mut ledger = self.ledger();
            ledger.open.remove(&tag);
            ledger.due.push(tag);
            !std::mem::replace(&mut ledger.flushing, true)
        };
        if start_flush {
            runtime.spawn(self.clone().flush());
        }
    }

    /// Returns the delivery to its queue now.
    pub(crate) async fn requeue(&self, tag: u64) -> lapin::Result<()> {
        // Open until the nack is on its way, so that no multiple ack covers it before. The
        // frame is queued when the nack is first polled: settled even if this is dropped then.
        struct SettledOnDrop<'a>(&'a Acks, u64);
        impl Drop for SettledOnDrop<'_> {
            fn drop(&mut self) {
                self.0.settled(self.1);
            }
        }
        let _settled = SettledOnDrop(self, tag);
        self.channel.basic_nack(tag, BasicNackOptions { requeue: true, ..Default::default() }).await
    }

    /// The delivery was settled some other way (its nack sent, or its channel gone).
    fn settled(&self, tag: u64) {
        let mut ledger = self.ledger();
        if ledger.open.remove(&tag) {
            drop(ledger);
            self.outstanding.done(1);
        }
    }

    /// Leaves a delivery unsettled for good: it stays open, so no multiple ack covers it,
    /// and the broker requeues it when the channel closes. Stop does not wait for it.
    pub(crate) fn leave_open(&self) {
        self.outstanding.done(1);
    }

    /// Sends every ack due, including those that fall due while it sends, then stops.
    async fn flush(self: Arc<Self>) {
        loop {
            let Some(frames) = self.ledger().take() else { break };
            let covered = frames.multiple.map_or(0, |(_, covered)| covered);
            // Each frame is queued when its future is first polled, and `join_all` polls them
            // in order: one write carries them all, in this order.
            let multiple = frames.multiple.map(|(newest, covered)| (newest, BasicAckOptions { multiple: covered > 1 }));
            let sends = multiple
                .into_iter()
                .chain(frames.single.iter().map(|&tag| (tag, BasicAckOptions::default())))
                .map(|(tag, options)| self.channel.basic_ack(tag, options));
            let failed = futures::future::join_all(sends).await.into_iter().filter_map(Result::err).next();
            if let Some(error) = failed {
                // The channel is gone, and with it the deliveries: the broker delivers them again.
                tracing::warn!(error = %chain(&error), "could not acknowledge deliveries; they will be delivered again");
            }
            self.outstanding.done(covered + frames.single.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(open: &[u64], due: &[u64]) -> Ledger {
        Ledger { open: open.iter().copied().collect(), due: due.to_vec(), flushing: true }
    }

    #[test]
    fn acks_in_order_become_one_multiple_ack() {
        let mut ledger = ledger(&[], &[3, 1, 2]);
        assert_eq!(ledger.take(), Some(Frames { multiple: Some((3, 3)), single: vec![] }));
        assert!(ledger.flushing, "a flush that took acks keeps running");
        assert_eq!(ledger.take(), None);
        assert!(!ledger.flushing, "a flush with nothing due stops");
    }

    #[test]
    fn a_delivery_in_progress_is_never_covered_by_a_multiple_ack() {
        // 2 is still being consumed (or being requeued, or moved to `_error`).
        let mut ledger = ledger(&[2], &[1, 3, 4]);
        assert_eq!(ledger.take(), Some(Frames { multiple: Some((1, 1)), single: vec![3, 4] }));
    }

    #[test]
    fn acks_above_the_oldest_open_delivery_go_one_by_one() {
        let mut ledger = ledger(&[1, 5], &[2, 3, 6]);
        assert_eq!(ledger.take(), Some(Frames { multiple: None, single: vec![2, 3, 6] }));
    }
}

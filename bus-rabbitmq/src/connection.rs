//! One connection to the broker, kept alive: reconnects with capped exponential backoff and
//! jitter, to the next of the cluster's nodes when the address lists several; declares the
//! topology again (the publishing connection; a consumer declares its own
//! endpoint again when it finds it missing), and tells everyone who waits when a new session
//! is up.

use bus_core::logged::chain;
use bus_core::sync::MutexExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bus_core::EndpointTopology;
use futures::StreamExt;
use lapin::options::ConfirmSelectOptions;
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Channel, Connection, ConnectionProperties, DefaultConnectionBuilder, Event};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::options::{node_name, with_heartbeat, RabbitMqOptions};
use crate::topology;

/// A confirm channel that carries one publish at a time (see `Session::sender`): its slot
/// stays locked while this lives.
pub(crate) struct SenderChannel<'a> {
    channel: Channel,
    slot: tokio::sync::MutexGuard<'a, Option<Channel>>,
}

impl SenderChannel<'_> {
    /// Takes the channel out of use for good (a confirm is still pending on it) and closes it.
    pub(crate) fn discard(mut self) {
        if let Some(channel) = self.slot.take() {
            tokio::spawn(async move {
                let _ = channel.close(200, "confirm timed out".into()).await;
            });
        }
    }
}

impl std::ops::Deref for SenderChannel<'_> {
    type Target = Channel;

    fn deref(&self) -> &Channel {
        &self.channel
    }
}

/// A live connection with its confirm channels for publishing.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) connection: Connection,
    pub(crate) generation: u64,
    /// The node connected to, `host:port`.
    pub(crate) node: String,
    publishers: Vec<Mutex<Channel>>,
    next: AtomicUsize,
    /// Held while a closed confirm channel is reopened: the publishes that find it closed
    /// together wait for one new channel instead of each opening their own at once (past
    /// the broker's channel limit, the rest failed).
    reopening: tokio::sync::Mutex<()>,
    /// Confirm channels for mandatory publishes (sends, moves to `_error`, redeliveries),
    /// each with one publish in flight at a time, opened when first needed. The broker
    /// returns an unroutable message just before its confirm, and lapin hands the returned
    /// message to whichever confirm of the channel it resolves next (with confirms coalesced,
    /// not necessarily that one): alone on its channel, a publish can only get its own.
    senders: Vec<tokio::sync::Mutex<Option<Channel>>>,
    next_sender: AtomicUsize,
    /// Held while a pipelined publish takes its confirm number and queues its frames (see
    /// `publisher::in_order`).
    publish_order: Mutex<()>,
}

/// How many mandatory publishes may be in flight on one connection at once. Persistent
/// messages wait for the broker's disk: measured here, 16 gave half the throughput of
/// pipelined publishing, 64 three quarters, 128 hardly more.
const SENDER_CHANNELS: usize = 64;

/// RabbitMQ's default `frame_max`.
const DEFAULT_FRAME_MAX: usize = 131_072;

impl Session {
    /// A confirm channel for one mandatory publish, held until its confirm arrives.
    pub(crate) async fn sender(&self) -> std::result::Result<SenderChannel<'_>, lapin::Error> {
        // The first free channel (so that only as many are opened as sends run at once, and
        // a slow confirm holds up only its own); when all are busy, the next in turn.
        let free = self.senders.iter().find_map(|slot| slot.try_lock().ok());
        let mut slot = match free {
            Some(slot) => slot,
            None => {
                let next = self.next_sender.fetch_add(1, Ordering::Relaxed) % self.senders.len();
                self.senders[next].lock().await
            }
        };
        let channel = match slot.as_ref() {
            Some(channel) if channel.status().connected() => channel.clone(),
            _ => {
                let channel = open_confirm_channel(&self.connection).await?;
                *slot = Some(channel.clone());
                channel
            }
        };
        Ok(SenderChannel { channel, slot })
    }

    /// A confirm channel, reopened first if the broker closed it.
    pub(crate) async fn publisher(&self) -> std::result::Result<Channel, lapin::Error> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.publishers.len();
        let slot = &self.publishers[index];
        let current = || slot.locked().clone();
        let open = current();
        if open.status().connected() {
            return Ok(open);
        }
        let _one_at_a_time = self.reopening.lock().await;
        let open = current();
        if open.status().connected() {
            return Ok(open);
        }
        let fresh = open_confirm_channel(&self.connection).await?;
        *slot.locked() = fresh.clone();
        Ok(fresh)
    }

    pub(crate) fn is_alive(&self) -> bool {
        self.connection.status().connected()
    }

    /// The lock that keeps pipelined publishes' confirm numbers in the order of their frames.
    pub(crate) fn publish_order(&self) -> &Mutex<()> {
        &self.publish_order
    }

    /// The largest frame the broker takes on this connection, as negotiated.
    pub(crate) fn frame_max(&self) -> usize {
        match self.connection.configuration().frame_max() {
            0 => usize::MAX,
            max => max as usize,
        }
    }
}

/// `pause` jittered: between half of it and all of it.
fn jittered(pause: Duration) -> Duration {
    pause.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// Whether an error concerns the whole connection rather than one channel.
fn is_connection_error(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::IOError(_) | lapin::ErrorKind::MissingHeartbeatError)
        || error.is_amqp_hard_error()
}

async fn open_confirm_channel(connection: &Connection) -> std::result::Result<Channel, lapin::Error> {
    let channel = connection.create_channel().await?;
    channel.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok(channel)
}

/// Where the link to the broker stands.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    /// Not connected yet, or reconnecting after `error`.
    Down {
        error: Option<String>,
    },
    Up(Arc<Session>),
    Closed,
}

/// What has been declared, to declare again on every new connection.
#[derive(Debug, Default)]
pub(crate) struct Declared {
    pub(crate) endpoints: HashMap<String, EndpointTopology>,
    /// Message-type exchanges and the contract exchanges each is bound to.
    pub(crate) publish_exchanges: HashMap<String, Vec<String>>,
}

/// What a connection is for. Publishing and consuming go over connections of their own, as
/// MassTransit does: under a memory or disk alarm the broker blocks the connections that
/// publish, and nothing at all is written on a blocked connection, acknowledgements included;
/// on a connection of its own, consuming goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Publishes, sends, moves and declarations; declares the topology again on reconnect.
    Publishing,
    /// Consumers and their acknowledgements.
    Consuming,
}

/// One connection kept alive, and what the transport's clones share of it.
pub(crate) struct Shared {
    /// The nodes' addresses, heartbeat added: one, or the nodes of a cluster.
    addresses: Vec<String>,
    pub(crate) redacted: String,
    pub(crate) options: RabbitMqOptions,
    pub(crate) role: Role,
    pub(crate) link: watch::Sender<Link>,
    pub(crate) declared: Mutex<Declared>,
    pub(crate) closed: CancellationToken,
    /// Connections opened so far, the first included.
    pub(crate) connections: std::sync::atomic::AtomicU64,
    /// Why the broker blocks this connection (`connection.blocked`: a resource alarm), while it does.
    pub(crate) blocked: watch::Sender<Option<String>>,
}

impl std::fmt::Debug for Shared {
    // By hand: the address holds the password, and `Debug` output ends up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("address", &self.redacted)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A connection to one of `addresses` (several: the nodes of a cluster). `redacted` names
    /// them all in logs and errors.
    pub(crate) fn new(addresses: &[String], redacted: String, options: RabbitMqOptions, role: Role) -> Arc<Self> {
        let addresses = addresses.iter().map(|address| with_heartbeat(address, options.heartbeat)).collect();
        Arc::new(Shared {
            addresses,
            redacted,
            options,
            role,
            link: watch::channel(Link::Down { error: None }).0,
            declared: Mutex::new(Declared::default()),
            closed: CancellationToken::new(),
            connections: std::sync::atomic::AtomicU64::new(0),
            blocked: watch::channel(None).0,
        })
    }

    /// Waits until the broker no longer blocks this connection, at most until `deadline`.
    /// Publishing meanwhile would leave the message in the client's buffer, to go out when
    /// the alarm clears, even after its publish had failed for the timeout.
    pub(crate) async fn unblocked(&self, deadline: Instant) -> Result<()> {
        if self.blocked.borrow().is_none() {
            return Ok(());
        }
        let mut blocked = self.blocked.subscribe();
        let unblocked = tokio::time::timeout_at(deadline, blocked.wait_for(Option::is_none)).await.is_ok();
        if unblocked {
            Ok(())
        } else {
            Err(Error::Blocked(self.blocked.borrow().clone().unwrap_or_default()))
        }
    }

    /// The frame size of the current connection; RabbitMQ's default while there is none.
    pub(crate) fn frame_max(&self) -> usize {
        match &*self.link.borrow() {
            Link::Up(session) => session.frame_max(),
            _ => DEFAULT_FRAME_MAX,
        }
    }

    pub(crate) fn declared(&self) -> std::sync::MutexGuard<'_, Declared> {
        self.declared.locked()
    }

    /// The current session, waiting up to `deadline` for one during an outage.
    pub(crate) async fn session(&self, deadline: Instant) -> Result<Arc<Session>> {
        // The common case, without subscribing to changes.
        if let Link::Up(session) = &*self.link.borrow() {
            if session.is_alive() {
                return Ok(session.clone());
            }
        }
        let mut link = self.link.subscribe();
        loop {
            match &*link.borrow_and_update() {
                Link::Up(session) if session.is_alive() => return Ok(session.clone()),
                Link::Closed => return Err(Error::Closed),
                _ => {}
            }
            match tokio::time::timeout_at(deadline, link.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => return Err(Error::Unavailable(self.options.publish_timeout)),
            }
        }
    }

    /// A session for work that may wait as long as the outage lasts (consumers).
    pub(crate) async fn session_when_up(&self) -> Option<Arc<Session>> {
        let mut link = self.link.subscribe();
        loop {
            match &*link.borrow_and_update() {
                Link::Up(session) if session.is_alive() => return Some(session.clone()),
                Link::Closed => return None,
                _ => {}
            }
            tokio::select! {
                changed = link.changed() => if changed.is_err() { return None },
                () = self.closed.cancelled() => return None,
            }
        }
    }

    fn tls(&self) -> OwnedTLSConfig {
        let tls = &self.options.tls;
        let identity = match (&tls.client_cert_pem, &tls.client_key_pem) {
            // lapin's TLS backends read both the chain and the key as PEM.
            (Some(chain), Some(key)) => {
                Some(OwnedIdentity::PKCS8 { pem: chain.clone().into_bytes(), key: key.clone().into_bytes() })
            }
            _ => None,
        };
        OwnedTLSConfig { identity, cert_chain: tls.ca_pem.clone() }
    }

    async fn connect_once(&self, address: &str) -> Result<Connection> {
        let properties =
            ConnectionProperties::default().with_connection_name(self.options.connection_name.clone().into());
        let builder = DefaultConnectionBuilder::new()
            .map_err(|e| self.connection_error("no async runtime", e))?
            .with_uri_str(address.to_owned())
            .with_properties(properties)
            .with_tls_config(self.tls());
        let node = node_name(address);
        match tokio::time::timeout(self.options.connect_timeout, builder.connect()).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(error)) => Err(self.connection_error(&format!("could not connect to {node}"), error)),
            Err(_) => Err(Error::Connection {
                address: self.redacted.clone(),
                reason: format!("no connection to {node} within {:?}", self.options.connect_timeout),
                source: None,
            }),
        }
    }

    /// Connects to the first node that answers, starting with the one at `*next`; leaves
    /// `*next` at the node after it, so that after losing this connection the others are
    /// tried first (the node that was lost is likely still down). Fails with every node's error.
    async fn connect_any(&self, next: &mut usize) -> Result<(Connection, String)> {
        let count = self.addresses.len();
        let mut failures = Vec::new();
        for attempt in 0..count {
            let index = (*next + attempt) % count;
            let address = &self.addresses[index];
            match self.connect_once(address).await {
                Ok(connection) => {
                    *next = (index + 1) % count;
                    return Ok((connection, node_name(address)));
                }
                Err(error) if count == 1 => return Err(error),
                Err(error) => {
                    tracing::debug!(node = %node_name(address), error = %chain(&error), "rabbitmq node did not answer");
                    failures.push(chain(&error).to_string());
                }
            }
        }
        Err(Error::Connection {
            address: self.redacted.clone(),
            reason: format!("no node answered: {}", failures.join("; ")),
            source: None,
        })
    }

    fn connection_error(&self, what: &str, error: lapin::Error) -> Error {
        Error::Connection { address: self.redacted.clone(), reason: what.to_owned(), source: Some(Box::new(error)) }
    }

    /// Opens a session: connection, confirm channels and, on the publishing connection, the
    /// whole declared topology.
    async fn open(&self, generation: u64, next: &mut usize) -> Result<Arc<Session>> {
        let (connection, node) = self.connect_any(next).await?;
        let mut publishers = Vec::with_capacity(self.options.publish_channels.max(1));
        for _ in 0..self.options.publish_channels.max(1) {
            let channel = open_confirm_channel(&connection)
                .await
                .map_err(|e| self.connection_error("could not open a channel", e))?;
            publishers.push(Mutex::new(channel));
        }
        let session = Arc::new(Session {
            connection,
            generation,
            node,
            publishers,
            next: AtomicUsize::new(0),
            reopening: tokio::sync::Mutex::new(()),
            senders: (0..SENDER_CHANNELS).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next_sender: AtomicUsize::new(0),
            publish_order: Mutex::new(()),
        });
        if self.role == Role::Consuming {
            // The publishing connection declares the topology; a consumer that finds its
            // queue missing declares it again itself.
            return Ok(session);
        }
        let (endpoints, exchanges) = {
            let declared = self.declared();
            (
                declared.endpoints.values().cloned().collect::<Vec<_>>(),
                declared.publish_exchanges.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>(),
            )
        };
        // One refusal (a queue recreated meanwhile with other arguments, say) must not keep the
        // whole transport down: it is logged, and the rest of the topology and every other
        // endpoint come up. Only a lost connection fails the session.
        for endpoint in &endpoints {
            if let Err(error) = topology::declare_endpoint(&session.connection, endpoint, &self.options).await {
                if !session.is_alive() {
                    return Err(error);
                }
                tracing::error!(queue = %endpoint.queue, error = %chain(&error), "could not declare the endpoint again after reconnecting");
            }
        }
        for (exchange, contracts) in &exchanges {
            if let Err(error) =
                topology::declare_publish_exchange(&session.connection, exchange, contracts, &self.options).await
            {
                if !session.is_alive() {
                    return Err(error);
                }
                tracing::error!(%exchange, error = %chain(&error), "could not declare the exchange again after reconnecting");
            }
        }
        Ok(session)
    }

    /// Keeps the link up until the transport is closed.
    pub(crate) async fn supervise(self: Arc<Self>, first: tokio::sync::oneshot::Sender<Result<()>>) {
        let mut first = Some(first);
        let mut generation = 0u64;
        let mut pause = self.options.reconnect_min;
        let mut next = 0;
        loop {
            if self.closed.is_cancelled() {
                break;
            }
            generation += 1;
            let opened = tokio::select! {
                opened = self.open(generation, &mut next) => opened,
                () = self.closed.cancelled() => break,
            };
            match opened {
                Ok(session) => {
                    // An error before this point is caught by the status check below.
                    let mut events = session.connection.events_listener();
                    pause = self.options.reconnect_min;
                    self.connections.fetch_add(1, Ordering::Relaxed);
                    self.blocked.send_replace(None);
                    tracing::info!(address = %self.redacted, node = %session.node, generation, role = ?self.role, "connected to rabbitmq");
                    self.link.send_replace(Link::Up(session.clone()));
                    if let Some(first) = first.take() {
                        let _ = first.send(Ok(()));
                    }
                    // Heartbeats turn a silent stall into an error event within about two intervals;
                    // the status check catches a close that raised no event.
                    let mut check = tokio::time::interval(Duration::from_millis(500));
                    let error = loop {
                        tokio::select! {
                            event = events.next() => match event {
                                // lapin reports channel-level errors (a 404 on one channel) here too;
                                // only a connection-level one means the session is gone.
                                Some(Event::Error(error)) if session.is_alive() && !is_connection_error(&error) => {
                                    tracing::debug!(error = %chain(&error), "channel error on a live connection");
                                }
                                Some(Event::Error(error)) => break error.to_string(),
                                Some(Event::ConnectionBlocked(reason)) => {
                                    tracing::warn!(address = %self.redacted, role = ?self.role, %reason,
                                        "the broker blocks this connection (a resource alarm): publishing waits");
                                    self.blocked.send_replace(Some(reason));
                                }
                                Some(Event::ConnectionUnblocked) => {
                                    tracing::info!(address = %self.redacted, role = ?self.role, "the broker unblocked this connection");
                                    self.blocked.send_replace(None);
                                }
                                Some(_) => {}
                                None => break "connection closed".to_owned(),
                            },
                            _ = check.tick() => if !session.is_alive() {
                                break "connection no longer open".to_owned();
                            },
                            () = self.closed.cancelled() => {
                                let _ = session.connection.close(200, "transport closed".into()).await;
                                self.link.send_replace(Link::Closed);
                                return;
                            }
                        }
                    };
                    tracing::warn!(node = %session.node, role = ?self.role, %error, "rabbitmq connection lost; reconnecting");
                    self.link.send_replace(Link::Down { error: Some(error) });
                    // A jittered pause first: the clients a node's loss cuts off all at once do
                    // not all reach the next node at the same moment, and a node that accepts
                    // connections only to drop them is not cycled without pause.
                    tokio::select! {
                        () = tokio::time::sleep(jittered(self.options.reconnect_min)) => {}
                        () = self.closed.cancelled() => break,
                    }
                }
                Err(error) => {
                    let message = error.to_string();
                    if let Some(first) = first.take() {
                        // The first connection decides whether the transport starts at all.
                        let _ = first.send(Err(error));
                        self.link.send_replace(Link::Closed);
                        return;
                    }
                    let wait = jittered(pause);
                    tracing::warn!(%message, retry_in = ?wait, "rabbitmq reconnection failed");
                    self.link.send_replace(Link::Down { error: Some(message) });
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        () = self.closed.cancelled() => break,
                    }
                    pause = pause.saturating_mul(2).min(self.options.reconnect_max);
                }
            }
        }
        self.link.send_replace(Link::Closed);
    }
}

//! MQTT: the agent's broker connections. One connection per
//! `[brokers.NAME]`, shared by every flow that names the broker: the
//! sources' subscriptions, the outbox forwarder and the status messages all
//! use it (one client id, one persistent session).
//!
//! The agent first registers every source's filters (`Hub::subscribe`),
//! then starts the connections, so messages a persistent session queued
//! while runnel was down find their flows on the first connect.

mod conn;
pub(crate) mod link;
pub(crate) mod topic;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use crate::config::BrokerConfig;
use crate::store::Store;
use topic::Filter;

/// `runnel/<device_id>/status`: `online` / `offline`, retained.
pub(crate) fn status_topic(device_id: &str) -> String {
    format!("runnel/{device_id}/status")
}

/// `runnel/<device_id>/stats`: the periodic figures.
pub(crate) fn stats_topic(device_id: &str) -> String {
    format!("runnel/{device_id}/stats")
}

/// A message for a source.
pub(crate) struct Delivery {
    pub topic: Arc<str>,
    pub payload: bytes::Bytes,
    /// Dropped when the source is done with the message; the last drop
    /// acknowledges it to the broker (QoS 1).
    pub ack: Option<Arc<AckToken>>,
    pub pkid: u16,
    /// The broker sends it again (it was not acknowledged before).
    pub dup: bool,
    /// Which connection it came on (counts up with every reconnect).
    pub generation: u64,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Ack {
    /// Which connection the message came on (acks do not cross reconnects).
    pub generation: u64,
    pub pkid: u16,
    /// Its effects are committed: acknowledged even while runnel stops.
    pub committed: bool,
}

/// Acknowledges its message when dropped, unless disarmed (a message no
/// source could take must not be acknowledged: the broker redelivers it).
pub(crate) struct AckToken {
    tx: mpsc::UnboundedSender<Ack>,
    ack: Ack,
    armed: AtomicBool,
    /// Counts the broker's messages not yet let go of (`unacked`).
    stats: Arc<BrokerStats>,
    committed: AtomicBool,
}

impl AckToken {
    pub(crate) fn new(tx: mpsc::UnboundedSender<Ack>, generation: u64, pkid: u16, stats: Arc<BrokerStats>) -> AckToken {
        AckToken {
            tx,
            ack: Ack {
                generation,
                pkid,
                committed: false,
            },
            armed: AtomicBool::new(true),
            stats,
            committed: AtomicBool::new(false),
        }
    }

    pub(crate) fn disarm(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }

    /// What the message did is committed (`ack="after-commit"`).
    pub(crate) fn committed(&self) {
        self.committed.store(true, Ordering::Relaxed);
    }
}

impl Drop for AckToken {
    fn drop(&mut self) {
        self.stats.unacked.fetch_sub(1, Ordering::Relaxed);
        if self.armed.load(Ordering::Relaxed) {
            let mut ack = self.ack;
            ack.committed = self.committed.load(Ordering::Relaxed);
            let _ = self.tx.send(ack);
        }
    }
}

/// Where a connection hands messages for one source.
pub(crate) struct Route {
    pub filters: Vec<Filter>,
    pub qos: u8,
    pub tx: mpsc::UnboundedSender<Delivery>,
    /// Payload bytes sent but not yet taken by the source.
    pub queued: Arc<AtomicUsize>,
}

/// The receiving end of a route, for the source.
pub(crate) struct Inbox {
    pub rx: mpsc::UnboundedReceiver<Delivery>,
    /// Payload bytes waiting in `rx` (the source subtracts what it takes).
    pub queued: Arc<AtomicUsize>,
    /// The broker's figures (its count of messages not yet acknowledged).
    pub stats: Arc<BrokerStats>,
    /// The broker's `max_inflight`.
    pub max_inflight: u16,
    /// Messages a stopped source took but did not hand to its flow: the
    /// next source of a reloaded flow takes them first.
    pub pending: Vec<Delivery>,
}

/// Figures of one connection, for status and logs.
#[derive(Default)]
pub(crate) struct BrokerStats {
    pub connected: AtomicBool,
    /// The connection was started, and has had its first attempt.
    pub started: AtomicBool,
    pub attempted: AtomicBool,
    pub reconnects: AtomicU64,
    pub received: AtomicU64,
    pub unrouted: AtomicU64,
    pub dropped_qos0: AtomicU64,
    /// Outbox entries the broker acknowledged.
    pub delivered: AtomicU64,
    /// Outbox entries the broker refused (MQTT 5 negative PUBACK), dropped.
    pub rejected: AtomicU64,
    /// Messages a source could no longer take (left unacknowledged).
    pub undeliverable: AtomicU64,
    /// QoS 1 messages received and not yet let go of by every source
    /// (`ack="after-commit"` holds them until a checkpoint commits).
    pub unacked: AtomicU64,
}

struct Broker {
    /// Written in the config (not the implicit `default`).
    explicit: bool,
    opts: Result<link::LinkOptions, String>,
    routes: Arc<std::sync::Mutex<Vec<Route>>>,
    /// Tells the running connection that routes were added.
    nudge: mpsc::UnboundedSender<()>,
    nudge_rx: Option<mpsc::UnboundedReceiver<()>>,
    started: bool,
    stats: Arc<BrokerStats>,
    stats_tx: mpsc::UnboundedSender<(String, Vec<u8>)>,
    stats_rx: Option<mpsc::UnboundedReceiver<(String, Vec<u8>)>>,
    status: bool,
    reconnect_max: Duration,
    /// Whether a sink publishes here (then the connection forwards the outbox).
    outbox: bool,
}

/// Every broker of the config, before and after the connections start.
pub(crate) struct Hub {
    device_id: String,
    brokers: BTreeMap<String, Broker>,
    /// Cleared when the agent stops: messages taken after that may never
    /// be processed, so they are not acknowledged (the broker keeps them).
    acks: Arc<AtomicBool>,
    /// Once started: what a broker first used by a flow loaded later starts with.
    live: Option<(Store, tokio::runtime::Handle, watch::Receiver<bool>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The broker a flow gets when it names `default` and the config has no
/// `[brokers.default]`: a broker on this device.
fn implicit_default() -> BrokerConfig {
    toml::from_str("").expect("every broker key has a default")
}

impl Hub {
    pub(crate) fn new(configs: &BTreeMap<String, BrokerConfig>, device_id: &str) -> Hub {
        let explicit: Vec<String> = configs.keys().cloned().collect();
        let mut configs = configs.clone();
        configs.entry("default".into()).or_insert_with(implicit_default);
        let brokers = configs
            .iter()
            .map(|(name, b)| {
                let (stats_tx, stats_rx) = mpsc::unbounded_channel();
                let (nudge, nudge_rx) = mpsc::unbounded_channel();
                let opts = link::options(name, b, device_id);
                (
                    name.clone(),
                    Broker {
                        explicit: explicit.contains(name),
                        opts,
                        routes: Default::default(),
                        nudge,
                        nudge_rx: Some(nudge_rx),
                        started: false,
                        stats: Arc::default(),
                        stats_tx,
                        stats_rx: Some(stats_rx),
                        status: b.status,
                        reconnect_max: Duration::from_secs(b.reconnect_max),
                        outbox: false,
                    },
                )
            })
            .collect();
        Hub {
            device_id: device_id.to_string(),
            brokers,
            acks: Arc::new(AtomicBool::new(true)),
            live: None,
            tasks: Vec::new(),
        }
    }

    /// Whether broker `name` keeps a persistent session.
    pub(crate) fn persistent(&self, name: &str) -> bool {
        self.brokers
            .get(name)
            .and_then(|b| b.opts.as_ref().ok())
            .is_some_and(|o| o.persistent)
    }

    /// Whether `name` can be used, or why not (for a flow's load error).
    pub(crate) fn check(&self, name: &str) -> Result<(), String> {
        match self.brokers.get(name) {
            None => Err(format!(
                "no [brokers.{name}] in the config file (brokers: {})",
                self.brokers.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            Some(b) => b.opts.as_ref().map(|_| ()).map_err(|e| format!("broker {name}: {e}")),
        }
    }

    /// Route messages matching `filters` on broker `name` to a new inbox.
    pub(crate) fn subscribe(&mut self, name: &str, filters: Vec<Filter>, qos: u8) -> Result<Inbox, String> {
        self.check(name)?;
        let b = self.brokers.get_mut(name).expect("checked");
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        b.routes.lock().unwrap_or_else(|p| p.into_inner()).push(Route {
            filters,
            qos,
            tx,
            queued: queued.clone(),
        });
        let _ = b.nudge.send(());
        let max_inflight = b.opts.as_ref().map(|o| o.max_inflight).unwrap_or(20);
        let inbox = Inbox {
            rx,
            queued,
            stats: b.stats.clone(),
            max_inflight,
            pending: Vec::new(),
        };
        self.start_later(name);
        Ok(inbox)
    }

    /// A sink will publish on broker `name` (through the outbox).
    pub(crate) fn publish_on(&mut self, name: &str) -> Result<(), String> {
        self.check(name)?;
        self.brokers.get_mut(name).expect("checked").outbox = true;
        self.start_later(name);
        Ok(())
    }

    /// After `start`: connect broker `name` if no flow used it before.
    fn start_later(&mut self, name: &str) {
        if let Some((store, rt, stop)) = self.live.clone() {
            self.start_one(name, &store, &rt, stop);
        }
    }

    /// Connect every broker some flow uses (and every configured one with
    /// `status` on, so the fleet sees the device). Returns the stats handles.
    pub(crate) fn start(&mut self, store: &Store, rt: &tokio::runtime::Handle, stop: watch::Receiver<bool>) {
        self.live = Some((store.clone(), rt.clone(), stop.clone()));
        let names: Vec<String> = self.brokers.keys().cloned().collect();
        for name in names {
            self.start_one(&name, store, rt, stop.clone());
        }
    }

    /// The connection tasks started (to wait for at the end).
    pub(crate) fn take_tasks(&mut self) -> Vec<tokio::task::JoinHandle<()>> {
        std::mem::take(&mut self.tasks)
    }

    fn start_one(&mut self, name: &str, store: &Store, rt: &tokio::runtime::Handle, stop: watch::Receiver<bool>) {
        let Some(b) = self.brokers.get_mut(name) else { return };
        let used = !b.routes.lock().unwrap_or_else(|p| p.into_inner()).is_empty() || b.outbox;
        // A configured broker with status on connects even when unused,
        // so the fleet sees the device (and an old outbox drains).
        if b.started || !(used || (b.explicit && b.status)) {
            return;
        }
        let opts = match &b.opts {
            Ok(o) => o.clone(),
            Err(e) => {
                tracing::error!("broker {name} not started: {e}");
                return;
            }
        };
        b.started = true;
        b.stats.started.store(true, Ordering::Relaxed);
        let (acks_tx, acks_rx) = mpsc::unbounded_channel();
        let conn = conn::Conn {
            name: Arc::from(name),
            opts,
            routes: b.routes.clone(),
            nudge: b.nudge_rx.take().expect("started once"),
            // The outbox of a broker no sink uses any more still drains.
            store: Some(store.clone()),
            stats: b.stats.clone(),
            status_topic: b.status.then(|| status_topic(&self.device_id)),
            stats_rx: b.stats_rx.take().expect("started once"),
            acks_tx,
            acks_rx,
            acks_enabled: self.acks.clone(),
            reconnect_max: b.reconnect_max,
        };
        self.tasks.push(rt.spawn(conn.run(stop)));
    }

    /// Whether every started broker has had its first connection attempt.
    pub(crate) fn all_tried(&self) -> bool {
        self.brokers
            .values()
            .all(|b| !b.started || b.stats.attempted.load(Ordering::Relaxed))
    }

    /// Stop acknowledging messages (the flows are about to stop).
    pub(crate) fn stop_acks(&self) {
        self.acks.store(false, Ordering::Relaxed);
    }

    /// Publish a stats message on every broker with `status` on.
    pub(crate) fn publish_stats(&self, payload: &[u8]) {
        for b in self.brokers.values() {
            if b.status && b.stats.connected.load(Ordering::Relaxed) {
                let _ = b.stats_tx.send((stats_topic(&self.device_id), payload.to_vec()));
            }
        }
    }

    /// (name, stats) of every broker.
    pub(crate) fn stats(&self) -> Vec<(&str, &BrokerStats)> {
        self.brokers.iter().map(|(n, b)| (n.as_str(), &*b.stats)).collect()
    }
}

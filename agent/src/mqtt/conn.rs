//! One broker's connection task: it keeps the connection up (capped
//! exponential backoff with jitter; rumqttc retries at once by itself),
//! resubscribes after every connect, routes incoming messages to the flows'
//! sources, acknowledges them once the sources let go, and forwards the
//! broker's outbox: entries are published in order, at most `WINDOW` in
//! flight, and deleted only after their PUBACK. After any disconnect it
//! resends from the oldest entry not acknowledged.
//!
//! The task owns everything about the connection, so no other thread ever
//! publishes on it: the packet ids rumqttc reports for outgoing publishes
//! arrive in the order this task sent them, which is how a PUBACK finds its
//! outbox entry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::link::{self, Ev, LinkOptions};
use super::{Ack, AckToken, BrokerStats, Delivery, Route};
use crate::store::{Op, Store};

/// Outbox entries in flight at once. A window result burst (every key's
/// window closing at one boundary) drains at WINDOW per round trip; MQTT 5
/// brokers may ask for fewer (Receive Maximum), which rumqttc honours by
/// holding the rest in its queue, in order.
const WINDOW: usize = 64;
/// Refill the window once this much of it is free (one outbox read each time).
const REFILL: usize = WINDOW / 4;
/// Payload bytes of QoS 0 messages a slow source may have queued before
/// new ones are dropped (QoS 1 is bounded by the broker's in-flight window).
const QOS0_QUEUE_BYTES: usize = 16 << 20;
/// Hand acks to rumqttc in order until its request queue is full (the rest
/// wait for the next try).
fn send_acks(client: &link::Client, unsent: &mut VecDeque<u16>) {
    while let Some(pkid) = unsent.front() {
        if !client.ack(*pkid) {
            break;
        }
        unsent.pop_front();
    }
}

/// A connection that lasted this long resets the backoff.
const STABLE: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(500);

/// What a publish in flight was for.
#[derive(Clone, Copy, Debug)]
enum Tag {
    Outbox(u64),
    Status,
}

pub(crate) struct Conn {
    pub name: Arc<str>,
    pub opts: LinkOptions,
    /// The sources' routes; flows loaded later add theirs (and `nudge` the
    /// connection to subscribe), a stopped flow's route is dropped.
    pub routes: Arc<std::sync::Mutex<Vec<Route>>>,
    pub nudge: mpsc::UnboundedReceiver<()>,
    pub store: Option<Store>,
    pub stats: Arc<BrokerStats>,
    pub status_topic: Option<String>,
    /// Stats messages to publish (QoS 0) while connected.
    pub stats_rx: mpsc::UnboundedReceiver<(String, Vec<u8>)>,
    pub acks_tx: mpsc::UnboundedSender<Ack>,
    pub acks_rx: mpsc::UnboundedReceiver<Ack>,
    pub acks_enabled: Arc<std::sync::atomic::AtomicBool>,
    pub reconnect_max: Duration,
}

/// Delays between attempts: doubling from `BACKOFF_MIN` to the cap, each
/// drawn from its upper half at random so a fleet does not reconnect in step.
struct Backoff {
    attempt: u32,
    cap: Duration,
    rng: u64,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let base = BACKOFF_MIN.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64*: jitter needs no cryptographic randomness.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        let frac = 0.5 + 0.5 * (r as f64 / (1u64 << 53) as f64);
        base.mul_f64(frac)
    }
}

/// A problem's text without its numbers: "certificate expired: verification
/// time 1764… (UNIX)" is the same problem at the next attempt.
fn same_kind(problem: &str) -> String {
    problem.chars().filter(|c| !c.is_ascii_digit()).collect()
}

impl Conn {
    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let (client, mut events) = link::connect(&self.opts);
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            ^ (std::process::id() as u64).rotate_left(32);
        let mut backoff = Backoff {
            attempt: 0,
            cap: self.reconnect_max.max(BACKOFF_MIN),
            rng: seed | 1,
        };
        let appended = self.store.as_ref().map(|s| s.outboxes().appended(&self.name));
        let where_ = format!("broker {} ({}:{})", self.name, self.opts.host, self.opts.port);
        let mut connected_at: Option<Instant> = None;
        let mut generation = 0u64;
        // Publishes asked of rumqttc, waiting for their packet id.
        let mut sent: VecDeque<(Tag, u8)> = VecDeque::new();
        // QoS 1 publishes waiting for their PUBACK.
        let mut awaiting: HashMap<u16, Tag> = HashMap::new();
        // The next outbox seq to publish.
        let mut cursor = 0u64;
        // The last problem logged, so a retry loop logs it once.
        let mut last_problem: Option<String> = None;
        let mut ever_connected = false;
        // Acks the request queue had no room for yet.
        let mut unsent_acks: VecDeque<u16> = VecDeque::new();
        let warnings = crate::metrics::Warnings::default();
        // Filters subscribed on this connection.
        let mut subscribed: std::collections::HashSet<String> = Default::default();

        loop {
            if *stop.borrow() {
                break;
            }
            let mut done: Vec<u64> = Vec::new();
            let outcome = {
                let poll = events.poll();
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break None,
                        Some(ack) = self.acks_rx.recv() => {
                            // An ack from before a reconnect would name a
                            // packet id the broker has since reused.
                            if connected_at.is_some()
                                && ack.generation == generation
                                && (ack.committed || self.acks_enabled.load(Ordering::Relaxed))
                            {
                                unsent_acks.push_back(ack.pkid);
                            }
                            send_acks(&client, &mut unsent_acks);
                        }
                        Some(()) = self.nudge.recv() => {
                            // A flow loaded while running: subscribe what is new.
                            if connected_at.is_some() {
                                for (filter, qos) in self.filters() {
                                    if subscribed.insert(filter.clone()) {
                                        if let Err(e) = client.subscribe(&filter, qos) {
                                            tracing::error!("{where_}: cannot subscribe to {filter}: {e}");
                                        }
                                    }
                                }
                            }
                        }
                        Some((topic, payload)) = self.stats_rx.recv() => {
                            if connected_at.is_some() && client.publish(&topic, 0, false, payload).is_ok() {
                                sent.push_back((Tag::Status, 0));
                            }
                        }
                        _ = async { appended.as_ref().expect("guarded").notified().await },
                            if connected_at.is_some() && appended.is_some() && sent.len() + awaiting.len() < WINDOW => {
                            self.fill(&client, &mut sent, &awaiting, &mut cursor);
                        }
                        // Last: a flood of incoming messages must not hold up acks.
                        r = &mut poll => break Some(r),
                    }
                }
            };
            let Some(result) = outcome else { break };
            // rumqttc took requests off its queue to get here: acks that did
            // not fit (a burst after an after-commit checkpoint) go now, not
            // only when the next ack comes.
            if connected_at.is_some() {
                send_acks(&client, &mut unsent_acks);
            }
            match result {
                Ok(Ev::ConnAck { session_present }) => {
                    self.stats.attempted.store(true, Ordering::Relaxed);
                    generation += 1;
                    connected_at = Some(Instant::now());
                    self.stats.connected.store(true, Ordering::Relaxed);
                    if ever_connected {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    ever_connected = true;
                    let was = last_problem.take();
                    tracing::info!(
                        "connected to {where_}{}{}",
                        if session_present { " (session resumed)" } else { "" },
                        if was.is_some() { " again" } else { "" }
                    );
                    subscribed.clear();
                    for (filter, qos) in self.filters() {
                        subscribed.insert(filter.clone());
                        if let Err(e) = client.subscribe(&filter, qos) {
                            tracing::error!("{where_}: cannot subscribe to {filter}: {e}");
                        }
                    }
                    if let Some(t) = &self.status_topic {
                        if client.publish(t, 1, true, b"online".to_vec()).is_ok() {
                            sent.push_back((Tag::Status, 1));
                        }
                    }
                    self.fill(&client, &mut sent, &awaiting, &mut cursor);
                }
                Ok(Ev::Publish {
                    topic,
                    payload,
                    qos,
                    pkid,
                    dup,
                }) => {
                    self.stats.received.fetch_add(1, Ordering::Relaxed);
                    self.route(topic, payload, qos, pkid, dup, generation);
                }
                Ok(Ev::PubAck(pkid)) => {
                    if let Some(Tag::Outbox(seq)) = awaiting.remove(&pkid) {
                        done.push(seq);
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    self.refill(&client, &mut sent, &awaiting, &mut cursor);
                }
                Ok(Ev::PubRejected(pkid, reason)) => {
                    // Resending would be refused again and hold up every
                    // entry behind this one: the entry is dropped, loudly.
                    if let Some(Tag::Outbox(seq)) = awaiting.remove(&pkid) {
                        done.push(seq);
                        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
                        warnings.warn(&format!("{where_}: rejected"), || {
                            format!(
                                "{where_} refused outbox message {seq} ({reason}); it is dropped (counted as `rejected`); check the broker's ACL and quotas for this client"
                            )
                        });
                    }
                    self.refill(&client, &mut sent, &awaiting, &mut cursor);
                }
                Ok(Ev::OutPublish(pkid)) => match sent.pop_front() {
                    // QoS 0: written to the socket is all the delivery there is.
                    Some((Tag::Outbox(seq), 0)) => {
                        done.push(seq);
                        self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                        self.refill(&client, &mut sent, &awaiting, &mut cursor);
                    }
                    Some((Tag::Status, 0)) => {}
                    Some((tag, _)) => {
                        awaiting.insert(pkid, tag);
                    }
                    None => {}
                },
                Ok(Ev::SubRefused(n)) if n > 0 => {
                    tracing::error!(
                        "{where_} refused {n} subscription(s) of {}; check the broker's ACL for this user",
                        self.filters()
                            .iter()
                            .map(|f| f.0.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                Ok(_) => {}
                Err(problem) => {
                    self.stats.attempted.store(true, Ordering::Relaxed);
                    events.forget_pending();
                    // Resend from the oldest entry not acknowledged.
                    let oldest = sent
                        .iter()
                        .map(|(t, _)| *t)
                        .chain(awaiting.values().copied())
                        .filter_map(|t| match t {
                            Tag::Outbox(s) => Some(s),
                            Tag::Status => None,
                        })
                        .min();
                    if let Some(o) = oldest {
                        cursor = cursor.min(o);
                    }
                    sent.clear();
                    awaiting.clear();
                    unsent_acks.clear();
                    self.stats.connected.store(false, Ordering::Relaxed);
                    let lasted = connected_at.take().map(|t| t.elapsed());
                    if lasted.is_some_and(|d| d >= STABLE) {
                        backoff.attempt = 0;
                    }
                    let wait = backoff.next();
                    let brief = lasted.is_some_and(|d| d < STABLE);
                    if lasted.is_some()
                        && (!brief || last_problem.as_deref().map(same_kind) != Some(same_kind(&problem)))
                    {
                        tracing::warn!(
                            "lost the connection to {where_}: {problem}; reconnecting (the outbox keeps what is not yet acknowledged){}",
                            if brief {
                                format!("; connections keep ending within seconds: does another client use the client id {:?}? every device needs its own device_id or client_id", self.opts.client_id)
                            } else {
                                String::new()
                            }
                        );
                    } else if lasted.is_some() {
                        tracing::debug!("{where_}: connection ended again: {problem}");
                    } else if last_problem.as_deref().map(same_kind) != Some(same_kind(&problem)) {
                        tracing::error!(
                            "cannot connect to {where_}: {problem}; retrying with backoff (up to every {}s)",
                            backoff.cap.as_secs()
                        );
                    } else {
                        tracing::debug!("{where_}: still {problem}; next attempt in {:.1}s", wait.as_secs_f64());
                    }
                    last_problem = Some(problem);
                    // Wait, staying responsive to stop; acks now are stale.
                    let sleep = tokio::time::sleep(wait);
                    tokio::pin!(sleep);
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            _ = stop.changed() => break,
                            Some(_) = self.acks_rx.recv() => {}
                            Some(_) = self.stats_rx.recv() => {}
                        }
                    }
                }
            }
            if !done.is_empty() {
                if let Some(store) = &self.store {
                    store.submit(vec![Op::Delete {
                        broker: self.name.clone(),
                        seqs: done,
                    }]);
                }
            }
        }
        self.goodbye(client, events, connected_at.is_some()).await;
    }

    /// `fill` once a quarter of the window is free (an entry was
    /// acknowledged): one outbox read per refill, not one per acknowledgement.
    fn refill(
        &self,
        client: &link::Client,
        sent: &mut VecDeque<(Tag, u8)>,
        awaiting: &HashMap<u16, Tag>,
        cursor: &mut u64,
    ) {
        if WINDOW.saturating_sub(sent.len() + awaiting.len()) >= REFILL {
            self.fill(client, sent, awaiting, cursor);
        }
    }

    /// Publish outbox entries from `cursor` while the window has room.
    fn fill(
        &self,
        client: &link::Client,
        sent: &mut VecDeque<(Tag, u8)>,
        awaiting: &HashMap<u16, Tag>,
        cursor: &mut u64,
    ) {
        let Some(store) = &self.store else { return };
        loop {
            let room = WINDOW.saturating_sub(sent.len() + awaiting.len());
            if room == 0 {
                return;
            }
            let batch = store.outbox_from(&self.name, *cursor, room);
            if batch.is_empty() {
                return;
            }
            for (seq, e) in batch {
                if let Err(err) = client.publish(&e.topic, e.qos, e.retain, e.payload) {
                    tracing::debug!("broker {}: publish of outbox entry {seq} deferred: {err}", self.name);
                    return;
                }
                sent.push_back((Tag::Outbox(seq), e.qos));
                *cursor = seq + 1;
            }
        }
    }

    /// Distinct filters of every route, each at the highest QoS asked.
    fn filters(&self) -> Vec<(String, u8)> {
        let mut out: Vec<(String, u8)> = Vec::new();
        for r in self.routes.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for f in &r.filters {
                match out.iter_mut().find(|(s, _)| *s == f.subscribe) {
                    Some(slot) => slot.1 = slot.1.max(r.qos),
                    None => out.push((f.subscribe.clone(), r.qos)),
                }
            }
        }
        out
    }

    /// Hand a message to every source whose filters match it. It is
    /// acknowledged when the last of them has let go of it.
    fn route(&self, topic: String, payload: bytes::Bytes, qos: u8, pkid: u16, dup: bool, generation: u64) {
        let token = (qos > 0).then(|| {
            self.stats.unacked.fetch_add(1, Ordering::Relaxed);
            Arc::new(AckToken::new(
                self.acks_tx.clone(),
                generation,
                pkid,
                self.stats.clone(),
            ))
        });
        let topic: Arc<str> = Arc::from(topic);
        let mut routed = false;
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        // A removed flow's source is gone for good (a reloaded one hands its
        // inbox on, which stays open).
        routes.retain(|r| !r.tx.is_closed());
        for r in routes.iter() {
            if !r.filters.iter().any(|f| f.matches(&topic)) {
                continue;
            }
            routed = true;
            if qos == 0 && r.queued.load(Ordering::Relaxed) >= QOS0_QUEUE_BYTES {
                self.stats.dropped_qos0.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            r.queued.fetch_add(payload.len(), Ordering::Relaxed);
            let sent = r.tx.send(Delivery {
                topic: topic.clone(),
                payload: payload.clone(),
                ack: token.clone(),
                pkid,
                dup,
                generation,
            });
            if sent.is_err() {
                // The source has ended (its flow stopped): leave the message
                // to the broker, which redelivers it after a reconnect.
                r.queued.fetch_sub(payload.len(), Ordering::Relaxed);
                self.stats.undeliverable.fetch_add(1, Ordering::Relaxed);
                if let Some(t) = &token {
                    t.disarm();
                }
            }
        }
        if !routed {
            self.stats.unrouted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Stopping: say `offline` (a clean disconnect suppresses the will),
    /// then disconnect, within a second.
    async fn goodbye(&mut self, client: link::Client, mut events: link::Loop, connected: bool) {
        self.stats.connected.store(false, Ordering::Relaxed);
        if !connected {
            return;
        }
        if let Some(t) = &self.status_topic {
            let _ = client.publish(t, 1, true, b"offline".to_vec());
        }
        client.disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(1), async { while events.poll().await.is_ok() {} }).await;
        tracing::info!("disconnected from broker {}", self.name);
    }
}

//! One MQTT connection as the rest of runnel sees it, for MQTT 3.1.1 and
//! 5 alike: rumqttc has a separate client for each protocol, and this is
//! the small surface runnel needs of both (publish, subscribe, ack, poll).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5;

use crate::config::BrokerConfig;

/// What one poll of the connection yields.
pub(crate) enum Ev {
    ConnAck {
        session_present: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        /// Sent again (the broker's DUP flag).
        dup: bool,
    },
    PubAck(u16),
    /// MQTT 5: the broker took the message but refused it (reason).
    PubRejected(u16, String),
    /// The broker refused `n` of the filters in one SUBSCRIBE.
    SubRefused(usize),
    /// A PUBLISH went out with this packet id (0 at QoS 0).
    OutPublish(u16),
    Other,
}

pub(crate) enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

pub(crate) enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// Everything a connection needs from the config, resolved.
#[derive(Clone)]
pub(crate) struct LinkOptions {
    pub client_id: String,
    pub host: String,
    pub port: u16,
    pub keepalive: Duration,
    pub persistent: bool,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// (topic, payload) of the last will, retained at QoS 1.
    pub will: Option<(String, Vec<u8>)>,
    pub v5: bool,
    /// QoS 1 messages the broker may have in flight to us (`max_inflight`).
    pub max_inflight: u16,
}

/// The largest packet runnel reads or writes. A bigger incoming packet
/// would cost the connection, so it is generous; sources apply their own
/// `max_payload` (default 256 KiB) below it.
pub(crate) const MAX_PACKET: usize = 8 << 20;

/// Requests (publishes, acks, subscribes) queued for the connection.
const REQUEST_QUEUE: usize = 512;

fn qos4(q: u8) -> rumqttc::QoS {
    if q == 0 {
        rumqttc::QoS::AtMostOnce
    } else {
        rumqttc::QoS::AtLeastOnce
    }
}

fn qos5(q: u8) -> v5::mqttbytes::QoS {
    if q == 0 {
        v5::mqttbytes::QoS::AtMostOnce
    } else {
        v5::mqttbytes::QoS::AtLeastOnce
    }
}

/// TCP_NODELAY: a summary is one small packet, and Nagle's algorithm would
/// hold it back until the broker acknowledges the previous one, which a
/// delayed ACK makes up to 40 ms (the benchmark's latency tail showed it).
fn network_options() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n.set_connection_timeout(10);
    n
}

pub(crate) fn connect(o: &LinkOptions) -> (Client, Loop) {
    if o.v5 {
        let mut m = v5::MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
        m.set_keep_alive(o.keepalive);
        m.set_clean_start(!o.persistent);
        if o.persistent {
            // MQTT 5 ends a session at disconnect unless told otherwise.
            m.set_session_expiry_interval(Some(u32::MAX));
        }
        m.set_manual_acks(true);
        m.set_max_packet_size(Some(MAX_PACKET as u32));
        // QoS 1 messages the broker may have in flight to us at once.
        m.set_receive_maximum(Some(o.max_inflight));
        if let Some((u, p)) = &o.credentials {
            m.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &o.tls {
            m.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        if let Some((topic, payload)) = &o.will {
            m.set_last_will(v5::mqttbytes::v5::LastWill::new(
                topic.clone(),
                payload.clone(),
                qos5(1),
                true,
                None,
            ));
        }
        m.set_request_channel_capacity(REQUEST_QUEUE);
        m.set_network_options(network_options());
        let (c, l) = v5::AsyncClient::new(m, REQUEST_QUEUE);
        (Client::V5(c), Loop::V5(Box::new(l)))
    } else {
        let mut m = rumqttc::MqttOptions::new(o.client_id.clone(), o.host.clone(), o.port);
        m.set_keep_alive(o.keepalive);
        m.set_clean_session(!o.persistent);
        m.set_manual_acks(true);
        m.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        m.set_inflight(100);
        if let Some((u, p)) = &o.credentials {
            m.set_credentials(u.clone(), p.clone());
        }
        if let Some(tls) = &o.tls {
            m.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        if let Some((topic, payload)) = &o.will {
            m.set_last_will(rumqttc::LastWill::new(topic.clone(), payload.clone(), qos4(1), true));
        }
        m.set_request_channel_capacity(REQUEST_QUEUE);
        let (c, mut l) = rumqttc::AsyncClient::new(m, REQUEST_QUEUE);
        l.set_network_options(network_options());
        (Client::V4(c), Loop::V4(Box::new(l)))
    }
}

impl Client {
    pub(crate) fn publish(&self, topic: &str, qos: u8, retain: bool, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, qos4(qos), retain, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(topic, qos5(qos), retain, payload)
                .map_err(|e| e.to_string()),
        }
    }

    pub(crate) fn subscribe(&self, filter: &str, qos: u8) -> Result<(), String> {
        match self {
            Client::V4(c) => c.try_subscribe(filter, qos4(qos)).map_err(|e| e.to_string()),
            Client::V5(c) => c.try_subscribe(filter, qos5(qos)).map_err(|e| e.to_string()),
        }
    }

    /// Acknowledge the QoS 1 message with packet id `pkid`; false if the
    /// request queue is full (try again later).
    pub(crate) fn ack(&self, pkid: u16) -> bool {
        match self {
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos4(1), Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V5(c) => {
                let mut p = v5::mqttbytes::v5::Publish::new("", qos5(1), Vec::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    pub(crate) fn disconnect(&self) {
        let _ = match self {
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl Loop {
    pub(crate) async fn poll(&mut self) -> Result<Ev, String> {
        match self {
            Loop::V4(l) => {
                use rumqttc::{Event, Outgoing, Packet};
                match l.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(Ev::Publish {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                    }),
                    Ok(Event::Incoming(Packet::PubAck(a))) => Ok(Ev::PubAck(a.pkid)),
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ok(Ev::SubRefused(
                        s.return_codes
                            .iter()
                            .filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                            .count(),
                    )),
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Ok(Ev::OutPublish(pkid)),
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(describe4(&e)),
                }
            }
            Loop::V5(l) => {
                use v5::mqttbytes::v5::Packet;
                use v5::Event;
                match l.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => Ok(Ev::ConnAck {
                        session_present: a.session_present,
                    }),
                    Ok(Event::Incoming(Packet::Publish(p))) => Ok(Ev::Publish {
                        topic: String::from_utf8_lossy(&p.topic).into_owned(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        pkid: p.pkid,
                        dup: p.dup,
                    }),
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        use v5::mqttbytes::v5::PubAckReason as R;
                        Ok(match a.reason {
                            R::Success | R::NoMatchingSubscribers => Ev::PubAck(a.pkid),
                            other => Ev::PubRejected(a.pkid, format!("{other:?}")),
                        })
                    }
                    Ok(Event::Incoming(Packet::SubAck(s))) => Ok(Ev::SubRefused(
                        s.return_codes
                            .iter()
                            .filter(|c| !matches!(c, v5::mqttbytes::v5::SubscribeReasonCode::Success(_)))
                            .count(),
                    )),
                    Ok(Event::Outgoing(rumqttc::Outgoing::Publish(pkid))) => Ok(Ev::OutPublish(pkid)),
                    Ok(_) => Ok(Ev::Other),
                    Err(e) => Err(describe5(&e)),
                }
            }
        }
    }

    /// Forget what rumqttc would resend by itself after a reconnect: the
    /// outbox resends, so rumqttc's copies would only confuse which packet
    /// id belongs to which entry.
    ///
    /// Events rumqttc queued before the connection died (an outgoing
    /// publish whose write then failed) would otherwise be reported after
    /// the reconnect and pair the wrong packet id with the wrong entry.
    pub(crate) fn forget_pending(&mut self) {
        match self {
            Loop::V4(l) => {
                l.pending.clear();
                l.state.events.clear();
                l.state.collision = None;
            }
            Loop::V5(l) => {
                l.pending.clear();
                l.state.events.clear();
                l.state.collision = None;
            }
        }
    }
}

/// One line a person can act on, for the errors people actually meet.
fn describe4(e: &rumqttc::ConnectionError) -> String {
    use rumqttc::{ConnectReturnCode as C, ConnectionError as E};
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => {
            "the broker refused the user name or password (check username and password_file)".into()
        }
        // mosquitto answers a 3.1.1 client this way for a wrong password and
        // a client id it does not allow alike.
        E::ConnectionRefused(C::NotAuthorized) => {
            "the broker says this client is not authorized (check username, password_file and client_id against the broker's rules)".into()
        }
        E::ConnectionRefused(C::BadClientId) => {
            "the broker refused the client id (set client_id, or check the broker's rules)".into()
        }
        E::ConnectionRefused(C::RefusedProtocolVersion) => {
            "the broker refused MQTT 3.1.1 (set protocol = \"5\"?)".into()
        }
        E::ConnectionRefused(c) => format!("the broker refused the connection ({c:?})"),
        E::Tls(t) => format!("TLS: {t}"),
        E::Io(io) => format!("{io}"),
        E::NetworkTimeout => "no answer from the broker (network timeout)".into(),
        other => other.to_string(),
    }
}

fn describe5(e: &v5::ConnectionError) -> String {
    use v5::mqttbytes::v5::ConnectReturnCode as C;
    use v5::ConnectionError as E;
    match e {
        E::ConnectionRefused(C::BadUserNamePassword) => {
            "the broker refused the user name or password (check username and password_file)".into()
        }
        E::ConnectionRefused(C::NotAuthorized) => "the broker says this client is not authorized".into(),
        E::ConnectionRefused(C::ClientIdentifierNotValid) => {
            "the broker refused the client id (set client_id, or check the broker's rules)".into()
        }
        E::ConnectionRefused(c) => format!("the broker refused the connection ({c:?})"),
        E::Tls(t) => format!("TLS: {t}"),
        E::Io(io) => format!("{io}"),
        other => other.to_string(),
    }
}

/// Read the broker's secrets and TLS files; an error names the file and
/// the fix.
pub(crate) fn options(name: &str, b: &BrokerConfig, device_id: &str) -> Result<LinkOptions, String> {
    let credentials = match (&b.username, &b.password_file) {
        (Some(u), Some(f)) => Some((u.clone(), read_secret(f)?)),
        (Some(u), None) => Some((u.clone(), String::new())),
        (None, Some(f)) => return Err(format!("password_file {} is set but username is not", f.display())),
        (None, None) => None,
    };
    let tls = match &b.tls {
        Some(t) => Some(Arc::new(tls_config(t)?)),
        None => None,
    };
    let port = b.port.unwrap_or(if tls.is_some() { 8883 } else { 1883 });
    Ok(LinkOptions {
        client_id: b
            .client_id
            .clone()
            .unwrap_or_else(|| format!("runnel-{device_id}-{name}")),
        host: b.host.clone(),
        port,
        keepalive: Duration::from_secs(b.keepalive),
        persistent: b.persistent_session,
        max_inflight: b.max_inflight,
        credentials,
        tls,
        will: b.status.then(|| (super::status_topic(device_id), b"offline".to_vec())),
        v5: b.protocol == "5",
    })
}

/// A secret file must not be readable by others (it would be on a shared
/// or stolen SD card image as well).
fn read_secret(path: &std::path::Path) -> Result<String, String> {
    crate::perms::check_secret(path)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
}

fn tls_config(t: &crate::config::TlsConfig) -> Result<rustls::ClientConfig, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read_certs = |p: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, String> {
        let f = std::fs::File::open(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
        let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(f))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("{}: not PEM certificates ({e})", p.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no PEM certificate in it", p.display()));
        }
        Ok(certs)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    match &t.ca {
        Some(ca) => {
            for c in read_certs(ca)? {
                roots
                    .add(c)
                    .map_err(|e| format!("{}: not a usable CA certificate ({e})", ca.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(
                    "tls: no `ca` given and no system CA certificates found (install ca-certificates, or set ca)"
                        .into(),
                );
            }
        }
    }
    let builder = builder.with_root_certificates(roots);
    match (&t.cert, &t.key) {
        (Some(cert), Some(key)) => {
            let certs = read_certs(cert)?;
            crate::perms::check_secret(key)?;
            let f = std::fs::File::open(key).map_err(|e| format!("cannot read {}: {e}", key.display()))?;
            let k: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut std::io::BufReader::new(f))
                .map_err(|e| format!("{}: not a PEM private key ({e})", key.display()))?
                .ok_or_else(|| format!("{}: no PEM private key in it", key.display()))?;
            builder.with_client_auth_cert(certs, k).map_err(|e| {
                format!(
                    "tls: cert {} and key {} do not fit together ({e})",
                    cert.display(),
                    key.display()
                )
            })
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

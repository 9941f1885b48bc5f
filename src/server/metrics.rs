//! Prometheus metrics of one server process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PacketLabels {
    pub packet: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub status: u16,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandoffLabels {
    pub packet: String,
    pub outcome: String,
}

pub struct Metrics {
    registry: Registry,
    /// Packets handed to the member that owns their session, by packet and outcome.
    pub handoff_packets: Family<HandoffLabels, Counter>,
    /// Body bytes handed on to other members.
    pub handoff_bytes: Counter,
    /// Packets other members handed to this one.
    pub handoff_received: Counter,
    pub bytes_received: Counter,
    pub sessions_active: Gauge,
    pub sessions_created: Counter,
    pub sessions_completed: Counter,
    pub sessions_cancelled: Counter,
    pub sessions_expired: Counter,
    pub packets: Family<PacketLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub notifications: Family<OutcomeLabels, Counter>,
    pub duplicates_suppressed: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("bitsfarm");
        let m = Metrics {
            registry: Registry::default(),
            handoff_packets: Family::default(),
            handoff_bytes: Counter::default(),
            handoff_received: Counter::default(),
            bytes_received: Counter::default(),
            sessions_active: Gauge::default(),
            sessions_created: Counter::default(),
            sessions_completed: Counter::default(),
            sessions_cancelled: Counter::default(),
            sessions_expired: Counter::default(),
            packets: Family::default(),
            errors: Family::default(),
            notifications: Family::default(),
            duplicates_suppressed: Counter::default(),
        };
        registry.register(
            "received_bytes",
            "Upload bytes stored (new bytes only, not retransmits)",
            m.bytes_received.clone(),
        );
        registry.register(
            "sessions_active",
            "Upload sessions open (not closed, cancelled or expired)",
            m.sessions_active.clone(),
        );
        registry.register(
            "sessions_created",
            "Sessions created",
            m.sessions_created.clone(),
        );
        registry.register(
            "sessions_completed",
            "Sessions closed with the whole file committed",
            m.sessions_completed.clone(),
        );
        registry.register(
            "sessions_cancelled",
            "Sessions cancelled, or closed before the upload was complete",
            m.sessions_cancelled.clone(),
        );
        registry.register(
            "sessions_expired",
            "Sessions removed by the session timeout",
            m.sessions_expired.clone(),
        );
        registry.register("packets", "BITS packets received", m.packets.clone());
        registry.register(
            "errors",
            "Error Acks sent, by HTTP status and BITS-Error-Code",
            m.errors.clone(),
        );
        registry.register(
            "notifications",
            "Notifications sent to the server application, by outcome (delivered, refused, unreachable)",
            m.notifications.clone(),
        );
        registry.register(
            "duplicate_deliveries_suppressed",
            "Completed uploads not sent again because their delivery was already recorded",
            m.duplicates_suppressed.clone(),
        );
        registry.register(
            "handoff_forwarded_packets",
            "Packets for another member's session handed to that member, by packet and outcome (forwarded, owner_gone, failed)",
            m.handoff_packets.clone(),
        );
        registry.register(
            "handoff_forwarded_bytes",
            "Upload bytes handed on to the member that owns their session",
            m.handoff_bytes.clone(),
        );
        registry.register(
            "handoff_received_packets",
            "Packets other members handed to this one",
            m.handoff_received.clone(),
        );
        Metrics { registry, ..m }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

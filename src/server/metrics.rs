//! Prometheus metrics of one server process.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub use super::auth::AUTH_FAILURE_REASONS;
pub use super::limits::Limit;

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

/// Why a request got 401. The values are fixed words, never anything the client sent: a user
/// name or credential as a label would put secrets and attacker-chosen strings into the metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub reason: &'static str,
}

/// Which limit refused a request (`Limit::label`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
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
    /// Requests refused at authentication, by reason (`auth::Denied::metric_reason`).
    pub auth_failures: Family<AuthFailureLabels, Counter>,
    /// Requests refused by a configured limit, by limit.
    pub limit_refusals: Family<LimitLabels, Counter>,
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
            auth_failures: Family::default(),
            limit_refusals: Family::default(),
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
        registry.register(
            "auth_failures",
            "Requests refused at authentication, by reason: answered 401: missing (no credentials; also the first request of a client that sends them only when challenged), malformed, unsupported_scheme, wrong (unknown user, wrong password or unknown token, not told apart so that the metrics cannot list user names); answered 503 without a check, which clients retry: throttled (the client's address failed too often lately), busy (every password check was taken)",
            m.auth_failures.clone(),
        );
        registry.register(
            "limit_refusals",
            "Requests refused by a configured limit, by limit: sessions_per_user and sessions (Create-Session, 503), fragment_size (413), upload_size (BITSMaximumUploadSize, 500); connections_per_address (a connection closed at once) and body_rate (a body cut for coming slower than min-body-rate)",
            m.limit_refusals.clone(),
        );
        // Every series exists from the start at 0, so that a rate or an alert does not have to
        // wait for the first refusal to see it.
        for reason in AUTH_FAILURE_REASONS {
            let _ = m.auth_failures.get_or_create(&AuthFailureLabels { reason });
        }
        for limit in Limit::ALL {
            let _ = m.limit_refusals.get_or_create(&LimitLabels {
                limit: limit.label(),
            });
        }
        Metrics { registry, ..m }
    }

    /// Counts a request refused at authentication (401, or 503 when throttled or busy).
    pub fn auth_failed(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthFailureLabels { reason })
            .inc();
    }

    /// Counts a request a limit refused.
    pub fn limit_refused(&self, limit: Limit) {
        self.limit_refusals
            .get_or_create(&LimitLabels {
                limit: limit.label(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_counters_start_at_zero_and_count_under_fixed_labels() {
        let m = Metrics::new();
        let text = m.encode();
        for reason in AUTH_FAILURE_REASONS {
            let series = format!("bitsfarm_auth_failures_total{{reason=\"{reason}\"}} 0\n");
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        for limit in Limit::ALL {
            let series = format!(
                "bitsfarm_limit_refusals_total{{limit=\"{}\"}} 0\n",
                limit.label()
            );
            assert!(text.contains(&series), "{series} missing from\n{text}");
        }
        m.auth_failed("wrong");
        m.auth_failed("wrong");
        m.limit_refused(Limit::FragmentSize);
        let text = m.encode();
        assert!(text.contains("bitsfarm_auth_failures_total{reason=\"wrong\"} 2\n"));
        assert!(text.contains("bitsfarm_auth_failures_total{reason=\"missing\"} 0\n"));
        assert!(text.contains("bitsfarm_limit_refusals_total{limit=\"fragment_size\"} 1\n"));
        assert!(text.contains("bitsfarm_limit_refusals_total{limit=\"sessions\"} 0\n"));
    }
}

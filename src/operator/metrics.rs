//! Prometheus metrics of the operator: reconciles, failures, durations, and farms by readiness.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReadyLabels {
    pub ready: String,
}

pub struct Metrics {
    registry: Registry,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub farms: Family<ReadyLabels, Gauge>,
    pub crd_missing: Gauge,
    /// 1 while this replica holds the Lease and runs the controller (always 1 without election).
    pub leader: Gauge,
    /// Readiness of each farm by `namespace/name`, from which the `farms` gauge is recomputed.
    readiness: Mutex<HashMap<String, bool>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("bitsfarm_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.01, 2.0, 12));
        let farms = Family::<ReadyLabels, Gauge>::default();
        let crd_missing = Gauge::default();
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile took",
            duration.clone(),
        );
        registry.register("farms", "UploadFarms by readiness", farms.clone());
        registry.register(
            "crd_missing",
            "1 while the UploadFarm CRD is not installed",
            crd_missing.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads (holds the Lease and reconciles), 0 on a standby",
            leader.clone(),
        );
        Metrics {
            leader,
            registry,
            reconciles,
            failures,
            duration,
            farms,
            crd_missing,
            readiness: Mutex::new(HashMap::new()),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    pub fn failed(&self, error: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: error.to_string(),
            })
            .inc();
    }

    /// Records a farm's readiness (None: the farm is gone) and updates the `farms` gauge.
    pub fn set_farm_ready(&self, key: &str, ready: Option<bool>) {
        let Ok(mut map) = self.readiness.lock() else {
            return;
        };
        match ready {
            Some(r) => map.insert(key.to_string(), r),
            None => map.remove(key),
        };
        let ready = map.values().filter(|r| **r).count() as i64;
        let not_ready = map.len() as i64 - ready;
        for (label, n) in [("true", ready), ("false", not_ready)] {
            self.farms
                .get_or_create(&ReadyLabels {
                    ready: label.into(),
                })
                .set(n);
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_reconciles_failures_durations_and_farms() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.failed("apply");
        m.set_farm_ready("ns/a", Some(true));
        m.set_farm_ready("ns/b", Some(false));
        m.set_farm_ready("ns/c", Some(false));
        m.set_farm_ready("ns/c", None);
        let text = m.encode();
        assert!(text.contains("bitsfarm_operator_leader 0"), "{text}");
        m.leader.set(1);
        assert!(m.encode().contains("bitsfarm_operator_leader 1"));
        assert!(
            text.contains("bitsfarm_operator_reconciles_total 1"),
            "{text}"
        );
        assert!(
            text.contains("bitsfarm_operator_reconcile_failures_total{error=\"apply\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bitsfarm_operator_reconcile_duration_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains("bitsfarm_operator_farms{ready=\"true\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("bitsfarm_operator_farms{ready=\"false\"} 1"),
            "{text}"
        );
    }
}

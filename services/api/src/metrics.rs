//! Prometheus metrics at `/metrics`: request counts by route and status, request latency
//! histograms by route, and the worker's progress. Hand-rolled text exposition: a few atomics
//! are all it needs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Latency bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// The registry.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    latency: Mutex<BTreeMap<String, std::sync::Arc<Histogram>>>,
    /// Slides the service's own worker embedded since start.
    pub slides_embedded_by_worker: AtomicU64,
    /// Slides the service's own worker failed on since start.
    pub slides_failed_by_worker: AtomicU64,
}

impl Metrics {
    /// Records one request to `route` (the matched pattern, not the raw path).
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((route.to_string(), status))
            .or_default() += 1;
        let h = self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.to_string())
            .or_default()
            .clone();
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        h.count.fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    /// The text exposition format; `gauges` are extra (name, help, value) lines.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut s = String::new();
        s += "# HELP gigapath_http_requests_total HTTP requests by route and status.\n";
        s += "# TYPE gigapath_http_requests_total counter\n";
        for ((route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            s += &format!(
                "gigapath_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}\n"
            );
        }
        s += "# HELP gigapath_http_request_duration_seconds Request latency by route.\n";
        s += "# TYPE gigapath_http_request_duration_seconds histogram\n";
        for (route, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            for (i, b) in BUCKETS.iter().enumerate() {
                let n = h.counts[i].load(Ordering::Relaxed);
                s += &format!("gigapath_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{b}\"}} {n}\n");
            }
            let count = h.count.load(Ordering::Relaxed);
            s += &format!("gigapath_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {count}\n");
            let sum = h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
            s +=
                &format!("gigapath_http_request_duration_seconds_sum{{route=\"{route}\"}} {sum}\n");
            s += &format!(
                "gigapath_http_request_duration_seconds_count{{route=\"{route}\"}} {count}\n"
            );
        }
        for (name, help, value) in gauges {
            s += &format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_buckets_accumulate() {
        let m = Metrics::default();
        m.observe("/v1/search/slides", 200, 0.003);
        m.observe("/v1/search/slides", 200, 0.2);
        m.observe("/v1/search/slides", 400, 0.0005);
        let text = m.render(&[("gigapath_points", "Points.", 7.0)]);
        assert!(text.contains(
            "gigapath_http_requests_total{route=\"/v1/search/slides\",status=\"200\"} 2"
        ));
        assert!(text.contains("le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("le=\"+Inf\"} 3"));
        assert!(text.contains("gigapath_points 7"));
    }
}

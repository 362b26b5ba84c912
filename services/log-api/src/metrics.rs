//! Prometheus metrics: the small primitives every crate declares its metrics with, the text
//! exposition format they are written in, and the process's registry of collectors.
//!
//! Why our own ~300 lines and not the `prometheus` crate: we need counters, gauges read at
//! scrape time and fixed-bucket histograms, all lock-free on the hot path, and the text
//! format; the crate would add protobuf and a registry model we do not use
//! (docs/decisions/metrics.md).
//!
//! Rules this module enforces (debug assertions on every name, tests on the output):
//! - names follow Prometheus conventions: `tidings_<crate>_<what>_<unit>`, `_total` for
//!   counters, `_seconds` and `_bytes` in base units;
//! - label values are `&'static str`: a label can only take values written in the code, so
//!   the number of series is bounded; tenant, user and conversation ids can never be labels.
//!
//! The log's own metrics are declared with these in `tidings_log::metrics`; the gateway's in
//! `tidings_gateway::metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Bucket bounds for latencies, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Bucket bounds for long tasks (an archive pass), in seconds: 10 ms to 30 minutes.
pub const TASK_BUCKETS: &[f64] = &[
    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0,
];
/// Bucket bounds for counts per group (requests per commit).
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// The most buckets a histogram has (the bounds above all fit).
const MAX_BUCKETS: usize = 16;

/// A monotonically increasing count.
pub struct Counter {
    name: &'static str,
    help: &'static str,
    value: AtomicU64,
}

impl Counter {
    pub const fn new(name: &'static str, help: &'static str) -> Counter {
        Counter {
            name,
            help,
            value: AtomicU64::new(0),
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        self.value.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    pub fn write(&self, out: &mut Text) {
        out.counter(self.name, self.help, &[], self.get());
    }
}

/// Counts by one label whose values are fixed in the code (at most 24 of them).
pub struct LabeledCounter {
    name: &'static str,
    help: &'static str,
    label: &'static str,
    values: &'static [&'static str],
    counts: [AtomicU64; 24],
}

impl LabeledCounter {
    /// `values` lists every value the label takes (at most 24); [`LabeledCounter::inc`] with
    /// another value counts under the last one, so a mistake cannot grow the series (and
    /// [`LabeledCounter::knows`] lets a test check its callers).
    pub const fn new(
        name: &'static str,
        help: &'static str,
        label: &'static str,
        values: &'static [&'static str],
    ) -> LabeledCounter {
        assert!(!values.is_empty() && values.len() <= 24);
        LabeledCounter {
            name,
            help,
            label,
            values,
            counts: [const { AtomicU64::new(0) }; 24],
        }
    }

    pub fn inc(&self, value: &str) {
        let i = self
            .values
            .iter()
            .position(|v| *v == value)
            .unwrap_or(self.values.len() - 1);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Whether `value` is one of the label's values.
    pub fn knows(&self, value: &str) -> bool {
        self.values.contains(&value)
    }

    pub fn get(&self, value: &str) -> u64 {
        self.values
            .iter()
            .position(|v| *v == value)
            .map_or(0, |i| self.counts[i].load(Ordering::Relaxed))
    }

    pub fn write(&self, out: &mut Text) {
        out.header(self.name, self.help, "counter");
        for (i, value) in self.values.iter().enumerate() {
            out.sample(
                self.name,
                &[(self.label, value)],
                self.counts[i].load(Ordering::Relaxed) as f64,
            );
        }
    }
}

/// A distribution in fixed buckets: cumulative counts are computed at scrape time, so an
/// observation is two atomic adds and a compare-and-swap on the sum.
pub struct Histogram {
    name: &'static str,
    help: &'static str,
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last used slot is `+Inf`.
    buckets: [AtomicU64; MAX_BUCKETS + 1],
    /// The sum of observations, as f64 bits.
    sum: AtomicU64,
}

impl Histogram {
    pub const fn new(name: &'static str, help: &'static str, bounds: &'static [f64]) -> Histogram {
        assert!(bounds.len() <= MAX_BUCKETS);
        Histogram {
            name,
            help,
            bounds,
            buckets: [const { AtomicU64::new(0) }; MAX_BUCKETS + 1],
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: f64) {
        let value = if value.is_finite() { value } else { 0.0 };
        let i = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        let mut sum = self.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(sum) + value).to_bits();
            match self
                .sum
                .compare_exchange_weak(sum, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => sum = now,
            }
        }
    }

    pub fn observe_duration(&self, d: Duration) {
        self.observe(d.as_secs_f64());
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.buckets[..=self.bounds.len()]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .sum()
    }

    pub fn write(&self, out: &mut Text) {
        out.header(self.name, self.help, "histogram");
        let bucket = format!("{}_bucket", self.name);
        let mut cumulative = 0u64;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            out.sample(&bucket, &[("le", &fmt_f64(*bound))], cumulative as f64);
        }
        cumulative += self.buckets[self.bounds.len()].load(Ordering::Relaxed);
        out.sample(&bucket, &[("le", "+Inf")], cumulative as f64);
        out.sample(
            &format!("{}_sum", self.name),
            &[],
            f64::from_bits(self.sum.load(Ordering::Relaxed)),
        );
        out.sample(&format!("{}_count", self.name), &[], cumulative as f64);
    }
}

/// A page of the Prometheus text exposition format (version 0.0.4) being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// The content type of [`Text`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Text {
    /// `# HELP` and `# TYPE` of a metric family.
    pub fn header(&mut self, name: &str, help: &str, kind: &str) {
        debug_assert!(valid_name(name), "bad metric name {name}");
        debug_assert!(
            kind != "counter" || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample line; label values are escaped.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_name(k), "bad label name {k}");
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", fmt_f64(value));
    }

    /// A whole counter family with one sample.
    pub fn counter(&mut self, name: &str, help: &str, labels: &[(&str, &str)], value: u64) {
        self.header(name, help, "counter");
        self.sample(name, labels, value as f64);
    }

    /// A whole gauge family with one sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.header(name, help, "gauge");
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

fn fmt_f64(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "+Inf".into()
        } else {
            "-Inf".into()
        }
    } else {
        format!("{v}")
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Writes some metrics into a page at scrape time.
pub type Collector = Arc<dyn Fn(&mut Text) + Send + Sync>;

/// The process's collectors, by name (a component registers one when it starts; registering
/// a name again replaces it, so a restarted task does not add a second family).
static REGISTRY: Mutex<Vec<(&'static str, Collector)>> = Mutex::new(Vec::new());

/// Adds (or replaces) the collector named `name`.
pub fn register(name: &'static str, collector: Collector) {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    match registry.iter_mut().find(|(n, _)| *n == name) {
        Some(slot) => slot.1 = collector,
        None => registry.push((name, collector)),
    }
}

/// The page `/metrics` answers: every registered collector, in registration order.
pub fn render() -> String {
    let collectors: Vec<Collector> = REGISTRY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|(_, c)| c.clone())
        .collect();
    let mut text = Text::default();
    for collector in collectors {
        collector(&mut text);
    }
    text.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_is_cumulative_with_sum_and_count() {
        static H: Histogram = Histogram::new("tidings_test_seconds", "a test", &[0.1, 1.0]);
        H.observe(0.05);
        H.observe(0.5);
        H.observe(7.0);
        let mut text = Text::default();
        H.write(&mut text);
        let page = text.finish();
        assert!(
            page.contains("# TYPE tidings_test_seconds histogram\n"),
            "{page}"
        );
        assert!(
            page.contains("tidings_test_seconds_bucket{le=\"0.1\"} 1\n"),
            "{page}"
        );
        assert!(
            page.contains("tidings_test_seconds_bucket{le=\"1\"} 2\n"),
            "{page}"
        );
        assert!(
            page.contains("tidings_test_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{page}"
        );
        assert!(page.contains("tidings_test_seconds_sum 7.55\n"), "{page}");
        assert!(page.contains("tidings_test_seconds_count 3\n"), "{page}");
    }

    #[test]
    fn label_values_are_escaped_and_unknown_values_cannot_add_series() {
        let mut text = Text::default();
        text.header("tidings_test_total", "a \\ help\nline", "counter");
        text.sample("tidings_test_total", &[("why", "a\"b\\c\nd")], 2.0);
        let page = text.finish();
        assert_eq!(
            page,
            "# HELP tidings_test_total a \\\\ help\\nline\n# TYPE tidings_test_total counter\n\
             tidings_test_total{why=\"a\\\"b\\\\c\\nd\"} 2\n"
        );
        static L: LabeledCounter =
            LabeledCounter::new("tidings_test2_total", "t", "outcome", &["ok", "other"]);
        L.inc("ok");
        assert_eq!(L.get("ok"), 1);
        let mut text = Text::default();
        L.write(&mut text);
        assert_eq!(text.finish().matches("tidings_test2_total{").count(), 2);
    }
}

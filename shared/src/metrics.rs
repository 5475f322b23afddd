//! The daemons' Prometheus metrics, with the Prometheus client library (`prometheus-client`):
//! every family is registered in a [`Registry`] by the part that owns it, either as one of
//! the library's metric types or as a [`Collector`] that reads its owner's figures at
//! scrape time, and the library writes the exposition (OpenMetrics text). Here: what both
//! daemons share: the latency buckets, the `build_info` and `process_*` families, label
//! values made safe, and the encoding.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::info::Info;
pub use prometheus_client::registry::Registry;

/// The `Content-Type` of [`encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds: from a loopback round trip to a slow
/// origin.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds of the session-duration buckets, in seconds: a WebSocket or TCP session
/// lasts from a second to a working day.
pub const SESSION_BUCKETS: [f64; 10] = [
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    4.0 * 3600.0,
    8.0 * 3600.0,
    24.0 * 3600.0,
];

/// A histogram recorded from every request without a lock (the library's own takes a
/// write lock per observation): one atomic per bucket, plus count and sum, read and
/// handed to the library's encoder at scrape time.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is above every bound.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    /// The sum in microseconds.
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// How many observations there were.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        let buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::MAX))
            .zip(self.buckets.iter().map(|n| n.load(Ordering::Relaxed)))
            .collect();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// A histogram of request latencies, bucketed by [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> Histogram {
    Histogram::new(&LATENCY_BUCKETS)
}

/// A histogram of session durations, bucketed by [`SESSION_BUCKETS`].
pub fn session_histogram() -> Histogram {
    Histogram::new(&SESSION_BUCKETS)
}

/// A label value safe for the text exposition: backslash, quote and line break escaped
/// (the library writes values as they are).
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The registry as exposition text.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// A daemon's registry: the standard `process_*` families at its root, and
/// `<prefix>_build_info{version}` (always 1) in the sub-registry its parts register
/// their families in, which `prefixed` gives.
pub fn daemon_registry(prefix: &str) -> Registry {
    let mut root = Registry::default();
    root.register_collector(Box::new(Process));
    prefixed(&mut root, prefix).register(
        "build",
        "The running version (always 1).",
        Info::new([("version", env!("CARGO_PKG_VERSION"))]),
    );
    root
}

/// The sub-registry of [`daemon_registry`] whose families are named `<prefix>_...`.
pub fn prefixed<'r>(root: &'r mut Registry, prefix: &str) -> &'r mut Registry {
    root.sub_registry_with_prefix(prefix)
}

/// Writes one gauge family of `samples` from a collector.
pub fn gauges<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, i64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one counter family of `samples` from a collector (`name` without `_total`,
/// which the library adds).
pub fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one unlabelled gauge from a collector.
pub fn gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> fmt::Result {
    ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// Writes one unlabelled counter from a collector.
pub fn counter(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: u64,
) -> fmt::Result {
    ConstCounter::new(value).encode(encoder.encode_descriptor(
        name,
        help,
        None,
        MetricType::Counter,
    )?)
}

/// The standard `process_*` families of the running process, read from `/proc` at each
/// scrape (Linux; elsewhere they are left out).
#[derive(Debug)]
struct Process;

/// What `/proc/self` says of the process.
#[derive(Debug, Default, PartialEq)]
struct ProcessFigures {
    cpu_seconds: f64,
    resident_bytes: i64,
    virtual_bytes: i64,
    threads: i64,
    start_time_seconds: f64,
    open_fds: i64,
    max_fds: Option<i64>,
}

impl ProcessFigures {
    /// Reads the figures: `stat` is `/proc/self/stat`, `boot_time` the `btime` of
    /// `/proc/stat`; `None` when `stat` cannot be understood.
    fn parse(stat: &str, boot_time: u64, ticks_per_second: u64, page_size: u64) -> Option<Self> {
        // The command name is in parentheses and may hold spaces: fields count from after it.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Field n of proc(5) is fields[n - 3] here.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        let ticks = ticks_per_second.max(1) as f64;
        Some(Self {
            cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
            threads: i64::try_from(field(20)?).ok()?,
            start_time_seconds: boot_time as f64 + field(22)? as f64 / ticks,
            virtual_bytes: i64::try_from(field(23)?).ok()?,
            resident_bytes: i64::try_from(field(24)?.saturating_mul(page_size)).ok()?,
            open_fds: 0,
            max_fds: None,
        })
    }

    fn read() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
        let mut figures = Self::parse(
            &stat,
            boot_time,
            rustix::param::clock_ticks_per_second(),
            rustix::param::page_size() as u64,
        )?;
        figures.open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| i64::try_from(d.count()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        figures.max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| max_open_files(&limits));
        Some(figures)
    }
}

/// The soft limit on open files from `/proc/self/limits`.
fn max_open_files(limits: &str) -> Option<i64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let Some(p) = ProcessFigures::read() else {
            return Ok(());
        };
        ConstCounter::new(p.cpu_seconds).encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            MetricType::Counter,
        )?)?;
        ConstGauge::new(p.resident_bytes).encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.virtual_bytes).encode(encoder.encode_descriptor(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.start_time_seconds).encode(encoder.encode_descriptor(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.threads).encode(encoder.encode_descriptor(
            "process_threads",
            "Number of OS threads in the process.",
            None,
            MetricType::Gauge,
        )?)?;
        ConstGauge::new(p.open_fds).encode(encoder.encode_descriptor(
            "process_open_fds",
            "Number of open file descriptors.",
            None,
            MetricType::Gauge,
        )?)?;
        if let Some(max) = p.max_fds {
            ConstGauge::new(max).encode(encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                MetricType::Gauge,
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_come_from_proc_stat_with_a_command_that_has_spaces() {
        // proc(5): pid (comm) state ppid ... utime(14) stime(15) ... num_threads(20)
        // itrealvalue(21) starttime(22) vsize(23) rss(24)
        let stat = "42 (tokio rt) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 104857600 2560 18446744073709551615";
        let p = ProcessFigures::parse(stat, 1_700_000_000, 100, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.threads, 7);
        assert_eq!(p.start_time_seconds, 1_700_000_010.0);
        assert_eq!(p.virtual_bytes, 104_857_600);
        assert_eq!(p.resident_bytes, 2560 * 4096);
        assert_eq!(ProcessFigures::parse("garbage", 0, 100, 4096), None);
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \nMax open files            20000                20000                files     \n";
        assert_eq!(max_open_files(limits), Some(20000));
    }

    #[test]
    fn the_library_writes_build_info_and_the_process_families() {
        let registry = daemon_registry("portcullis_test");
        let text = encode(&registry);
        assert!(
            text.contains(&format!(
                "portcullis_test_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_histogram_is_written_cumulative_with_its_count_and_sum() {
        #[derive(Debug)]
        struct One(Histogram);
        impl Collector for One {
            fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
                self.0.encode(encoder.encode_descriptor(
                    "x_seconds",
                    "x",
                    None,
                    MetricType::Histogram,
                )?)
            }
        }
        let h = latency_histogram();
        for d in [300, 20_000, 20_000, 60_000_000] {
            h.observe(Duration::from_micros(d));
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(h)));
        let text = encode(&registry);
        for line in [
            "x_seconds_bucket{le=\"0.0005\"} 1\n",
            "x_seconds_bucket{le=\"0.01\"} 1\n",
            "x_seconds_bucket{le=\"0.025\"} 3\n",
            "x_seconds_bucket{le=\"10.0\"} 3\n",
            "x_seconds_bucket{le=\"+Inf\"} 4\n",
            "x_seconds_count 4\n",
            "x_seconds_sum 60.0403\n",
        ] {
            assert!(text.contains(line), "{line} not in {text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}

//! The load engine: closed loop (N clients, each issuing its next operation when the last one
//! returns) and open loop (operations started on a fixed schedule, latency measured from the
//! scheduled start, so a stall is charged to every operation it delayed: no coordinated
//! omission). Latency goes into HDR histograms; a progress line is printed every second; every
//! run is bounded by a duration and an operation count.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// One operation: given (client, sequence number), does the work and returns how many items it
/// carried (1 for a unary call, 100 for a batch of 100), or the gRPC status code it failed with.
pub(crate) type OpFn =
    Arc<dyn Fn(usize, u64) -> Pin<Box<dyn Future<Output = Result<u64, tonic::Code>> + Send>> + Send + Sync>;

/// How to drive a scenario.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// Concurrent clients (closed loop), or the cap on operations in flight (open loop).
    pub clients: usize,
    /// Open loop at this many operations a second; `None`: closed loop.
    pub rate: Option<u64>,
    /// Operations before measuring (not recorded).
    pub warm_up: Duration,
    /// How long to measure.
    pub duration: Duration,
    /// At most this many measured operations.
    pub max_ops: u64,
}

/// What a run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Measured {
    /// Successful operations.
    pub ops: u64,
    /// Items carried by successful operations.
    pub items: u64,
    /// Wall time of the measured phase, seconds.
    pub seconds: f64,
    /// Successful operations a second.
    pub ops_per_sec: f64,
    /// Items a second.
    pub items_per_sec: f64,
    /// Latency percentiles of successful operations, microseconds.
    pub p50_us: u64,
    /// See `p50_us`.
    pub p99_us: u64,
    /// See `p50_us`.
    pub p999_us: u64,
    /// See `p50_us`.
    pub max_us: u64,
    /// Failed operations by status code.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: operations not started because the in-flight cap was reached.
    pub shed: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    items: AtomicU64,
    failed: AtomicU64,
}

struct Shared {
    hist: Mutex<Histogram<u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    tally: Tally,
}

impl Shared {
    fn record(&self, result: Result<u64, tonic::Code>, latency: Duration) {
        match result {
            Ok(items) => {
                self.tally.ok.fetch_add(1, Ordering::Relaxed);
                self.tally.items.fetch_add(items, Ordering::Relaxed);
                let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).max(1);
                let mut hist = self.hist.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let _ = hist.record(us.min(60_000_000));
            }
            Err(code) => {
                self.tally.failed.fetch_add(1, Ordering::Relaxed);
                let mut errors = self.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                *errors.entry(format!("{code:?}")).or_default() += 1;
            }
        }
    }
}

/// Runs `op` with `shape`, printing a progress line labelled `label` every second.
pub(crate) async fn run(label: &str, shape: Shape, op: OpFn) -> Measured {
    // Warm-up: closed loop, not recorded.
    if !shape.warm_up.is_zero() {
        let until = Instant::now() + shape.warm_up;
        let tasks: Vec<_> = (0..shape.clients)
            .map(|c| {
                let op = op.clone();
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while Instant::now() < until && seq < 1_000_000 {
                        let _ = op(c, seq).await;
                        seq += 1;
                    }
                })
            })
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
    let shared = Arc::new(Shared { hist: Mutex::new(histogram()), errors: Mutex::default(), tally: Tally::default() });
    let started = Instant::now();
    let deadline = started + shape.duration;
    let progress = tokio::spawn(progress(label.to_owned(), shared.clone(), started, shape.duration));
    let issued = Arc::new(AtomicU64::new(0));
    let mut shed = 0u64;
    match shape.rate {
        None => {
            let tasks: Vec<_> = (0..shape.clients)
                .map(|c| {
                    let (op, shared, issued) = (op.clone(), shared.clone(), issued.clone());
                    tokio::spawn(async move {
                        let mut seq = 0u64;
                        while Instant::now() < deadline && issued.fetch_add(1, Ordering::Relaxed) < shape.max_ops {
                            let t0 = Instant::now();
                            let result = op(c, seq).await;
                            shared.record(result, t0.elapsed());
                            seq += 1;
                        }
                    })
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
        }
        Some(rate) => {
            let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
            let in_flight = Arc::new(tokio::sync::Semaphore::new(shape.clients.max(1)));
            let mut tasks = Vec::new();
            let mut seq = 0u64;
            while seq < shape.max_ops {
                // Each operation is due at its slot on the schedule, whatever happened before.
                let due = started + interval * u32::try_from(seq).unwrap_or(u32::MAX);
                if due >= deadline {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    shed += 1;
                    seq += 1;
                    continue;
                };
                let (op, shared) = (op.clone(), shared.clone());
                let client = usize::try_from(seq % shape.clients.max(1) as u64).unwrap_or(0);
                tasks.push(tokio::spawn(async move {
                    let result = op(client, seq).await;
                    shared.record(result, due.elapsed());
                    drop(permit);
                }));
                seq += 1;
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    progress.abort();
    eprintln!();
    let hist = shared.hist.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let ops = shared.tally.ok.load(Ordering::Relaxed);
    let items = shared.tally.items.load(Ordering::Relaxed);
    let errors = shared.errors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    Measured::new((ops, items, seconds), &hist, errors, shed)
}

impl Measured {
    fn new(
        (ops, items, seconds): (u64, u64, f64),
        hist: &Histogram<u64>,
        errors: BTreeMap<String, u64>,
        shed: u64,
    ) -> Self {
        Measured {
            ops,
            items,
            seconds,
            ops_per_sec: ops as f64 / seconds,
            items_per_sec: items as f64 / seconds,
            p50_us: hist.value_at_quantile(0.5),
            p99_us: hist.value_at_quantile(0.99),
            p999_us: hist.value_at_quantile(0.999),
            max_us: hist.max(),
            errors,
            shed,
        }
    }
}

async fn progress(label: String, shared: Arc<Shared>, started: Instant, total: Duration) {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ok = shared.tally.ok.load(Ordering::Relaxed);
        eprint!(
            "\r  {label}: {:>4.0}/{:.0} s, {} ops/s, {} failed   ",
            started.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            ok - last,
            shared.tally.failed.load(Ordering::Relaxed)
        );
        last = ok;
    }
}

/// Runs `f` on one thread for `duration` (at most `max_ops` calls): the in-process limit of one
/// core. Returns calls a second.
pub(crate) fn one_core(duration: Duration, max_ops: u64, mut f: impl FnMut(u64)) -> Measured {
    let started = Instant::now();
    let mut hist = histogram();
    let mut n = 0u64;
    while n < max_ops && started.elapsed() < duration {
        let t0 = Instant::now();
        // Batches of 64 calls between clock reads: the clock would otherwise dominate.
        for _ in 0..64 {
            f(n);
            n += 1;
        }
        let per_call_ns = t0.elapsed().as_nanos() / 64;
        let _ = hist.record(u64::try_from(per_call_ns / 1000).unwrap_or(u64::MAX).max(1));
    }
    let seconds = started.elapsed().as_secs_f64();
    Measured::new((n, n, seconds), &hist, BTreeMap::new(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counting_op(count: Arc<AtomicU64>, items: u64) -> OpFn {
        Arc::new(move |_, _| {
            // Every tenth call overall fails.
            let n = count.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if n % 10 == 9 {
                    Err(tonic::Code::Unavailable)
                } else {
                    Ok(items)
                }
            })
        })
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn closed_loop_counts_items_and_errors_and_respects_the_op_bound() {
        let count = Arc::new(AtomicU64::new(0));
        let shape =
            Shape { clients: 4, rate: None, warm_up: Duration::ZERO, duration: Duration::from_secs(10), max_ops: 200 };
        let m = run("test", shape, counting_op(count.clone(), 100)).await;
        assert_eq!(m.ops + m.errors.values().sum::<u64>(), 200, "bounded by max_ops: {m:?}");
        assert_eq!(m.items, m.ops * 100);
        assert_eq!(m.errors.get("Unavailable").copied().unwrap_or(0), 20, "{m:?}");
        assert!(m.p50_us >= 1000, "each op sleeps 1 ms: {m:?}");
        assert_eq!(count.load(Ordering::Relaxed), 200);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn open_loop_starts_operations_on_schedule() {
        let count = Arc::new(AtomicU64::new(0));
        let shape = Shape {
            clients: 16,
            rate: Some(200),
            warm_up: Duration::ZERO,
            duration: Duration::from_millis(500),
            max_ops: 1_000_000,
        };
        let m = run("test", shape, counting_op(count.clone(), 1)).await;
        // 200/s for 0.5 s: the schedule has 100 slots, whatever the operations take.
        assert_eq!(count.load(Ordering::Relaxed) + m.shed, 100, "{m:?}");
    }
}

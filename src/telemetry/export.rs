//! Export that never holds up a request. Finished spans go to the SDK's batch processor, whose
//! thread posts them to the collector; [`BoundedProcessor`] keeps no more spans waiting than the
//! processor's queue holds, so a span that would not fit is dropped here, where it can be
//! counted, rather than silently inside the SDK. [`WatchedExporter`] sees each export's outcome:
//! spans a collector did not take are counted as dropped, and a collector going away (or coming
//! back) is logged once per change, not once per export.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::Context;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{Span, SpanData, SpanExporter, SpanProcessor};
use opentelemetry_sdk::Resource;

/// Why spans were not exported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was full (the collector is slow or away).
    QueueFull,
    /// The collector refused them or could not be reached.
    ExportFailed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::ExportFailed => "export_failed",
        }
    }
}

/// Hears how many spans were exported and dropped (the server counts them in Prometheus).
pub trait ExportReport: Send + Sync + 'static {
    fn exported(&self, spans: u64);
    fn dropped(&self, reason: DropReason, spans: u64);
}

/// The batch processor's queue size: `OTEL_BSP_MAX_QUEUE_SIZE`, as the SDK reads it.
pub fn queue_capacity() -> usize {
    std::env::var("OTEL_BSP_MAX_QUEUE_SIZE")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(opentelemetry_sdk::trace::OTEL_BSP_MAX_QUEUE_SIZE_DEFAULT)
}

/// A change in whether the collector takes spans, reported once.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    /// Exports began to fail.
    Failing(String),
    /// An export succeeded after failures.
    Recovered,
}

/// What processor and exporter share: spans in flight, and whether exports fail.
pub struct ExportLedger {
    capacity: usize,
    /// Spans handed to the batch processor whose export has not ended yet.
    pending: AtomicUsize,
    failing: AtomicBool,
    told_queue_full: AtomicBool,
    report: Arc<dyn ExportReport>,
}

impl fmt::Debug for ExportLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExportLedger")
            .field("capacity", &self.capacity)
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .field("failing", &self.failing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl ExportLedger {
    pub fn new(capacity: usize, report: Arc<dyn ExportReport>) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            pending: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            told_queue_full: AtomicBool::new(false),
            report,
        })
    }

    /// Takes a place for one more span, if the queue has one.
    fn try_enqueue(&self) -> bool {
        self.pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.capacity).then_some(n + 1))
            .is_ok()
    }

    fn queue_full(&self) {
        self.report.dropped(DropReason::QueueFull, 1);
        if !self.told_queue_full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                capacity = self.capacity,
                "the trace export queue is full: spans are dropped (counted in \
                 cycleserve_otlp_spans_dropped_total) until the collector catches up"
            );
        }
    }

    /// Settles an export of `spans` spans; returns the change in the collector's state, if any.
    pub fn settle(&self, spans: usize, result: &OTelSdkResult) -> Option<Change> {
        self.pending.fetch_sub(spans, Ordering::AcqRel);
        match result {
            Ok(()) => {
                self.report.exported(spans as u64);
                self.failing.swap(false, Ordering::AcqRel).then_some(Change::Recovered)
            }
            Err(err) => {
                self.report.dropped(DropReason::ExportFailed, spans as u64);
                (!self.failing.swap(true, Ordering::AcqRel)).then(|| Change::Failing(err.to_string()))
            }
        }
    }
}

/// A span exporter that settles each export with the [`ExportLedger`] and logs when the
/// collector stops or starts taking spans.
pub struct WatchedExporter<E> {
    inner: E,
    ledger: Arc<ExportLedger>,
    /// Where the spans go, for the log.
    endpoint: String,
}

impl<E> WatchedExporter<E> {
    pub fn new(inner: E, ledger: Arc<ExportLedger>, endpoint: String) -> Self {
        Self { inner, ledger, endpoint }
    }
}

impl<E: fmt::Debug> fmt::Debug for WatchedExporter<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WatchedExporter").field("inner", &self.inner).field("ledger", &self.ledger).finish()
    }
}

impl<E: SpanExporter> SpanExporter for WatchedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len();
        let result = self.inner.export(batch).await;
        match self.ledger.settle(spans, &result) {
            Some(Change::Failing(error)) => tracing::warn!(
                endpoint = self.endpoint,
                %error,
                "cannot export traces: spans are dropped (counted in \
                 cycleserve_otlp_spans_dropped_total) until the collector takes them again"
            ),
            Some(Change::Recovered) => tracing::info!(endpoint = self.endpoint, "trace export works again"),
            None => {}
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

/// A span processor that hands `inner` (the batch processor) no more spans than its queue
/// holds, and counts the rest as dropped.
#[derive(Debug)]
pub struct BoundedProcessor<P> {
    inner: P,
    ledger: Arc<ExportLedger>,
}

impl<P> BoundedProcessor<P> {
    pub fn new(inner: P, ledger: Arc<ExportLedger>) -> Self {
        Self { inner, ledger }
    }
}

impl<P: SpanProcessor> SpanProcessor for BoundedProcessor<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.inner.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        if self.ledger.try_enqueue() {
            self.inner.on_end(span);
        } else {
            self.ledger.queue_full();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkError;
    use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

    use super::*;

    #[derive(Default)]
    struct Counts {
        exported: AtomicU64,
        queue_full: AtomicU64,
        failed: AtomicU64,
    }

    impl ExportReport for Counts {
        fn exported(&self, spans: u64) {
            self.exported.fetch_add(spans, Ordering::SeqCst);
        }

        fn dropped(&self, reason: DropReason, spans: u64) {
            let counter = match reason {
                DropReason::QueueFull => &self.queue_full,
                DropReason::ExportFailed => &self.failed,
            };
            counter.fetch_add(spans, Ordering::SeqCst);
        }
    }

    impl Counts {
        fn get(&self) -> (u64, u64, u64) {
            let load = |c: &AtomicU64| c.load(Ordering::SeqCst);
            (load(&self.exported), load(&self.queue_full), load(&self.failed))
        }
    }

    /// Blocks each export while the test holds `gate`; fails while `fail` is set.
    #[derive(Debug, Default, Clone)]
    struct Collector {
        gate: Arc<Mutex<()>>,
        fail: Arc<AtomicBool>,
    }

    impl SpanExporter for Collector {
        async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
            drop(self.gate.lock().unwrap());
            if self.fail.load(Ordering::SeqCst) {
                Err(OTelSdkError::InternalFailure("connection refused".into()))
            } else {
                Ok(())
            }
        }
    }

    /// The server's pipeline around `collector`, with a queue of `capacity` and no timed exports.
    fn pipeline(collector: &Collector, capacity: usize) -> (SdkTracerProvider, Arc<Counts>) {
        let counts = Arc::new(Counts::default());
        let ledger = ExportLedger::new(capacity, Arc::clone(&counts) as Arc<dyn ExportReport>);
        let config = BatchConfigBuilder::default()
            .with_max_queue_size(capacity)
            .with_scheduled_delay(Duration::from_secs(3600))
            .build();
        let exporter = WatchedExporter::new(collector.clone(), Arc::clone(&ledger), "test".into());
        let processor = BoundedProcessor::new(BatchSpanProcessor::new(exporter, config), ledger);
        (SdkTracerProvider::builder().with_span_processor(processor).build(), counts)
    }

    fn finish_spans(provider: &SdkTracerProvider, n: usize) {
        let tracer = provider.tracer("test");
        for _ in 0..n {
            tracer.start("span").end();
        }
    }

    #[test]
    fn spans_beyond_the_queue_are_dropped_and_counted_and_the_queue_frees_up_after_export() {
        let collector = Collector::default();
        let (provider, counts) = pipeline(&collector, 2);
        let held = collector.gate.lock().unwrap();
        // Two fill the queue (their export, if it started, is held); the third does not fit.
        finish_spans(&provider, 3);
        assert_eq!(counts.get(), (0, 1, 0));
        drop(held);
        provider.force_flush().unwrap();
        assert_eq!(counts.get(), (2, 1, 0), "both queued spans exported");
        finish_spans(&provider, 2);
        provider.force_flush().unwrap();
        assert_eq!(counts.get(), (4, 1, 0), "room again once exported");
        provider.shutdown().unwrap();
    }

    #[test]
    fn failed_exports_count_their_spans_and_free_their_places() {
        let collector = Collector::default();
        collector.fail.store(true, Ordering::SeqCst);
        let (provider, counts) = pipeline(&collector, 2);
        for round in 1..=3 {
            finish_spans(&provider, 2);
            let _ = provider.force_flush();
            assert_eq!(counts.get(), (0, 0, 2 * round), "round {round}: no queue-full drops");
        }
        collector.fail.store(false, Ordering::SeqCst);
        finish_spans(&provider, 1);
        provider.force_flush().unwrap();
        assert_eq!(counts.get(), (1, 0, 6));
        provider.shutdown().unwrap();
    }

    #[test]
    fn a_collector_going_away_and_coming_back_is_told_once_each() {
        let ledger = ExportLedger::new(8, Arc::new(Counts::default()));
        let failure = || Err(OTelSdkError::InternalFailure("connection refused".into()));
        for _ in 0..4 {
            assert!(ledger.try_enqueue());
        }
        assert_eq!(ledger.settle(1, &Ok(())), None);
        assert!(matches!(ledger.settle(1, &failure()), Some(Change::Failing(e)) if e.contains("refused")));
        assert_eq!(ledger.settle(1, &failure()), None, "still down: nothing new to say");
        assert_eq!(ledger.settle(1, &Ok(())), Some(Change::Recovered));
        assert_eq!(ledger.pending.load(Ordering::SeqCst), 0);
    }
}

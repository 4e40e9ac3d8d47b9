//! What the operator sees while a run trains: a progress bar on a terminal (drawn by the logging
//! layer, so that log lines never tear it), or a log line every half minute otherwise.

use std::time::{Duration, Instant};

use indicatif::ProgressStyle;
use tracing_indicatif::span_ext::IndicatifSpanExt;

use super::loss_log::LossRecord;
use crate::logging::ProgressOutput;

/// Time between two progress lines when there is no bar.
const LINE_INTERVAL: Duration = Duration::from_secs(30);

pub struct ProgressReport {
    last_step: u64,
    total_epochs: usize,
    view: View,
}

enum View {
    /// The span that owns the bar; dropping it removes the bar.
    Bar(tracing::Span),
    Lines {
        previous: Option<LineMark>,
    },
}

/// When the previous progress line was written, and at which step.
#[derive(Clone, Copy)]
struct LineMark {
    at: Instant,
    step: u64,
}

impl ProgressReport {
    /// Progress towards `last_step`, `done` steps of which are already behind.
    pub fn start(output: ProgressOutput, done: u64, last_step: u64, total_epochs: usize) -> Self {
        let view = match output {
            ProgressOutput::Bars => {
                let span = tracing::info_span!("training", indicatif.pb_show = tracing::field::Empty);
                let style = ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
                )
                .expect("valid progress template")
                .progress_chars("=> ");
                span.pb_set_style(&style);
                span.pb_set_length(last_step);
                span.pb_set_position(done);
                span.pb_start();
                span.pb_reset_eta();
                View::Bar(span)
            }
            ProgressOutput::LogLines => View::Lines { previous: None },
        };
        Self { last_step, total_epochs, view }
    }

    pub fn update(&mut self, record: &LossRecord) {
        let (epoch, losses) = (record.epoch + 1, &record.losses);
        match &mut self.view {
            View::Bar(span) => {
                span.pb_set_position(record.step);
                span.pb_set_message(&format!(
                    "epoch {epoch}/{} G {:.3} cyc {:.3}/{:.3} D {:.3}/{:.3}",
                    self.total_epochs, losses.g_total, losses.cycle_x, losses.cycle_y, losses.d_x, losses.d_y
                ));
            }
            View::Lines { previous } => {
                let now = Instant::now();
                if previous.is_some_and(|p| now - p.at < LINE_INTERVAL) {
                    return;
                }
                // Over the time since the previous line; none yet on the first.
                let steps_per_second = previous
                    .map(|p| format!("{:.3}", (record.step - p.step) as f64 / (now - p.at).as_secs_f64()))
                    .unwrap_or_else(|| "-".to_string());
                tracing::info!(
                    step = record.step,
                    of = self.last_step,
                    epoch,
                    epochs = self.total_epochs,
                    g_total = %format_args!("{:.3}", losses.g_total),
                    cycle_x = %format_args!("{:.3}", losses.cycle_x),
                    cycle_y = %format_args!("{:.3}", losses.cycle_y),
                    d_x = %format_args!("{:.3}", losses.d_x),
                    d_y = %format_args!("{:.3}", losses.d_y),
                    steps_per_second = %steps_per_second,
                    "progress"
                );
                *previous = Some(LineMark { at: now, step: record.step });
            }
        }
    }
}

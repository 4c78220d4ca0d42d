//! The charts' data: samples taken every few seconds into a ring buffer
//! covering the last hour, and their inline SVG.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use maud::{html, Markup};
use serde::Serialize;

use super::Ui;

/// What the charts cover.
pub(super) const WINDOW: Duration = Duration::from_secs(3600);

/// One sample.
#[derive(Debug, Clone, Copy, Serialize)]
pub(super) struct Sample {
    /// Seconds since the Unix epoch.
    pub(super) at: f64,
    /// Jobs ready, scheduled or running, all queues.
    pub(super) depth: u64,
    /// Jobs finished (completed or dead) per minute since the previous
    /// sample (`None`: first sample, or no statistics).
    pub(super) finished_per_minute: Option<f64>,
    /// Unacked messages over every durable group.
    pub(super) group_lag: u64,
    /// The jobs table's cumulative deletions, to diff the next sample with.
    #[serde(skip)]
    finished_total: Option<u64>,
}

/// The last hour of samples, oldest first.
pub(super) struct History {
    samples: VecDeque<Sample>,
    capacity: usize,
}

/// Samples an hour holds at `every`.
pub(super) fn capacity(every: Duration) -> usize {
    let every = every.as_secs_f64().max(1.0);
    ((WINDOW.as_secs_f64() / every).ceil() as usize + 1).min(3601)
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl History {
    pub(super) fn new(capacity: usize) -> Self {
        History {
            samples: VecDeque::with_capacity(capacity),
            capacity: capacity.max(2),
        }
    }

    fn push(&mut self, mut s: Sample) {
        if let (Some(prev), Some(now)) = (self.samples.back(), s.finished_total) {
            if let Some(before) = prev.finished_total {
                let dt = s.at - prev.at;
                // A statistics reset makes the total go down: no rate then.
                if dt > 0.0 && now >= before {
                    s.finished_per_minute = Some((now - before) as f64 * 60.0 / dt);
                }
            }
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub(super) fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

/// Takes a sample every `sample_every` while the router lives.
pub(super) async fn sample(ui: Weak<Ui>) {
    let every = match ui.upgrade() {
        Some(ui) => ui.opts.sample_every,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(ui) = ui.upgrade() else { return };
        if ui.admin.pubsub().is_shut_down() {
            return;
        }
        match take(&ui).await {
            Ok(s) => ui.history.lock().unwrap_or_else(|e| e.into_inner()).push(s),
            Err(e) => tracing::debug!(%e, "pg-pubsub ui: sampling failed"),
        }
    }
}

async fn take(ui: &Ui) -> crate::Result<Sample> {
    let depth = ui
        .admin
        .queues()
        .await?
        .iter()
        .map(|q| q.ready + q.scheduled + q.running)
        .sum();
    let finished_total = ui.admin.jobs_finished_total().await?;
    let group_lag = ui
        .admin
        .durable_channels()
        .await?
        .iter()
        .flat_map(|c| c.groups.iter())
        .map(|g| g.lag_messages)
        .sum();
    Ok(Sample {
        at: epoch_secs(SystemTime::now()),
        depth,
        finished_per_minute: None,
        group_lag,
        finished_total,
    })
}

const W: f64 = 320.0;
const H: f64 = 80.0;

/// An SVG line chart of `points` (epoch seconds, value) over the last
/// hour ending `now`.
pub(super) fn chart(title: &str, points: &[(f64, f64)], now: f64) -> Markup {
    let max = points.iter().map(|p| p.1).fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let window = WINDOW.as_secs_f64();
    let mut line = String::new();
    for (at, v) in points {
        let x = ((at - (now - window)) / window).clamp(0.0, 1.0) * W;
        let y = H - (v / top) * (H - 4.0) - 2.0;
        let _ = write!(line, "{x:.1},{y:.1} ");
    }
    let last = points.last().map(|p| p.1);
    html! {
        figure.chart {
            figcaption {
                (title) ": "
                @match last {
                    Some(v) => strong { (fmt_num(v)) },
                    None => em { "no samples yet" },
                }
                " (max " (fmt_num(max)) ", last hour)"
            }
            svg xmlns="http://www.w3.org/2000/svg" width=(W) height=(H)
                viewBox={ "0 0 " (W) " " (H) } role="img" aria-label=(title) {
                rect x="0" y="0" width=(W) height=(H) fill="#f6f8fa" {}
                @if points.len() > 1 {
                    polyline points=(line.trim_end()) fill="none" stroke="#2f6fbd" stroke-width="1.5" {}
                } @else if let Some((at, v)) = points.first() {
                    circle cx=(((at - (now - window)) / window).clamp(0.0, 1.0) * W)
                        cy=(H - (v / top) * (H - 4.0) - 2.0) r="2" fill="#2f6fbd" {}
                }
            }
        }
    }
}

/// `12`, `3.5`: whole numbers without decimals.
fn fmt_num(v: f64) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The three charts of the overview page.
pub(super) fn charts(samples: &[Sample]) -> Markup {
    let now = epoch_secs(SystemTime::now());
    let recent: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at >= now - WINDOW.as_secs_f64())
        .collect();
    let depth: Vec<(f64, f64)> = recent.iter().map(|s| (s.at, s.depth as f64)).collect();
    let rate: Vec<(f64, f64)> = recent
        .iter()
        .filter_map(|s| s.finished_per_minute.map(|r| (s.at, r)))
        .collect();
    let lag: Vec<(f64, f64)> = recent.iter().map(|s| (s.at, s.group_lag as f64)).collect();
    html! {
        div.charts {
            (chart("Queue depth (jobs ready, scheduled or running)", &depth, now))
            (chart("Jobs finished per minute", &rate, now))
            (chart("Durable group lag (unacked messages)", &lag, now))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at: f64, total: Option<u64>) -> Sample {
        Sample {
            at,
            depth: 1,
            finished_per_minute: None,
            group_lag: 0,
            finished_total: total,
        }
    }

    #[test]
    fn ring_is_bounded_and_rates_are_per_minute() {
        let mut h = History::new(3);
        h.push(s(0.0, Some(10)));
        h.push(s(30.0, Some(20)));
        h.push(s(60.0, Some(5))); // statistics reset
        h.push(s(90.0, Some(35)));
        let v = h.samples();
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].finished_per_minute, Some(20.0));
        assert_eq!(v[1].finished_per_minute, None);
        assert_eq!(v[2].finished_per_minute, Some(60.0));
        assert_eq!(capacity(Duration::from_secs(10)), 361);
    }

    #[test]
    fn chart_escapes_its_title() {
        let svg = chart("<script>", &[(0.0, 1.0), (10.0, 2.0)], 20.0).into_string();
        assert!(svg.contains("&lt;script&gt;"));
        assert!(!svg.contains("<script>"));
    }
}

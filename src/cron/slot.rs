//! When a schedule's slots fall, and which of them to fire after a pause of
//! the schedulers. Pure: no server, no clock; the unit tests pin the DST
//! rules.
//!
//! * A cron expression is read in its time zone by `croner`: a fixed time
//!   in a spring-forward gap fires once, at the first valid time after the
//!   gap; a fixed time in a fall-back overlap fires once, at its first
//!   occurrence; wildcard fields (`*`, `*/N`) fire for each real match.
//! * A fixed interval counts from the Unix epoch (`k * every`), so every
//!   process agrees on the slots without reading each other's clocks.

use std::time::Duration;

use croner::parser::{CronParser, Seconds};
use croner::Cron;
use jiff::tz::TimeZone;
use jiff::Timestamp;

use crate::error::{Error, Origin, Result};

/// The most slots one catch-up fires under [`CatchUp::All`](super::CatchUp::All).
pub(crate) const MAX_CATCH_UP: usize = 1000;

/// A parsed schedule rule in its time zone.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    rule: Rule,
    tz: TimeZone,
}

#[derive(Debug, Clone)]
enum Rule {
    Cron(Box<Cron>),
    /// Microseconds, at least one.
    Every(i64),
}

/// How the missed slots of a schedule are fired (see `plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Policy {
    Skip,
    Once,
    All,
}

/// What a scheduler does with one due schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The slots to fire now, oldest first.
    pub fire: Vec<Timestamp>,
    /// The next slot after `now` (None: the rule never fires again).
    pub next: Option<Timestamp>,
}

/// Parses a cron expression (5 fields, or 6 with seconds first).
pub(crate) fn parse_cron(expr: &str) -> Result<Cron> {
    CronParser::builder()
        .seconds(Seconds::Optional)
        .build()
        .parse(expr)
        .map_err(|e| {
            Error::new(
                Origin::Config,
                format!("invalid cron expression {expr:?}: {e}"),
            )
        })
}

/// Looks a time zone up in the bundled tz database (`UTC` and IANA names).
pub(crate) fn parse_tz(name: &str) -> Result<TimeZone> {
    TimeZone::get(name).map_err(|e| {
        Error::new(Origin::Config, format!("unknown time zone {name:?}")).with_source(e)
    })
}

/// An interval in whole microseconds, at least one.
pub(crate) fn every_micros(every: Duration) -> Result<i64> {
    match i64::try_from(every.as_micros()) {
        Ok(us) if us >= 1 => Ok(us),
        _ => Err(Error::new(
            Origin::Config,
            "an interval must be at least one microsecond (and fit 292,000 years)",
        )),
    }
}

impl Spec {
    /// A cron rule.
    pub(crate) fn cron(expr: &str, tz: &str) -> Result<Spec> {
        Ok(Spec {
            rule: Rule::Cron(Box::new(parse_cron(expr)?)),
            tz: parse_tz(tz)?,
        })
    }

    /// A fixed interval, in microseconds.
    pub(crate) fn every(micros: i64, tz: &str) -> Result<Spec> {
        if micros < 1 {
            return Err(Error::new(Origin::Config, "an interval must be positive"));
        }
        Ok(Spec {
            rule: Rule::Every(micros),
            tz: parse_tz(tz)?,
        })
    }

    /// The first slot strictly after `t`.
    pub(crate) fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        match &self.rule {
            Rule::Every(us) => {
                let k = t.as_microsecond().div_euclid(*us).checked_add(1)?;
                Timestamp::from_microsecond(k.checked_mul(*us)?).ok()
            }
            Rule::Cron(cron) => cron
                .find_next_occurrence(&t.to_zoned(self.tz.clone()), false)
                .ok()
                .map(|z| z.timestamp()),
        }
    }

    /// The last slot at or before `t`.
    pub(crate) fn at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        self.before(t, true)
    }

    fn before(&self, t: Timestamp, inclusive: bool) -> Option<Timestamp> {
        match &self.rule {
            Rule::Every(us) => {
                let us_t = t.as_microsecond();
                let mut k = us_t.div_euclid(*us);
                if !inclusive && k * us == us_t {
                    k -= 1;
                }
                Timestamp::from_microsecond(k.checked_mul(*us)?).ok()
            }
            Rule::Cron(cron) => cron
                .find_previous_occurrence(&t.to_zoned(self.tz.clone()), inclusive)
                .ok()
                .map(|z| z.timestamp()),
        }
    }

    /// Which slots to fire at `now` when the earliest unfired one is `due`
    /// (`due <= now`; a slot is missed when a later one is due as well):
    /// * `Skip`: the due slot if it is the only one (a late slot still
    ///   fires once, e.g. while schedulers change hands), none if several
    ///   are due (the schedulers were away for longer than a period);
    /// * `Once`: the latest due slot, however many were missed;
    /// * `All`: each due slot, the latest [`MAX_CATCH_UP`] of them.
    ///
    /// Then the next slot is the first after `now`.
    pub(crate) fn plan(&self, due: Timestamp, now: Timestamp, policy: Policy) -> Plan {
        let next = self.next_after(now);
        let latest = match self.at_or_before(now) {
            Some(l) if l >= due && due <= now => l,
            _ => {
                return Plan {
                    fire: Vec::new(),
                    next: if due > now { Some(due) } else { next },
                }
            }
        };
        let several = self.before(latest, false).is_some_and(|p| p >= due);
        let fire = match policy {
            Policy::Skip if several => Vec::new(),
            Policy::Skip | Policy::Once => vec![latest],
            Policy::All => {
                let mut slots = vec![latest];
                while slots.len() < MAX_CATCH_UP {
                    match self.before(slots[slots.len() - 1], false) {
                        Some(p) if p >= due => slots.push(p),
                        _ => break,
                    }
                }
                slots.reverse();
                slots
            }
        };
        Plan { fire, next }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tz: &str, civil: &str) -> Timestamp {
        civil
            .parse::<jiff::civil::DateTime>()
            .expect("civil")
            .to_zoned(TimeZone::get(tz).expect("tz"))
            .expect("zoned")
            .timestamp()
    }

    fn local(tz: &str, t: Timestamp) -> String {
        t.to_zoned(TimeZone::get(tz).expect("tz"))
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    }

    /// Every slot of `spec` from `from` (exclusive) to `to` (inclusive), local.
    fn slots(spec: &Spec, tz: &str, from: Timestamp, to: Timestamp) -> Vec<String> {
        let mut out = Vec::new();
        let mut t = from;
        while let Some(n) = spec.next_after(t) {
            if n > to {
                break;
            }
            out.push(local(tz, n));
            t = n;
        }
        out
    }

    #[test]
    fn a_daily_0230_runs_once_on_spring_forward_day_after_the_gap() {
        for (tz, day, after_gap) in [
            ("Europe/Berlin", "2026-03-29", "2026-03-29T03:00:00+02:00"),
            (
                "America/New_York",
                "2026-03-08",
                "2026-03-08T03:00:00-04:00",
            ),
        ] {
            let spec = Spec::cron("30 2 * * *", tz).expect("spec");
            let from = at(tz, &format!("{day}T00:00:00")) - jiff::SignedDuration::from_hours(24);
            let to = from + jiff::SignedDuration::from_hours(72);
            let got = slots(&spec, tz, from, to);
            assert_eq!(got.len(), 3, "{tz}: {got:?}");
            assert!(got[0].ends_with("02:30:00+01:00") || got[0].ends_with("02:30:00-05:00"));
            assert_eq!(got[1], after_gap, "{tz}: {got:?}");
            assert!(got[2].contains("T02:30:00"), "{tz}: {got:?}");
        }
    }

    #[test]
    fn a_daily_0230_runs_once_on_fall_back_day_at_the_first_0230() {
        for (tz, day, first) in [
            ("Europe/Berlin", "2026-10-25", "2026-10-25T02:30:00+02:00"),
            (
                "America/New_York",
                "2026-11-01",
                "2026-11-01T01:30:00-04:00",
            ),
        ] {
            // New York repeats 01:00-02:00, so its repeated slot is 01:30.
            let expr = if tz == "Europe/Berlin" {
                "30 2 * * *"
            } else {
                "30 1 * * *"
            };
            let spec = Spec::cron(expr, tz).expect("spec");
            let start = at(tz, &format!("{day}T00:00:00"));
            let end = start + jiff::SignedDuration::from_hours(25);
            let got = slots(&spec, tz, start, end);
            assert_eq!(got, vec![first.to_owned()], "{tz}");
            // From inside the repeated hour, the next is the next day's.
            let first_ts: Timestamp = first.parse().expect("ts");
            let later = spec.next_after(first_ts).expect("next");
            assert!(
                later.duration_since(first_ts) > jiff::SignedDuration::from_hours(23),
                "{tz}"
            );
        }
    }

    #[test]
    fn wildcard_hours_fire_for_each_real_time() {
        // Hourly at :30 on Berlin's fall-back day: 25 real hours, 25 slots;
        // on spring-forward day, 23.
        let tz = "Europe/Berlin";
        let spec = Spec::cron("30 * * * *", tz).expect("spec");
        let fall = at(tz, "2026-10-25T00:00:00");
        let n = slots(&spec, tz, fall, at(tz, "2026-10-26T00:00:00")).len();
        assert_eq!(n, 25);
        let spring = at(tz, "2026-03-29T00:00:00");
        let n = slots(&spec, tz, spring, at(tz, "2026-03-30T00:00:00")).len();
        assert_eq!(n, 23);
    }

    #[test]
    fn intervals_count_from_the_epoch() {
        let spec = Spec::every(1_000_000, "UTC").expect("spec");
        let t = Timestamp::from_microsecond(10_500_000).expect("ts");
        assert_eq!(
            spec.next_after(t).map(|t| t.as_microsecond()),
            Some(11_000_000)
        );
        let t = Timestamp::from_microsecond(11_000_000).expect("ts");
        assert_eq!(
            spec.next_after(t).map(|t| t.as_microsecond()),
            Some(12_000_000)
        );
        assert_eq!(
            spec.at_or_before(t).map(|t| t.as_microsecond()),
            Some(11_000_000)
        );
        assert_eq!(
            spec.before(t, false).map(|t| t.as_microsecond()),
            Some(10_000_000)
        );
    }

    #[test]
    fn catch_up_policies() {
        let s = |us: i64| Timestamp::from_microsecond(us * 1_000_000).expect("ts");
        let spec = Spec::every(1_000_000, "UTC").expect("spec");
        // One slot due, a little late: every policy fires it once.
        for p in [Policy::Skip, Policy::Once, Policy::All] {
            let plan = spec.plan(s(10), s(10) + jiff::SignedDuration::from_millis(300), p);
            assert_eq!(plan.fire, vec![s(10)], "{p:?}");
            assert_eq!(plan.next, Some(s(11)));
        }
        // Slots 10..=20 due (an outage of ten periods).
        let now = s(20) + jiff::SignedDuration::from_millis(300);
        let skip = spec.plan(s(10), now, Policy::Skip);
        assert_eq!((skip.fire.len(), skip.next), (0, Some(s(21))));
        let once = spec.plan(s(10), now, Policy::Once);
        assert_eq!((once.fire, once.next), (vec![s(20)], Some(s(21))));
        let all = spec.plan(s(10), now, Policy::All);
        assert_eq!(all.fire, (10..=20).map(s).collect::<Vec<_>>());
        // Bounded.
        let all = spec.plan(s(0), s(5000), Policy::All);
        assert_eq!(all.fire.len(), MAX_CATCH_UP);
        assert_eq!(all.fire.last(), Some(&s(5000)));
        // Nothing due yet.
        let none = spec.plan(s(30), s(20), Policy::All);
        assert_eq!((none.fire.len(), none.next), (0, Some(s(30))));
    }

    #[test]
    fn cron_catch_up_in_a_zone() {
        let tz = "Europe/Berlin";
        let spec = Spec::cron("0 2 * * *", tz).expect("spec");
        let due = at(tz, "2026-06-01T02:00:00");
        // Back seven hours later: the one slot fires, late.
        let plan = spec.plan(due, at(tz, "2026-06-01T09:00:00"), Policy::Skip);
        assert_eq!(plan.fire, vec![due]);
        assert_eq!(plan.next, Some(at(tz, "2026-06-02T02:00:00")));
        // Back three days later.
        let now = at(tz, "2026-06-04T09:00:00");
        assert!(spec.plan(due, now, Policy::Skip).fire.is_empty());
        assert_eq!(
            spec.plan(due, now, Policy::Once).fire,
            vec![at(tz, "2026-06-04T02:00:00")]
        );
        assert_eq!(spec.plan(due, now, Policy::All).fire.len(), 4);
    }

    #[test]
    fn bad_rules_are_config_errors() {
        assert!(Spec::cron("61 * * * *", "UTC").is_err());
        assert!(Spec::cron("* * * * *", "Mars/Olympus").is_err());
        assert!(Spec::cron("*/5 * * * * *", "UTC").is_ok());
        assert!(every_micros(Duration::ZERO).is_err());
        assert!(Spec::every(0, "UTC").is_err());
    }
}

//! A durable reader's decisions, without I/O: where the next read starts,
//! whether it ticks first, whether the rest of a batch is streamed by range
//! scans, and how long to wait when nothing came. The reader does the
//! reading and reports each outcome here.
//!
//! Not here: skipping runs of empty batches, which `read()` does on the
//! server (`next_batch` bisects over the ticks).

use std::time::Duration;

use super::position::Position;
use super::store::Range;

/// Pages a consumer reads with one statement while streaming a batch.
pub(super) const STREAM_PAGES: usize = 8;

/// What the plan needs of a batch's range-scan bounds: which batch they are.
pub(super) trait Bounds {
    fn tick(&self) -> i64;
}

impl Bounds for Range {
    fn tick(&self) -> i64 {
        self.tick
    }
}

/// The next read, once the cursor is known.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Step<R> {
    /// One page through `read()` from `from`, after a tick (one pipelined
    /// round trip) unless draining.
    Read { tick: bool, from: Position },
    /// Up to [`STREAM_PAGES`] pages of batch `range` after `at` by a plain
    /// range scan, after a tick unless draining.
    Stream { tick: bool, range: R, at: Position },
}

/// How a page read through `read()` ended.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct PageEnd {
    /// Read again at once: the page had rows, so more (of this batch or
    /// of later ones) may be waiting.
    pub(super) more: bool,
    /// The page was full: look up whether the rest of its batch after this
    /// position is one range scan (then [`ReadPlan::set_range`]).
    pub(super) find_range: Option<Position>,
}

/// One consumer's read state. `R`: a batch's range-scan bounds.
pub(super) struct ReadPlan<R> {
    batch_size: usize,
    poll_interval: Duration,
    max_poll_interval: Duration,
    /// Where the next read starts; None: reload the group's cursor.
    cursor: Option<Position>,
    /// The last read had rows: read on without ticking (the known ticks
    /// may not be exhausted yet).
    draining: bool,
    /// Set while draining a batch that plain range scans can read.
    range: Option<R>,
    /// A tick whose batch was read to its end (a short page): the next
    /// read starts at the following tick instead of looking for more of it.
    finished_tick: Option<i64>,
    /// The leadership term the cursor belongs to: a new term (the lock
    /// was lost and won back) reloads the group's cursor.
    term: Option<u64>,
    /// The wait before the next look without a wake-up (backs off).
    idle: Duration,
    /// The channel's latest tick when this consumer last ticked: a short
    /// page of that batch is the end of everything ticked then, so the
    /// consumer waits for its next wake-up (or poll) instead of reading
    /// again to find nothing. A batch ticked later by another group's
    /// consumer holds messages whose wake-up (sent after their commit,
    /// so after our tick's snapshot missed them) is still to come or
    /// already kept for the reader: nothing waits a poll interval.
    latest: Option<i64>,
}

impl<R: Bounds> ReadPlan<R> {
    pub(super) fn new(
        batch_size: usize,
        poll_interval: Duration,
        max_poll_interval: Duration,
    ) -> Self {
        ReadPlan {
            batch_size,
            poll_interval,
            max_poll_interval,
            cursor: None,
            draining: false,
            range: None,
            finished_tick: None,
            term: None,
            idle: poll_interval,
            latest: None,
        }
    }

    pub(super) fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Rows one streamed statement reads at most.
    pub(super) fn stream_limit(&self) -> usize {
        self.batch_size.saturating_mul(STREAM_PAGES)
    }

    /// The current leadership term (`None`: not leading); true when
    /// leading. Standing by, or a new term, forgets the cursor: another
    /// consumer may have moved the group meanwhile.
    pub(super) fn lead(&mut self, term: Option<u64>) -> bool {
        if term.is_none() || term != self.term {
            self.cursor = None;
        }
        self.term = term;
        term.is_some()
    }

    /// Retention ran; when it expired messages, tick before the next read:
    /// the tick takes (and reports) what this group lost.
    pub(super) fn retained(&mut self, expired: bool) {
        self.draining &= !expired;
    }

    /// Where the next read starts; `None`: load the group's cursor first
    /// (then [`loaded`](Self::loaded)).
    pub(super) fn cursor(&self) -> Option<Position> {
        self.cursor
    }

    /// The group's cursor, loaded: the batch state starts afresh. The
    /// latest tick is forgotten too: batches ticked while this consumer
    /// stood by (their wake-ups ignored) are read on until a read finds
    /// nothing.
    pub(super) fn loaded(&mut self, at: Position) {
        self.range = None;
        self.finished_tick = None;
        self.latest = None;
        self.cursor = Some(at);
    }

    /// The next read from the cursor `at`.
    pub(super) fn step(&mut self, at: Position) -> Step<R> {
        let tick = !self.draining;
        match self.range.take().filter(|r| r.tick() == at.tick) {
            Some(range) => Step::Stream { tick, range, at },
            // Batches never change once ticked: after the end of one, read
            // the next (ticks of a channel are numbered without holes)
            // rather than have `read` look for more of it first, which
            // halves its work.
            None => Step::Read {
                tick,
                from: match self.finished_tick {
                    Some(t) if t == at.tick => Position::start_of_tick(t + 1),
                    _ => at,
                },
            },
        }
    }

    /// A tick said the channel's latest tick is `latest`.
    pub(super) fn ticked(&mut self, latest: i64) {
        self.latest = Some(latest);
    }

    /// A page of `rows` rows came from `read()`, the last at `last`.
    pub(super) fn page_read(&mut self, rows: usize, last: Option<Position>) -> PageEnd {
        let full = rows == self.batch_size;
        if let Some(last) = last {
            // `read` returns one batch at most: a short page ends it.
            self.finished_tick = (!full).then_some(last.tick);
            self.cursor = Some(last);
        }
        // A short page may still be followed by more ticked batches (a
        // group catching up on many small transactions): read on until a
        // read finds nothing instead of waiting a poll interval per batch,
        // unless the page ended the latest batch we know of (see `latest`).
        let before_latest = |p: Position| self.latest.is_none_or(|l| p.tick < l);
        PageEnd {
            more: full || last.is_some_and(before_latest),
            find_range: last.filter(|_| full),
        }
    }

    /// The answer to [`PageEnd::find_range`].
    pub(super) fn set_range(&mut self, range: Option<R>) {
        self.range = range;
    }

    /// A streamed read of `range` returned `read` rows, the last at `last`;
    /// true when it read the most it could (more may follow: stream on).
    pub(super) fn streamed(&mut self, range: R, read: usize, last: Option<Position>) -> bool {
        if let Some(last) = last {
            self.cursor = Some(last);
        }
        let full = read == self.stream_limit();
        if full {
            self.range = Some(range);
        }
        full
    }

    /// A round ended, having delivered rows (`got`) or not; `more`: look
    /// again at once, without ticking (returned).
    pub(super) fn round_done(&mut self, got: bool, more: bool) -> bool {
        self.draining = more && self.cursor.is_some();
        if got {
            self.idle = self.poll_interval;
        }
        more
    }

    /// A round failed (other than by shutdown): reload the cursor next.
    pub(super) fn round_failed(&mut self) {
        self.draining = false;
        self.cursor = None;
    }

    /// How long to wait for a wake-up before looking anyway.
    pub(super) fn idle(&self) -> Duration {
        self.idle
    }

    /// Woken (a wake-up, a gap, a change of role): the wait starts over.
    pub(super) fn woken(&mut self) {
        self.idle = self.poll_interval;
    }

    /// The wait passed without anything happening: wait twice as long
    /// next time, up to the maximum.
    pub(super) fn timed_out(&mut self) {
        self.idle = self.idle.saturating_mul(2).min(self.max_poll_interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bounds that are just their tick.
    impl Bounds for i64 {
        fn tick(&self) -> i64 {
            *self
        }
    }

    const POLL: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_millis(700);

    fn at(tick: i64, xid: u64, seq: i64) -> Position {
        Position { tick, xid, seq }
    }

    /// A leading plan whose cursor was loaded at `p`.
    fn loaded(batch_size: usize, p: Position) -> ReadPlan<i64> {
        let mut plan = ReadPlan::new(batch_size, POLL, MAX);
        assert!(plan.lead(Some(1)));
        assert_eq!(plan.cursor(), None);
        plan.loaded(p);
        plan
    }

    #[test]
    fn a_new_plan_loads_the_cursor_then_ticks_and_reads_from_it() {
        let p = at(3, 10, 2);
        let mut plan = loaded(5, p);
        assert_eq!(plan.cursor(), Some(p));
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
    }

    #[test]
    fn standing_by_or_a_new_term_forgets_the_cursor() {
        let p = at(3, 10, 2);
        let mut plan = loaded(5, p);
        assert!(plan.lead(Some(1)));
        assert_eq!(plan.cursor(), Some(p), "same term: the cursor stays");
        assert!(plan.lead(Some(2)));
        assert_eq!(plan.cursor(), None, "new term: reload");
        plan.loaded(p);
        assert!(!plan.lead(None));
        assert_eq!(plan.cursor(), None, "standing by: reload");
        assert!(plan.lead(Some(2)));
        assert_eq!(plan.cursor(), None);
    }

    #[test]
    fn a_short_page_ends_its_batch_and_the_next_read_asks_for_the_next_tick() {
        let mut plan = loaded(5, at(3, 10, 2));
        let last = at(4, 12, 7);
        let end = plan.page_read(2, Some(last));
        assert_eq!(
            end,
            PageEnd {
                more: true,
                find_range: None
            }
        );
        assert_eq!(plan.cursor(), Some(last));
        assert!(plan.round_done(end.more, end.more));
        // Draining: no tick; batch 4 is done, so straight to batch 5.
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: false,
                from: Position::start_of_tick(5)
            }
        );
    }

    #[test]
    fn a_short_page_of_the_latest_ticked_batch_waits_for_the_next_wakeup() {
        let mut plan = loaded(5, at(3, 10, 2));
        plan.ticked(4);
        let last = at(4, 12, 7);
        let end = plan.page_read(1, Some(last));
        assert!(!end.more, "nothing was ticked after batch 4: no empty read");
        assert!(!plan.round_done(true, end.more));
        assert_eq!(plan.idle(), POLL, "rows came: the wait starts over");
        // The next round (a wake-up or a poll) ticks and asks for batch 5.
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: true,
                from: Position::start_of_tick(5)
            }
        );
    }

    #[test]
    fn short_pages_of_earlier_batches_read_on_up_to_the_latest_tick() {
        let mut plan = loaded(5, at(3, 10, 2));
        plan.ticked(6);
        let end = plan.page_read(2, Some(at(4, 12, 7)));
        assert!(end.more, "batches 5 and 6 are ticked: read on");
        assert!(plan.round_done(true, end.more));
        let end = plan.page_read(1, Some(at(6, 20, 9)));
        assert!(!end.more);
        // A full page of the latest batch still reads on (its rest).
        let mut plan = loaded(2, at(3, 10, 2));
        plan.ticked(4);
        assert!(plan.page_read(2, Some(at(4, 12, 7))).more);
        // A reloaded cursor forgets the latest tick: read on until empty.
        plan.loaded(at(4, 12, 7));
        assert!(plan.page_read(1, Some(at(5, 13, 1))).more);
    }

    #[test]
    fn a_full_page_asks_for_range_bounds_and_reads_on_in_the_same_batch() {
        let mut plan = loaded(3, at(3, 10, 2));
        let last = at(4, 12, 7);
        let end = plan.page_read(3, Some(last));
        assert_eq!(
            end,
            PageEnd {
                more: true,
                find_range: Some(last)
            }
        );
        plan.set_range(None);
        assert!(plan.round_done(end.more, end.more));
        // Not finished: `read` looks for more of batch 4 after the cursor.
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: false,
                from: last
            }
        );
    }

    #[test]
    fn a_batch_with_range_bounds_is_streamed_until_a_stream_comes_back_short() {
        let mut plan = loaded(3, at(3, 10, 2));
        let last = at(4, 12, 7);
        plan.page_read(3, Some(last));
        plan.set_range(Some(4));
        plan.round_done(true, true);
        assert_eq!(
            plan.step(last),
            Step::Stream {
                tick: false,
                range: 4,
                at: last
            }
        );
        // A full stream (batch_size * STREAM_PAGES rows): stream on.
        let later = at(4, 40, 1);
        assert!(plan.streamed(4, 3 * STREAM_PAGES, Some(later)));
        assert_eq!(plan.cursor(), Some(later));
        plan.round_done(true, true);
        assert_eq!(
            plan.step(later),
            Step::Stream {
                tick: false,
                range: 4,
                at: later
            }
        );
        // A short one: the bounds are dropped, back to `read`, which finds
        // whatever follows batch 4 (its end is not known as finished).
        let end = at(4, 41, 1);
        assert!(!plan.streamed(4, 2, Some(end)));
        assert_eq!(plan.cursor(), Some(end));
        plan.round_done(false, false);
        assert_eq!(
            plan.step(end),
            Step::Read {
                tick: true,
                from: end
            }
        );
    }

    #[test]
    fn range_bounds_of_another_batch_are_not_used() {
        let mut plan = loaded(3, at(3, 10, 2));
        plan.set_range(Some(9));
        let p = at(4, 1, 1);
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
        // And they are gone.
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
    }

    #[test]
    fn not_draining_streams_after_a_tick() {
        let p = at(4, 12, 7);
        let mut plan = loaded(3, p);
        plan.set_range(Some(4));
        assert_eq!(
            plan.step(p),
            Step::Stream {
                tick: true,
                range: 4,
                at: p
            }
        );
    }

    #[test]
    fn an_empty_read_stops_draining_and_keeps_the_cursor() {
        let p = at(3, 10, 2);
        let mut plan = loaded(5, p);
        plan.round_done(true, true);
        let end = plan.page_read(0, None);
        assert_eq!(
            end,
            PageEnd {
                more: false,
                find_range: None
            }
        );
        assert!(!plan.round_done(end.more, end.more));
        assert_eq!(plan.cursor(), Some(p));
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
    }

    #[test]
    fn an_empty_read_keeps_a_finished_batch_finished() {
        let mut plan = loaded(5, at(3, 10, 2));
        let last = at(4, 12, 7);
        plan.page_read(1, Some(last));
        plan.round_done(true, true);
        plan.page_read(0, None);
        plan.round_done(false, false);
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: true,
                from: Position::start_of_tick(5)
            }
        );
    }

    #[test]
    fn loading_the_cursor_forgets_the_batch_state() {
        let mut plan = loaded(3, at(3, 10, 2));
        let last = at(4, 12, 7);
        plan.page_read(1, Some(last));
        plan.round_failed();
        assert_eq!(plan.cursor(), None);
        plan.loaded(last);
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: true,
                from: last
            }
        );
        plan.set_range(Some(4));
        plan.loaded(last);
        assert_eq!(
            plan.step(last),
            Step::Read {
                tick: true,
                from: last
            }
        );
    }

    #[test]
    fn a_failed_round_reloads_and_ticks() {
        let p = at(3, 10, 2);
        let mut plan = loaded(5, p);
        plan.round_done(true, true);
        plan.round_failed();
        assert_eq!(plan.cursor(), None);
        plan.loaded(p);
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
    }

    #[test]
    fn expired_messages_make_the_next_read_tick() {
        let p = at(3, 10, 2);
        let mut plan = loaded(5, p);
        plan.round_done(true, true);
        plan.retained(false);
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: false,
                from: p
            }
        );
        plan.retained(true);
        assert_eq!(
            plan.step(p),
            Step::Read {
                tick: true,
                from: p
            }
        );
    }

    #[test]
    fn idle_waits_double_up_to_the_maximum_and_reset_on_a_wakeup_or_rows() {
        let mut plan = loaded(5, at(3, 10, 2));
        assert_eq!(plan.idle(), POLL);
        let mut seen = Vec::new();
        for _ in 0..5 {
            plan.timed_out();
            seen.push(plan.idle().as_millis());
        }
        assert_eq!(seen, [200, 400, 700, 700, 700]);
        plan.woken();
        assert_eq!(plan.idle(), POLL);
        plan.timed_out();
        assert!(!plan.round_done(false, false), "no rows: the wait stays");
        assert_eq!(plan.idle(), 2 * POLL);
        assert!(plan.round_done(true, true));
        assert_eq!(plan.idle(), POLL);
    }

    #[test]
    fn a_stream_limit_is_whole_pages() {
        let plan: ReadPlan<i64> = ReadPlan::new(250, POLL, MAX);
        assert_eq!(plan.stream_limit(), 250 * STREAM_PAGES);
        let huge: ReadPlan<i64> = ReadPlan::new(usize::MAX, POLL, MAX);
        assert_eq!(huge.stream_limit(), usize::MAX);
    }
}

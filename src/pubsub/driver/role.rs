//! What one channel is on the listener session: plain (every instance
//! listens) or elected (one leader per channel across instances). Pure state
//! machines: the driver feeds them server answers and control messages, and
//! they say what to send next and what to tell subscribers.

/// A plain channel: listened to whenever it has subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plain {
    /// Not listened to.
    Idle,
    /// `LISTEN` sent, not yet confirmed.
    Listening,
    /// The server listens.
    Listened,
    /// `UNLISTEN` sent, not yet confirmed.
    Unlistening,
}

/// An elected channel on this instance.
///
/// `handed_over` records, in notification-queue order, whether the previous
/// leader announced a graceful hand-over (`release:`) that nobody else has
/// claimed since (no foreign `ready:` or `stopped:` after it). It decides,
/// at this instance's own `ready:`, whether the subscriptions get a
/// take-over gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Election {
    /// Another session leads, or nobody was asked yet. `due`: try the lock
    /// at the next plan; `tried`: an attempt was answered; `hurry`: a
    /// release was seen, so a failed attempt retries soon (the old leader
    /// unlocks just after announcing).
    Standby {
        due: bool,
        tried: bool,
        hurry: bool,
        handed_over: bool,
    },
    /// `pg_try_advisory_lock` sent.
    Acquiring {
        tried: bool,
        hurry: bool,
        handed_over: bool,
    },
    /// The lock is ours; `LISTEN` and `ready:` not sent yet.
    Won { handed_over: bool },
    /// `LISTEN` + `ready:` sent in one transaction, not yet confirmed.
    Announcing { handed_over: bool },
    /// Listening; what arrives before our own `ready:` is the previous leader's.
    AwaitingReady { handed_over: bool },
    /// Delivering the channel.
    Leader,
    /// No subscribers left: `UNLISTEN`, `stopped:` and unlock sent.
    Releasing,
}

/// A control message about this channel from another session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Heard {
    /// The leader unlocked and keeps delivering until a successor's `ready:`.
    Release,
    /// The leader stopped delivering with nobody taking over.
    Stopped,
    /// Another session became leader.
    Ready,
}

/// What the driver sends for a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Listen,
    Unlisten,
    TryLock,
    /// `LISTEN` and the `ready:` announcement.
    Announce,
    /// `UNLISTEN`, `stopped:`, unlock.
    Release,
}

impl Plain {
    /// The statement to send now, if any; moves to the in-flight state.
    pub(crate) fn plan(&mut self, wanted: bool) -> Option<Step> {
        let (next, step) = match (*self, wanted) {
            (Plain::Idle, true) => (Plain::Listening, Step::Listen),
            (Plain::Listened, false) => (Plain::Unlistening, Step::Unlisten),
            _ => return None,
        };
        *self = next;
        Some(step)
    }

    pub(crate) fn confirmed(&mut self) {
        *self = match *self {
            Plain::Listening => Plain::Listened,
            Plain::Unlistening => Plain::Idle,
            other => other,
        };
    }
}

impl Election {
    pub(crate) const fn new() -> Self {
        Election::Standby {
            due: true,
            tried: false,
            hurry: false,
            handed_over: false,
        }
    }

    /// The statement to send now, if any; moves to the in-flight state.
    pub(crate) fn plan(&mut self, wanted: bool) -> Option<Step> {
        let (next, step) = match *self {
            Election::Standby {
                due: true,
                tried,
                hurry,
                handed_over,
            } if wanted => (
                Election::Acquiring {
                    tried,
                    hurry,
                    handed_over,
                },
                Step::TryLock,
            ),
            Election::Won { handed_over } if wanted => {
                (Election::Announcing { handed_over }, Step::Announce)
            }
            Election::Won { .. } | Election::AwaitingReady { .. } | Election::Leader if !wanted => {
                (Election::Releasing, Step::Release)
            }
            _ => return None,
        };
        *self = next;
        Some(step)
    }

    /// The answer to a lock attempt. Returns whether a failed attempt
    /// should be retried soon rather than at the next retry interval (once
    /// per release seen).
    pub(crate) fn lock_answer(&mut self, granted: bool) -> bool {
        let Election::Acquiring {
            hurry, handed_over, ..
        } = *self
        else {
            return false;
        };
        if granted {
            *self = Election::Won { handed_over };
            return false;
        }
        *self = Election::Standby {
            due: false,
            tried: true,
            hurry: false,
            handed_over,
        };
        hurry
    }

    /// `LISTEN` + `ready:` committed.
    pub(crate) fn announced(&mut self) {
        if let Election::Announcing { handed_over } = *self {
            *self = Election::AwaitingReady { handed_over };
        }
    }

    /// Our own `ready:` came back (possibly before the answer to the
    /// statement that sent it): deliver from here on. Returns true when the
    /// previous leader did not hand over, so messages may be missing.
    pub(crate) fn own_ready(&mut self) -> bool {
        match *self {
            Election::Announcing { handed_over } | Election::AwaitingReady { handed_over } => {
                *self = Election::Leader;
                !handed_over
            }
            _ => false,
        }
    }

    /// A control message from another session about this channel, in
    /// notification-queue order.
    pub(crate) fn heard(&mut self, what: Heard) {
        let release = what == Heard::Release;
        // A leader let go (or stopped): try at once, and soon again if its
        // unlock (just after its announcement) has not happened yet.
        let wake = what != Heard::Ready;
        match self {
            Election::Standby {
                due,
                hurry,
                handed_over,
                ..
            } => {
                *handed_over = release;
                *hurry = wake;
                *due |= wake;
            }
            Election::Acquiring {
                hurry, handed_over, ..
            } => {
                *handed_over = release;
                *hurry = wake;
            }
            Election::Won { handed_over }
            | Election::Announcing { handed_over }
            | Election::AwaitingReady { handed_over } => *handed_over = release,
            Election::Leader | Election::Releasing => {}
        }
    }

    /// The `Release` statement committed: the lock is free again.
    pub(crate) fn released(&mut self) {
        if *self == Election::Releasing {
            *self = Election::new();
        }
    }

    /// Time for standbys to try again.
    pub(crate) fn retry(&mut self) {
        if let Election::Standby { due, .. } = self {
            *due = true;
        }
    }

    /// The session is gone and the lock with it. Returns whether this
    /// instance held the lock.
    pub(crate) fn connection_lost(&mut self) -> bool {
        let held = matches!(
            self,
            Election::Won { .. }
                | Election::Announcing { .. }
                | Election::AwaitingReady { .. }
                | Election::Leader
                | Election::Releasing
        );
        *self = Election::new();
        held
    }

    /// Whether this instance delivers the channel's messages now.
    pub(crate) fn delivers(&self) -> bool {
        *self == Election::Leader
    }

    /// Whether this session holds the lock and announced itself, so a
    /// shutdown must hand the channel over.
    pub(crate) fn leads(&self) -> bool {
        matches!(self, Election::Leader | Election::AwaitingReady { .. })
    }

    /// Whether a statement about this channel is in flight.
    pub(crate) fn in_flight(&self) -> bool {
        matches!(
            self,
            Election::Acquiring { .. } | Election::Announcing { .. } | Election::Releasing
        )
    }

    /// Whether `listen` may return: this instance leads, or knows another does.
    pub(crate) fn settled(&self) -> bool {
        match self {
            Election::Standby { due, tried, .. } => *tried && !due,
            Election::AwaitingReady { .. } | Election::Leader => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a standby through a won election; returns whether it gapped.
    fn win(e: &mut Election) -> bool {
        assert_eq!(e.plan(true), Some(Step::TryLock));
        assert!(e.in_flight());
        assert!(!e.lock_answer(true));
        assert_eq!(e.plan(true), Some(Step::Announce));
        e.announced();
        assert!(e.settled() && e.leads() && !e.delivers());
        let gap = e.own_ready();
        assert!(e.delivers());
        gap
    }

    #[test]
    fn first_election_gaps() {
        let mut e = Election::new();
        assert!(win(&mut e), "no hand-over was seen");
    }

    #[test]
    fn graceful_release_does_not_gap() {
        let mut e = Election::new();
        assert_eq!(e.plan(true), Some(Step::TryLock));
        assert!(!e.lock_answer(false));
        assert!(e.settled(), "listen returns once another leader is known");
        assert_eq!(e.plan(true), None, "no retry until due");
        e.heard(Heard::Release);
        assert!(!win(&mut e));
    }

    #[test]
    fn release_claimed_by_someone_else_then_crash_gaps() {
        let mut e = Election::new();
        e.plan(true);
        e.lock_answer(false);
        e.heard(Heard::Release);
        // Lock still held for a moment after the release: retry soon.
        e.plan(true);
        assert!(e.lock_answer(false), "hurry after a release");
        e.retry();
        e.plan(true);
        assert!(!e.lock_answer(false), "only once per release");
        // Another standby won and announced.
        e.heard(Heard::Ready);
        assert_eq!(e.plan(true), None, "a foreign ready is no reason to retry");
        e.retry();
        assert!(win(&mut e), "the other leader crashed without a hand-over");
    }

    #[test]
    fn stopped_leader_gaps_and_wakes() {
        let mut e = Election::new();
        e.plan(true);
        e.lock_answer(false);
        e.heard(Heard::Release);
        e.heard(Heard::Stopped);
        assert!(win(&mut e), "the old leader timed out before we were ready");
    }

    #[test]
    fn a_stop_seen_while_announcing_gaps() {
        let mut e = Election::new();
        e.plan(true);
        e.lock_answer(false);
        e.heard(Heard::Release);
        e.plan(true);
        e.lock_answer(true);
        e.plan(true);
        e.heard(Heard::Stopped);
        e.announced();
        assert!(e.own_ready());
    }

    #[test]
    fn losing_the_session_forgets_everything() {
        let mut e = Election::new();
        win(&mut e);
        assert!(e.connection_lost());
        assert_eq!(e, Election::new());
        let mut s = Election::new();
        s.plan(true);
        s.lock_answer(false);
        s.heard(Heard::Release);
        assert!(!s.connection_lost());
        assert!(
            win(&mut s),
            "a hand-over seen on a lost session does not count"
        );
    }

    #[test]
    fn last_subscriber_gone_releases() {
        let mut e = Election::new();
        win(&mut e);
        assert_eq!(e.plan(false), Some(Step::Release));
        assert!(e.in_flight() && !e.delivers());
        e.released();
        assert_eq!(e, Election::new());
        // A standby with no subscribers does nothing.
        assert_eq!(e.plan(false), None);
    }

    #[test]
    fn plain_listens_and_unlistens() {
        let mut p = Plain::Idle;
        assert_eq!(p.plan(true), Some(Step::Listen));
        assert_eq!(p.plan(false), None, "in flight");
        p.confirmed();
        assert_eq!(p, Plain::Listened);
        assert_eq!(p.plan(true), None);
        assert_eq!(p.plan(false), Some(Step::Unlisten));
        p.confirmed();
        assert_eq!(p, Plain::Idle);
    }
}

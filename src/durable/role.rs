//! How a consumer learns whether it is its group's active one: the
//! listener's election (a session advisory lock), or, behind a pooler in
//! transaction mode, a lease row (see `crate::lease`).

use futures::StreamExt;

use crate::driver::{LeadWatch, Leading};
use crate::lease::LeaseWatch;
use crate::{Subscription, Text};

/// A consumer's source of leadership.
pub(super) enum Role {
    /// The elected subscription on the group's election channel.
    Elected {
        leading: Leading,
        election: String,
        /// Held for the election; its items (gaps) are wake-ups.
        subscription: Subscription<Text>,
        watch: LeadWatch,
    },
    /// A lease named by the election channel.
    Leased(LeaseWatch),
}

impl Role {
    /// The leadership term, `None` while standing by.
    pub(super) fn term(&self) -> Option<u64> {
        match self {
            Role::Elected {
                leading, election, ..
            } => leading.term(election),
            Role::Leased(lease) => lease.term(),
        }
    }

    /// Forgets the changes seen so far.
    pub(super) fn mark_unchanged(&mut self) {
        match self {
            Role::Elected { watch, .. } => watch.mark_unchanged(),
            Role::Leased(lease) => lease.mark_unchanged(),
        }
    }

    /// Waits for something worth a look (a change of role, a gap); false
    /// once the handle shut down.
    pub(super) async fn changed(&mut self) -> bool {
        match self {
            Role::Elected {
                subscription,
                watch,
                ..
            } => tokio::select! {
                d = subscription.next() => d.is_some(),
                () = watch.changed() => true,
            },
            Role::Leased(lease) => lease.changed().await,
        }
    }
}

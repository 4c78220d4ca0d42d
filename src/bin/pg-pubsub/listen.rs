//! `pg-pubsub listen`: every notification on the channels as a JSON line.

use std::num::NonZeroUsize;

use clap::Args;
use futures::stream::{self, Fuse, StreamExt};
use futures::FutureExt;
use pg_pubsub::Text;
use pg_pubsub::{ChannelName, Delivery, EventStream, GapCause, PgPubSub};

use crate::common::{
    check_channel, connect, human, note, report_event, write_json_line, ConnOpts, Failure, Result,
    Stop, Tuning,
};

#[derive(Args)]
pub(crate) struct ListenArgs {
    /// Channels to listen on.
    #[arg(required_unless_present = "elect", value_name = "CHANNEL")]
    channels: Vec<String>,
    /// Messages buffered per channel before they are dropped (and reported).
    #[arg(long, value_name = "N")]
    queue_capacity: Option<NonZeroUsize>,
    /// Only one process (of those electing the channel on the same
    /// database) receives each channel; the others stand by and take over.
    #[arg(long)]
    single_listener: bool,
    /// Elect only this channel (repeatable; it is listened to even if not
    /// given as CHANNEL); the other channels are received by every process.
    #[arg(long, value_name = "CHANNEL")]
    elect: Vec<String>,
    /// Do not print messages this process published itself.
    #[arg(long)]
    filtered: bool,
}

pub(crate) async fn run(conn: &ConnOpts, args: ListenArgs) -> Result<()> {
    // Duplicates would print every message twice.
    // Each channel with whether it is elected.
    let mut channels: Vec<(ChannelName, bool)> = Vec::new();
    for name in &args.channels {
        let channel = check_channel(name)?;
        if !channels.iter().any(|(c, _)| *c == channel) {
            channels.push((channel, false));
        }
    }
    for name in &args.elect {
        let channel = check_channel(name)?;
        match channels.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, elected)) => *elected = true,
            None => channels.push((channel, true)),
        }
    }
    // Installed first so a signal during connecting still ends cleanly.
    let mut stop = Stop::new()?;
    let tuning = Tuning {
        queue_capacity: args.queue_capacity,
        single_listener: args.single_listener,
        filtered: args.filtered,
        backoff: None,
    };
    let ps = match stop.or(connect(conn, tuning)).await {
        Some(ps) => ps?,
        None => return Ok(()),
    };
    // Subscribed before listening so no reconnect goes unreported.
    let mut events = ps.events().fuse();
    // A signal shuts down while `serve` goes on printing what the listener
    // still delivers (a leader hands over first); the streams then end.
    let on_signal = ps.shutdown_on_signal();
    drop(stop);
    let result = serve(&ps, &channels, &mut events).await;
    ps.shutdown().await;
    on_signal.abort();
    // What shutdown did (e.g. hand-overs) is already queued.
    while let Some(Some(event)) = events.next().now_or_never() {
        report_event(&event);
    }
    result
}

/// Subscribes, then prints until the listener stops or stdout is closed.
async fn serve(
    ps: &PgPubSub,
    channels: &[(ChannelName, bool)],
    events: &mut Fuse<EventStream>,
) -> Result<()> {
    let mut subs = Vec::with_capacity(channels.len());
    for (channel, elected) in channels {
        let mut sub = ps.listen::<Text>(channel.as_str());
        if *elected {
            sub = sub.single_listener(true);
        }
        let sub = sub.await?;
        let channel = channel.clone();
        subs.push(sub.map(move |d| (channel.clone(), d)));
    }
    let names: Vec<&str> = channels.iter().map(|(c, _)| c.as_str()).collect();
    note(&format!("listening on {}", names.join(", ")));
    let mut deliveries = stream::select_all(subs);
    let mut out = tokio::io::stdout();
    loop {
        // Events first: a disconnect is reported before the gaps it causes.
        tokio::select! {
            biased;
            Some(event) = events.next() => report_event(&event),
            delivery = deliveries.next() => match delivery {
                Some((channel, delivery)) => {
                    if !print_delivery(&mut out, &channel, delivery).await? {
                        return Ok(());
                    }
                }
                None if ps.is_shut_down() => return Ok(()),
                None => return Err(Failure("the listener stopped unexpectedly".to_owned())),
            },
        }
    }
}

#[derive(serde::Serialize)]
struct Line<'a> {
    channel: &'a str,
    payload: &'a str,
    process_id: i32,
    origin: Option<String>,
}

/// Prints one delivery; `false` when stdout is closed (e.g. `| head`).
async fn print_delivery(
    out: &mut tokio::io::Stdout,
    channel: &ChannelName,
    delivery: Delivery<Text>,
) -> Result<bool> {
    let line = match &delivery {
        Delivery::Message(m) => Line {
            channel: m.channel(),
            payload: m.raw(),
            process_id: m.process_id(),
            origin: m.origin().map(|o| o.to_string()),
        },
        // Raw subscriptions never fail to decode; kept as a message if one ever does.
        Delivery::Undecodable(e) => Line {
            channel: e.channel(),
            payload: e.raw(),
            process_id: e.process_id(),
            origin: None,
        },
        Delivery::Lagged(n) => {
            note(&format!(
                "lagged on {channel}: {n} message(s) dropped because output was too slow \
                 (see --queue-capacity)"
            ));
            return Ok(true);
        }
        Delivery::Gap(gap) => {
            match gap.cause() {
                GapCause::Reconnect { downtime } => note(&format!(
                    "gap on {channel}: listener reconnected after {} ({}); messages may have been missed",
                    human(downtime),
                    gap.reason()
                )),
                _ => note(&format!("gap on {channel}: {}", gap.reason())),
            }
            return Ok(true);
        }
        other => {
            note(&format!("on {channel}: {other:?}"));
            return Ok(true);
        }
    };
    write_json_line(out, &line).await
}

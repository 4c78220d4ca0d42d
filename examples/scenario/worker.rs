//! One scenario process: subscribe, publish on a timer, print, stop cleanly.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use pg_pubsub::{ConnectionEvent, Delivery, EventStream, PgPubSub, Subscription};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;

use super::{now_us, Args, Ev, Line, Mode, Ping, Result};

pub(super) async fn run(mode: Mode, args: &Args, url: &str) -> Result<()> {
    let out = Out {
        name: args.name.as_str().into(),
        channel: args.channel.as_str().into(),
        json: args.worker,
    };
    let mut orders = Orders::new(args.worker);
    let ps = PgPubSub::builder(url)?
        .application_name(format!("pg-pubsub {}", args.name))
        .filtered(mode.filtered)
        .single_listener(mode.single_listener)
        .connect()
        .await?;
    // Ctrl-C/SIGTERM: shut down while this loop goes on reading what the
    // listener still delivers (a leader hands over first); the stream then ends.
    let on_signal = ps.shutdown_on_signal();
    // Subscribed before listening, so the first leading/standing-by is seen.
    let mut events = ps.events();
    let mut sub = ps.listen::<Ping>(&args.channel).await?;
    out.intro(mode, args);
    out.emit(Ev::Ready {
        backend: ps.listener_pid(),
    });

    let every = args.every.max(Duration::from_millis(1));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut publishing = !args.worker && !args.every.is_zero();
    let mut seq = 0;
    loop {
        tokio::select! {
            biased;
            order = orders.recv() => match order {
                Order::Go if !args.every.is_zero() => {
                    publishing = true;
                    ticker.reset_immediately();
                }
                Order::Go | Order::Hold => publishing = false,
                Order::Quit => break,
            },
            Some(event) = events.next() => out.event(&event),
            delivery = sub.next() => match delivery {
                Some(d) => out.delivery(d),
                None if ps.is_shut_down() => break,
                None => return Err("the subscription ended unexpectedly".into()),
            },
            _ = ticker.tick(), if publishing && !ps.is_shut_down() => {
                seq += 1;
                publish(&ps, &out, seq);
            }
        }
    }
    let result = stop_cleanly(&ps, sub, events, &out).await;
    on_signal.abort();
    result
}

/// Publishes in its own task, so a slow server never holds up receiving.
fn publish(ps: &PgPubSub, out: &Out, seq: u64) {
    let (ps, out) = (ps.clone(), out.clone());
    tokio::spawn(async move {
        let ping = Ping {
            from: out.name.to_string(),
            seq,
        };
        match ps.notify(&out.channel, &ping).await {
            Ok(()) => out.emit(Ev::Sent { seq }),
            Err(e) => out.emit(Ev::Note {
                text: format!("publishing seq {seq} failed: {e}"),
            }),
        }
    });
}

/// Shuts down while still reading: a leader keeps delivering until the new
/// leader listens, and those messages are still this process's to handle.
async fn stop_cleanly(
    ps: &PgPubSub,
    mut sub: Subscription<Ping>,
    mut events: EventStream,
    out: &Out,
) -> Result<()> {
    let shutdown = tokio::spawn({
        let ps = ps.clone();
        async move { ps.shutdown().await }
    });
    loop {
        tokio::select! {
            biased;
            Some(event) = events.next() => out.event(&event),
            delivery = sub.next() => match delivery {
                Some(d) => out.delivery(d),
                None => break,
            },
        }
    }
    shutdown.await?;
    while let Some(Some(event)) = events.next().now_or_never() {
        out.event(&event);
    }
    out.emit(Ev::Bye);
    Ok(())
}

/// Prints readable lines, or JSON lines for a parent process.
#[derive(Clone)]
struct Out {
    name: Arc<str>,
    channel: Arc<str>,
    json: bool,
}

impl Out {
    fn emit(&self, ev: Ev) {
        let text = if self.json {
            let line = Line { t_us: now_us(), ev };
            serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"bad_line\":\"{e}\"}}"))
        } else {
            format!("[{}] {}", self.name, self.human(&ev))
        };
        // A closed stdout (parent gone) is not worth a panic: stdin closes too.
        let _ = writeln!(std::io::stdout().lock(), "{text}");
    }

    fn intro(&self, mode: Mode, args: &Args) {
        if self.json {
            return;
        }
        let publishing = if args.every.is_zero() {
            "not publishing".to_owned()
        } else {
            format!("publishing every {} ms", args.every.as_millis())
        };
        self.emit(Ev::Note {
            text: format!(
                "{} on channel {:?}: {}; {publishing}; Ctrl-C stops",
                mode.name(),
                self.channel,
                mode.rule()
            ),
        });
    }

    fn human(&self, ev: &Ev) -> String {
        let ch = &self.channel;
        match ev {
            Ev::Ready { backend } => match backend {
                Some(pid) => format!("subscribed to {ch} (listener backend {pid})"),
                None => format!("subscribed to {ch} (listener reconnecting)"),
            },
            Ev::Leading => format!("leading {ch}"),
            Ev::Standby => format!("standing by on {ch} (another process leads it)"),
            Ev::Lost { reason } => format!("lost the lead on {ch}: {reason}"),
            Ev::Released => format!("released {ch} to the standbys"),
            Ev::Sent { seq } => format!("sent seq {seq}"),
            Ev::Got { from, seq } => format!("got seq {seq} from {from}"),
            Ev::Gap {
                reason,
                downtime_ms: Some(ms),
            } => format!(
                "gap: the listener was down {ms} ms ({reason}); \
                 messages sent meanwhile were missed"
            ),
            Ev::Gap { reason, .. } => format!("gap: {reason}"),
            Ev::Note { text } => text.clone(),
            Ev::Bye => "stopped".to_owned(),
            Ev::Closed => "closed".to_owned(),
        }
    }

    fn delivery(&self, delivery: Delivery<Ping>) {
        let ev = match delivery {
            Delivery::Message(m) => {
                let ping = m.into_payload();
                Ev::Got {
                    from: ping.from,
                    seq: ping.seq,
                }
            }
            Delivery::Gap(gap) => Ev::Gap {
                reason: gap.reason().to_owned(),
                downtime_ms: gap.downtime().map(|d| d.as_millis() as u64),
            },
            Delivery::Lagged(n) => Ev::Note {
                text: format!("{n} message(s) dropped: this process read too slowly"),
            },
            Delivery::Undecodable(e) => Ev::Note {
                text: format!("not a scenario message: {:?}", e.raw()),
            },
            other => Ev::Note {
                text: format!("{other:?}"),
            },
        };
        self.emit(ev);
    }

    fn event(&self, event: &ConnectionEvent) {
        let ev = match event {
            ConnectionEvent::LockAcquired { .. } => Ev::Leading,
            ConnectionEvent::Standby { .. } => Ev::Standby,
            ConnectionEvent::LockLost { reason, .. } => Ev::Lost {
                reason: reason.to_string(),
            },
            ConnectionEvent::LockReleased { .. } => Ev::Released,
            ConnectionEvent::Disconnected { reason } => Ev::Note {
                text: format!("disconnected ({reason}); reconnecting"),
            },
            ConnectionEvent::Reconnected { downtime, .. } => Ev::Note {
                text: format!("reconnected after {} ms", downtime.as_millis()),
            },
            ConnectionEvent::ReconnectFailed { attempt, error, .. } => Ev::Note {
                text: format!("reconnect attempt {attempt} failed: {error}"),
            },
            ConnectionEvent::SlowConsumer { .. } => Ev::Note {
                text: "reading too slowly: messages are being dropped".to_owned(),
            },
            _ => return,
        };
        self.emit(ev);
    }
}

/// Orders from the parent of a worker, one per stdin line.
enum Order {
    Go,
    Hold,
    /// Stdin closed: the parent is done or gone.
    Quit,
}

struct Orders(Option<mpsc::UnboundedReceiver<Order>>);

impl Orders {
    fn new(worker: bool) -> Self {
        if !worker {
            return Orders(None);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        // A plain thread: a blocked read must not keep the runtime from exiting.
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let order = match line.as_deref().map(str::trim) {
                    Ok("go") => Order::Go,
                    Ok("hold") => Order::Hold,
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if tx.send(order).is_err() {
                    return;
                }
            }
            let _ = tx.send(Order::Quit);
        });
        Orders(Some(rx))
    }

    async fn recv(&mut self) -> Order {
        match &mut self.0 {
            Some(rx) => rx.recv().await.unwrap_or(Order::Quit),
            None => std::future::pending().await,
        }
    }
}

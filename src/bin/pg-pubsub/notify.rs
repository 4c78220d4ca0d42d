//! `pg-pubsub notify`: one notification, or one per line of stdin.

use std::collections::HashSet;
use std::hash::{BuildHasher, RandomState};

use clap::Args;
use pg_pubsub::wire::{self, MAX_PAYLOAD_BYTES};
use pg_pubsub::PgPubSub;
use pg_pubsub::Text;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::common::{check_channel, connect, note, ConnOpts, Failure, Result, Tuning, STDIN_CHUNK};

#[derive(Args)]
pub(crate) struct NotifyArgs {
    /// Channel to notify.
    channel: String,
    /// Payload text.
    #[arg(required_unless_present = "stdin", conflicts_with = "stdin")]
    payload: Option<String>,
    /// Send one notification per line of standard input.
    ///
    /// Lines are streamed: sent in batches of up to 1000 as they are read,
    /// each batch in one transaction once all its lines are checked (UTF-8,
    /// no NUL byte, at most 7999 bytes; a longer line is not read further).
    /// A bad line or a failed batch stops the run with an error that says
    /// which lines were sent ("lines 1 to 2000 were sent before"); no later
    /// line is read or sent.
    #[arg(long, verbatim_doc_comment)]
    stdin: bool,
}

/// Checked before connecting so bad input is reported as such, even with no server.
fn check_payload(payload: &str) -> Result<(), String> {
    wire::check_payload(payload).map_err(|e| e.to_string())
}

pub(crate) async fn run(conn: &ConnOpts, args: NotifyArgs) -> Result<()> {
    check_channel(&args.channel)?;
    let payload = match args.payload {
        Some(p) => {
            check_payload(&p)?;
            Some(p)
        }
        None => None,
    };
    let ps = connect(conn, Tuning::default()).await?;
    let result = match payload {
        Some(p) => ps
            .notify(&args.channel, Text(&p))
            .await
            .map_err(Failure::from),
        None => notify_stdin(&ps, &args.channel).await,
    };
    ps.shutdown().await;
    result
}

/// Streams stdin in batches of at most [`STDIN_CHUNK`] lines, each sent
/// with one `notify_batch` call that is one statement and one transaction
/// (a batch ends before a repeated line, which the server would merge), so
/// a batch goes out whole or not at all and errors can say which lines went.
async fn notify_stdin(ps: &PgPubSub, channel: &str) -> Result<()> {
    let mut input = BufReader::new(tokio::io::stdin());
    let mut bytes = Vec::new();
    let mut chunk: Vec<String> = Vec::with_capacity(STDIN_CHUNK);
    // Hashes of the chunk's lines: a collision only ends a batch early.
    let hasher = RandomState::new();
    let mut seen = HashSet::with_capacity(STDIN_CHUNK);
    let mut line_no = 0usize;
    // Lines 1 to `sent` have been sent.
    let mut sent = 0usize;
    let sent_so_far = |sent: usize| match sent {
        0 => "nothing was sent before".to_owned(),
        n => format!("lines 1 to {n} were sent before"),
    };
    loop {
        let read = read_line(&mut input, &mut bytes).await.map_err(|e| {
            let line = line_no + 1;
            format!("reading stdin line {line}: {e}; {}", sent_so_far(sent))
        })?;
        let line = match read {
            ReadLine::End => None,
            ReadLine::TooLong => Some(Err(format!(
                "payload is more than {MAX_PAYLOAD_BYTES} bytes; PostgreSQL accepts at most \
                 {MAX_PAYLOAD_BYTES}"
            ))),
            ReadLine::Line => Some(
                String::from_utf8(std::mem::take(&mut bytes))
                    .map_err(|_| "not valid UTF-8".to_owned())
                    .and_then(|line| check_payload(&line).map(|()| line)),
            ),
        };
        let line = match line {
            Some(line) => {
                line_no += 1;
                Some(line.map_err(|e| format!("line {line_no}: {e}; {}", sent_so_far(sent)))?)
            }
            None => None,
        };
        let repeat = line
            .as_ref()
            .is_some_and(|l| !seen.insert(hasher.hash_one(l)));
        let full = chunk.len() == STDIN_CHUNK || repeat || (line.is_none() && !chunk.is_empty());
        if full {
            let (first, last) = (sent + 1, sent + chunk.len());
            let n = ps
                .notify_batch(channel, chunk.iter().map(Text))
                .await
                .map_err(|e| {
                    // A lost connection may have lost the commit's answer, not the commit.
                    let fate = if e.is_connection() {
                        "may have been"
                    } else {
                        "were not"
                    };
                    format!(
                        "sending lines {first} to {last}: {e}; they {fate} sent; {}",
                        sent_so_far(sent)
                    )
                })?;
            sent += n;
            chunk.clear();
            seen.clear();
            if let Some(l) = &line {
                seen.insert(hasher.hash_one(l));
            }
        }
        match line {
            Some(line) => chunk.push(line),
            None => break,
        }
    }
    note(&format!("sent {sent} notifications"));
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum ReadLine {
    /// A line is in the buffer, without its `\n` or `\r\n`.
    Line,
    /// Longer than a payload may be; the rest of it was not read.
    TooLong,
    /// End of input.
    End,
}

/// Reads one line into `line` holding at most one payload's worth of it,
/// however long the line is (a plain `read_line` would hold all of it).
async fn read_line<R: AsyncBufRead + Unpin>(
    input: &mut R,
    line: &mut Vec<u8>,
) -> std::io::Result<ReadLine> {
    // One more than a payload: room for the `\r` of `\r\n`.
    const ROOM: usize = MAX_PAYLOAD_BYTES + 1;
    line.clear();
    loop {
        let buf = input.fill_buf().await?;
        if buf.is_empty() {
            // A last line without `\n` counts, as with `BufRead::lines`.
            return Ok(match line.len() {
                0 => ReadLine::End,
                n if n > MAX_PAYLOAD_BYTES => ReadLine::TooLong,
                _ => ReadLine::Line,
            });
        }
        let newline = buf.iter().position(|&b| b == b'\n');
        let take = newline.unwrap_or(buf.len());
        if line.len() + take > ROOM {
            return Ok(ReadLine::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        input.consume(take + usize::from(newline.is_some()));
        if newline.is_some() {
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(if line.len() > MAX_PAYLOAD_BYTES {
                ReadLine::TooLong
            } else {
                ReadLine::Line
            });
        }
    }
}

//! Notifications as the server sends them: `NotificationResponse` frames
//! (`'A'`, length, backend PID, channel and payload as NUL-terminated
//! UTF-8), kept verbatim in one buffer from the socket to the subscriber.
//!
//! tokio-postgres turns each notification into two `String`s; the listener
//! reads its socket itself instead ([`driver`](crate::driver)'s tap) and
//! copies runs of frames, so a notification costs no allocation of its own.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::Notification;

/// The backend message tag of a `NotificationResponse`.
pub(crate) const TAG: u8 = b'A';
/// Tag and length.
pub(crate) const HEADER: usize = 5;

/// Appends `note` as a frame (notifications tokio-postgres parsed).
pub(crate) fn push(out: &mut BytesMut, note: &Notification) {
    push_parts(out, note.process_id(), note.channel(), note.payload());
}

/// Appends a frame of these parts.
pub(crate) fn push_parts(out: &mut BytesMut, process_id: i32, channel: &str, payload: &str) {
    let body = 4 + channel.len() + 1 + payload.len() + 1;
    out.reserve(HEADER + body);
    out.put_u8(TAG);
    // A payload is below 8000 bytes and a channel name below 64.
    out.put_u32((4 + body) as u32);
    out.put_i32(process_id);
    out.put_slice(channel.as_bytes());
    out.put_u8(0);
    out.put_slice(payload.as_bytes());
    out.put_u8(0);
}

/// One parsed frame, borrowed from its buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame<'a> {
    /// The whole frame, header included.
    pub bytes: &'a [u8],
    pub channel: &'a str,
}

impl Frame<'_> {
    pub(crate) fn process_id(&self) -> i32 {
        process_id(self.bytes)
    }

    pub(crate) fn payload(&self) -> &str {
        // Checked when parsed.
        std::str::from_utf8(payload_bytes(self.bytes, self.channel.len())).unwrap_or_default()
    }
}

/// A frame that is not a well-formed notification.
#[derive(Debug)]
pub(crate) struct Malformed(pub &'static str);

/// The frame at the start of `buf` and its length; `buf` must hold whole
/// frames (the tap only passes those on).
pub(crate) fn parse(buf: &[u8]) -> Result<(Frame<'_>, usize), Malformed> {
    if buf.len() < HEADER || buf[0] != TAG {
        return Err(Malformed("not a NotificationResponse"));
    }
    let len = 1 + u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    let Some(bytes) = buf.get(..len) else {
        return Err(Malformed("a truncated NotificationResponse"));
    };
    let rest = bytes.get(HEADER + 4..).unwrap_or_default();
    let Some(nul) = rest.iter().position(|&b| b == 0) else {
        return Err(Malformed("a NotificationResponse without its channel"));
    };
    if rest.last() != Some(&0) || nul + 1 == rest.len() || nul > u8::MAX as usize {
        return Err(Malformed("a NotificationResponse without its payload"));
    }
    let channel =
        std::str::from_utf8(&rest[..nul]).map_err(|_| Malformed("a channel name not in UTF-8"))?;
    if std::str::from_utf8(&rest[nul + 1..rest.len() - 1]).is_err() {
        return Err(Malformed("a payload not in UTF-8"));
    }
    Ok((Frame { bytes, channel }, len))
}

/// The backend PID of a whole frame.
pub(crate) fn process_id(frame: &[u8]) -> i32 {
    match frame.get(HEADER..HEADER + 4) {
        Some(&[a, b, c, d]) => i32::from_be_bytes([a, b, c, d]),
        _ => 0,
    }
}

/// The channel name of a whole frame whose channel is `channel_len` bytes long.
pub(crate) fn channel_bytes(frame: &[u8], channel_len: usize) -> &[u8] {
    frame
        .get(HEADER + 4..HEADER + 4 + channel_len)
        .unwrap_or_default()
}

/// The payload of a whole frame whose channel is `channel_len` bytes long.
pub(crate) fn payload_bytes(frame: &[u8], channel_len: usize) -> &[u8] {
    let start = HEADER + 4 + channel_len + 1;
    frame
        .get(start..frame.len().saturating_sub(1))
        .unwrap_or_default()
}

/// Iterates the frames of `buf`, which holds whole frames only.
pub(crate) fn frames(buf: &[u8]) -> impl Iterator<Item = Result<Frame<'_>, Malformed>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = buf.get(at..).filter(|r| !r.is_empty())?;
        match parse(rest) {
            Ok((frame, len)) => {
                at += len;
                Some(Ok(frame))
            }
            Err(e) => {
                at = buf.len();
                Some(Err(e))
            }
        }
    })
}

/// A run of frames copied into one exact allocation, shared by the
/// messages sliced from it (a slow subscriber pins what it queued, no more).
pub(crate) fn copy_run(frames: &[u8]) -> Bytes {
    Bytes::copy_from_slice(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_malformed_ones_are_named() {
        let mut buf = BytesMut::new();
        push_parts(&mut buf, 42, "orders", "{\"id\":1}");
        push_parts(&mut buf, -7, "x", "");
        let got: Vec<_> = frames(&buf)
            .map(|f| f.map(|f| (f.process_id(), f.channel, f.payload().to_owned())))
            .collect::<Result<_, _>>()
            .expect("well-formed");
        assert_eq!(
            got,
            [
                (42, "orders", "{\"id\":1}".to_owned()),
                (-7, "x", String::new())
            ]
        );
        let (first, len) = parse(&buf).expect("a frame");
        assert_eq!(channel_bytes(first.bytes, 6), b"orders");
        assert_eq!(payload_bytes(&buf[..len], 6), b"{\"id\":1}");
        let mut bad = buf[..len].to_vec();
        bad[len - 2] = 0xff;
        assert!(parse(&bad).unwrap_err().0.contains("UTF-8"));
        assert!(parse(&buf[..len - 1]).unwrap_err().0.contains("truncated"));
        assert!(parse(b"Z\0\0\0\x05I").is_err());
    }
}

//! Readiness check: does the server answer a startup packet yet?

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Sends a startup packet; `Ok` once the server answers with an
/// authentication message.
pub(super) fn probe(port: u16) -> Result<(), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(timeout)
        .map_err(|e| e.to_string())?;

    let mut body = 196_608u32.to_be_bytes().to_vec(); // protocol 3.0
    for part in ["user", "postgres", "database", "postgres", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let len = u32::try_from(body.len() + 4).map_err(|e| e.to_string())?;
    let mut packet = len.to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    stream
        .write_all(&packet)
        .map_err(|e| format!("send startup packet: {e}"))?;

    let mut tag = [0u8; 1];
    stream
        .read_exact(&mut tag)
        .map_err(|e| format!("read reply: {e}"))?;
    match tag[0] {
        b'R' => {
            let _ = stream.write_all(&[b'X', 0, 0, 0, 4]);
            Ok(())
        }
        b'E' => {
            let mut len = [0u8; 4];
            stream
                .read_exact(&mut len)
                .map_err(|e| format!("read error reply: {e}"))?;
            let len = (u32::from_be_bytes(len) as usize)
                .saturating_sub(4)
                .min(8192);
            let mut fields = vec![0u8; len];
            stream
                .read_exact(&mut fields)
                .map_err(|e| format!("read error reply: {e}"))?;
            let message = fields
                .split(|b| *b == 0)
                .find(|f| f.first() == Some(&b'M'))
                .map(|f| String::from_utf8_lossy(&f[1..]).into_owned())
                .unwrap_or_else(|| "unknown error".to_string());
            Err(format!("server replied: {message}"))
        }
        other => Err(format!("unexpected reply message type {:?}", other as char)),
    }
}

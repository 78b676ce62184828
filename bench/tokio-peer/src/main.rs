//! `tokio-peer 127.0.0.1:PORT`: the line-reversal protocol written the way a
//! careful tokio user would, as the comparison peer for xps benchmarks.
//!
//! One task per connection: `BufReader::read_until(b'\n')`, reverse the line
//! (bytewise; CRLF keeps its terminator), write into a `BufWriter`, and flush
//! only when the reader holds no further complete line, so pipelined lines
//! are answered in one write. One thread: a current-thread runtime.
//! TCP_NODELAY is set on accepted sockets, as xps does.
//! Prints `[INFO] main() : Server listening on port PORT (ADDR)` on stderr
//! once bound, like xps.

use std::net::SocketAddr;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(a)) => a,
        _ => {
            eprintln!("usage: tokio-peer HOST:PORT");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    rt.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        let local = listener.local_addr()?;
        eprintln!(
            "[INFO] main() : Server listening on port {} ({local})",
            local.port()
        );
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    // Like xps: replies must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    tokio::spawn(async move {
                        let _ = serve(stream).await;
                    });
                }
                // EMFILE and friends: back off instead of spinning.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    })
}

async fn serve(stream: TcpStream) -> std::io::Result<()> {
    let (r, w) = stream.into_split();
    let mut reader = BufReader::new(r);
    let mut writer = BufWriter::new(w);
    let mut line = Vec::with_capacity(128);
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).await?;
        if n == 0 {
            writer.flush().await?;
            return Ok(());
        }
        reverse_line(&mut line);
        writer.write_all(&line).await?;
        if !reader.buffer().contains(&b'\n') {
            writer.flush().await?;
        }
    }
}

/// Reverses the content of `line` in place, keeping a trailing `\n` or `\r\n`.
fn reverse_line(line: &mut [u8]) {
    let mut end = line.len();
    if end > 0 && line[end - 1] == b'\n' {
        end -= 1;
        if end > 0 && line[end - 1] == b'\r' {
            end -= 1;
        }
    }
    line[..end].reverse();
}

#[cfg(test)]
mod tests {
    use super::reverse_line;

    fn rev(s: &[u8]) -> Vec<u8> {
        let mut v = s.to_vec();
        reverse_line(&mut v);
        v
    }

    #[test]
    fn terminators() {
        assert_eq!(rev(b"abc\n"), b"cba\n");
        assert_eq!(rev(b"abc\r\n"), b"cba\r\n");
        assert_eq!(rev(b"\n"), b"\n");
        assert_eq!(rev(b"\r\n"), b"\r\n");
        assert_eq!(rev(b"abc"), b"cba");
    }
}

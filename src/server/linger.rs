//! A lingering close. A refused packet is answered before its body is read, and the connection
//! then closes; closing a socket with unread data in it sends a reset, and a reset can destroy
//! the answer before the client reads it (Windows drops received data on a reset, and WinHTTP
//! reads the answer only once it has sent the whole body). So the end of a connection shuts the
//! write side first (the client sees the answer, then the end), then reads and discards what the
//! client still sends until it closes too, or stalls, or falls below the body pace, or has sent
//! `DRAIN_LIMIT` bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::limits::BodyPace;

/// At most this much of a body is read and thrown away before the connection is reset.
pub const DRAIN_LIMIT: u64 = 64 << 20;

/// After the answer, a client that sends nothing for this long is done.
pub const LINGER_IDLE: Duration = Duration::from_secs(5);

/// An accepted connection whose shutdown lingers (see the module).
pub struct Lingering<I> {
    io: I,
    pace: BodyPace,
    linger: Option<Linger>,
}

struct Linger {
    started: Instant,
    received: u64,
    last: Duration,
    shut: bool,
    timer: Pin<Box<Sleep>>,
}

impl<I> Lingering<I> {
    /// `pace`: how the rest of a body must keep coming to be read away; its pauses are held to
    /// `LINGER_IDLE` at most.
    pub fn new(io: I, pace: BodyPace) -> Self {
        Lingering {
            io,
            pace: BodyPace {
                idle: pace.idle.min(LINGER_IDLE),
                ..pace
            },
            linger: None,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Lingering<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = this.linger.get_or_insert_with(|| {
            let now = Instant::now();
            Linger {
                started: now,
                received: 0,
                last: Duration::ZERO,
                shut: false,
                timer: Box::pin(tokio::time::sleep_until(now)),
            }
        });
        if !linger.shut {
            std::task::ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
            linger.shut = true;
        }
        let mut scratch = [0u8; 8192];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.io).poll_read(cx, &mut buf) {
                // The client closed too (or reset): done.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    linger.received += buf.filled().len() as u64;
                    linger.last = linger.started.elapsed();
                    if linger.received > DRAIN_LIMIT {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Pending => break,
            }
        }
        let (deadline, _) = this.pace.deadline(linger.received, linger.last);
        let Some(at) = linger.started.checked_add(deadline) else {
            return Poll::Ready(Ok(()));
        };
        if linger.timer.deadline() != at {
            linger.timer.as_mut().reset(at);
        }
        linger.timer.as_mut().poll(cx).map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    fn pace() -> BodyPace {
        BodyPace {
            idle: Duration::from_millis(300),
            grace: Duration::from_secs(60),
            min_rate: None,
        }
    }

    #[tokio::test]
    async fn the_client_sees_the_end_at_once_and_its_body_is_read_away() {
        let (mut client, server) = pair().await;
        let mut server = Lingering::new(server, pace());
        server.write_all(b"answer").await.unwrap();
        let shutdown = tokio::spawn(async move { server.shutdown().await });
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"answer", "the answer, then the end");
        // The client goes on sending: no reset while the server lingers.
        for _ in 0..4 {
            client.write_all(&[7u8; 64 << 10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        let done = tokio::time::timeout(Duration::from_secs(5), shutdown).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    }

    #[tokio::test]
    async fn a_silent_client_is_let_go_after_the_pause() {
        let (_client, server) = pair().await;
        let mut server = Lingering::new(server, pace());
        let started = std::time::Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(5), server.shutdown()).await;
        assert!(matches!(done, Ok(Ok(()))), "{done:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250) && took < Duration::from_secs(3),
            "{took:?}"
        );
    }
}

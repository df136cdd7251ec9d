//! A listener whose connections fail a write that makes no progress for a set time. HTTP
//! servers wait for a peer's reading forever; a stream subscriber that stopped reading would
//! then hold its connection and its buffers as long as the daemon runs.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    time::Sleep,
};

pub struct GuardedListener {
    inner: TcpListener,
    stall: Duration,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, stall: Duration) -> Self {
        Self { inner, stall }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = StallGuard<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (StallGuard::new(io, self.stall), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// `io` whose writes and flushes fail with `TimedOut` once they have been pending for
/// `stall` without a byte going through.
pub struct StallGuard<T> {
    io: T,
    stall: Duration,
    /// Armed when a write or flush first finds the peer not reading.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> StallGuard<T> {
    pub fn new(io: T, stall: Duration) -> Self {
        Self { io, stall, timer: None }
    }

    fn progress<R>(&mut self, result: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if result.is_ready() {
            self.timer = None;
            return result;
        }
        let stall = self.stall;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer read nothing for {stall:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress(result, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.io).poll_flush(cx);
        self.progress(result, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    /// A peer that reads nothing fails the writer after the stall time; one that reads
    /// keeps it going however long the transfer takes.
    #[test]
    fn a_peer_that_stops_reading_fails_the_write() {
        runtime().block_on(async {
            let (near, _far) = tokio::io::duplex(64);
            let mut guarded = StallGuard::new(near, Duration::from_millis(100));
            let started = std::time::Instant::now();
            let e = loop {
                if let Err(e) = guarded.write_all(&[0; 64]).await {
                    break e;
                }
            };
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            assert!(started.elapsed() >= Duration::from_millis(100));

            let (near, mut far) = tokio::io::duplex(64);
            let mut guarded = StallGuard::new(near, Duration::from_millis(100));
            let reader = tokio::spawn(async move {
                let mut got = 0;
                let mut buf = [0; 16];
                while got < 4096 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    got += far.read(&mut buf).await.unwrap();
                }
                got
            });
            guarded.write_all(&[1; 4096]).await.expect("a slow reader is no stalled one");
            assert_eq!(reader.await.unwrap(), 4096);
        });
    }
}

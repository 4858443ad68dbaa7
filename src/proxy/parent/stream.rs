//! The connection to the parent: plain TCP, or TLS for an `https://`
//! parent; and, for a tunnel through a TLS parent, the bridge that lets the
//! tunnel keep working on a plain socket.
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::super::ConnCtx;

/// A connection to the parent proxy.
pub(crate) enum ParentStream {
    Plain(TcpStream),
    /// Boxed: TLS state is large, and most parents are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

impl ParentStream {
    /// The stream as a tunnel takes it (the spliced relay, its checks and
    /// inspection all work on a socket): a plain parent's socket as it is;
    /// for a TLS parent, one end of a socket pair whose other end a task
    /// relays through the TLS session (see [`bridge`]), and a guard the
    /// tunnel holds until it ends.
    pub(crate) fn into_socket(
        self,
        ctx: &ConnCtx,
        idle: Duration,
    ) -> io::Result<(TcpStream, Option<DropGuard>)> {
        match self {
            ParentStream::Plain(s) => Ok((s, None)),
            ParentStream::Tls(tls) => {
                let done = CancellationToken::new();
                let socket = bridge(tls, ctx, idle, done.clone())?;
                Ok((socket, Some(done.drop_guard())))
            }
        }
    }
}

/// Relay a TLS session to the parent through a Unix socket pair and give
/// the tunnel the other end.
///
/// The tunnel's relay is readiness-based and splices bulk transfers; it
/// needs a socket, not a TLS stream. tokio's `TcpStream` is a plain socket
/// handle, and every call the tunnel makes on its upstream (read, write,
/// shutdown, readiness, `splice(2)`) works the same on a stream-type Unix
/// socket; it never asks the upstream for addresses or TCP options. The
/// cost, only for tunnels through an `https://` parent: a socket pair, a
/// task and two 8 KiB copy buffers per tunnel. After either direction ends,
/// the other gets the tunnel's idle time-out to finish, and once the tunnel
/// is `done` nothing more is awaited from the parent; shutdown ends it at
/// once. A parent's reset reaches the tunnel as an end of stream.
fn bridge(
    tls: Box<TlsStream<TcpStream>>,
    ctx: &ConnCtx,
    idle: Duration,
    done: CancellationToken,
) -> io::Result<TcpStream> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    theirs.set_nonblocking(true)?;
    let theirs = UnixStream::from_std(theirs)?;
    let ours = TcpStream::from_std(std::net::TcpStream::from(std::os::fd::OwnedFd::from(ours)))?;
    let hard = ctx.shared.drain.hard.clone();
    ctx.shared.drain.tracker.spawn(async move {
        tokio::select! {
            () = relay(theirs, *tls, idle, done) => {}
            () = hard.cancelled() => {}
        }
    });
    Ok(ours)
}

/// Copy both ways until both ends are done: the second bounded by `idle`
/// once the first is, and the parent's no longer awaited once the tunnel
/// is `done` (what the tunnel wrote before it ended still goes up: its end
/// of the pair is closed, so that read ends).
async fn relay(
    unix: UnixStream,
    tls: TlsStream<TcpStream>,
    idle: Duration,
    done: CancellationToken,
) {
    let (mut ur, mut uw) = unix.into_split();
    let (mut tr, mut tw) = tokio::io::split(tls);
    let up = async {
        let copied = tokio::io::copy(&mut ur, &mut tw).await;
        let _ = tw.shutdown().await;
        copied
    };
    let down = async {
        let copied = tokio::io::copy(&mut tr, &mut uw).await;
        let _ = uw.shutdown().await;
        copied
    };
    tokio::pin!(up, down);
    let up_first = tokio::select! {
        r = &mut up => { log_end("to the parent", r); true }
        r = &mut down => { log_end("from the parent", r); false }
    };
    if up_first {
        tokio::select! {
            r = tokio::time::timeout(idle, &mut down) => if let Ok(r) = r { log_end("from the parent", r) },
            () = done.cancelled() => {}
        }
    } else if let Ok(r) = tokio::time::timeout(idle, &mut up).await {
        log_end("to the parent", r);
    }
}

fn log_end(direction: &str, r: io::Result<u64>) {
    if let Err(e) = r {
        tracing::debug!(direction, error = %e, "TLS parent relay ended");
    }
}

impl AsyncRead for ParentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ParentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ParentStream::Plain(s) => s.is_write_vectored(),
            ParentStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ParentStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ParentStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

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
    pub(crate) fn into_socket(self, ctx: &ConnCtx) -> io::Result<(TcpStream, Option<DropGuard>)> {
        match self {
            ParentStream::Plain(s) => Ok((s, None)),
            ParentStream::Tls(tls) => {
                let done = CancellationToken::new();
                let socket = bridge(tls, ctx, done.clone())?;
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
/// task and two 8 KiB copy buffers per tunnel. It lives as long as the
/// tunnel (`done`), and a hard shutdown ends it at once. A parent's reset
/// reaches the tunnel as an end of stream.
fn bridge(
    tls: Box<TlsStream<TcpStream>>,
    ctx: &ConnCtx,
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
            () = relay(theirs, *tls, done) => {}
            () = hard.cancelled() => {}
        }
    });
    Ok(ours)
}

/// Copy both ways until both ends are done, or the tunnel is: once it is
/// `done` nothing more is taken from the parent, and what the tunnel wrote
/// before it ended gets [`DRAIN`] to go up (a parent that stops reading
/// cannot hold the relay, its TLS session and its buffers past the tunnel).
/// Time-outs are the tunnel's: a half-closed tunnel still carrying the
/// parent's answer runs as long as the tunnel does.
async fn relay(unix: UnixStream, tls: TlsStream<TcpStream>, done: CancellationToken) {
    let (mut ur, mut uw) = unix.into_split();
    let (mut tr, mut tw) = tokio::io::split(tls);
    let up = async {
        let copied = tokio::io::copy(&mut ur, &mut tw).await;
        let _ = tw.shutdown().await;
        log_end("to the parent", copied);
    };
    let down = async {
        let copied = tokio::io::copy(&mut tr, &mut uw).await;
        let _ = uw.shutdown().await;
        log_end("from the parent", copied);
    };
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            () = &mut up, if !up_done => up_done = true,
            () = &mut down, if !down_done => down_done = true,
            () = done.cancelled() => {
                if !up_done {
                    let _ = tokio::time::timeout(DRAIN, &mut up).await;
                }
                return;
            }
        }
    }
}

/// How long what a finished tunnel wrote may take to reach the parent.
const DRAIN: Duration = Duration::from_secs(2);

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic
    use std::sync::Arc;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// A TLS "parent" on loopback running `serve` on its side of the
    /// session, and the client end of that session, as the bridge gets it.
    async fn tls_pair<F, Fut>(serve: F) -> TlsStream<TcpStream>
    where
        F: FnOnce(tokio_rustls::server::TlsStream<TcpStream>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ck = rcgen::generate_simple_self_signed(vec!["parent.test".to_string()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve(acceptor.accept(s).await.unwrap()).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("parent.test").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    #[tokio::test]
    async fn a_parent_that_stops_reading_cannot_hold_the_relay_past_its_tunnel() {
        // The parent takes the session and then never reads again.
        let tls = tls_pair(|s| async move {
            let _held = s;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        })
        .await;
        let (mut tunnel, theirs) = pair();
        let done = CancellationToken::new();
        let relay = tokio::spawn(relay(theirs, tls, done.clone()));
        // The tunnel writes until every buffer on the way is full.
        let chunk = vec![7u8; 64 * 1024];
        while tokio::time::timeout(Duration::from_millis(300), tunnel.write_all(&chunk))
            .await
            .is_ok()
        {}
        drop(tunnel);
        done.cancel();
        tokio::time::timeout(DRAIN + Duration::from_secs(3), relay)
            .await
            .expect("the relay ends once its tunnel has")
            .unwrap();
    }

    #[tokio::test]
    async fn a_half_closed_tunnel_gets_the_whole_answer_however_long_it_takes() {
        // The parent answers in 12 pieces, 150 ms apart, after the request.
        let tls = tls_pair(|mut s| async move {
            let mut req = [0u8; 7];
            s.read_exact(&mut req).await.unwrap();
            for _ in 0..12 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                s.write_all(&[1u8; 1000]).await.unwrap();
            }
            s.shutdown().await.unwrap();
        })
        .await;
        let (mut tunnel, theirs) = pair();
        let done = CancellationToken::new();
        let relay = tokio::spawn(relay(theirs, tls, done.clone()));
        tunnel.write_all(b"request").await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut answer))
            .await
            .expect("the answer ends")
            .unwrap();
        assert_eq!(answer.len(), 12_000);
        tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .expect("both directions ended")
            .unwrap();
    }
}

//! The loopback origins: HTTP, echo, source, and HTTP inside TLS.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::args::Origins;
use crate::http::Conn;

const SMALL: usize = 1024;
const LARGE: usize = 1024 * 1024;

pub async fn serve(o: Origins) -> Result<(), String> {
    let mut tasks = tokio::task::JoinSet::new();
    let responses = Arc::new(Responses::new());
    if let (Some(addr), Some(ca_out)) = (&o.tls, &o.tls_ca_out) {
        let tls = crate::tls::origin("origin.test", o.tls_tickets)?;
        // Written before the listener exists: whoever waits for the port finds the file.
        std::fs::write(ca_out, &tls.ca_pem).map_err(|e| format!("{ca_out}: {e}"))?;
        let acceptor = TlsAcceptor::from(tls.server);
        let responses = Arc::clone(&responses);
        let l = bind(addr).await?;
        // [full, resumed] handshakes, reported on stderr while they change
        let kinds = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        tasks.spawn(report_handshakes(Arc::clone(&kinds)));
        tasks.spawn(accept_loop(l, "tls", move |s| {
            let (acceptor, responses) = (acceptor.clone(), Arc::clone(&responses));
            let kinds = Arc::clone(&kinds);
            async move {
                let s = acceptor.accept(s).await?;
                let resumed =
                    s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                kinds[usize::from(resumed)].fetch_add(1, Ordering::Relaxed);
                http_conn(s, responses).await
            }
        }));
    }
    if let Some(addr) = &o.http {
        let responses = Arc::clone(&responses);
        let l = bind(addr).await?;
        tasks.spawn(accept_loop(l, "http", move |s| {
            http_conn(s, Arc::clone(&responses))
        }));
    }
    if let Some(addr) = &o.echo {
        tasks.spawn(accept_loop(bind(addr).await?, "echo", echo_conn));
    }
    if let Some(addr) = &o.source {
        tasks.spawn(accept_loop(bind(addr).await?, "source", source_conn));
    }
    eprintln!(
        "loadgen origins: http={} echo={} source={} tls={}",
        o.http.as_deref().unwrap_or("-"),
        o.echo.as_deref().unwrap_or("-"),
        o.source.as_deref().unwrap_or("-"),
        o.tls.as_deref().unwrap_or("-")
    );
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Every second the TLS origin's handshakes changed: how many were full and
/// how many resumed a session (evidence that a proxy resumed its side).
async fn report_handshakes(kinds: Arc<[AtomicU64; 2]>) {
    let mut last = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (
            kinds[0].load(Ordering::Relaxed),
            kinds[1].load(Ordering::Relaxed),
        );
        if now != last {
            eprintln!(
                "loadgen origins: tls handshakes: {} full, {} resumed",
                now.0, now.1
            );
            last = now;
        }
    }
}

/// A listener with a deep accept queue: thousands of tunnels open at once in
/// idle-tunnels, and a dropped SYN costs a one-second retransmission.
async fn bind(addr: &str) -> Result<TcpListener, String> {
    let fail = |e: io::Error| format!("bind {addr}: {e}");
    let sa = tokio::net::lookup_host(addr)
        .await
        .map_err(fail)?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))?;
    let sock = if sa.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(fail)?;
    sock.set_reuseaddr(true).map_err(fail)?;
    sock.bind(sa).map_err(fail)?;
    sock.listen(4096).map_err(fail)
}

async fn accept_loop<F, Fut>(l: TcpListener, name: &'static str, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let mut warned = false;
    loop {
        match l.accept().await {
            Ok((s, _)) => {
                let _ = s.set_nodelay(true);
                tokio::spawn(handle(s));
            }
            Err(e) => {
                // e.g. out of descriptors: say so once, back off, go on
                if !warned {
                    eprintln!("loadgen origins: {name} accept: {e}");
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Whole responses (head and body), built once: [keep-alive, close] for each path.
struct Responses {
    small: [Vec<u8>; 2],
    large: [Vec<u8>; 2],
    empty: [Vec<u8>; 2],
}

impl Responses {
    fn new() -> Responses {
        let make = |n: usize| {
            [false, true].map(|close| {
                let conn = if close { "Connection: close\r\n" } else { "" };
                let mut r = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n{conn}\r\n"
                )
                .into_bytes();
                r.resize(r.len() + n, b'x');
                r
            })
        };
        Responses {
            small: make(SMALL),
            large: make(LARGE),
            empty: make(0),
        }
    }
}

async fn http_conn<S: AsyncRead + AsyncWrite + Unpin>(
    s: S,
    responses: Arc<Responses>,
) -> io::Result<()> {
    let mut c = Conn::new(s);
    while let Some(head) = c.read_head().await? {
        if head.chunked {
            c.skip_chunked().await?;
        } else if let Some(n) = head.content_length {
            c.skip(n).await?;
        }
        // origin-form or absolute-form
        let target = head.target();
        let path = match target.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
            None => target,
        };
        let variants = match path {
            "/small" => &responses.small,
            "/large" => &responses.large,
            _ => &responses.empty,
        };
        c.write_all(&variants[usize::from(head.close)]).await?;
        if head.close {
            return Ok(());
        }
    }
    Ok(())
}

async fn echo_conn(mut s: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        s.write_all(&buf[..n]).await?;
    }
}

async fn source_conn(mut s: TcpStream) -> io::Result<()> {
    let buf = vec![b's'; 64 * 1024];
    loop {
        // runs until the reader goes away (write error)
        s.write_all(&buf).await?;
    }
}

//! Just enough HTTP/1.1 for the bench: a buffered connection that reads
//! message heads and skips bodies (Content-Length, chunked, or to EOF).

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest message head accepted.
const MAX_HEAD: usize = 64 * 1024;
const READ_CHUNK: usize = 16 * 1024;

pub fn err(msg: impl Into<String>) -> io::Error {
    io::Error::other(msg.into())
}

/// The parts of a request or response head that the bench looks at.
#[derive(Debug, Default)]
pub struct Head {
    /// Request line or status line.
    pub first: String,
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// `Connection: close`, or HTTP/1.0 without `Connection: keep-alive`.
    pub close: bool,
}

impl Head {
    fn parse(raw: &[u8]) -> io::Result<Head> {
        let text = std::str::from_utf8(raw).map_err(|_| err("message head is not UTF-8"))?;
        let mut lines = text.split("\r\n");
        let first = lines.next().unwrap_or_default().to_string();
        let http10 = first.starts_with("HTTP/1.0") || first.ends_with("HTTP/1.0");
        let mut h = Head {
            first,
            close: http10,
            ..Head::default()
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                h.content_length = Some(
                    value
                        .parse()
                        .map_err(|_| err(format!("bad Content-Length {value:?}")))?,
                );
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                h.chunked = value.to_ascii_lowercase().contains("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    h.close = true;
                } else if v.contains("keep-alive") {
                    h.close = false;
                }
            }
        }
        Ok(h)
    }

    /// The status code of a response head.
    pub fn status(&self) -> io::Result<u16> {
        let mut parts = self.first.split(' ');
        let version = parts.next().unwrap_or_default();
        let code = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/") {
            return Err(err(format!("not an HTTP status line: {:?}", self.first)));
        }
        code.parse()
            .map_err(|_| err(format!("bad status line {:?}", self.first)))
    }

    /// The request target of a request head.
    pub fn target(&self) -> &str {
        self.first.split(' ').nth(1).unwrap_or("")
    }
}

/// A stream (TCP, or TLS over TCP) with a read buffer.
pub struct Conn<S = TcpStream> {
    pub s: S,
    buf: Vec<u8>,
    pos: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub fn new(s: S) -> Conn<S> {
        Conn {
            s,
            buf: Vec::with_capacity(READ_CHUNK),
            pos: 0,
        }
    }

    /// Buffered bytes not yet consumed.
    fn pending(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    /// Read more from the socket; Ok(0) at EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 0 && self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(READ_CHUNK);
        self.s.read_buf(&mut self.buf).await
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.s.write_all(data).await
    }

    /// Read one message head. Ok(None): the peer closed (or reset) the
    /// connection before sending a byte of it.
    pub async fn read_head(&mut self) -> io::Result<Option<Head>> {
        let mut searched = 0;
        loop {
            if let Some(at) = find(&self.pending()[searched..], b"\r\n\r\n") {
                let end = self.pos + searched + at;
                let head = Head::parse(&self.buf[self.pos..end])?;
                self.pos = end + 4;
                return Ok(Some(head));
            }
            searched = self.pending().len().saturating_sub(3);
            if self.pending().len() > MAX_HEAD {
                return Err(err("message head longer than 64 KiB"));
            }
            let had = self.pending().len();
            match self.fill().await {
                Ok(0) if had == 0 => return Ok(None),
                Ok(0) => return Err(err("connection closed inside a message head")),
                Ok(_) => {}
                Err(e) if had == 0 && e.kind() == io::ErrorKind::ConnectionReset => {
                    return Ok(None)
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Consume exactly n body bytes.
    pub async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        loop {
            let take = (self.pending().len() as u64).min(n);
            self.pos += take as usize;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            if self.fill().await? == 0 {
                return Err(err("connection closed inside a body"));
            }
        }
    }

    /// One CRLF-terminated line (without the CRLF).
    async fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(at) = find(self.pending(), b"\r\n") {
                let line = String::from_utf8_lossy(&self.pending()[..at]).into_owned();
                self.pos += at + 2;
                return Ok(line);
            }
            if self.pending().len() > MAX_HEAD {
                return Err(err("chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(err("connection closed inside a chunked body"));
            }
        }
    }

    /// Consume a chunked body, trailers included.
    pub async fn skip_chunked(&mut self) -> io::Result<()> {
        loop {
            let line = self.line().await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| err(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // trailers up to the empty line
                while !self.line().await?.is_empty() {}
                return Ok(());
            }
            self.skip(size + 2).await?;
        }
    }

    /// Consume everything until the peer closes.
    pub async fn skip_to_eof(&mut self) -> io::Result<()> {
        self.pos = self.buf.len();
        while self.fill().await? > 0 {
            self.pos = self.buf.len();
        }
        Ok(())
    }

    /// Consume the body of a response to a GET. Ok(true): the connection can be reused.
    pub async fn skip_response_body(&mut self, head: &Head) -> io::Result<bool> {
        let code = head.status()?;
        if (100..200).contains(&code) || code == 204 || code == 304 {
            return Ok(!head.close);
        }
        if head.chunked {
            self.skip_chunked().await?;
        } else if let Some(n) = head.content_length {
            self.skip(n).await?;
        } else {
            self.skip_to_eof().await?;
            return Ok(false);
        }
        Ok(!head.close)
    }

    pub fn into_stream(self) -> S {
        self.s
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = Head::parse(b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\nConnection: Keep-Alive")
            .unwrap();
        assert_eq!(h.status().unwrap(), 200);
        assert_eq!(h.content_length, Some(1024));
        assert!(!h.close && !h.chunked);
        let h = Head::parse(b"HTTP/1.0 403 Forbidden\r\nTransfer-Encoding: chunked").unwrap();
        assert_eq!(h.status().unwrap(), 403);
        assert!(h.close && h.chunked);
        let h = Head::parse(b"GET http://origin.test:1/small HTTP/1.1\r\nHost: x").unwrap();
        assert_eq!(h.target(), "http://origin.test:1/small");
        assert!(Head::parse(b"SSH-2.0").unwrap().status().is_err());
    }
}

//! Refusals: the only mapping from a reason to an HTTP response (the
//! status itself is the reason's, [`Reason::status`]).
//!
//! Every refusal before a response carries `Connection: close`, an
//! `X-Egress-Error: <reason>` header and a short text body naming the reason
//! and the record id.
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use super::body::ProxyBody;
use crate::audit::format_id;
use crate::reason::Reason;

/// The header naming the reason of a refusal.
pub const X_EGRESS_ERROR: &str = "x-egress-error";

/// A refusal on its way to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub reason: Reason,
    /// Seconds, for 429.
    pub retry_after: Option<u64>,
}

impl Refusal {
    /// A refusal with the reason's usual status.
    pub fn new(reason: Reason) -> Self {
        Refusal {
            status: reason.status(),
            reason,
            retry_after: None,
        }
    }

    /// 429 `rate_limited` with `Retry-After`.
    pub fn rate_limited(retry_after: u64) -> Self {
        Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: Reason::RateLimited,
            retry_after: Some(retry_after),
        }
    }

    /// The same reason with another status (504 for a DNS time-out).
    pub fn with_status(reason: Reason, status: StatusCode) -> Self {
        Refusal {
            status,
            reason,
            retry_after: None,
        }
    }

    /// The text body: the reason, what it means, and the record id.
    fn body(&self, id: u64) -> String {
        format!(
            "egress-proxy refused this request: {} ({})\nid: {}\n",
            self.reason.as_str(),
            self.reason.describe(),
            format_id(id)
        )
    }

    /// The response sent to the client.
    pub fn response(&self, id: u64, realm: Option<&str>) -> Response<ProxyBody> {
        let body = self.body(id);
        let mut resp = Response::new(ProxyBody::full(Bytes::from(body)));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(
            X_EGRESS_ERROR,
            HeaderValue::from_static(self.reason.as_str()),
        );
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
            let realm = realm.unwrap_or("egress-proxy").replace('"', "");
            if let Ok(v) =
                HeaderValue::from_str(&format!("Basic realm=\"{realm}\", charset=\"UTF-8\""))
            {
                h.insert(header::PROXY_AUTHENTICATE, v);
            }
        }
        resp
    }

    /// The same response as raw HTTP/1.1 bytes, for refusals made before
    /// hyper reads the request (connection limit, client ACL).
    pub fn raw(&self, id: u64) -> Vec<u8> {
        let body = self.body(id);
        format!(
            "HTTP/1.1 {} {}\r\nconnection: close\r\nx-egress-error: {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n\r\n{}",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or(""),
            self.reason.as_str(),
            body.len(),
            body
        )
        .into_bytes()
    }
}

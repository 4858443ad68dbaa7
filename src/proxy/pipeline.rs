//! The request pipeline: admit (head size, rates, proxy auth) -> target
//! ([`crate::target::from_request`]) -> decide (the policy, a body on a
//! body-less method, the rule's rate) -> dispatch ([`super::http`] or
//! [`super::connect`]). Each step returns `Result<_, Refusal>`; [`handle`]
//! turns a refusal into its response and record, in one place.
//!
//! The inner requests of an inspected tunnel go through the same steps
//! ([`check_head`], [`client_rates`], [`decide`]), with the tunnel's target.
use std::net::IpAddr;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response};
use tracing::Instrument;

use super::body::ProxyBody;
use super::error::Refusal;
use super::groups::GroupCache;
use super::txn::Txn;
use super::{http, ConnCtx, Guards, Snapshot};
use crate::audit::Decided;
use crate::auth::Auth;
use crate::config::Settings;
use crate::policy::{Decision, Verdict};
use crate::reason::Reason;
use crate::target::{self, Target};

/// Handle one request on its own task, started now.
///
/// Not in the service future: hyper drops that future, wherever it is, when
/// the client closes its connection (`half_close(false)`), and a request
/// read whole would then go unrecorded, or be recorded without the dial it
/// made. On its own task it is decided, dialled and recorded like any
/// other, and its answer is dropped (recorded `client_closed`, with the
/// status it would have had). Every step is bounded by a time-out; a hard
/// shutdown cuts it (recorded `shutdown`).
pub(super) fn spawn_handle(
    ctx: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> tokio::task::JoinHandle<Response<ProxyBody>> {
    let shared = Arc::clone(&ctx.shared);
    let hard = shared.drain.hard.clone();
    let txn = shared.txn(ctx.client);
    // Boxed: the request's state (a few kilobytes) is built once on the
    // heap and the runtime moves a pointer, not the whole future, through
    // its spawn path.
    shared.drain.tracker.spawn(
        Box::pin(async move {
            tokio::select! {
                resp = handle(ctx, txn, req) => resp,
                () = hard.cancelled() => Refusal::new(Reason::Shutdown).response(0, None),
            }
        })
        .instrument(tracing::Span::current()),
    )
}

/// A handler task that panicked (its record was written as it unwound).
pub(super) fn internal_error() -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::empty());
    *resp.status_mut() = ::http::StatusCode::INTERNAL_SERVER_ERROR;
    resp.headers_mut().insert(
        ::http::header::CONNECTION,
        ::http::HeaderValue::from_static("close"),
    );
    resp
}

/// One request on its way through the pipeline once it is decided: what
/// the steps learned, carried to the dispatch as one value.
pub struct Exchange {
    /// The snapshot loaded once for this request: the guards' per-rule
    /// vectors index this settings' rules.
    pub snapshot: Arc<Snapshot>,
    pub txn: Txn,
    pub target: Target,
    pub decision: Decision,
}

impl Exchange {
    /// The rule that decided, if any.
    pub fn rule(&self) -> Option<&crate::policy::Rule> {
        self.decision
            .rule
            .and_then(|i| self.snapshot.policy.rule(i))
    }

    /// Record and answer a refusal at the dispatch step.
    pub fn refuse(self, refusal: Refusal) -> Response<ProxyBody> {
        refuse(self.txn, refusal, &self.snapshot)
    }
}

/// One request: admit, parse the target, decide, then forward or tunnel.
/// Each step refuses by returning its [`Refusal`]; the refusal is recorded
/// and answered here, in one place.
pub(super) async fn handle(
    ctx: Arc<ConnCtx>,
    mut txn: Txn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let shared = &ctx.shared;
    txn.rec().method = Some(req.method().clone());
    if req.method() != Method::CONNECT {
        // The URI as received until the target is parsed (a refusal of a
        // malformed one shows it); then what is forwarded.
        txn.rec().url = Some(truncate(req.uri().to_string(), 4096));
    }
    shared.audit.ready().await;
    // One load for the whole request (and any tunnel it opens).
    let snapshot = shared.settings.load_full();
    let steps = match admit(&ctx, &snapshot, &mut txn, &req).await {
        Ok(()) => target(&mut txn, &req)
            .and_then(|t| decide(&snapshot, &ctx.groups, &mut txn, &t, &req).map(|d| (t, d))),
        Err(r) => Err(r),
    };
    let (target, decision) = match steps {
        Ok(x) => x,
        Err(r) => return refuse(txn, r, &snapshot),
    };
    txn.set_decision(match decision.verdict {
        // Let through and recorded as `report`; like any clean success it
        // carries no reason (DESIGN.md), unless it ends abnormally.
        Verdict::Report => Decided::Report,
        Verdict::Bypass => Decided::Bypass,
        Verdict::Allow => Decided::Allow,
        Verdict::Deny => Decided::Deny,
    });
    let x = Exchange {
        snapshot,
        txn,
        target,
        decision,
    };
    if req.method() == Method::CONNECT {
        super::connect::tunnel(&ctx, x, req).await
    } else {
        super::http::forward(&ctx, x, req).await
    }
}

/// Admission, before the target is looked at: head size, rates, proxy auth.
async fn admit(
    ctx: &ConnCtx,
    snapshot: &Snapshot,
    txn: &mut Txn,
    req: &Request<Incoming>,
) -> Result<(), Refusal> {
    check_head(req, snapshot)?;
    // Rates first: a client over its rate gets 429 before any password is
    // verified, so guessing credentials is limited like everything else.
    client_rates(
        &snapshot.guards,
        ctx.client.ip(),
        req.method() == Method::CONNECT,
    )?;
    if let Some(auth) = &snapshot.guards.auth {
        let user = authenticate(auth, req).await.map_err(Refusal::new)?;
        txn.rec().user = Some(user);
    }
    Ok(())
}

/// hyper bounds a head that arrives in pieces; one that arrives whole in a
/// single read can pass its buffer check, so measure it here too.
pub(crate) fn check_head<B>(req: &Request<B>, settings: &Settings) -> Result<(), Refusal> {
    if head_len(req) > settings.limits.max_header_bytes {
        return Err(Refusal::new(Reason::HeaderTooLarge));
    }
    Ok(())
}

/// The client's request rate, and for a CONNECT its tunnel rate.
pub(crate) fn client_rates(guards: &Guards, ip: IpAddr, connect: bool) -> Result<(), Refusal> {
    let limited = |l: crate::limits::Limited| Refusal::rate_limited(l.retry_after);
    guards.rates.request(ip).map_err(limited)?;
    if connect {
        guards.rates.tunnel(ip).map_err(limited)?;
    }
    Ok(())
}

/// The target step: parse it and put it in the record (for a plain
/// request, with the URL that will be forwarded).
fn target(txn: &mut Txn, req: &Request<Incoming>) -> Result<Target, Refusal> {
    let target = target::from_request(req).map_err(|e| {
        let client = txn.rec().client;
        tracing::debug!(error = %e, %client, "bad request target");
        Refusal::new(Reason::BadRequest)
    })?;
    txn.set_target(&target);
    if req.method() != Method::CONNECT {
        txn.rec().url = Some(truncate(http::forwarded_url(&target, req.uri()), 4096));
    }
    Ok(target)
}

/// The decision step, for plain requests and inspected inner requests
/// alike: the policy for (target, method), then a body on a body-less
/// method, then the rule's rate. The rule goes into the record first, so a
/// refusal names it.
pub(crate) fn decide<B: hyper::body::Body>(
    snapshot: &Snapshot,
    groups: &GroupCache,
    txn: &mut Txn,
    target: &Target,
    req: &Request<B>,
) -> Result<Decision, Refusal> {
    let policy = &snapshot.policy;
    // The client's groups (none configured: nothing to do), resolved once
    // per connection, with the user after proxy auth; never the catalog.
    let groups = if policy.client_groups().is_empty() {
        crate::policy::GroupSet::EVERYONE
    } else {
        let rec = txn.rec();
        let (set, names) = groups.groups(policy, rec.client.ip(), rec.user.as_ref());
        rec.client_group = names;
        set
    };
    let decision = policy.decide_for(target, req.method(), groups);
    txn.set_rule(decision.rule.and_then(|i| policy.rule_name(i)));
    if decision.verdict == Verdict::Deny {
        let reason = decision.reason.unwrap_or(Reason::NotInCatalog);
        return Err(Refusal::new(reason));
    }
    let rule = decision.rule.and_then(|i| policy.rule(i));
    if rule.is_some_and(|r| body_refused(r, req)) {
        // Before the rule's rate: a refused request takes no token.
        return Err(Refusal::new(Reason::BodyNotAllowed));
    }
    if let Some(Err(l)) = decision.rule.map(|i| snapshot.guards.rates.rule(i)) {
        return Err(Refusal::rate_limited(l.retry_after));
    }
    Ok(decision)
}

/// A body on a method the rule allows only without one (a `methods` rule's
/// GET or HEAD): any `Transfer-Encoding`, or a `Content-Length` above 0.
/// An update mirror allowed for downloads must not carry an upload.
///
/// Shared by every request path: plain HTTP here, inspected requests too.
pub fn body_refused<B: hyper::body::Body>(rule: &crate::policy::Rule, req: &Request<B>) -> bool {
    if rule.allows_body(req.method()) {
        return false;
    }
    req.headers()
        .contains_key(::http::header::TRANSFER_ENCODING)
        || !req.body().is_end_stream()
}

/// The size of a request head as sent (request line and header lines).
pub(crate) fn head_len<B>(req: &Request<B>) -> usize {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// Check `Proxy-Authorization` before any policy decision. Verified
/// credentials come from the cache; a miss is verified off the runtime.
pub(super) async fn authenticate(
    auth: &Arc<Auth>,
    req: &Request<Incoming>,
) -> Result<Arc<str>, Reason> {
    let Some(value) = req.headers().get(hyper::header::PROXY_AUTHORIZATION) else {
        return Err(Reason::AuthRequired);
    };
    if let Some(user) = auth.cached(value.as_bytes()) {
        return Ok(user);
    }
    let Ok(_permit) = auth.verifying.acquire().await else {
        return Err(Reason::AuthFailed);
    };
    let auth2 = Arc::clone(auth);
    let value = value.as_bytes().to_vec();
    tokio::task::spawn_blocking(move || auth2.verify(&value))
        .await
        .unwrap_or(Err(Reason::AuthFailed))
}

/// Record and answer a refusal.
pub(crate) fn refuse(txn: Txn, refusal: Refusal, settings: &Settings) -> Response<ProxyBody> {
    let id = txn.id();
    txn.refuse(refusal.status.as_u16(), refusal.reason);
    refusal.response(id, Some(&settings.auth.realm))
}

pub(crate) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

//! The operator's face: everything that shows the proxy to a person or a
//! script rather than carrying traffic. Nothing here is on the request
//! path, and nothing on the request path calls into here.
//!
//! - [`cli`]: the `check` summary and `explain` output.
//! - [`suggest`]: catalog rules for what an audit log (or the status page)
//!   shows denied.
//! - [`import`]: a catalog from a Squid configuration.
//! - [`replay`]: what a new catalog would change for a recorded log.
//! - [`admin`]: the admin listener (probes, `/metrics`, the status page and
//!   `/api/*`).
//! - [`session`]: the status page's sign-in sessions when a token is set.
pub mod admin;
pub mod cli;
pub mod import;
pub mod replay;
pub mod session;
pub mod suggest;

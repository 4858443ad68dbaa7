//! Integration tests: the proxy in-process on port 0, real loopback origins,
//! real clients. One test binary (each tests/*.rs would link separately).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod abuse;
mod admin;
mod attacks;
mod audit_faults;
mod auth;
mod catalog_seed;
mod cli;
mod client_groups;
mod connect;
mod docs;
mod http_forward;
mod inspect;
mod inspect_wall;
mod lenient_tls;
mod limits;
mod operator;
mod proxy_protocol;
mod records;
mod refusals;
mod reload;
mod schema;
mod splice;
mod status;
mod support;
mod upstreams;

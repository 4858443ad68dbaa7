//! Integration tests: the proxy in-process on port 0, real loopback origins,
//! real clients. One test binary (each tests/*.rs would link separately).
mod catalog_seed;
mod cli;
mod connect;
mod http_forward;
mod support;

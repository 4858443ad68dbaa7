//! loadgen: loopback origins and a load generator for comparing forward proxies.
//!
//! `loadgen origins` serves an HTTP origin, a TCP echo origin and a TCP source
//! origin on loopback. `loadgen run` drives one scenario through a proxy (or
//! directly) and prints one report. `benches/compare.sh` uses both.

mod args;
mod hist;
mod http;
mod origin;
mod report;
mod run;
mod tls;

use std::process::ExitCode;

const USAGE: &str = "\
Usage:
  loadgen origins [--http ADDR] [--echo ADDR] [--source ADDR] [--tls ADDR --tls-ca-out FILE
                  [--tls-tickets N]]
  loadgen run --scenario NAME --proxy HOST:PORT|direct --target HOST:PORT [options]

origins (each given one is served until the process is killed):
  --http ADDR       HTTP/1.1 keep-alive origin: /small = 1 KiB, /large = 1 MiB, other paths empty
  --echo ADDR       TCP echo origin
  --source ADDR     TCP origin that writes as fast as the reader takes
  --tls ADDR        the HTTP origin inside TLS (TLS 1.3/1.2, ALPN http/1.1), with a
                    leaf for origin.test and 127.0.0.1 from a CA generated at start
  --tls-ca-out FILE where --tls writes that CA certificate (PEM) before it listens;
                    every second its handshakes changed, --tls reports on stderr how
                    many were full and how many resumed
  --tls-tickets N   TLS 1.3 session tickets (stateless) the TLS origin sends after each
                    handshake (default 0: nothing can be resumed; loadgen's own clients
                    never resume, a proxy's re-originated TLS may)

run:
  --scenario NAME   http-forward | connect-rr | connect-bulk | connect-rate | idle-tunnels |
                    tls-rate | tls-rr
                    tls-rate: new connection, CONNECT, full TLS handshake (SNI, no
                    resumption), one GET of --path, close; tls-rr: CONNECT and TLS
                    once, then keep-alive GETs of --path inside the tunnel
  --proxy ADDR      proxy HOST:PORT, or `direct` to connect to the target itself
  --target H:P      the origin as the proxy sees it (origin.test:18080); with `direct`
                    it must resolve here (127.0.0.1:18080)
  --conns N         connections, tunnels or workers (default 32)
  --duration SECS   measured seconds; idle-tunnels: seconds to hold (default 5, at most 3600)
  --path PATH       http-forward request path (default /small)
  --size BYTES      connect-rr / connect-rate / idle-tunnels message size (default 64)
  --pid PID         idle-tunnels: proxy process whose VmRSS is read (repeatable, summed)
  --label NAME      system name copied into the report
  --json            print one JSON object instead of text
  --ca FILE         TLS scenarios: trust the CA certificates in FILE (PEM; repeatable):
                    the origin's (--tls-ca-out) through a plain tunnel or direct, the
                    proxy's own CA when it inspects
  --server-name N   TLS scenarios: SNI sent and name verified (default origin.test)

global:
  --threads N       runtime worker threads (default: CPUs in the affinity mask;
                    1 = a current-thread runtime)
  -h, --help        this help
";

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.is_empty() || argv.iter().any(|a| a == "-h" || a == "--help") {
        print!("{USAGE}");
        return if argv.is_empty() {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    match real_main(argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(argv: Vec<String>) -> Result<(), String> {
    let cmd = args::parse(argv)?;
    // Thousands of tunnels need thousands of descriptors: take the hard limit.
    if let Ok((_, hard)) = rlimit::Resource::NOFILE.get() {
        let _ = rlimit::Resource::NOFILE.set(hard, hard);
    }
    // available_parallelism honours the affinity mask, so `taskset -c 0` gives one thread.
    let threads = cmd
        .threads()
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let rt = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        match cmd {
            args::Cmd::Origins(o) => origin::serve(o).await,
            args::Cmd::Run(r) => run::run(r).await,
        }
    })
}

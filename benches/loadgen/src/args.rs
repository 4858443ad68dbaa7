//! Command-line parsing, by hand: a dozen flags do not need a parser crate.

use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    HttpForward,
    ConnectRr,
    ConnectBulk,
    ConnectRate,
    IdleTunnels,
    TlsRate,
    TlsRr,
}

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::HttpForward,
        Scenario::ConnectRr,
        Scenario::ConnectBulk,
        Scenario::ConnectRate,
        Scenario::IdleTunnels,
        Scenario::TlsRate,
        Scenario::TlsRr,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::HttpForward => "http-forward",
            Scenario::ConnectRr => "connect-rr",
            Scenario::ConnectBulk => "connect-bulk",
            Scenario::ConnectRate => "connect-rate",
            Scenario::IdleTunnels => "idle-tunnels",
            Scenario::TlsRate => "tls-rate",
            Scenario::TlsRr => "tls-rr",
        }
    }

    /// Speaks TLS inside the tunnel (or straight to the origin when direct).
    pub fn tls(self) -> bool {
        matches!(self, Scenario::TlsRate | Scenario::TlsRr)
    }
}

pub struct Origins {
    pub http: Option<String>,
    pub echo: Option<String>,
    pub source: Option<String>,
    pub tls: Option<String>,
    /// Where the TLS origin writes its CA certificate (PEM).
    pub tls_ca_out: Option<String>,
    /// TLS 1.3 tickets the TLS origin sends per handshake (0: none).
    pub tls_tickets: usize,
    pub threads: Option<usize>,
}

pub struct Run {
    pub scenario: Scenario,
    /// None: connect to the target itself.
    pub proxy: Option<String>,
    pub target: String,
    pub conns: usize,
    pub duration: Duration,
    pub path: String,
    pub size: usize,
    pub pids: Vec<u32>,
    pub label: String,
    pub json: bool,
    pub threads: Option<usize>,
    /// TLS scenarios: PEM files of the CAs trusted for the server's certificate.
    pub cas: Vec<String>,
    /// TLS scenarios: the SNI sent and the name verified.
    pub server_name: String,
}

pub enum Cmd {
    Origins(Origins),
    Run(Run),
}

impl Cmd {
    pub fn threads(&self) -> Option<usize> {
        match self {
            Cmd::Origins(o) => o.threads,
            Cmd::Run(r) => r.threads,
        }
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: &str) -> Result<T, String> {
    v.parse()
        .map_err(|_| format!("{flag}: not a number: {v:?}"))
}

pub fn parse(argv: Vec<String>) -> Result<Cmd, String> {
    let mut it = argv.into_iter();
    let sub = it.next().unwrap_or_default();
    let mut flags: Flags = Vec::new();
    while let Some(flag) = it.next() {
        let takes_value = !matches!(flag.as_str(), "--json");
        let value = if takes_value {
            Some(it.next().ok_or_else(|| format!("{flag} needs a value"))?)
        } else {
            None
        };
        flags.push((flag, value));
    }
    match sub.as_str() {
        "origins" => origins(flags),
        "run" => run(flags),
        other => Err(format!(
            "unknown command {other:?}: origins or run (see --help)"
        )),
    }
}

type Flags = Vec<(String, Option<String>)>;

fn origins(flags: Flags) -> Result<Cmd, String> {
    let mut o = Origins {
        http: None,
        echo: None,
        source: None,
        tls: None,
        tls_ca_out: None,
        tls_tickets: 0,
        threads: None,
    };
    for (flag, v) in flags {
        let v = v.unwrap_or_default();
        match flag.as_str() {
            "--http" => o.http = Some(v),
            "--echo" => o.echo = Some(v),
            "--source" => o.source = Some(v),
            "--tls" => o.tls = Some(v),
            "--tls-ca-out" => o.tls_ca_out = Some(v),
            "--tls-tickets" => o.tls_tickets = num(&flag, &v)?,
            "--threads" => o.threads = Some(num(&flag, &v)?),
            _ => return Err(format!("origins: unknown option {flag} (see --help)")),
        }
    }
    if o.http.is_none() && o.echo.is_none() && o.source.is_none() && o.tls.is_none() {
        return Err("origins: give at least one of --http, --echo, --source, --tls".into());
    }
    if o.tls.is_some() != o.tls_ca_out.is_some() {
        return Err("origins: --tls and --tls-ca-out go together".into());
    }
    Ok(Cmd::Origins(o))
}

fn run(flags: Flags) -> Result<Cmd, String> {
    let mut scenario = None;
    let mut proxy = None;
    let mut target = None;
    let mut r = Run {
        scenario: Scenario::HttpForward,
        proxy: None,
        target: String::new(),
        conns: 32,
        duration: Duration::from_secs(5),
        path: "/small".into(),
        size: 64,
        pids: Vec::new(),
        label: String::new(),
        json: false,
        threads: None,
        cas: Vec::new(),
        server_name: "origin.test".into(),
    };
    for (flag, v) in flags {
        if flag == "--json" {
            r.json = true;
            continue;
        }
        let v = v.unwrap_or_default();
        match flag.as_str() {
            "--scenario" => {
                scenario = Some(
                    Scenario::ALL
                        .into_iter()
                        .find(|s| s.name() == v)
                        .ok_or_else(|| format!("unknown scenario {v:?}"))?,
                )
            }
            "--proxy" => proxy = Some(v),
            "--target" => target = Some(v),
            "--conns" => r.conns = num(&flag, &v)?,
            "--duration" => {
                let secs: f64 = num(&flag, &v)?;
                if !(secs > 0.0 && secs <= 3600.0) {
                    return Err("--duration must be in (0, 3600] seconds".into());
                }
                r.duration = Duration::from_secs_f64(secs);
            }
            "--path" => r.path = v,
            "--size" => r.size = num(&flag, &v)?,
            "--pid" => r.pids.push(num(&flag, &v)?),
            "--label" => r.label = v,
            "--threads" => r.threads = Some(num(&flag, &v)?),
            "--ca" => r.cas.push(v),
            "--server-name" => r.server_name = v,
            _ => return Err(format!("run: unknown option {flag} (see --help)")),
        }
    }
    r.scenario = scenario.ok_or("run: --scenario is required")?;
    let proxy = proxy.ok_or("run: --proxy is required (HOST:PORT or direct)")?;
    r.proxy = (proxy != "direct").then_some(proxy);
    r.target = target.ok_or("run: --target is required")?;
    if r.conns == 0 || r.size == 0 {
        return Err("--conns and --size must be positive".into());
    }
    Ok(Cmd::Run(r))
}

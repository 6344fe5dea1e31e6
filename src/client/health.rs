//! `contactd health`: a probe for monitoring, with grpc_health_probe's exit
//! codes so existing scripts and checks work unchanged.

use std::{process::ExitCode, time::Duration};

use tonic::transport::Endpoint;

use crate::tls::ClientTls;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// grpc_health_probe's exit codes.
pub mod exit {
    /// The service is SERVING.
    pub const SERVING: u8 = 0;
    /// Bad command-line arguments.
    pub const BAD_ARGUMENTS: u8 = 1;
    /// No connection could be made.
    pub const CONNECTION_FAILURE: u8 = 2;
    /// The RPC failed or timed out.
    pub const RPC_FAILURE: u8 = 3;
    /// The service answered, but not SERVING.
    pub const UNHEALTHY: u8 = 4;
}

/// What `contactd health` asks.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub addr: &'a str,
    /// "" for the whole server.
    pub service: &'a str,
    /// For the connection, and for the answer.
    pub timeout: Duration,
    /// Keep asking until SERVING for this long (0: once).
    pub wait: Duration,
    /// Over TLS with this.
    pub tls: Option<&'a ClientTls>,
}

/// Between two questions of `--wait`.
const WAIT_EVERY: Duration = Duration::from_millis(100);

/// Asks for the health of the service, printing the outcome, and returns
/// the exit code: with `--wait`, again every 100ms until SERVING or until
/// the wait is over (then the last answer's code).
pub fn run(ask: &Ask<'_>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(exit::RPC_FAILURE);
        }
    };
    let (code, message) = runtime.block_on(async {
        let deadline = tokio::time::Instant::now() + ask.wait;
        loop {
            let (code, message) = check(ask.addr, ask.service, ask.timeout, ask.tls).await;
            let now = tokio::time::Instant::now();
            if code == exit::SERVING || code == exit::BAD_ARGUMENTS || now >= deadline {
                return (code, message);
            }
            // Polling: a server that is not up yet has no event to wait on.
            tokio::time::sleep(WAIT_EVERY.min(deadline - now)).await;
        }
    });
    if code == exit::SERVING {
        // A closed stdout is not the probe's failure: the code says it all.
        let _ = crate::client::write_out(&format!("{message}\n"));
    } else {
        eprintln!("{message}");
    }
    ExitCode::from(code)
}

/// Why [`dial`] made no connection, in a line for the user.
#[derive(Debug)]
pub enum Dial {
    /// The address or the TLS files cannot be used.
    BadArguments(String),
    /// The server could not be reached (or its TLS handshake failed).
    Failed(String),
}

/// Connects to the Contact port at `addr` (over TLS with `tls`), within
/// `timeout`; calls on the channel time out after `timeout` too.
///
/// # Errors
/// A bad address or TLS file, or no connection.
pub async fn dial(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> Result<tonic::transport::Channel, Dial> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| Dial::BadArguments(format!("error: invalid address {addr:?}: {e}")))?
        .connect_timeout(timeout)
        .timeout(timeout);
    let tls = match tls.map(|tls| crate::tls::for_url(endpoint.uri(), tls)) {
        None => None,
        Some(Ok(tls)) => tls,
        Some(Err(e)) => return Err(Dial::BadArguments(format!("error: TLS: {e}"))),
    };
    let connect = crate::tls::connect(endpoint, tls);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => Err(Dial::Failed(format!(
            "error: failed to connect to {addr}: {}",
            crate::error_chain(&e)
        ))),
        Err(_) => Err(Dial::Failed(format!(
            "error: timed out connecting to {addr} after {}",
            humantime::format_duration(timeout)
        ))),
    }
}

async fn check(
    addr: &str,
    service: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> (u8, String) {
    let channel = match dial(addr, timeout, tls).await {
        Ok(channel) => channel,
        Err(Dial::BadArguments(message)) => return (exit::BAD_ARGUMENTS, message),
        Err(Dial::Failed(message)) => {
            return (
                exit::CONNECTION_FAILURE,
                message + &speaks_tls_hint(addr, timeout, tls).await,
            );
        }
    };
    let request = HealthCheckRequest {
        service: service.to_owned(),
    };
    match HealthClient::new(channel).check(request).await {
        Ok(response) => match response.into_inner().status() {
            ServingStatus::Serving => (exit::SERVING, "status: SERVING".to_owned()),
            other => (
                exit::UNHEALTHY,
                format!("service unhealthy (responded with {})", other.as_str_name()),
            ),
        },
        Err(status) => (
            exit::RPC_FAILURE,
            format!(
                "error: health rpc failed: {}: {}{}",
                status.code(),
                status.message(),
                speaks_tls_hint(addr, timeout, tls).await
            ),
        ),
    }
}

/// After a plaintext call failed: what to do if the server speaks TLS
/// (tonic says only "transport error" then), else nothing.
pub(super) async fn speaks_tls_hint(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> String {
    if tls.is_none() && crate::tls::speaks_tls(addr, timeout).await {
        format!(
            " (the server at {addr} speaks TLS: add --tls, with --tls-ca-cert PATH for a private \
             CA such as the package's /etc/contactd/tls/ca.pem)"
        )
    } else {
        String::new()
    }
}

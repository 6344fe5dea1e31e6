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

/// Asks `addr` for the health of `service` (over TLS with `tls`), printing
/// the outcome, and returns the exit code.
pub fn run(addr: &str, service: &str, timeout: Duration, tls: Option<&ClientTls>) -> ExitCode {
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
    let (code, message) = runtime.block_on(check(addr, service, timeout, tls));
    if code == exit::SERVING {
        println!("{message}");
    } else {
        eprintln!("{message}");
    }
    ExitCode::from(code)
}

async fn check(
    addr: &str,
    service: &str,
    timeout: Duration,
    tls: Option<&ClientTls>,
) -> (u8, String) {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let endpoint = match Endpoint::from_shared(format!("{scheme}://{addr}")) {
        Ok(endpoint) => endpoint.connect_timeout(timeout).timeout(timeout),
        Err(e) => {
            return (
                exit::BAD_ARGUMENTS,
                format!("error: invalid address {addr:?}: {e}"),
            );
        }
    };
    let tls = match tls.map(|tls| crate::tls::for_url(endpoint.uri(), tls)) {
        None => None,
        Some(Ok(tls)) => tls,
        Some(Err(e)) => return (exit::BAD_ARGUMENTS, format!("error: TLS: {e}")),
    };
    let connect = crate::tls::connect(endpoint, tls);
    let channel = match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return (
                exit::CONNECTION_FAILURE,
                format!(
                    "error: failed to connect to {addr}: {}",
                    crate::error_chain(&e)
                ),
            );
        }
        Err(_) => {
            return (
                exit::CONNECTION_FAILURE,
                format!(
                    "error: timed out connecting to {addr} after {}",
                    humantime::format_duration(timeout)
                ),
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
                "error: health rpc failed: {}: {}",
                status.code(),
                status.message()
            ),
        ),
    }
}

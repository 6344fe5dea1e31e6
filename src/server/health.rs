//! `grpc.health.v1.Health` for `""` and `"Contact"`, built on tonic-health,
//! with `Watch` streams that end (UNAVAILABLE) when the server shuts down:
//! tonic-health's own never end, and an open one would hold shutdown forever.

use std::pin::Pin;

use futures_util::{Stream, StreamExt, stream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::{
    ServingStatus,
    pb::{
        HealthCheckRequest, HealthCheckResponse,
        health_server::{Health, HealthServer},
    },
    server::{HealthReporter, HealthService},
};

/// The service names whose health is reported: the whole server and Contact.
pub const SERVICES: [&str; 2] = ["", "Contact"];

/// Sets every reported service to `status`.
pub async fn set_all(reporter: &HealthReporter, status: ServingStatus) {
    for name in SERVICES {
        reporter.set_service_status(name, status).await;
    }
}

/// The health service, answering from `reporter`; its watches end when
/// `closing` is cancelled.
pub fn service(
    reporter: &HealthReporter,
    closing: CancellationToken,
) -> HealthServer<ClosingHealth> {
    HealthServer::new(ClosingHealth {
        inner: HealthService::from_health_reporter(reporter.clone()),
        closing,
    })
}

/// tonic-health's service with watches that end at shutdown.
#[derive(Debug)]
pub struct ClosingHealth {
    inner: HealthService,
    closing: CancellationToken,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for ClosingHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let updates = self.inner.watch(request).await?.into_inner();
        let closing = self.closing.clone();
        // Updates first (`biased`), so a watcher sees NOT_SERVING before the end.
        let stream = stream::unfold(Some((updates, closing)), |state| async move {
            let (mut updates, closing) = state?;
            tokio::select! {
                biased;
                item = updates.next() => item.map(|item| (item, Some((updates, closing)))),
                () = closing.cancelled() => Some((Err(super::shutting_down()), None)),
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

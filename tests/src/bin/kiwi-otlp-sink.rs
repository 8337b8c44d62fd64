//! `kiwi-otlp-sink ADDR`: a live OTLP/gRPC trace receiver (the standard `TraceService`) that accepts every
//! batch and keeps nothing but counts, for benchmarks that need a collector which answers
//! (`scripts/bench-telemetry.sh` with `OTLP=sink`). Every 5 s in which spans arrived it prints the totals
//! on stderr: `kiwi-otlp-sink: N spans in M batches`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tonic::{Request, Response, Status};

#[derive(Default, Clone)]
struct Sink {
    spans: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let spans: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(spans as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(addr) = std::env::args().nth(1) else {
        eprintln!("usage: kiwi-otlp-sink ADDR (e.g. 127.0.0.1:4317)");
        return ExitCode::from(2);
    };
    let addr: SocketAddr = match addr.parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("kiwi-otlp-sink: {addr:?} is not an address (host:port): {e}");
            return ExitCode::from(2);
        }
    };
    let sink = Sink::default();
    let report = sink.clone();
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let spans = report.spans.load(Ordering::Relaxed);
            if spans != last {
                last = spans;
                eprintln!(
                    "kiwi-otlp-sink: {spans} spans in {} batches",
                    report.batches.load(Ordering::Relaxed)
                );
            }
        }
    });
    match tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve(addr)
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kiwi-otlp-sink: cannot serve on {addr}: {e}");
            ExitCode::from(1)
        }
    }
}

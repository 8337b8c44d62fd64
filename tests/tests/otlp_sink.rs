//! `kiwi-otlp-sink`, the live OTLP receiver of `scripts/bench-telemetry.sh`: it accepts a standard OTLP
//! trace export and counts its spans; a bad address is refused with exit code 2.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

const SINK: &str = env!("CARGO_BIN_EXE_kiwi-otlp-sink");

#[tokio::test]
async fn the_sink_accepts_an_export_and_counts_its_spans() {
    let addr = kiwi_tests::ports::free_addr();
    let mut sink = Command::new(SINK)
        .arg(addr.to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        match TraceServiceClient::connect(format!("http://{addr}")).await {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the sink does not listen on {addr}: {e}"),
        }
    };
    let spans = (0..3)
        .map(|i| Span {
            name: format!("span-{i}"),
            ..Span::default()
        })
        .collect();
    client
        .export(ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..ScopeSpans::default()
                }],
                ..ResourceSpans::default()
            }],
        })
        .await
        .expect("the sink accepts the export");
    // Its report (every 5 s while spans arrive) counts them.
    let stderr = BufReader::new(sink.stderr.take().unwrap());
    let line = tokio::time::timeout(
        Duration::from_secs(15),
        tokio::task::spawn_blocking(move || stderr.lines().next()),
    )
    .await;
    sink.kill().unwrap();
    sink.wait().unwrap();
    let line = line
        .expect("no report within 15 s")
        .unwrap()
        .expect("a report line")
        .unwrap();
    assert_eq!(line, "kiwi-otlp-sink: 3 spans in 1 batches");
}

#[test]
fn a_bad_address_is_refused() {
    let o = Command::new(SINK).arg("localhost").output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not an address"),
        "{o:?}"
    );
}

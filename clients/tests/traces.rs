//! Traces end to end: a real OTLP/gRPC receiver (the standard `TraceService`, from `opentelemetry-proto`)
//! collects what three real nodes export. A put and a linearizable get sent by `kiwi-client` with a known
//! request id and a sampled W3C traceparent produce the handler, queue, storage, Raft and apply spans, all
//! in the client's trace and carrying the request id; a request without a traceparent is not sampled
//! (ratio 0); `kiwi --trace` prints a trace id that the node's spans carry; JSON log lines written for a
//! request carry its request id.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kiwi_client::{CallOptions, Client, ClientOptions, TraceParent};
use kiwi_tests::cluster::{Cluster, ClusterOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use tonic::{Request, Response, Status};

/// One span as received.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attrs: BTreeMap<String, String>,
    service: String,
}

#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<Received>>>);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.clone())
                .map(|v| match v {
                    any_value::Value::StringValue(s) => s,
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let attrs = span
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.clone()) {
                                Some(any_value::Value::StringValue(s)) => s,
                                Some(any_value::Value::IntValue(i)) => i.to_string(),
                                Some(other) => format!("{other:?}"),
                                None => String::new(),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    got.push(Received {
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        attrs,
                        service: service.clone(),
                    });
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (receiver, addr)
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Received> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// Waits until the trace has spans named `names` (the batch exporter sends every few seconds).
    async fn wait_for(&self, trace_id: &str, names: &[&str]) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.of_trace(trace_id);
            if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "trace {trace_id}: wanted spans {names:?} within 30 s, got {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traced_request_produces_spans_from_handler_to_apply_in_the_callers_trace() {
    let (receiver, otlp) = Receiver::start().await;
    let cluster = Cluster::start(ClusterOptions {
        // Ratio 0: only requests whose caller samples them are traced.
        telemetry_extra: format!("otlp_endpoint = \"http://{otlp}\"\ntrace_sample_ratio = 0.0\n"),
        log_json: true,
        ..ClusterOptions::default()
    })
    .await;
    let endpoints: Vec<String> = cluster
        .ids()
        .into_iter()
        .map(|id| cluster.addr(id).to_string())
        .collect();
    let client = Client::connect(&endpoints, ClientOptions::default()).unwrap();
    // Unsampled traffic first: it must produce no spans.
    for i in 0..20 {
        client
            .put(
                format!("plain{i}").as_bytes(),
                b"v",
                &CallOptions {
                    request_id: Some(format!("untraced-{i}")),
                    ..CallOptions::default()
                },
            )
            .await
            .unwrap();
    }

    let trace = TraceParent::new_sampled();
    let put = CallOptions {
        request_id: Some("req-traced-put".into()),
        trace: Some(trace),
        ..CallOptions::default()
    };
    client.put(b"traced", b"value", &put).await.unwrap();
    let read_trace = TraceParent::new_sampled();
    let get = CallOptions {
        request_id: Some("req-traced-get".into()),
        trace: Some(read_trace),
        ..CallOptions::default()
    };
    assert_eq!(
        client.get(b"traced", &get).await.unwrap().as_deref(),
        Some(&b"value"[..])
    );

    let spans = receiver
        .wait_for(
            &trace.trace_id_hex(),
            &[
                "kv.Put",
                "queue.wait",
                "storage",
                "raft.replicate",
                "raft.apply",
            ],
        )
        .await;
    let root = spans
        .iter()
        .find(|s| s.name == "kv.Put")
        .expect("the handler span");
    assert_eq!(
        root.parent_span_id,
        format!("{:016x}", trace.parent_span_id),
        "the handler span continues the client's span"
    );
    assert_eq!(
        root.attrs.get("request_id").map(String::as_str),
        Some("req-traced-put")
    );
    assert_eq!(
        root.attrs.get("rpc.method").map(String::as_str),
        Some("Put")
    );
    assert_eq!(
        root.attrs.get("priority").map(String::as_str),
        Some("normal")
    );
    assert_eq!(root.attrs.get("outcome").map(String::as_str), Some("ok"));
    assert_eq!(
        root.attrs.get("rpc.grpc.status_code").map(String::as_str),
        Some("0")
    );
    assert_eq!(root.service, "kiwi-node");
    for child in spans.iter().filter(|s| s.name != "kv.Put") {
        assert_eq!(
            child.parent_span_id, root.span_id,
            "{} is a child of the handler span: {spans:#?}",
            child.name
        );
    }

    let read = receiver
        .wait_for(
            &read_trace.trace_id_hex(),
            &["kv.Get", "raft.read_index", "queue.wait", "storage"],
        )
        .await;
    let get_root = read.iter().find(|s| s.name == "kv.Get").unwrap();
    assert_eq!(
        get_root.attrs.get("request_id").map(String::as_str),
        Some("req-traced-get")
    );

    // `kiwi --trace` prints the trace id its spans carry.
    let out = Command::new(env!("CARGO_BIN_EXE_kiwi"))
        .args(["--trace", "put", "cli-key", "cli-value"])
        .env("KIWI_ENDPOINTS", endpoints.join(","))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let cli_trace = stderr
        .lines()
        .find_map(|l| l.strip_prefix("trace id: "))
        .unwrap_or_else(|| panic!("no trace id printed: {stderr}"))
        .trim()
        .to_owned();
    receiver
        .wait_for(&cli_trace, &["kv.Put", "raft.apply"])
        .await;

    // Structured logs: every line is a JSON object, and the lines written for a request carry its id
    // (the request's span and its fields), traced or not.
    let mut found = Vec::new();
    for id in cluster.ids() {
        for line in cluster
            .log_tail(id, 100_000)
            .lines()
            .filter(|l| !l.is_empty())
        {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!("node {id} wrote a log line that is not JSON ({e}): {line}")
            });
            if v["fields"]["message"] == "request finished" {
                found.push(
                    v["span"]["request_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
        }
    }
    for want in ["req-traced-put", "req-traced-get", "untraced-7"] {
        assert!(
            found.iter().any(|r| r == want),
            "no log line carries request_id {want}; request ids logged: {found:?}"
        );
    }

    // Sampling ratio 0 and no traceparent: none of the untraced puts was exported.
    let exported = receiver.0.lock().unwrap().clone();
    assert!(
        !exported.iter().any(|s| s
            .attrs
            .get("request_id")
            .is_some_and(|r| r.starts_with("untraced-"))),
        "an unsampled request was exported"
    );
}

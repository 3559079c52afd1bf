//! W3C trace context: the producer's `traceparent` (and `tracestate`) header, carried by the
//! relay to the broker, becomes the OpenTelemetry parent of the handler's span, so a trace
//! runs from the request that wrote the outbox row to the effects of handling it.

use std::collections::BTreeMap;

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Message headers as a carrier for the propagator.
struct Headers<'a>(&'a BTreeMap<String, String>);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Makes the remote span named by `headers` the parent of `span`. Without a valid
/// `traceparent` the span keeps its local parent; a malformed one is ignored (and logged),
/// never a reason to refuse the message.
pub(crate) fn adopt_remote_parent(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let Some(traceparent) = headers.get("traceparent") else {
        return;
    };
    let context = TraceContextPropagator::new().extract(&Headers(headers));
    if !context.span().span_context().is_valid() {
        tracing::debug!(traceparent = %traceparent, "traceparent header is not valid W3C trace context; ignored");
        return;
    }
    if let Err(e) = span.set_parent(context) {
        tracing::debug!(error = ?e, "could not set the handler span's parent");
    }
}

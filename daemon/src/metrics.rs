//! Prometheus metrics of shoald, served on `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What a request asked for.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum RequestKind {
    Base,
    Manifest,
    Blob,
    Other,
}

/// Where the bytes of a blob came from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Source {
    /// A complete blob in the store.
    Store,
    /// Fetched for this request (alone or shared with others): from the registry, or from
    /// the swarm (see the fetched-bytes metric for which part came from where).
    Registry,
    /// Another node of the swarm.
    Peer,
    /// A supernode's seed.
    Seed,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Store => "store",
            Self::Registry => "registry",
            Self::Peer => "peer",
            Self::Seed => "seed",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    kind: RequestKind,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: Source,
}

/// Where a piece request found its place: one of the upload slots, or beyond them while
/// the node's known link had room.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
enum Place {
    Slot,
    Beyond,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlaceLabels {
    place: Place,
}

/// All of shoald's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    blob_bytes_served: Family<SourceLabels, Counter>,
    bytes_fetched: Family<SourceLabels, Counter>,
    store_hits: Counter,
    store_misses: Counter,
    store_bytes: Gauge,
    peer_answer: Histogram,
    peer_rtt: Histogram,
    supernode_rtt: Histogram,
    uploads_given: Family<PlaceLabels, Counter>,
    groups_rehashed: Counter,
    stripe_bytes: Counter,
    /// Encodes one at a time: the upload counts are brought up to date then.
    encoding: std::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("shoald"),
            requests: Family::default(),
            blob_bytes_served: Family::default(),
            bytes_fetched: Family::default(),
            store_hits: Counter::default(),
            store_misses: Counter::default(),
            store_bytes: Gauge::default(),
            // 1 ms to about 8 s.
            peer_answer: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            peer_rtt: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            supernode_rtt: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            uploads_given: Family::default(),
            groups_rehashed: Counter::default(),
            stripe_bytes: Counter::default(),
            encoding: Default::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Requests from clients, by kind and answer status",
            m.requests.clone(),
        );
        r.register(
            "blob_bytes_served",
            "Blob bytes sent to clients, by source",
            m.blob_bytes_served.clone(),
        );
        r.register(
            "bytes_fetched",
            "Blob bytes fetched, by source (registry, peer, seed)",
            m.bytes_fetched.clone(),
        );
        r.register(
            "store_hits",
            "Blob requests served from a complete blob in the store",
            m.store_hits.clone(),
        );
        r.register(
            "store_misses",
            "Blob requests the store could not serve",
            m.store_misses.clone(),
        );
        r.register(
            "store_bytes",
            "Bytes held by the blob store",
            m.store_bytes.clone(),
        );
        r.register(
            "peer_answer_seconds",
            "From a piece request to the peer's answer (the piece's first bytes, or busy): \
             the round trip with the queues on the way, and up to 100 ms waiting for one \
             of the peer's upload slots",
            m.peer_answer.clone(),
        );
        r.register(
            "peer_rtt_seconds",
            "The round trip to a peer as QUIC estimates it at each of its answers to a piece \
             request and each piece it sent on a stripe stream (the queues on the way \
             included, no wait for an upload slot)",
            m.peer_rtt.clone(),
        );
        r.register(
            "supernode_rtt_seconds",
            "The round trip to a blob's supernode as QUIC estimates it at each of its answers \
             (the queues on the way included: its seed's uploads share its link)",
            m.supernode_rtt.clone(),
        );
        r.register(
            "uploads_given",
            "Piece requests from peers given a place to upload: one of the upload slots, or \
             beyond them while the node's link (--upload-link) had room",
            m.uploads_given.clone(),
        );
        r.register(
            "groups_rehashed",
            "Hash groups whose piece hashes a peer asked for and that were hashed again from a \
             stored blob's bytes (a blob stored before the daemon started or fetched from the \
             registry alone; a blob pulled over the swarm keeps its piece hashes)",
            m.groups_rehashed.clone(),
        );
        r.register(
            "stripe_bytes",
            "Blob bytes that came unasked on stripe streams from the node's feeds (also \
             counted in bytes_fetched, as peer or seed)",
            m.stripe_bytes.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn request(&self, kind: RequestKind, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { kind, status })
            .inc();
    }

    pub fn served(&self, source: Source, bytes: u64) {
        self.blob_bytes_served
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }

    pub fn fetched(&self, source: Source, bytes: u64) {
        self.bytes_fetched
            .get_or_create(&SourceLabels { source })
            .inc_by(bytes);
    }

    pub fn peer_answered(&self, after: std::time::Duration) {
        self.peer_answer.observe(after.as_secs_f64());
    }

    pub fn peer_round_trip(&self, rtt: std::time::Duration) {
        self.peer_rtt.observe(rtt.as_secs_f64());
    }

    pub fn supernode_round_trip(&self, rtt: std::time::Duration) {
        self.supernode_rtt.observe(rtt.as_secs_f64());
    }

    pub fn store_hit(&self) {
        self.store_hits.inc();
    }

    pub fn store_miss(&self) {
        self.store_misses.inc();
    }

    pub fn group_rehashed(&self) {
        self.groups_rehashed.inc();
    }

    pub fn stripe_fetched(&self, bytes: u64) {
        self.stripe_bytes.inc_by(bytes);
    }

    /// The text exposition, with the store size and the upload places given (in the
    /// slots, beyond them) as of now.
    pub fn encode(&self, store_bytes: u64, uploads_given: (u64, u64)) -> String {
        let _one = self
            .encoding
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.store_bytes
            .set(i64::try_from(store_bytes).unwrap_or(i64::MAX));
        for (place, given) in [
            (Place::Slot, uploads_given.0),
            (Place::Beyond, uploads_given.1),
        ] {
            let counter = self.uploads_given.get_or_create(&PlaceLabels { place });
            counter.inc_by(given.saturating_sub(counter.get()));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_named_series() {
        let m = Metrics::default();
        m.request(RequestKind::Blob, 200);
        m.served(Source::Store, 42);
        m.fetched(Source::Registry, 7);
        m.store_hit();
        m.group_rehashed();
        m.peer_answered(std::time::Duration::from_millis(3));
        m.supernode_round_trip(std::time::Duration::from_millis(100));
        m.peer_round_trip(std::time::Duration::from_millis(20));
        m.encode(0, (3, 1));
        let text = m.encode(1234, (5, 2));
        for line in [
            "shoald_requests_total{kind=\"Blob\",status=\"200\"} 1",
            "shoald_blob_bytes_served_total{source=\"Store\"} 42",
            "shoald_bytes_fetched_total{source=\"Registry\"} 7",
            "shoald_store_hits_total 1",
            "shoald_groups_rehashed_total 1",
            "shoald_store_bytes 1234",
            "shoald_uploads_given_total{place=\"Slot\"} 5",
            "shoald_uploads_given_total{place=\"Beyond\"} 2",
            "shoald_peer_answer_seconds_count 1",
            "shoald_peer_answer_seconds_bucket{le=\"0.004\"} 1",
            "shoald_supernode_rtt_seconds_count 1",
            "shoald_peer_rtt_seconds_count 1",
            "shoald_peer_rtt_seconds_bucket{le=\"0.032\"} 1",
            "shoald_supernode_rtt_seconds_bucket{le=\"0.128\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}

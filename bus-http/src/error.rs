/// What can go wrong serving a bus over HTTP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Prometheus exporter could not be set up, or could not encode the metrics.
    #[error("prometheus exporter: {0}")]
    Prometheus(String),
}

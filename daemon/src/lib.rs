//! shoald: the per-node daemon. containerd's registry mirror, with a verified blob store.
//!
//! # Layout
//! - [`config`]: flags, environment and TOML file resolved into one checked [`Config`].
//! - [`store`]: the content-addressed blob store on disk, with atomic completion and LRU
//!   eviction under a cache size.
//! - [`flight`]: one shared registry fetch per uncached blob, written into the store while
//!   clients follow it.
//! - [`body`]: response bodies of blobs (store, flight, registry) with Range offsets.
//! - [`authz`]: asks the registry whether a client may read a blob before the cache serves it.
//! - [`server`]: the HTTP front containerd talks to.
//! - [`metrics`]: Prometheus metrics.
//! - [`planner`]: the downloader's sans-IO core: which piece to ask which parent for.
//! - [`feeds`]: the stripe streams of one pull, from the feeds the supernode names.
//! - [`p2p`]: the swarm path of a flight: pieces from peers and the seed, checked, written.
//! - [`hashes`]: the piece hashes a pull knows: group hashes from the supernode, piece hashes
//!   from parents once they match.
//! - [`held`]: what the node serves to peers: pieces and stripes of its flights and store.
//! - [`swarm`]: the node's identity, supernode and peer connections, and its piece server.
//! - [`containerd`]: `shoald configure-containerd`, which writes `hosts.toml`.
#![forbid(unsafe_code)]

pub mod authz;
pub mod body;
pub mod config;
pub mod containerd;
pub mod dial;
pub mod feeds;
pub mod flight;
pub mod hashes;
pub mod held;
pub mod metrics;
pub mod p2p;
pub mod planner;
pub mod server;
pub mod store;
pub mod swarm;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub use config::Config;

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open connections get to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A daemon whose store is open and whose port is bound, ready to serve.
pub struct Daemon {
    app: Arc<server::App>,
    listener: TcpListener,
    swarm: Option<Arc<swarm::Swarm>>,
}

impl Daemon {
    /// Opens the store and binds the listen address.
    pub async fn bind(config: &Config) -> anyhow::Result<Daemon> {
        let store = store::Store::open(&config.data_dir, config.cache_size)
            .with_context(|| format!("cannot open the store in {}", config.data_dir.display()))?;
        let upstream = shoal_registry_proxy::Upstream::new(&config.upstream)?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let swarm = match &config.swarm {
            Some(swarm) => match swarm::Swarm::start(swarm, &config.data_dir).await {
                Ok(swarm) => Some(swarm),
                // A node that cannot join still serves containerd, straight from registries.
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "cannot join the swarm; running as a plain mirror");
                    None
                }
            },
            None => None,
        };
        if let Some(swarm) = &swarm {
            swarm.set_holdings(store.clone());
        }
        let flights = Arc::new(flight::Flights::new(swarm.clone()));
        let app = Arc::new(server::App {
            default_registry: config.default_registry.clone(),
            upstream,
            store,
            flights,
            authz: Default::default(),
            metrics: Default::default(),
        });
        Ok(Daemon {
            app,
            listener,
            swarm,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves on a task of its own (for embedding: the demo, benches, tests). Stops when
    /// the returned handle is stopped or dropped.
    pub fn spawn(self) -> std::io::Result<RunningDaemon> {
        let url = format!("http://{}", self.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(self.run(async move {
            let _ = stopped.await;
        }));
        Ok(RunningDaemon { url, stop, task })
    }

    /// Serves until `shutdown` resolves, then gives open connections a short grace: idle
    /// ones (containerd keeps its connections open) close at once, a response under way
    /// may finish within [`SHUTDOWN_GRACE`].
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Daemon {
            app,
            listener,
            swarm,
        } = self;
        let mut background = JoinSet::new();
        if let Some(swarm) = swarm {
            let held = Arc::new(held::Held::new(app.clone(), swarm.clone()));
            background.spawn(swarm.serve(held));
        }
        tracing::info!(addr = %listener.local_addr().map_or("?".into(), |a| a.to_string()), "shoald listening");
        let mut connections = JoinSet::new();
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let _ = stream.set_nodelay(true);
            let app = app.clone();
            let watcher = graceful.watcher();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let app = app.clone();
                    async move { Ok::<_, Infallible>(server::handle(&app, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
        }
        tracing::info!(open = connections.len(), "shutting down");
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(open = connections.len(), grace = ?SHUTDOWN_GRACE, "responses still under way at shutdown are cut off");
        }
        connections.shutdown().await;
        background.shutdown().await;
    }
}

/// A daemon serving on its own task.
pub struct RunningDaemon {
    /// `http://ADDR` of its front.
    pub url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningDaemon {
    /// Shuts it down and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

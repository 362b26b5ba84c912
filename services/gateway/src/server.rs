//! The gateway's listener: accepting connections and handing each to a session.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::shared::Shared;
use crate::tls::ReloadingAcceptor;

/// Accepts connections until `shutdown` resolves; each is served on its own task, behind
/// TLS when `tls` is given (its handshake under [`crate::tls::HANDSHAKE_TIMEOUT`], on the
/// connection's task so a slow handshake never holds up the accept loop).
pub async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<ReloadingAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    if let Ok(addr) = listener.local_addr() {
        match &tls {
            Some(_) => info!(%addr, "gateway listening on wss://{addr}/v1/ws"),
            None if crate::tls::is_loopback(&addr) => {
                info!(%addr, "gateway listening on plain ws://{addr}/v1/ws (loopback only)")
            }
            None => warn!(
                %addr,
                "gateway listening on PLAIN ws://{addr}/v1/ws on a non-loopback address: \
                 tokens and messages cross the network unencrypted; set gateway.tls_cert_file \
                 and gateway.tls_key_file"
            ),
        }
    }
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                // Stop accepting, tell every session why, and give them a moment to go.
                drop(listener);
                let n = shared.registry.close_all(crate::hub::CloseOrder {
                    reason: tidings_schemas::client::CloseReason::ShuttingDown,
                    message: "the server is shutting down; reconnect shortly".into(),
                });
                info!(sessions = n, "gateway stopping");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while shared.registry.session_count() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Over a cap: closed before any byte is read (crate::admission).
                    let permit = match shared.admission.connect(peer.ip()) {
                        Ok(permit) => permit,
                        Err(why) => {
                            debug!(%peer, ?why, "connection refused");
                            drop(stream);
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let shared = shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        match tls {
                            None => crate::session::serve(stream, peer, shared).await,
                            Some(tls) => match tls.accept(stream, peer).await {
                                Ok(stream) => crate::session::serve(stream, peer, shared).await,
                                Err(e) => debug!(error = %e, "tls handshake failed"),
                            },
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "failed to accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

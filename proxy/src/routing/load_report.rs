//! Tells the controller how loaded each backend is, as this router sees it
//! (in flight + waiting), once a second: the autoscaler's input. Quiet
//! routers stop sending after one all-zero report; the controller expires
//! old reports on its own.

use std::time::Duration;

use serval_protos::control::LoadReport;

use super::Router;

const EVERY: Duration = Duration::from_secs(1);

/// Spawns the reporter on the current runtime; it runs until aborted.
/// `source` names this router uniquely in the cluster.
pub fn spawn_load_reporter(
    router: Router,
    control_addr: String,
    token: String,
    source: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = match serval_protos::client::connect_lazy(&control_addr, &token) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "load reports disabled");
                return;
            }
        };
        let mut tick = tokio::time::interval(EVERY);
        let mut last_was_idle = false;
        loop {
            tick.tick().await;
            let load = router.load();
            let idle = load.iter().all(|(_, v)| *v == 0.0);
            if idle && last_was_idle {
                continue;
            }
            let report = LoadReport {
                source: source.clone(),
                load: load.into_iter().collect(),
            };
            match client.clone().report_load(report).await {
                Ok(_) => last_was_idle = idle,
                // The controller may be down: the data plane does not care.
                Err(s) => tracing::debug!(error = %s.message(), "load report failed"),
            }
        }
    })
}

//! `serve shutdown`: asks the controller to stop the cluster, then waits for
//! the head process to exit (its node agent stops the replicas first). When
//! the controller does not answer, the head recorded in the data dir is sent
//! SIGTERM instead.

use std::time::{Duration, Instant};

use crate::ClusterArgs;

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter is Z.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

pub fn run(cluster: ClusterArgs, timeout: u64) -> anyhow::Result<()> {
    let data_dir = crate::cluster_file::absolute(&cluster.data_dir);
    let recorded = crate::cluster_file::read(&data_dir);
    let (address, token) = crate::status::resolve(&cluster)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let asked = runtime.block_on(async {
        let mut client = serval_protos::client::connect(&address, &token).await?;
        client
            .shutdown(serval_protos::control::Empty {})
            .await
            .map_err(|s| anyhow::anyhow!(s.message().to_string()))?;
        anyhow::Ok(())
    });
    let pid = recorded.as_ref().map(|i| i.pid).filter(|p| *p != 0);
    match (&asked, pid) {
        (Ok(()), _) => println!("asked the controller at {address} to shut the cluster down"),
        (Err(e), Some(pid)) => {
            println!("controller did not answer ({e}); sending SIGTERM to head pid {pid}");
            let _ = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status();
        }
        (Err(e), None) => anyhow::bail!("no cluster to shut down at {address}: {e}"),
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + Duration::from_secs(timeout);
        while alive(pid) {
            if Instant::now() > deadline {
                anyhow::bail!("head pid {pid} still running after {timeout} s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("head pid {pid} exited");
    }
    Ok(())
}

//! Blobs in the raft-replicated store on three heads: a ~20 MiB package
//! uploaded through a follower survives the SIGKILL of the leader and reads
//! back byte for byte from both surviving heads; an unknown digest is
//! NOT_FOUND, a wrong one is refused, and API records replicate too.

use std::time::{Duration, Instant};

use serval_protos::blob;
use serval_protos::client::{connect, Client};
use serval_protos::control::{Api, ClusterSnapshot, GetBlobRequest, PutBlobRequest, WatchRequest};
use serval_tests::*;

/// Pseudo-random bytes: a package that neither compresses nor repeats.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn snapshot(head: &ServeProcess) -> Option<ClusterSnapshot> {
    let mut c = connect(&head.control_address(), &head.token()).await.ok()?;
    let reply = c.get_snapshot(WatchRequest::default()).await.ok()?;
    Some(reply.into_inner())
}

async fn get_blob(c: &mut Client, digest: &str) -> Result<Vec<u8>, tonic::Status> {
    let request = GetBlobRequest {
        digest: digest.to_string(),
    };
    let mut stream = c.get_blob(request).await?.into_inner();
    let mut data = Vec::new();
    while let Some(chunk) = stream.message().await? {
        assert!(chunk.data.len() <= blob::BLOB_CHUNK_BYTES);
        data.extend_from_slice(&chunk.data);
    }
    Ok(data)
}

async fn has_blob(c: &mut Client, digest: &str) -> bool {
    let request = GetBlobRequest {
        digest: digest.to_string(),
    };
    c.has_blob(request)
        .await
        .expect("HasBlob")
        .into_inner()
        .present
}

#[test]
fn a_blob_survives_the_loss_of_the_leader() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    let first = start_head_without_replicas(tmp.path(), "h1", None);
    let (addr, token) = (first.control_address(), first.token());
    let mut heads = vec![first];
    for name in ["h2", "h3"] {
        heads.push(start_head_without_replicas(
            tmp.path(),
            name,
            Some((&addr, &token)),
        ));
    }
    let leader = wait_for("three voters and a leader", Duration::from_secs(60), || {
        let s = rt.block_on(snapshot(&heads[0]))?;
        let voters = s.heads.iter().filter(|h| h.role != "learner").count();
        let leader = s.heads.iter().find(|h| h.leader)?;
        (voters == 3).then_some(leader.raft_id)
    });
    let leader_ix = heads.iter().position(|h| h.raft_id() == leader).unwrap();
    let follower_ix = (leader_ix + 1) % 3;

    // Upload through a follower: its parts are forwarded to the leader.
    let data = noise(20 * 1024 * 1024 + 12_345);
    let digest = blob::digest(&data);
    rt.block_on(async {
        let mut c = heads[follower_ix].client().await;
        assert!(!has_blob(&mut c, &digest).await);

        let wrong = PutBlobRequest {
            digest: blob::digest(b"something else"),
            data: b"package".to_vec(),
        };
        let err = c.put_blob(wrong).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("mismatch"), "{}", err.message());

        let started = Instant::now();
        let put = PutBlobRequest {
            digest: digest.clone(),
            data: data.clone(),
        };
        c.put_blob(put).await.expect("20 MiB blob stored");
        eprintln!(
            "FIGURES: 20 MiB blob stored through a follower in {:?}",
            started.elapsed()
        );
        // Stored, but nothing names it yet: a client about to name it
        // puts it again (an unnamed blob is collected after a grace).
        assert!(!has_blob(&mut c, &digest).await);

        let api = Api {
            name: "iris".into(),
            kind: "RealtimeAPI".into(),
            spec_json: "{}".into(),
            package_digest: digest.clone(),
            fingerprint: "f1".into(),
            deployed_at: 1.5,
        };
        c.put_api(api).await.expect("api record stored");
        // Named by the api (this follower may apply it a moment later).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !has_blob(&mut c, &digest).await {
            assert!(Instant::now() < deadline, "HasBlob false once named");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    // SIGKILL the leader (the guard kills its process group).
    drop(heads.remove(leader_ix));
    for head in &heads {
        let got = wait_for(
            "the blob on a surviving head",
            Duration::from_secs(60),
            || {
                rt.block_on(async {
                    let mut c = connect(&head.control_address(), &token).await.ok()?;
                    get_blob(&mut c, &digest).await.ok()
                })
            },
        );
        assert!(
            got == data,
            "{} returned {} bytes that differ from the {} uploaded",
            head.control_address(),
            got.len(),
            data.len()
        );
        let apis = wait_for("the api record", Duration::from_secs(30), || {
            let s = rt.block_on(snapshot(head))?;
            (!s.apis.is_empty()).then_some(s.apis)
        });
        assert_eq!(apis[0].package_digest, digest);
    }

    let unknown = blob::digest(b"never stored");
    let err = rt
        .block_on(async {
            let mut c = heads[0].client().await;
            get_blob(&mut c, &unknown).await
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains(&unknown), "{}", err.message());
}

/// Blobs nothing names (uploads not deployed yet, or code a replica token
/// stored and never used) are bounded in bytes: a new upload past
/// `--max-unnamed-blob-bytes` is refused until deploys name what is there.
#[test]
fn unnamed_blobs_are_bounded_until_something_names_them() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tmp = tempfile::Builder::new()
        .prefix("sv-")
        .tempdir_in("/tmp")
        .unwrap();
    const CAP: usize = 3 << 20;
    let cap = CAP.to_string();
    let mut head = ServeProcess::start(
        &tmp.path().join("h"),
        free_port(),
        free_port(),
        &[
            "--head",
            "--num-cpus",
            "0",
            "--max-unnamed-blob-bytes",
            &cap,
        ],
    );
    head.wait_log("http proxy listening");
    rt.block_on(async {
        let mut c = head.client().await;
        let blob = |seed: u8, len: usize| {
            let mut data = noise(len);
            data[0] = seed;
            PutBlobRequest {
                digest: blob::digest(&data),
                data,
            }
        };
        let name = |digest: &str| Api {
            name: format!("api-{}", &digest[..8]),
            kind: "RealtimeAPI".into(),
            spec_json: "{}".into(),
            package_digest: digest.to_string(),
            fingerprint: "f1".into(),
            deployed_at: 1.5,
        };
        let (a, b, large) = (blob(1, 1_000_000), blob(2, 1_000_000), blob(3, 1_500_000));
        c.put_blob(a.clone()).await.expect("first unnamed blob");
        c.put_blob(b.clone()).await.expect("second unnamed blob");
        // 2 MB unnamed + 1.5 MB would pass the 3 MiB cap.
        let err = c.put_blob(large.clone()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
        assert!(
            err.message().contains("--max-unnamed-blob-bytes"),
            "{}",
            err.message()
        );
        // Putting a stored one again adds nothing: still allowed.
        c.put_blob(a.clone())
            .await
            .expect("a stored blob put again");

        // Named, they no longer count.
        c.put_api(name(&a.digest)).await.expect("a named");
        c.put_api(name(&b.digest)).await.expect("b named");
        c.put_blob(large.clone()).await.expect("room once named");
        c.put_api(name(&large.digest)).await.expect("large named");
        // The parts of a named large blob are named with it: 2.9 MB fits.
        c.put_blob(blob(4, 2_900_000))
            .await
            .expect("room once the large blob and its parts are named");
        let err = c.put_blob(blob(5, 1_000_000)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    });
}

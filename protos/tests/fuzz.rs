//! Property tests of what a replica reads from the network: the handshake
//! (before authentication) and the frame decoder (after it). Random input
//! never panics, never allocates beyond its bounds, never passes the
//! handshake.
// Test code: an unwrap is an assertion (clippy.toml allows it only in #[test] fns).
#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use serval_protos::frame::{self, FrameError, FrameReader, Request, Response};
use serval_protos::handshake::{self, Key, ReplicaKeys};
use tokio::io::AsyncWriteExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn keys() -> ReplicaKeys {
    ReplicaKeys {
        data: Key::data_plane("fuzz-cluster-token"),
        agent: Key::replica_agent(&Key::agents("fuzz-cluster-token"), "r1"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever a stranger sends, the replica refuses it: a wrong proof, no
    /// protocol, or the stream ending early; never a pass, never a panic.
    #[test]
    fn random_bytes_never_pass_the_handshake(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let rt = runtime();
        let result = rt.block_on(async {
            let (mut replica, mut peer) = tokio::io::duplex(4096);
            let writer = tokio::spawn(async move {
                let _ = peer.write_all(&bytes).await;
                // Closing (not holding the stream open) keeps the replica
                // from waiting out its timeout when the input is short.
                drop(peer);
            });
            let result = handshake::accept(&mut replica, &keys()).await;
            let _ = writer.await;
            result
        });
        prop_assert!(result.is_err(), "random bytes passed the handshake");
    }

    /// The frame reader either yields frames whose declared lengths fit the
    /// input, or an error; it never reserves more than the declared length
    /// of a frame under the limit, and the body decoders never panic.
    #[test]
    fn random_frames_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = runtime();
        rt.block_on(async {
            let (mut tx, rx) = tokio::io::duplex(8192);
            let input = bytes.clone();
            tokio::spawn(async move {
                let _ = tx.write_all(&input).await;
            });
            let mut reader = FrameReader::new(rx);
            loop {
                match reader.next().await {
                    Ok(Some((_, body))) => {
                        prop_assert!(body.len() <= bytes.len());
                        let _ = frame::decode::<Request>(&body);
                        let _ = frame::decode::<Response>(&body);
                    }
                    Ok(None) => break,
                    Err(FrameError::TooLarge(n)) => {
                        prop_assert!(n > frame::MAX_FRAME_LEN);
                        break;
                    }
                    Err(_) => break,
                }
            }
            Ok(())
        })?;
    }

    /// Well-formed requests survive encode then decode, whatever they hold.
    #[test]
    fn requests_round_trip(
        id in any::<u64>(),
        method in proptest::option::of(".{0,20}"),
        path in ".{0,40}",
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let request = Request {
            method_name: method.clone(),
            payload: frame::Payload::Http(frame::HttpRequest {
                method: "POST".into(),
                path: path.clone(),
                body: body.clone(),
                ..Default::default()
            }),
        };
        let bytes = frame::encode(id, &request).unwrap();
        let back: Request = frame::decode(&bytes[12..]).unwrap();
        prop_assert_eq!(back.method_name, method);
        match back.payload {
            frame::Payload::Http(h) => {
                prop_assert_eq!(h.path, path);
                prop_assert_eq!(h.body, body);
            }
            other => prop_assert!(false, "unexpected payload {:?}", other),
        }
    }
}

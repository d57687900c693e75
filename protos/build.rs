// Compiles the control-plane protos with a vendored protoc, so no system
// protobuf-compiler is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    // The controller stores these messages in its raft state machine as they
    // are, so they also derive serde (bincode in the log, JSON in `status`).
    tonic_prost_build::configure()
        .type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]")
        .compile_protos(&["proto/control.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/control.proto");
    Ok(())
}

//! Generates the gRPC control plane's code from `proto/` with protox (no system `protoc`), when
//! the `control` feature is on.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "control")]
    {
        let files = protox::compile(["twintrack/v1/control.proto"], ["proto"])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(files)?;
    }
    Ok(())
}

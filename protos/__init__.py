"""Generated KServe v2 / Triton gRPC stubs: regenerate with scripts/gen_protos.sh, never edit."""

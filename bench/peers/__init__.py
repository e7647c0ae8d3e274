"""Peer servers for the benchmark. Each file here runs inside that peer's own virtual
environment and serves our bundle through ``service.runtime.ModelRuntime`` (the same
tokenisation, truncation and TorchScript calls as our service), so that only the serving
framework differs."""

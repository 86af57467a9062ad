"""Service-mesh integration: discovery, snapshots, TLS material, mesh headers."""

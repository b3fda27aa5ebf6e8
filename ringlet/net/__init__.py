"""Control plane (zenoh sessions, topics, membership) between nodes; the data plane lives with the runners
(`ringlet.worker.pipeline`)."""

"""Between nodes: the control plane (zenoh sessions, topics, membership, the event order's transport, task
forwarding) and the data plane of multi-stage instances (`ring.py`)."""

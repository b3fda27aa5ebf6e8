"""The node process: state, runners and the API of one machine (see `node.py`; `ringlet node` starts it)."""

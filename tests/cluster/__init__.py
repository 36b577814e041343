"""The test bed: a real Kubernetes control plane (`controlplane.py`), a small REST client (`client.py`)
and a local node that runs bound pods as processes (`node.py`, `netns.py`, `container.py`).
See docs/testing.md."""

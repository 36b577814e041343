"""The test bed: a real Kubernetes control plane (`controlplane.py`), a small REST client (`client.py`),
and local nodes that run bound pods as processes (`node.py` is the entry point and lists the node's
modules; `netns.py` the network, `container.py` the namespace shim, `forward.py` the API forwarder),
all put together by `bed.py` (`LocalCluster`). The test bed's own tests are the `test_*.py` beside them.
See docs/testing.md."""

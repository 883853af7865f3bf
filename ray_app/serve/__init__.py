"""Serving: the Ray Serve application behind the OpenAI-compatible API (``ray_app.serve.app:build_app``).

``SERVING_ENV`` is what the README's serve command puts in the environment: Ray Serve's throughput mode
(gRPC between replicas, user code on the replica's loop) and HAProxy as the HTTP ingress, which hands a
request straight to the replica that serves it. Ray reads both when its processes start, so anything
that starts a cluster to serve (the tests, the benchmarks) sets them before Ray is imported.

``INGRESS_ENV`` goes to the ingress replica's own environment. A stopping ingress replica stays reachable
for a while before it refuses new connections: Ray's default, 30 s, is for an outside load balancer to
deregister it. Ours is the node's HAProxy, which Serve reconfigures at once and which retries a refused
connection on another replica, so Ctrl-C on ``serve run``, a redeploy or a scale-down need not wait half
a minute for it.
"""

SERVING_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
INGRESS_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5"}

"""Serving: the Ray Serve application behind the OpenAI-compatible API (``ray_app.serve.app:build_app``).

``SERVING_ENV`` is what the README's serve command puts in the environment: Ray Serve's throughput mode
(gRPC between replicas, user code on the replica's loop) and HAProxy as the HTTP ingress, which hands a
request straight to the replica that serves it. Ray reads both when its processes start, so anything
that starts a cluster to serve (the tests, the benchmarks) sets them before Ray is imported.
"""

SERVING_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}

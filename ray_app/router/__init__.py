"""The smart router: picks a target (local model or cloud provider) per chat request.

Plain-Python core only: typed config, PII detection, request features, the routing policy, target
health, the spend ledger, API keys and quotas, and the provider clients. Ray Serve wiring lives elsewhere
and stays thin over these classes.
"""

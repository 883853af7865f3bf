"""One ``VectorStoreActor`` per store and cluster: the single process that opens the collections.

An embedded Qdrant shard must be written by one process. Every reader and writer in the cluster
(ingest drivers, the Serve knowledge deployment, the CLI) reaches the store through this named
actor, so ingesting while serving is safe and new documents are searchable at once. Calls run one at
a time; Edge queries take milliseconds.

The actor is restarted when its process dies (the shard's lock dies with it, and the new process
reopens the shard from disk), and calls in flight are retried on the new one: every method is
idempotent (a document replace rewrites the same points, deletes and relabels repeat harmlessly).
"""

from __future__ import annotations

import hashlib
import json

import ray

from ray_app.documents.config import StoreConfig
from ray_app.documents.store import VectorStore, open_store
from ray_app.paths import DataDir

NAMESPACE = "ray_app"


@ray.remote(num_cpus=0, max_concurrency=1, max_restarts=-1, max_task_retries=3)
class VectorStoreActor:
    def __init__(self, config: StoreConfig, root: str):
        self.store: VectorStore = open_store(config, DataDir.from_path(root))

    def ensure_collection(self, name, dimensions, embedder, default_sensitivity=None):
        return self.store.ensure_collection(name, dimensions, embedder, default_sensitivity)

    def create_collection(self, name, dimensions, embedder, default_sensitivity=None):
        return self.store.create_collection(name, dimensions, embedder, default_sensitivity)

    def chunks(self, name, limit):
        return self.store.chunks(name, limit)

    def prune(self, name, doc_id, doc_hash):
        return self.store.prune(name, doc_id, doc_hash)

    def set_sensitivity(self, name, doc_id, sensitivity):
        return self.store.set_sensitivity(name, doc_id, sensitivity)

    def pid(self):
        import os

        return os.getpid()

    def collection(self, name):
        return self.store.collection(name)

    def collection_names(self):
        return self.store.collection_names()

    def drop_collection(self, name):
        return self.store.drop_collection(name)

    def documents(self, name):
        return self.store.documents(name)

    def document(self, name, doc_id):
        return self.store.document(name, doc_id)

    def replace_document(self, name, doc_id, records):
        return self.store.replace_document(name, doc_id, records)

    def delete_document(self, name, doc_id):
        return self.store.delete_document(name, doc_id)

    def search(self, name, **kwargs):
        return self.store.search(name, **kwargs)

    def flush(self, name):
        return self.store.flush(name)

    def optimize(self, name):
        return self.store.optimize(name)


def store_actor_name(config: StoreConfig, paths: DataDir) -> str:
    key = json.dumps({"store": config.model_dump(), "root": str(paths.root)}, sort_keys=True)
    return "vector_store_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def get_store(config: StoreConfig, paths: DataDir):
    """The cluster's store actor for this store, created on this node if it does not exist yet."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # An embedded store lives on the disk of the node that opened it: keep the actor there.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    return VectorStoreActor.options(
        name=store_actor_name(config, paths), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=here,
    ).remote(config, str(paths.root))

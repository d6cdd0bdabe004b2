"""Multi-adapter serving: adapter pool → engine (continuous batching, per-row adapter indices) → HTTP API (``api``, needs fastapi)."""
from deltatune.serve.adapter_pool import AdapterNotFoundError, AdapterPool
from deltatune.serve.engine import Completion, Engine, RequestError
from deltatune.serve.sampling import SamplingParams

__all__ = ["AdapterNotFoundError", "AdapterPool", "Completion", "Engine", "RequestError", "SamplingParams"]

"""raytp's driver: config, scheduler, block allocator, engine, offline API, HTTP app.

Attributes load lazily (PEP 562) so that workers can import the plain-data
modules (driver.protocol, driver.config) without pulling in the engine.
"""
import importlib

_EXPORTS = {
    "LLM": "driver.llm",
    "SamplingParams": "driver.sampling_params",
    "PoolingParams": "driver.sampling_params",
    "StructuredOutputsParams": "driver.sampling_params",
    "EngineConfig": "driver.config",
    "LLMEngine": "driver.engine",
    "RequestOutput": "driver.outputs",
    "CompletionOutput": "driver.outputs",
    "EmbeddingRequestOutput": "driver.outputs",
    "BeamSearchParams": "driver.beam_search",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'driver' has no attribute {name!r}")


__all__ = list(_EXPORTS)

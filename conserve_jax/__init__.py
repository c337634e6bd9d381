"""conserve-jax: co-serving online and offline LLM requests in JAX.

`LLM` and `SamplingParams` are the offline Python API (shaped like vLLM's).
"""
from conserve_jax.sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name):  # import the engine (and JAX) only when asked for
    if name == "LLM":
        from conserve_jax.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)

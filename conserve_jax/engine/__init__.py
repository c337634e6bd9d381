"""The engine layer: the step loop (`engine.Engine`), its output path (`output_processor`,
`output_delivery`), its failure policy (`step_guard`), its stats bookkeeping
(`step_accounting`), offline requests across a restart (`offline_suspension`) and the
deterministic `MockEngine` for CPU tests of the faces.

`Engine` is imported lazily (it pulls in JAX); `MockEngine` does not need JAX.
"""

__all__ = ["Engine", "MockEngine"]


def __getattr__(name):
    if name == "Engine":
        from conserve_jax.engine.engine import Engine
        return Engine
    if name == "MockEngine":
        from conserve_jax.engine.mock_engine import MockEngine
        return MockEngine
    raise AttributeError(name)

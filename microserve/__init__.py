"""microserve: a programmable LLM serving system."""

__version__ = "0.1.0"

from microserve.sampling import SamplingParams  # noqa: E402


def __getattr__(name):
    # LLM pulls in torch and the model code; import it only when asked for.
    if name == "LLM":
        from microserve.engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "__version__"]

"""gemma_dist: serve Google's Gemma models.

Offline use, in one process::

    from gemma_dist import LLM, SamplingParams
    LLM(model="default").generate(["..."], SamplingParams(temperature=0, max_tokens=32))
"""

from gemma_dist.config import ModelConfig, VARIANTS, get_variant
from gemma_dist.sampling import SamplingParams

__all__ = ["LLM", "ModelConfig", "RequestOutput", "SamplingParams", "VARIANTS", "get_variant"]


def __getattr__(name: str):
    # LLM pulls in the model and tokenizer; import it only when asked for.
    if name in ("LLM", "RequestOutput"):
        from gemma_dist.engine import llm

        return getattr(llm, name)
    raise AttributeError(name)

"""rlfuse: fused kernels for reinforcement learning on large language models.

Public API:
    rlfuse.ops      stateless fused ops (token_logprobs, ...)
    rlfuse.info()   versions and which backends are built and usable here
"""

__version__ = "0.1.0"

from rlfuse import ops  # noqa: E402
from rlfuse._backend import info  # noqa: E402

__all__ = ["ops", "info", "__version__"]

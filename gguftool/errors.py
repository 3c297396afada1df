"""Exceptions raised by gguftool.

Every error caused by bad input is a ``GGUFError`` (a ``ValueError``) whose message names what was wrong and
where (file offset, key, tensor, row). The CLI turns them into one ``Error: ...`` line and exit status 1; the
library itself never prints or exits.
"""


class GGUFError(ValueError):
    """Base class: bad input or a request gguftool cannot honour."""


class FormatError(GGUFError):
    """A GGUF file is malformed (message names the byte offset)."""


class QuantError(GGUFError):
    """Quantization input is unusable (NaN/Inf, row length not a multiple of the block, unknown type)."""


class PolicyError(GGUFError):
    """A quantization request cannot be planned (unknown type, bad override, mismatched imatrix)."""


class ConvertError(GGUFError):
    """A Hugging Face checkpoint cannot be converted (missing files, unsupported architecture or dtype)."""


class ImatrixError(GGUFError):
    """An importance matrix cannot be computed or read."""


class OutputError(GGUFError):
    """An output file cannot be written where asked (an input file, a directory, exists without --force ...)."""


class PerplexityError(GGUFError):
    """A perplexity or KL-divergence run cannot be done, or its base logits file is unusable."""


class ClusterError(GGUFError):
    """A distributed run cannot start or finish (Ray not installed, no cluster at the address, a task that failed
    after its retries)."""

"""The Hugging Face Hub, the bottom layer beside plain files: model repositories through
``huggingface_hub`` (``tinylm.hub.models``) and datasets through the ``datasets`` library
(``tinylm.hub.data``). Both go through the libraries' own caches, honour ``HF_HUB_OFFLINE`` and the
usual token settings, and turn "cannot reach the Hub and nothing is cached" into one clear message.

This package imports nothing else from tinylm, so ``tinylm.io`` and ``tinylm.modeldir`` can use it.
"""


class HubError(ValueError):
    """A model or dataset of the Hub that cannot be had: not found, gated, not cached while offline, a
    corrupted cache, no such config, split or column. The message names the id (and revision, config or
    split) and what to do; ``reason`` is a short name for the kind of problem, as ``tinylm.io.DataError``'s."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason

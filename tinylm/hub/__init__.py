"""The Hugging Face Hub, the bottom layer beside plain files: model repositories through
``huggingface_hub`` (``tinylm.hub.models``) and datasets through the ``datasets`` library
(``tinylm.hub.data``). Both go through the libraries' own caches, honour ``HF_HUB_OFFLINE`` and the
usual token settings, and turn "cannot reach the Hub and nothing is cached" into one clear message.

This package imports nothing from tinylm, so ``tinylm.io`` and ``tinylm.modeldir`` can use it.
"""

"""The benchmark: what it measures (``measure``) and its command (``python -m kdlib bench``). Imports
``records``, ``train`` and ``book``."""

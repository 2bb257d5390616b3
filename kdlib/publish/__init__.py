"""Publishing: the README's and the docs' generated blocks, a run's or sweep's markdown, and the site.
Imports ``analysis`` and ``records`` (and the params schema); never the orchestration."""

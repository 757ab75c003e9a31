"""The three command-line tools, installed as the console scripts ``comlora-train``, ``comlora-consolidate`` and
``comlora-evaluate`` (``[project.scripts]`` in pyproject.toml); ``launch/*.py`` are thin wrappers over them."""

"""The method: K LoRA components per layer (``layer``, injected by ``inject``), the selector that scores them
(``selector``), ComLoRA's losses (``losses``), the model that runs base + components + selector (``model``), the
validation scores and winner (``validation``) and how different the components became (``divergence``).
docs/method.md gives the formulas. Imports only the base layers (config, errors, fileio) and ``methods``' registry."""

"""lm-eval task templates (package data) and the functions they name; see comlora_ds.evaluation.harness_data."""

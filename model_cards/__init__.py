"""Model card templates (installed as `longlora_hf.model_cards`), rendered with `str.format`."""

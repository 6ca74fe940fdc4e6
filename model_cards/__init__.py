"""Model card templates (installed as `longlora_hf.model_cards`), filled with `str.format` by
`longlora_hf.model_card`."""

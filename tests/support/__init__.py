"""The code the tests share, apart from the tests themselves (pytest collects only `tests/**/test_*.py`).

Imported as `support.<module>` (`from support.helpers import tiny_model`): pytest puts `tests/` on `sys.path`
(the rootdir-relative "prepend" import mode, `tests/` having no `__init__.py`); the scripts here that run on
their own (`sp_worker.py`, `fsdp2_worker.py` under `torchrun`, `architectures.py`) put it there themselves.

- `helpers.py`: tiny models of every supported architecture, built from configs, and helpers the tests share
- `s2_reference.py`: the independent float64 reference for S2-Attn (the partition as an explicit mask)
- `hub_server.py`: a Hub-compatible server on loopback for the push and pull tests
- `sp_cases.py`, `sp_worker.py`: the sequence-parallel cases and their `torchrun` worker
- `fsdp2_worker.py`: the FSDP2 `torchrun` worker
- `architectures.py`: every causal LM of transformers, built tiny (tests/external/test_every_architecture.py)
- `peft_harness.py`: PEFT's own test harness, fetched for tests/external/test_peft_common_tester.py
"""

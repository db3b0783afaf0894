"""A differential fuzzer of the relay engine: random workloads (``cases``) served under random engine settings
(``variants``) must give the outputs of the plainest settings, keep the relay's invariants, stay within each
model's batch limits and free every KV block (``harness``). Run it with ``PYTHONPATH=tests python -m relay_fuzz``
(see ``__main__``); ``tests/test_relay_fuzz.py`` runs a few seeded cases in CI."""

"""The false-failure budget shared by the statistical tests (its table: ``test_statistics.py``)."""
ALPHA_SUITE = 1e-3
N_STAT_ASSERTIONS = 40
ALPHA = ALPHA_SUITE / N_STAT_ASSERTIONS

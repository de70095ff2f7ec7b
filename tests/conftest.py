"""pytest's hooks only; the shared helpers are the plain module ``helpers`` (bench/ imports it too).

Tests are of two kinds (``make test-fast`` runs the first, ``make test`` both):
- unit: pure modules in this process; seconds in all;
- e2e (marked ``e2e``, or ``slow`` for the longest): real subprocesses, servers, clusters,
  a wheel in a fresh venv.
"""

import helpers  # noqa: F401  (points AMBASYNC_REFERENCE_DIR at tests/fixtures before any test runs)

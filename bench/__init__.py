"""ambasync's benchmark: `python -m bench --help`."""

import sys

from ambasync.mirror.early_signals import defer

defer()  # before the imports below (about a second): see ambasync.mirror.early_signals

from ambasync.cli import main  # noqa: E402

sys.exit(main())

import sys

from .early_signals import defer

defer()  # before the imports below (about a second): see ambasync.early_signals

from .cli import main  # noqa: E402

sys.exit(main())

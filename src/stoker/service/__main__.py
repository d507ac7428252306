"""``python -m stoker.service --config FILE`` (until ``stoker serve`` wraps it)."""

import sys

from stoker.service import early_signals

# Before the heavy imports: a SIGTERM during start-up must still stop the daemon cleanly.
early_signals.catch()

from stoker.service.daemon import main  # noqa: E402

sys.exit(main())

"""``python -m stoker.service --config FILE`` (until ``stoker serve`` wraps it)."""

import sys

from stoker.service.daemon import main

sys.exit(main())

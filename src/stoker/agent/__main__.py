"""Entry point: ``python3 -m stoker.agent`` (PID 1 in the guest)."""

import sys

from stoker.agent.main import main

sys.exit(main())

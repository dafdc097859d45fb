"""`python -m amqproxy` runs the proxy."""

import sys

from .cli import main

sys.exit(main())

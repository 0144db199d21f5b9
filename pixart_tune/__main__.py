"""`python -m pixart_tune ...` (what `accelerate launch -m pixart_tune train RECIPE` runs)."""

import sys

from .cli import main

sys.exit(main())

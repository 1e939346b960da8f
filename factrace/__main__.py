"""``python -m factrace ...`` is the ``factrace`` command line."""
import sys

from .cli import main

sys.exit(main())

"""``python -m imrnns`` runs the command line."""

import sys

from imrnns.cli import main

sys.exit(main())

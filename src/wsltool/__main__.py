"""``python -m wsltool``: the CLI (also what ``torchrun ... -m wsltool train`` runs on every rank)."""

import sys

from wsltool.cli import main

sys.exit(main())

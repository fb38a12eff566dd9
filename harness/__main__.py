"""`python -m harness ...` = the `harness` command (for machines where the console script is
not installed, e.g. a package folder on PYTHONPATH)."""
import sys

from harness.cli import main

sys.exit(main())

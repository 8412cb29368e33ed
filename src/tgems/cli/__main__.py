"""`python -m tgems.cli`: the `tgems` command."""
import sys

from tgems.cli import main

sys.exit(main())

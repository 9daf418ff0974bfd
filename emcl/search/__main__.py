"""``python -m emcl.search``."""

from emcl.errors import cli_main
from emcl.search.cli import main

cli_main(main)

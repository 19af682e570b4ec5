"""``python -m cleaq_jax.programs.ablations``: runs the study's command line."""

import sys

from cleaq_jax.programs.ablations import cli

if __name__ == "__main__":
    sys.exit(cli.main())

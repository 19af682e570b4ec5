"""What every argparse command line of the project shares: help that shows the whole module description
(its usage lines and examples as written) and each option's default, and ``-v`` / ``--verbose``.

The flag style (docs/architecture.md): the argparse programs (predict, export, curves, import-weights,
ablations, every data_prep command) spell options in lower case with dashes (``--batch-size``);
``cleaq-run`` (`cleaq_jax.main`) keeps absl's own style, underscores as in its config keys
(``--workdir``, ``--coordinator_address``, ``--config.batch_size=8``, ``--verbosity``).

Imports only the standard library: predict from an exported model uses it where only jax, numpy and
OpenCV are installed.
"""

from __future__ import annotations

import argparse

VERBOSE_HELP = "say more: the traceback of an error, and the libraries' INFO lines"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (line breaks, usage lines, examples) and, after each option's help,
    its default: where the help does not state one already, and the option has one (not None or False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or action.required or unset or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def parser(prog: str, description: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser for the program ``prog`` (``python -m MODULE``): ``description`` whole (give the
    module's ``__doc__``), `HelpFormatter`, and ``-v`` / ``--verbose`` (the program passes it to
    `cleaq_jax.errors.reported` and `console.setup`)."""
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
    p.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    return p

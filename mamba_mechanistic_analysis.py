#!/usr/bin/env python
"""The pipeline CLI: ``python mamba_mechanistic_analysis.py [options]`` is ``mamba-interp run [options]``.

With no options it runs every implemented step on the embedded default zoo model into a new folder under
``results/`` and prints where the report is. ``--help`` lists the options; README.md explains the outputs.
"""

import sys

if __name__ == "__main__":
    # light imports only: torch is imported inside run_main, after the signal handlers are installed
    interrupts = None
    try:
        from mamba_interp.pipeline import interrupts

        interrupts.install_handlers()
        from mamba_interp.cli import run_main
    except KeyboardInterrupt as exc:
        print(f"mamba-interp: {interrupts.describe(exc) if interrupts else 'interrupted (Ctrl-C)'}", file=sys.stderr)
        sys.exit(interrupts.exit_code(exc) if interrupts else 130)
    sys.exit(run_main())

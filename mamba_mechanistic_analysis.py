#!/usr/bin/env python
"""The pipeline CLI: ``python mamba_mechanistic_analysis.py [options]`` is ``mamba-interp run [options]``.

With no options it runs every implemented step on the embedded default zoo model into a new folder under
``results/`` and prints where the report is. ``--help`` lists the options; README.md explains the outputs.
"""

import sys

from mamba_interp.cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())

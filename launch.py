#!/usr/bin/env python3
"""SGLang server with TCA sparse attention.

    python launch.py [--model PATH] [--tca-budgets FILE] [--tca-window N] [--tca-block N]
                     [--no-tca] [...any sglang server flag]

The logic lives in sglang_tca/cli.py. The __main__ guard matters: SGLang starts its processes with spawn, which
re-imports this file in every child.
"""
import sys

if __name__ == "__main__":
    from sglang_tca.cli import main

    sys.exit(main(sys.argv[1:]))

"""metarl-min: meta-reinforcement learning in one NumPy file.

The command line's frame; the algorithms arrive in the next commits.
"""

import argparse
import sys


def build_parser():
    parser = argparse.ArgumentParser(prog="metarl_min.py", description=__doc__.splitlines()[0])
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

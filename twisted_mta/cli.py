"""
The C{twisted-mta} command.  Every subcommand takes C{--config FILE}
(default C{mta.toml}), exits 0 on success, and otherwise prints one line
on standard error saying what went wrong and exits non-zero.
"""

from __future__ import annotations

import argparse
import sys

from twisted_mta import config as configmod


class CommandError(Exception):
    """A subcommand failed; C{str()} is the line shown."""


def cmd_check_config(args) -> int:
    from twisted_mta import loader
    from twisted_mta.service import MTAService, StartupError

    cfg = configmod.load(args.file or args.config)
    try:
        loader.build_pipeline(cfg, generation=1)
        MTAService(cfg)._load_tls(cfg)
    except (loader.PluginError, StartupError) as e:
        raise CommandError(str(e))
    print("ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="the configuration file (default: mta.toml)")
    parser = argparse.ArgumentParser(prog="twisted-mta", description="Control twisted-mta.",
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check-config", parents=[common],
                       help="load the configuration and say what is wrong, or ok")
    p.add_argument("file", nargs="?", help="the file to check (default: --config)")
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "config"):
        args.config = "mta.toml"
    try:
        return args.func(args)
    except (configmod.ConfigError, CommandError) as e:
        print(f"twisted-mta: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""
C{twistd mta}: the command-line options and L{makeService}.
"""

from __future__ import annotations

import sys

from twisted.python import usage

from twisted_mta import config as configmod


class Options(usage.Options):
    synopsis = "[--config mta.toml]"
    longdesc = ("Run twisted-mta.  Without --config it runs the embedded development "
                "default: 127.0.0.1:2525, STARTTLS with a generated certificate, mail "
                "for localhost into ./mail, the spool in ./spool.")
    optParameters = [
        ["config", "c", None, "The configuration file (TOML)."],
    ]


def makeService(options: Options):
    from twisted_mta.service import MTAService, StartupError

    try:
        if options["config"]:
            cfg = configmod.load(options["config"])
        else:
            cfg = configmod.default()
    except configmod.ConfigError as e:
        raise SystemExit(f"twisted-mta: {e}")
    mta = MTAService(cfg)
    try:
        mta.prepare()
    except StartupError as e:
        raise SystemExit(f"twisted-mta: {e}")
    # Under twistd, whose options are the parent of ours: the service
    # gives twistd a cheaper observer writing the same lines where twistd
    # would (twisted_mta.logs.install), when twistd gives it the application.
    mta.twistd_options = options.parent
    return mta


def _main() -> None:  # pragma: no cover - convenience for python -m
    sys.exit("use: twistd -n mta [--config FILE]")

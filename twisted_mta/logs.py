"""
A cheaper formatter for the log lines of C{twistd mta}: the same lines.

Under twistd every event goes to the observer twistd makes from its
command line: C{textFileLogObserver} on a C{LogFile} (C{--logfile}) or on
standard output (C{-n}).  Its formatting was most of the cost of an event:
C{string.Formatter} (about 2 µs per field, in Python), and the time
formatted afresh for every line (about 8 µs).  Measured in the server
under load, an event cost 60-85 µs of the reactor's CPU.

L{observer_for_twistd} makes the observer twistd would have made (the
same C{FileLogObserver} class, on the same file or standard output, with
rotation on SIGUSR1), but with L{format_event} as its formatter, which
gives byte for byte the lines of Twisted's (the tests compare the two):

  - a format whose fields are all plain names (C{{id}}, C{{reply!r}},
    C{{left:.0f}}) is formatted with C{str.format_map}, which is what
    Twisted's formatter ends up doing for such fields; anything else
    (C{{f()}}, C{{a.b}}, failures, errors) goes to Twisted's formatter;
  - the timestamp is formatted once per second.

Each line is still written and flushed as it is logged.  (Writing the
lines of a reactor turn at once saved a further 3-4 µs per event, under
1 % of a message's reactor time, for a window in which a killed process
loses lines: not done.)

It leaves C{--syslog}, C{--logger} and the cases where twistd refuses or
chooses differently to twistd.  L{install} hands the observer to twistd as
the application's C{ILogObserver} component, which twistd's
C{AppLogger.start} uses instead of making its own: the service calls it
when twistd adds it to the application (C{setServiceParent}), with the
twistd options C{tap.makeService} kept.
"""

from __future__ import annotations

import functools
import signal
import string
import sys

from twisted.logger import FileLogObserver, ILogObserver, formatEventAsClassicLogText, formatTime
from twisted.logger import timeFormatRFC3339 as TIME_FORMAT  # textFileLogObserver's default
from twisted.python import log as legacy_log
from twisted.python.logfile import LogFile
from twisted.python.runtime import platform


def _format_time(when) -> str:
    return formatTime(when, TIME_FORMAT)


def classic_format(event) -> str | None:
    """Twisted's own formatting of a line, as twistd's observer does it."""
    return formatEventAsClassicLogText(event, formatTime=_format_time)


@functools.lru_cache(maxsize=1024)
def _plain(fmt: str) -> bool:
    """
    Whether every field of C{fmt} is a plain name, with at most a
    conversion and a format spec without nested fields.  For such a format
    C{fmt.format_map(event)} gives what Twisted's formatter gives: it only
    differs for C{{f()}} calls, attribute and index access (wrapped in its
    C{PotentialCallWrapper}), positional fields and nested specs, which
    all go to Twisted.
    """
    try:
        for _, name, spec, conversion in string.Formatter().parse(fmt):
            if name is None:
                continue
            if not name.isidentifier() or "{" in spec or conversion not in (None, "r", "s", "a"):
                return False
    except ValueError:  # malformed: Twisted says "Unable to format event"
        return False
    return True


class _SecondCache:
    """
    C{formatTime(when)} for the last second asked, kept: the text depends
    only on the whole second (the format has no fraction, and the UTC offset
    changes on whole seconds).  A time within a microsecond of the next
    second is not cached, because C{datetime.fromtimestamp} rounds it up.
    """

    def __init__(self) -> None:
        # One tuple, replaced whole, so that another thread never sees the
        # second of one and the text of another.
        self._last = (None, "")

    def __call__(self, when) -> str:
        if type(when) is float and when >= 0:
            second = int(when)
            if when - second < 0.999999:
                last = self._last
                if last[0] == second:
                    return last[1]
                text = _format_time(when)
                self._last = (second, text)
                return text
        return _format_time(when)


_time_text = _SecondCache()


def message_text(event) -> str | None:
    """
    The text of an event's message (without time or system) as Twisted's
    formatter gives it, for the events of C{Logger().info("... {name} ...",
    name=...)}; L{None} for any other event, which Twisted's own
    formatter must then do.
    """
    fmt = event.get("log_format")
    if (type(fmt) is not str or "log_failure" in event or "log_flattened" in event
            or not _plain(fmt)):
        return None
    try:
        return fmt.format_map(event)
    except BaseException:
        # Twisted's formatter then says why, in its own words (called by
        # our caller, so that its traceback is not chained to ours).
        return None


def format_event(event) -> str | None:
    """
    Format an event exactly as L{classic_format} does, faster for the events
    of C{Logger().info("... {name} ...", name=...)}.
    """
    text = message_text(event)
    if text is None:
        return classic_format(event)
    if not text:
        return None
    system = event.get("log_system")
    if system is None:
        level = event.get("log_level")
        system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
    elif type(system) is not str:  # Twisted's str() of it, or its "UNFORMATTABLE"
        return classic_format(event)
    line = f"{_time_text(event.get('log_time'))} [{system}] {text}"
    return line.replace("\n", "\n\t") + "\n"


def observer_for_twistd(options, reactor=None) -> FileLogObserver | None:
    """
    The observer for twistd to log with, given twistd's own options (the
    parent of C{twistd mta}'s): on the file or standard output twistd's
    C{UnixAppLogger} would have chosen, or L{None} to leave the choice to
    twistd where it would do something else: C{--logger}, C{--syslog},
    C{--logfile=-} without C{-n} (twistd refuses it), C{--debug} (twistd's
    logger decides on C{-n} before C{--debug} implies it), or not Unix.
    """
    if options is None or platform.getType() != "posix":
        return None
    if options.get("logger") or options.get("syslog") or options.get("debug"):
        return None
    name = options.get("logfile") or ""
    nodaemon = options.get("nodaemon", False)
    if name == "-" and not nodaemon:
        return None
    if name == "-" or (nodaemon and not name):
        # Standard output as it is now: twistd redirects sys.stdout into
        # the log only after it has its observer.
        return FileLogObserver(sys.stdout, format_event)
    if reactor is None:
        from twisted.internet import reactor
    log_file = LogFile.fromFullPath(name or "twistd.log")
    # As twistd does for its own log file: SIGUSR1 rotates it, unless
    # something else already handles SIGUSR1.
    if not signal.getsignal(signal.SIGUSR1):
        def rotate_on_signal(signum, frame):
            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate_on_signal)
    return FileLogObserver(log_file, format_event)


def install(application, twistd_options, reactor=None) -> FileLogObserver | None:
    """
    Give twistd an observer (L{observer_for_twistd}) as the C{ILogObserver}
    component of C{application}, the application twistd adds the service
    of C{twistd mta} to, before it starts logging: twistd's
    C{AppLogger.start} then logs to it instead of making its own.  Nothing
    is done outside twistd (no options), for a parent that is not an
    application, or if the application has an observer already.

    @return: the observer given, or L{None}.
    """
    if twistd_options is None or not hasattr(application, "getComponent"):
        return None
    if (application.getComponent(ILogObserver, None) is not None
            or application.getComponent(legacy_log.ILogObserver, None) is not None):
        return None
    observer = observer_for_twistd(twistd_options, reactor)
    if observer is not None:
        application.setComponent(ILogObserver, observer)
    return observer

"""
Tests for L{twisted_mta.smtp.replies}: how a L{Reply} becomes bytes, and
that no text or code a plugin gives can put more than one well-formed
reply on the wire.
"""

from __future__ import annotations

import random
import re

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.smtp import replies
from twisted_mta.smtp.replies import (
    MAX_REPLY_TEXT,
    Reply,
    class_digit_matches,
    valid_enhanced,
)


class WellFormed:
    def assertOneReply(self, reply: Reply, enhanced: bool = True) -> list[bytes]:
        """
        C{reply} formats to one well-formed reply: every line is printable
        ASCII ending in CRLF, at most 512 octets, starts with the code and
        "-", but the last with the code and a space.  Returns the lines.
        """
        wire = reply.format(enhanced)
        self.assertTrue(wire.endswith(b"\r\n"), wire)
        lines = wire[:-2].split(b"\r\n")
        code = str(reply.code).encode("ascii")
        for i, line in enumerate(lines):
            self.assertLessEqual(len(line) + 2, 512, line)
            self.assertTrue(re.fullmatch(rb"[\x20-\x7e]*", line), line)
            sep = b" " if i == len(lines) - 1 else b"-"
            self.assertTrue(line.startswith(code + sep), line)
        self.assertEqual(wire.count(b"\r"), len(lines))
        self.assertEqual(wire.count(b"\n"), len(lines))
        return lines


class FormatTests(WellFormed, SynchronousTestCase):
    def test_single(self):
        self.assertEqual(Reply(250, "2.1.0", "Ok").format(), b"250 2.1.0 Ok\r\n")

    def test_enhancedOnlyWhenAsked(self):
        self.assertEqual(Reply(250, "2.1.0", "Ok").format(False), b"250 Ok\r\n")
        self.assertEqual(Reply(250, "2.1.0", "Ok").format(enhanced=False), b"250 Ok\r\n")

    def test_noEnhanced(self):
        self.assertEqual(Reply(220, None, "mx ESMTP").format(), b"220 mx ESMTP\r\n")
        self.assertEqual(Reply(354, None, "End data").format(), b"354 End data\r\n")

    def test_multiLineTuple(self):
        reply = Reply(250, None, ("mx.example", "PIPELINING", "SIZE 10", "8BITMIME"))
        self.assertEqual(reply.format(),
                         b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 10\r\n250 8BITMIME\r\n")

    def test_multiLineEnhanced(self):
        reply = Reply(550, "5.7.1", ("one", "two"))
        self.assertEqual(reply.format(), b"550-5.7.1 one\r\n550 5.7.1 two\r\n")
        self.assertEqual(reply.format(False), b"550-one\r\n550 two\r\n")

    def test_multiLineString(self):
        self.assertEqual(Reply(214, "2.0.0", "a\nb").format(), b"214-2.0.0 a\r\n214 2.0.0 b\r\n")
        self.assertEqual(Reply(214, None, "a\r\nb").format(), b"214-a\r\n214 b\r\n")

    def test_emptyText(self):
        self.assertEqual(Reply(250, None, "").format(), b"250 \r\n")
        self.assertEqual(Reply(250, None, ()).format(), b"250 \r\n")
        self.assertEqual(Reply(250, None, ()).lines, ("",))

    def test_lines(self):
        self.assertEqual(Reply(250, None, "a").lines, ("a",))
        self.assertEqual(Reply(250, None, "a\nb").lines, ("a", "b"))
        self.assertEqual(Reply(250, None, "a\r\nb").lines, ("a", "b"))
        self.assertEqual(Reply(250, None, ("a\nb",)).lines, ("a\nb",))

    def test_str(self):
        self.assertEqual(str(Reply(550, "5.7.1", "No")), "550 5.7.1 No")
        self.assertEqual(str(Reply(250, None, ("a", "b"))), "250-a / 250 b")

    def test_predicates(self):
        self.assertTrue(Reply(250, None, "").positive)
        self.assertTrue(Reply(354, None, "").positive)
        self.assertTrue(Reply(451, None, "").transient)
        self.assertFalse(Reply(451, None, "").permanent)
        self.assertTrue(Reply(554, None, "").permanent)
        self.assertFalse(Reply(554, None, "").positive)

    def test_withText(self):
        reply = Reply(550, "5.1.1", "No").with_text("<a@b>: No")
        self.assertEqual(reply, Reply(550, "5.1.1", "<a@b>: No"))


class SafetyTests(WellFormed, SynchronousTestCase):
    def test_crlfInjectionInText(self):
        for text in ("ok\r\n250 2.0.0 Ok: queued", "x\r250 y", "x\n\r\n250 y", "\r\n",
                     "a\x00b", "a\x85b", "a\u2028b", "a\x0bb\x0cc", "tab\there"):
            for enhanced in (True, False):
                lines = self.assertOneReply(Reply(550, "5.7.1", text), enhanced)
                self.assertTrue(all(line.startswith(b"550") for line in lines))

    def test_crlfInTupleLinesNeverAddLines(self):
        reply = Reply(550, "5.7.1", ("a\r\n250 Ok", "b\nc", "d\re"))
        lines = self.assertOneReply(reply)
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0], b"550-5.7.1 a??250 Ok")

    def test_nonASCII(self):
        wire = Reply(550, "5.7.1", "caf\u00e9 \u2603 \U0001f600").format()
        self.assertEqual(wire, b"550 5.7.1 caf? ? ?\r\n")

    def test_longLine(self):
        reply = Reply(550, "5.7.1", "x" * 2000)
        (line,) = self.assertOneReply(reply)
        self.assertEqual(len(line) + 2, 512)
        (line,) = self.assertOneReply(reply, enhanced=False)
        self.assertLessEqual(len(line) + 2, 512)
        self.assertEqual(len(Reply(250, None, "y" * MAX_REPLY_TEXT).format(False)), 3 + 1 + 500 + 2)

    def test_longLineWithLongEnhancedCode(self):
        # RFC 3463 allows up to three digits in each part.
        (line,) = self.assertOneReply(Reply(550, "5.123.456", "x" * 2000))
        self.assertEqual(len(line) + 2, 512)
        self.assertTrue(line.startswith(b"550 5.123.456 xxx"))

    def test_longMultiLine(self):
        lines = self.assertOneReply(Reply(250, "2.0.0", ("a" * 600, "b" * 600, "c")))
        self.assertEqual(len(lines), 3)

    def test_enhancedInjection(self):
        # The enhanced code may come from a plugin's verdict too.
        for bad in ("5.7.1\r\n250 2.0.0 Ok", "5.7.1\n", "x", "5.7", "5.7.1.1", "5.1234.1",
                    "5.\u0667.1", "\u00e9", "5.7.1 extra", "5.7.1" + " " * 600):
            lines = self.assertOneReply(Reply(550, bad, "No"))
            self.assertEqual(lines, [b"550 5.0.0 No"], bad)
            self.assertEqual(Reply(550, bad, "No").format(False), b"550 No\r\n")

    def test_enhancedClassFollowsCode(self):
        # Verdict.tempfail(enhanced="5.7.1") answers 451: the class must be 4.
        self.assertEqual(Reply(451, "5.7.1", "Later").format(), b"451 4.7.1 Later\r\n")
        self.assertEqual(Reply(550, "4.2.2", "Full").format(), b"550 5.2.2 Full\r\n")
        self.assertEqual(Reply(250, "5.0.0", "Ok").format(), b"250 2.0.0 Ok\r\n")

    def test_enhancedOnlyForItsClasses(self):
        self.assertEqual(Reply(354, "2.0.0", "Go ahead").format(), b"354 Go ahead\r\n")
        self.assertEqual(Reply(250, "", "Ok").format(), b"250 Ok\r\n")

    def test_random(self):
        rng = random.Random(2034)
        alphabet = ["a", " ", "\r", "\n", "\r\n", "\x00", "\u00e9", "-", "250 ", "x" * 100]
        for _ in range(500):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 30)))
            if rng.random() < 0.3:
                text = tuple(text.split("x"))
            enhanced = rng.choice([None, "5.7.1", "4.4.2", "5.999.999", "5.7.1\r\n", "bad"])
            code = rng.choice([250, 354, 421, 550])
            self.assertOneReply(Reply(code, enhanced, text), rng.random() < 0.5)

    def test_oneLineSameAsAnyText(self):
        # format() takes a short cut for one line of printable ASCII; it
        # must give what the general formatting gives.
        rng = random.Random(5321)
        texts = ["", "Ok", " ", "~", "a" * 498, "a" * 499, "a" * 500, "a" * 501, "x" * 2000,
                 "Ok: queued as 4XkR2b", "<a@b>: Relay access denied", "tab\there",
                 "del\x7f", "caf\u00e9", "a\rb", "a\nb", ("Ok",), ("a", "b")]
        texts += ["".join(rng.choice("aZ09 ~!\x1f\x7f\x80") for _ in range(rng.randrange(0, 600)))
                  for _ in range(300)]
        codes = [(250, "2.1.0"), (250, None), (354, None), (354, "2.0.0"), (451, "5.7.1"),
                 (550, "5.123.456"), (550, "bad"), (550, "5.7.1\r\n250 Ok"), (250, ""),
                 (221, "2.0.0"), (550, 571)]
        for text in texts:
            for code, enhanced in codes:
                reply = Reply(code, enhanced, text)
                for with_enhanced in (True, False):
                    self.assertEqual(reply.format(with_enhanced),
                                     reply._format_lines(with_enhanced), (reply, with_enhanced))


class EnhancedCodeTests(SynchronousTestCase):
    def test_valid(self):
        for code in ("2.0.0", "4.7.1", "5.1.1", "5.123.456", "5.0.999"):
            self.assertTrue(valid_enhanced(code), code)

    def test_invalid(self):
        for code in ("", "1.0.0", "3.0.0", "6.0.0", "5.7", "5.7.1.1", "5.1234.1", "5.1.1234",
                     "5.7.1\n", " 5.7.1", "5.7.1 ", "5.\u0667.1", "5-7-1", "a.b.c"):
            self.assertFalse(valid_enhanced(code), repr(code))

    def test_classDigitMatches(self):
        self.assertTrue(class_digit_matches(550, "5.7.1"))
        self.assertTrue(class_digit_matches(451, "4.3.0"))
        self.assertTrue(class_digit_matches(220, None))
        self.assertFalse(class_digit_matches(451, "5.7.1"))
        self.assertFalse(class_digit_matches(250, "4.0.0"))


class ConstantsTests(WellFormed, SynchronousTestCase):
    def test_allConstantsWellFormed(self):
        for name in dir(replies):
            value = getattr(replies, name)
            if isinstance(value, Reply):
                self.assertOneReply(value)
                if value.enhanced is not None:
                    self.assertTrue(valid_enhanced(value.enhanced), name)
                    self.assertTrue(class_digit_matches(value.code, value.enhanced), name)

    def test_postfixTexts(self):
        # Operators' log parsers rely on these.
        self.assertEqual(replies.RELAY_DENIED.format(), b"554 5.7.1 Relay access denied\r\n")
        self.assertEqual(replies.SYNTAX_UNKNOWN.format(),
                         b"500 5.5.1 Error: command not recognized\r\n")
        self.assertEqual(replies.NUL_IN_COMMAND.code, 500)
        self.assertEqual(replies.NUL_IN_COMMAND.enhanced, "5.5.2")
        self.assertEqual(replies.TOO_MANY_RCPT.format(), b"452 4.5.3 Error: too many recipients\r\n")

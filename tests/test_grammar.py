"""
Tests for L{twisted_mta.smtp.grammar}: command lines, paths and mailboxes
(RFC 5321 4.1.2, RFC 6531) and ESMTP parameters, as pure functions.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.smtp import grammar, replies
from twisted_mta.smtp.grammar import (
    MAX_DOMAIN,
    MAX_LOCAL_PART,
    MAX_PATH,
    Address,
    GrammarError,
    is_address_literal,
    is_domain,
    parse_bdat,
    parse_command,
    parse_helo,
    parse_mail,
    parse_mailbox,
    parse_params,
    parse_path,
    parse_rcpt,
)

LIMIT = 10_000_000


def mail(argument: str, **kw) -> grammar.MailCommand:
    kw.setdefault("max_size", LIMIT)
    return parse_mail(argument, **kw)


def rcpt(argument: str, smtputf8: bool = False) -> grammar.RcptCommand:
    return parse_rcpt(argument, smtputf8=smtputf8)


class GrammarTestCase(SynchronousTestCase):
    def assertReply(self, call, code: int, enhanced: str | None = None) -> GrammarError:
        """C{call()} raises a L{GrammarError} whose reply has C{code} (and C{enhanced})."""
        error = self.assertRaises(GrammarError, call)
        self.assertEqual(error.reply.code, code, str(error.reply))
        if enhanced is not None:
            self.assertEqual(error.reply.enhanced, enhanced, str(error.reply))
        return error

    def assertBadSender(self, argument: str, **kw) -> None:
        self.assertReply(lambda: mail(argument, **kw), 501, "5.1.7")

    def assertBadRecipient(self, argument: str, smtputf8: bool = False) -> None:
        self.assertReply(lambda: rcpt(argument, smtputf8), 501, "5.1.3")

    def assertSender(self, argument: str, local: str, domain: str | None, **kw) -> None:
        self.assertEqual(mail(argument, **kw).sender, Address(local, domain))

    def assertRecipient(self, argument: str, local: str, domain: str | None,
                        smtputf8: bool = False) -> None:
        self.assertEqual(rcpt(argument, smtputf8).recipient, Address(local, domain))


class ParseCommandTests(GrammarTestCase):
    def test_verbAndArgument(self):
        command = parse_command(b"MAIL FROM:<a@example.com> SIZE=10")
        self.assertEqual(command.verb, "MAIL")
        self.assertEqual(command.argument, "FROM:<a@example.com> SIZE=10")

    def test_noArgument(self):
        self.assertEqual(parse_command(b"DATA"), grammar.Command("DATA", ""))

    def test_verbCaseFolded(self):
        for line in (b"ehlo x", b"Ehlo x", b"eHlO x"):
            self.assertEqual(parse_command(line).verb, "EHLO")

    def test_argumentCaseKept(self):
        self.assertEqual(parse_command(b"helo MiXeD.example").argument, "MiXeD.example")

    def test_argumentSpacesKept(self):
        # Only the first space separates; what follows is the handler's.
        self.assertEqual(parse_command(b"EHLO  x ").argument, " x ")

    def test_nul(self):
        for line in (b"\x00", b"NOOP\x00", b"MAIL FROM:<a\x00@b>", b"\x00HELO x"):
            error = self.assertReply(lambda: parse_command(line), 500, "5.5.2")
            self.assertIs(error.reply, replies.NUL_IN_COMMAND)

    def test_nulBeforeBadUTF8(self):
        # A line with both is refused for the NUL, the more specific error.
        self.assertIs(self.assertReply(lambda: parse_command(b"\xff\x00"), 500).reply,
                      replies.NUL_IN_COMMAND)

    def test_invalidUTF8(self):
        for line in (b"HELO \xff", b"MAIL FROM:<\xc3@b>", b"\xe2\x82", b"NOOP \xed\xa0\x80"):
            error = self.assertReply(lambda: parse_command(line), 500, "5.5.2")
            self.assertIs(error.reply, replies.EIGHT_BIT_COMMAND)

    def test_validUTF8ReturnedAsIs(self):
        # Whether it is allowed depends on SMTPUTF8, which the caller knows.
        command = parse_command("RCPT TO:<jos\u00e9@example.com>".encode("utf-8"))
        self.assertEqual(command.argument, "TO:<jos\u00e9@example.com>")

    def test_emptyLine(self):
        self.assertIs(self.assertReply(lambda: parse_command(b""), 500, "5.5.1").reply,
                      replies.SYNTAX_UNKNOWN)

    def test_badVerbs(self):
        for line in (b" HELO x", b"HELO1 x", b"HE-LO", b"H\xc3\xa9LO",
                     b"ABCDEFGHIJK", b"NOOP\t", b"QUIT\r", b"MAIL:FROM:<>", b"12"):
            self.assertReply(lambda: parse_command(line), 500, "5.5.1")

    def test_longestVerb(self):
        self.assertEqual(parse_command(b"ABCDEFGHIJ").verb, "ABCDEFGHIJ")


class ParseHeloTests(GrammarTestCase):
    def test_domain(self):
        self.assertEqual(parse_helo("client.example.com"), "client.example.com")

    def test_literal(self):
        self.assertEqual(parse_helo("[192.0.2.1]"), "[192.0.2.1]")

    def test_anyTokenAccepted(self):
        # Like Postfix: many clients send a bare or bogus name.
        self.assertEqual(parse_helo("localhost"), "localhost")
        self.assertEqual(parse_helo("bad_name!"), "bad_name!")

    def test_surroundingSpaces(self):
        self.assertEqual(parse_helo("  x.example  "), "x.example")

    def test_refused(self):
        for argument in ("", "   ", "a b", "x\ty", "x\r", "x\x7f"):
            self.assertReply(lambda: parse_helo(argument), 501, "5.5.4")


class AddressValueTests(GrammarTestCase):
    def test_strPlain(self):
        self.assertEqual(str(Address("user.name+tag", "example.com")), "user.name+tag@example.com")

    def test_strPostmaster(self):
        self.assertEqual(str(Address("Postmaster", None)), "Postmaster")

    def test_strQuotesWhenNeeded(self):
        cases = {
            "a b": '"a b"',
            'a"b': '"a\\"b"',
            "a\\b": '"a\\\\b"',
            ".a": '".a"',
            "a.": '"a."',
            "a..b": '"a..b"',
            "a@b": '"a@b"',
            "a>b": '"a>b"',
            "": '""',
        }
        for local, printed in cases.items():
            self.assertEqual(str(Address(local, "example.com")), printed + "@example.com")

    def test_strUTF8NotQuoted(self):
        # RFC 5321 4.1.2: the least quoting; a UTF-8 dot-string needs none.
        self.assertEqual(str(Address("jos\u00e9", "ex\u00e4mple.com")),
                         "jos\u00e9@ex\u00e4mple.com")

    def test_roundTrip(self):
        locals_ = ["user", "first.last", "a b", 'say "hi"', "back\\slash", "a@b",
                   "<>", ".dot", "dot.", "a..b", "", "x" * 30, "!#$%&'*+-/=?^_`{|}~",
                   "jos\u00e9", "\u7528\u6237", "\u00e9 \u00e9"]
        domains = ["example.com", "[192.0.2.1]", "[IPv6:2001:db8::1]", "ex\u00e4mple.com"]
        for local in locals_:
            for domain in domains:
                address = Address(local, domain)
                self.assertEqual(parse_mailbox(str(address), utf8=True), address)
                # And through a command, as a client would send it.
                argument = f"FROM:<{address}> SMTPUTF8"
                self.assertEqual(mail(argument).sender, address)

    def test_roundTripRandom(self):
        # Any local part an Address can hold prints to text that parses
        # back to it: the spool keeps addresses as that text.
        rng = random.Random(5322)
        alphabet = [chr(c) for c in range(0x20, 0x7f)] + ["\u00e9", "\u7528", "\U0001f600"]
        for _ in range(3000):
            local = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
            address = Address(local, "example.com")
            self.assertEqual(parse_mailbox(str(address), utf8=True), address, local)
            if local.isascii():
                self.assertEqual(parse_mailbox(str(address)), address, local)

    def test_roundTripASCII(self):
        for local in ["user", "a b", 'q"uote', "a\\b", ".x", "x@y"]:
            address = Address(local, "example.com")
            self.assertEqual(parse_mailbox(str(address)), address)

    def test_key(self):
        self.assertEqual(Address("User", "Example.COM").key, "user@example.com")
        self.assertEqual(Address("User", "Example.COM").domain_key, "example.com")
        self.assertEqual(Address("A B", "X").key, '"a b"@x')
        self.assertEqual(Address("Postmaster", None).key, "postmaster")
        self.assertEqual(Address("Postmaster", None).domain_key, "")

    def test_keySameForQuotedAndUnquoted(self):
        self.assertEqual(parse_mailbox('"user"@example.com').key,
                         parse_mailbox("USER@EXAMPLE.COM").key)

    def test_domainCaseKept(self):
        self.assertEqual(parse_mailbox("u@Example.COM").domain, "Example.COM")

    def test_hasRouting(self):
        for local in ("a%b", "host!user", "a@b", "%", "!"):
            self.assertTrue(Address(local, "example.com").has_routing, local)
        for local in ("user", "a.b", "a+b", "a-b"):
            self.assertFalse(Address(local, "example.com").has_routing, local)
        self.assertTrue(parse_mailbox('"user@other.example"@example.com').has_routing)
        self.assertTrue(parse_mailbox("user%other.example@example.com").has_routing)

    def test_isLiteral(self):
        self.assertTrue(Address("u", "[192.0.2.1]").is_literal)
        self.assertTrue(Address("u", "[IPv6:::1]").is_literal)
        self.assertFalse(Address("u", "example.com").is_literal)
        self.assertFalse(Address("Postmaster", None).is_literal)

    def test_isUTF8(self):
        self.assertFalse(Address("u", "example.com").is_utf8)
        self.assertTrue(Address("\u00e9", "example.com").is_utf8)
        self.assertTrue(Address("u", "\u00e9.example").is_utf8)
        self.assertFalse(Address("Postmaster", None).is_utf8)

    def test_lineBreakingCharactersRefused(self):
        # Whoever makes an Address (a plugin, say), it can never print a
        # CR or LF into a command line or the spool.
        for bad in ("a\r\nRCPT TO:<x@y>", "a\nb", "a\rb", "a\x00", "a\tb", "a\x7f",
                    "a\x85b", "a\u2028b"):
            self.assertRaises(ValueError, Address, bad, "example.com")
            self.assertRaises(ValueError, Address, "u", "example.com" + bad)

    def test_frozen(self):
        address = Address("u", "example.com")
        self.assertRaises(AttributeError, setattr, address, "local", "v")


class DomainTests(GrammarTestCase):
    def test_domains(self):
        for text in ("example.com", "a", "localhost", "a-b.c-d.example", "x1.y2",
                     "1.example", "a" * 63 + ".com", "xn--bcher-kva.example"):
            self.assertTrue(is_domain(text), text)

    def test_notDomains(self):
        for text in ("", ".", "example.com.", ".example.com", "a..b", "-a.com", "a-.com",
                     "a_b.com", "a b", "a" * 64 + ".com", "example.com\n", "\nexample.com",
                     "[192.0.2.1]", "ex\u00e4mple.com", "a.-b", "a.b-"):
            self.assertFalse(is_domain(text), repr(text))

    def test_length(self):
        label = "a" * 63
        name = ".".join([label] * 4)[:MAX_DOMAIN]
        name = name.rstrip(".")
        self.assertLessEqual(len(name), MAX_DOMAIN)
        self.assertTrue(is_domain(name))
        self.assertEqual(len(".".join([label] * 4)), 255)
        self.assertTrue(is_domain(".".join([label] * 4)))
        self.assertFalse(is_domain(".".join([label] * 4) + "a"))
        self.assertFalse(is_domain("a." + ".".join([label] * 4)))

    def test_utf8Domains(self):
        for text in ("ex\u00e4mple.com", "\u4f8b\u3048.\u30c6\u30b9\u30c8", "b\u00fccher.de",
                     "example.com", "\u00e9", "a-\u00e9.com"):
            self.assertTrue(is_domain(text, utf8=True), text)

    def test_utf8NotDomains(self):
        for text in ("\u00e9-.com", "-\u00e9.com", "a-.com", "\u00e9..com", "\u00e9 .com",
                     "\u00e9.com\n", "a\x85b.com", "a\u2028.com", "\u00e9" * 64 + ".com"):
            self.assertFalse(is_domain(text, utf8=True), repr(text))

    def test_utf8LengthInOctets(self):
        # 128 two-octet characters are 256 octets, over the limit.
        name = ".".join(["\u00e9" * 60, "\u00e9" * 60, "\u00e9" * 8])
        self.assertGreater(len(name.encode("utf-8")), MAX_DOMAIN)
        self.assertFalse(is_domain(name, utf8=True))


class AddressLiteralTests(GrammarTestCase):
    def test_ipv4(self):
        for text in ("[192.0.2.1]", "[0.0.0.0]", "[255.255.255.255]", "[127.0.0.1]"):
            self.assertTrue(is_address_literal(text), text)

    def test_badIPv4(self):
        for text in ("[256.0.0.1]", "[1.2.3]", "[1.2.3.4.5]", "[1.2.3.4 ]", "[ 1.2.3.4]",
                     "192.0.2.1", "[192.0.2.1", "192.0.2.1]", "[1.2.3.1234]",
                     "[\u0661.\u0662.\u0663.\u0664]", "[1.2.3.4\n]", "[]", "[1.2.3.-4]"):
            self.assertFalse(is_address_literal(text), repr(text))

    def test_ipv6(self):
        for text in ("[IPv6:::1]", "[IPv6:2001:db8::1]", "[ipv6:2001:DB8:0:0:0:0:0:1]",
                     "[IPv6:::ffff:192.0.2.1]", "[IPV6:fe80::1]",
                     "[IPv6:2001:db8:1:2:3:4:5:6]"):
            self.assertTrue(is_address_literal(text), text)

    def test_badIPv6(self):
        for text in ("[IPv6:]", "[IPv6:1::2::3]", "[IPv6:12345::]", "[IPv6:g::1]",
                     "[IPv6:fe80::1%eth0]", "[IPv6:::1%x y]", "[IPv6:::1%\u00e9]",
                     "[IPv6:192.0.2.1]", "[IPv6: ::1]", "[IPv6:::1\n]"):
            self.assertFalse(is_address_literal(text), repr(text))

    def test_general(self):
        # Syntactically a general literal, though no such tag is registered.
        for text in ("[x-tag:content]", "[tag:a@b]", "[t:!~]", "[2001:db8::1]"):
            self.assertTrue(is_address_literal(text), text)

    def test_badGeneral(self):
        for text in ("[:content]", "[tag-:x]", "[tag:]", "[tag:a b]", "[tag:a[b]",
                     "[tag:a\\b]", "[ta g:x]", "[tag:x\n]", "[tag:\u00e9]", "[notag]"):
            self.assertFalse(is_address_literal(text), repr(text))


class MailboxTests(GrammarTestCase):
    def test_simple(self):
        self.assertEqual(parse_mailbox("user@example.com"), Address("user", "example.com"))

    def test_dotString(self):
        self.assertEqual(parse_mailbox("first.m.last@example.com").local, "first.m.last")
        self.assertEqual(parse_mailbox("!#$%&'*+-/=?^_`{|}~@x").local, "!#$%&'*+-/=?^_`{|}~")

    def test_badDotString(self):
        for text in (".user@x", "user.@x", "us..er@x", ".@x", "a b@x", "a(b)@x", "a,b@x",
                     "a[b@x", "a\\b@x", "a\"b@x", "a:b@x", "a;b@x", "a<b@x", "a>b@x",
                     "user\n@x", "@x", "x", "x@", "a@b@c"):
            self.assertRaises(ValueError, parse_mailbox, text)

    def test_quoted(self):
        cases = {
            '"a b"@x': "a b",
            '"a\\"b"@x': 'a"b',
            '"a\\\\b"@x': "a\\b",
            '"a>b"@x': "a>b",
            '"a@b"@x': "a@b",
            '".a..b."@x': ".a..b.",
            '""@x': "",
            '"\\a"@x': "a",
            '"a,b:c;d<e>"@x': "a,b:c;d<e>",
        }
        for text, local in cases.items():
            self.assertEqual(parse_mailbox(text), Address(local, "x"), text)

    def test_badQuoted(self):
        for text in ('"a@x', 'a"@x', '"a"b"@x', '"a\\"@x', '"a\tb"@x', '"a\rb"@x',
                     '"a\x00"@x', '"a"b@x', '"a"', '"a"@', '"\u00e9"@x', '"\\\u00e9"@x'):
            self.assertRaises(ValueError, parse_mailbox, text)

    def test_quotedUTF8(self):
        self.assertEqual(parse_mailbox('"j\u00f6 e"@x', utf8=True).local, "j\u00f6 e")
        self.assertRaises(ValueError, parse_mailbox, '"a\x85"@x', utf8=True)

    def test_utf8(self):
        self.assertEqual(parse_mailbox("\u7528\u6237@\u4f8b\u3048.jp", utf8=True),
                         Address("\u7528\u6237", "\u4f8b\u3048.jp"))
        self.assertRaises(ValueError, parse_mailbox, "\u7528\u6237@example.jp")
        self.assertRaises(ValueError, parse_mailbox, "user@\u4f8b\u3048.jp")
        self.assertRaises(ValueError, parse_mailbox, "a\u2028b@x", utf8=True)

    def test_literalDomains(self):
        self.assertEqual(parse_mailbox("u@[192.0.2.1]").domain, "[192.0.2.1]")
        self.assertEqual(parse_mailbox("u@[IPv6:2001:db8::1]").domain, "[IPv6:2001:db8::1]")
        self.assertEqual(parse_mailbox("u@[tag:a@b]").domain, "[tag:a@b]")
        self.assertRaises(ValueError, parse_mailbox, "u@[999.0.2.1]")
        self.assertRaises(ValueError, parse_mailbox, "u@[IPv6:fe80::1%eth0]")

    def test_localPartLength(self):
        self.assertEqual(parse_mailbox("a" * MAX_LOCAL_PART + "@x").local, "a" * 64)
        self.assertRaises(ValueError, parse_mailbox, "a" * (MAX_LOCAL_PART + 1) + "@x")
        # The limit is on the local part as sent, quotes included.
        self.assertEqual(parse_mailbox('"' + "a" * 62 + '"@x').local, "a" * 62)
        self.assertRaises(ValueError, parse_mailbox, '"' + "a" * 63 + '"@x')
        # And in octets, not characters.
        self.assertEqual(parse_mailbox("\u00e9" * 32 + "@x", utf8=True).local, "\u00e9" * 32)
        self.assertRaises(ValueError, parse_mailbox, "\u00e9" * 33 + "@x", utf8=True)

    def test_domainLength(self):
        label = "a" * 63
        domain = ".".join([label] * 4)
        self.assertEqual(len(domain), MAX_DOMAIN)
        self.assertEqual(parse_mailbox("u@" + domain).domain, domain)
        self.assertRaises(ValueError, parse_mailbox, "u@a" + domain)


class PathTests(GrammarTestCase):
    def test_null(self):
        self.assertIsNone(parse_path("", null_ok=True))
        self.assertRaises(ValueError, parse_path, "")

    def test_postmaster(self):
        for text in ("Postmaster", "postmaster", "POSTMASTER"):
            self.assertEqual(parse_path(text, postmaster_ok=True), Address(text, None))
            self.assertRaises(ValueError, parse_path, text)

    def test_sourceRouteStripped(self):
        self.assertEqual(parse_path("@a.example,@b.example:u@c.example"),
                         Address("u", "c.example"))
        self.assertEqual(parse_path("@a.example:u@c.example"), Address("u", "c.example"))
        self.assertEqual(parse_path("@[192.0.2.1]:u@c.example"), Address("u", "c.example"))

    def test_badSourceRoute(self):
        for text in ("@a.example", "@a.example u@c", "a.example:u@c", "@:u@c",
                     "@a.example,b.example:u@c", "@a_b:u@c", "@a.example,:u@c", "@a:",
                     "@a:Postmaster"):
            self.assertRaises(ValueError, parse_path, text, postmaster_ok=True)

    def test_length(self):
        # 256 octets for the whole path, brackets included (4.5.3.1.3).
        local = "a" * 64
        domain = ".".join(["b" * 63, "c" * 63, "d" * 63])[: MAX_PATH - 2 - 65]
        self.assertEqual(len(f"<{local}@{domain}>"), MAX_PATH)
        self.assertEqual(parse_path(f"{local}@{domain}"), Address(local, domain))
        self.assertRaises(ValueError, parse_path, f"{local}@{domain}x")

    def test_lengthWithSourceRoute(self):
        route = "@" + "r" * 63 + ":"
        domain = ".".join(["b" * 63, "c" * 63])
        text = route + "a" * 64 + "@" + domain
        self.assertGreater(len(text) + 2, MAX_PATH)
        self.assertRaises(ValueError, parse_path, text)


class ParseMailTests(GrammarTestCase):
    def test_simple(self):
        command = mail("FROM:<user@example.com>")
        self.assertEqual(command.sender, Address("user", "example.com"))
        self.assertEqual((command.size, command.body, command.smtputf8, command.auth),
                         (None, "7BIT", False, None))
        self.assertEqual(command.params, {})

    def test_nullSender(self):
        self.assertIsNone(mail("FROM:<>").sender)
        self.assertIsNone(mail("FROM:<> SIZE=100").sender)
        self.assertIsNone(mail("FROM:<> SMTPUTF8").sender)

    def test_prefixCaseInsensitive(self):
        for argument in ("from:<a@b>", "From:<a@b>", "fRoM:<a@b>"):
            self.assertSender(argument, "a", "b")

    def test_spaceAfterColon(self):
        self.assertSender("FROM: <a@b>", "a", "b")
        self.assertSender("FROM:   <a@b>", "a", "b")
        self.assertIsNone(mail("FROM: <>").sender)

    def test_trailingSpaces(self):
        self.assertSender("FROM:<a@b>   ", "a", "b")
        self.assertEqual(mail("FROM:<a@b>  SIZE=5  ").size, 5)

    def test_usage(self):
        for argument in ("", "FROM", "FROM<a@b>", "TO:<a@b>", " FROM:<a@b>", "FROMM:<a@b>",
                         "FR\u0131OM:<a@b>"):
            self.assertReply(lambda: mail(argument), 501, "5.5.4")

    def test_missingBrackets(self):
        for argument in ("FROM:a@b", "FROM:", "FROM:<a@b", "FROM:a@b>", "FROM: a@b SIZE=1",
                         "FROM:<a@b>SIZE=1", "FROM:<<a@b>>", "FROM:< a@b>", "FROM:<a@b >"):
            self.assertBadSender(argument)

    def test_badAddresses(self):
        for argument in ("FROM:<.a@b>", "FROM:<a.@b>", "FROM:<a..b@c>", "FROM:<a>",
                         "FROM:<@b>", "FROM:<a@>", "FROM:<a@b..c>", "FROM:<a@[1.2.3.999]>",
                         "FROM:<Postmaster>", 'FROM:<"a@b>', "FROM:<a b@c>"):
            self.assertBadSender(argument)

    def test_quotedLocalParts(self):
        self.assertSender('FROM:<"a b"@x>', "a b", "x")
        self.assertSender('FROM:<"a>b"@x> SIZE=3', "a>b", "x")
        self.assertSender('FROM:<"a@b"@x>', "a@b", "x")
        self.assertSender('FROM:<"a\\"b"@x>', 'a"b', "x")
        self.assertSender('FROM:<"a\\\\"@x>', "a\\", "x")
        self.assertSender('FROM:<"a\\">"@x>', 'a">', "x")
        self.assertEqual(mail('FROM:<"a>b"@x> SIZE=3').size, 3)

    def test_literals(self):
        self.assertSender("FROM:<u@[192.0.2.1]>", "u", "[192.0.2.1]")
        self.assertSender("FROM:<u@[IPv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]")
        self.assertSender("FROM:<u@[x-tag:stuff]>", "u", "[x-tag:stuff]")
        self.assertBadSender("FROM:<u@[IPv6:fe80::1%eth0]>")

    def test_sourceRoute(self):
        self.assertSender("FROM:<@a.example,@b.example:u@c.example>", "u", "c.example")

    def test_size(self):
        self.assertEqual(mail("FROM:<a@b> SIZE=0").size, 0)
        self.assertEqual(mail("FROM:<a@b> SIZE=12345").size, 12345)
        self.assertEqual(mail("FROM:<a@b> size=12345").size, 12345)
        self.assertEqual(mail("FROM:<a@b> SIZE=007").size, 7)
        self.assertEqual(mail("FROM:<a@b> SIZE=100", max_size=100).size, 100)
        self.assertEqual(mail("FROM:<a@b> SIZE=100", max_size=100).params, {"SIZE": "100"})

    def test_sizeOverLimit(self):
        self.assertReply(lambda: mail("FROM:<a@b> SIZE=101", max_size=100), 552, "5.3.4")
        self.assertReply(lambda: mail("FROM:<a@b> SIZE=" + "9" * 20, max_size=100), 552, "5.3.4")

    def test_badSize(self):
        for value in ("", "-1", "+1", "1.5", "1e3", "abc", "0x10", "9" * 21,
                      "\u00b2", "\u0661\u0662"):
            argument = f"FROM:<a@b> SIZE={value} SMTPUTF8"
            self.assertReply(lambda: mail(argument), 501, "5.5.4")
        self.assertReply(lambda: mail("FROM:<a@b> SIZE"), 501, "5.5.4")

    def test_body(self):
        self.assertEqual(mail("FROM:<a@b> BODY=7BIT").body, "7BIT")
        self.assertEqual(mail("FROM:<a@b> BODY=8BITMIME").body, "8BITMIME")
        self.assertEqual(mail("FROM:<a@b> body=8bitmime").body, "8BITMIME")

    def test_badBody(self):
        for value in ("BINARYMIME", "8BIT", "7bits", "", "8B\u0131TM\u0131ME"):
            argument = f"FROM:<a@b> SMTPUTF8 BODY={value}"
            self.assertReply(lambda: mail(argument), 501, "5.5.4")
        self.assertReply(lambda: mail("FROM:<a@b> BODY"), 501, "5.5.4")

    def test_smtputf8(self):
        command = mail("FROM:<a@b> SMTPUTF8")
        self.assertTrue(command.smtputf8)
        self.assertEqual(command.params, {"SMTPUTF8": None})
        self.assertTrue(mail("FROM:<a@b> smtputf8").smtputf8)

    def test_smtputf8WithValue(self):
        self.assertReply(lambda: mail("FROM:<a@b> SMTPUTF8=yes"), 501, "5.5.4")

    def test_unknownParameter(self):
        for argument in ("FROM:<a@b> RET=HDRS", "FROM:<a@b> FOO", "FROM:<a@b> AUTH=<>",
                         "FROM:<a@b> SIZE=1 XYZ=1"):
            self.assertReply(lambda: mail(argument), 555, "5.5.4")

    def test_extraParams(self):
        command = mail("FROM:<a@b> AUTH=<>", extra_params=frozenset({"AUTH"}))
        self.assertEqual(command.auth, "<>")
        self.assertEqual(command.params, {"AUTH": "<>"})

    def test_duplicateParameter(self):
        for argument in ("FROM:<a@b> SIZE=1 SIZE=1", "FROM:<a@b> SIZE=1 size=2",
                         "FROM:<a@b> SMTPUTF8 SMTPUTF8", "FROM:<a@b> BODY=7BIT BODY=8BITMIME"):
            self.assertReply(lambda: mail(argument), 501, "5.5.4")

    def test_badParameterSyntax(self):
        for argument in ("FROM:<a@b> =1", "FROM:<a@b> -X", "FROM:<a@b> S_IZE=1",
                         "FROM:<a@b> SIZE=1=2", "FROM:<a@b> X=a\tb", "FROM:<a@b> SIZE=1\t",
                         "FROM:<a@b> SMTPUTF8 SIZE=\u00a01"):
            self.assertReply(lambda: mail(argument), 501, "5.5.4")

    def test_utf8NeedsSMTPUTF8(self):
        for argument in ("FROM:<jos\u00e9@example.com>", "FROM:<u@b\u00fccher.de>",
                         'FROM:<"j\u00f6"@x>', "FROM:<a@b> X=\u00e9"):
            self.assertReply(lambda: mail(argument), 553, "5.6.7")

    def test_utf8WithSMTPUTF8(self):
        self.assertSender("FROM:<jos\u00e9@b\u00fccher.de> SMTPUTF8", "jos\u00e9", "b\u00fccher.de")
        self.assertSender("FROM:<\u7528\u6237@\u4f8b\u3048.jp> SMTPUTF8", "\u7528\u6237",
                          "\u4f8b\u3048.jp")
        self.assertSender('FROM:<"j\u00f6 e"@x> SMTPUTF8', "j\u00f6 e", "x")
        self.assertSender("FROM:<@b\u00fccher.de:u@x> SMTPUTF8", "u", "x")

    def test_utf8BadEvenWithSMTPUTF8(self):
        for argument in ("FROM:<a\u2028b@x> SMTPUTF8", "FROM:<a\x85@x> SMTPUTF8",
                         "FROM:<\u00e9.@x> SMTPUTF8", "FROM:<a@\u00e9-> SMTPUTF8"):
            self.assertBadSender(argument)

    def test_pathTooLong(self):
        long_domain = ".".join(["d" * 63] * 3)
        self.assertBadSender(f"FROM:<{'a' * 64}@{long_domain}>")

    def test_controlCharacters(self):
        for argument in ("FROM:<a\rb@c>", "FROM:<a@b\r>", "FROM:<a@b>\rRCPT TO:<c@d>",
                         "FROM:<a@b> SIZE=1\r", "FROM:<a@b>\r"):
            self.assertRaises(GrammarError, mail, argument)


class ParseRcptTests(GrammarTestCase):
    def test_simple(self):
        command = rcpt("TO:<user@example.com>")
        self.assertEqual(command.recipient, Address("user", "example.com"))
        self.assertEqual(command.params, {})

    def test_prefix(self):
        self.assertRecipient("to:<a@b>", "a", "b")
        self.assertRecipient("To: <a@b>", "a", "b")
        for argument in ("", "TO", "TO<a@b>", "FROM:<a@b>", "T:<a@b>"):
            self.assertReply(lambda: rcpt(argument), 501, "5.5.4")

    def test_postmaster(self):
        for name in ("Postmaster", "postmaster", "POSTMASTER", "PostMaster"):
            self.assertRecipient(f"TO:<{name}>", name, None)
        self.assertRecipient("TO:<postmaster@example.com>", "postmaster", "example.com")

    def test_nullRefused(self):
        self.assertBadRecipient("TO:<>")

    def test_missingBrackets(self):
        for argument in ("TO:a@b", "TO:", "TO:<a@b", "TO:a@b>", "TO:Postmaster",
                         "TO:<a@b>NOTIFY=NEVER"):
            self.assertBadRecipient(argument)

    def test_badAddresses(self):
        for argument in ("TO:<.a@b>", "TO:<a.@b>", "TO:<a..b@c>", "TO:<a>", "TO:<a@b.>",
                         "TO:<Postmaster@>", "TO:<u@[IPv6:::1%x y]>", "TO:<u@[1.2.3]>"):
            self.assertBadRecipient(argument)

    def test_quoted(self):
        self.assertRecipient('TO:<"a > b"@x>', "a > b", "x")
        self.assertRecipient('TO:<"user@other.example"@x>', "user@other.example", "x")

    def test_literals(self):
        self.assertRecipient("TO:<u@[192.0.2.1]>", "u", "[192.0.2.1]")
        self.assertRecipient("TO:<u@[IPv6:::1]>", "u", "[IPv6:::1]")

    def test_sourceRouteStripped(self):
        self.assertRecipient("TO:<@relay.example,@other.example:u@final.example>", "u",
                             "final.example")

    def test_paramsRefused(self):
        for argument in ("TO:<a@b> NOTIFY=NEVER", "TO:<a@b> ORCPT=rfc822;a@b", "TO:<a@b> X"):
            self.assertReply(lambda: rcpt(argument), 555, "5.5.4")

    def test_badParamSyntax(self):
        self.assertReply(lambda: rcpt("TO:<a@b> =x"), 501, "5.5.4")

    def test_utf8(self):
        self.assertReply(lambda: rcpt("TO:<jos\u00e9@x>"), 553, "5.6.7")
        self.assertReply(lambda: rcpt("TO:<u@b\u00fccher.de>"), 553, "5.6.7")
        self.assertRecipient("TO:<jos\u00e9@b\u00fccher.de>", "jos\u00e9", "b\u00fccher.de",
                             smtputf8=True)

    def test_localPartLength(self):
        self.assertRecipient(f"TO:<{'a' * 64}@x>", "a" * 64, "x")
        self.assertBadRecipient(f"TO:<{'a' * 65}@x>")


class ParseParamsTests(GrammarTestCase):
    def test_params(self):
        self.assertEqual(parse_params("size=1 Body=8BITMIME  SMTPUTF8"),
                         {"SIZE": "1", "BODY": "8BITMIME", "SMTPUTF8": None})

    def test_empty(self):
        self.assertEqual(parse_params(""), {})
        self.assertEqual(parse_params("   "), {})

    def test_valueCaseKept(self):
        self.assertEqual(parse_params("AUTH=MixedCase"), {"AUTH": "MixedCase"})

    def test_bad(self):
        for text in ("=x", "K=", "K==", "K=a=b", "-K", "K_1", "K=\u00e9", "K\t", "K=\x7f"):
            self.assertRaises(ValueError, parse_params, text)

    def test_utf8Values(self):
        self.assertEqual(parse_params("K=\u00e9", utf8=True), {"K": "\u00e9"})


class ParseBdatTests(GrammarTestCase):
    def test_size(self):
        self.assertEqual(parse_bdat("0"), (0, False))
        self.assertEqual(parse_bdat("1000"), (1000, False))
        self.assertEqual(parse_bdat(" 5 "), (5, False))

    def test_last(self):
        self.assertEqual(parse_bdat("0 LAST"), (0, True))
        self.assertEqual(parse_bdat("12 last"), (12, True))
        self.assertEqual(parse_bdat("12  Last "), (12, True))

    def test_bad(self):
        for argument in ("", " ", "LAST", "-1", "+1", "1.0", "1 LAST x", "1 FIRST", "1 LAS",
                         "9" * 21, "\u00b2", "\u0661", "1\tLAST", "1 LA\u017fT", "0x10"):
            self.assertReply(lambda: parse_bdat(argument), 501, "5.5.4")


def long_domain(length: int) -> str:
    """A valid domain of C{length} characters (labels of at most 63)."""
    labels = []
    while length > 0:
        labels.append("d" * min(63, length))
        length -= len(labels[-1]) + 1
    return ".".join(labels)


class SimpleArgumentTests(GrammarTestCase):
    """
    The one-match reading of the common MAIL and RCPT arguments gives what
    the full grammar gives; C{from:}/C{to:} (which only the full grammar
    reads) is the reference, and every error still comes from the full
    grammar.
    """

    def outcome(self, call):
        try:
            return call()
        except GrammarError as e:
            return e.reply

    def assertSameAsFullGrammar(self, verb: str, argument: str, **kw) -> None:
        parse = (lambda a: mail(a, **kw)) if verb == "FROM:" else (lambda a: rcpt(a, **kw))
        self.assertTrue(argument.startswith(verb))
        reference = verb.lower() + argument[len(verb):]
        self.assertEqual(self.outcome(lambda: parse(argument)),
                         self.outcome(lambda: parse(reference)), argument)

    def test_mail(self):
        for argument in [
            "FROM:<sender@client.example.test>",
            "FROM:<sender@client.example.test> SIZE=2345",
            "FROM:<a.b+c@x-y.example> SIZE=000123",
            "FROM:<sender@client.example.test> SIZE=" + "9" * 20,
            "FROM:<sender@client.example.test> SIZE=" + "9" * 21,
            "FROM:<sender@client.example.test> SIZE=10000001",
            "FROM:<sender@client.example.test> SIZE=10000000",
            "FROM:<sender@client.example.test> SIZE=",
            "FROM:<sender@client.example.test>  SIZE=1",
            "FROM:<sender@client.example.test> BODY=8BITMIME",
            "FROM:<sender@client.example.test> SIZE=1 BODY=7BIT",
            "FROM:<sender@client.example.test> size=1",
            "FROM:<" + "l" * MAX_LOCAL_PART + "@example.test>",
            "FROM:<" + "l" * (MAX_LOCAL_PART + 1) + "@example.test>",
            "FROM:<a@" + long_domain(MAX_PATH - 4) + ">",  # the longest path
            "FROM:<a@" + long_domain(MAX_PATH - 3) + ">",
            "FROM:<sender@-bad.example>",
            "FROM:<sender..dots@example.test>",
            "FROM:<>",
            "FROM:<sender@[192.0.2.1]>",
            "FROM:<sender@example.test>x",
            "FROM:<sender@example.test>\t",
        ]:
            self.assertSameAsFullGrammar("FROM:", argument)

    def test_mail_with_extra_params(self):
        self.assertSameAsFullGrammar("FROM:", "FROM:<s@example.test> SIZE=5",
                                     extra_params=frozenset({"AUTH"}))

    def test_mail_size_limit(self):
        self.assertReply(lambda: mail("FROM:<s@example.test> SIZE=11", max_size=10), 552, "5.3.4")
        self.assertEqual(mail("FROM:<s@example.test> SIZE=10", max_size=10).size, 10)

    def test_rcpt(self):
        for argument, utf8 in [
            ("TO:<user1@remote.example.test>", False),
            ("TO:<user1@remote.example.test>", True),
            ("TO:<Postmaster>", False),
            ("TO:<" + "l" * MAX_LOCAL_PART + "@example.test>", False),
            ("TO:<" + "l" * (MAX_LOCAL_PART + 1) + "@example.test>", False),
            ("TO:<a@" + long_domain(MAX_PATH - 4) + ">", False),
            ("TO:<a@" + long_domain(MAX_PATH - 3) + ">", False),
            ("TO:<user@example.test> NOTIFY=NEVER", False),
            ("TO:<user@example.test> ", False),
            ("TO:<us\"er@example.test>", False),
            ("TO:<@relay.example:user@example.test>", False),
        ]:
            self.assertSameAsFullGrammar("TO:", argument, smtputf8=utf8)

    def test_simple_results(self):
        command = mail("FROM:<sender@client.example.test> SIZE=2345")
        self.assertEqual((command.sender, command.size, command.body, command.smtputf8,
                          command.auth, command.params),
                         (Address("sender", "client.example.test"), 2345, "7BIT", False, None,
                          {"SIZE": "2345"}))
        command = rcpt("TO:<user1@remote.example.test>")
        self.assertEqual((command.recipient, command.params),
                         (Address("user1", "remote.example.test"), {}))

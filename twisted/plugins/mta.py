# The twistd dropin for `twistd mta`.  This folder must never hold an
# __init__.py: it would replace Twisted's own on install.
from twisted.application.service import ServiceMaker

mta = ServiceMaker(
    "twisted-mta",
    "twisted_mta.tap",
    "A mail transfer agent: ESMTP with STARTTLS, a durable spool, plugins",
    "mta",
)

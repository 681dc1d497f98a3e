"""The write-up's setup, shared by tests and benchmarks (no pytest needed)."""

#: The write-up's setup: dovecot and exim4 serve only herzbube.ch, apache2 every domain.
WRITE_UP_RULES = """\
[[rule]]
match = ["herzbube.ch"]
restart = ["dovecot", "exim4"]

[[rule]]
match = ["*"]
reload = ["apache2"]
"""
WRITE_UP_CERTIFICATES = (
    "herzbube.ch", "moser-naef.ch", "francescamoser.ch", "francescamoser.ch-0001", "grunzwanzling.ch",
)

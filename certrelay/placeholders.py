"""The placeholders {name}, {lineage} and {domains}: which forms the rules may use (in
`run`, `precheck` and an install's `dest`), and their values for a notification.

rules.py and install.py validate with `problem`; plan.py fills them in. Only bare
names are allowed: str.format with an attribute, index, conversion or format spec
could reach past the value, and the values come from the container.
"""

import os
import string

NAMES = ("name", "lineage", "domains")


def problem(item):
    """Return what is wrong with the placeholders in the string `item`, or None."""
    try:
        fields = list(string.Formatter().parse(item))
    except ValueError as error:
        return f"a bad placeholder ({error})"
    for _, field, spec, conversion in fields:
        if field is not None and (field not in NAMES or spec or conversion):
            shown = "{" + field + ("!" + conversion if conversion else "") + (":" + spec if spec else "") + "}"
            return f"a bad placeholder {shown!r}"
    return None


def values(notification, config_dir):
    """Return the values of {name}, {lineage} and {domains} for a spool.Notification."""
    return {
        "name": notification.name,
        "lineage": os.path.join(config_dir, "live", notification.name),
        "domains": " ".join(notification.domains),
    }


def fill(template, found):
    """Return the argv `template` with its placeholders replaced by `found` (`values`)."""
    return tuple(item.format_map(found) for item in template)

"""The packaged rules file (etc/rules.toml, /etc/certrelay/rules.toml) is safe: every
rule and setting commented out, so enabling a unit before editing it restarts
nothing and loses nothing; `check`, `run` and `watch` say that no rule is written.
Uncommented, its worked example is the README's setup, and its settings the defaults."""

import os
import re

import pytest

from certrelay import rules as rules_module
from tests.conftest import REPOSITORY
from tests.writeup import WRITE_UP_RULES

PACKAGED = os.path.join(REPOSITORY, "etc", "rules.toml")
NO_RULE = "rules.toml:1: no [[rule]] tables (none written, or all commented out, as in the packaged file)"


@pytest.fixture
def packaged(relay):
    with open(PACKAGED, encoding="utf-8") as file:
        text = file.read()
    with open(relay.rules_path, "w", encoding="utf-8") as file:  # as installed, no test settings added
        file.write(text)
    return text


@pytest.mark.parametrize("command, arguments", [("run", ()), ("check", ()), ("check", ("--rules-only",)),
                                                 ("watch", ())])
def test_with_the_packaged_rules_nothing_runs_and_it_says_so(relay, packaged, command, arguments):
    relay.publish("herzbube.ch")

    result = relay.run(*arguments, command=command)

    assert result.returncode == 2, result.stderr
    assert NO_RULE in result.stderr
    assert relay.calls() == []
    assert relay.entries("queue") == ["herzbube.ch"]  # kept for when the rules are written


def test_run_with_the_packaged_rules_from_the_path_unit_keeps_the_queue_in_claimed(relay, packaged):
    relay.publish("herzbube.ch")

    result = relay.run("--empty-queue-on-error")

    assert result.returncode == 2 and NO_RULE in result.stderr
    assert relay.entries("queue") == [] and len(relay.entries("claimed")) == 1


def test_uncommented_the_packaged_file_is_the_readme_setup_with_the_default_settings(packaged, tmp_path):
    uncommented = re.sub(r"(?m)^# ?(?=\[|[a-z-]+ = )", "", packaged.split("# More examples:")[0])
    path = tmp_path / "rules.toml"
    path.write_text(uncommented)
    (tmp_path / "writeup.toml").write_text(WRITE_UP_RULES)

    rules = rules_module.load(str(path))
    writeup = rules_module.load(str(tmp_path / "writeup.toml"))

    assert [(rule.match, rule.units) for rule in rules.rules] == [(rule.match, rule.units) for rule in writeup.rules]
    # Every setting shown is the default; metrics has none (unset), the file shows an example.
    assert {**rules.settings, "metrics": None} == writeup.settings
    assert len(re.findall(r"(?m)^# [a-z-]+ = ", packaged.split("# More examples:")[0])) >= 11

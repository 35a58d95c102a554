"""The admin CLI and config checks: errors name the file and line, imports are all or nothing."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from listmilter import paths
from listmilter.core import config, importer
from tests.bed.listmilter import cli
from tests.bed.postfix import backdate, empty_config


@pytest.fixture
def cfg(tmp_path):
    path = tmp_path / "listmilter.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\ndefaults:\n  posting: open\n  subject_prefix: '[x] '\n")
    return path


def test_config_errors_carry_file_and_line(tmp_path):
    cases = {
        "milter:\n  socket: 8899\n": ":2: milter.socket must be a non-empty string (got 8899)",
        "store:\n  backend: yaml\nlists:\n  dev@example.org:\n"
        "    members:\n      - ok@example.net\n      - 'bad address'\n":
            ":7: lists.dev@example.org.members: not a valid mail address: 'bad address'",
        "lists:\n  dev@example.org: {}\n": ":1: lists: is the yaml store",
        "defaults:\n  colour: blue\n": ":2: unknown key 'colour' in defaults",
        "store:\n  backend: yaml\nlists:\n  dev@example.org: {}\n  DEV@example.org: {}\n":
            ":5: lists: 'DEV@example.org' is defined twice",
        "outgoing:\n  smtp: x\n  sendmail: /usr/sbin/sendmail\n": ":2: outgoing needs exactly one",
    }
    for text, expected in cases.items():
        path = tmp_path / "c.yaml"
        path.write_text(text)
        with pytest.raises(config.ConfigError) as info:
            config.load(str(path))
        assert f"{path}{expected}" in str(info.value), str(info.value)


def test_check_reports_errors_and_exits_non_zero(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("store:\n  backend: sqlite\n\ndefaults:\n  posting: sometimes\n")
    proc = cli(path, "check", check=False)
    assert proc.returncode == 1
    assert f"{path}:5: defaults.posting: must be one of open, members, announce" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_explicit_config_is_an_error_but_default_path_means_built_in(tmp_path):
    proc = cli(tmp_path / "nope.yaml", "list", "ls", check=False)
    assert proc.returncode == 78 and "nope.yaml: no such file" in proc.stderr
    assert config.load(paths.DEFAULT_PATH + ".absent", explicit=False).path is None


def test_list_lifecycle_and_show_says_where_values_come_from(cfg):
    cli(cfg, "list", "create", "Dev@Example.org", "--owner", "o@example.org", "--posting", "members")
    cli(cfg, "list", "set", "dev@example.org", "description", "Developers", "of", "things")
    out = cli(cfg, "list", "show", "dev@example.org").stdout
    assert "posting = members    # list" in out
    assert f'subject_prefix = "[x] "    # defaults ({cfg}:4)' in out
    assert "description = Developers of things    # list" in out
    assert "list_id = (empty)    # built-in" in out
    assert "unsubscribe_confirm = true    # built-in" in out and "owner_notices = false    # built-in" in out
    assert "owners = o@example.org    # list" in out and "True" not in out and '""' not in out
    cli(cfg, "list", "unset", "dev@example.org", "posting")
    assert f"posting = open    # defaults ({cfg}:3)" in cli(cfg, "list", "show", "dev@example.org").stdout
    dup = cli(cfg, "list", "create", "dev@example.org", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr
    bad = cli(cfg, "list", "set", "dev@example.org", "posting", "whoever", check=False)
    assert bad.returncode == 65 and "posting: must be one of" in bad.stderr
    assert cli(cfg, "list", "ls").stdout == "dev@example.org\t0\n"
    report = cli(cfg, "check", check=False, env={"MAIL_CONFIG": empty_config(cfg.parent / "postfix")}).stdout
    assert "store: sqlite (" in report and ", 1 list\n" in report
    cli(cfg, "list", "delete", "dev@example.org")
    assert cli(cfg, "list", "ls").stdout == ""
    gone = cli(cfg, "list", "show", "dev@example.org", check=False)
    assert gone.returncode == 66 and "no such list" in gone.stderr


def test_members_add_remove_ls_export(cfg):
    cli(cfg, "list", "create", "dev@example.org")
    out = cli(cfg, "members", "add", "dev@example.org", "-", input="a@example.net\nB@example.net\nb@example.net\n")
    assert "added 2, already members 1" in out.stdout
    cli(cfg, "members", "add", "dev@example.org", "c@example.net")
    assert cli(cfg, "members", "ls", "dev@example.org").stdout.split() == ["a@example.net", "B@example.net",
                                                                           "c@example.net"]
    out = cli(cfg, "members", "remove", "dev@example.org", "b@EXAMPLE.net", "zz@example.net", check=False)
    assert out.returncode == 1 and "zz@example.net is not a member" in out.stderr
    assert cli(cfg, "members", "export", "dev@example.org").stdout == "address,name\na@example.net,\nc@example.net,\n"


def test_import_reports_every_bad_line_and_changes_nothing(cfg, tmp_path):
    cli(cfg, "list", "create", "dev@example.org")
    f = tmp_path / "members.txt"
    f.write_text("# header comment\nok@example.net\nnot an address\n\nalso@bad@\nAnn <ann@example.net>\n")
    proc = cli(cfg, "members", "import", "dev@example.org", str(f), check=False)
    assert proc.returncode == 65
    assert f"{f}:3: not a valid mail address: 'not an address'" in proc.stderr
    assert f"{f}:5: not a valid mail address: 'also@bad@'" in proc.stderr
    assert "2 bad lines; nothing was changed" in proc.stderr
    assert cli(cfg, "members", "ls", "dev@example.org").stdout == ""
    f.write_text("ok@example.net\nAnn <ann@example.net>\n")
    assert "imported 2 new members" in cli(cfg, "members", "import", "dev@example.org", str(f)).stdout


def test_import_csv_keeps_names_and_attributes(cfg, tmp_path):
    cli(cfg, "list", "create", "dev@example.org")
    f = tmp_path / "members.csv"
    f.write_text("Email,Name,Team\nann@example.net,Ann,core\nbob@example.net,\"Bob, Jr.\",docs\n")
    cli(cfg, "members", "import", "dev@example.org", str(f))
    out = cli(cfg, "members", "export", "dev@example.org").stdout
    assert out == "address,name,team\nann@example.net,Ann,core\nbob@example.net,\"Bob, Jr.\",docs\n"
    f.write_text("Email,Name\nann@example.net\n")
    proc = cli(cfg, "members", "import", "dev@example.org", str(f), check=False)
    assert proc.returncode == 65 and f"{f}:2: 1 columns, the header has 2" in proc.stderr


def test_importer_reports_line_numbers():
    parsed = importer.parse(["a@example.net", "x", "a@example.net", "b@example.net"])
    assert parsed.errors == [(2, "not a valid mail address: 'x'")]
    assert [m.address for m in parsed.members] == ["a@example.net", "b@example.net"]
    assert parsed.duplicates == 1


def test_yaml_store_is_read_only_for_the_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path}/s\nstore:\n  backend: yaml\nlists:\n  dev@example.org:\n"
                    "    members: [a@example.net]\n")
    proc = cli(path, "members", "add", "dev@example.org", "b@example.net", check=False)
    assert proc.returncode == 64 and "edited in" in proc.stderr
    assert cli(path, "members", "ls", "dev@example.org").stdout == "a@example.net\n"
    assert f"defined in: {path}:5" in cli(path, "list", "show", "dev@example.org").stdout


def test_check_warns_when_a_list_exceeds_postfix_message_size_limit(cfg, tmp_path):
    pf = tmp_path / "pf"
    pf.mkdir()
    (pf / "main.cf").write_text("message_size_limit = 100000\n")
    (pf / "master.cf").touch()
    backdate(pf)
    cli(cfg, "list", "create", "big@example.org", "--owner", "o@example.org")
    cli(cfg, "members", "add", "big@example.org", "-",
        input="".join(f"member{i:05d}@example.net\n" for i in range(2000)))
    # This main.cf has no milter lines: check exits 1 for those (tests/test_check_mta.py).
    proc = cli(cfg, "check", env={"MAIL_CONFIG": str(pf)}, check=False)
    assert "list big@example.org: a post makes a Postfix queue file of about" in proc.stderr
    assert "message_size_limit = 100000" in proc.stderr
    (pf / "main.cf").write_text("message_size_limit = 1000000000\n")
    backdate(pf)
    assert "message_size_limit" not in cli(cfg, "check", env={"MAIL_CONFIG": str(pf)}, check=False).stderr


def test_bounces_lists_and_only_run_does_the_periodic_work(cfg):
    cli(cfg, "list", "create", "dev@example.org")
    assert cli(cfg, "bounces", "dev@example.org").stdout == "no bouncing members on dev@example.org\n"
    assert cli(cfg, "bounces").stdout == "no bouncing members on any list\n"
    assert cli(cfg, "bounces", "--run").stdout.startswith("nothing to do")
    gone = cli(cfg, "bounces", "nosuch@example.org", check=False)
    assert gone.returncode == 66 and "no such list" in gone.stderr


def test_listmilter_config_names_the_file_and_c_wins_over_it(cfg, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(f"state_dir: {tmp_path}/other-state\n")
    cli(cfg, "list", "create", "dev@example.org")
    cli(other, "list", "create", "ops@example.org")
    assert cli(other, "list", "ls", env={"LISTMILTER_CONFIG": str(cfg)}).stdout == "ops@example.org\t0\n"
    by_env = subprocess.run([sys.executable, "-m", "listmilter", "list", "ls"], capture_output=True, text=True,
                            env={**os.environ, "LISTMILTER_CONFIG": str(cfg)}, timeout=60)
    assert (by_env.returncode, by_env.stdout) == (0, "dev@example.org\t0\n")
    missing = subprocess.run([sys.executable, "-m", "listmilter", "list", "ls"], capture_output=True, text=True,
                             env={**os.environ, "LISTMILTER_CONFIG": str(tmp_path / "nope.yaml")}, timeout=60)
    assert missing.returncode == 78 and "nope.yaml: no such file" in missing.stderr


def test_members_ls_says_what_it_hides_and_all_shows_status(cfg):
    cli(cfg, "list", "create", "dev@example.org")
    cli(cfg, "members", "add", "dev@example.org", "a@example.net", "b@example.net", "c@example.net")
    cli(cfg, "members", "disable", "dev@example.org", "b@example.net")
    plain = cli(cfg, "members", "ls", "dev@example.org")
    assert plain.stdout == "a@example.net\nc@example.net\n"
    assert plain.stderr == ("dev@example.org: 1 disabled member not shown (they receive no posts); "
                            "`listmilter members ls --all` shows every member with its status\n")
    every = cli(cfg, "members", "ls", "dev@example.org", "--all")
    assert every.stdout == "a@example.net\tactive\nb@example.net\tdisabled\nc@example.net\tactive\n"
    assert every.stderr == ""
    assert "members: 3 (1 disabled: they receive no posts)" in cli(cfg, "list", "show", "dev@example.org").stdout


def test_csv_output_ends_with_a_newline_and_a_missing_address_fails_in_csv_too(cfg):
    cli(cfg, "list", "create", "dev@example.org")
    cli(cfg, "members", "add", "dev@example.org", "a@example.net")
    for args in (("members", "export", "dev@example.org"), ("members", "history", "dev@example.org", "--csv")):
        out = cli(cfg, *args).stdout
        assert out.endswith("\n") and out.count("\n") == 2, out
    missing = cli(cfg, "members", "history", "dev@example.org", "zz@example.net", "--csv", check=False)
    assert missing.returncode == 1 and "no membership changes recorded for zz@example.net" in missing.stderr


def test_yaml_syntax_error_at_the_end_of_the_file_names_where_the_open_part_begins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("state_dir: /tmp/x\nsite:\n  admin: 'postmaster@example.org\nlog:\n  target: stderr\n")
    proc = cli(path, "check", check=False)
    assert proc.returncode == 1
    assert f"{path}:3: YAML syntax error: found unexpected end of stream" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_example_config_gives_exactly_the_built_in_behaviour(tmp_path):
    import dataclasses
    from pathlib import Path
    shipped = Path(__file__).resolve().parent.parent / "conf" / "listmilter.yaml"
    loaded = config.load(str(shipped))
    assert dataclasses.replace(loaded, path=None, mtime=None) == config.Config()
    proc = cli(shipped, "check", check=False, env={"MAIL_CONFIG": empty_config(tmp_path)})
    assert "web: no base_url: posts carry only a mailto: List-Unsubscribe" in proc.stdout
    # Every commented line is valid when uncommented, and those marked "default" are the defaults.
    text = shipped.read_text().split("# The yaml store")[0]
    uncommented = "\n".join(line[2:] if re.match(r"# *([a-z_]+:( |$)|#)", line) else line
                            for line in text.splitlines())
    full = config.parse(uncommented, "uncommented")
    built_in = config.Config()
    for name in ("milter_socket", "socketmap_socket", "transport", "backend", "store_path", "state_dir",
                 "log_facility"):
        assert getattr(full, name) == getattr(built_in, name), name
    # outgoing.reinject is an example (no listener is there by default); the rest are the defaults.
    assert full.outgoing.reinject == "127.0.0.1:10025"
    assert dataclasses.replace(full.outgoing, reinject_host=None, reinject_port=0) == built_in.outgoing
    for name in ("posting", "subscribe_policy", "archive"):
        assert full.effective(name, {}).value == built_in.effective(name, {}).value, name
    assert full.web.base_url and full.site_admin == "postmaster@example.org"


def test_bounces_commands_say_when_there_is_nothing(cfg):
    cli(cfg, "list", "create", "dev@example.org")
    assert cli(cfg, "bounces", "--run").stdout.startswith("nothing to do: no warning or removal is due")
    assert cli(cfg, "bounces", "--kept").stdout == "no bounce mail kept for any list\n"
    assert cli(cfg, "bounces", "dev@example.org", "--kept").stdout == "no bounce mail kept for dev@example.org\n"
    assert cli(cfg, "bounces").stdout == "no bouncing members on any list\n"


def test_check_under_sendmail_checks_its_program_and_skips_postfix(tmp_path):
    path = tmp_path / "sm.yaml"
    path.write_text(f"state_dir: {tmp_path}/state\nmta:\n  type: sendmail\n  sendmail: {tmp_path}/nosuch\n")
    proc = cli(path, "check", check=False)
    assert proc.returncode == 1, proc.stderr
    assert f"mta.sendmail: {tmp_path}/nosuch is not an executable file" in proc.stderr
    assert "postfix" not in proc.stderr.lower() and "Traceback" not in proc.stderr
    program = tmp_path / "sendmail"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    path.write_text(f"state_dir: {tmp_path}/state\nmta:\n  type: sendmail\n  sendmail: {program}\n")
    proc = cli(path, "check", check=False)
    assert f"mta: sendmail ({program}); Postfix checks skipped" in proc.stdout + proc.stderr, proc.stderr
    assert "mta.sendmail" not in proc.stderr

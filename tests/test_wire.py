"""diskwatch.wire: the one definition of the NBD vocabulary."""

from __future__ import annotations

import errno

from diskwatch import events, wire
from diskwatch.server import protocol as P


def _constants(*prefixes: str) -> dict[str, int]:
    return {name: value for name, value in vars(wire).items()
            if name.startswith(prefixes) and isinstance(value, int)}


def test_every_command_has_a_name_and_the_enum_is_the_constants():
    commands = _constants("CMD_")
    commands = {n: v for n, v in commands.items() if not n.startswith("CMD_FLAG_")}
    assert sorted(commands.values()) == list(range(len(wire.COMMAND_NAMES)))
    assert [c.value for c in wire.Command] == list(range(len(wire.COMMAND_NAMES)))
    for name, value in commands.items():
        assert wire.Command[name.removeprefix("CMD_")] == value
    assert wire.COMMAND_NAMES[wire.CMD_WRITE_ZEROES] == "zero"
    assert wire.COMMAND_NAMES[wire.CMD_UNKNOWN] == "unknown"
    assert len(set(wire.COMMAND_NAMES)) == len(wire.COMMAND_NAMES)


def test_command_sets():
    assert wire.WRITE_COMMANDS == {wire.CMD_WRITE, wire.CMD_WRITE_ZEROES, wire.CMD_TRIM}
    assert isinstance(wire.WRITE_COMMANDS, frozenset)
    assert wire.WRITE_COMMANDS < wire.DATA_COMMANDS
    assert wire.DATA_COMMANDS - wire.WRITE_COMMANDS == {wire.CMD_READ, wire.CMD_CACHE}
    # a Command and its plain number are the same member
    assert wire.Command.TRIM in wire.WRITE_COMMANDS and 4 in wire.WRITE_COMMANDS


def test_flags_are_distinct_bits():
    for prefix in ("CMD_FLAG_", "TF_", "FLAG_C_"):
        values = list(_constants(prefix).values())
        assert all(v and not v & (v - 1) for v in values), prefix
        assert len(set(values)) == len(values), prefix


def test_magics_spell_what_the_spec_says():
    assert wire.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert wire.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert len({wire.REQUEST_MAGIC, wire.SIMPLE_REPLY_MAGIC, wire.STRUCTURED_REPLY_MAGIC}) == 3


def test_every_wire_error_has_its_errno_name_and_value():
    errors = _constants("NBD_E")
    assert set(errors.values()) == set(wire.ERROR_NAMES)
    for name, value in errors.items():
        assert wire.ERROR_NAMES[value] == name.removeprefix("NBD_")
        # NBD's numbering is Linux's
        assert getattr(errno, name.removeprefix("NBD_")) == value


def test_the_errno_mapping_is_total_and_round_trips():
    # whatever a source raises, what goes on the wire is an NBD error
    for err in [None, 0, *range(1, 200)]:
        assert wire.wire_error(err) in wire.ERROR_NAMES
    # each wire error comes back from its own errno
    for value, name in wire.ERROR_NAMES.items():
        assert wire.wire_error(getattr(errno, name)) == value
    assert wire.wire_error(errno.EROFS) == wire.NBD_EPERM
    assert wire.wire_error(errno.EDQUOT) == wire.NBD_ENOSPC
    assert wire.wire_error(errno.ENOENT) == wire.NBD_EIO
    assert wire.wire_error(None) == wire.NBD_EIO


def test_the_protocol_and_events_use_these_very_names():
    shared = _constants("NBD", "CMD_", "OPT_", "REP_", "INFO_", "TF_", "FLAG_", "REPLY_",
                        "REQUEST_", "SIMPLE_", "STRUCTURED_", "IHAVEOPT")
    for name, value in shared.items():
        assert getattr(P, name) is value, name
    assert P.wire_error is wire.wire_error
    assert P.META_BASE_ALLOCATION == wire.META_BASE_ALLOCATION
    assert events.Command is wire.Command
    assert events.COMMAND_NAMES is wire.COMMAND_NAMES
    # every command the protocol knows has its flags, and only those
    assert set(P.COMMAND_FLAGS_ALLOWED) == set(range(wire.CMD_UNKNOWN))

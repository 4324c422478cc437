"""The NBD wire vocabulary, defined once: magics, handshake and option
numbers, transmission flags, commands and their flags, reply types, errors.

Values are those of doc/proto.md in the NetworkBlockDevice/nbd project.
Nothing here does I/O or framing (that is ``server/protocol.py``); every
module that speaks of NBD commands, flags or errors (the protocol, events,
the importers of other servers' logs, metrics, the report) imports them
from here.
"""

from __future__ import annotations

import errno
from enum import IntEnum

# --- magic numbers ---------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# --- handshake ---------------------------------------------------------------------

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# option replies
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# NBD_REP_INFO types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

#: the one metadata context diskwatch serves
META_BASE_ALLOCATION = "base:allocation"

# --- transmission --------------------------------------------------------------------

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_UNKNOWN = 8  # not on the wire: what parse_requests reports for a command it does not know


class Command(IntEnum):
    """NBD command numbers (the wire values)."""

    READ = CMD_READ
    WRITE = CMD_WRITE
    DISC = CMD_DISC
    FLUSH = CMD_FLUSH
    TRIM = CMD_TRIM
    CACHE = CMD_CACHE
    WRITE_ZEROES = CMD_WRITE_ZEROES
    BLOCK_STATUS = CMD_BLOCK_STATUS
    #: not an NBD command: what the server publishes for a command number it
    #: does not know (it answered EINVAL), so consumers index tables safely
    UNKNOWN = CMD_UNKNOWN


#: short lower-case names used in traces, indexed by command number
COMMAND_NAMES = ("read", "write", "disc", "flush", "trim", "cache", "zero", "block_status",
                 "unknown")
#: commands that change the disk's bytes
WRITE_COMMANDS = frozenset((CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM))
#: commands whose offset and length are bytes of the disk they act on
#: (block status only asks about them; flush and disc have none)
DATA_COMMANDS = frozenset((CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES, CMD_CACHE))

# command flags
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# structured reply flags and chunk types
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# --- errors --------------------------------------------------------------------------

# errors on the wire (NBD's own numbering, equal to Linux errno values)
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108
#: the errors an NBD server can send, by their wire value
ERROR_NAMES = {NBD_EPERM: "EPERM", NBD_EIO: "EIO", NBD_ENOMEM: "ENOMEM", NBD_EINVAL: "EINVAL",
               NBD_ENOSPC: "ENOSPC", NBD_EOVERFLOW: "EOVERFLOW", NBD_ENOTSUP: "ENOTSUP",
               NBD_ESHUTDOWN: "ESHUTDOWN"}
#: host errno -> wire error, for the errnos that have a wire value of their own
WIRE_ERRORS = {
    errno.EPERM: NBD_EPERM, errno.EACCES: NBD_EPERM, errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO, errno.ENOMEM: NBD_ENOMEM, errno.EINVAL: NBD_EINVAL,
    errno.ENOSPC: NBD_ENOSPC, errno.EFBIG: NBD_ENOSPC, errno.EDQUOT: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW, errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP, errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def wire_error(err: int | None) -> int:
    """Map a host errno to the NBD error sent on the wire (EIO by default)."""
    return WIRE_ERRORS.get(err or errno.EIO, NBD_EIO)

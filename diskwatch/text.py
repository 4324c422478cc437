"""Text from outside made safe to show: the one place that does it.

Whatever a guest, a network peer or a block map hands us is untrusted text:
file names from a map (whatever bytes the guest's filesystem holds), export
names, URLs, messages from a source, and the captive command's output (a
guest's serial console). Written raw to a terminal, an ESC starts a command:
``ESC c`` resets the screen, ``CSI 2J`` clears it, ``OSC 0`` sets the
window title, ``OSC 52`` writes the clipboard. Neither rich nor Textual stops
that: rich's ``Text`` drops only BEL, BS, VT, FF and CR, and ESC goes through.

Two functions:

``safe_text(s)``
    For names and messages. Every character that is not shown as itself is
    shown escaped, never raw: C0 controls, DEL and C1 controls (``\\x1b``,
    ``\\x7f``, ``\\u009b``), bidi overrides and other format characters
    (``\\u202e``, ``\\u200b``), line/paragraph separators, unassigned code
    points, and lone surrogates. A surrogate from ``surrogateescape`` (a byte
    that was not UTF-8, as block-map paths are decoded) is shown as that byte,
    ``\\xff``. Backslashes are left alone (Windows-style names stay readable),
    so the escaped form is for people, not for parsing back.

``TerminalText``
    For the captive command's output, line by line: colours and text
    attributes (SGR, ``CSI ... m``) are applied as a terminal would, and the
    SGR state carries over to the next line as it does on a terminal. Every
    other escape sequence (CSI, OSC, DCS, SOS, PM, APC, and plain ``ESC x``
    such as ``ESC c``) is dropped whole, an unterminated one to the end of
    the line. Of the controls: CR rewrites the line (what follows the last CR
    that has text after it is the line, as a progress bar means it; a
    trailing CR changes nothing), TAB moves to the next multiple of 8, NUL is
    dropped (terminals ignore it), and every other control, BS included, is
    shown escaped: BS is not applied, so nothing a guest printed is hidden
    by overstriking. Text is never concealed (SGR 8) nor made to blink.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from functools import lru_cache

from rich.cells import cell_len
from rich.color import Color
from rich.style import Style
from rich.text import Text

from .units import count  # found here too (in __all__)

__all__ = ["SafeFormatter", "TerminalText", "count", "safe_text"]

# Cc controls, Cf format characters (bidi overrides, zero-width), Cs lone
# surrogates, Zl/Zp separators, Cn unassigned. (Co private use and Zs spaces
# are shown as themselves: they cannot move the cursor or reorder text.)
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp", "Cn"})


def _escape(ch: str) -> str:
    cp = ord(ch)
    if 0xDC80 <= cp <= 0xDCFF:  # a byte surrogateescape kept: show the byte
        return f"\\x{cp - 0xDC00:02x}"
    if cp < 0x80:
        return f"\\x{cp:02x}"
    if cp <= 0xFFFF:
        return f"\\u{cp:04x}"
    return f"\\U{cp:08x}"


def safe_text(text: str) -> str:
    """``text`` with every control, format and unassigned character escaped."""
    if text.isprintable():  # the common case, at C speed
        return text
    category = unicodedata.category
    return "".join(_escape(ch) if category(ch) in _UNSAFE_CATEGORIES else ch for ch in text)


class SafeFormatter(logging.Formatter):
    """Log lines through ``safe_text`` (a message may quote a name or a URL);
    the lines of a traceback stay lines."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(safe_text(line) for line in super().format(record).split("\n"))


# --- terminal output ---------------------------------------------------------

# Escape sequences as ECMA-48 / a VT500 parser delimits them. Checked in
# order; whatever is left of an ESC that matches none is shown escaped.
_SEQUENCE = re.compile(
    r"""
      \x1b\[ (?P<params>[0-?]*) (?P<inter>[\ -/]*) (?P<final>[@-~])   # CSI
    | \x1b[\]PX^_] .*? (?:\x07|\x1b\\|\x9c|$)    # OSC DCS SOS PM APC: to BEL/ST/line end
    | \x1b\[ [0-?]* [\ -/]* $                    # a CSI cut off by the line's end
    | \x1b [\ -/]* [0-~]                         # ESC c, ESC 7, ESC ( B, ESC # 8 ...
    | \x1b [\ -/]+ $                             # an nF sequence cut off
    """,
    re.VERBOSE | re.DOTALL,
)
_SGR_PARAMS = re.compile(r"[0-9;:]*")
_PLAIN_CONTROLS = re.compile(r"[\r\t\x00]")

# SGR attribute switches: code -> (attribute, value). 5/6 (blink) and 8
# (conceal) are left out on purpose: a guest must not hide or flash text.
_SGR_SET = {
    1: ("bold", True), 2: ("dim", True), 3: ("italic", True), 4: ("underline", True),
    7: ("reverse", True), 9: ("strike", True), 21: ("underline", True),
    23: ("italic", False), 24: ("underline", False), 27: ("reverse", False),
    29: ("strike", False),
}


@lru_cache(maxsize=1024)
def _style(attrs: tuple) -> Style:
    return Style(**dict(attrs))


def _extended_color(parts: list[int]) -> tuple[Color | None, int]:
    """``5;N`` or ``2;R;G;B`` after a 38/48: the colour and how many numbers it used."""
    if parts[:1] == [5] and len(parts) >= 2:
        n = parts[1]
        return (Color.from_ansi(n) if 0 <= n <= 255 else None), 2
    if parts[:1] == [2] and len(parts) >= 4:
        r, g, b = parts[1:4]
        ok = all(0 <= v <= 255 for v in (r, g, b))
        return (Color.from_rgb(r, g, b) if ok else None), 4
    return None, len(parts)  # malformed: the rest of the sequence is ignored, as xterm does


class TerminalText:
    """Turns the captive command's output lines into rich ``Text``: SGR
    applied, everything else dropped or escaped (see the module docstring).
    One per output stream: the SGR state carries over from line to line."""

    def __init__(self) -> None:
        self._attrs: dict[str, object] = {}
        self._current: Style = Style()

    def line(self, line: str, style: Style | str = "") -> Text:
        """One line (without its newline) as ``Text`` on ``style``."""
        out = Text(style=style, no_wrap=False)
        pending_cr = False
        pos = 0
        for m in _SEQUENCE.finditer(line):
            if m.start() > pos:
                out, pending_cr = self._plain(out, line[pos:m.start()], pending_cr, style)
            pos = m.end()
            if m["final"] == "m" and not m["inter"] and _SGR_PARAMS.fullmatch(m["params"]):
                self._sgr(m["params"])
        if pos < len(line):
            out, pending_cr = self._plain(out, line[pos:], pending_cr, style)
        return out

    def _plain(self, out: Text, chunk: str, pending_cr: bool, style: Style | str
               ) -> tuple[Text, bool]:
        pos = 0
        for m in _PLAIN_CONTROLS.finditer(chunk):
            if m.start() > pos:
                out = self._append(out, chunk[pos:m.start()], pending_cr, style)
                pending_cr = False
            pos = m.end()
            ch = m.group()
            if ch == "\r":
                pending_cr = True
            elif ch == "\t":
                if pending_cr:
                    out, pending_cr = Text(style=style), False
                col = cell_len(out.plain)
                out.append(" " * (8 - col % 8), self._current)
            # NUL: dropped
        if pos < len(chunk):
            out = self._append(out, chunk[pos:], pending_cr, style)
            pending_cr = False
        return out, pending_cr

    def _append(self, out: Text, text: str, pending_cr: bool, style: Style | str) -> Text:
        if pending_cr:  # the line is written again from its start
            out = Text(style=style)
        out.append(safe_text(text), self._current)
        return out

    def _sgr(self, params: str) -> None:
        attrs = self._attrs
        codes: list[list[int]] = []
        for field in params.split(";") if params else ["0"]:
            try:  # "38:2::255:0:0" (ITU form): an empty sub-field is the colour space
                codes.append([int(x) if x else 0 for x in field.split(":")] if field else [0])
            except ValueError:
                return
        i = 0
        while i < len(codes):
            sub = codes[i]
            code = sub[0]
            i += 1
            if code == 0:
                attrs.clear()
            elif code in _SGR_SET:
                name, value = _SGR_SET[code]
                attrs[name] = value
            elif code == 4 and len(sub) > 1:  # 4:0 no underline, 4:N a kind of underline
                attrs["underline"] = sub[1] != 0
            elif code == 22:
                attrs.pop("bold", None)
                attrs.pop("dim", None)
            elif 30 <= code <= 37 or 90 <= code <= 97:
                attrs["color"] = Color.from_ansi(code - 30 if code < 90 else code - 82)
            elif 40 <= code <= 47 or 100 <= code <= 107:
                attrs["bgcolor"] = Color.from_ansi(code - 40 if code < 100 else code - 92)
            elif code == 39:
                attrs.pop("color", None)
            elif code == 49:
                attrs.pop("bgcolor", None)
            elif code in (38, 48):
                if len(sub) > 1:  # colon form: everything is in this field
                    rest = sub[1:]
                    if rest[:1] == [2] and len(rest) >= 5:
                        rest = [2, *rest[-3:]]  # drop the colour-space id
                    color, _ = _extended_color(rest)
                else:
                    color, used = _extended_color([c[0] for c in codes[i:i + 4]])
                    i += used
                if color is not None:
                    attrs["color" if code == 38 else "bgcolor"] = color
            # anything else (blink, conceal, fonts, frames...): ignored
        self._current = _style(tuple(sorted(attrs.items(), key=lambda kv: kv[0])))
